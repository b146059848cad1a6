"""``gradledger demo --out DIR``: the walk-through in ``audit.demo``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from audit.cli import main
from ledger.errors import LedgerError


@main.command("demo")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the demo's files.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def demo_cmd(out: Path, as_json: bool) -> None:
    """Walk through gradledger on real data: init, append, sign, verify, tamper, verify again.

    Creates OUT/ledger.db, a signing key in OUT/keys/, a signed checkpoint OUT/checkpoint.txt, and
    OUT/ledger-tampered.db (a copy with one flipped bit), and shows that the edit is caught with the seq
    of the entry it touched. Exits 0 when the original verifies and the tampered copy is caught.
    """
    from audit.demo import run_demo

    try:
        summary = run_demo(out, say=(lambda m: click.echo(m, err=True)) if as_json else click.echo)
    except (LedgerError, FileExistsError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(summary))
    sys.exit(0 if summary["verify_ok"] and not summary["tampered_verify_ok"] else 1)
