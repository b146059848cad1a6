"""``gradledger query layer|label|annotator``: which labels shaped which layers (answers from the aggregates)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from audit import query as q
from audit.cli import fail as _fail
from audit.cli import main, with_ledger
from ledger.store import Ledger


def _with_ledger(path: str, fn: Callable[[Ledger], Any]) -> Any:
    return with_ledger(path, fn, errors=(q.QueryError,))


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}"


@main.group("query")
def query_group() -> None:
    """Ask which labels, annotators, sources or domains shaped which layers of a run.

    \b
    Metrics (per example, layer l, summed over the steps it was in; exact definitions in audit/aggregates.py):
      update          sum of lr_l * w_il * c_i * ||g_il|| / d_i   (w: routing weight, c: DP clip factor,
                      d: the micro-batch size under a mean-reduced loss, 1 under sum)
      self-influence  sum of lr_l * ||g_il||^2   (TracIn self-influence restricted to layer l)
    Non-finite contributions (NaN/Inf norms) are left out and counted as excluded_nonfinite.
    The sums are kept by the query_aggregates indexer in each step's append transaction; on a ledger written
    without it, the first query builds them from the entries (a write, once).
    Every command takes --json. Exit codes: 0 ok, 2 unknown run / layer / label / annotator or bad input.
    """


@query_group.command("layer")
@click.argument("ledger_path", metavar="LEDGER")
@click.option("--run", "run", required=True, help="Run name (as given to instrument.attach).")
@click.option("--layer", "layer_name", required=True, help="Qualified module name of the layer.")
@click.option("--top", type=int, default=20, show_default=True, help="Number of rows.")
@click.option(
    "--by", type=click.Choice(q.BY), default="label", show_default=True, help="Rank labels or groups."
)
@click.option(
    "--metric", type=click.Choice(["update", "self-influence"]), default="update", show_default=True
)
@click.option(
    "--epochs",
    default=None,
    metavar="A:B",
    help="Only epochs A..B (inclusive; 'A' alone = one epoch). Exact, but slower than a whole-run query: "
    "it reads every step in the range, so its time grows with the sample-steps in the range.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def layer_cmd(
    ledger_path: str,
    run: str,
    layer_name: str,
    top: int,
    by: str,
    metric: str,
    epochs: str | None,
    as_json: bool,
) -> None:
    """Top labels (or annotators / sources / domains) by contribution to one layer.

    Each row: label id, example id, annotator pseudonym, consensus score and method, review decision, mean
    routing weight received by the layer, score, and share of the layer's total over the same epochs.
    """
    try:
        ep = q.parse_epochs(epochs)
    except q.QueryError as exc:
        _fail(str(exc))
    if top < 1:
        _fail(f"--top must be at least 1, got {top}")
    res = _with_ledger(
        ledger_path, lambda led: q.layer(led, run, layer_name, top=top, by=by, metric=metric, epochs=ep)
    )
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=2))
        return
    span = "whole run" if res.epochs is None else f"epochs {res.epochs[0]}..{res.epochs[1]}"
    click.echo(
        f"run {res.run} (seq {res.run_seq}), layer {res.layer}, {metric} by {by}, {span}: "
        f"total {_fmt(res.total, 6)} over {res.examples} examples, {res.sample_steps} sample-steps"
        + (f", {res.excluded_nonfinite} non-finite excluded" if res.excluded_nonfinite else "")
    )
    if by == "label":
        click.echo("rank  label_id  example_id  annotator  consensus (method)  review  weight  score  share")
        for r in res.rows:
            cons = "-" if r.consensus is None else f"{r.consensus:.3g} ({r.consensus_method})"
            click.echo(
                f"{r.rank:>4}  {r.label_id or '-'}  {r.example_id}  {r.annotator or '-'}  {cons}  "
                f"{r.review or '-'}  {_fmt(r.weight, 3)}  {_fmt(r.score)}  {r.share:.2%}"
            )
    else:
        click.echo(f"rank  {by}  examples  sample_steps  weight  score  share")
        for r in res.rows:
            click.echo(
                f"{r.rank:>4}  {r.key}  {r.examples}  {r.sample_steps}  {_fmt(r.weight, 3)}  {_fmt(r.score)}  {r.share:.2%}"
            )


@query_group.command("label")
@click.argument("ledger_path", metavar="LEDGER")
@click.argument("label_id")
@click.option("--run", "run", default=None, help="Only this run (default: every run that trained on it).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def label_cmd(ledger_path: str, label_id: str, run: str | None, as_json: bool) -> None:
    """A label's provenance and its per-layer, per-epoch contribution profile and routing.

    LABEL_ID is the source label id in the run's manifest (an example id is accepted too).
    """
    res = _with_ledger(ledger_path, lambda led: q.label(led, label_id, run=run))
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=2))
        return
    for r in res.runs:
        p = r["provenance"] or {}
        click.echo(f"label {label_id} = example {r['example_id']} in run {r['run']} (seq {r['run_seq']})")
        if p:
            click.echo(
                f"  annotator {p.get('annotator') or '-'}  source {p.get('source')}  consensus "
                f"{_fmt(p.get('consensus'), 3)} ({p.get('consensus_method') or '-'})  review {p.get('review') or '-'}"
                f"  gold {p.get('gold')}  reviews {len(p.get('reviews') or [])}  seeded_from {len(p.get('seeded_from') or [])}"
            )
        rules = ", ".join(
            f"{x['name']} (rule {x['rule']}, {x['sample_steps']} steps)" for x in r["routing"]["rules"]
        )
        click.echo(f"  policy entry {r['routing']['policy_seq']}: {rules or '-'}")
        for w in r["routing"]["weights"]:
            click.echo(f"  weights {[round(x, 4) for x in w['weights']]} in {w['sample_steps']} sample-steps")
        click.echo(
            "  layer  "
            + "  ".join(f"epoch {e['epoch']}" for e in r["epochs"])
            + "  total (update / self-influence)"
        )
        for j, name in enumerate(r["layers"]):
            cells = "  ".join(_fmt(e["update"][j]) for e in r["epochs"])
            click.echo(
                f"  {name}  {cells}  {_fmt(r['totals']['update'][j])} / {_fmt(r['totals']['self_influence'][j])}"
            )


@query_group.command("annotator")
@click.argument("ledger_path", metavar="LEDGER")
@click.argument("pseudonym")
@click.option("--run", "run", default=None, help="Only this run.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def annotator_cmd(ledger_path: str, pseudonym: str, run: str | None, as_json: bool) -> None:
    """The layers an annotator's labels shaped, and how much (per-layer totals and shares).

    An example counts for every human annotator among its labels' producers.
    """
    res = _with_ledger(ledger_path, lambda led: q.annotator(led, pseudonym, run=run))
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=2))
        return
    for r in res.runs:
        click.echo(
            f"annotator {pseudonym} in run {r['run']} (seq {r['run_seq']}): {r['examples']} examples, "
            f"{r['sample_steps']} sample-steps"
        )
        click.echo("  layer  update (share)  self-influence (share)  mean weight")
        for lay in r["layers"]:
            click.echo(
                f"  {lay['layer']}  {_fmt(lay['update'])} ({lay['update_share']:.2%})  "
                f"{_fmt(lay['self_influence'])} ({lay['self_influence_share']:.2%})  {_fmt(lay['weight'], 3)}"
            )
