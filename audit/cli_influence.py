"""``gradledger influence``: which training labels, from which annotators, shaped a model's predictions."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from audit.cli import fail as _fail
from audit.cli import main


def resolve_ref(ref: str, what: str, source: str) -> Any:
    """Import ``module:attr`` (the current directory is searched first, like ``python -m``)."""
    mod_name, sep, attr = ref.partition(":")
    if not sep or not mod_name or not attr:
        _fail(f"{source}: field {what!r} = {ref!r}: expected 'module:function'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        _fail(f"{source}: field {what!r} = {ref!r}: cannot import it ({exc})")
    if not callable(obj):
        _fail(f"{source}: field {what!r} = {ref!r} is not callable")
    return obj


def load_query_file(path: str) -> tuple[Any, Any, Any, Any]:
    """``(x, y, model_fn, loss_fn or None)`` from a query ``.npz`` (see the command help)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        _fail(f"{path}: no such file")
    except (OSError, ValueError) as exc:
        _fail(f"{path}: not a readable .npz file ({exc})")
    for key in ("x", "y", "model"):
        if key not in arrays:
            _fail(f"{path}: missing array {key!r} (have: {', '.join(sorted(arrays)) or 'none'})")
    x, y = arrays["x"], arrays["y"]
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        _fail(f"{path}: field 'x' has shape {x.shape} and 'y' {y.shape}; need x [Q, ...] and y [Q]")
    if y.dtype.kind not in "iu" and y.dtype.kind != "f":
        _fail(f"{path}: field 'y' has dtype {y.dtype}; need integer class ids (or float targets)")
    refs = {}
    for key in ("model", "loss"):
        if key in arrays:
            arr = arrays[key]
            if arr.dtype.kind != "U" or arr.size != 1:
                _fail(
                    f"{path}: field {key!r} must be one string 'module:function', got {arr.dtype} {arr.shape}"
                )
            refs[key] = resolve_ref(str(arr.reshape(())), key, path)
    return x, y, refs["model"], refs.get("loss")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


@main.command("influence")
@click.argument("ledger_path", metavar="LEDGER")
@click.option("--run", "run", required=True, help="Run name (as given to instrument.attach).")
@click.option(
    "--layer",
    "layers",
    multiple=True,
    help="Sketched layer to score through (repeatable; default: every one).",
)
@click.option(
    "--input", "input_path", required=True, metavar="FILE", help="Query .npz: x, y, model (see above)."
)
@click.option(
    "--checkpoints",
    default="all",
    show_default=True,
    metavar="all|last|SEQ,TAG,...",
    help="Checkpoint windows to sum over.",
)
@click.option("--top", type=int, default=10, show_default=True, help="Proponents per query.")
@click.option("--combine", is_flag=True, help="Rank by influence on all queries together (sum of scores).")
@click.option(
    "--states",
    default=None,
    metavar="DIR",
    help="Model state directory (default: LEDGER.states beside the file).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def influence_cmd(
    ledger_path: str,
    run: str,
    layers: tuple[str, ...],
    input_path: str,
    checkpoints: str,
    top: int,
    combine: bool,
    states: str | None,
    as_json: bool,
) -> None:
    """Which training labels (and annotators) shaped the model's prediction on each query input.

    TracIn-CP over the gradient sketches recorded in the run's step entries: for each training example,
    the sum over checkpoint windows and layers of lr x routing weight x clip factor x <training sketch,
    query sketch at that checkpoint>. Positive = proponent. Exact for layers recorded as rank-1 factors,
    an unbiased estimate for Kronecker sketches. Details: docs/influence.md.

    \b
    FILE is a NumPy .npz with
      x      the query inputs, [Q, ...] (what the model takes)
      y      the targets, [Q] (usually the predicted class you ask about)
      model  one string 'module:function': a factory returning the trained architecture
             (no weights needed: they are loaded per checkpoint from the state directory and
             verified against the checkpoint entry's digests); the current directory is searched
      loss   optional 'module:function' (output, target) -> per-sample losses (default cross-entropy)
    e.g. np.savez("q.npz", x=x, y=y, model="mypkg.models:make_mlp")

    Exit codes: 0 ok; 1 a state file does not match its signed checkpoint entry; 2 bad input (unknown run
    or layer, no sketches, missing state file, unreadable FILE).
    """
    from audit.influence import InfluenceError, influence
    from instrument.sketch import SketchError, StateError, StateMismatch
    from ledger.errors import LedgerError
    from ledger.store import Ledger

    if top < 1:
        _fail(f"--top must be >= 1, got {top}")
    x, y, model_fn, loss_fn = load_query_file(input_path)
    picks: str | list[str] = checkpoints
    if checkpoints not in ("all", "last"):
        picks = [c.strip() for c in checkpoints.split(",") if c.strip()]
        if not picks:
            _fail(
                f"--checkpoints {checkpoints!r}: expected all, last or a comma-separated list of seqs / tags"
            )
    chosen = (
        [int(c) if isinstance(c, str) and c.isdigit() else c for c in picks]
        if isinstance(picks, list)
        else picks
    )
    try:
        led = Ledger.open(ledger_path)
    except LedgerError as exc:
        _fail(str(exc))
    try:
        res = influence(
            led, run, model_fn, x, y, layers=list(layers) or None, top=top, checkpoints=chosen,
            loss_fn=loss_fn, states=states, combine=combine,
        )  # fmt: skip
    except StateMismatch as exc:
        _fail(f"{ledger_path}: verification failed: {exc}", code=1)
    except (InfluenceError, StateError, SketchError, LedgerError) as exc:
        _fail(f"{ledger_path}: {exc}")
    except RuntimeError as exc:  # model_fn architecture does not fit the recorded state dict
        _fail(f"{input_path}: the model factory does not fit run {run!r}: {str(exc).splitlines()[0]}")
    finally:
        led.close()
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=2, sort_keys=True))
        return
    _print_text(res, Path(input_path).name)


def _print_text(res: Any, source: str) -> None:
    cps = ", ".join(f"{c['tag']}@{c['seq']}" for c in res.checkpoints)
    methods = ", ".join(f"{k} ({v})" for k, v in res.methods.items())
    click.echo(f"run {res.run}: layers {methods}; checkpoints {cps}")
    click.echo(
        f"scored {res.sample_steps} sample-steps of {res.examples} examples in {res.steps} steps"
        + (
            f"; {res.uncovered_steps} steps after the last checkpoint not scored"
            if res.uncovered_steps
            else ""
        )
    )
    queries = [0] if res.combined else list(range(res.queries))
    for q in queries:
        title = (
            f"all {res.queries} queries of {source} together" if res.combined else f"query {q} of {source}"
        )
        click.echo(f"\n{title}: top proponents")
        click.echo(
            f"{'rank':>4}  {'score':>10}  {'example':<16} {'label':<16} {'annotator':<24} {'cons':>5}  review"
        )
        for r in res.for_query(q):
            click.echo(
                f"{r.rank:>4}  {r.score:>10.4g}  {r.example_id:<16} {r.label_id or '-':<16} "
                f"{r.annotator or '-':<24} {_fmt(r.consensus):>5}  {r.review or '-'}"
            )
