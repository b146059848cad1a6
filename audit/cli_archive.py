"""``gradledger archive``: move a run's verified old step payloads to compressed segment files (``ledger.archive``).

Exit codes: 0 archived (or nothing to archive), 1 refused (the ledger does not verify, or a segment did not
read back identically: nothing changed), 2 usage or unusable input (one line on stderr; nothing changed).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from audit.cli import fail, main, with_ledger
from ledger.archive import DEFAULT_LEVEL, DEFAULT_SEGMENT_BYTES, ArchiveError, ArchiveResult, archive_run
from ledger.errors import LedgerError
from ledger.store import Ledger


@main.command("archive")
@click.argument("ledger")
@click.option("--run", required=True, help="Run name (as given to instrument.attach).")
@click.option(
    "--before-seq",
    type=click.IntRange(min=1),
    required=True,
    help="Archive the run's step entries with seq below this.",
)
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the segment files and manifest (created if missing).",
)
@click.option(
    "--segment-mib",
    type=click.IntRange(min=1),
    default=DEFAULT_SEGMENT_BYTES >> 20,
    show_default=True,
    help="Raw payload MiB per segment file.",
)
@click.option(
    "--level", type=click.IntRange(1, 22), default=DEFAULT_LEVEL, show_default=True, help="zstd level."
)
@click.option(
    "--vacuum",
    is_flag=True,
    help="Return the freed space to the file system (SQLite VACUUM; PostgreSQL VACUUM FULL payloads, "
    "which locks the table while it runs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def archive_cmd(
    ledger: str,
    run: str,
    before_seq: int,
    out_dir: Path,
    segment_mib: int,
    level: int,
    vacuum: bool,
    as_json: bool,
) -> None:
    """Move the payload bytes of RUN's step entries with seq < N to zstd-compressed segment files.

    First verifies the whole ledger (refuses, exit 1, if it fails) and re-checks each archived entry's leaf.
    Writes OUT/<first>-<last>.<sha256>.glseg.zip (zip, one member per payload holding its exact bytes, zstd),
    fsyncs and re-reads them, then in one transaction appends an `archive` entry recording every segment's
    sha256 and empties the archived payload rows. Leaf hashes, roots, proofs and signed checkpoints do not
    change. `gradledger verify` re-hashes archived payloads from the segments (found in --archive DIR or
    this OUT, recorded in the ledger); readers read through them. Entries archived before are skipped.

    \b
    LEDGER is a SQLite file path, a sqlite:/// URL or a postgresql+psycopg:// URL.
    """

    def go(led: Ledger) -> ArchiveResult:
        try:
            return archive_run(
                led, run, before_seq, out_dir, segment_bytes=segment_mib << 20, level=level, vacuum=vacuum
            )
        except ArchiveError as exc:  # refused: exit 1 (other LedgerErrors name their input: exit 2)
            fail(str(exc), 1)
        except OSError as exc:
            fail(f"{exc.filename or out_dir}: {exc.strerror or exc}")

    _report(with_ledger(ledger, go, verbatim=(LedgerError,)), as_json)


def _report(res: ArchiveResult, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(res.to_json()))
        return
    if res.archive_seq is None:
        click.echo(
            f"nothing to archive: run {res.run!r} has no unarchived step entries below seq {res.before_seq}"
        )
        return
    s = res.segments
    click.echo(
        f"archived {res.entries:,} step entries of run {res.run!r} (seq {s[0]['first_seq']}..{s[-1]['last_seq']}): "
        f"{res.payloads:,} payloads, {res.bytes:,} bytes -> {res.compressed_bytes:,} bytes in {len(s)} segment(s)"
    )
    click.echo(f"archive entry seq {res.archive_seq}; manifest {res.manifest}")
    click.echo(f"root of the first {res.size_before} entries unchanged: {res.root}")
    before, after = res.db_bytes_before, res.db_bytes_after
    if res.vacuumed:
        click.echo(f"database {before:,} -> {after:,} bytes (vacuumed)")
    elif res.free_bytes_after is not None:
        click.echo(
            f"database {after:,} bytes, {res.free_bytes_after:,} of them free pages that later appends reuse; "
            "space freed inside partly used pages stays there (--vacuum rewrites the file and returns both)"
        )
    else:
        click.echo(
            f"database tables {after:,} bytes: (auto)vacuum makes the freed space reusable by later appends; "
            "--vacuum runs VACUUM FULL payloads to return it to the file system"
        )
