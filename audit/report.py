"""One self-contained HTML report of a run, for a reader who has never used the command line.

Everything is computed from the ledger at the time of writing: the integrity check (a full ``verify``), the
``run`` entry, the query aggregates (:mod:`audit.query`), the run's latest ``profile`` entry, the
memorisation ranking with its baselines, the annotation-priority queues, the routing policy entry and the
DP accounting recorded in the step entries. Nothing is fetched from the network: the page has no external
CSS, scripts, fonts or images; plots are PNGs drawn with matplotlib's Agg canvas (no pyplot, so no global
backend is switched) and embedded as base64 ``data:`` URIs.

Safety of the page: every string that came from the ledger goes through :func:`text` (HTML-escaped, and
anything shaped like an e-mail address is removed, as a second line of defence behind ingest's
pseudonymisation). Annotators appear only as their pseudonyms.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from audit import run_analytics as ra

EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+")
CONSENSUS_BANDS = (
    (0.0, 0.5, "low (< 0.5)"),
    (0.5, 0.8, "medium (0.5 to 0.8)"),
    (0.8, 1.0000001, "high (>= 0.8)"),
)
NO_CONSENSUS = "no consensus score"
SECTION_IDS = (
    "integrity",
    "run",
    "influence",
    "profile",
    "memorization",
    "priorities",
    "annotators",
    "routing",
    "privacy",
)


def text(value: Any) -> str:
    """HTML-escaped text with e-mail-shaped substrings removed."""
    return html.escape(EMAIL.sub("[e-mail removed]", "" if value is None else str(value)))


def num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "&ndash;"
    if isinstance(x, int | np.integer):
        return f"{int(x):,}"
    return f"{float(x):.{digits}g}"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """An HTML table; ``rows`` cells must already be safe HTML (use :func:`text` / :func:`num`)."""
    head = "".join(f"<th>{text(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def png(fig: Any) -> str:
    """A matplotlib Figure as an embedded <img> (base64 PNG, no metadata)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight", metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _figure(w: float = 7.0, h: float = 3.2) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h))


@dataclass
class Section:
    id: str
    title: str
    meaning: str  # one plain-language line: what this section tells the reader
    body: str  # safe HTML
    status: str = "ok"  # ok | warn | fail | absent


@dataclass
class Report:
    run: str
    origin: str
    ledger_size: int
    generated: str
    chain_ok: bool
    sections: list[Section] = field(default_factory=list)

    def section(self, sid: str) -> Section:
        return next(s for s in self.sections if s.id == sid)


# ------------------------------------------------------------------------------------------------ step tap
@dataclass
class _StepStats:
    steps: int = 0
    epochs: set[int] = field(default_factory=set)
    rule_counts: Counter[int] = field(default_factory=Counter)
    eps: list[tuple[int, float]] = field(default_factory=list)  # (step, eps)
    flagged_steps: int = 0


def _tap(records: Iterable[Any], stats: _StepStats) -> Iterator[Any]:
    """Pass step records through unchanged while counting what the routing and privacy sections need, so
    the run's steps are read once."""
    for r in records:
        stats.steps += 1
        stats.epochs.add(int(r.epoch))
        if r.rule_ids is not None:
            stats.rule_counts.update(int(v) for v in np.asarray(r.rule_ids))
        if r.eps is not None:
            stats.eps.append((int(r.step), float(r.eps)))
        if r.flags:
            stats.flagged_steps += 1
        yield r


# ------------------------------------------------------------------------------------------------ sections
def _integrity(ledger: Any, pubkey: Any) -> tuple[Section, bool]:
    from ledger import note

    res = ledger.verify(pubkey=pubkey)
    rows = [
        (
            "Result",
            "<b>intact</b>"
            if res.ok
            else f'<b class="bad">FAILED</b> at seq {num(res.first_bad_seq)}: {text(res.reason)}',
        ),
        ("Entries checked", num(res.entries_checked)),
        ("Payloads re-hashed", num(res.payloads_checked)),
        ("Bytes re-hashed", num(res.bytes_hashed)),
        ("Merkle subtree hashes checked", num(res.tree_nodes_checked)),
        (
            "Tree size / root hash",
            f"{num(res.size)} / <code>{text(res.root.hex() if res.root else '')}</code>",
        ),
        ("Ledger origin", f"<code>{text(ledger.origin)}</code>"),
    ]
    body = table(["Check", "Outcome"], rows, "kv")
    cps = ledger.checkpoints()
    if cps:
        last = cps[-1]
        try:
            signers = ", ".join(sorted({s.name for s in note.parse_note(last.note).signatures})) or "none"
        except Exception as exc:  # a stored note that does not parse is itself a finding
            signers = f"unparseable note ({exc})"
        sig = (
            "signature checked against the given public key"
            if pubkey is not None
            else "signature not checked here (no public key was given to the report)"
        )
        body += "<h3>Latest signed checkpoint</h3>" + table(
            ["Field", "Value"],
            [
                ("Signed at", text(last.signed_at)),
                ("Tree size", num(last.size)),
                ("Root hash", f"<code>{text(last.root.hex())}</code>"),
                ("Signed by (key name)", text(signers)),
                ("Signature", text(sig)),
                ("Consistent with the current log", "yes" if res.ok else "see the failure above"),
                ("Signed checkpoints stored", num(len(cps))),
                (
                    "Entries added since",
                    num(max(0, (res.size or 0) - last.size)) + " (not yet covered by a signature)",
                ),
            ],
            "kv",
        )
        status = "ok" if res.ok else "fail"
    else:
        body += (
            '<p class="warn">No signed checkpoint is stored: the log is internally consistent, but nothing held '
            "outside the database vouches for it yet. Sign one with <code>gradledger checkpoint</code> and keep "
            "a copy elsewhere.</p>"
        )
        status = "warn" if res.ok else "fail"
    meaning = (
        "Every stored byte was re-hashed and the hash chain and Merkle tree recomputed; a signed checkpoint "
        "kept outside the database is what proves the log was not rewritten since it was signed."
    )
    return Section("integrity", "Is the record intact?", meaning, body, status), bool(res.ok)


def _run_summary(ctx: ra.RunContext, stats: _StepStats, examples: int) -> Section:
    from ledger.records import checkpoints

    rec = ctx.record
    b = rec.body
    arch = rec.architecture
    opt = rec.optimizer
    hyper = opt.get("param_groups", [{}])[0].get("hyper", {}) if opt.get("param_groups") else {}
    rows = [
        ("Run name", text(ctx.run)),
        ("Run entry", f"seq {num(rec.seq)}"),
        ("Model", text(arch.get("root"))),
        ("Trainable parameters", num(arch.get("trainable_parameters"))),
        (
            "Optimiser",
            text(opt.get("class"))
            + " "
            + text(
                ", ".join(f"{k}={v}" for k, v in hyper.items() if k in ("lr", "momentum", "weight_decay"))
            ),
        ),
        ("Loss", f"{text(rec.criterion)} (reduction {text(rec.loss_reduction)})"),
        ("Seed", num(rec.seed)),
        ("Recorded optimiser steps", num(stats.steps)),
        ("Epochs", num(len(stats.epochs))),
        ("Training examples seen", num(examples)),
        (
            "Dataset manifest",
            "none (examples are not linked to labels)"
            if rec.manifest_seq is None
            else f"{text(b.get('manifest_name'))} (seq {num(rec.manifest_seq)}, digest <code>{text(rec.manifest_digest)}</code>)",
        ),
        (
            "Routing policy",
            "none"
            if rec.policy_seq is None
            else f"seq {num(rec.policy_seq)}, digest <code>{text(rec.policy_digest)}</code>",
        ),
        ("Differential privacy", "off" if not rec.dp else "on (see the privacy budget section)"),
        ("Software", text(", ".join(f"{k} {v}" for k, v in sorted(rec.versions.items())))),
    ]
    if stats.flagged_steps:
        rows.append(("Steps with NaN loss or non-finite gradient norms", num(stats.flagged_steps)))
    body = table(["Field", "Value"], rows, "kv")
    layer_rows = [
        (
            text(layer.get("name")),
            text(layer.get("type")),
            text(", ".join(f"{k} {v}" for k, v in layer.get("params", {}).items())),
        )
        for layer in arch.get("layers", [])
    ]
    body += "<h3>Layers (each one is tracked separately)</h3>" + table(
        ["Layer", "Type", "Parameters (shape)"], layer_rows
    )
    cps = checkpoints(ctx.ledger, ctx.run)
    if cps:
        body += "<h3>Model checkpoints (weights fingerprinted in the log)</h3>" + table(
            ["Entry", "Tag", "After step", "Weights fingerprint (sha256)"],
            [
                (
                    num(c.seq),
                    text(c.tag),
                    num(c.step),
                    f"<code>{text(c.state_dict_sha256[:32])}&hellip;</code>",
                )
                for c in cps
            ],
        )
    meaning = (
        "What was trained, on which labelled data, with which settings, as recorded when training started."
    )
    return Section("run", "What was trained", meaning, body)


def _band(consensus: float | None) -> str:
    if consensus is None:
        return NO_CONSENSUS
    for lo, hi, name in CONSENSUS_BANDS:
        if lo <= consensus < hi:
            return name
    return NO_CONSENSUS


def _influence(ctx: ra.RunContext, examples: int, top: int) -> Section:
    meaning = (
        "How much each label moved each layer of the model (sum of learning rate x routing weight x the "
        "example's gradient size over training), grouped by annotator and by how much annotators agreed."
    )
    title = "Which labels shaped which layers"
    try:
        from audit import query as q
    except ImportError:
        return Section(
            "influence", title, meaning, "<p>Not available: the query module is not installed.</p>", "absent"
        )
    layers = list(ctx.record.layers)
    band_names = [b[2] for b in CONSENSUS_BANDS] + [NO_CONSENSUS]
    band_share = np.zeros((len(layers), len(band_names)))
    annot_share: dict[str, np.ndarray] = {}
    parts = []
    try:
        for j, layer in enumerate(layers):
            res = q.layer(ctx.ledger, ctx.run, layer, top=max(1, examples), by="label", metric="update")
            for r in res.rows:
                band_share[j, band_names.index(_band(r.consensus))] += r.share
            rows = [
                (num(r.rank), text(r.label_id or "-"), text(r.example_id), text(r.annotator or "-"),
                 num(r.consensus), text(r.review or "-"), num(r.weight), f"{r.share:.1%}")
                for r in res.rows[:top]
            ]  # fmt: skip
            parts.append(
                f"<h3>Layer {text(layer)}: top {min(top, len(res.rows))} labels</h3>"
                + table(
                    [
                        "Rank",
                        "Label",
                        "Example",
                        "Annotator",
                        "Consensus",
                        "Review",
                        "Mean routing weight",
                        "Share of layer",
                    ],
                    rows,
                )
            )
            if ctx.manifest is not None:
                by_ann = q.layer(
                    ctx.ledger, ctx.run, layer, top=max(1, examples), by="annotator", metric="update"
                )
                for r in by_ann.rows:
                    annot_share.setdefault(str(r.key), np.zeros(len(layers)))[j] = r.share
    except q.QueryError as exc:
        return Section("influence", title, meaning, f"<p>Not available: {text(exc)}</p>", "absent")
    fig = _figure(7, 0.5 + 0.45 * len(layers) + 1.2)
    ax = fig.add_subplot(1, 1, 1)
    left = np.zeros(len(layers))
    colors = ["#d95f02", "#7570b3", "#1b9e77", "#bbbbbb"]
    for k, name in enumerate(band_names):
        ax.barh(layers, band_share[:, k], left=left, label=name, color=colors[k])
        left += band_share[:, k]
    ax.set_xlabel("share of the layer's total update")
    ax.set_ylabel("layer")
    ax.invert_yaxis()
    ax.legend(title="annotator consensus", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    body = "<h3>By consensus band</h3>" + png(fig)
    body += table(
        ["Layer", *band_names],
        [
            (text(layer), *[f"{band_share[j, k]:.1%}" for k in range(len(band_names))])
            for j, layer in enumerate(layers)
        ],
    )
    if annot_share:
        names = sorted(annot_share, key=lambda a: -annot_share[a].sum())
        body += "<h3>By annotator (pseudonym)</h3>" + table(
            ["Annotator", *[f"Layer {text(lay)}" for lay in layers]],
            [(text(a), *[f"{annot_share[a][j]:.1%}" for j in range(len(layers))]) for a in names],
        )
        body += "<p class='note'>An example labelled by several annotators counts for each of them.</p>"
    body += "".join(parts)
    return Section("influence", title, meaning, body)


def _profile(ctx: ra.RunContext) -> Section:
    from audit.profiles_ledger import load_profile

    title = "Where the model stays uncertain (depth profile)"
    meaning = (
        "For each data slice (domain) and layer, how unsure a simple read-out of that layer is (0 = certain, "
        "1 = no idea); slices that stay unsure in the last layers need clearer guidelines or more data."
    )
    try:
        stored = load_profile(ctx.ledger, ctx.run)
    except ValueError as exc:
        return Section("profile", title, meaning, f"<p>Not available: {text(exc)}.</p>", "absent")
    if stored is None:
        return Section(
            "profile",
            title,
            meaning,
            "<p>No depth profile has been recorded for this run (<code>gradledger profile</code> records one).</p>",
            "absent",
        )
    b = stored.body
    layers, domains = list(b["layers"]), list(b["domains"])
    mat = np.array(
        [
            [np.nan if b["entropy"][d][lay]["n"] == 0 else b["entropy"][d][lay]["mean"] for lay in layers]
            for d in domains
        ]
    )
    fig = _figure(1.6 + 0.9 * len(layers), 0.9 + 0.45 * len(domains))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(mat, vmin=0.0, vmax=1.0, cmap="magma_r", aspect="auto")
    ax.set_xticks(range(len(layers)), [str(x) for x in layers])
    ax.set_yticks(range(len(domains)), [EMAIL.sub("[e-mail removed]", d) for d in domains])
    ax.set_xlabel("layer (shallow to deep)")
    for i in range(len(domains)):
        for j in range(len(layers)):
            if np.isfinite(mat[i, j]):
                ax.text(
                    j,
                    i,
                    f"{mat[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if mat[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, label="normalised probe entropy")
    m = b["model"]
    rows = []
    for d in domains:
        dep = b["depth"][d]
        late = b["entropy"][d][layers[-1]]
        rows.append(
            (text(d), num(late["n"]), num(late["mean"]),
             "&ndash;" if late["n"] == 0 else f"{num(late['ci'][0])} to {num(late['ci'][1])}",
             num(dep["mean"]))
        )  # fmt: skip
    body = (
        f"<p>Profile entry seq {num(stored.seq)}: checkpoint {num(m['checkpoint_seq'])} ({text(m['checkpoint_tag'])}), "
        f"data file {text(b['data_file']['name'])} ({num(b['data_file']['examples'])} examples, sha256 "
        f"<code>{text(b['data_file']['sha256'][:32])}&hellip;</code>), {num(b['settings']['folds'])}-fold cross-fitted "
        f"linear probes, {int(b['settings']['ci'] * 100)}% bootstrap intervals.</p>"
        + png(fig)
        + table(
            [
                "Domain",
                "n",
                f"Entropy at layer {text(layers[-1])}",
                "Interval",
                "Mean prediction depth (layers)",
            ],
            rows,
        )
    )
    return Section("profile", title, meaning, body)


def _memorization(ctx: ra.RunContext, res: Any, top: int) -> Section:
    title = "Labels the model had to force (memorisation candidates)"
    meaning = (
        "Examples that needed unusually large updates to fit their label are often mislabelled; the two "
        "standard warning signs (high training loss, low margin) are shown beside the score, not replaced by it."
    )
    out = ra.memorization_json(ctx, res, top)
    s = out["summary"]
    rows = [
        (num(r["rank"]), text(r["example_id"]), text(r["label_id"] or "-"), text(r["annotator"] or "-"),
         text(r["domain"] or "-"), text(r["class"]), num(r["score"]), f"{num(r['mean_loss'])} ({num(r['loss_rank'])})",
         f"{num(r['aum'])} ({num(r['aum_rank'])})", text(r["review"] or "-"))
        for r in out["rows"]
    ]  # fmt: skip
    body = (
        f"<p>{num(s['examples'])} examples over {num(s['epochs'])} epochs. Classes: "
        + ", ".join(f"{text(k)} {num(v)}" for k, v in s["classes"].items())
        + ". <i>memorised</i>: large early updates, then fitted; <i>unresolved</i>: still not fitted at the end; "
        "<i>easy</i>: the rest.</p>"
        + table(
            [
                "Rank",
                "Example",
                "Label",
                "Annotator",
                "Domain",
                "Class",
                "Score (1 = average)",
                "Mean loss (rank)",
                "Margin AUM (rank)",
                "Review",
            ],
            rows,
        )  # fmt: skip
    )
    rc = out["review_check"]
    if rc is not None:
        body += (
            f"<h3>Check against reviewers' decisions</h3><p>{num(rc['positives'])} of these labels were later "
            "rejected or corrected by a reviewer. How well each signal ranks them (AUROC: 0.5 = chance, "
            "1 = perfect; precision = fraction of reviewed labels among as many top-ranked examples):</p>"
            + table(
                ["Signal", "AUROC", "Precision"],
                [(text(k), num(v["auroc"]), num(v["precision_at_k"])) for k, v in rc["signals"].items()],
            )
        )
        best = max(rc["signals"], key=lambda k: rc["signals"][k]["auroc"])
        body += f"<p class='note'>On these labels the strongest signal is <b>{text(best)}</b>.</p>"
    else:
        body += "<p class='note'>The ledger holds no reviewer rejections or corrections for this run's labels, so no signal can be checked against them here.</p>"
    fig = _figure(7, 3)
    ax = fig.add_subplot(1, 1, 1)
    for r in out["rows"][:5]:
        ax.plot(out["epochs"], r["trajectory"], marker="o", label=EMAIL.sub("", r["example_id"]))
    ax.set_xlabel("epoch")
    ax.set_ylabel("score earned in the epoch")
    ax.legend(fontsize=8)
    body += "<h3>When the top five earned their score</h3>" + png(fig)
    return Section("memorization", title, meaning, body)


def _priorities(ctx: ra.RunContext, res: Any) -> Section:
    title = "What to send back to annotators"
    meaning = (
        "Two separate work lists, never merged: ambiguous slices (fix the guidelines or add data) and labels "
        "the training record disagrees with (relabel)."
    )
    pr = ra.priorities(ctx, result=res, top_per_domain=5)
    d = pr.disagreement.to_dict()
    body = f"<h3>Label disagreement (relabel)</h3><p>{text(d['criterion'])}</p>" + table(
        ["Rank", "Domain", "Examples", "Flagged", "Fraction flagged", "Negative-margin fraction"],
        [(num(e["rank"]), text(e["domain"]), num(e["n"]), num(e["flagged"]), f"{e['score']:.1%}",
          "&ndash;" if e["negative_aum_fraction"] is None else f"{e['negative_aum_fraction']:.1%}")
         for e in d["domains"]],
    )  # fmt: skip
    if pr.ambiguity is None:
        body += f"<h3>Ambiguity (guidelines / more data)</h3><p>Not available: {text(pr.ambiguity_unavailable)}.</p>"
    else:
        a = pr.ambiguity.to_dict()
        body += (
            f"<h3>Ambiguity (guidelines / more data)</h3><p>{text(a['criterion'])} (profile entry {num(pr.profile_seq)})</p>"
            + table(
                ["Rank", "Domain", "Examples", "Late-layer entropy", "Mean prediction depth"],
                [
                    (num(e["rank"]), text(e["domain"]), num(e["n"]), num(e["score"]), num(e["depth"]))
                    for e in a["domains"]
                ],
            )
        )
    return Section("priorities", title, meaning, body)


def _annotators(ctx: ra.RunContext, res: Any, top: int) -> Section:
    title = "Who labelled the data"
    meaning = "Each annotator (by pseudonym, never by name or e-mail): how many labels, how much they agreed with others, what reviewers decided, and how many of their labels the training record flags."
    if ctx.manifest is None:
        return Section(
            "annotators",
            title,
            meaning,
            "<p>Not available: the run was trained without a dataset manifest, so examples are not linked to annotators.</p>",
            "absent",
        )
    top_ids = {r.example_id for r in res.rows[:top]}
    scores = dict(zip(res.example_ids, res.arrays["self_influence"], strict=True))
    aum = res.arrays.get("aum")
    neg = dict(
        zip(
            res.example_ids,
            (aum > 0) if aum is not None else np.zeros(len(res.example_ids), bool),
            strict=True,
        )
    )
    stats: dict[str, dict[str, Any]] = {}
    for ex in res.example_ids:
        p = ctx.provenance(ex)
        names = (
            ["(model or program)"]
            if p is None
            else [a for a in (p.annotators or (p.annotator,)) if a] or ["(model or program)"]
        )
        for a in dict.fromkeys(names):
            s = stats.setdefault(
                a, {"n": 0, "cons": [], "reject": 0, "fix": 0, "approve": 0, "top": 0, "neg": 0, "score": []}
            )
            s["n"] += 1
            if p is not None and p.consensus is not None:
                s["cons"].append(p.consensus)
            if p is not None and p.review in ("reject", "fix", "approve"):
                s[p.review] += 1
            s["top"] += ex in top_ids
            s["neg"] += bool(neg[ex])
            s["score"].append(scores[ex])
    rows = [
        (text(a), num(s["n"]), num(float(np.mean(s["cons"])) if s["cons"] else None), num(s["approve"]),
         num(s["reject"]), num(s["fix"]), num(float(np.mean(s["score"]))), num(s["top"]), num(s["neg"]))
        for a, s in sorted(stats.items(), key=lambda kv: -kv[1]["n"])
    ]  # fmt: skip
    body = table(
        ["Annotator (pseudonym)", "Labels in this run", "Mean consensus", "Approved", "Rejected", "Corrected",
         "Mean score (1 = average)", f"In the top {top} memorisation candidates", "Negative margin (AUM < 0)"],
        rows,
    )  # fmt: skip
    return Section("annotators", title, meaning, body)


def _routing(ctx: ra.RunContext, stats: _StepStats) -> Section:
    title = "Which rules routed which labels"
    meaning = (
        "A routing policy lets some labels train only some layers (for example, low-agreement labels reach "
        "the shallow layers but only weakly the final layer); its digest pins exactly which rules were applied."
    )
    if ctx.record.policy_seq is None:
        return Section(
            "routing",
            title,
            meaning,
            "<p>No routing policy: every label trained every layer with full weight.</p>",
        )
    entry = ctx.ledger.entry(int(ctx.record.policy_seq))
    pol = entry.body.get("policy", {})
    rules = pol.get("rules", [])
    total = sum(stats.rule_counts.values())

    def share(k: int) -> str:
        return (
            "&ndash;"
            if not total
            else f"{num(stats.rule_counts.get(k, 0))} ({stats.rule_counts.get(k, 0) / total:.1%})"
        )

    rows = [
        (num(i), text(r.get("name")), f"<code>{text(json.dumps(r.get('when'), sort_keys=True))}</code>",
         f"<code>{text(json.dumps(r.get('weights'), sort_keys=True))}</code>", share(i))
        for i, r in enumerate(rules)
    ]  # fmt: skip
    rows.append(
        (
            "default",
            "(no rule matched)",
            "&ndash;",
            f"<code>{text(json.dumps(pol.get('default'), sort_keys=True))}</code>",
            share(-1),
        )
    )
    body = (
        f"<p>Policy <b>{text(entry.body.get('name'))}</b>, entry seq {num(entry.seq)}, digest <code>{text(entry.body.get('digest'))}</code>. "
        "Rules are tried in order; the first that matches a label's provenance sets its per-layer weights.</p>"
        + table(["#", "Rule", "When (label provenance)", "Layer weights", "Example-steps routed"], rows)
    )
    groups = pol.get("groups")
    if groups:
        body += (
            "<p>Layer groups: "
            + "; ".join(f"{text(k)} = {text(', '.join(map(str, v)))}" for k, v in groups.items())
            + "</p>"
        )
    return Section("routing", title, meaning, body)


def _privacy(ctx: ra.RunContext, stats: _StepStats) -> Section:
    title = "Privacy budget (differential privacy)"
    meaning = (
        "Differential privacy bounds how much any one training example can influence the model; epsilon "
        "(smaller = stronger) is the budget spent so far, at the stated delta."
    )
    dp = ctx.record.dp
    if not dp:
        return Section(
            "privacy",
            title,
            meaning,
            "<p>Differential privacy was <b>not</b> enabled for this run: no privacy guarantee is claimed.</p>",
        )
    unset = {"sample_rate": "not set: derived at the first step as batch size / examples in the manifest"}
    rows = [
        (text(k), text(v) if v is not None else text(unset.get(k, "not set")))
        for k, v in sorted(dp.items())
        if k != "noise_seed"
    ]
    body = table(["Setting", "Value"], rows, "kv")
    if stats.eps:
        steps = [s for s, _ in stats.eps]
        eps = [e for _, e in stats.eps]
        body += f"<p>Spent after the last recorded step ({num(steps[-1])}): <b>epsilon = {num(eps[-1], 4)}</b> at delta = {num(dp.get('delta'))}.</p>"
        fig = _figure(7, 2.8)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(steps, eps)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("epsilon spent")
        body += png(fig)
    else:
        body += "<p class='warn'>DP was configured but no step records an epsilon.</p>"
    return Section("privacy", title, meaning, body)


# ------------------------------------------------------------------------------------------------ assembly
def build_report(
    ledger: Any,
    run: str,
    *,
    pubkey: Any = None,
    top: int = 20,
    advance: Callable[[str], None] | None = None,
) -> Report:
    """Compute every section. ``advance(label)`` is called after each (progress display)."""
    step = advance or (lambda label: None)
    ctx = ra.open_run(ledger, run)
    integrity, ok = _integrity(ledger, pubkey)
    step("report: reading steps")
    stats = _StepStats()
    res = ra.memorization(ctx, records=_tap(ledger.steps(run), stats))
    step("report: run summary")
    sections = [integrity, _run_summary(ctx, stats, len(res.example_ids))]
    step("report: influence")
    sections.append(_influence(ctx, len(res.example_ids), min(top, 10)))
    step("report: depth profile")
    sections.append(_profile(ctx))
    step("report: memorisation")
    sections.append(_memorization(ctx, res, top))
    step("report: priorities")
    sections.append(_priorities(ctx, res))
    sections.append(_annotators(ctx, res, top))
    sections.append(_routing(ctx, stats))
    sections.append(_privacy(ctx, stats))
    step("report: writing")
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return Report(run, ledger.origin, ledger.size, now, ok, sections)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:72rem;margin:2rem auto;
padding:0 1rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
h3{font-size:1.05rem;margin-top:1.4rem}.meaning{background:#f3f6fa;border-left:4px solid #5b7fa6;padding:.5rem .8rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}th,td{border:1px solid #d5d5d5;padding:.25rem .5rem;
text-align:left;vertical-align:top}th{background:#f0f0f0}table.kv td:first-child{font-weight:600}
code{font-size:.82rem;word-break:break-all}.bad,.fail{color:#b00020}.warn{color:#8a5a00}.note{color:#555;font-size:.9rem}
.status{display:inline-block;padding:.05rem .45rem;border-radius:.3rem;font-size:.8rem;margin-left:.5rem;vertical-align:middle}
.status.ok{background:#e3f3e6;color:#1e6b30}.status.warn{background:#fff3d6}.status.fail{background:#fde2e4}
.status.absent{background:#eee;color:#555}img{max-width:100%}
"""

STATUS_WORDS = {"ok": "ok", "warn": "attention", "fail": "failed", "absent": "not recorded"}


def render_html(report: Report) -> str:
    """The page: header, contents, one section each (title, what-this-means line, body)."""
    toc = "".join(f'<li><a href="#{s.id}">{text(s.title)}</a></li>' for s in report.sections)
    parts = []
    for s in report.sections:
        parts.append(
            f'<section id="{s.id}"><h2>{text(s.title)}<span class="status {s.status}">{STATUS_WORDS[s.status]}</span></h2>'
            f'<p class="meaning"><b>What this means:</b> {text(s.meaning)}</p>{s.body}</section>'
        )
    verdict = (
        "The record passed a full integrity check."
        if report.chain_ok
        else "<b class='bad'>The record FAILED its integrity check: do not rely on the figures below.</b>"
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>gradledger report: {text(report.run)}</title><style>{CSS}</style></head><body>"
        f"<h1>Training provenance report: run {text(report.run)}</h1>"
        f"<p>Ledger <code>{text(report.origin)}</code>, {num(report.ledger_size)} entries. Generated {text(report.generated)} "
        "by gradledger from the ledger alone; this file is self-contained and loads nothing from the network.</p>"
        f"<p>{verdict}</p><h2>Contents</h2><ol>{toc}</ol>{''.join(parts)}"
        "<hr><p class='note'>Annotators appear only as keyed pseudonyms; identities stay outside the ledger.</p>"
        "</body></html>\n"
    )
