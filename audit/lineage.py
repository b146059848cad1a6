"""Lineage graphs: who and what shaped a model, as a ``networkx.DiGraph`` whose every part names its ledger seq.

Edges point from cause to effect::

    annotator ─► label ─► example ─► run ─► layer ─► checkpoint ─► suggestion ─► (corrected) label
    export ────► label            policy ─► run ◄─ manifest
    example ──(contribution, top-K per layer)──► layer

Node ids are typed and readable: ``annotator:<pseudonym>``, ``label:<source>:<label id>``,
``suggestion:<source>:<suggestion id>``, ``export:<seq>:<file name>``, ``example:<id>``, ``run:<name>``,
``layer:<run>/<layer>``, ``checkpoint:<seq>``, ``policy:<seq>``, ``manifest:<seq>``. Every node has ``kind`` and
``seq`` (the entry that proves it; a run's layers and examples cite the run entry and their first step);
every edge has ``kind`` and ``seq`` (the entry that records the link) or, for aggregated training edges,
``first_seq`` / ``last_seq`` / ``steps``.

Training edges are aggregated, never one per step: ``example → run`` carries the example's total ``update`` and
``self_influence`` (all layers) and ``by_epoch`` (its update per epoch); ``run → layer`` the layer's totals and
per-epoch series; ``example → layer`` (kind ``contribution``) exists for the ``top`` largest contributors of each
layer. So a run of any length has O(examples + layers x top) edges, and with more than ``max_examples``
examples only the top contributors (and their labels and annotators) become nodes (graph attribute
``examples_truncated``). Metrics are defined in :mod:`audit.contributions`.

Attributes are scalars (GraphML needs them): lists are stored as JSON text (``by_epoch``, ``layer_update``);
absent values are left out rather than stored as None.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from ledger import records as _records
from ledger.store import Ledger

from .contributions import RunTotals, run_totals

DEFAULT_TOP = 20
DEFAULT_MAX_EXAMPLES = 10_000
LABEL_KINDS = ("annotation", "suggestion")


class LineageError(ValueError):
    """Bad lineage input: unknown run, focus that is not in the graph (the CLI exits 2)."""


# ----- node ids ------------------------------------------------------------------------------------------


def label_node(source: str, label_id: str) -> str:
    return f"label:{source}:{label_id}"


def suggestion_node(source: str, suggestion_id: str) -> str:
    return f"suggestion:{source}:{suggestion_id}"


def layer_node(run: str, layer: str) -> str:
    return f"layer:{run}/{layer}"


def _attrs(**kw: Any) -> dict[str, Any]:
    """Scalar attributes only (GraphML): None dropped, numpy scalars to Python, lists / dicts to JSON text."""
    out: dict[str, Any] = {}
    for k, v in kw.items():
        if v is None:
            continue
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, list | tuple | dict):
            v = json.dumps(v, separators=(",", ":"), sort_keys=True)
        out[k] = v
    return out


def _floats(a: Iterable[float]) -> list[float]:
    return [float(x) for x in a]


# ----- reading the ledger --------------------------------------------------------------------------------


class _Labels:
    """Annotation / suggestion / export entries, read once (bodies only)."""

    def __init__(self, ledger: Ledger) -> None:
        self.bodies: dict[int, tuple[str, dict[str, Any]]] = {}
        self.exports: list[tuple[int, dict[str, Any]]] = []
        for e in ledger.entries(kind={"annotation", "suggestion", "export"}, payloads=False):
            if e.kind == "export":
                self.exports.append((e.seq, e.body))
            else:
                self.bodies[e.seq] = (e.kind, e.body)

    def node(self, seq: int) -> str | None:
        got = self.bodies.get(seq)
        if got is None:
            return None
        kind, b = got
        if kind == "annotation":
            return label_node(str(b.get("source")), str(b.get("label_id")))
        return suggestion_node(str(b.get("source")), str(b.get("suggestion_id")))

    def export_for(self, seq: int) -> tuple[int, dict[str, Any]] | None:
        """The export entry whose record range holds ``seq`` (exports are appended after their records)."""
        for eseq, b in self.exports:
            lo, hi = b.get("first_seq"), b.get("last_seq")
            if isinstance(lo, int) and isinstance(hi, int) and lo <= seq <= hi < eseq:
                return eseq, b
        return None


def _add_label(g: nx.DiGraph, labels: _Labels, seq: int) -> str | None:
    """Add the label (or suggestion) node at ``seq`` with its annotator, export and seed edges."""
    node = labels.node(seq)
    if node is None:
        return None
    kind, b = labels.bodies[seq]
    if node in g and g.nodes[node].get("seq", -1) >= seq:
        return node
    prod = b.get("producer") or {}
    if kind == "annotation":
        g.add_node(
            node,
            **_attrs(
                kind="label",
                seq=seq,
                label_id=str(b.get("label_id")),
                source=b.get("source"),
                producer=prod.get("kind"),
                status=b.get("status"),
                value_sha256=b.get("value_sha256"),
            ),
        )
        if prod.get("kind") == "human" and prod.get("id"):
            ann = f"annotator:{prod['id']}"
            g.add_node(ann, **_attrs(kind="annotator", pseudonym=prod["id"], seq=seq))
            g.add_edge(ann, node, **_attrs(kind="labelled", seq=seq))
        elif prod.get("id"):
            g.nodes[node]["model"] = str(prod["id"])
        for seed in b.get("seeded_from") or []:
            sseq = seed.get("seq")
            if isinstance(sseq, int) and sseq in labels.bodies and sseq != seq:
                src = _add_label(g, labels, sseq)
                if src is not None:
                    g.add_edge(src, node, **_attrs(kind="seeded", seq=seq, origin=seed.get("origin")))
    else:
        g.add_node(
            node,
            **_attrs(
                kind="suggestion",
                seq=seq,
                suggestion_id=str(b.get("suggestion_id")),
                source=b.get("source"),
                model_version=b.get("model_version"),
                confidence=b.get("confidence"),
                checkpoint_seq=b.get("checkpoint_seq"),
            ),
        )
    exp = labels.export_for(seq)
    if exp is not None:
        eseq, eb = exp
        en = f"export:{eseq}:{eb.get('name')}"
        g.add_node(
            en,
            **_attrs(
                kind="export", seq=eseq, name=eb.get("name"), sha256=eb.get("sha256"), source=eb.get("source")
            ),
        )
        g.add_edge(en, node, **_attrs(kind="exported", seq=eseq))
    return node


def _keep_examples(t: RunTotals, top: int | None, max_examples: int | None) -> np.ndarray:
    """Indices of the examples that become nodes: all, or the top contributors of some layer."""
    n = len(t.example_ids)
    if max_examples is None or n <= max_examples:
        return np.arange(n)
    k = top or DEFAULT_TOP
    keep: set[int] = set()
    for j in range(len(t.layers)):
        keep.update(_top_k(t.update[:, j], k).tolist())
    return np.array(sorted(keep), dtype=np.int64)


def _top_k(score: np.ndarray, k: int) -> np.ndarray:
    """The k largest (ties: lower index first), in rank order."""
    if score.size == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((np.arange(score.size), -score))
    return order[:k]


def _add_run(
    g: nx.DiGraph,
    ledger: Ledger,
    run: _records.RunRecord,
    labels: _Labels,
    top: int | None,
    max_examples: int | None,
) -> None:
    rn = f"run:{run.run}"
    t = run_totals(ledger.steps(run.run), run.layers, run.loss_reduction)
    g.add_node(
        rn,
        **_attrs(
            kind="run",
            seq=run.seq,
            name=run.run,
            steps=t.steps,
            sample_steps=t.sample_steps,
            examples=len(t.example_ids),
            epochs=len(t.epochs),
            loss_reduction=run.loss_reduction,
            eps=t.eps,
        ),
    )
    if run.policy_seq is not None:
        pb = ledger.entry(run.policy_seq).body
        pn = f"policy:{run.policy_seq}"
        g.add_node(
            pn, **_attrs(kind="policy", seq=run.policy_seq, name=pb.get("name"), digest=pb.get("digest"))
        )
        g.add_edge(pn, rn, **_attrs(kind="routed", seq=run.seq))
    man_examples: dict[str, Any] = {}
    if run.manifest_seq is not None:
        mb = ledger.entry(run.manifest_seq).body
        man_examples = mb.get("examples", {})
        mn = f"manifest:{run.manifest_seq}"
        g.add_node(
            mn,
            **_attrs(
                kind="manifest", seq=run.manifest_seq, name=mb.get("name"), digest=mb.get("digest"),
                examples=len(man_examples),
            ),
        )  # fmt: skip
        g.add_edge(mn, rn, **_attrs(kind="labels", seq=run.seq))
    totals = t.update.sum(axis=0) if t.example_ids else np.zeros(len(t.layers))
    sin_totals = t.self_influence.sum(axis=0) if t.example_ids else np.zeros(len(t.layers))
    for j, name in enumerate(t.layers):
        ln = layer_node(run.run, name)
        g.add_node(ln, **_attrs(kind="layer", seq=run.seq, run=run.run, name=name))
        g.add_edge(
            rn,
            ln,
            **_attrs(
                kind="trains",
                seq=run.seq,
                first_seq=t.step_seqs[0] if t.step_seqs else None,
                last_seq=t.step_seqs[-1] if t.step_seqs else None,
                steps=t.steps,
                weight=float(totals[j]),
                update=float(totals[j]),
                self_influence=float(sin_totals[j]),
                excluded_nonfinite=int(t.excluded[j]),
                epochs=t.epochs,
                by_epoch=[float(t.layer_by_epoch[ep][j]) for ep in t.epochs],
            ),
        )
    keep = _keep_examples(t, top, max_examples)
    g.graph.setdefault("examples_truncated", False)
    if keep.size < len(t.example_ids):
        g.graph["examples_truncated"] = True
    kept = set(keep.tolist())
    for i in keep.tolist():
        ex = t.example_ids[i]
        en = f"example:{ex}"
        g.add_node(
            en,
            **_attrs(
                kind="example",
                seq=int(t.first_seq[i]),
                example_id=ex,
                layer_update=_floats(t.update[i]),
                domain=(man_examples.get(ex) or {}).get("domain"),
            ),
        )
        g.add_edge(
            en,
            rn,
            **_attrs(
                kind="trained_on",
                first_seq=int(t.first_seq[i]),
                last_seq=int(t.last_seq[i]),
                steps=int(t.count[i]),
                weight=float(t.update[i].sum()),
                update=float(t.update[i].sum()),
                self_influence=float(t.self_influence[i].sum()),
                epochs=t.epochs,
                by_epoch=[float(t.example_by_epoch[ep][i]) for ep in t.epochs],
            ),
        )
        for lab in (man_examples.get(ex) or {}).get("labels", []):
            ln_ = _add_label(g, labels, int(lab["seq"]))
            if ln_ is not None:
                g.add_edge(ln_, en, **_attrs(kind="label_of", seq=run.manifest_seq))
    k = top if top is not None else len(t.example_ids)
    for j, name in enumerate(t.layers):
        tot = float(totals[j])
        for i in _top_k(t.update[:, j], k).tolist():
            if i not in kept or t.update[i, j] == 0.0 and t.count[i] == 0:
                continue
            g.add_edge(
                f"example:{t.example_ids[i]}",
                layer_node(run.run, name),
                **_attrs(
                    kind="contribution",
                    first_seq=int(t.first_seq[i]),
                    last_seq=int(t.last_seq[i]),
                    steps=int(t.count[i]),
                    weight=float(t.update[i, j]),
                    update=float(t.update[i, j]),
                    self_influence=float(t.self_influence[i, j]),
                    share=float(t.update[i, j]) / tot if tot else 0.0,
                ),
            )
    for cp in _records.checkpoints(ledger, run.run):
        cn = f"checkpoint:{cp.seq}"
        g.add_node(
            cn,
            **_attrs(
                kind="checkpoint", seq=cp.seq, run=run.run, tag=cp.tag, step=cp.step,
                state_dict_sha256=cp.state_dict_sha256, eps=cp.eps,
            ),
        )  # fmt: skip
        for name in t.layers:
            g.add_edge(
                layer_node(run.run, name),
                cn,
                **_attrs(kind="state", seq=cp.seq, sha256=cp.layer_sha256.get(name)),
            )
        for sseq, (kind, b) in labels.bodies.items():
            if kind == "suggestion" and b.get("checkpoint_seq") == cp.seq:
                sn = _add_label(g, labels, sseq)
                if sn is not None:
                    g.add_edge(cn, sn, **_attrs(kind="suggested", seq=sseq))
    # labels seeded from this run's suggestions (the human corrections), even if no run used them yet
    sugg = {n for n, d in g.nodes(data=True) if d.get("kind") == "suggestion"}
    for seq, (kind, b) in labels.bodies.items():
        if kind == "annotation" and any(
            labels.node(s.get("seq")) in sugg
            for s in b.get("seeded_from") or []
            if isinstance(s.get("seq"), int)
        ):
            _add_label(g, labels, seq)


def graph(
    ledger: Ledger,
    run: str | None = None,
    *,
    top: int | None = DEFAULT_TOP,
    max_examples: int | None = DEFAULT_MAX_EXAMPLES,
) -> nx.DiGraph:
    """The lineage graph of ``run`` (default: every run); see the module docstring.

    ``top``: contribution edges per layer (None: every example). ``max_examples``: above this many examples in
    a run only the top contributors become nodes (None: always all). Raises LineageError for an unknown run.
    """
    all_runs = _records.runs(ledger)
    if run is not None:
        chosen = [r for r in all_runs if r.run == run][-1:]
        if not chosen:
            names = ", ".join(sorted({r.run for r in all_runs})) or "none"
            raise LineageError(f"no run named {run!r} in this ledger (runs: {names})")
    else:
        chosen = all_runs
    g = nx.DiGraph(origin=ledger.origin, size=ledger.size, run=run or "", metric="update")
    labels = _Labels(ledger)
    for r in chosen:
        _add_run(g, ledger, r, labels, top, max_examples)
    return g


# ----- focus ---------------------------------------------------------------------------------------------

# Walking up from a run would pull in every example it trained on; top contributors reach layers directly
# through ``contribution`` edges, so ancestry does not follow ``trained_on`` edges unless the focus is the run.
_SKIP_UP = {"trained_on"}


def _walk(g: nx.DiGraph, start: str, up: bool, skip: set[str], radius: int | None) -> set[str]:
    seen = {start}
    frontier = [start]
    depth = 0
    while frontier and (radius is None or depth < radius):
        nxt = []
        for n in frontier:
            edges = g.in_edges(n, data="kind") if up else g.out_edges(n, data="kind")
            for a, b, kind in edges:
                m = a if up else b
                if kind in skip or m in seen:
                    continue
                seen.add(m)
                nxt.append(m)
        frontier = nxt
        depth += 1
    return seen


def resolve_focus(g: nx.DiGraph, *, label: str | None = None, layer: str | None = None,
                  annotator: str | None = None, checkpoint: int | None = None) -> list[str]:  # fmt: skip
    """Node ids matching a focus given the way a user writes it (label id, layer name, pseudonym, seq)."""
    if label is not None:
        hits = [
            n
            for n, d in g.nodes(data=True)
            if d.get("kind") == "label"
            and (n == label or d.get("label_id") == label or n == f"label:{label}")
        ]
        what = f"label {label!r}"
    elif layer is not None:
        hits = [
            n
            for n, d in g.nodes(data=True)
            if d.get("kind") == "layer" and (n == layer or d.get("name") == layer)
        ]
        what = f"layer {layer!r}"
    elif annotator is not None:
        hits = [
            n for n in (f"annotator:{annotator}", annotator) if g.nodes.get(n, {}).get("kind") == "annotator"
        ][:1]
        what = f"annotator {annotator!r}"
    elif checkpoint is not None:
        hits = [n for n in [f"checkpoint:{checkpoint}"] if n in g]
        what = f"checkpoint seq {checkpoint}"
    else:
        raise LineageError("no focus given")
    if not hits:
        raise LineageError(f"{what} is not in the lineage graph")
    return hits


def focus(g: nx.DiGraph, nodes: Iterable[str], *, radius: int | None = None) -> nx.DiGraph:
    """The subgraph of ``nodes`` with their ancestors and descendants (bounded: see ``_SKIP_UP``)."""
    keep: set[str] = set()
    for n in nodes:
        if n not in g:
            raise LineageError(f"{n!r} is not in the lineage graph")
        skip = set() if g.nodes[n].get("kind") == "run" else _SKIP_UP
        keep |= _walk(g, n, True, skip, radius) | _walk(g, n, False, set(), radius)
    sub = g.subgraph(keep).copy()
    sub.graph["focus"] = ",".join(sorted(nodes))
    return sub


# ----- writers -------------------------------------------------------------------------------------------


def _dot_id(s: str) -> str:
    """A DOT double-quoted ID: backslash and double quote escaped, newlines as \\n."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "") + '"'


_SHAPES = {
    "annotator": "ellipse", "label": "note", "suggestion": "note", "export": "folder", "example": "box",
    "run": "doubleoctagon", "layer": "box3d", "checkpoint": "cylinder", "policy": "component", "manifest": "tab",
}  # fmt: skip


def to_dot(g: nx.DiGraph) -> str:
    """Graphviz DOT text. Hand-written because networkx's DOT writers need pydot or pygraphviz (not
    dependencies here); every ID and attribute value is a quoted, escaped DOT string."""
    lines = ["digraph lineage {", "  rankdir=LR;", "  node [fontsize=10];"]
    for k, v in sorted(g.graph.items()):
        lines.append(f"  // {k}: {str(v).replace(chr(10), ' ')}")
    for n, d in g.nodes(data=True):
        attrs = {"shape": _SHAPES.get(d.get("kind", ""), "ellipse"), "label": n}
        attrs.update({k: str(v) for k, v in d.items()})
        lines.append(
            f"  {_dot_id(n)} [" + ", ".join(f"{_dot_id(k)}={_dot_id(v)}" for k, v in attrs.items()) + "];"
        )
    for a, b, d in g.edges(data=True):
        attrs = {k: str(v) for k, v in d.items()}
        if "weight" in d:
            attrs["label"] = f"{d.get('kind')} {float(d['weight']):.3g}"
        else:
            attrs["label"] = str(d.get("kind", ""))
        lines.append(
            f"  {_dot_id(a)} -> {_dot_id(b)} ["
            + ", ".join(f"{_dot_id(k)}={_dot_id(v)}" for k, v in attrs.items())
            + "];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_json(g: nx.DiGraph) -> dict[str, Any]:
    return nx.node_link_data(g, edges="edges")


FORMATS = ("graphml", "dot", "json")


def write(g: nx.DiGraph, path: Path, fmt: str) -> None:
    """Write ``g`` to ``path`` atomically (a temporary file renamed into place)."""
    if fmt not in FORMATS:
        raise LineageError(f"unknown format {fmt!r} (use {', '.join(FORMATS)})")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if fmt == "graphml":
            h = g.copy()
            h.graph = {k: v for k, v in g.graph.items() if v is not None}
            nx.write_graphml(h, tmp, encoding="utf-8")
        elif fmt == "dot":
            tmp.write_text(to_dot(g), encoding="utf-8")
        else:
            tmp.write_text(json.dumps(to_json(g), indent=1, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
