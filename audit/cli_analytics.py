"""``gradledger memorization | profile | priorities``: feedback for the annotation team from a run's record.

Exit codes: 0 ok; 2 unknown run / layer / checkpoint, unreadable data file, unverifiable weights (one line
on stderr, nothing appended or written).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from audit import progress
from audit import run_analytics as ra
from audit.cli import fail as _fail
from audit.cli import main, with_ledger
from ledger.fileio import write_atomic
from ledger.store import Ledger

T = TypeVar("T")


def _with_ledger(path: str, fn: Callable[[Ledger], T]) -> T:
    """Open LEDGER, run ``fn``; input problems become one line on stderr and exit 2."""
    from audit.profiles_ledger import ProfileInputError

    return with_ledger(path, fn, errors=(ra.AnalyticsError,), verbatim=(ProfileInputError,))


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


# ---- memorization -----------------------------------------------------------------------------------------


@main.command("memorization")
@click.argument("ledger_path", metavar="LEDGER")
@click.option("--run", "run", required=True, help="Run name (as given to instrument.attach).")
@click.option("--layer", "layers", multiple=True, help="Score only this layer (repeatable; default: all).")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, help="Rows to print.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def memorization_cmd(ledger_path: str, run: str, layers: tuple[str, ...], top: int, as_json: bool) -> None:
    """Rank a run's training examples by how hard the model had to work to fit their labels.

    \b
    score      whole-run per-layer self-influence: for each layer, the sum over every step that contained
               the example of lr * routing weight * DP clip factor * ||per-sample gradient||^2, divided by
               the layer's mean, then averaged over layers. 1.0 = an average example.
    class      memorised  (high early energy, low late loss: the label was fit by force),
               unresolved (late loss still >= ln 2: the model never fit the label),
               easy       (the rest)
    trajectory the score's share earned in each epoch (sums to the score)
    baselines  printed beside the score, never hidden: mean training loss and AUM (area under the margin,
               Pleiss et al. 2020; low = suspicious), each with its own rank.

    When the ledger records review decisions (reject / fix) for the run's labels, the AUROC of the score
    and of both baselines against those labels is printed too, so you can judge which signal to trust; this
    command never claims the score beats a baseline.
    """

    def go(led: Ledger) -> dict[str, Any]:
        ctx = ra.open_run(led, run)
        show = progress.wanted(as_json)
        recs = progress.iterate(
            led.steps(run), length=ra.step_count(led, run) if show else None, label="reading steps", show=show
        )
        res = ra.memorization(ctx, list(layers) or None, records=recs)
        return ra.memorization_json(ctx, res, top)

    out = _with_ledger(ledger_path, go)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    s = out["summary"]
    click.echo(
        f"run {out['run']}: {s['examples']} examples, {s['steps']} steps, {s['epochs']} epochs, layers "
        f"{', '.join(out['layers'])}; classes " + ", ".join(f"{k} {v}" for k, v in s["classes"].items())
    )
    click.echo("baselines beside the score: mean training loss (high = suspicious), AUM (low = suspicious)")
    rc = out["review_check"]
    if rc is not None:
        sig = rc["signals"]
        click.echo(
            f"against {rc['positives']} labels later rejected/fixed by review: "
            + ", ".join(f"{k} AUROC {v['auroc']:.3f} P@k {v['precision_at_k']:.3f}" for k, v in sig.items())
        )
    click.echo("rank  example  label_id  annotator  class  score  mean_loss (rank)  AUM (rank)  trajectory")
    for r in out["rows"]:
        traj = " ".join(f"{v:.2f}" for v in r["trajectory"][:12]) + (
            " ..." if len(r["trajectory"]) > 12 else ""
        )
        click.echo(
            f"{r['rank']:>4}  {r['example_id']}  {r['label_id'] or '-'}  {r['annotator'] or '-'}  {r['class']}  "
            f"{r['score']:.3f}  {_fmt(r['mean_loss'])} ({r['loss_rank'] or '-'})  "
            f"{_fmt(r['aum'])} ({r['aum_rank'] or '-'})  [{traj}]"
        )


# ---- profile ----------------------------------------------------------------------------------------------


@main.command("profile")
@click.argument("ledger_path", metavar="LEDGER")
@click.option("--run", "run", required=True, help="Run name.")
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The .npz data file.",
)
@click.option(
    "--model", "factory", default=None, help="Model factory 'module:function' (overrides the file's)."
)
@click.option(
    "--checkpoint", "which", default=None, help="Checkpoint entry seq or tag (default: the run's latest)."
)
@click.option(
    "--states",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="State store directory (default: LEDGER.states).",
)
@click.option(
    "--layer", "layers", multiple=True, help="Probe this layer (repeatable; default: the run's layers)."
)
@click.option(
    "--folds", type=click.IntRange(min=2), default=5, show_default=True, help="Cross-fitting folds."
)
@click.option(
    "--n-boot", type=click.IntRange(min=10), default=1000, show_default=True, help="Bootstrap resamples."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Folds and bootstrap seed.")
@click.option(
    "--evaluate", type=click.Choice(["all", "labelled", "unlabelled"]), default="all", show_default=True,
    help="Which examples the per-domain averages cover.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def profile_cmd(
    ledger_path: str,
    run: str,
    data_path: Path,
    factory: str | None,
    which: str | None,
    states: Path | None,
    layers: tuple[str, ...],
    folds: int,
    n_boot: int,
    seed: int,
    evaluate: str,
    as_json: bool,
) -> None:
    """Entropy depth profile of a run's checkpoint on a data set, recorded as a ``profile`` entry.

    For every layer a linear probe is cross-fitted on the layer's activations; per domain and layer the
    table shows the probe's mean normalised predictive entropy (0 = certain, 1 = uniform) with a bootstrap
    confidence interval and n, and per domain the mean prediction depth (the first layer from which every
    deeper probe agrees with the model's final answer). High late-layer entropy or deep prediction depth
    marks a slice that is ambiguous to the model: it needs clearer guidelines or more data.

    \b
    The data file (.npz, no pickled objects):
      x       model inputs [N, ...]
      y       optional int labels [N], -1 = unlabelled (probes need >= 2 classes with >= FOLDS labels each)
      domain  optional string tags [N] (default "all")
      ids     optional string example ids [N] (default row-<i>)
      model   optional string "module:function" building the run's architecture (or --model)
      state   optional string path of a torch.save'd state dict (default: LEDGER.states/<sha256>.pt)
    The weights must match the checkpoint entry's state_dict_sha256, else exit 2. The entry records the
    data file's sha256, an inputs digest, the checkpoint, the probe settings and the results (per-example
    values as payloads), so the feedback given to annotators is itself provenance.
    """
    from audit.profiles import ProbeSettings
    from audit.profiles_ledger import (
        ProfileInputError,
        compute_profile,
        load_data,
        load_verified_model,
        pick_checkpoint,
        record_profile,
    )
    from instrument.sketch import StateError, StateStore

    settings = ProbeSettings(folds=folds, n_boot=n_boot, seed=seed, evaluate=evaluate)

    def go(led: Ledger) -> dict[str, Any]:
        ctx = ra.open_run(led, run)
        with progress.stages(5, "profile: reading data", show=progress.wanted(as_json)) as bar:
            data = load_data(data_path)
            ref = factory or data.model
            if ref is None:
                raise ProfileInputError(
                    f"{data_path}: no model factory (field 'model' or --model module:function)"
                )
            use_layers = list(layers) or list(ctx.record.layers)
            bar.advance("profile: loading weights")
            ckpt = pick_checkpoint(led, run, which)
            states_dir = states
            if data.state is None and states_dir is None:
                try:
                    states_dir = StateStore.beside(led.location)
                except StateError as exc:
                    raise ProfileInputError(str(exc)) from None
            model = load_verified_model(
                ref, ckpt, ctx.record.layers, state_file=data.state, states_dir=states_dir
            )
            bar.advance("profile: fitting probes")
            result = compute_profile(model, data, use_layers, settings)
            bar.advance("profile: recording")
            seq = record_profile(led, result, data, run, ref, ckpt)
            bar.advance("profile: done", 2)
        body = led.entry(seq).body
        return {"seq": seq, **{k: v for k, v in body.items() if k != "example_ids"}}

    out = _with_ledger(ledger_path, go)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    m = out["model"]
    click.echo(
        f"profile entry {out['seq']}: run {out['run']}, checkpoint {m['checkpoint_seq']} ({m['checkpoint_tag']}), "
        f"data {out['data_file']['name']} ({out['data_file']['examples']} examples, sha256 {out['data_file']['sha256'][:16]}...)"
    )
    click.echo("normalised probe entropy per layer (mean [CI] n); prediction depth per domain")
    click.echo("domain  " + "  ".join(out["layers"]) + "  depth")
    for d in out["domains"]:
        cells = []
        for lay in out["layers"]:
            e = out["entropy"][d][lay]
            cells.append(
                "-" if e["n"] == 0 else f"{e['mean']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}] {e['n']}"
            )
        dep = out["depth"][d]
        click.echo(f"{d}  " + "  ".join(cells) + ("  -" if dep["n"] == 0 else f"  {dep['mean']:.2f}"))
    click.echo(
        "probe accuracy (out of fold): " + ", ".join(f"{k} {v:.3f}" for k, v in out["probe_accuracy"].items())
    )


# ---- priorities -------------------------------------------------------------------------------------------


def queue_path(base: Path, queue: str) -> Path:
    """``tasks.ndjson`` + ``ambiguity`` -> ``tasks.ambiguity.ndjson``: one file per queue, never merged."""
    return base.with_name(f"{base.stem}.{queue}{base.suffix}" if base.suffix else f"{base.name}.{queue}")


@main.command("priorities")
@click.argument("ledger_path", metavar="LEDGER")
@click.option("--run", "run", required=True, help="Run name.")
@click.option("--top", "top_per_domain", type=click.IntRange(min=1), default=100, show_default=True,
              help="Examples listed per domain.")  # fmt: skip
@click.option(
    "--labelbox-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write Labelbox NDJSON task lists: FILE's name + .ambiguity / .label_disagreement.",
)
@click.option(
    "--labelstudio-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write Label Studio JSON task lists: FILE's name + .ambiguity / .label_disagreement.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def priorities_cmd(
    ledger_path: str,
    run: str,
    top_per_domain: int,
    labelbox_out: Path | None,
    labelstudio_out: Path | None,
    as_json: bool,
) -> None:
    """Two annotation work queues for a run, each ranked by domain, never merged into one score.

    \b
    ambiguity           slices the model stays unsure about deep in the network (from the run's latest
                        `profile` entry: late-layer probe entropy, then prediction depth). Fix: clearer
                        guidelines or more data for that slice.
    label disagreement  labelled examples whose training record argues with their label (whole-run
                        self-influence >= 3 x the mean, or AUM < 0), domains ranked by the fraction flagged.
                        Fix: relabel. Domains come from the run's manifest.

    Exports: --labelbox-out FILE writes FILE.ambiguity.<ext> and FILE.label_disagreement.<ext> (NDJSON: one
    data row per line keyed by global_key = example id, with a batch priority 1..5 per domain rank);
    --labelstudio-out likewise (JSON task lists, priority and reason in `data`). Without a profile entry the
    ambiguity queue is reported unavailable and not exported.
    """

    def go(led: Ledger) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
        from audit.priorities import label_studio_tasks, labelbox_ndjson

        ctx = ra.open_run(led, run)
        with progress.activity("priorities: ranking", show=progress.wanted(as_json)):
            pr = ra.priorities(ctx, top_per_domain=top_per_domain)
        out = pr.to_json(ctx)
        files: list[tuple[Path, str]] = []
        queues = [q for q in (pr.ambiguity, pr.disagreement) if q is not None]

        def ls_data(example_id: str) -> dict[str, Any]:
            label = ra.provenance_fields(ctx, example_id)["label_id"]
            return {} if label is None else {"label_id": label}

        for q in queues:
            if labelbox_out is not None:
                files.append((queue_path(labelbox_out, q.name), labelbox_ndjson(q)))
            if labelstudio_out is not None:
                files.append(
                    (
                        queue_path(labelstudio_out, q.name),
                        json.dumps(label_studio_tasks(q, ls_data), indent=1),
                    )
                )
        return out, files

    out, files = _with_ledger(ledger_path, go)
    for path, text in files:
        try:
            write_atomic(path, text)
        except OSError as exc:
            _fail(f"{path}: cannot write ({exc.strerror})")
    out["written"] = [str(p) for p, _ in files]
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(out["note"])
    for key, title in (("ambiguity", "AMBIGUITY queue"), ("label_disagreement", "LABEL DISAGREEMENT queue")):
        q = out["queues"][key]
        if q is None:
            click.echo(f"\n{title}: not available: {out['ambiguity_unavailable']}")
            continue
        click.echo(f"\n{title} ({q['criterion']})")
        for d in q["domains"]:
            extra = (
                f"depth {_fmt(d.get('depth'))}"
                if key == "ambiguity"
                else f"{d['flagged']} flagged, negative-AUM fraction {_fmt(d.get('negative_aum_fraction'))}"
            )
            click.echo(
                f"  {d['rank']}. {d['domain']}  score {d['score']:.3f}  n {d['n']}  {extra}  ({len(d['items'])} listed)"
            )
    for p in out["written"]:
        click.echo(f"wrote {p}")
