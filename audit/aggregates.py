"""Query aggregates: per-run, per-example, per-layer contribution sums kept in the step's append transaction.

Metrics (float64), for example i, layer l, summed over the sample-steps (steps in which i was in the batch):

* ``update``         = Σ lr_l · w_il · c_i · ‖g_il‖ / d_i
* ``self_influence`` = Σ lr_l · ‖g_il‖²   (TracIn self-influence restricted to layer l)
* ``weight``         = Σ w_il             (the mean routing weight is weight / count)
* ``count``          = number of sample-steps (per example, all layers)

``‖g_il‖`` is the recorded per-sample norm (``grad_norms``: the gradient of the sample's *own* loss, Opacus
scaling), ``w_il`` the routing weight applied (``weights``), ``c_i`` the DP clipping factor (``clip``; 1 without
DP), ``lr_l`` the layer's learning rate at that step. ``d_i`` is the loss-reduction divisor: under
``loss_reduction="mean"`` the batch gradient is ``(1/b) Σ_i w_il c_i g_il`` over the ``tracker.batch`` context
(micro-batch) of size ``b`` that sample i was in, so ``d_i = b`` (= B, the step's batch size, without gradient
accumulation); under ``"sum"`` ``d_i = 1``. So ``update`` is the norm of the sample's term in the SGD step
``lr · grad`` (for adaptive optimisers it is that SGD-equivalent quantity, not the preconditioned step).
A contribution that is not finite (NaN/Inf norm, or a layer with no learning rate) is left out of both sums
and counted per layer as ``excluded``; the weight and count still include that sample-step.

Storage layout, chosen by measurement (BENCHMARKS.md, "Query aggregates"). Updating one row per (run,
example) on every step is a random write per sample: measured 53 ms per B=256 step on a 1M-example SQLite
ledger (each touches its own 64 KiB page), so every per-step write here is append-only:

* ``qa_steps``: one row per step: the batch's example indices, the per-sample norms transposed to
  layer-major ``f4[L, B]`` (so one layer is a contiguous slice), the distinct routing-weight rows with a
  per-sample row index, ``c_i / d_i`` and ``lr``. Epoch-range queries and one label's profile read these.
* ``qa_base``: whole-run totals folded from ``qa_steps``: one ``f8[N]`` array per (run, metric, layer) over
  the run's dense example indices (``qa_examples``). A fold runs inside the append transaction of the step that
  brings the unfolded sample-steps to at least max(FOLD_MIN_SAMPLES, FOLD_EPOCHS x examples seen): it rewrites
  O(N) bytes once per ~2N sample-steps (about every second epoch), so its cost per sample-step is constant, and
  a whole-run query reads N values per metric plus at most ~2N unfolded sample-steps (one layer's slice).

Exactness: ``apply`` processes entries one at a time in seq order and a fold's trigger depends only on the
entries, so ``verify --deep`` (rebuild from the entries in chunks) repeats the same float operations in the same
order and the tables compare bit for bit (``float_rtol = 0``). Step entries that are not tracker steps (no
``grad_norms``/``weights`` payloads, wrong shapes, a run or layer list the ``run`` entry does not have) are
skipped, deterministically.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    select,
    update,
)

from ledger import indexers
from ledger import schema as ledger_schema
from ledger.records import RunSteps, RunTable, step_weights

NAME = "query_aggregates"
METRICS = ("update", "self_influence", "weight")
COUNT_LAYER = -1  # qa_base rows with metric "count" hold per-example sample-step counts
FOLD_MIN_SAMPLES = 65536
FOLD_EPOCHS = 2  # fold when the unfolded sample-steps reach FOLD_EPOCHS x the examples seen
_IN_CHUNK = 500

_md = MetaData()
_Key = BigInteger().with_variant(Integer(), "sqlite")

runs = Table(
    "qa_runs",
    _md,
    Column("run_seq", _Key, primary_key=True, autoincrement=False),
    Column("run", Text, nullable=False),
    Column("manifest_seq", BigInteger, nullable=True),
    Column("policy_seq", BigInteger, nullable=True),
    Column("loss_reduction", String(8), nullable=False),
    Column("layers", Text, nullable=False),  # JSON list of layer names
    Column("n_examples", BigInteger, nullable=False),
    Column("n_steps", BigInteger, nullable=False),
    Column("n_samples", BigInteger, nullable=False),  # sample-steps
    Column("folded_through", BigInteger, nullable=False),  # steps with seq <= this are in qa_base
    Column("folded_samples", BigInteger, nullable=False),
    Column("folded_excluded", Text, nullable=False),  # JSON list [L]: non-finite contributions folded
    Column("assigned_seq", BigInteger, nullable=False),  # last entry that added examples (cache check)
    Column("leaf_hash", LargeBinary, nullable=False),  # the run entry's leaf hash (cache key)
    Index("ix_qa_runs_run", "run"),
)

examples = Table(  # one row per entry that met new examples: ids[k] has index first_idx + k
    "qa_examples",
    _md,
    Column("run_seq", _Key, primary_key=True, autoincrement=False),
    Column("first_idx", Integer, primary_key=True, autoincrement=False),
    Column("n", Integer, nullable=False),
    Column("ids", Text, nullable=False),  # JSON list of example ids
)

steps = Table(
    "qa_steps",
    _md,
    Column("run_seq", _Key, primary_key=True, autoincrement=False),
    Column("seq", _Key, primary_key=True, autoincrement=False),
    Column("epoch", Integer, nullable=False),
    Column("step", Integer, nullable=False),
    Column("idx", LargeBinary, nullable=False),  # <i4 [B] example indices
    Column("norms", LargeBinary, nullable=False),  # <f4 [L, B] grad norms, layer-major
    Column("wtab", LargeBinary, nullable=False),  # <f4 [R, L] distinct routing-weight rows
    Column("wrow", LargeBinary, nullable=False),  # [B] row of wtab per sample: <u1 if <= 256 rows, else <i4
    Column("scale", LargeBinary, nullable=False),  # <f8 [B] c_i / d_i, or one value when all equal
    Column("lr", LargeBinary, nullable=False),  # <f8 [L] (NaN: no learning rate)
    Index("ix_qa_steps_epoch", "run_seq", "epoch", "seq"),
)

base = Table(
    "qa_base",
    _md,
    Column("run_seq", _Key, primary_key=True, autoincrement=False),
    Column("metric", String(16), primary_key=True),
    Column("layer", Integer, primary_key=True, autoincrement=False),
    Column("data", LargeBinary, nullable=False),  # <f8 [n_examples at the last fold]
)


# ----- the arithmetic (one definition, used by folds, queries and label profiles) -----------------------


@dataclass
class StepData:
    """One ``qa_steps`` row decoded for some layers (``norms``/``weights``/``lr`` rows = those layers)."""

    seq: int
    epoch: int
    step: int
    idx: np.ndarray  # [B] int
    norms: np.ndarray  # [n_sel, B] float32
    weights: np.ndarray  # [n_sel, B] float32
    scale: np.ndarray  # [B] float64
    lr: np.ndarray  # [n_sel] float64


def contributions_of(
    lr: np.ndarray, w: np.ndarray, n: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(update, self_influence, finite mask) elementwise in float64; non-finite entries set to 0.

    ``update = ((lr * w) * n) * scale`` and ``self_influence = lr * (n * n)``, evaluated in exactly this order
    everywhere (folds, queries, label profiles), so the same inputs always give the same bits.
    """
    n64 = n.astype(np.float64)
    upd = lr * w.astype(np.float64) * n64 * scale
    sin = lr * (n64 * n64)
    ok = np.isfinite(upd) & np.isfinite(sin)
    if not ok.all():
        upd = np.where(ok, upd, 0.0)
        sin = np.where(ok, sin, 0.0)
    return upd, sin, ok


def contributions(sd: StepData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(update, self_influence, finite mask) of one decoded step, each [n_sel, B]."""
    return contributions_of(sd.lr[:, None], sd.weights, sd.norms, sd.scale[None, :])


def _wrow(blob: bytes, b: int) -> np.ndarray:
    return np.frombuffer(blob, "<u1" if len(blob) == b else "<i4")


def _scale(blob: bytes, b: int) -> np.ndarray:
    s = np.frombuffer(blob, "<f8")
    return np.full(b, s[0]) if s.size == 1 else s


def _parts(row: Any, n_layers: int, sel: Sequence[int]) -> tuple[Any, ...]:
    seq, epoch, step, idx_b, norms_b, wtab_b, wrow_b, scale_b, lr_b = row
    idx = np.frombuffer(idx_b, "<i4")
    b = idx.size
    norms = np.frombuffer(norms_b, "<f4").reshape(-1, b)
    if norms.shape[0] != len(sel):  # the whole f4[L, B] blob (not sliced in SQL)
        norms = norms[list(sel)]
    wtab = np.frombuffer(wtab_b, "<f4").reshape(-1, n_layers)[:, list(sel)]
    lr = np.frombuffer(lr_b, "<f8")[list(sel)]
    return int(seq), int(epoch), int(step), idx, norms, wtab, _wrow(wrow_b, b), _scale(scale_b, b), lr


def decode_step(row: Any, n_layers: int, sel: Sequence[int] | None = None) -> StepData:
    """Decode a (seq, epoch, step, idx, norms, wtab, wrow, scale, lr) row for the layers ``sel`` (default all).

    ``norms`` may be the whole ``f4[L, B]`` blob or, when the query sliced it in SQL, only the rows of ``sel``.
    """
    sel = list(range(n_layers)) if sel is None else list(sel)
    seq, epoch, step, idx, norms, wtab, wrow, scale, lr = _parts(row, n_layers, sel)
    return StepData(seq, epoch, step, idx, norms, wtab[wrow].T, scale, lr)


STEP_COLUMNS = (
    steps.c.seq,
    steps.c.epoch,
    steps.c.step,
    steps.c.idx,
    steps.c.norms,
    steps.c.wtab,
    steps.c.wrow,
    steps.c.scale,
    steps.c.lr,
)


@dataclass
class Sums:
    """Per-example sums for some layers: arrays [len(layers), N] (count: [N]); excluded: [len(layers)]."""

    update: np.ndarray
    self_influence: np.ndarray
    weight: np.ndarray
    count: np.ndarray
    excluded: np.ndarray
    samples: int

    def metric(self, name: str) -> np.ndarray:
        return {"update": self.update, "self_influence": self.self_influence, "weight": self.weight}[name]


def sum_rows(rows: Iterable[Any], n_examples: int, n_layers: int, sel: Sequence[int]) -> Sums:
    """Per-example sums of the layers ``sel`` over raw ``qa_steps`` rows (in the given order).

    ``norms`` in the rows may be whole ``f4[L, B]`` blobs or already the ``sel`` rows. Vectorised over all the
    rows' sample-steps at once (per-row Python work is only collecting bytes), then
    one ``bincount`` per layer and metric, which accumulates in input order: the same rows in the same order
    always give the same bits.
    """
    sel = list(sel)
    n_sel = len(sel)
    out = Sums(
        np.zeros((n_sel, n_examples)),
        np.zeros((n_sel, n_examples)),
        np.zeros((n_sel, n_examples)),
        np.zeros(n_examples),
        np.zeros(n_sel, dtype=np.int64),
        0,
    )
    rows = list(rows)
    if not rows:
        return out
    # Column-wise: join each column's bytes once instead of decoding row by row (7,800 rows in ~50 ms).
    idx_b = [r[3] for r in rows]
    size = np.fromiter((len(x) // 4 for x in idx_b), np.int64, len(rows))
    idx = np.frombuffer(b"".join(idx_b), "<i4")
    total = idx.size
    out.samples = int(total)
    out.count = np.bincount(idx, minlength=n_examples).astype(np.float64)
    norm_b = [r[4] for r in rows]
    if all(len(x) == 4 * n * n_sel for x, n in zip(norm_b, size.tolist(), strict=True)):
        # already the selected layers (sliced in SQL when n_sel == 1); rows are [n_sel, B] per step
        norm_all = (
            np.frombuffer(b"".join(norm_b), "<f4")[None, :]
            if n_sel == 1
            else np.concatenate(
                [
                    np.frombuffer(x, "<f4").reshape(n_sel, n)
                    for x, n in zip(norm_b, size.tolist(), strict=True)
                ],
                axis=1,
            )
        )
    else:
        norm_all = np.concatenate(
            [np.frombuffer(x, "<f4").reshape(-1, n)[sel] for x, n in zip(norm_b, size.tolist(), strict=True)],
            axis=1,
        )
    wtab_b = [r[5] for r in rows]
    nrows = np.fromiter((len(x) // (4 * n_layers) for x in wtab_b), np.int64, len(rows))
    wtab_all = np.frombuffer(b"".join(wtab_b), "<f4").reshape(-1, n_layers)[:, sel]  # [ΣR, n_sel]
    wrow_b = [r[6] for r in rows]
    if all(len(x) == n for x, n in zip(wrow_b, size.tolist(), strict=True)):
        wrow = np.frombuffer(b"".join(wrow_b), "<u1").astype(np.int64)
    else:
        wrow = np.concatenate([_wrow(x, n) for x, n in zip(wrow_b, size.tolist(), strict=True)]).astype(
            np.int64
        )
    wrow_all = wrow + np.repeat(np.cumsum(nrows) - nrows, size)
    scale_b = [r[7] for r in rows]
    if all(len(x) == 8 for x in scale_b):
        scale_all = np.repeat(np.frombuffer(b"".join(scale_b), "<f8"), size)
    else:
        scale_all = np.concatenate([_scale(x, n) for x, n in zip(scale_b, size.tolist(), strict=True)])
    lr_all = np.frombuffer(b"".join(r[8] for r in rows), "<f8").reshape(-1, n_layers)[
        :, sel
    ]  # [steps, n_sel]
    for j in range(n_sel):
        w = wtab_all[wrow_all, j]
        upd, sin, ok = contributions_of(np.repeat(lr_all[:, j], size), w, norm_all[j], scale_all)
        out.update[j] = np.bincount(idx, upd, n_examples)
        out.self_influence[j] = np.bincount(idx, sin, n_examples)
        out.weight[j] = np.bincount(idx, w.astype(np.float64), n_examples)
        out.excluded[j] = int(ok.size - np.count_nonzero(ok))
    return out


def _distinct_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct rows in first-seen order, row index per sample): routing weights take few distinct rows."""
    w = np.ascontiguousarray(w, dtype="<f4")
    width = 4 * w.shape[1]
    if width and w.shape[0]:
        # Rows compared as bytes (what the void view below compares) through a dict, whose insertion order is
        # first-seen order: ~10x cheaper than np.unique's sort of void records at B=256.
        raw = w.tobytes()
        seen: dict[bytes, int] = {}
        rank_l = [seen.setdefault(raw[i : i + width], len(seen)) for i in range(0, len(raw), width)]
        return np.frombuffer(b"".join(seen), "<f4").reshape(-1, w.shape[1]), np.array(rank_l, dtype=np.intp)
    v = w.view(np.dtype((np.void, w.dtype.itemsize * w.shape[1]))).ravel()
    _, first, inv = np.unique(v, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return w[first[order]], rank[inv.reshape(-1)]


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    return a if a.size == n else np.concatenate([a, np.zeros(n - a.size)])


@dataclass
class _IdCache:
    ids: dict[str, int]
    n: int  # -1: not trusted across calls
    assigned_seq: int
    assigned_leaf: bytes | None  # leaf hash of the entry at assigned_seq (None: no examples yet)


_ID_CACHE: dict[bytes, _IdCache] = {}
_ID_CACHE_RUNS = 4


@dataclass
class _TableCache:
    """A run's example table (step v 3) as read from the ledger's entries up to the step entry ``through``."""

    table: RunTable
    through: int  # seq of the last step of the run read into ``table`` (-1: none)
    leaf: bytes | None  # its leaf hash


_TABLE_CACHE: dict[bytes, _TableCache] = {}  # run entry's leaf hash -> its example table
_RUN_STEPS: dict[bytes, RunSteps | None] = {}  # run entry's leaf hash -> layers / weight table (immutable)


_V = TypeVar("_V")


def _remember(cache: dict[bytes, _V], key: bytes, value: _V, cap: int) -> None:
    """Put ``key`` in a small in-process cache as its newest item, first evicting the oldest beyond ``cap``."""
    cache.pop(key, None)
    while len(cache) >= cap:
        cache.pop(next(iter(cache)))
    cache[key] = value


# ----- the indexer --------------------------------------------------------------------------------------


@dataclass
class _Run:
    run_seq: int
    layers: list[str]
    loss_reduction: str
    n_examples: int
    n_steps: int
    n_samples: int
    folded_through: int
    folded_samples: int
    assigned_seq: int
    leaf_hash: bytes
    dirty: bool = False
    ids_checked: bool = False  # the id cache was validated against this transaction's tables
    table_checked: bool = False  # the example-table cache was validated against this transaction's entries


class QueryAggregates:
    """Implements ``ledger.indexers.Indexer`` for the ``query`` commands (see the module docstring)."""

    def __init__(self) -> None:
        self.name = NAME
        self.kinds = frozenset({"run", "step"})
        self.tables: Sequence[Table] = (runs, examples, steps, base)
        self.float_rtol = 0.0  # rebuilds repeat the same float operations in the same order: bit-exact

    def apply(self, conn: Connection, entries: Sequence[Any]) -> None:
        cache: dict[int, _Run] = {}
        pending: list[tuple[Any, ...]] = []
        for e in entries:
            if e.kind == "run":
                self._add_run(conn, e, cache)
            elif e.kind == "step":
                self._add_step(conn, e, cache, pending)
        self._flush(conn, cache, pending)

    # -- run entries -----------------------------------------------------------------------------------
    def _add_run(self, conn: Connection, e: Any, cache: dict[int, _Run]) -> None:
        b = e.body
        try:
            layers = [str(layer["name"]) for layer in b["architecture"]["layers"]]
            name = str(b["run"])
        except (KeyError, TypeError):
            return
        red = b.get("loss_reduction") if b.get("loss_reduction") in ("mean", "sum") else "mean"
        conn.execute(
            runs.insert(),
            [
                {
                    "run_seq": e.seq,
                    "run": name,
                    "manifest_seq": _int_or_none(b.get("manifest_seq")),
                    "policy_seq": _int_or_none(b.get("policy_seq")),
                    "loss_reduction": red,
                    "layers": json.dumps(layers),
                    "n_examples": 0,
                    "n_steps": 0,
                    "n_samples": 0,
                    "folded_through": -1,
                    "folded_samples": 0,
                    "folded_excluded": json.dumps([0] * len(layers)),
                    "assigned_seq": -1,
                    "leaf_hash": e.leaf_hash,
                }
            ],
        )
        cache[e.seq] = _Run(e.seq, layers, red, 0, 0, 0, -1, 0, -1, e.leaf_hash)

    def _run(self, conn: Connection, run_seq: int, cache: dict[int, _Run]) -> _Run | None:
        r = cache.get(run_seq)
        if r is None:
            if conn.dialect.name == "sqlite":  # once per append transaction, where SQLAlchemy's statement
                # machinery cost 0.1-0.8 ms of CPU in a training loop (BENCHMARKS.md, "Training tracker")
                row = _sqlite(conn).execute(_SQLITE_SELECT_RUN, (run_seq,)).fetchone()
            else:
                row = conn.execute(
                    select(*(runs.c[name] for name in _RUN_FIELDS)).where(runs.c.run_seq == run_seq)
                ).first()
            if row is None:
                return None
            n_ex, n_st, n_sa, f_th, f_sa, a_seq = (int(x) for x in row[2:8])
            r = cache[run_seq] = _Run(
                run_seq, json.loads(row[0]), row[1], n_ex, n_st, n_sa, f_th, f_sa, a_seq, bytes(row[8])
            )
        return r

    # -- step entries ----------------------------------------------------------------------------------
    def _add_step(
        self, conn: Connection, e: Any, cache: dict[int, _Run], pending: list[tuple[Any, ...]]
    ) -> None:
        r: _Run | None = None
        via_table: tuple[list[str], np.ndarray | None, RunSteps] | None = None
        if (
            "example_ids" not in e.body
        ):  # step v 3: ids through the run's example table, which every step extends
            run_seq = e.body.get("run_seq")
            r = self._run(conn, run_seq, cache) if type(run_seq) is int else None
            if r is None:
                return
            run_steps = _run_steps(conn, r)
            try:
                ids, rule_ids = self._table(conn, r, e.seq).read(e.seq, e.body, e.payloads)
            except ValueError:
                return
            finally:
                t = _TABLE_CACHE.get(r.leaf_hash)
                if t is not None:
                    t.through, t.leaf = e.seq, e.leaf_hash
            if run_steps is None:
                return
            via_table = (ids, rule_ids, run_steps)
        parsed = _parse_step(e, via_table)
        if parsed is None:
            return
        run_seq, ids, layer_names, norms, (wtab, wrow), scale_clip, lr, mb, epoch, step = parsed
        r = r or self._run(conn, run_seq, cache)
        if r is None or layer_names != r.layers:
            return
        b = len(ids)
        # d_i: the size of sample i's micro-batch under a mean-reduced loss, 1 under sum
        d = np.repeat(np.asarray(mb, dtype=np.float64), mb) if r.loss_reduction == "mean" else np.ones(b)
        scale = scale_clip / d
        idx = self._indices(conn, r, ids, e.seq, e.leaf_hash)
        pending.append(
            (
                run_seq,
                e.seq,
                epoch,
                step,
                idx.astype("<i4").tobytes(),
                np.ascontiguousarray(norms.T, dtype="<f4").tobytes(),
                np.ascontiguousarray(wtab, dtype="<f4").tobytes(),
                wrow.astype("<u1" if wtab.shape[0] <= 256 else "<i4").tobytes(),
                (scale[:1] if (scale == scale[0]).all() else scale).astype("<f8").tobytes(),
                lr.astype("<f8").tobytes(),
            )
        )
        r.n_steps += 1
        r.n_samples += b
        r.dirty = True
        if r.n_samples - r.folded_samples >= max(FOLD_MIN_SAMPLES, FOLD_EPOCHS * r.n_examples):
            self._flush(conn, cache, pending)
            self._fold(conn, r, e.seq)

    def _table(self, conn: Connection, r: _Run, seq: int) -> RunTable:
        """The run's example table as the entries before ``seq`` define it (step v 3).

        Cached in-process per run (rebuilding it reads every earlier step of the run). The cache is trusted while
        it ends before ``seq`` and, checked once per ``apply``, the entry it ends at still has the leaf hash it
        saw (which commits to every earlier entry); steps appended since by others are read in. Otherwise (a
        rolled-back append, a rebuild from the start) the table is read again from the run's steps."""
        c = _TABLE_CACHE.get(r.leaf_hash)
        if c is not None and (
            c.through >= seq or (not r.table_checked and _leaf_at(conn, c.through) != c.leaf)
        ):
            c = None
        if c is None:
            c = _TableCache(RunTable(), -1, None)
            _remember(_TABLE_CACHE, r.leaf_hash, c, _ID_CACHE_RUNS)
            _read_steps(conn, r.run_seq, c, r.run_seq, seq)
        elif not r.table_checked:
            _read_steps(conn, r.run_seq, c, c.through, seq)
        r.table_checked = True
        return c.table

    def _indices(self, conn: Connection, r: _Run, ids: list[str], seq: int, leaf: bytes) -> np.ndarray:
        """Dense per-run example indices, assigned in first-seen order (new ids are inserted now).

        The id -> index map of a run is cached in-process (a lookup of B ids costs ~10 ms through the database
        at B=256). The cache is keyed by the run entry's leaf hash and trusted only while the stored
        (n_examples, assigned_seq) equal the cached ones and, checked once per ``apply``, the entry at
        ``assigned_seq`` still has the leaf hash the cache saw (that hash commits to every earlier entry, so an
        append that was rolled back and replaced by another writer's entry at the same seq cannot pass). Any
        mismatch (another writer's additions, a rolled-back append) reloads it from ``qa_examples`` once.
        """
        key = r.leaf_hash
        c = _ID_CACHE.get(key)
        if (
            c is None
            or (c.n, c.assigned_seq) != (r.n_examples, r.assigned_seq)
            or (not r.ids_checked and c.assigned_leaf != _leaf_at(conn, r.assigned_seq))
        ):
            c = _IdCache(
                {x: i for i, x in enumerate(load_ids(conn, r.run_seq))},
                r.n_examples,
                r.assigned_seq,
                _leaf_at(conn, r.assigned_seq),
            )
            if len(c.ids) != r.n_examples:  # a damaged table: do not cache it
                c = _IdCache(c.ids, -1, -1, None)
            else:
                _remember(_ID_CACHE, key, c, _ID_CACHE_RUNS)
        r.ids_checked = True
        known = c.ids
        found = list(map(known.get, ids))
        idx: np.ndarray | None = None
        if None in found:  # first sight of some ids: number them in first-seen order (a repeated new id once)
            first = r.n_examples
            fresh = (
                ids
                if found.count(None) == len(ids)
                else [x for x, i in zip(ids, found, strict=True) if i is None]
            )
            new = list(dict.fromkeys(fresh))
            known.update(zip(new, range(first, first + len(new)), strict=True))
            r.n_examples = first + len(new)
            if len(new) == len(ids):  # all new and distinct (a first epoch): indices first, first + 1, ...
                idx = np.arange(first, r.n_examples, dtype=np.int64)
            else:
                found = list(map(known.get, ids))
            row = (r.run_seq, first, len(new), json.dumps(new))
            if conn.dialect.name == "sqlite":
                _sqlite(conn).execute(_SQLITE_INSERT_EXAMPLES, row)
            else:
                conn.execute(
                    examples.insert(), [dict(zip(("run_seq", "first_idx", "n", "ids"), row, strict=True))]
                )
            r.assigned_seq = seq
            r.dirty = True
            if c.n >= 0:
                c.assigned_leaf = leaf
        if c.n >= 0:
            c.n, c.assigned_seq = r.n_examples, r.assigned_seq
        return idx if idx is not None else np.array(found, dtype=np.int64)

    def _flush(self, conn: Connection, cache: dict[int, _Run], pending: list[tuple[Any, ...]]) -> None:
        sqlite = conn.dialect.name == "sqlite"
        if pending:
            if (
                sqlite
            ):  # straight to the driver, as the store's own inserts (SQLAlchemy's per-row cost dominated)
                _sqlite(conn).executemany(_SQLITE_INSERT_STEPS, pending)
            else:
                conn.execute(steps.insert(), [dict(zip(_STEP_FIELDS, p, strict=True)) for p in pending])
            pending.clear()
        for r in cache.values():
            if r.dirty:
                vals = (r.n_examples, r.n_steps, r.n_samples, r.assigned_seq)
                if sqlite:
                    _sqlite(conn).execute(_SQLITE_UPDATE_RUN, (*vals, r.run_seq))
                else:
                    conn.execute(
                        update(runs)
                        .where(runs.c.run_seq == r.run_seq)
                        .values(
                            dict(
                                zip(("n_examples", "n_steps", "n_samples", "assigned_seq"), vals, strict=True)
                            )
                        )
                    )
                r.dirty = False

    def _fold(self, conn: Connection, r: _Run, through: int) -> None:
        """Add every unfolded step of the run (seq <= ``through``) into ``qa_base``."""
        n_l = len(r.layers)
        q = (
            select(*STEP_COLUMNS)
            .where(steps.c.run_seq == r.run_seq, steps.c.seq > r.folded_through, steps.c.seq <= through)
            .order_by(steps.c.seq)
        )
        sums = sum_rows(conn.execute(q), r.n_examples, n_l, range(n_l))
        old = {
            (m, int(layer)): np.frombuffer(data, "<f8")
            for m, layer, data in conn.execute(
                select(base.c.metric, base.c.layer, base.c.data).where(base.c.run_seq == r.run_seq)
            )
        }
        rows = []
        for m in METRICS:
            arr = sums.metric(m)
            for j in range(n_l):
                rows.append((m, j, arr[j]))
        rows.append(("count", COUNT_LAYER, sums.count))
        conn.execute(base.delete().where(base.c.run_seq == r.run_seq))
        conn.execute(
            base.insert(),
            [
                {
                    "run_seq": r.run_seq,
                    "metric": m,
                    "layer": j,
                    "data": (_pad(old[(m, j)], r.n_examples) + a if (m, j) in old else a)
                    .astype("<f8")
                    .tobytes(),
                }
                for m, j, a in rows
            ],
        )
        prev = json.loads(
            conn.execute(select(runs.c.folded_excluded).where(runs.c.run_seq == r.run_seq)).scalar_one()
        )
        excluded = [int(a) + int(b) for a, b in zip(prev, sums.excluded.tolist(), strict=True)]
        r.folded_through = through
        r.folded_samples = r.n_samples
        conn.execute(
            update(runs)
            .where(runs.c.run_seq == r.run_seq)
            .values(folded_through=through, folded_samples=r.n_samples, folded_excluded=json.dumps(excluded))
        )


_STEP_FIELDS = ("run_seq", "seq", "epoch", "step", "idx", "norms", "wtab", "wrow", "scale", "lr")
_SQLITE_INSERT_STEPS = f"INSERT INTO qa_steps ({', '.join(_STEP_FIELDS)}) VALUES ({', '.join('?' * 10)})"
_SQLITE_INSERT_EXAMPLES = "INSERT INTO qa_examples (run_seq, first_idx, n, ids) VALUES (?, ?, ?, ?)"
_RUN_FIELDS = (
    "layers", "loss_reduction", "n_examples", "n_steps", "n_samples", "folded_through", "folded_samples",
    "assigned_seq", "leaf_hash",
)  # fmt: skip
_SQLITE_SELECT_RUN = f"SELECT {', '.join(_RUN_FIELDS)} FROM qa_runs WHERE run_seq = ?"
_SQLITE_UPDATE_RUN = (
    "UPDATE qa_runs SET n_examples = ?, n_steps = ?, n_samples = ?, assigned_seq = ? WHERE run_seq = ?"
)


def _sqlite(conn: Connection) -> sqlite3.Connection:
    """The raw ``sqlite3`` connection under ``conn`` (same open transaction), as ``ledger.store`` uses it."""
    raw = conn.connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)
    return raw


def _leaf_at(conn: Connection, seq: int) -> bytes | None:
    """The leaf hash of entry ``seq`` as this transaction sees it (None for seq < 0 or a missing entry)."""
    if seq < 0:
        return None
    if conn.dialect.name == "sqlite":
        row = _sqlite(conn).execute("SELECT leaf_hash FROM entries WHERE seq = ?", (seq,)).fetchone()
    else:
        e = ledger_schema.entries
        row = conn.execute(select(e.c.leaf_hash).where(e.c.seq == seq)).first()
    return None if row is None else bytes(row[0])


def load_ids(conn: Connection, run_seq: int) -> list[str]:
    """Every example id of the run, in index order."""
    out: list[str] = []
    q = select(examples.c.first_idx, examples.c.ids).where(examples.c.run_seq == run_seq)
    for first, ids in conn.execute(q.order_by(examples.c.first_idx)):
        if first != len(out):
            break  # a gap: a damaged table (verify --deep reports it); stop at what is contiguous
        out.extend(json.loads(ids))
    return out


def ids_at(conn: Connection, run_seq: int, idx: Iterable[int]) -> dict[int, str]:
    """The example ids of a few indices (one indexed lookup each)."""
    out: dict[int, str] = {}
    for i in idx:
        q = (
            select(examples.c.first_idx, examples.c.ids)
            .where(examples.c.run_seq == run_seq, examples.c.first_idx <= int(i))
            .order_by(examples.c.first_idx.desc())
            .limit(1)
        )
        row = conn.execute(q).first()
        if row is not None:
            ids = json.loads(row[1])
            k = int(i) - int(row[0])
            if 0 <= k < len(ids):
                out[int(i)] = str(ids[k])
    return out


def _int_or_none(x: Any) -> int | None:
    return int(x) if isinstance(x, int) and not isinstance(x, bool) else None


def _parse_step(
    e: Any, via_table: tuple[list[str], np.ndarray | None, RunSteps] | None
) -> tuple[Any, ...] | None:
    """The fields a tracker step carries, or None for a step entry that is not one (skipped). ``via_table``:
    a v 3 step's (ids, rule ids) read through its run's example table, and what it takes from its run entry."""
    b = e.body
    rule_ids: np.ndarray | None = None
    run_table: np.ndarray | None = None
    try:
        run_seq = b["run_seq"]
        if via_table is None:
            ids = b["example_ids"]
            layers = b["layers"]
        else:
            ids, rule_ids, run = via_table
            layers = b.get("layers", run.layers)
            run_table = run.weight_table
        lr_raw = b["lr"]
        epoch = b["epoch"]
        step = b["step"]
        mb = b.get("micro_batches") or [len(ids)]
    except (KeyError, TypeError):
        return None
    if not (isinstance(run_seq, int) and isinstance(ids, list) and isinstance(layers, list)):
        return None
    if via_table is not None and not isinstance(lr_raw, list):  # v 3: one learning rate for every layer
        lr_raw = [lr_raw] * len(layers)
    if not (isinstance(epoch, int) and isinstance(step, int) and isinstance(lr_raw, list)):
        return None
    pl = e.payloads
    norms = pl.get("grad_norms")
    b_, n_l = len(ids), len(layers)
    if norms is None or norms.shape != (b_, n_l):
        return None
    rows = b.get("weight_rows")
    one_row = rows if isinstance(rows, list) else None
    if via_table is not None and rows is None and run_table is not None and len(run_table) == 1:
        one_row = run_table.tolist()  # v 3: the run's single row (no policy)
    distinct: tuple[np.ndarray, np.ndarray]
    if (
        "weights" not in pl
        and "weight_index" not in pl
        and "rule_rows" not in b
        and one_row
        and len(one_row) == 1
    ):
        # one routing-weight row for the whole batch (v2 compact form, what ``step_weights`` would repeat B
        # times): that row is the distinct table and every sample uses row 0, as ``_distinct_rows`` finds
        try:
            table = np.array(one_row, dtype=np.float32)
        except (TypeError, ValueError):
            return None
        if table.ndim != 2 or table.shape[1] != n_l:
            return None
        distinct = (table, np.zeros(b_, dtype=np.intp))
    else:
        # v1 payload, v2 compact rows with an index, v3 rows by rule or the run's table
        weights = step_weights(b, pl, rule_ids, b=b_, n_layers=n_l, run_table=run_table)
        if weights is None or weights.shape != (b_, n_l):
            return None
        distinct = _distinct_rows(weights)
    if b_ == 0 or len(lr_raw) != n_l or sum(mb) != b_ or any(not isinstance(x, int) or x <= 0 for x in mb):
        return None
    clip = pl.get("clip")
    if clip is not None and clip.shape != (b_,):
        return None
    lr = np.array(
        [np.nan if not isinstance(x, int | float) or isinstance(x, bool) else x for x in lr_raw], float
    )
    scale = np.ones(b_) if clip is None else clip.astype(np.float64)
    return (
        run_seq,
        list(map(str, ids)),
        list(map(str, layers)),
        norms,
        distinct,
        scale,
        lr,
        mb,
        epoch,
        step,
    )


def _run_steps(conn: Connection, r: _Run) -> RunSteps | None:
    """Layers and weight table of the run entry (cached by its leaf hash: an entry never changes)."""
    if r.leaf_hash not in _RUN_STEPS:
        e = ledger_schema.entries
        row = conn.execute(select(e.c.kind, e.c.body).where(e.c.seq == r.run_seq)).first()
        found = None
        if row is not None and row[0] == "run":
            found = RunSteps.from_body(json.loads(bytes(row[1])))
        _remember(_RUN_STEPS, r.leaf_hash, found, 64)
    return _RUN_STEPS[r.leaf_hash]


def _read_steps(conn: Connection, run_seq: int, c: _TableCache, after: int, before: int) -> None:
    """Read the run's step entries with ``after < seq < before`` into the cached example table, in seq order
    (bodies only: the table is in them, so archived payloads do not matter)."""
    e = ledger_schema.entries
    lo = after
    while lo < before - 1:
        q = (
            select(e.c.seq, e.c.body, e.c.leaf_hash)
            .where(e.c.kind == "step", e.c.seq > lo, e.c.seq < before)
            .order_by(e.c.seq)
            .limit(_READ_CHUNK)
        )
        rows = conn.execute(q).all()
        if not rows:
            return
        for seq, raw, leaf in rows:
            body = json.loads(bytes(raw))
            if body.get("run_seq") != run_seq or "example_ids" in body:
                continue
            with contextlib.suppress(
                ValueError
            ):  # a malformed step: the table is unchanged, as in every reader
                c.table.extend(int(seq), body)
            c.through, c.leaf = int(seq), bytes(leaf)
        lo = int(rows[-1][0])


_READ_CHUNK = 2000


INDEXER = indexers.register(QueryAggregates())
