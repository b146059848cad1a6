"""``gradledger lineage | export | verify-export``: lineage graphs and signed provenance exports.

Exit codes: 0 ok, 1 verification failed (the failed check and why), 2 usage or unreadable input (one line on
stderr; nothing half-written: output files are written to a temporary and renamed into place).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from audit import export as _export
from audit import lineage as _lineage
from audit.cli import main
from audit.cli_ledger import _fail, _input_errors, _key_name_for
from ledger import keys
from ledger.fileio import write_atomic
from ledger.store import Ledger

LEDGER_HELP = "LEDGER is a SQLite file path, a sqlite:/// URL or a postgresql+psycopg:// URL."


@main.command("lineage")
@click.argument("ledger")
@click.option("--run", default=None, help="Only this run (default: every run).")
@click.option("--label", default=None, help="Focus: a label id (or label:<source>:<id>).")
@click.option("--layer", default=None, help="Focus: a layer name (or layer:<run>/<name>).")
@click.option("--annotator", default=None, help="Focus: an annotator pseudonym.")
@click.option("--checkpoint", type=click.IntRange(min=0), default=None, help="Focus: a checkpoint entry seq.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(_lineage.FORMATS),
    default="graphml",
    show_default=True,
    help="Output format.",
)
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output file."
)
@click.option(
    "--top", type=click.IntRange(min=1), default=_lineage.DEFAULT_TOP, show_default=True,
    help="Contribution edges (example -> layer) kept per layer.",
)  # fmt: skip
@click.option("--radius", type=click.IntRange(min=1), default=None, help="Limit the focus to this many hops.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@_input_errors
def lineage_cmd(
    ledger: str,
    run: str | None,
    label: str | None,
    layer: str | None,
    annotator: str | None,
    checkpoint: int | None,
    fmt: str,
    output: Path,
    top: int,
    radius: int | None,
    as_json: bool,
) -> None:
    """Write the lineage graph (or the part around one focus) as GraphML, DOT or node-link JSON.

    Nodes: annotators, labels, suggestions, exports, examples, runs, layers, checkpoints, policies, manifests;
    every node and edge carries the ledger seq that proves it. Training edges are aggregated per run (with
    per-epoch series), so the graph grows with examples and layers, not steps. With a focus (at most one of
    --label, --layer, --annotator, --checkpoint) the output is the focus with its ancestors and descendants;
    walking up from a run does not pull in every example (the top contributors reach layers directly).

    \b
    GraphML opens in Gephi / yEd; DOT in Graphviz (`dot -Tsvg`); JSON is networkx node-link data.
    LEDGER is a SQLite file path, a sqlite:/// URL or a postgresql+psycopg:// URL.
    """
    foci = [x for x in (label, layer, annotator, checkpoint) if x is not None]
    if len(foci) > 1:
        _fail("give at most one of --label, --layer, --annotator, --checkpoint")
    try:
        with Ledger.open(ledger) as led:
            g = _lineage.graph(led, run=run, top=top)
        if foci:
            nodes = _lineage.resolve_focus(
                g, label=label, layer=layer, annotator=annotator, checkpoint=checkpoint
            )
            g = _lineage.focus(g, nodes, radius=radius)
        _lineage.write(g, output, fmt)
    except _lineage.LineageError as exc:
        _fail(str(exc))
    out = {"output": str(output), "format": fmt, "nodes": g.number_of_nodes(), "edges": g.number_of_edges()}
    click.echo(
        json.dumps(out) if as_json else f"wrote {output} ({fmt}): {out['nodes']} nodes, {out['edges']} edges"
    )


@main.command("export")
@click.argument("ledger")
@click.option("--run", required=True, help="The run to export.")
@click.option(
    "--key", "key_path", required=True, type=click.Path(path_type=Path), help="Private key file (ledger.key)."
)
@click.option("--name", default=None, help="Key name for a fresh checkpoint (default: from ledger.vkey).")
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Bundle file."
)
@click.option("--evidence", is_flag=True, help="Include the cited entries with inclusion proofs.")
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=_export.DEFAULT_TOP,
    show_default=True,
    help="Top-K per layer.",
)
@_input_errors
def export_cmd(
    ledger: str, run: str, key_path: Path, name: str | None, output: Path, evidence: bool, top: int
) -> None:
    """Write a signed provenance bundle for RUN: a DSSE envelope over an in-toto Statement v1.

    Subjects: the run's checkpoints (sha256 of their state-dict digests). Predicate
    (https://gradledger.dev/provenance/v1): ledger origin and a signed checkpoint note covering every cited
    entry (a stored one by this key, else a fresh one: refused if the ledger fails verification or is
    inconsistent with earlier checkpoints), run config, policy and manifest digests, the label exports,
    per-layer top-K labels and annotators by contribution, DP epsilon. Annotators appear as pseudonyms only.
    With --evidence, the cited entries (leaf bytes, payloads) and their RFC 9162 inclusion proofs are
    included, so `gradledger verify-export` can recompute every figure offline.

    \b
    LEDGER is a SQLite file path, a sqlite:/// URL or a postgresql+psycopg:// URL.
    """
    private_key = keys.load_private_key(key_path)
    key_name = _key_name_for(key_path, name)
    with Ledger.open(ledger) as led:
        bundle = _export.build_export(led, run, private_key, key_name, evidence=evidence, top=top)
    write_atomic(output, json.dumps(bundle, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    n = len(bundle.get("evidence", {}).get("entries", []))
    click.echo(f"wrote {output}: run {run!r}" + (f", {n} evidence entries" if evidence else ", no evidence"))


@main.command("verify-export")
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--pubkey",
    "pubkey_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Signer's ledger.pub or ledger.vkey.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_input_errors
def verify_export_cmd(bundle: Path, pubkey_path: Path, as_json: bool) -> None:
    """Verify BUNDLE offline with the public key only: exit 0 ok, 1 failed, 2 unreadable.

    Checks the DSSE signature, the in-toto statement, the checkpoint note's signature and that it matches
    the predicate; with evidence also every inclusion proof, every entry's leaf hash and payload sha256
    recomputed from its bytes, the subjects against the checkpoint entries, and every predicate figure
    (per-layer totals, top-K labels and annotators, digests, epsilon) recomputed from the entries exactly.
    Without evidence the output says which checks were skipped.
    """
    pub = keys.load_verifier(pubkey_path)
    try:
        data = bundle.read_bytes()
    except FileNotFoundError:
        _fail(f"{bundle}: no such bundle file")
    except OSError as exc:
        _fail(f"{bundle}: cannot read bundle ({exc.strerror})")
    try:
        rep = _export.verify_bundle(data, pub)
    except _export.ExportVerificationError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "failed": exc.check, "reason": exc.reason}))
        else:
            click.echo(f"FAILED {exc.check}: {exc.reason}")
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(rep.to_json()))
        return
    for c in rep.checks:
        click.echo(f"{c.status:>7}  {c.name:<10} {c.detail}")
    skipped = [c.name for c in rep.checks if c.status == "skipped"]
    click.echo(
        f"ok: run {rep.run!r}, ledger {rep.origin}, checkpoint size {rep.checkpoint_size}"
        + (f" (not checked without evidence: {', '.join(skipped)})" if skipped else "")
    )
