"""Ingest one export file into a ledger: stream, normalise, pseudonymise, link, append atomically.

Atomicity with bounded memory: the whole ingest runs inside ONE ledger write transaction and appends in
chunks (``chunk`` records at a time) as it streams, so memory holds one chunk, not the export. Any error
(bad JSON at line N, a missing field, bad UTF-8, an oversized element, a file changed while reading) rolls
the transaction back: the ledger is left exactly as it was. The cost is that the ledger's write lock is held
for the duration of the ingest (other writers wait; SQLite's busy timeout is 120 s).

Entry order per export: the ``annotation`` / ``suggestion`` entries in file order, then one ``export``
entry that names the file (sha256, size, base name: never the directory) and carries the counts and the seq
range of what it added.

Re-ingest: an export whose sha256 is already in the ledger adds nothing (``already_ingested``); a record
whose (source, label id) is already stored with the same ``record_sha256`` is counted as a duplicate and
skipped, so overlapping exports of one project only add what changed.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, cast

from sqlalchemy import Connection

from ledger.canonical import CanonicalJSON, canonical_body
from ledger.errors import CanonicalError
from ledger.fileio import file_sha256
from ledger.ingest import generic_format as generic
from ledger.ingest import index as _index
from ledger.ingest import labelbox_format, labelstudio_format, parallel
from ledger.ingest.context import ParseContext
from ledger.ingest.errors import FieldError, IngestError
from ledger.ingest.pseudonym import Pseudonymizer, open_key
from ledger.ingest.reader import DEFAULT_MAX_ITEM_BYTES, ExportReader
from ledger.ingest.record import ANNOTATION_V, EXPORT_V, SUGGESTION_V, LabelRecord, Seed, SuggestionRecord
from ledger.store import Appender, Ledger, NewEntry

SOURCES = ("labelbox", "labelstudio", "jsonl")
DEFAULT_CHUNK = 2000


@dataclass(frozen=True)
class IngestSummary:
    """What one ingest did. ``records``/``suggestions`` count entries appended by this call."""

    path: str
    name: str
    source: str
    format: str | None
    sha256: str
    size: int
    records: int
    suggestions: int
    items: int
    annotators: int
    skipped: int
    drafts: int
    seeded: int
    duplicates: int
    already_ingested: bool
    export_seq: int | None
    first_seq: int | None
    last_seq: int | None
    pseudonym_key_id: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _ledger_file(ledger: Ledger) -> str | None:
    loc = str(ledger.location)
    return None if "://" in loc else loc


class Encoded(NamedTuple):
    """One parsed record, encoded: what the appending side needs (the record itself only when it must wait).

    A label whose seed links still have to be looked up in the ledger (a Label Studio ``parent_prediction``,
    a Labelbox feature id that may be a MAL uuid) keeps ``record`` and is encoded after the lookup; every
    other record arrives with its canonical body and ``record_sha256`` already computed (by a worker
    process in a parallel ingest).
    """

    kind: str  # "annotation" | "suggestion"
    ref: str  # label id | suggestion id
    line: int | None
    # canonical body bytes: CanonicalJSON, or plain bytes from a worker (they pickle ~3x faster)
    body: bytes | None
    digest: str | None
    status: str | None
    human: bool
    seeded: bool
    record: LabelRecord | SuggestionRecord | None


class RecordEncoder:
    """Turns parsed records into ``Encoded`` ones (picklable: parallel workers hold one each).

    ``to_pickle``: bodies as plain ``bytes`` (a worker's, sent to the ingesting process); otherwise they stay
    ``CanonicalJSON``, which the ledger takes as they are (no copy either way in the serial path).
    """

    def __init__(
        self, path: str, export_ref: dict[str, Any], mal_links: bool, to_pickle: bool = False
    ) -> None:
        self.path = path
        self.export_ref = export_ref
        self.mal_links = mal_links  # the ledger holds MAL suggestions: feature ids may link to them
        self.to_pickle = to_pickle

    def encode(self, recs: list[Any]) -> list[Encoded]:
        out = []
        for r in recs:
            if isinstance(r, SuggestionRecord):
                body, digest = self._encoded(r)
                out.append(
                    Encoded("suggestion", r.suggestion_id, r.line, body, digest, None, False, False, None)
                )
            elif any(s.suggestion_id is not None and s.seq is None for s in r.seeded_from) or (
                self.mal_links and r.seed_candidates
            ):
                out.append(Encoded("annotation", r.label_id, r.line, None, None, r.status,
                                   r.producer_kind == "human", False, r))  # fmt: skip
            else:
                body, digest = self._encoded(r)
                out.append(Encoded("annotation", r.label_id, r.line, body, digest, r.status,
                                   r.producer_kind == "human", bool(r.seeded_from), None))  # fmt: skip
        return out

    def _encoded(self, r: LabelRecord | SuggestionRecord) -> tuple[bytes, str]:
        cj, digest = self.encode_one(r)
        return (bytes(cj) if self.to_pickle else cj), digest

    def encode_one(self, r: LabelRecord | SuggestionRecord) -> tuple[CanonicalJSON, str]:
        """The record's canonical body bytes and ``record_sha256`` (bad fields name the record's line)."""
        try:
            return r.encode(self.export_ref)
        except FieldError as exc:
            raise IngestError(self.path, r.line, exc.field, exc.reason) from None
        except CanonicalError as exc:
            raise IngestError(self.path, r.line, None, f"cannot encode the record: {exc}") from None


class _Run:
    """State of one ingest inside the transaction."""

    def __init__(
        self, source: str, path: str, ledger: Ledger, ctx: ParseContext, chunk: int, sha: str, size: int
    ) -> None:
        self.source = source
        self.path = path
        self.ledger = ledger
        self.ctx = ctx
        self.chunk = chunk
        self.export_ref = {"sha256": sha, "size": size, "name": os.path.basename(path)}
        self.fmt: str | None = None
        self.pending: list[Encoded] = []
        self.records = self.suggestions = self.skipped = self.drafts = self.seeded = self.duplicates = 0
        self.items_counted = 0
        self.item_set: set[str] | None = None
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.conn: Connection | None = None
        self.app: Appender | None = None
        self.next_seq = 0
        self.labelbox_suggestions = False
        self.encoder = RecordEncoder(path, self.export_ref, False)

    # -- parsing ----------------------------------------------------------------------------------------
    def detect(self, element: Any, line: int, index: int, array: bool) -> None:
        """Settle the format from the first element (every later one must have the same shape)."""
        if self.fmt is not None:
            return
        if self.source == "labelbox":
            try:
                self.fmt = labelbox_format.detect(element)
            except FieldError as exc:
                raise IngestError(
                    self.path, line, exc.field, exc.reason, item=index if array else None
                ) from None
        elif self.source == "labelstudio":
            self.fmt = labelstudio_format.FORMAT
        else:
            self.fmt = generic.FORMAT_JSONL
        if self.fmt != "labelbox.export_v2":  # items counted by id; Export v2 counts data rows (lines)
            self.item_set = set()

    def parse(self, element: Any, line: int, index: int, array: bool) -> list[Any]:
        self.detect(element, line, index, array)
        return parse_element(
            self.source, self.fmt, element, line, self.ctx, self.path, index if array else None
        )

    def add(self, recs: list[Any]) -> None:
        self.add_encoded(self.encoder.encode(recs), [r.item_id or r.global_key for r in recs])

    def add_encoded(self, encs: list[Encoded], keys: list[str]) -> None:
        """Queue one element's encoded records; ``keys``: their item keys (a set, unless elements are counted)."""
        if self.item_set is None:
            self.items_counted += bool(encs)
        else:
            self.item_set.update(keys)
        self.pending.extend(encs)
        if len(self.pending) >= self.chunk:
            self.flush()

    # -- appending --------------------------------------------------------------------------------------
    def flush(self) -> None:
        recs, self.pending = self.pending, []
        if not recs:
            return
        assert self.conn is not None
        waiting = [e.record for e in recs if isinstance(e.record, LabelRecord)]
        known_labels = _index.lookup(
            self.conn, "annotation", [e.ref for e in recs if e.kind == "annotation"], self.source
        )
        known_suggs = _index.lookup(
            self.conn, "suggestion", [e.ref for e in recs if e.kind == "suggestion"], self.source
        )
        seed_ids = [s.suggestion_id for r in waiting for s in r.seeded_from if s.suggestion_id is not None]
        seed_sources = None if self.source == "jsonl" else self.source
        seeds = _index.lookup(self.conn, "suggestion", seed_ids, seed_sources) if seed_ids else {}
        model_labels = (
            _index.lookup(self.conn, "annotation", seed_ids, "jsonl")
            if seed_ids and self.source == "jsonl"
            else {}
        )
        mal: dict[str, int] = {}  # MAL uuid (ingested from Labelbox or recorded by gradledger) -> seq
        if self.labelbox_suggestions:
            cands = [c for r in waiting for c in r.seed_candidates]
            for (src, ref), (sseq, _) in (
                _index.lookup(self.conn, "suggestion", cands) if cands else {}
            ).items():
                if src in ("labelbox", "gradledger"):
                    mal[ref] = max(sseq, mal.get(ref, -1))
        local_digest: dict[tuple[str, str], str] = {}
        local_sugg_seq: dict[str, int] = {}
        entries: list[NewEntry] = []
        refs: list[tuple[str, str, str | None]] = []  # (kind, ref, digest) of each entry, for the index hints
        lines: list[int | None] = []
        for e in recs:
            seq = self.next_seq + len(entries)
            if e.kind == "suggestion":
                key = ("suggestion", e.ref)
                prior = local_digest.get(key) or known_suggs.get((self.source, e.ref), (0, None))[1]
                if prior == e.digest:
                    self.duplicates += 1
                    known = known_suggs.get((self.source, e.ref))
                    if known is not None:
                        local_sugg_seq.setdefault(e.ref, known[0])
                    continue
                assert e.body is not None and e.digest is not None
                local_digest[key] = e.digest
                local_sugg_seq[e.ref] = seq
                entries.append(NewEntry("suggestion", _whole_body(e.body), None, SUGGESTION_V))
                refs.append(("suggestion", e.ref, e.digest))
                lines.append(e.line)
                self.suggestions += 1
                continue
            body, digest, seeded = e.body, e.digest, e.seeded
            if isinstance(e.record, LabelRecord):
                r = e.record
                r.seeded_from = [self._resolve(s, local_sugg_seq, seeds, model_labels) for s in r.seeded_from]
                for c in r.seed_candidates:
                    hit = mal.get(c)
                    if hit is not None:
                        r.seeded_from.append(Seed(c, "mal", hit))
                body, digest = self.encoder.encode_one(r)
                seeded = bool(r.seeded_from)
            assert body is not None and digest is not None
            key = ("annotation", e.ref)
            prior = local_digest.get(key) or known_labels.get((self.source, e.ref), (0, None))[1]
            if prior == digest:
                self.duplicates += 1
                continue
            local_digest[key] = digest
            if not e.human:
                local_sugg_seq[e.ref] = seq  # a model/program label can seed a later one (generic format)
            entries.append(NewEntry("annotation", _whole_body(body), None, ANNOTATION_V))
            refs.append(("annotation", e.ref, digest))
            lines.append(e.line)
            self.records += 1
            self.skipped += e.status == "skipped"
            self.drafts += e.status == "draft"
            self.seeded += seeded
        self._append(entries, lines, refs)

    def _resolve(
        self, s: Seed, local: dict[str, int], seeds: dict[Any, Any], model_labels: dict[Any, Any]
    ) -> Seed:
        if s.suggestion_id is None or s.seq is not None:
            return s
        seq = local.get(s.suggestion_id)
        if seq is None:
            hits = [v[0] for (src, ref), v in seeds.items() if ref == s.suggestion_id]
            hits += [v[0] for (src, ref), v in model_labels.items() if ref == s.suggestion_id]
            seq = max(hits) if hits else None
        return Seed(s.suggestion_id, s.origin, seq)

    def _append(
        self, entries: list[NewEntry], lines: list[int | None], refs: list[tuple[str, str, str | None]]
    ) -> None:
        """Append ``entries``; ``refs``: (kind, ref, digest) of each, the index row it gets (``_index.hint_ref``)."""
        if not entries:
            return
        assert self.app is not None
        for i, (kind, ref, digest) in enumerate(refs):
            _index.hint_ref(self.next_seq + i, kind, self.source, ref, digest)
        try:
            seqs = self.app.append_many(entries)
        except CanonicalError as exc:
            raise self._encoding_error(entries, lines, exc) from None
        finally:
            _index.clear_hints()
        if seqs[0] != self.next_seq:  # pragma: no cover - the lock makes this impossible
            raise RuntimeError(f"sequencer moved during ingest: expected seq {self.next_seq}, got {seqs[0]}")
        self.first_seq = seqs[0] if self.first_seq is None else self.first_seq
        self.last_seq = seqs[-1]
        self.next_seq = seqs[-1] + 1

    def _encoding_error(
        self, entries: list[NewEntry], lines: list[int | None], exc: CanonicalError
    ) -> IngestError:
        """Name the line of the record that cannot be encoded (rare: re-encode the chunk one by one)."""
        for e, line in zip(entries, lines, strict=True):
            try:
                canonical_body(e.body)
            except CanonicalError as one:
                return IngestError(self.path, line, None, f"cannot encode the record: {one}")
        return IngestError(self.path, None, None, f"cannot encode the record: {exc}")


def _whole_body(body: bytes) -> Mapping[str, Any]:
    """A body given as its canonical bytes (``Ledger`` accepts ``CanonicalJSON`` for a whole body)."""
    return cast("Mapping[str, Any]", body if type(body) is CanonicalJSON else CanonicalJSON(body))


def parse_element(
    source: str, fmt: str | None, element: Any, line: int, ctx: ParseContext, path: str, item: int | None
) -> list[Any]:
    """Normalise one export element into records (``fmt`` settled by ``_Run.detect``)."""
    try:
        if source == "labelbox":
            assert fmt is not None
            return labelbox_format.parse(fmt, element, line, ctx)
        if source == "labelstudio":
            return labelstudio_format.parse(element, line, ctx)
        return generic.parse(element, line, ctx, fmt or generic.FORMAT_JSONL)
    except FieldError as exc:
        raise IngestError(path, line, exc.field, exc.reason, item=item) from None


def ingest(
    source: str,
    path: str | os.PathLike[str],
    ledger: Ledger | str | os.PathLike[str],
    *,
    project: str | None = None,
    pseudonym_key: str | os.PathLike[str] | Pseudonymizer | None = None,
    identity_map: str | os.PathLike[str] | None = None,
    max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES,
    checkpoint_seq: int | None = None,
    model_version: str | None = None,
    chunk: int = DEFAULT_CHUNK,
    announce: Any = None,
    workers: int | None = None,
    bulk: bool | None = None,
) -> IngestSummary:
    """Ingest one export file (``source``: labelbox | labelstudio | jsonl). Raises IngestError, appends nothing
    on any error. ``ledger`` may be an open Ledger or a path / URL (created if missing).

    ``workers``: processes that parse an NDJSON export in parallel (``ledger.ingest.parallel``; same entries
    as a serial ingest). None: one per core for exports of 64 MiB and more, else none; 0: serial.

    ``bulk``: append in ``Ledger.appending(bulk=True)`` (SQLite: pages written once, not twice; other
    connections wait for the ingest even to read). None: for exports of 64 MiB and more.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    if isinstance(ledger, Ledger):
        return _ingest(source, os.fspath(path), ledger, project, pseudonym_key, identity_map, max_item_bytes,
                       checkpoint_seq, model_version, chunk, announce, workers, bulk)  # fmt: skip
    with Ledger.open(os.fspath(ledger), create=True) as led:
        return _ingest(source, os.fspath(path), led, project, pseudonym_key, identity_map, max_item_bytes,
                       checkpoint_seq, model_version, chunk, announce, workers, bulk)  # fmt: skip


def _ingest(
    source: str,
    path: str,
    ledger: Ledger,
    project: str | None,
    pseudonym_key: str | os.PathLike[str] | Pseudonymizer | None,
    identity_map: str | os.PathLike[str] | None,
    max_item_bytes: int,
    checkpoint_seq: int | None,
    model_version: str | None,
    chunk: int,
    announce: Any,
    workers: int | None,
    bulk: bool | None,
) -> IngestSummary:
    if not os.path.isfile(path):
        raise IngestError(path, None, None, "no such file")
    pseud = (
        pseudonym_key
        if isinstance(pseudonym_key, Pseudonymizer)
        else open_key(pseudonym_key, _ledger_file(ledger), identity_map, announce=announce)
    )
    is_csv = source == "jsonl" and path.lower().endswith(".csv")
    if workers is None:
        workers = parallel.default_workers(path)
    pool, first = None, None
    if workers > 0 and source != "labelstudio" and not is_csv:
        try:  # Fallback unless its first line holds one whole value
            first = parallel.first_element(path, max_item_bytes)
        except parallel.Fallback:
            pass  # a JSON array, or a first line only the serial reader words: no workers to start
        else:
            pool = parallel.start_pool(workers)  # they import while this process hashes the export
    with _frozen_heap():
        with pool or contextlib.nullcontext():
            sha, size = file_sha256(path)
            if bulk is None:
                bulk = size >= parallel.MIN_BYTES
            if pool is not None:
                try:
                    return _ingest_once(source, path, ledger, pseud, project, max_item_bytes, checkpoint_seq,
                                        model_version, chunk, sha, size, is_csv, (pool, first), bulk)  # fmt: skip
                except parallel.Fallback:
                    pass  # rolled back: read the file serially, exactly (see ledger.ingest.parallel)
        return _ingest_once(source, path, ledger, pseud, project, max_item_bytes, checkpoint_seq,
                            model_version, chunk, sha, size, is_csv, None, bulk)  # fmt: skip


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Keep the objects that exist before the ingest out of the garbage collector's passes while it runs.

    Why: the ingest allocates millions of short-lived objects, and each full collection would re-traverse
    everything the process already holds (the imported libraries, the caller's data); ~2% of the ingesting
    process's CPU. ``gc.unfreeze`` hands them back afterwards. Skipped when the caller froze objects itself.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _ingest_once(
    source: str,
    path: str,
    ledger: Ledger,
    pseud: Pseudonymizer,
    project: str | None,
    max_item_bytes: int,
    checkpoint_seq: int | None,
    model_version: str | None,
    chunk: int,
    sha: str,
    size: int,
    is_csv: bool,
    parallel_from: tuple[parallel.Pool, Any] | None,
    bulk: bool,
) -> IngestSummary:
    """One attempt; ``parallel_from``: the worker pool and the export's first value (decoded once, by
    ``_ingest``), or None to read serially."""
    ctx = ParseContext(pseud, project=project, checkpoint_seq=checkpoint_seq, model_version=model_version)
    run = _Run(source, path, ledger, ctx, chunk, sha, size)
    reader: Any = None
    pool: parallel.Pool | None = None
    if parallel_from is not None:
        pool, first = parallel_from
        try:
            run.detect(first, 1, 0, False)
        except IngestError:
            raise parallel.Fallback from None  # the serial reader names the exact line
    elif is_csv:
        reader = generic.CsvReader(path, max_item_bytes=max_item_bytes)
        run.fmt = generic.FORMAT_CSV
        run.item_set = set()
    else:
        reader = ExportReader(path, max_item_bytes=max_item_bytes)
    # ONE write transaction for the whole export, appended in chunks as it streams (memory bounded by a
    # chunk); each chunk's duplicate and seed lookups read through the same connection, so they see the
    # chunks before it. Any error rolls back everything.
    with ledger.appending(bulk=bulk) as app:
        conn = app.connection
        seen = _index.lookup(conn, "export", [sha])
        if seen:
            (src, _), (seq, _) = next(iter(seen.items()))
            prior = _export_body(conn, seq)
            counts = prior.get("counts", {})
            return IngestSummary(
                path=path, name=os.path.basename(path), source=source, format=prior.get("format"), sha256=sha,
                size=size, records=0, suggestions=0, items=0, annotators=0, skipped=0, drafts=0, seeded=0,
                duplicates=int(counts.get("records", 0)) + int(counts.get("suggestions", 0)) + int(counts.get("duplicates", 0)),
                already_ingested=True, export_seq=seq, first_seq=None, last_seq=None, pseudonym_key_id=pseud.key_id,
            )  # fmt: skip
        run.conn, run.app = conn, app
        run.next_seq = app.size
        run.labelbox_suggestions = source == "labelbox" and (
            _index.has_any(conn, "suggestion", "labelbox") or _index.has_any(conn, "suggestion", "gradledger")
        )
        run.encoder = RecordEncoder(path, run.export_ref, run.labelbox_suggestions)
        if pool is not None:
            assert run.fmt is not None
            setup = parallel.WorkerSetup(source, run.fmt, path, run.export_ref, run.labelbox_suggestions, pseud,
                                         project, checkpoint_seq, model_version, max_item_bytes)  # fmt: skip
            read_sha, read_size = parallel.run_blocks(run, setup, pool)
        else:
            for line, idx, element in reader:
                run.add(run.parse(element, line, idx, reader.mode == "array"))
            read_sha, read_size = reader.sha256, reader.size
        run.flush()
        if read_sha != sha or read_size != size:
            raise IngestError(path, None, None, "the file changed while it was being ingested")
        items = run.items_counted if run.item_set is None else len(run.item_set)
        counts = {
            "records": run.records,
            "suggestions": run.suggestions,
            "items": items,
            "annotators": len(ctx.annotators),
            "skipped": run.skipped,
            "drafts": run.drafts,
            "seeded": run.seeded,
            "duplicates": run.duplicates,
        }
        export_body = {
            "source": source,
            "format": run.fmt,
            **run.export_ref,
            "project": project,
            "counts": counts,
            "first_seq": run.first_seq,
            "last_seq": run.last_seq,
            "pseudonym_key_id": pseud.key_id,
        }
        run._append(
            [NewEntry("export", export_body, None, EXPORT_V)],
            [None],
            [("export", sha, None)],
        )
        export_seq = run.last_seq
    pseud.flush_identity_map()
    first = run.first_seq if run.records + run.suggestions else None
    last = export_seq - 1 if first is not None and export_seq is not None else None
    return IngestSummary(
        path=path, name=os.path.basename(path), source=source, format=run.fmt, sha256=sha, size=size,
        records=run.records, suggestions=run.suggestions, items=items, annotators=len(ctx.annotators),
        skipped=run.skipped, drafts=run.drafts, seeded=run.seeded, duplicates=run.duplicates,
        already_ingested=False, export_seq=export_seq, first_seq=first, last_seq=last, pseudonym_key_id=pseud.key_id,
    )  # fmt: skip


def _export_body(conn: Connection, seq: int) -> dict[str, Any]:
    from sqlalchemy import select

    from ledger import schema
    from ledger.canonical import decode_body

    raw = conn.execute(select(schema.entries.c.body).where(schema.entries.c.seq == seq)).scalar()
    return decode_body(bytes(raw)) if raw is not None else {}
