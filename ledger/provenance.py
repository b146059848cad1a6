"""Dataset manifests: training example id → the label record(s) behind it, resolved to ``LabelProvenance``.

A ``manifest`` entry (body v1) pins, for every example, the seqs of the ``annotation`` (or ``suggestion``,
for model-produced labels) entries it was trained on, so a later re-export of the same label cannot
silently change what a training run is said to have used::

    {"name": "train-v3", "digest": <sha256 of RFC 8785 bytes of "examples">,
     "examples": {"ex-1": {"labels": [{"seq": 17, "label_id": "9001", "source": "labelstudio"}],
                           "content_sha256": "...", "domain": "news", "rights": "withdrawn"}}}

``Manifest.load`` builds the example → ``LabelProvenance`` dict once (one batched read of the pinned
entries), so lookups in the training loop are plain dict hits.

Consensus is converted to [0, 1] from the platform's own scale, per record, with its method named; scores
from different platforms or methods are never averaged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from ledger import schema
from ledger.canonical import canonical_json, decode_body
from ledger.ingest import index as _index
from ledger.store import Ledger

MANIFEST_V = 1
_SOURCES = ("labelbox", "labelstudio", "jsonl")
_CONSENSUS_NAMES = ("consensus", "agreement")
_READ_CHUNK = 500


class ManifestError(ValueError):
    """A manifest cannot be created or loaded (unknown label id, ambiguous id, no such manifest)."""


@dataclass(frozen=True)
class LabelProvenance:
    example_id: str
    label_id: str | None  # source label id (the first label when an example has several)
    label_seq: int | None  # seq of the `annotation` (or `suggestion`) entry
    annotator: str | None  # HMAC pseudonym, never an identity
    producer: str | None  # "human" | "model" | "program"
    source: str | None  # "labelbox" | "labelstudio" | "jsonl"
    consensus: float | None  # in [0, 1], converted from the platform's own scale (not averaged)
    consensus_method: str | None  # e.g. "labelbox.consensus_score", "labelstudio.agreement"
    review: str | None  # "approve" | "reject" | "fix" (the latest decision)
    gold: bool
    domain: str | None  # tag from the record or the manifest
    rights: str | None  # e.g. "withdrawn"
    value: object  # the label value
    # Additions (defaults keep the contract's positional fields unchanged):
    label_seqs: tuple[int, ...] = ()  # every label entry the example maps to, in manifest order
    annotators: tuple[str | None, ...] = ()  # their human producers' pseudonyms (None: model/program)
    content_sha256: str | None = None  # item content hash given at manifest creation
    status: str | None = None  # "submitted" | "skipped" | "draft" of the first label


def _consensus(scores: list[dict[str, Any]]) -> tuple[float | None, str | None]:
    for name in _CONSENSUS_NAMES:
        for s in scores:
            if s.get("name") == name:
                lo, hi = float(s["min"]), float(s["max"])
                return (float(s["value"]) - lo) / (hi - lo), s.get("method")
    return None, None


def _latest_review(reviews: list[dict[str, Any]]) -> str | None:
    best: tuple[str, int] | None = None
    decision = None
    for i, r in enumerate(reviews):
        if r.get("decision") is None:
            continue
        key = (r.get("at") or "", i)
        if best is None or key >= best:
            best, decision = key, r["decision"]
    return decision


def _normalise_mapping(mapping: Mapping[str, Any]) -> dict[str, tuple[list[str], str | None]]:
    out: dict[str, tuple[list[str], str | None]] = {}
    for ex, ref in mapping.items():
        if not isinstance(ex, str) or not ex:
            raise ManifestError(f"example id {ex!r}: must be a non-empty string")
        content = None
        if isinstance(ref, Mapping):
            content = ref.get("content_sha256")
            ref = ref.get("label_ids", ref.get("label_id"))
        ids = [ref] if isinstance(ref, str | int) and not isinstance(ref, bool) else ref
        if not isinstance(ids, list | tuple) or not ids or not all(isinstance(i, str | int) for i in ids):
            raise ManifestError(
                f"example {ex!r}: expected a label id, a list of label ids, or {{'label_ids': [...]}}"
            )
        if content is not None and not isinstance(content, str):
            raise ManifestError(f"example {ex!r}: content_sha256 must be a hex string")
        out[ex] = ([str(i) for i in ids], content)
    return out


def _resolve_labels(ledger: Ledger, refs: set[str]) -> dict[str, dict[str, Any]]:
    """label ref → {"seq", "label_id", "source"}; accepts ``source:label_id`` to pick one source."""
    plain: dict[str, list[tuple[str, int, str]]] = {}
    with ledger.engine.connect() as conn:
        candidates = set(refs)
        for r in refs:
            head, sep, tail = r.partition(":")
            if sep and head in _SOURCES:
                candidates.add(tail)
        for kind in ("annotation", "suggestion"):
            for (src, ref), (seq, _) in _index.lookup(conn, kind, candidates).items():
                plain.setdefault(ref, []).append((src, seq, kind))
            if all(r in plain for r in refs):
                break
        conn.rollback()
    out: dict[str, dict[str, Any]] = {}
    for r in refs:
        hits = plain.get(r)
        head, sep, tail = r.partition(":")
        if not hits and sep and head in _SOURCES:
            hits = [h for h in plain.get(tail, []) if h[0] == head]
            r_id = tail
        else:
            r_id = r
        if not hits:
            raise ManifestError(f"label id {r!r} is not in the ledger (ingest its export first)")
        ann = [h for h in hits if h[2] == "annotation"] or hits
        sources = {h[0] for h in ann}
        if len(sources) > 1:
            raise ManifestError(
                f"label id {r!r} exists in several sources ({', '.join(sorted(sources))}); write it as 'source:{r_id}'"
            )
        src, seq, _ = max(ann, key=lambda h: h[1])  # the latest revision of that label
        out[r] = {"seq": seq, "label_id": r_id, "source": src}
    return out


def _read_bodies(ledger: Ledger, seqs: list[int]) -> dict[int, tuple[str, dict[str, Any]]]:
    e = schema.entries
    out: dict[int, tuple[str, dict[str, Any]]] = {}
    uniq = sorted(set(seqs))
    with ledger.engine.connect() as conn:
        for i in range(0, len(uniq), _READ_CHUNK):
            q = select(e.c.seq, e.c.kind, e.c.body).where(e.c.seq.in_(uniq[i : i + _READ_CHUNK]))
            for seq, kind, body in conn.execute(q):
                out[int(seq)] = (kind, decode_body(bytes(body)))
        conn.rollback()
    return out


class Manifest:
    """A ``manifest`` entry, resolved: ``manifest[example_id] -> LabelProvenance``."""

    def __init__(self, seq: int, name: str, digest: str, provenance: dict[str, LabelProvenance]) -> None:
        self.seq = seq
        self.name = name
        self.digest = digest
        self._prov = provenance

    def __getitem__(self, example_id: str) -> LabelProvenance:
        try:
            return self._prov[example_id]
        except KeyError:
            raise KeyError(
                f"example {example_id!r} is not in manifest {self.name!r} (seq {self.seq}, {len(self._prov)} examples)"
            ) from None

    def __contains__(self, example_id: object) -> bool:
        return example_id in self._prov

    def __len__(self) -> int:
        return len(self._prov)

    def __iter__(self) -> Iterator[str]:
        return iter(self._prov)

    def get(self, example_id: str, default: LabelProvenance | None = None) -> LabelProvenance | None:
        return self._prov.get(example_id, default)

    def items(self) -> Iterator[tuple[str, LabelProvenance]]:
        return iter(self._prov.items())

    def __repr__(self) -> str:
        return f"Manifest(seq={self.seq}, name={self.name!r}, examples={len(self._prov)})"

    # -- creating / loading -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        ledger: Ledger,
        name: str,
        mapping: Mapping[str, Any],
        domains: Mapping[str, str] | None = None,
        *,
        rights: Mapping[str, str] | None = None,
    ) -> Manifest:
        """Append a ``manifest`` entry. ``mapping``: example id → label id | [label ids] |
        ``{"label_ids": [...], "content_sha256": hex}``; a label id may be written ``source:id``.
        ``domains`` / ``rights``: per-example tags (e.g. rights ``"withdrawn"``). Raises ManifestError."""
        if not isinstance(name, str) or not name:
            raise ManifestError("manifest name must be a non-empty string")
        norm = _normalise_mapping(mapping)
        for tag, d in (("domains", domains), ("rights", rights)):
            for ex in d or {}:
                if ex not in norm:
                    raise ManifestError(f"{tag}: example {ex!r} is not in the mapping")
        ledger.ensure_indexers()  # the ingest_refs table exists even if nothing was ingested yet
        resolved = _resolve_labels(ledger, {r for ids, _ in norm.values() for r in ids})
        examples: dict[str, Any] = {}
        for ex, (ids, content) in norm.items():
            rec: dict[str, Any] = {"labels": [resolved[r] for r in ids]}
            if content is not None:
                rec["content_sha256"] = content
            if domains and ex in domains:
                rec["domain"] = domains[ex]
            if rights and ex in rights:
                rec["rights"] = rights[ex]
            examples[ex] = rec
        digest = hashlib.sha256(canonical_json(examples, "examples")).hexdigest()
        seq = ledger.append("manifest", {"name": name, "digest": digest, "examples": examples}, v=MANIFEST_V)
        return cls._build(ledger, seq, name, digest, examples)

    @classmethod
    def load(cls, ledger: Ledger, name_or_seq: str | int) -> Manifest:
        """The manifest at a seq, or the latest one with that name."""
        if isinstance(name_or_seq, int) and not isinstance(name_or_seq, bool):
            entry = ledger.entry(name_or_seq)
            if entry.kind != "manifest":
                raise ManifestError(f"entry {name_or_seq} is a {entry.kind!r} entry, not a manifest")
            body = entry.body
            seq = entry.seq
        else:
            found = None
            for entry in ledger.entries(kind="manifest", payloads=False):
                if entry.body.get("name") == name_or_seq:
                    found = entry
            if found is None:
                raise ManifestError(f"no manifest named {name_or_seq!r} in {ledger.location}")
            body, seq = found.body, found.seq
        digest = hashlib.sha256(canonical_json(body["examples"], "examples")).hexdigest()
        if digest != body["digest"]:
            raise ManifestError(f"manifest seq {seq}: stored digest does not match its examples")
        return cls._build(ledger, seq, body["name"], digest, body["examples"])

    @classmethod
    def _build(cls, ledger: Ledger, seq: int, name: str, digest: str, examples: dict[str, Any]) -> Manifest:
        bodies = _read_bodies(ledger, [lab["seq"] for ex in examples.values() for lab in ex["labels"]])
        prov: dict[str, LabelProvenance] = {}
        for ex, rec in examples.items():
            labels = rec["labels"]
            first_kind, b = bodies[labels[0]["seq"]]
            producers = []
            for lab in labels:
                k, lb = bodies[lab["seq"]]
                human = k == "annotation" and lb["producer"]["kind"] == "human"
                producers.append(lb["producer"]["id"] if human else None)
            if first_kind == "annotation":
                consensus, method = _consensus(b.get("scores", []))
                prov[ex] = LabelProvenance(
                    example_id=ex,
                    label_id=b["label_id"],
                    label_seq=labels[0]["seq"],
                    annotator=b["producer"]["id"] if b["producer"]["kind"] == "human" else None,
                    producer=b["producer"]["kind"],
                    source=b["source"],
                    consensus=consensus,
                    consensus_method=method,
                    review=_latest_review(b.get("reviews", [])),
                    gold=bool(b.get("gold")),
                    domain=rec.get("domain", b.get("domain")),
                    rights=rec.get("rights", b.get("rights")),
                    value=b.get("value"),
                    label_seqs=tuple(lab["seq"] for lab in labels),
                    annotators=tuple(producers),
                    content_sha256=rec.get("content_sha256"),
                    status=b.get("status"),
                )
            else:  # a model suggestion used directly as the training label
                prov[ex] = LabelProvenance(
                    example_id=ex,
                    label_id=b["suggestion_id"],
                    label_seq=labels[0]["seq"],
                    annotator=None,
                    producer="model",
                    source=b["source"],
                    consensus=None,
                    consensus_method=None,
                    review=None,
                    gold=False,
                    domain=rec.get("domain"),
                    rights=rec.get("rights"),
                    value=b.get("value"),
                    label_seqs=tuple(lab["seq"] for lab in labels),
                    annotators=tuple(producers),
                    content_sha256=rec.get("content_sha256"),
                    status=None,
                )
        return cls(seq, name, digest, prov)
