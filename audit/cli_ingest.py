"""``gradledger ingest``, ``gradledger manifest`` and ``gradledger suggestions``: annotation provenance in and out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from audit import progress
from audit.cli import fail as _fail
from audit.cli import main
from ledger.errors import LedgerError
from ledger.ingest import IngestError, PseudonymKeyError, ingest
from ledger.ingest.reader import DEFAULT_MAX_ITEM_BYTES
from ledger.ingest.suggestions import export_labelbox_mal, export_labelstudio_predictions, record_suggestions


@main.group("ingest")
def ingest_group() -> None:
    """Ingest annotation exports into a ledger (labelbox | labelstudio | jsonl).

    Identities (e-mails, user ids) become keyed HMAC-SHA256 pseudonyms; the key stays outside the ledger.
    Without --pseudonym-key (or $GRADLEDGER_PSEUDONYM_KEY) a key is created beside the ledger file as
    LEDGER.pseudonym-key, mode 0600, and announced on stderr. An ingest is atomic: on any error it prints
    one line naming file, line and field, exits 2, and the ledger is unchanged. Re-ingesting an export
    adds nothing and reports duplicates.
    """


def _options(f: Any) -> Any:
    opts = [
        click.argument("file", type=click.Path(dir_okay=False, path_type=Path)),
        click.option("--ledger", "ledger_path", required=True, help="Ledger file or database URL (created if missing)."),
        click.option("--project", default=None, help="Project id when the export has none; selects one project of a multi-project Labelbox export."),
        click.option("--pseudonym-key", type=click.Path(dir_okay=False, path_type=Path), default=None, help="HMAC key file (64 hex digits, mode 0600)."),
        click.option("--identity-map", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Append pseudonym → identity pairs to this separate file (mode 0600); never part of the ledger."),
        click.option("--max-item-bytes", type=click.IntRange(min=1024), default=DEFAULT_MAX_ITEM_BYTES, show_default=True, help="Largest single JSON element / line accepted."),
        click.option("--checkpoint-seq", type=click.IntRange(min=0), default=None, help="Checkpoint entry of the model that made suggestions in this file."),
        click.option("--model-version", default=None, help="Model version for suggestion files that do not name one."),
        click.option("--shared", "shared", is_flag=True, help="Let other processes read a SQLite ledger while a large export (64 MiB and more) is ingested: WAL mode throughout, slower. Default: such an ingest writes its pages once and holds the ledger until it ends."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
    ]  # fmt: skip
    for opt in reversed(opts):
        f = opt(f)
    return f


def _run(source: str, file: Path, ledger_path: str, as_json: bool, shared: bool, **kw: Any) -> None:
    if shared:
        kw["bulk"] = False
    try:
        with progress.activity(f"ingesting {file.name}", show=progress.wanted(as_json)):
            s = ingest(source, file, ledger_path, announce=lambda m: click.echo(m, err=True), **kw)
    except (IngestError, PseudonymKeyError) as exc:
        _fail(str(exc))
    except LedgerError as exc:
        _fail(f"{ledger_path}: {exc}")
    if as_json:
        click.echo(json.dumps(s.to_json(), sort_keys=True))
        return
    if s.already_ingested:
        click.echo(
            f"{s.name}: already ingested (sha256 {s.sha256[:16]}…, export entry {s.export_seq}); "
            f"nothing added, {s.duplicates} duplicates"
        )
        return
    span = f"entries {s.first_seq}..{s.last_seq}, " if s.first_seq is not None else ""
    click.echo(
        f"{s.name} ({s.format}, sha256 {s.sha256[:16]}…): {s.records} records, {s.items} items, "
        f"{s.annotators} annotators, {s.skipped} skipped, {s.duplicates} duplicates, "
        f"{s.suggestions} suggestions, {s.seeded} seeded; {span}export entry {s.export_seq}"
    )


@ingest_group.command("labelbox")
@_options
def ingest_labelbox(file: Path, ledger_path: str, as_json: bool, **kw: Any) -> None:
    """Labelbox Export v2 NDJSON, legacy v1 JSON array, or MAL import NDJSON (detected from the content)."""
    _run("labelbox", file, ledger_path, as_json, **kw)


@ingest_group.command("labelstudio")
@_options
def ingest_labelstudio(file: Path, ledger_path: str, as_json: bool, **kw: Any) -> None:
    """Label Studio JSON export (annotations, drafts, predictions, reviews, agreement)."""
    _run("labelstudio", file, ledger_path, as_json, **kw)


@ingest_group.command("jsonl")
@_options
def ingest_jsonl(file: Path, ledger_path: str, as_json: bool, **kw: Any) -> None:
    """The generic gradledger format: JSONL, or CSV for a .csv file (see docs/ingest-formats.md)."""
    _run("jsonl", file, ledger_path, as_json, **kw)


# -- manifests ------------------------------------------------------------------------------------------------
@main.group("manifest")
def manifest_group() -> None:
    """Dataset manifests: training example id → label records."""


@manifest_group.command("create")
@click.argument("name")
@click.argument("mapping", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--ledger", "ledger_path", required=True, help="Ledger file or database URL.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def manifest_create(name: str, mapping: Path, ledger_path: str, as_json: bool) -> None:
    """Append a manifest. MAPPING is a JSON object {example_id: label_id | [label_ids] |
    {"label_ids": [...], "content_sha256": hex}}, optionally {"examples": ..., "domains": ..., "rights": ...}."""
    from ledger.provenance import Manifest, ManifestError
    from ledger.store import Ledger

    try:
        doc = json.loads(mapping.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        _fail(f"{mapping}: not a JSON file: {exc}")
    if not isinstance(doc, dict):
        _fail(f"{mapping}: expected a JSON object")
    examples = doc.get("examples", doc) if isinstance(doc.get("examples"), dict) else doc
    try:
        with Ledger.open(ledger_path) as led:
            m = Manifest.create(led, name, examples, doc.get("domains"), rights=doc.get("rights"))
    except ManifestError as exc:
        _fail(f"{mapping}: {exc}")
    except LedgerError as exc:
        _fail(f"{ledger_path}: {exc}")
    out = {"seq": m.seq, "name": m.name, "digest": m.digest, "examples": len(m)}
    click.echo(
        json.dumps(out)
        if as_json
        else f"manifest {m.name!r}: {len(m)} examples, seq {m.seq}, digest {m.digest}"
    )


# -- suggestions ----------------------------------------------------------------------------------------------
@main.group("suggestions")
def suggestions_group() -> None:
    """Model suggestions: record them, export them as Labelbox MAL NDJSON or Label Studio predictions."""


@suggestions_group.command("export")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ledger", "ledger_path", required=True, help="Ledger file or database URL.")
@click.option("--format", "fmt", type=click.Choice(["labelbox-mal", "labelstudio"]), required=True)
@click.option(
    "--checkpoint-seq", type=int, default=None, help="Only suggestions made by this checkpoint entry."
)
@click.option("--model-version", default=None, help="Only suggestions of this model version.")
@click.option("--json", "as_json", is_flag=True, help="Print the count as JSON.")
def suggestions_export(
    out: Path,
    ledger_path: str,
    fmt: str,
    checkpoint_seq: int | None,
    model_version: str | None,
    as_json: bool,
) -> None:
    """Write the ledger's suggestions to OUT for import as pre-labels."""
    from ledger.store import Ledger

    try:
        with Ledger.open(ledger_path) as led:
            fn = export_labelbox_mal if fmt == "labelbox-mal" else export_labelstudio_predictions
            n = fn(led, out, checkpoint_seq=checkpoint_seq, model_version=model_version)
    except LedgerError as exc:
        _fail(f"{ledger_path}: {exc}")
    click.echo(json.dumps({"written": n, "path": str(out)}) if as_json else f"wrote {n} suggestions to {out}")


@suggestions_group.command("record")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--ledger", "ledger_path", required=True, help="Ledger file or database URL.")
@click.option(
    "--checkpoint-seq", type=int, default=None, help="Checkpoint entry of the model that made them."
)
@click.option("--model-version", default=None, help="Model version (when rows lack one).")
@click.option("--json", "as_json", is_flag=True, help="Print the count as JSON.")
def suggestions_record(
    file: Path, ledger_path: str, checkpoint_seq: int | None, model_version: str | None, as_json: bool
) -> None:
    """Record model suggestions from a JSONL file of {item_id, value, confidence?, suggestion_id?, model_version?}."""
    from ledger.store import Ledger

    rows = []
    with file.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    _fail(f"{file}:{n}: invalid JSON: {exc}")
    try:
        with Ledger.open(ledger_path) as led:
            seqs = record_suggestions(led, rows, checkpoint_seq=checkpoint_seq, model_version=model_version)
    except (ValueError, LedgerError) as exc:
        _fail(f"{file}: {exc}")
    click.echo(json.dumps({"recorded": len(seqs)}) if as_json else f"recorded {len(seqs)} suggestions")
