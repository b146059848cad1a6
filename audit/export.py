"""Signed provenance exports (DSSE + in-toto Statement v1) and their offline verification; label proofs.

Bundle (``gradledger export``), one JSON object::

    {"mediaType": "application/vnd.gradledger.export+json;version=1",
     "dsseEnvelope": {payloadType "application/vnd.in-toto+json", payload, signatures},   # audit.dsse
     "evidence": {"tree_size": n, "entries": [{"seq", "kind", "leaf_data", "payloads": {name: b64},
                                               "proof": [b64 hash, ...]}]}}                  # --evidence only

The payload is the RFC 8785 serialisation of an in-toto Statement v1: ``_type``
``https://in-toto.io/Statement/v1``; ``subject`` = the run's ``checkpoint`` entries, named
``<run>/checkpoint/<tag>@<seq>`` with ``digest.sha256`` = the entry's ``state_dict_sha256`` (recomputable from
the model with ``instrument.tracker.model_digests``; a run without checkpoints names its ``run`` entry, digest
= sha256 of its leaf data); ``predicateType`` :data:`PREDICATE_TYPE`; ``predicate``:

* ``ledger``: ``origin`` and ``checkpoint`` {size, root (hex), note}: a C2SP signed checkpoint note covering
  every cited entry, signed by the same key as the envelope. An existing stored note signed by that key is
  reused; otherwise a fresh one is signed (the store refuses if the tree is inconsistent with earlier ones).
* ``run``: name, seq, leaf_hash, ``config`` (the ``run`` entry body: architecture, optimizer, seed, loss
  reduction, criterion, DP config, versions), steps, sample_steps, epochs, first/last step seq.
* ``policy`` / ``manifest``: seq, name, digest (or null); ``exports``: the annotation exports the labels came
  from (seq, name, sha256, source); ``checkpoints``: seq, tag, step, state_dict_sha256, leaf_hash, eps.
* ``dp``: null, or the DP config and the last recorded (eps, delta).
* ``contributions`` (:func:`figures`): per layer, the total ``update`` contribution and the top-K labels and
  human annotators by contribution (metric: :mod:`audit.contributions`). Annotators appear as ingest
  pseudonyms only; no identities or label values are exported.

Every cited entry's leaf is recomputed from its bytes and proved against the checkpoint before signing, so a
bundle never attests to rows that are not in the signed tree. With ``evidence`` the bundle carries those
entries (leaf data, payload bytes) with RFC 9162 inclusion proofs, and :func:`verify_bundle` recomputes the
predicate's figures from them exactly (same code, same order: bit-identical floats).

Label proofs (``gradledger prove --label``): a C2SP ``tlog-proof@v1`` whose ``extra`` line carries the
annotation entry's leaf data, so the proof is self-contained: its leaf hash is ``SHA-256(0x00 || extra)``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select

from ledger import merkle, note, schema
from ledger.canonical import ENTRY_PREFIX, canonical_json, payload_array
from ledger.errors import LedgerInputError
from ledger.keys import VerifierKey, as_signer, as_verifier, key_id
from ledger.records import (
    CheckpointRecord,
    RunRecord,
    RunSteps,
    StepReader,
    StepRecord,
    checkpoints,
    run_record,
)
from ledger.store import Ledger
from ledger.tree import LevelTree

from . import dsse
from .contributions import RunTotals, run_totals

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://gradledger.dev/provenance/v1"
BUNDLE_MEDIA_TYPE = "application/vnd.gradledger.export+json;version=1"
DEFAULT_TOP = 10
METRIC = "update"
LABEL_KINDS = ("annotation", "suggestion")
CITED_KINDS = {"run", "step", "checkpoint", "manifest", "policy", "export", *LABEL_KINDS}


class ExportError(LedgerInputError, ValueError):
    """The export cannot be made (unknown run, no usable checkpoint): exit 2."""


class BundleError(LedgerInputError, ValueError):
    """The bundle is unreadable or malformed (not JSON, missing fields, bad base64): exit 2."""


class ExportVerificationError(note.VerificationError):
    """The bundle is well-formed but does not verify; ``check`` names the failed check."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"{check}: {reason}")
        self.check = check
        self.reason = reason


# ----- figures (shared by the exporter and the verifier) ------------------------------------------------


def _label_info(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    if kind == "annotation":
        prod = body.get("producer") or {}
        out = {
            "label_id": str(body.get("label_id")),
            "source": body.get("source"),
            "producer": prod.get("kind"),
        }
        if prod.get("kind") == "human" and prod.get("id"):
            out["annotator"] = prod["id"]
        return out
    return {"label_id": str(body.get("suggestion_id")), "source": body.get("source"), "producer": "model"}


def figures(
    t: RunTotals,
    manifest_examples: dict[str, Any] | None,
    label_bodies: dict[int, tuple[str, dict[str, Any]]],
    top: int,
) -> dict[str, Any]:
    """Per-layer totals and top-``top`` labels and annotators by ``update`` contribution (JSON-ready).

    Each label an example was trained on (its manifest labels) is credited with the example's full
    contribution, and so is each distinct human annotator among them (as ``gradledger query`` does), so
    shares of a consensus item's labels can sum to more than 1. Ties rank by label seq / pseudonym.
    """
    man = manifest_examples or {}
    ex_labels: list[list[int]] = []
    for ex in t.example_ids:
        seqs = list(dict.fromkeys(int(lab["seq"]) for lab in (man.get(ex) or {}).get("labels", [])))
        ex_labels.append(seqs)
    info = {s: _label_info(*label_bodies[s]) for seqs in ex_labels for s in seqs}
    layers = []
    for j, name in enumerate(t.layers):
        col = t.update[:, j] if t.example_ids else np.zeros(0)
        total = float(col.sum())
        lab_score: dict[int, float] = {}
        lab_n: dict[int, int] = {}
        ann_score: dict[str, float] = {}
        ann_n: dict[str, int] = {}
        for i, seqs in enumerate(ex_labels):
            v = float(col[i])
            anns = list(dict.fromkeys(info[s]["annotator"] for s in seqs if "annotator" in info[s]))
            for s in seqs:
                lab_score[s] = lab_score.get(s, 0.0) + v
                lab_n[s] = lab_n.get(s, 0) + 1
            for a in anns:
                ann_score[a] = ann_score.get(a, 0.0) + v
                ann_n[a] = ann_n.get(a, 0) + 1
        labs = sorted(lab_score, key=lambda s: (-lab_score[s], s))[:top]
        anns_top = sorted(ann_score, key=lambda a: (-ann_score[a], a))[:top]
        layers.append(
            {
                "layer": name,
                "total": total,
                "self_influence_total": float(t.self_influence[:, j].sum()) if t.example_ids else 0.0,
                "excluded_nonfinite": int(t.excluded[j]),
                "labels": [
                    {
                        "rank": r,
                        "seq": s,
                        **info[s],
                        "examples": lab_n[s],
                        "score": lab_score[s],
                        "share": lab_score[s] / total if total else 0.0,
                    }
                    for r, s in enumerate(labs, 1)
                ],
                "annotators": [
                    {
                        "rank": r,
                        "annotator": a,
                        "examples": ann_n[a],
                        "score": ann_score[a],
                        "share": ann_score[a] / total if total else 0.0,
                    }
                    for r, a in enumerate(anns_top, 1)
                ],
            }
        )
    return {
        "metric": METRIC,
        "definition": "sum over sample-steps of lr_l * w_il * c_i * ||g_il|| / d_i (audit.contributions)",
        "top_k": top,
        "examples": len(t.example_ids),
        "labelled_examples": sum(1 for s in ex_labels if s),
        "sample_steps": t.sample_steps,
        "layers": layers,
    }


def _dp(run: dict[str, Any], t: RunTotals, last_step_dp: dict[str, Any] | None) -> dict[str, Any] | None:
    if not run.get("dp"):
        return None
    out = {"config": run["dp"], "eps": t.eps}
    if last_step_dp:
        out["delta"] = last_step_dp.get("delta")
        out["accountant"] = last_step_dp.get("accountant")
    return out


def _restore(x: Any) -> Any:
    """JSON ``{"$float": ...}`` markers back to floats (the ledger's NaN/Inf encoding)."""
    if isinstance(x, dict):
        if len(x) == 1 and "$float" in x:
            return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}[x["$float"]]
        return {k: _restore(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_restore(v) for v in x]
    return x


def _cj(x: Any) -> bytes:
    return canonical_json(_restore(x), "predicate")


# ----- making an export ---------------------------------------------------------------------------------


@dataclass
class _Cited:
    run: RunRecord
    totals: RunTotals
    step_seqs: list[int]
    last_step_dp: dict[str, Any] | None
    checkpoints: list[Any]
    manifest: tuple[int, dict[str, Any]] | None
    policy: tuple[int, dict[str, Any]] | None
    labels: dict[int, tuple[str, dict[str, Any]]]
    exports: list[tuple[int, dict[str, Any]]]

    def seqs(self) -> list[int]:
        out = {self.run.seq, *self.step_seqs, *(c.seq for c in self.checkpoints), *self.labels}
        out |= {s for s, _ in self.exports}
        for part in (self.manifest, self.policy):
            if part is not None:
                out.add(part[0])
        return sorted(out)


def _step_reader(run: RunRecord) -> StepReader:
    """A reader for the steps of ``run``: v 3 steps take their layers and weight table from its entry."""
    return StepReader(lambda seq: RunSteps.from_body(run.body) if seq == run.seq else None)


def _steps_of(ledger: Ledger, run: RunRecord) -> Iterable[StepRecord]:
    reader = _step_reader(run)
    for e in ledger.entries(kind="step", start=run.seq):
        if e.body.get("run_seq") == run.seq:
            yield reader.record(e)


def _covers(export_body: dict[str, Any], label_seqs: Iterable[int]) -> bool:
    lo, hi = export_body.get("first_seq"), export_body.get("last_seq")
    return isinstance(lo, int) and isinstance(hi, int) and any(lo <= s <= hi for s in label_seqs)


def _collect(ledger: Ledger, run_name: str) -> _Cited:
    try:
        run = run_record(ledger, run_name)
    except KeyError as exc:
        raise ExportError(str(exc.args[0])) from None
    seqs: list[int] = []
    last_dp: list[dict[str, Any] | None] = [None]

    def steps() -> Iterable[StepRecord]:
        for rec in _steps_of(ledger, run):
            seqs.append(rec.seq)
            yield rec

    t = run_totals(steps(), run.layers, run.loss_reduction)
    if seqs and run.dp:
        last_dp[0] = ledger.entry(seqs[-1]).body.get("dp")
    cps = [c for c in checkpoints(ledger, run.run) if c.body.get("run_seq") == run.seq]
    manifest = None
    if run.manifest_seq is not None:
        manifest = (run.manifest_seq, ledger.entry(run.manifest_seq).body)
    policy = None
    if run.policy_seq is not None:
        policy = (run.policy_seq, ledger.entry(run.policy_seq).body)
    wanted: set[int] = set()
    if manifest is not None:
        ex = manifest[1].get("examples", {})
        for ex_id in t.example_ids:
            wanted.update(int(lab["seq"]) for lab in (ex.get(ex_id) or {}).get("labels", []))
    labels: dict[int, tuple[str, dict[str, Any]]] = {}
    if wanted:
        for e in ledger.entries(
            kind=set(LABEL_KINDS), start=min(wanted), end=max(wanted) + 1, payloads=False
        ):
            if e.seq in wanted:
                labels[e.seq] = (e.kind, e.body)
    exports = []
    if labels:
        exports = [
            (e.seq, e.body) for e in ledger.entries(kind="export", payloads=False) if _covers(e.body, labels)
        ]
    return _Cited(run, t, seqs, last_dp[0], cps, manifest, policy, labels, exports)


def _choose_checkpoint(ledger: Ledger, need: int, private_key: Any, key_name: str) -> str:
    """A stored note by this key covering seqs < ``need`` and matching the stored tree, else a fresh one."""
    pub = private_key.public_key()
    for cp in reversed(ledger.checkpoints()):
        if cp.size < need:
            continue
        try:
            parsed = note.verify_checkpoint(cp.note, pub, origin=ledger.origin)
        except (note.VerificationError, LedgerInputError):
            continue
        if parsed.root == ledger.root(parsed.size):
            return cp.note
    res = ledger.verify()
    if not res.ok:
        raise ExportVerificationError(
            "ledger", f"refusing to sign: verification failed at seq {res.first_bad_seq}: {res.reason}"
        )
    return ledger.sign_checkpoint(private_key, key_name)


def _level_tree(ledger: Ledger, size: int) -> LevelTree:
    """All levels of the first ``size`` leaves, from the stored leaf-hash column (one query; 32 bytes per
    entry): proofs for thousands of cited entries then cost no database round trips. The caller checks the
    root against the signed checkpoint and every cited leaf against its recomputed hash."""
    leaves = bytearray()
    e = schema.entries
    with ledger.engine.connect() as conn:
        for (h,) in conn.execute(select(e.c.leaf_hash).where(e.c.seq < size).order_by(e.c.seq)):
            leaves += bytes(h)
        conn.rollback()
    return LevelTree(leaves)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def build_export(
    ledger: Ledger,
    run: str,
    private_key: Any,
    key_name: str,
    *,
    evidence: bool = False,
    top: int = DEFAULT_TOP,
) -> dict[str, Any]:
    """The export bundle of ``run`` (see the module docstring), signed with ``private_key``."""
    if top < 1:
        raise ExportError(f"--top must be at least 1, got {top}")
    key = as_signer(private_key)
    c = _collect(ledger, run)
    seqs = c.seqs()
    note_text = _choose_checkpoint(ledger, seqs[-1] + 1, key, key_name)
    cp = note.parse_checkpoint_note(note_text)
    tree = _level_tree(ledger, cp.size)
    if tree.root(cp.size) != cp.root:
        raise ExportVerificationError(
            "ledger", "the stored leaf hashes do not give the checkpoint's root; run gradledger verify"
        )
    entries = []
    run_leaf = b""
    wanted = set(seqs)
    found = 0
    for e in ledger.entries(kind=CITED_KINDS, start=seqs[0], end=seqs[-1] + 1):
        if e.seq not in wanted:
            continue
        found += 1
        s = e.seq
        data = e.leaf_data()
        leaf = merkle.leaf_hash(data)
        proof_hashes = merkle.inclusion_proof_from(s, cp.size, tree.subtree)
        if not merkle.verify_inclusion(s, cp.size, leaf, proof_hashes, cp.root):
            raise ExportVerificationError(
                "ledger",
                f"entry seq {s} as stored is not the one in the signed checkpoint; run gradledger verify",
            )
        for name, d in e.descriptors.items():
            if hashlib.sha256(e.payload_bytes(name)).hexdigest() != d["sha256"]:
                raise ExportVerificationError(
                    "ledger", f"entry seq {s}: payload {name!r} does not match its sha256"
                )
        if s == c.run.seq:
            run_leaf = data
        if evidence:
            entries.append(
                {
                    "seq": s,
                    "kind": e.kind,
                    "leaf_data": _b64(data),
                    "payloads": {n: _b64(e.payload_bytes(n)) for n in sorted(e.descriptors)},
                    "proof": [_b64(h) for h in proof_hashes],
                }
            )
    if found != len(wanted):
        raise ExportError(f"{len(wanted) - found} cited entries could not be read back")
    statement = _statement(ledger.origin, note_text, cp, c, top, run_leaf)
    payload = canonical_json(statement, "statement")
    env = dsse.sign(payload, dsse.INTOTO_PAYLOAD_TYPE, key)
    bundle: dict[str, Any] = {"mediaType": BUNDLE_MEDIA_TYPE, "dsseEnvelope": env.to_json()}
    if evidence:
        bundle["evidence"] = {"tree_size": cp.size, "entries": entries}
    return bundle


def _subjects(c: _Cited, run_leaf: bytes) -> list[dict[str, Any]]:
    if not c.checkpoints:
        return [
            {
                "name": f"{c.run.run}/run@{c.run.seq}",
                "digest": {"sha256": hashlib.sha256(run_leaf).hexdigest()},
            }
        ]
    return [
        {"name": f"{c.run.run}/checkpoint/{cp.tag}@{cp.seq}", "digest": {"sha256": cp.state_dict_sha256}}
        for cp in c.checkpoints
    ]


def _predicate_parts(c: _Cited, top: int) -> dict[str, Any]:
    """Everything in the predicate that the evidence determines (the verifier rebuilds exactly this)."""
    t = c.totals
    return {
        "run": {
            "name": c.run.run,
            "seq": c.run.seq,
            "config": c.run.body,
            "steps": t.steps,
            "sample_steps": t.sample_steps,
            "epochs": t.epochs,
            "first_step_seq": c.step_seqs[0] if c.step_seqs else None,
            "last_step_seq": c.step_seqs[-1] if c.step_seqs else None,
        },
        "policy": None
        if c.policy is None
        else {"seq": c.policy[0], "name": c.policy[1].get("name"), "digest": c.policy[1].get("digest")},
        "manifest": None
        if c.manifest is None
        else {"seq": c.manifest[0], "name": c.manifest[1].get("name"), "digest": c.manifest[1].get("digest")},
        "exports": [
            {"seq": s, "name": b.get("name"), "sha256": b.get("sha256"), "source": b.get("source")}
            for s, b in c.exports
        ],
        "checkpoints": [
            {
                "seq": cp.seq,
                "tag": cp.tag,
                "step": cp.step,
                "state_dict_sha256": cp.state_dict_sha256,
                "eps": cp.eps,
            }
            for cp in c.checkpoints
        ],
        "dp": _dp(c.run.body, t, c.last_step_dp),
        "contributions": figures(
            t, None if c.manifest is None else c.manifest[1].get("examples"), c.labels, top
        ),
    }


def _statement(
    origin: str, note_text: str, cp: note.Checkpoint, c: _Cited, top: int, run_leaf: bytes
) -> dict[str, Any]:
    predicate = {
        "ledger": {
            "origin": origin,
            "checkpoint": {"size": cp.size, "root": cp.root.hex(), "note": note_text},
        },
        **_predicate_parts(c, top),
    }
    return {
        "_type": STATEMENT_TYPE,
        "subject": _subjects(c, run_leaf),
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }


# ----- verifying a bundle (offline) -----------------------------------------------------------------------


@dataclass
class Check:
    name: str
    status: str  # "ok" | "skipped"
    detail: str


@dataclass
class ExportReport:
    checks: list[Check] = field(default_factory=list)
    run: str | None = None
    origin: str | None = None
    checkpoint_size: int | None = None
    evidence_entries: int = 0

    def ok(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, "ok", detail))

    def skipped(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, "skipped", detail))

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "run": self.run,
            "origin": self.origin,
            "checkpoint_size": self.checkpoint_size,
            "evidence_entries": self.evidence_entries,
            "checks": [{"name": c.name, "status": c.status, "detail": c.detail} for c in self.checks],
        }


@dataclass
class _EvEntry:
    """An evidence entry decoded after its leaf hash was proved: what ``StepRecord.from_entry`` reads."""

    seq: int
    kind: str
    body: dict[str, Any]
    payloads: dict[str, np.ndarray]
    leaf_data: bytes


def _fail(check: str, reason: str) -> ExportVerificationError:
    return ExportVerificationError(check, reason)


def _bundle_b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise BundleError(f"{where}: expected a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BundleError(f"{where}: not valid base64 ({exc})") from exc


def _no_dups(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_bundle(data: bytes | str | dict[str, Any]) -> dict[str, Any]:
    """The bundle as a dict, with its shape checked (BundleError names the field)."""
    obj = data
    if isinstance(data, bytes | str):
        try:
            obj = json.loads(data, object_pairs_hook=_no_dups)
        except (UnicodeDecodeError, ValueError) as exc:
            raise BundleError(f"bundle is not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise BundleError("bundle must be a JSON object")
    if obj.get("mediaType") != BUNDLE_MEDIA_TYPE:
        raise BundleError(f"bundle.mediaType: expected {BUNDLE_MEDIA_TYPE!r}, got {obj.get('mediaType')!r}")
    if "dsseEnvelope" not in obj:
        raise BundleError("bundle: missing field 'dsseEnvelope'")
    ev = obj.get("evidence")
    if ev is not None:
        if not isinstance(ev, dict) or not isinstance(ev.get("entries"), list):
            raise BundleError("bundle.evidence: must be an object with an 'entries' list")
        ts = ev.get("tree_size")
        if not isinstance(ts, int) or isinstance(ts, bool) or ts < 1:
            raise BundleError("bundle.evidence.tree_size: must be a positive integer")
        for i, e in enumerate(ev["entries"]):
            where = f"bundle.evidence.entries[{i}]"
            if not isinstance(e, dict):
                raise BundleError(f"{where}: must be an object")
            if not isinstance(e.get("seq"), int) or isinstance(e.get("seq"), bool) or e["seq"] < 0:
                raise BundleError(f"{where}.seq: must be a non-negative integer")
            if not isinstance(e.get("payloads"), dict) or not isinstance(e.get("proof"), list):
                raise BundleError(f"{where}: needs 'payloads' (object) and 'proof' (list)")
    return obj


def _statement_shape(payload: bytes) -> dict[str, Any]:
    try:
        st = json.loads(payload, object_pairs_hook=_no_dups)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail("statement", f"the signed payload is not JSON ({exc})") from exc
    if not isinstance(st, dict):
        raise _fail("statement", "the signed payload is not a JSON object")
    if canonical_json(_restore(st), "statement") != payload:
        raise _fail("statement", "the signed payload is not in RFC 8785 canonical form")
    if st.get("_type") != STATEMENT_TYPE:
        raise _fail("statement", f"_type is {st.get('_type')!r}, expected {STATEMENT_TYPE!r}")
    if st.get("predicateType") != PREDICATE_TYPE:
        raise _fail("statement", f"predicateType is {st.get('predicateType')!r}, expected {PREDICATE_TYPE!r}")
    subj = st.get("subject")
    if not isinstance(subj, list) or not subj:
        raise _fail("statement", "subject must be a non-empty list")
    for i, s in enumerate(subj):
        d = s.get("digest") if isinstance(s, dict) else None
        sha = d.get("sha256") if isinstance(d, dict) else None
        if not (
            isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(sha, str) and len(sha) == 64
        ):
            raise _fail("statement", f"subject[{i}] needs a name and a 64-hex digest.sha256")
        try:
            bytes.fromhex(sha)
        except ValueError:
            raise _fail("statement", f"subject[{i}].digest.sha256 is not hex") from None
    p = st.get("predicate")
    need = ("ledger", "run", "policy", "manifest", "exports", "checkpoints", "dp", "contributions")
    if not isinstance(p, dict) or any(k not in p for k in need):
        raise _fail("statement", f"predicate must be an object with {', '.join(need)}")
    led = p["ledger"]
    if not (
        isinstance(led, dict)
        and isinstance(led.get("origin"), str)
        and isinstance(led.get("checkpoint"), dict)
    ):
        raise _fail("statement", "predicate.ledger needs origin and checkpoint")
    return st


def _decode_evidence(ev: dict[str, Any], cp: note.Checkpoint, rep: ExportReport) -> dict[int, _EvEntry]:
    if ev["tree_size"] != cp.size:
        raise _fail(
            "evidence", f"tree_size {ev['tree_size']} differs from the signed checkpoint's size {cp.size}"
        )
    out: dict[int, _EvEntry] = {}
    n_payloads = 0
    for i, raw in enumerate(ev["entries"]):
        where = f"bundle.evidence.entries[{i}]"
        seq = raw["seq"]
        data = _bundle_b64(raw.get("leaf_data"), f"{where}.leaf_data")
        proof = [_bundle_b64(h, f"{where}.proof[{k}]") for k, h in enumerate(raw["proof"])]
        if seq in out:
            raise _fail("evidence", f"seq {seq} appears twice")
        if seq >= cp.size:
            raise _fail("inclusion", f"evidence entry seq {seq} is outside the signed tree of size {cp.size}")
        if not merkle.verify_inclusion(seq, cp.size, merkle.leaf_hash(data), proof, cp.root):
            raise _fail(
                "inclusion",
                f"evidence entry seq {seq}: its leaf data and inclusion proof do not lead to the signed root "
                "(the entry bytes or the proof were changed)",
            )
        if not data.startswith(ENTRY_PREFIX):
            raise _fail("evidence", f"entry seq {seq}: leaf data lacks the gradledger entry prefix")
        try:
            obj = json.loads(data[len(ENTRY_PREFIX) :], object_pairs_hook=_no_dups)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _fail("evidence", f"entry seq {seq}: leaf data is not JSON ({exc})") from exc
        if not isinstance(obj, dict) or obj.get("seq") != seq or not isinstance(obj.get("body"), dict):
            raise _fail("evidence", f"entry seq {seq}: leaf data names another seq or has no body")
        descs = obj.get("payloads") or {}
        if set(descs) != set(raw["payloads"]):
            raise _fail(
                "evidence",
                f"entry seq {seq}: payloads {sorted(raw['payloads'])} differ from the leaf's {sorted(descs)}",
            )
        arrays = {}
        for name, d in descs.items():
            pb = _bundle_b64(raw["payloads"][name], f"{where}.payloads.{name}")
            if hashlib.sha256(pb).hexdigest() != d.get("sha256") or len(pb) != d.get("size"):
                raise _fail(
                    "payload", f"entry seq {seq}: payload {name!r} bytes do not match the sha256 in its leaf"
                )
            shape = "[" + ",".join(str(int(x)) for x in d["shape"]) + "]"
            arrays[name] = payload_array(d["dtype"], shape, pb)
            n_payloads += 1
        out[seq] = _EvEntry(seq, str(obj.get("kind")), _restore(obj["body"]), arrays, data)
    rep.ok("inclusion", f"{len(out)} evidence entries proved against the signed root (RFC 9162)")
    rep.ok("payloads", f"{n_payloads} payloads re-hashed against their leaves' sha256")
    rep.evidence_entries = len(out)
    return out


def _need(ev: dict[int, _EvEntry], seq: Any, kind: str, what: str) -> _EvEntry:
    e = ev.get(seq) if isinstance(seq, int) else None
    if e is None:
        raise _fail("evidence", f"{what} (seq {seq}) is not in the evidence")
    if e.kind != kind:
        raise _fail("evidence", f"{what} (seq {seq}) is a {e.kind!r} entry, not {kind!r}")
    return e


def _recompute(st: dict[str, Any], ev: dict[int, _EvEntry], rep: ExportReport) -> None:
    """Rebuild every evidence-determined part of the predicate from the evidence and compare bytes."""
    p = st["predicate"]
    run_p = p["run"] if isinstance(p["run"], dict) else {}
    run_e = _need(ev, run_p.get("seq"), "run", "the run entry")
    run = RunRecord.from_entry(run_e)
    reader = _step_reader(run)
    try:  # in seq order: a step v 3 reads its ids through the run's example table, built by the earlier steps
        steps = [
            reader.record(e)
            for s, e in sorted(ev.items())
            if e.kind == "step" and e.body.get("run_seq") == run.seq
        ]
    except ValueError as exc:
        raise _fail("evidence", f"the run's step entries do not read: {exc}") from exc
    cps = [
        CheckpointRecord.from_entry(e)
        for _, e in sorted(ev.items())
        if e.kind == "checkpoint" and e.body.get("run_seq") == run.seq
    ]
    manifest = None
    if run.manifest_seq is not None:
        m = _need(ev, run.manifest_seq, "manifest", "the run's manifest")
        digest = hashlib.sha256(canonical_json(m.body.get("examples"), "examples")).hexdigest()
        if digest != m.body.get("digest"):
            raise _fail("manifest", f"manifest seq {m.seq}: its digest does not match its examples")
        manifest = (m.seq, m.body)
    policy = None
    if run.policy_seq is not None:
        pe = _need(ev, run.policy_seq, "policy", "the run's policy")
        pd = "sha256:" + hashlib.sha256(canonical_json(pe.body.get("policy"), "policy")).hexdigest()
        if pd != pe.body.get("digest"):
            raise _fail("policy", f"policy seq {pe.seq}: its digest does not match the policy it records")
        policy = (pe.seq, pe.body)
    t = run_totals(steps, run.layers, run.loss_reduction)
    labels: dict[int, tuple[str, dict[str, Any]]] = {}
    if manifest is not None:
        exs = manifest[1].get("examples", {})
        for ex_id in t.example_ids:
            for lab in (exs.get(ex_id) or {}).get("labels", []):
                e = ev.get(int(lab["seq"]))
                if e is None or e.kind not in ("annotation", "suggestion"):
                    raise _fail(
                        "evidence",
                        f"label entry seq {lab['seq']} of example {ex_id!r} is not in the evidence",
                    )
                labels[e.seq] = (e.kind, e.body)
    exports = [(s, e.body) for s, e in sorted(ev.items()) if e.kind == "export" and _covers(e.body, labels)]
    last_dp = steps[-1].seq if steps else None
    c = _Cited(
        run,
        t,
        [r.seq for r in steps],
        None if last_dp is None else ev[last_dp].body.get("dp"),
        cps,
        manifest,
        policy,
        labels,
        exports,
    )
    top = p["contributions"].get("top_k") if isinstance(p["contributions"], dict) else None
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise _fail("statement", "predicate.contributions.top_k must be a positive integer")
    mine = _predicate_parts(c, top)
    for key in ("run", "policy", "manifest", "exports", "checkpoints", "dp", "contributions"):
        if _cj(mine[key]) != _cj(p[key]):
            raise _fail(
                "figures" if key == "contributions" else "predicate",
                f"predicate.{key} does not match what the evidence entries give"
                + (
                    " (per-layer totals, top-K labels or annotators differ)" if key == "contributions" else ""
                ),
            )
    run_leaf = run_e.leaf_data
    if _cj(_subjects(c, run_leaf)) != _cj(st["subject"]):
        raise _fail(
            "subject", "the subjects' names or sha256 digests differ from the run's checkpoint entries"
        )
    rep.ok(
        "subject", f"{len(st['subject'])} subject digest(s) equal the checkpoint entries' state_dict_sha256"
    )
    rep.ok(
        "figures",
        f"run config, policy and manifest digests, {len(exports)} export(s), {len(cps)} checkpoint(s), DP and the "
        f"per-layer top-{top} labels/annotators recomputed from {len(steps)} steps and equal the predicate exactly",
    )


def verify_bundle(data: bytes | str | dict[str, Any], public_key: Any) -> ExportReport:
    """Verify a bundle offline with the signer's public key only; return the checks done or raise.

    Raises BundleError (unreadable / malformed: exit 2), ExportVerificationError or another
    ``ledger.note.VerificationError`` (verification failed: exit 1).
    """
    bundle = parse_bundle(data)
    rep = ExportReport()
    v = as_verifier(public_key)
    pub = v.public_key if isinstance(v, VerifierKey) else v
    try:
        env = dsse.parse_envelope(bundle["dsseEnvelope"])
    except dsse.EnvelopeError as exc:
        raise BundleError(f"bundle.dsseEnvelope: {exc}") from exc
    try:
        payload = dsse.verify(env, pub, payload_type=dsse.INTOTO_PAYLOAD_TYPE)
    except dsse.DSSEVerificationError as exc:
        raise _fail("signature", str(exc)) from exc
    rep.ok("signature", "DSSE envelope: Ed25519 over PAE(payloadType, payload) verifies with the given key")
    st = _statement_shape(payload)
    rep.ok("statement", f"in-toto Statement v1, predicateType {PREDICATE_TYPE}, RFC 8785 bytes")
    p = st["predicate"]
    rep.origin = p["ledger"]["origin"]
    rep.run = p["run"].get("name") if isinstance(p["run"], dict) else None
    cpp = p["ledger"]["checkpoint"]
    note_text = cpp.get("note")
    if not isinstance(note_text, str):
        raise _fail("checkpoint", "predicate.ledger.checkpoint.note is missing")
    try:
        cp = note.verify_checkpoint(note_text, pub, origin=rep.origin)
    except note.NoteError as exc:
        raise _fail("checkpoint", f"the checkpoint note is malformed ({exc})") from exc
    except note.VerificationError as exc:
        raise _fail("checkpoint", str(exc)) from exc
    if cpp.get("size") != cp.size or cpp.get("root") != cp.root.hex():
        raise _fail("checkpoint", "predicate.ledger.checkpoint size/root differ from the signed note")
    rep.checkpoint_size = cp.size
    rep.ok(
        "checkpoint",
        f"C2SP checkpoint note for {cp.origin} (size {cp.size}) signed by the key (id {key_id(_note_name(note_text), pub).hex()})",
    )
    if bundle.get("evidence") is None:
        for name, why in (
            ("inclusion", "no evidence: the cited entries' inclusion in the signed tree was not checked"),
            ("payloads", "no evidence: entry bytes and payload hashes were not checked"),
            ("subject", "no evidence: subject digests were not compared with the checkpoint entries"),
            ("figures", "no evidence: per-layer totals and top-K labels/annotators were not recomputed"),
        ):
            rep.skipped(name, why)
        return rep
    ev = _decode_evidence(bundle["evidence"], cp, rep)
    _recompute(st, ev, rep)
    return rep


def _note_name(note_text: str) -> str:
    return note.parse_note(note_text).signatures[0].name


# ----- label inclusion proofs (prove --label) -------------------------------------------------------------


def _label_seq(ledger: Ledger, label_id: str) -> int:
    head, sep, tail = label_id.partition(":")
    hits: dict[str, int] = {}
    for e in ledger.entries(kind="annotation", payloads=False):
        b = e.body
        lid, src = str(b.get("label_id")), str(b.get("source"))
        if lid == label_id or (sep and src == head and lid == tail):
            hits[src] = max(hits.get(src, -1), e.seq)  # the latest revision
    if not hits:
        raise ExportError(f"no annotation entry with label id {label_id!r} in this ledger")
    if len(hits) > 1:
        raise ExportError(
            f"label id {label_id!r} exists in several sources ({', '.join(sorted(hits))}); write it as 'source:{label_id}'"
        )
    return next(iter(hits.values()))


def prove_label(ledger: Ledger, label_id: str, checkpoint_note: str | None = None) -> str:
    """A C2SP tlog-proof that the label's latest annotation entry is in the signed tree (see module docstring).

    ``checkpoint_note``: prove against this note (it must cover the entry and match the stored tree); default:
    the latest stored checkpoint covering it. ExportError when none does.
    """
    seq = _label_seq(ledger, label_id)
    if checkpoint_note is None:
        covering = [c for c in ledger.checkpoints() if c.size > seq]
        if not covering:
            raise ExportError(
                f"no signed checkpoint covers the label's entry (seq {seq}); run `gradledger checkpoint` first"
            )
        checkpoint_note = covering[-1].note
    cp = note.parse_checkpoint_note(checkpoint_note)
    if cp.origin != ledger.origin:
        raise note.OriginError(
            f"the checkpoint is for origin {cp.origin!r}, this ledger is {ledger.origin!r}"
        )
    if cp.size <= seq:
        raise ExportError(f"the checkpoint (size {cp.size}) does not cover the label's entry (seq {seq})")
    if cp.size > ledger.size or ledger.root(cp.size) != cp.root:
        raise note.InclusionError(
            f"this ledger does not match the checkpoint (size {cp.size}): it was truncated or rewritten"
        )
    e = ledger.entry(seq)
    data = e.leaf_data()
    proof = ledger.prove(seq, cp.size)
    if merkle.leaf_hash(data) != proof.leaf_hash or not proof.verify():
        raise note.InclusionError(
            f"entry seq {seq} as stored is not the one in the tree; run gradledger verify"
        )
    return note.format_tlog_proof(seq, proof.hashes, checkpoint_note, extra=data)


def verify_label_proof(text: str | bytes, public_key: Any, label_id: str | None = None) -> dict[str, Any]:
    """Verify a ``prove --label`` proof; return the annotation entry body. Raises note errors (exit 1 / 2)."""
    tp = note.parse_tlog_proof(text)
    if not tp.extra:
        raise note.NoteError("tlog proof: no 'extra' line carrying the entry's leaf data")
    note.verify_tlog_proof(text, merkle.leaf_hash(tp.extra), public_key)
    try:
        obj = json.loads(tp.extra[len(ENTRY_PREFIX) :]) if tp.extra.startswith(ENTRY_PREFIX) else None
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or obj.get("kind") != "annotation" or obj.get("seq") != tp.index:
        raise note.InclusionError("the proved entry is not an annotation entry at the proof's index")
    body = _restore(obj["body"])
    if (
        label_id is not None
        and str(body.get("label_id")) != label_id.rpartition(":")[2]
        and str(body.get("label_id")) != label_id
    ):
        raise note.InclusionError(f"the proved entry is label {body.get('label_id')!r}, not {label_id!r}")
    return body
