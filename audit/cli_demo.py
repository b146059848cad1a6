"""``gradledger demo [--out DIR]``: the end-to-end walk-through in ``audit.demo`` (what ``make demo`` runs)."""

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
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the demo's files (must not already hold a demo).",
)
@click.option("--quick", is_flag=True, help="A smaller data set and fewer epochs (seconds; for tests).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (progress goes to stderr).")
def demo_cmd(out: Path, quick: bool, as_json: bool) -> None:
    """Run gradledger end to end on simulated annotations of scikit-learn's digits.

    \b
    Writes into OUT: a Labelbox Export v2 NDJSON with simulated annotators (careful ones, a careless one,
    consensus rows, rejecting reviews, gold rows; e-mail identities), the SQLite ledger it is ingested into
    (pseudonymised), keys/ (Ed25519 signing key, public key, pseudonym key), policy.yaml (low consensus:
    shallow layers only; rejected: excluded; gold: all layers), checkpoints/ (signed checkpoint notes after a
    routed CNN run, an unrouted baseline, a DP-SGD run, and final.txt covering everything),
    profile-data.npz (held-out images for the recorded depth profile), report.html, lineage.graphml,
    bundle.json (a signed provenance export with evidence), ledger-tampered.db (a copy with one flipped bit)
    and summary.json. Prints which annotators and labels shaped the last layer, memorisation candidates with
    their baselines, and the checks an auditor runs on bundle.json with the public key only.

    Embedded SQLite, no network. Exit 0 when the ledger and the export verify, the tampered copy is caught
    and no e-mail address reached the ledger; 1 otherwise; 2 when OUT already holds a demo.
    """
    from audit.demo import DemoConfig, run_demo

    config = DemoConfig.quick() if quick else DemoConfig()
    say = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    try:
        summary = run_demo(out, say=say, config=config)
    except (LedgerError, FileExistsError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(summary, default=str))
    good = (
        summary["verify_ok"]
        and summary["bundle_verify_ok"]
        and not summary["tampered_verify_ok"]
        and not summary["emails_in_ledger"]
    )
    sys.exit(0 if good else 1)
