"""``gradledger report``: one self-contained HTML report of a run for auditors and annotation leads."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from audit import progress
from audit import report as rp
from audit.cli import main
from audit.cli_analytics import _fail, _with_ledger
from ledger.fileio import write_atomic
from ledger.store import Ledger


@main.command("report")
@click.argument("ledger_path", metavar="LEDGER")
@click.option("--run", "run", required=True, help="Run name.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The HTML file to write.",
)
@click.option(
    "--pubkey",
    "pubkey_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Signer's public key: also check stored checkpoint signatures.",
)
@click.option(
    "--top", type=click.IntRange(min=1), default=20, show_default=True, help="Rows in ranked tables."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
def report_cmd(
    ledger_path: str, run: str, output: Path, pubkey_path: Path | None, top: int, as_json: bool
) -> None:
    """Write one self-contained HTML report of run RUN to OUTPUT.

    \b
    Sections: is the record intact (full verify, latest signed checkpoint); what was trained; which labels
    shaped which layers (by label, annotator and consensus band); where the model stays uncertain (depth
    profile heatmap, from the latest `profile` entry); memorisation candidates with their loss and AUM
    baselines; what to send back to annotators (the two queues); who labelled the data (pseudonyms only);
    the routing policy; the privacy budget.

    Plots are embedded PNGs; the file needs no network and no other file. Exit 0 when written and the
    ledger verifies, 1 when written but the ledger FAILS verification (the report says so at the top),
    2 for unusable input (nothing written).
    """
    pubkey = None
    if pubkey_path is not None:
        from ledger import keys
        from ledger.errors import LedgerError

        try:
            pubkey = keys.load_verifier(pubkey_path)
        except LedgerError as exc:
            _fail(str(exc))
        except OSError as exc:
            _fail(f"{pubkey_path}: cannot read ({exc.strerror})")

    def go(led: Ledger) -> rp.Report:
        with progress.stages(8, "report: verifying", show=progress.wanted(as_json)) as bar:
            return rp.build_report(led, run, pubkey=pubkey, top=top, advance=bar.advance)

    rep = _with_ledger(ledger_path, go)
    page = rp.render_html(rep)
    try:
        write_atomic(output, page)
    except OSError as exc:
        _fail(f"{output}: cannot write ({exc.strerror})")
    out: dict[str, Any] = {
        "output": str(output),
        "bytes": len(page.encode("utf-8")),
        "run": rep.run,
        "chain_ok": rep.chain_ok,
        "sections": {s.id: s.status for s in rep.sections},
    }
    if as_json:
        click.echo(json.dumps(out))
    else:
        verdict = "ledger intact" if rep.chain_ok else "LEDGER FAILED VERIFICATION (see the report)"
        click.echo(f"wrote {output} ({out['bytes']:,} bytes): {verdict}")
    sys.exit(0 if rep.chain_ok else 1)
