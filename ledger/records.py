"""Typed, read-only views of the entries the training tracker writes: ``run``, ``step`` and ``checkpoint``.

Readers go through these instead of raw bodies so a field rename is one edit here. ``iter_steps`` streams:
one entry is decoded at a time, so a run of any length reads in constant memory (plus the run's example table,
one id per example).

Step entry (kind ``step``, v 3; v 1 and v 2 are still read), written by ``instrument.tracker``:

* body: ``run``, ``run_seq`` (seq of the ``run`` entry), ``step`` (0-based index of the tracked optimizer step),
  ``epoch``, ``micro_batches`` (sizes of the ``tracker.batch`` contexts the step covers, in order), ``lr``
  (learning rate of each layer's param group at the step, null for a layer not in the optimizer: a list [L];
  v 3 writes one value when every layer has the same), ``update_norms`` [L] (``||θ_after - θ_before||`` per
  layer, null when disabled), ``policy_seq`` (or null), ``flags`` (``{"nan_loss": [row, ...],
  "nonfinite_grad_norm": [row, ...]}``, only the non-empty ones), and when DP is on ``dp``: ``{"eps",
  "eps_step", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "accountant"}``; ``layers`` [L]
  (qualified module names; v 3: only when they differ from the ``run`` entry's). v 3 leaves out ``flags`` when
  empty, ``micro_batches`` when it is [B] and ``policy_seq`` when null (what readers assume when absent).
* example ids. v 1/2: ``example_ids`` [B] (strings). v 3: through the run's **example table**, which lists
  each example id once, in the order the run first met it: it is the concatenation, in ledger order, of the
  ``new_ids`` of the run's step entries (same ``run_seq``). A step that meets new examples carries ``new_ids``
  (those ids, first-seen order) and ``first_index`` (the table's length before them, so a reader that missed a
  step of the run finds out); payload ``example_index`` [B] gives each row's index in the table (this step's
  ``new_ids`` included), as <u1, <u2, <u1 [B, 3] (24-bit little-endian) or <u4, the narrowest for the
  table's length, and is left out when the rows are exactly the step's new examples in order (a first
  epoch). An id is thus stored once per run (~13 bytes) plus 1-4 bytes per sample-step, instead of ~13 bytes
  per sample-step. (A v 3 body may also give ``example_ids`` inline, as v 2; readers accept both.)
* payloads: ``grad_norms`` <f4 [B, L] (each sample's own, unrouted gradient norm, Opacus scaling), ``losses``
  <f4 [B] (when a criterion is attached), ``margins`` <f4 [B] (classification criteria: logit of the assigned
  label minus the largest other logit), ``rules`` <i1/<i2/<i4 [B] (index of the policy rule each example matched,
  -1 = the policy default; with a policy; the narrowest type that holds the policy's rule indices), ``clip`` <f4
  [B] (DP clipping factors). v 3: the example table also holds each example's rule: ``new_rules`` (one per
  new id: the rule of its first row in that step) beside ``new_ids``; ``rules`` is written only when a row's
  rule differs from its example's, and a step without it reads its rows' rules from the table (the tracker
  routes each id once, so its steps carry none). The table is in the bodies alone: archived payloads do not
  hide it.
* routing weights [B, L]. v 1: payload ``weights`` <f4 [B, L]. v 2: body ``weight_rows`` = the step's distinct
  weight rows (lists of L numbers, sorted; float32 values, exact through JSON) and payload ``weight_index``
  <u1 (<u2, <u4 for more rows) [B] = each sample's row, omitted when there is one row: ``weights =
  float32(weight_rows)[weight_index]``. v 3: a step without ``weight_rows`` applied the ``run`` entry's
  ``weight_table`` (the policy bound to the layers: row r = rule r, last row = the default rule -1; one row of
  ones without a policy) by each row's rule; otherwise it has ``weight_rows`` with ``weight_index``, or with
  ``rule_rows`` ([[rule, row], ...]) when its weights are a function of its rows' rules.

Reading a v 3 step needs the run's earlier steps (the example table) and the run entry (layers, weight
table): :class:`StepReader` decodes step entries fed in ledger order; ``StepRecord.from_entry`` reads v 1/2
entries on their own. :class:`StepEncoder` is the writer's side: it turns a step's full (v 2 shaped) body and
payloads into v 3.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

STEP_VERSION = 3


def encode_weights(weights: np.ndarray) -> tuple[list[list[float]], np.ndarray | None]:
    """[B, L] float32 routing weights -> (``weight_rows``, ``weight_index`` or None for a single row)."""
    w = np.ascontiguousarray(weights, dtype=np.float32)
    rows, index = np.unique(w, axis=0, return_inverse=True)
    n = len(rows)
    table = [[float(x) for x in r] for r in rows]
    if n == 1:
        return table, None
    dtype = "<u1" if n <= 1 << 8 else "<u2" if n <= 1 << 16 else "<u4"
    return table, np.asarray(index, dtype=dtype).reshape(-1)


def step_weights(
    body: dict[str, Any],
    payloads: dict[str, Any],
    rule_ids: np.ndarray | None = None,
    *,
    b: int | None = None,
    n_layers: int | None = None,
    run_table: np.ndarray | None = None,
) -> np.ndarray | None:
    """The step's [B, L] float32 routing weights from any encoding; None when absent or malformed.

    ``b`` / ``n_layers`` default to the lengths of the body's ``example_ids`` / ``layers`` (v 1/2). A v 3 step
    read through its run passes them, its rows' ``rule_ids`` and the run's ``weight_table`` (``run_table``)."""
    if "weights" in payloads:  # v 1
        return np.asarray(payloads["weights"])
    if b is None:
        ids = body.get("example_ids")
        b = len(ids) if isinstance(ids, list) else None
    if n_layers is None:
        layers = body.get("layers")
        n_layers = len(layers) if isinstance(layers, list) else None
    if b is None or n_layers is None:
        return None
    if "weight_rows" not in body:  # v 3: the run's table, by rule
        return None if run_table is None else table_weights(run_table, rule_ids, b, n_layers)
    table = _rows(body["weight_rows"], n_layers)
    if table is None:
        return None
    if "rule_rows" in body:
        index = _rule_index(body["rule_rows"], rule_ids, len(table))
        return None if index is None or index.shape != (b,) else table[index]
    index = payloads.get("weight_index")
    if index is None:
        return None if len(table) != 1 else np.repeat(table, b, axis=0)
    index = np.asarray(index)
    if index.shape != (b,) or index.dtype.kind != "u" or (index.size and int(index.max()) >= len(table)):
        return None
    return table[index]


def _rows(rows: Any, n_layers: int) -> np.ndarray | None:
    """A non-empty list of weight rows -> float32 [R, n_layers]; None when it is not one."""
    if not isinstance(rows, list) or not rows:
        return None
    try:
        table = np.array(rows, dtype=np.float32)
    except (TypeError, ValueError):
        return None
    return table if table.ndim == 2 and table.shape[1] == n_layers else None


def table_weights(table: np.ndarray, rule_ids: np.ndarray | None, b: int, n_layers: int) -> np.ndarray | None:
    """Weights from a run's ``weight_table`` (row r = rule r, last row = rule -1); one row needs no rules."""
    n_rows = table.shape[0]
    if table.ndim != 2 or table.shape[1] != n_layers or n_rows == 0:
        return None
    if n_rows == 1 and rule_ids is None:
        return np.repeat(table, b, axis=0)
    if rule_ids is None or np.shape(rule_ids) != (b,):
        return None
    r = np.asarray(rule_ids, dtype=np.int64)
    if b and (int(r.min()) < -1 or int(r.max()) >= n_rows - 1):
        return None
    return table[np.where(r < 0, n_rows - 1, r)]


def _rule_index(pairs: Any, rule_ids: np.ndarray | None, n_rows: int) -> np.ndarray | None:
    """Each row's weight-row index through ``rule_rows``; None when a rule is unmapped or the map is bad."""
    if rule_ids is None or not isinstance(pairs, list):
        return None
    lookup: dict[int, int] = {}
    for p in pairs:
        if not (isinstance(p, list) and len(p) == 2 and all(type(x) is int for x in p)):
            return None
        if not 0 <= p[1] < n_rows or p[0] in lookup:
            return None
        lookup[p[0]] = p[1]
    try:
        return np.array([lookup[r] for r in np.asarray(rule_ids).tolist()], dtype=np.intp)
    except KeyError:
        return None


# ----- the run's example table (step v 3) -----------------------------------------------------------------


def _index_payload(index: np.ndarray, n: int) -> np.ndarray:
    """Table indices [B] in the narrowest of 1, 2, 3 (<u1 [B, 3], little-endian) or 4 bytes for a table of n."""
    if n <= 1 << 8:
        return index.astype("<u1")
    if n <= 1 << 16:
        return index.astype("<u2")
    if n <= 1 << 24:  # no numpy type has 3 bytes: the low three bytes of each <u4
        return np.ascontiguousarray(index.astype("<u4").view("<u1").reshape(-1, 4)[:, :3])
    return index.astype("<u4")


def decode_index(arr: Any) -> np.ndarray | None:
    """An ``example_index`` payload -> int64 [B]; None for a type or shape it cannot have."""
    a = np.asarray(arr)
    if a.dtype.kind != "u" or a.dtype.itemsize > 4:
        return None
    if a.ndim == 1:
        return a.astype(np.int64)
    if a.ndim == 2 and a.shape[1] == 3 and a.dtype.itemsize == 1:
        w = a.astype(np.int64)
        return w[:, 0] | (w[:, 1] << 8) | (w[:, 2] << 16)
    return None


class RunTable:
    """One run's example table as a reader rebuilds it from the run's step entries, fed in ledger order. The
    table comes from the bodies alone (``new_ids``, ``new_rules``), so archived payloads never hide it."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.rules: list[int | None] = []  # each example's rule when the run met it (None: the step had none)

    def extend(self, seq: int, body: dict[str, Any]) -> int:
        """Add the step's new examples; return the table's length before them. ValueError (naming ``seq``, table
        unchanged) when ``new_ids`` / ``new_rules`` / ``first_index`` are malformed or do not follow on."""
        new = body.get("new_ids", [])
        first = len(self.ids)
        if not isinstance(new, list) or not all(isinstance(x, str) for x in new):
            raise ValueError(f"step entry {seq}: new_ids must be a list of strings")
        rules = body.get("new_rules", [None] * len(new))
        if (
            not isinstance(rules, list)
            or len(rules) != len(new)
            or not all(type(r) is int for r in rules if r is not None)
        ):
            raise ValueError(f"step entry {seq}: new_rules must be a list of integers, one per new id")
        if new and body.get("first_index") != first:
            raise ValueError(
                f"step entry {seq}: its new examples start at table index {body.get('first_index')!r}, but the "
                f"run's earlier steps hold {first} examples (a step of the run is missing or out of order)"
            )
        self.ids.extend(new)
        self.rules.extend(rules)
        return first

    def read(
        self, seq: int, body: dict[str, Any], payloads: dict[str, Any]
    ) -> tuple[list[str], np.ndarray | None]:
        """The step's example ids and per-row rule ids (its ``rules`` payload, else the table's; None when a row
        has none), after adding the step's new examples to the table (:meth:`extend`, which happens even when
        the rows are malformed, so every reader holds the same table after a bad step). ValueError naming
        ``seq`` for a malformed step."""
        first = self.extend(seq, body)
        n = len(self.ids)
        raw = payloads.get("example_index")
        idx = np.arange(first, n, dtype=np.int64) if raw is None else decode_index(raw)
        if idx is None or (idx.size and int(idx.max()) >= n):
            raise ValueError(
                f"step entry {seq}: example_index is malformed or points past the run's examples"
            )
        at = idx.tolist()
        ids = self.ids
        out = [ids[i] for i in at]
        rules = payloads.get("rules")
        if rules is not None:
            rules = np.asarray(rules)
            if rules.shape != idx.shape or rules.dtype.kind != "i":
                raise ValueError(f"step entry {seq}: rules must be integers, one per row")
            return out, rules.astype(np.int32)
        table_rules = [self.rules[i] for i in at]
        return out, None if None in table_rules else np.array(table_rules, dtype=np.int32)


@dataclass(frozen=True)
class RunSteps:
    """What a v 3 step takes from its ``run`` entry: the layer names and the routing weight table."""

    layers: list[str]
    weight_table: np.ndarray | None  # float32 [R, L]: row r = rule r, last row = default (-1)

    @classmethod
    def from_body(cls, body: Any) -> RunSteps | None:
        """From a ``run`` entry body; None when it names no layers."""
        try:
            layers = [str(layer["name"]) for layer in body["architecture"]["layers"]]
        except (KeyError, TypeError):
            return None
        table = body.get("weight_table")
        return cls(layers, None if table is None else _rows(table, len(layers)))


class StepEncoder:
    """The writer's side of step v 3 for one run: the tracker builds each step's full (v 2 shaped) body and
    payloads and :meth:`encode` turns them into the v 3 ones. Steps must be encoded in the order they are
    appended, each once; once an append fails no later step may be appended (the tracker's writer stops), and
    if one is, readers find the gap through ``first_index``."""

    def __init__(self, layers: Sequence[str], weight_table: np.ndarray | None = None) -> None:
        self.layers = list(layers)
        self.weight_table = None if weight_table is None else np.asarray(weight_table, dtype=np.float32)
        self._index: dict[str, int] = {}
        self._rules = np.empty(0, dtype=np.int64)  # as RunTable.rules (_NO_RULE for None), grown in blocks

    def run_fields(self) -> dict[str, Any]:
        """Fields for the ``run`` entry body: ``weight_table`` when the encoder was given one."""
        if self.weight_table is None:
            return {}
        return {"weight_table": [[float(x) for x in row] for row in self.weight_table]}

    def encode(
        self, body: dict[str, Any], payloads: dict[str, np.ndarray], weights: np.ndarray | None = None
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """v 2 shaped (``example_ids``, ``layers``, ``lr`` list, ``weight_rows`` / ``weight_index``) -> v 3.

        ``weights`` [B, L] (the routing weights applied) may be given instead of ``weight_rows`` /
        ``weight_index``. The inputs are not changed."""
        body, payloads = dict(body), dict(payloads)
        ids = body.pop("example_ids")  # strings, as the body had to hold them
        b = len(ids)
        rules = payloads.get("rules")
        if weights is None:
            weights = step_weights(body, payloads, rules, b=b, n_layers=len(self.layers))
            if weights is None:
                raise ValueError("StepEncoder.encode: the step has no readable routing weights")
        for k in ("weight_rows", "weight_index", "rule_rows"):
            body.pop(k, None)
            payloads.pop(k, None)
        body.update(self._ids(ids, rules, payloads))
        if body.get("layers") == self.layers:
            del body["layers"]
        if isinstance(body.get("lr"), list) and body["lr"] and all(x == body["lr"][0] for x in body["lr"]):
            body["lr"] = body["lr"][0]
        if not body.get("flags"):
            body.pop("flags", None)
        if body.get("micro_batches") == [b]:
            del body["micro_batches"]
        if body.get("policy_seq", 0) is None:
            del body["policy_seq"]
        w = np.ascontiguousarray(weights, dtype=np.float32)
        n_l = w.shape[1] if w.ndim == 2 else -1
        run_w = None if self.weight_table is None else table_weights(self.weight_table, rules, b, n_l)
        if run_w is None or run_w.tobytes() != w.tobytes():  # not what the run's table gives: say it here
            rows, index = encode_weights(w)
            body["weight_rows"] = rows
            if index is not None:
                r = None if rules is None else np.asarray(rules, dtype=np.int64)
                pairs = None if r is None else np.unique(np.stack([r, index.astype(np.int64)]), axis=1)
                if pairs is not None and len(np.unique(pairs[0])) == pairs.shape[1]:
                    body["rule_rows"] = pairs.T.tolist()  # each rule has one weight row
                else:
                    payloads["weight_index"] = index
        return body, payloads

    def _ids(
        self, ids: list[str], rules: np.ndarray | None, payloads: dict[str, np.ndarray]
    ) -> dict[str, Any]:
        """Table fields of one step; sets ``example_index`` and keeps ``rules`` in ``payloads`` only if needed."""
        index_of = self._index
        first = len(index_of)
        b = len(ids)
        fields: dict[str, Any] = {}
        found = list(map(index_of.get, ids))
        n_new = 0
        if None in found:
            new = list(dict.fromkeys(x for x, i in zip(ids, found, strict=True) if i is None))
            n_new = len(new)
            index_of.update(zip(new, range(first, first + n_new), strict=True))
            fields = {"new_ids": new, "first_index": first}
            found = list(map(index_of.get, ids))
        idx = np.fromiter(found, dtype=np.int64, count=b)
        n = first + n_new
        if not (n_new == b and bool((idx == np.arange(first, n)).all())):
            payloads["example_index"] = _index_payload(idx, n)
        if n > len(self._rules):
            grown = np.full(max(n, 2 * len(self._rules), 1024), _NO_RULE, dtype=np.int64)
            grown[: len(self._rules)] = self._rules
            self._rules = grown
        if rules is None:
            return fields
        r = np.asarray(rules)
        if n_new:  # each new example's rule: the one of its first row here
            first_rows = np.unique(idx, return_index=True)[1][
                -n_new:
            ]  # in index order: the new ones come last
            self._rules[first:n] = r[first_rows]
            fields["new_rules"] = r[first_rows].tolist()
        if np.array_equal(self._rules[idx], r):
            del payloads["rules"]  # every row's rule is its example's: readers take them from the table
        return fields


_NO_RULE = np.iinfo(np.int64).min  # an example first met in a step without rules


class StepReader:
    """Decodes step entries of any version, fed in ledger order: every step of a run whose records are wanted,
    from the run's first step on (v 3 steps extend their run's example table). ``run_of(run_seq)`` gives what v 3
    steps take from their ``run`` entry (:func:`iter_steps` reads it from the ledger)."""

    def __init__(self, run_of: Callable[[int], RunSteps | None] | None = None) -> None:
        self._tables: dict[int, RunTable] = {}
        self._run_of = run_of
        self._runs: dict[int, RunSteps | None] = {}

    def table(self, run_seq: int) -> RunTable:
        t = self._tables.get(run_seq)
        if t is None:
            t = self._tables[run_seq] = RunTable()
        return t

    def run(self, run_seq: Any) -> RunSteps | None:
        if type(run_seq) is not int or self._run_of is None:
            return None
        if run_seq not in self._runs:
            self._runs[run_seq] = self._run_of(run_seq)
        return self._runs[run_seq]

    def ids(
        self, seq: int, body: dict[str, Any], payloads: dict[str, Any]
    ) -> tuple[list[str], np.ndarray | None]:
        """(example ids, rule ids) of a step, any version (v 3: through its run's table, which it extends)."""
        if "example_ids" in body:
            ids = body["example_ids"]
            if not isinstance(ids, list):
                raise ValueError(f"step entry {seq}: example_ids must be a list")
            rules = _payload(payloads, "rules")
            return [str(x) for x in ids], None if rules is None else rules.astype(np.int32)
        run_seq = body.get("run_seq")
        if type(run_seq) is not int:
            raise ValueError(f"step entry {seq}: run_seq must be an integer")
        return self.table(run_seq).read(seq, body, payloads)

    def record(self, entry: Any) -> StepRecord:
        if entry.kind != "step":
            raise ValueError(f"entry {entry.seq} is a {entry.kind!r} entry, not a step")
        b, pl = entry.body, entry.payloads
        ids, rule_ids = self.ids(int(entry.seq), b, pl)
        run = self.run(b.get("run_seq"))
        if "layers" in b:
            layers = [str(x) for x in b["layers"]]
        elif run is not None:
            layers = list(run.layers)
        else:
            raise ValueError(
                f"step entry {entry.seq}: no layers and no run entry at run_seq {b.get('run_seq')!r}"
            )
        table = None if run is None else run.weight_table
        return _record(entry, b, pl, ids, rule_ids, layers, table)


def _payload(payloads: dict[str, Any], name: str) -> np.ndarray | None:
    return None if name not in payloads else np.asarray(payloads[name])


def _floats(values: Any, n: int) -> np.ndarray:
    if not isinstance(values, list):  # v 3: one value for every layer
        values = [values] * n
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step of one run (see the module docstring for units)."""

    seq: int
    run: str
    run_seq: int
    step: int
    epoch: int
    example_ids: list[str]
    layers: list[str]
    micro_batches: list[int]
    grad_norms: np.ndarray  # [B, L] float32
    weights: np.ndarray  # [B, L] float32
    losses: np.ndarray | None  # [B]
    margins: np.ndarray | None  # [B]
    lr: np.ndarray  # [L] float64 (NaN: layer not in the optimizer)
    update_norms: np.ndarray | None  # [L] float64
    clip_factors: np.ndarray | None  # [B]
    policy_seq: int | None
    rule_ids: np.ndarray | None  # [B] int32, -1 = policy default
    eps: float | None
    flags: dict[str, list[int]]

    @classmethod
    def from_entry(cls, entry: Any) -> StepRecord:
        """A step entry that carries its own ids, layers and weights (v 1/2); others need :class:`StepReader`."""
        if entry.kind != "step":
            raise ValueError(f"entry {entry.seq} is a {entry.kind!r} entry, not a step")
        b = entry.body
        if "example_ids" not in b or "layers" not in b:
            raise ValueError(
                f"step entry {entry.seq} refers to its run's example table or run entry: read it with "
                "ledger.records.StepReader, in ledger order with the run's earlier steps"
            )
        pl = entry.payloads
        rules = _payload(pl, "rules")
        rule_ids = None if rules is None else rules.astype(np.int32)
        return _record(entry, b, pl, list(b["example_ids"]), rule_ids, list(b["layers"]), None)


def _record(
    entry: Any,
    b: dict[str, Any],
    pl: dict[str, Any],
    ids: list[str],
    rule_ids: np.ndarray | None,
    layers: list[str],
    run_table: np.ndarray | None,
) -> StepRecord:
    norms = _payload(pl, "grad_norms")
    weights = step_weights(b, pl, rule_ids, b=len(ids), n_layers=len(layers), run_table=run_table)
    if norms is None or weights is None:
        raise ValueError(f"step entry {entry.seq} lacks its grad_norms / routing weights")
    upd = b.get("update_norms")
    dp = b.get("dp")
    n_l = len(layers)
    return StepRecord(
        seq=int(entry.seq),
        run=b["run"],
        run_seq=int(b["run_seq"]),
        step=int(b["step"]),
        epoch=int(b["epoch"]),
        example_ids=ids,
        layers=layers,
        micro_batches=[int(x) for x in b.get("micro_batches", [len(ids)])],
        grad_norms=norms,
        weights=weights,
        losses=_payload(pl, "losses"),
        margins=_payload(pl, "margins"),
        lr=_floats(b["lr"], n_l),
        update_norms=None if upd is None else _floats(upd, n_l),
        clip_factors=_payload(pl, "clip"),
        policy_seq=b.get("policy_seq"),
        rule_ids=rule_ids,
        eps=None if not dp else dp.get("eps"),
        flags={k: list(v) for k, v in (b.get("flags") or {}).items()},
    )


@dataclass(frozen=True)
class RunRecord:
    """The ``run`` entry ``instrument.attach`` writes: what was trained, how, under which policy and labels."""

    seq: int
    run: str
    layers: list[str]
    architecture: dict[str, Any]
    optimizer: dict[str, Any]
    seed: int | None
    loss_reduction: str
    criterion: str | None
    policy_seq: int | None
    policy_digest: str | None
    manifest_seq: int | None
    manifest_digest: str | None
    dp: dict[str, Any] | None
    versions: dict[str, str]
    body: dict[str, Any]

    @classmethod
    def from_entry(cls, entry: Any) -> RunRecord:
        if entry.kind != "run":
            raise ValueError(f"entry {entry.seq} is a {entry.kind!r} entry, not a run")
        b = entry.body
        return cls(
            seq=int(entry.seq),
            run=b["run"],
            layers=[layer["name"] for layer in b["architecture"]["layers"]],
            architecture=b["architecture"],
            optimizer=b["optimizer"],
            seed=b.get("seed"),
            loss_reduction=b["loss_reduction"],
            criterion=b.get("criterion"),
            policy_seq=b.get("policy_seq"),
            policy_digest=b.get("policy_digest"),
            manifest_seq=b.get("manifest_seq"),
            manifest_digest=b.get("manifest_digest"),
            dp=b.get("dp"),
            versions=dict(b.get("versions", {})),
            body=b,
        )


@dataclass(frozen=True)
class CheckpointRecord:
    """A ``checkpoint`` entry: parameter digests of a model state at a point of a run."""

    seq: int
    run: str
    tag: str
    step: int
    layer_sha256: dict[str, str]  # layer name -> digest over its parameters
    state_dict_sha256: str
    tensors: dict[str, dict[str, Any]]  # state-dict key -> {dtype, shape, sha256}
    eps: float | None
    body: dict[str, Any]

    @classmethod
    def from_entry(cls, entry: Any) -> CheckpointRecord:
        if entry.kind != "checkpoint":
            raise ValueError(f"entry {entry.seq} is a {entry.kind!r} entry, not a checkpoint")
        b = entry.body
        dp = b.get("dp")
        return cls(
            seq=int(entry.seq),
            run=b["run"],
            tag=b["tag"],
            step=int(b["step"]),
            layer_sha256={k: v["sha256"] for k, v in b["layers"].items()},
            state_dict_sha256=b["state_dict_sha256"],
            tensors=b["state_dict"],
            eps=None if not dp else dp.get("eps"),
            body=b,
        )


def ledger_runs(ledger: Any) -> Callable[[int], RunSteps | None]:
    """``run_of`` for :class:`StepReader`: what the ``run`` entry at a seq of ``ledger`` gives v 3 steps."""

    def run_of(run_seq: int) -> RunSteps | None:
        if not 0 <= run_seq < ledger.size:
            return None
        e = ledger.entry(run_seq)
        return RunSteps.from_body(e.body) if e.kind == "run" else None

    return run_of


def iter_steps(ledger: Any, run: str) -> Iterator[StepRecord]:
    """Stream the run's step records in ledger order."""
    reader = StepReader(ledger_runs(ledger))
    for entry in ledger.entries(kind="step"):
        if entry.body.get("run") == run:
            yield reader.record(entry)


def runs(ledger: Any) -> list[RunRecord]:
    """Every ``run`` entry, in ledger order."""
    return [RunRecord.from_entry(e) for e in ledger.entries(kind="run", payloads=False)]


def run_record(ledger: Any, run: str) -> RunRecord:
    """The ``run`` entry named ``run``; KeyError naming the runs that exist otherwise."""
    found = [r for r in runs(ledger) if r.run == run]
    if not found:
        names = sorted({r.run for r in runs(ledger)})
        raise KeyError(f"no run named {run!r} in this ledger (runs: {', '.join(names) or 'none'})")
    return found[-1]


def checkpoints(ledger: Any, run: str) -> list[CheckpointRecord]:
    """The run's checkpoint entries, in ledger order."""
    return [
        CheckpointRecord.from_entry(e)
        for e in ledger.entries(kind="checkpoint", payloads=False)
        if e.body.get("run") == run
    ]
