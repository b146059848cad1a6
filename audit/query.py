"""Which labels, annotators, sources and domains shaped which layers: answers from ``audit.aggregates``.

``layer`` ranks a run's examples (or groups of them) by their contribution to one layer, ``label`` profiles one
label across layers and epochs, ``annotator`` sums one annotator's labels per layer. Metrics and their exact
definitions are in :mod:`audit.aggregates`. Provenance (label id, annotator pseudonym, consensus, review,
source, domain) comes from the run's manifest (the ``run`` entry pins its seq).

Costs: a whole-run ``layer`` query reads one ``f8[N]`` array per needed metric plus the not-yet-folded steps
(at most about N sample-steps); an ``epochs`` range reads every step in the range (one layer's slice of each),
so it grows with the number of sample-steps in the range and is slower than a whole-run query on long runs.
``--by annotator|source|domain`` and every provenance lookup load the run's manifest.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import Connection, func, select

from ledger import schema
from ledger.store import Ledger

from . import aggregates as agg
from .aggregates import Sums, decode_step, steps, sum_rows

BY = ("label", "annotator", "source", "domain")
METRIC_NAMES = {"update": "update", "self-influence": "self_influence", "self_influence": "self_influence"}


class QueryError(ValueError):
    """Bad query input (unknown run / layer / label / annotator, bad epoch range): the CLI exits 2."""


# ----- results ------------------------------------------------------------------------------------------


@dataclass
class LayerRow:
    rank: int
    key: str | None  # the label id (by label) or the group value
    score: float
    share: float  # of the layer total over the same epochs
    weight: float | None  # mean routing weight received for this layer
    sample_steps: int
    example_id: str | None = None
    label_id: str | None = None
    annotator: str | None = None
    consensus: float | None = None
    consensus_method: str | None = None
    review: str | None = None
    source: str | None = None
    domain: str | None = None
    examples: int = 1


@dataclass
class LayerResult:
    run: str
    run_seq: int
    layer: str
    metric: str
    by: str
    epochs: tuple[int, int] | None
    total: float
    examples: int  # examples that appear in the range
    sample_steps: int
    excluded_nonfinite: int
    rows: list[LayerRow]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["metric"] = "self-influence" if self.metric == "self_influence" else self.metric
        d["epochs"] = None if self.epochs is None else list(self.epochs)
        return _clean(d)


@dataclass
class LabelResult:
    label_id: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return _clean({"label_id": self.label_id, "runs": self.runs})


@dataclass
class AnnotatorResult:
    annotator: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return _clean({"annotator": self.annotator, "runs": self.runs})


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/Inf floats become strings (they never occur in sums, only in absent weights)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


# ----- input parsing ------------------------------------------------------------------------------------


def parse_epochs(text: str | None) -> tuple[int, int] | None:
    """``"A:B"`` (inclusive) or ``"A"`` → (A, B); None → None (whole run). QueryError on bad syntax."""
    if text is None:
        return None
    a, sep, b = text.strip().partition(":")
    try:
        lo = int(a)
        hi = int(b) if sep else lo
    except ValueError:
        raise QueryError(f"--epochs {text!r}: expected A:B (two integers, inclusive) or A") from None
    if lo < 0 or hi < lo:
        raise QueryError(f"--epochs {text!r}: need 0 <= A <= B")
    return lo, hi


def _metric(name: str) -> str:
    try:
        return METRIC_NAMES[name]
    except KeyError:
        raise QueryError(f"unknown metric {name!r} (use update or self-influence)") from None


def _unknown(what: str, name: str, known: Sequence[str], where: str = "") -> QueryError:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    if not close and len(known) <= 12:
        hint = f" (known: {', '.join(known) or 'none'})"
    return QueryError(f"unknown {what} {name!r}{where}{hint}")


# ----- access ------------------------------------------------------------------------------------------


@dataclass
class _RunInfo:
    run_seq: int
    run: str
    manifest_seq: int | None
    policy_seq: int | None
    layers: list[str]
    n_examples: int
    folded_through: int
    folded_excluded: list[int]


def _connect(ledger: Ledger) -> Any:
    """A read connection with one snapshot for the whole query (REPEATABLE READ on PostgreSQL)."""
    conn = ledger.engine.connect()
    if ledger.dialect == "postgresql":
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
    return conn


def ensure(ledger: Ledger) -> None:
    """Materialise (back-fill) the aggregates if this ledger was written without them."""
    m = schema.meta
    with ledger.engine.connect() as conn:
        present = conn.execute(select(m.c.key).where(m.c.key == f"indexer:{agg.NAME}")).first()
        conn.rollback()
    if present is None:
        ledger.ensure_indexers()


def _runs(conn: Connection) -> list[_RunInfo]:
    r = agg.runs
    rows = conn.execute(
        select(
            r.c.run_seq, r.c.run, r.c.manifest_seq, r.c.policy_seq, r.c.layers, r.c.n_examples,
            r.c.folded_through, r.c.folded_excluded,
        ).order_by(r.c.run_seq)
    ).all()  # fmt: skip
    return [
        _RunInfo(int(a), b, c, d, json.loads(e), int(f), int(g), json.loads(h))
        for a, b, c, d, e, f, g, h in rows
    ]


def _find_run(conn: Connection, run: str) -> _RunInfo:
    all_runs = _runs(conn)
    hits = [r for r in all_runs if r.run == run]
    if not hits:
        raise _unknown("run", run, sorted({r.run for r in all_runs}))
    return hits[-1]


def _layer_index(info: _RunInfo, layer: str) -> int:
    if layer not in info.layers:
        raise _unknown("layer", layer, info.layers, f" in run {info.run!r}")
    return info.layers.index(layer)


def _raw_rows(conn: Connection, info: _RunInfo, sel: Sequence[int], where: Any) -> Any:
    """qa_steps rows matching ``where`` in seq order; a single layer's norms are sliced in SQL."""
    s = steps
    norms: Any = s.c.norms
    if len(sel) == 1:
        width = func.length(s.c.idx)  # 4 bytes per sample, the same as one layer's f4 norms
        norms = func.substr(s.c.norms, sel[0] * width + 1, width)
    q = (
        select(s.c.seq, s.c.epoch, s.c.step, s.c.idx, norms, s.c.wtab, s.c.wrow, s.c.scale, s.c.lr)
        .where(s.c.run_seq == info.run_seq, where)
        .order_by(s.c.seq)
    )
    yield from _fetch_all(conn, q)


def _fetch_all(conn: Connection, q: Any) -> list[Any]:
    """All rows of ``q``; on PostgreSQL through a binary-format psycopg cursor.

    Binary results carry bytea as raw bytes; the default text format doubles them as hex and parses them
    back, which was most of a 10M sample-step whole-run query's time on PostgreSQL.
    """
    if conn.dialect.name != "postgresql":
        return list(conn.execute(q).all())
    compiled = q.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    raw: Any = conn.connection.dbapi_connection  # psycopg 3, inside this Connection's transaction
    with raw.cursor(binary=True) as cur:
        cur.execute(str(compiled), compiled.params)
        return list(cur.fetchall())


def _step_rows(conn: Connection, info: _RunInfo, sel: Sequence[int], where: Any) -> Any:
    for row in _raw_rows(conn, info, sel, where):
        yield decode_step(
            tuple(bytes(v) if isinstance(v, memoryview) else v for v in row), len(info.layers), sel
        )


def _sums(conn: Connection, info: _RunInfo, sel: Sequence[int], epochs: tuple[int, int] | None) -> Sums:
    """Per-example sums for layers ``sel`` over the whole run (qa_base + unfolded steps) or an epoch range."""
    n = info.n_examples
    s = steps
    if epochs is not None:
        lo, hi = conn.execute(
            select(func.min(s.c.epoch), func.max(s.c.epoch)).where(s.c.run_seq == info.run_seq)
        ).one()
        if lo is not None and epochs[0] <= lo and hi <= epochs[1]:
            epochs = None  # the range holds every step of the run: the whole-run totals answer it exactly
    if epochs is not None:
        where = s.c.epoch.between(epochs[0], epochs[1])
        return sum_rows(_raw_rows(conn, info, sel, where), n, len(info.layers), sel)
    tail = sum_rows(_raw_rows(conn, info, sel, s.c.seq > info.folded_through), n, len(info.layers), sel)
    b = agg.base
    pos = {j: k for k, j in enumerate(sel)}
    q = select(b.c.metric, b.c.layer, b.c.data).where(
        b.c.run_seq == info.run_seq, b.c.layer.in_([*sel, agg.COUNT_LAYER])
    )
    for metric, layer, data in _fetch_all(conn, q):
        arr = agg._pad(np.frombuffer(bytes(data), "<f8"), n)
        if metric == "count":
            tail.count = arr + tail.count
        else:
            target = tail.metric(metric)
            target[pos[int(layer)]] = arr + target[pos[int(layer)]]
    tail.excluded = tail.excluded + np.array([info.folded_excluded[j] for j in sel], dtype=np.int64)
    tail.samples = int(tail.count.sum())
    return tail


def _example_ids(conn: Connection, info: _RunInfo, idx: Sequence[int] | None = None) -> dict[int, str]:
    if idx is not None and len(idx) <= 256:
        return agg.ids_at(conn, info.run_seq, idx)
    ids = agg.load_ids(conn, info.run_seq)
    return dict(enumerate(ids)) if idx is None else {int(i): ids[int(i)] for i in idx}


_MANIFESTS: dict[tuple[str, int], Any] = {}


def _manifest(ledger: Ledger, seq: int | None) -> Any:
    """The run's manifest (cached per ledger origin and seq: entries never change once appended)."""
    if seq is None:
        return None
    key = (ledger.origin, int(seq))
    if key not in _MANIFESTS:
        from ledger.provenance import Manifest

        _MANIFESTS.clear()  # keep one: manifests can be large
        _MANIFESTS[key] = Manifest.load(ledger, int(seq))
    return _MANIFESTS[key]


def _group_keys(prov: Any, by: str) -> list[str]:
    if prov is None:
        return ["(not in manifest)"]
    if by == "annotator":
        names = [a for a in (prov.annotators or (prov.annotator,)) if a]
        return list(dict.fromkeys(names)) or ["(no human annotator)"]
    value = prov.source if by == "source" else prov.domain
    return [value if value is not None else f"(no {by})"]


# ----- queries ------------------------------------------------------------------------------------------


def layer(
    ledger: Ledger,
    run: str,
    layer: str,
    *,
    top: int = 20,
    by: str = "label",
    metric: str = "update",
    epochs: tuple[int, int] | str | None = None,
) -> LayerResult:
    """The top ``top`` labels (or annotators / sources / domains) by contribution to ``layer`` in ``run``.

    ``epochs``: inclusive (A, B) or "A:B"; None = the whole run. Shares are of the layer's total over the same
    epochs. Ties rank by first appearance in the run. Raises QueryError for unknown names / bad input.
    """
    m = _metric(metric)
    if by not in BY:
        raise QueryError(f"unknown --by {by!r} (use {', '.join(BY)})")
    if top < 1:
        raise QueryError(f"--top must be at least 1, got {top}")
    ep = parse_epochs(epochs) if isinstance(epochs, str) else epochs
    if ep is not None and (ep[0] < 0 or ep[1] < ep[0]):
        raise QueryError(f"epochs {ep}: need 0 <= A <= B")
    ensure(ledger)
    with _connect(ledger) as conn, conn.begin():
        info = _find_run(conn, run)
        j = _layer_index(info, layer)
        sums = _sums(conn, info, [j], ep)
        score = sums.metric(m)[0]
        wsum = sums.weight[0]
        count = sums.count
        seen = np.flatnonzero(count > 0)
        total = float(score[seen].sum()) if seen.size else 0.0
        rows: list[LayerRow] = []
        if by == "label":
            order = _top(score, seen, top)
            ids = _example_ids(conn, info, order.tolist())
            man = _manifest(ledger, info.manifest_seq)
            for rank, i in enumerate(order.tolist(), 1):
                ex = ids[i]
                prov = None if man is None else man.get(ex)
                rows.append(
                    LayerRow(
                        rank=rank,
                        key=None if prov is None else prov.label_id,
                        score=float(score[i]),
                        share=float(score[i]) / total if total else 0.0,
                        weight=float(wsum[i] / count[i]),
                        sample_steps=int(count[i]),
                        example_id=ex,
                        label_id=None if prov is None else prov.label_id,
                        annotator=None if prov is None else prov.annotator,
                        consensus=None if prov is None else prov.consensus,
                        consensus_method=None if prov is None else prov.consensus_method,
                        review=None if prov is None else prov.review,
                        source=None if prov is None else prov.source,
                        domain=None if prov is None else prov.domain,
                    )
                )
        else:
            man = _manifest(ledger, info.manifest_seq)
            if man is None:
                raise QueryError(f"--by {by}: run {info.run!r} has no manifest to resolve examples to {by}s")
            ids = _example_ids(conn, info)
            groups: dict[str, list[int]] = {}
            for i in seen.tolist():
                for k in _group_keys(man.get(ids[i]), by):
                    groups.setdefault(k, []).append(i)
            agg_rows = []
            for k, members in groups.items():
                mi = np.asarray(members)
                g_score = float(score[mi].sum())
                agg_rows.append((g_score, k, mi))
            agg_rows.sort(key=lambda t: (-t[0], t[1]))
            for rank, (g_score, k, mi) in enumerate(agg_rows[:top], 1):
                rows.append(
                    LayerRow(
                        rank=rank,
                        key=k,
                        score=g_score,
                        share=g_score / total if total else 0.0,
                        weight=float(wsum[mi].sum() / count[mi].sum()),
                        sample_steps=int(count[mi].sum()),
                        examples=int(mi.size),
                        annotator=k if by == "annotator" else None,
                        source=k if by == "source" else None,
                        domain=k if by == "domain" else None,
                    )
                )
        return LayerResult(
            run=info.run,
            run_seq=info.run_seq,
            layer=layer,
            metric=m,
            by=by,
            epochs=ep,
            total=total,
            examples=int(seen.size),
            sample_steps=int(count.sum()),
            excluded_nonfinite=int(sums.excluded[0]),
            rows=rows,
        )


def _top(score: np.ndarray, seen: np.ndarray, k: int) -> np.ndarray:
    """Indices (among ``seen``) of the k largest scores, ties by lower index, in rank order."""
    if seen.size == 0:
        return seen
    vals = score[seen]
    if k < seen.size:
        cut = np.partition(vals, seen.size - k)[seen.size - k]
        cand = seen[vals >= cut]
    else:
        cand = seen
    order = np.lexsort((cand, -score[cand]))
    return cand[order][:k]


def _all_runs_with_manifest(conn: Connection, run: str | None) -> list[_RunInfo]:
    infos = _runs(conn)
    if run is not None:
        infos = [_find_run(conn, run)]
    return infos


def label(ledger: Ledger, label_id: str, *, run: str | None = None) -> LabelResult:
    """One label's provenance and, per run that trained on it, its per-layer, per-epoch contributions.

    ``label_id`` is the source label id in the runs' manifests (an example id is accepted too). The profile
    lists, per epoch and layer, the ``update`` and ``self_influence`` sums, and the routing weights the example
    received with the policy entry and rule that set them.
    """
    ensure(ledger)
    out = LabelResult(label_id)
    known: set[str] = set()
    with _connect(ledger) as conn, conn.begin():
        for info in _all_runs_with_manifest(conn, run):
            man = _manifest(ledger, info.manifest_seq)
            exs: list[str] = []
            if man is not None:
                for ex, prov in man.items():
                    if prov.label_id is not None:
                        known.add(prov.label_id)
                    if prov.label_id == label_id:
                        exs.append(ex)
            ids = _example_ids(conn, info)
            by_id = {v: k for k, v in ids.items()}
            if not exs and label_id in by_id:
                exs = [label_id]
            for ex in exs:
                if ex not in by_id:
                    continue
                prov = None if man is None else man.get(ex)
                out.runs.append(_label_profile(ledger, conn, info, ex, by_id[ex], prov))
    if not out.runs:
        raise _unknown("label", label_id, sorted(known))
    return out


def _label_profile(
    ledger: Ledger, conn: Connection, info: _RunInfo, ex: str, ex_idx: int, prov: Any
) -> dict[str, Any]:
    s = steps
    rows = conn.execute(select(s.c.seq, s.c.idx).where(s.c.run_seq == info.run_seq).order_by(s.c.seq)).all()
    ends = np.cumsum([len(r[1]) // 4 for r in rows])
    at = np.flatnonzero(np.frombuffer(b"".join(r[1] for r in rows), "<i4") == ex_idx)
    hit_seqs = sorted({int(rows[k][0]) for k in np.searchsorted(ends, at, side="right").tolist()})
    n_l = len(info.layers)
    per_epoch: dict[int, dict[str, Any]] = {}
    weights: dict[tuple[float, ...], int] = {}
    excluded = 0
    positions: dict[int, list[int]] = {}
    for sd in _step_rows(conn, info, list(range(n_l)), s.c.seq.in_(hit_seqs)) if hit_seqs else ():
        u, si, ok = agg.contributions(sd)
        pos = np.flatnonzero(sd.idx == ex_idx)
        positions[sd.seq] = pos.tolist()
        ep = per_epoch.setdefault(
            sd.epoch,
            {"epoch": sd.epoch, "sample_steps": 0, "update": np.zeros(n_l), "self_influence": np.zeros(n_l)},
        )
        for p in pos.tolist():
            ep["sample_steps"] += 1
            ep["update"] = ep["update"] + u[:, p]
            ep["self_influence"] = ep["self_influence"] + si[:, p]
            excluded += int((~ok[:, p]).sum())
            w = tuple(float(x) for x in sd.weights[:, p])
            weights[w] = weights.get(w, 0) + 1
    rules = _rules(ledger, info, positions, ex)
    total_u = sum((e["update"] for e in per_epoch.values()), np.zeros(n_l))
    total_s = sum((e["self_influence"] for e in per_epoch.values()), np.zeros(n_l))
    return {
        "run": info.run,
        "run_seq": info.run_seq,
        "example_id": ex,
        "provenance": _provenance(ledger, prov),
        "layers": info.layers,
        "totals": {"update": total_u.tolist(), "self_influence": total_s.tolist()},
        "epochs": [
            {**e, "update": e["update"].tolist(), "self_influence": e["self_influence"].tolist()}
            for _, e in sorted(per_epoch.items())
        ],
        "routing": {
            "policy_seq": info.policy_seq,
            "rules": rules,
            "weights": [{"weights": list(w), "sample_steps": c} for w, c in weights.items()],
        },
        "steps": hit_seqs,
        "excluded_nonfinite": excluded,
    }


def _rules(ledger: Ledger, info: _RunInfo, positions: dict[int, list[int]], ex: str) -> list[dict[str, Any]]:
    """The policy rule(s) the example matched in these steps ({seq: its rows}, from ``qa_steps``): a step's
    ``rules`` payload, or for a step v 3 without one the rule the run's example table holds for the example
    (``new_rules`` of the step that brought it in, which is its first step)."""
    if info.policy_seq is None or not positions:
        return []
    from instrument.policy import Policy

    policy = Policy.from_entry(ledger, int(info.policy_seq))
    counts: dict[int, int] = {}
    table_rule: int | None = None
    for seq, rows in sorted(positions.items()):
        e = ledger.entry(seq)
        new, new_rules = e.body.get("new_ids") or [], e.body.get("new_rules")
        if table_rule is None and ex in new and isinstance(new_rules, list) and len(new_rules) == len(new):
            table_rule = new_rules[new.index(ex)]
        rules = e.payloads.get("rules")
        if rules is not None:
            for p in rows:
                counts[int(rules[p])] = counts.get(int(rules[p]), 0) + 1
        elif "example_ids" not in e.body and isinstance(table_rule, int):
            counts[table_rule] = counts.get(table_rule, 0) + len(rows)
    return [
        {"rule": r, "name": policy.rule_name(r), "policy": policy.name, "sample_steps": c}
        for r, c in sorted(counts.items())
    ]


def _provenance(ledger: Ledger, prov: Any) -> dict[str, Any] | None:
    if prov is None:
        return None
    body: dict[str, Any] = {}
    if prov.label_seq is not None:
        body = ledger.entry(int(prov.label_seq)).body
    return {
        "label_id": prov.label_id,
        "label_seq": prov.label_seq,
        "annotator": prov.annotator,
        "annotators": list(prov.annotators),
        "producer": prov.producer,
        "source": prov.source,
        "consensus": prov.consensus,
        "consensus_method": prov.consensus_method,
        "review": prov.review,
        "reviews": body.get("reviews", []),
        "seeded_from": body.get("seeded_from", []),
        "gold": prov.gold,
        "domain": prov.domain,
        "rights": prov.rights,
    }


def annotator(ledger: Ledger, pseudonym: str, *, run: str | None = None) -> AnnotatorResult:
    """Per run and layer: the summed contributions of the examples this annotator labelled, and their share.

    An example counts for every human annotator among its labels' producers (a consensus item labelled by two
    annotators counts for both), so shares of different annotators can sum to more than 1.
    """
    ensure(ledger)
    out = AnnotatorResult(pseudonym)
    known: set[str] = set()
    with _connect(ledger) as conn, conn.begin():
        for info in _all_runs_with_manifest(conn, run):
            man = _manifest(ledger, info.manifest_seq)
            if man is None:
                continue
            mine = set()
            for ex, prov in man.items():
                names = _group_keys(prov, "annotator")
                known.update(names)
                if pseudonym in names:
                    mine.add(ex)
            if not mine:
                continue
            ids = _example_ids(conn, info)
            idx = np.array(sorted(i for i, x in ids.items() if x in mine), dtype=np.int64)
            n_l = len(info.layers)
            sums = _sums(conn, info, list(range(n_l)), None)
            layers = []
            for j, name in enumerate(info.layers):
                row: dict[str, Any] = {"layer": name}
                for mname in ("update", "self_influence"):
                    arr = sums.metric(mname)[j]
                    mine_sum = float(arr[idx].sum()) if idx.size else 0.0
                    tot = float(arr.sum())
                    row[mname] = mine_sum
                    row[f"{mname}_share"] = mine_sum / tot if tot else 0.0
                wsum = float(sums.weight[j][idx].sum()) if idx.size else 0.0
                cnt = float(sums.count[idx].sum()) if idx.size else 0.0
                row["weight"] = wsum / cnt if cnt else None
                layers.append(row)
            out.runs.append(
                {
                    "run": info.run,
                    "run_seq": info.run_seq,
                    "examples": int((sums.count[idx] > 0).sum()) if idx.size else 0,
                    "sample_steps": int(sums.count[idx].sum()) if idx.size else 0,
                    "layers": layers,
                }
            )
    if not out.runs:
        raise _unknown("annotator", pseudonym, sorted(k for k in known if not k.startswith("(")))
    return out
