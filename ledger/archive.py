"""Archival of verified old steps: payload bytes move to compressed segment files; the ledger keeps their digests.

Why this works without touching the Merkle tree: a leaf commits to each payload's *descriptor* (dtype, shape,
sha256, size), not to its bytes. Archiving a run's old ``step`` entries therefore

1. checks the ledger (full verify) and, entry by entry, that each leaf hash rebuilt from the stored columns
   matches and each payload's bytes hash to their stored sha256;
2. writes the bytes to segment files ``DIR/<first>-<last>.<sha256[:16]>.glseg.zip``: zip archives (random
   access to one payload) whose members ``<seq, 12 digits>/<payload name>`` hold the exact stored bytes,
   compressed with Zstandard (``compression.zstd`` / ``zipfile.ZIP_ZSTANDARD``, Python >= 3.14, or their
   backport ``backports.zstd``), plus a ``segment.json`` member naming the ledger, run and range; each file
   is fsynced, re-read and re-hashed member by member, then renamed into place (and the directory fsynced);
3. in ONE transaction under the sequencer: checks the rows are unchanged, appends an ``archive`` entry whose
   body lists every segment's file name, sha256 and range (and a ``seqs`` payload: the archived entries), and
   sets the archived payload rows' ``data`` to empty bytes. Descriptors stay, so roots, inclusion and
   consistency proofs and signed checkpoints are unchanged; the ``archive`` entry is itself a leaf, so the
   segments' digests are in the signed log.

A crash or error before the commit leaves an unchanged ledger (plus, at worst, segment files no entry
names; a re-run writes byte-identical files under the same names). ``Ledger.verify`` (via ``verify_view``)
re-hashes archived payloads from their segments when the files are found, and otherwise counts them as
archived but not re-hashed (``VerifyResult.archive``). Readers (``Ledger.entries``, ``entry``, ``steps``)
get archived bytes back from the segments (``fill_archived``), or stand-ins whose bytes raise
``ArchivedPayloadError`` naming the archive entry and the segment.

Where segments are looked for: ``Ledger.archive_dir`` when set (``Ledger.open(..., archive_dir=DIR)``,
``--archive DIR``), then the directory the archive command wrote to, recorded in the ``meta`` row
``archive:<archive seq>`` (a hint only: every byte read from a segment is re-hashed).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Connection, func, select

from . import merkle, schema
from .canonical import EncodedPayload, canonical_json
from .errors import LedgerError, LedgerInputError
from .fileio import file_sha256, fsync_dir, write_atomic
from .store import payload_size

if sys.version_info >= (3, 14):  # pragma: no cover - the stdlib's zipfile gained Zstandard in 3.14
    import zipfile
else:  # the 3.14 zipfile, backported (``backports.zstd``)
    from backports.zstd import zipfile

if TYPE_CHECKING:
    from .store import Entry, Ledger

KIND = "archive"
FORMAT = 1
SEGMENT_SUFFIX = ".glseg.zip"
SEGMENT_HEADER = "segment.json"
DEFAULT_SEGMENT_BYTES = 256 << 20  # raw payload bytes per segment file (bounded files to copy and check)
DEFAULT_LEVEL = 3  # zstd's default: ~fast as the disk; higher levels gain little on float32 norms
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same input gives byte-identical segments
_IN_CHUNK = 400  # seqs per SQL IN (...) list


class ArchiveError(LedgerError):
    """Archiving was refused: the ledger does not verify, or a segment did not read back identically (exit 1)."""


class ArchiveInputError(LedgerInputError):
    """Unusable archive request: unknown run, bad ``before_seq``, an output path that is not a directory."""


class ArchivedPayloadError(LedgerInputError):
    """The bytes of an archived payload were asked for, but its segment file is not at hand (or is damaged)."""


def member_name(seq: int, name: str) -> str:
    """The zip member holding payload ``name`` of entry ``seq``."""
    return f"{seq:012d}/{name}"


# ------------------------------------------------------------------------------------------------------
# Where archived payloads are: the ``archive`` entries
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    file: str
    sha256: str
    size: int
    first_seq: int
    last_seq: int
    entries: int
    payloads: int
    bytes: int


@dataclass(frozen=True)
class ArchiveRecord:
    """One ``archive`` entry: its seq, segments, the archived seqs (sorted) and the recorded directory hint."""

    seq: int
    run: str
    segments: tuple[Segment, ...]
    seqs: np.ndarray
    hint: str | None


class ArchiveFormatError(Exception):
    """An ``archive`` entry that cannot be read (callers turn it into a verify failure or a read error)."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(reason)
        self.seq = seq


class ArchiveIndex:
    """Every ``archive`` entry of a ledger, with a seq -> (archive, segment) lookup by binary search."""

    def __init__(self, records: Sequence[ArchiveRecord]) -> None:
        self.records = list(records)
        parts, owners, segs = [], [], []
        for i, r in enumerate(self.records):
            counts = np.array([s.entries for s in r.segments], dtype=np.int64)
            parts.append(r.seqs)
            owners.append(np.full(len(r.seqs), i, dtype=np.int64))
            segs.append(np.repeat(np.arange(len(counts)), counts))
        allseqs = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        order = np.argsort(allseqs, kind="stable")
        self._seqs = allseqs[order]
        self._owner = (np.concatenate(owners) if owners else np.zeros(0, np.int64))[order]
        self._seg = (np.concatenate(segs) if segs else np.zeros(0, np.int64))[order]
        self.max_seq = max((r.seq for r in self.records), default=-1)

    def __len__(self) -> int:
        return len(self._seqs)

    def find(self, seq: int) -> tuple[ArchiveRecord, Segment] | None:
        i = int(np.searchsorted(self._seqs, seq))
        if i < len(self._seqs) and int(self._seqs[i]) == seq:
            r = self.records[int(self._owner[i])]
            return r, r.segments[int(self._seg[i])]
        return None

    def archived(self, seqs: Iterable[int]) -> set[int]:
        """The given seqs that some archive entry holds."""
        return {s for s in seqs if self.find(s) is not None}

    @classmethod
    def load(cls, conn: Connection, after: int = -1) -> list[ArchiveRecord]:
        """The ``archive`` entries with seq > ``after``, parsed (``ArchiveFormatError`` if one is malformed)."""
        e, p, m = schema.entries, schema.payloads, schema.meta
        rows = conn.execute(
            select(e.c.seq, e.c.body).where(e.c.kind == KIND, e.c.seq > after).order_by(e.c.seq)
        ).all()
        if not rows:
            return []
        hints = {
            k: v for k, v in conn.execute(select(m.c.key, m.c.value).where(m.c.key.like("archive:%"))).all()
        }
        seq_rows: dict[int, tuple[str, str, bytes]] = {}
        wanted = [int(r[0]) for r in rows]
        for lo in range(0, len(wanted), _IN_CHUNK):
            q = select(p.c.seq, p.c.dtype, p.c.shape, p.c.data).where(
                p.c.seq.in_(wanted[lo : lo + _IN_CHUNK]), p.c.name == "seqs"
            )
            for s, dt, sh, data in conn.execute(q):
                seq_rows[int(s)] = (dt, sh, bytes(data))
        return [_parse_record(int(s), bytes(body), seq_rows.get(int(s)), hints) for s, body in rows]


def _parse_record(
    seq: int, body: bytes, seqs_row: tuple[str, str, bytes] | None, hints: dict[str, str]
) -> ArchiveRecord:
    try:
        b = json.loads(body)
        segs = tuple(
            Segment(
                str(s["file"]),
                str(s["sha256"]),
                int(s["size"]),
                int(s["first_seq"]),
                int(s["last_seq"]),
                int(s["entries"]),
                int(s["payloads"]),
                int(s["bytes"]),
            )
            for s in b["segments"]
        )
        if seqs_row is None or seqs_row[0] != "<i8":
            raise ValueError("no <i8 'seqs' payload")
        seqs = np.frombuffer(seqs_row[2], dtype="<i8").astype(np.int64)
        if sum(s.entries for s in segs) != len(seqs) or (len(seqs) > 1 and bool(np.any(np.diff(seqs) <= 0))):
            raise ValueError("'seqs' does not match the segments' entry counts or is not increasing")
        return ArchiveRecord(seq, str(b["run"]), segs, seqs, hints.get(f"archive:{seq}"))
    except (ValueError, KeyError, TypeError) as exc:
        raise ArchiveFormatError(seq, f"archive entry {seq} is malformed ({exc})") from exc


# ------------------------------------------------------------------------------------------------------
# Reading segments
# ------------------------------------------------------------------------------------------------------


class SegmentFiles:
    """Finds and opens segment files (a few kept open), reads members; for verify also checks whole-file digests."""

    def __init__(self, explicit: Path | None, keep: int = 4) -> None:
        self.explicit = explicit
        self.keep = keep
        self._open: dict[str, zipfile.ZipFile] = {}
        self._paths: dict[tuple[int, str], Path | None] = {}

    def dirs(self, rec: ArchiveRecord) -> list[Path]:
        out = [self.explicit] if self.explicit is not None else []
        if rec.hint and (not out or Path(rec.hint) != out[0]):
            out.append(Path(rec.hint))
        return out

    def path(self, rec: ArchiveRecord, seg: Segment) -> Path | None:
        key = (rec.seq, seg.file)
        if key not in self._paths:
            found = None
            for d in self.dirs(rec):
                if (d / seg.file).is_file():
                    found = d / seg.file
                    break
            self._paths[key] = found
        return self._paths[key]

    def where(self, rec: ArchiveRecord) -> str:
        d = self.dirs(rec)
        return ", ".join(str(x) for x in d) if d else "no directory (none given, none recorded)"

    def zip(self, path: Path) -> zipfile.ZipFile:
        key = str(path)
        zf = self._open.get(key)
        if zf is None:
            if len(self._open) >= self.keep:
                old = next(iter(self._open))
                self._open.pop(old).close()
            zf = self._open[key] = zipfile.ZipFile(path)
        return zf

    def read(self, path: Path, seq: int, name: str) -> bytes:
        return self.zip(path).read(member_name(seq, name))

    def close(self) -> None:
        for zf in self._open.values():
            zf.close()
        self._open.clear()


# ------------------------------------------------------------------------------------------------------
# Verify hook (called by Ledger.verify in its read snapshot)
# ------------------------------------------------------------------------------------------------------


class VerifyView:
    """Checks archived payload rows for ``Ledger._verify_entries``: re-hash from the segment when found.

    ``check`` raises the verifier's ``_Bad`` (exact seq) for a payload that is empty without an archive entry
    holding it, a member that is missing, unreadable or hashes wrong; ``finish`` raises for a segment whose
    whole-file sha256 differs from its archive entry although every payload in it matched.
    """

    def __init__(self, index: ArchiveIndex, files: SegmentFiles) -> None:
        from .store import _Bad

        self._bad = _Bad
        self.index = index
        self.files = files
        self.payloads = 0
        self.rehashed = 0
        self.bytes_hashed = 0
        self.entries: set[int] = set()
        self.missing: dict[str, str] = {}  # segment file -> where it was looked for
        self._digest_checked: set[tuple[int, str]] = set()  # (archive seq, segment file) whole-file hashed
        self._digest_bad: list[tuple[int, str]] = []

    def check(self, seq: int, name: str, dtype: str, shape: str, sha: bytes) -> int:
        size = payload_size(dtype, shape)
        if size <= 0:
            raise self._bad(seq, f"entry {seq}: payload {name!r} bytes do not match their stored sha256")
        found = self.index.find(seq)
        if found is None:
            raise self._bad(
                seq,
                f"entry {seq}: payload {name!r} bytes are missing from the database and no archive entry holds entry {seq}",
            )
        rec, seg = found
        self.payloads += 1
        self.entries.add(seq)
        path = self.files.path(rec, seg)
        if path is None:
            if seg.file not in self.missing:  # once per segment, not per payload
                self.missing[seg.file] = self.files.where(rec)
            return size
        key = (rec.seq, seg.file)
        if key not in self._digest_checked:
            digest, _ = file_sha256(path)
            self._digest_checked.add(key)
            if digest != seg.sha256:
                self._digest_bad.append(key)
        try:
            data = self.files.read(path, seq, name)
        except KeyError as exc:
            raise self._bad(
                seq, f"entry {seq}: archived payload {name!r} is not in segment {seg.file} ({path.parent})"
            ) from exc
        except Exception as exc:  # zipfile.BadZipFile (CRC, header), zstd.ZstdError, OSError
            raise self._bad(
                seq,
                f"entry {seq}: archived payload {name!r} cannot be read from segment {seg.file} ({type(exc).__name__}: {exc})",
            ) from exc
        if len(data) != size or hashlib.sha256(data).digest() != sha:
            raise self._bad(
                seq,
                f"entry {seq}: archived payload {name!r} in segment {seg.file} does not match its stored sha256",
            )
        self.rehashed += 1
        self.bytes_hashed += size
        return size

    def finish(self) -> None:
        self.files.close()
        for aseq, file in self._digest_bad:
            raise self._bad(
                aseq,
                f"archive entry {aseq}: segment {file} does not hash to the sha256 the entry records "
                "(its payloads match, so bytes outside them changed: headers, names or extra members)",
            )

    def summary(self) -> dict[str, Any]:
        self.files.close()
        return {
            "archives": len(self.index.records),
            "entries": len(self.entries),
            "payloads": self.payloads,
            "rehashed": self.rehashed,
            "bytes_rehashed": self.bytes_hashed,
            "missing_segments": sorted(self.missing),
            "looked_in": sorted(set(self.missing.values())),
        }


def verify_view(ledger: Ledger, conn: Connection) -> VerifyView | None:
    """The verify hook for ``ledger`` (None when it has no ``archive`` entries: verify is unchanged)."""
    from .store import _Bad

    try:
        records = ArchiveIndex.load(conn)
    except ArchiveFormatError as exc:
        raise _Bad(exc.seq, str(exc)) from exc
    if not records:
        return None
    explicit = None if ledger.archive_dir is None else Path(ledger.archive_dir)
    return VerifyView(ArchiveIndex(records), SegmentFiles(explicit))


# ------------------------------------------------------------------------------------------------------
# Read hook (Ledger.entries / entry / indexer rebuilds)
# ------------------------------------------------------------------------------------------------------


class ArchivedPayload(EncodedPayload):
    """A payload whose bytes are archived and whose segment is not at hand: the descriptor reads, bytes raise.

    ``data`` (and so ``array()``, ``Entry.payloads``, ``Entry.payload_bytes``, ``Entry.leaf_data``) raises
    ``ArchivedPayloadError`` naming the archive entry, the segment file and where it was looked for.
    """

    _size: int
    _why: str

    def __init__(self, name: str, dtype: str, shape: str, sha256: bytes, size: int, why: str) -> None:
        for k, v in (("name", name), ("dtype", dtype), ("shape", shape), ("sha256", sha256)):
            object.__setattr__(self, k, v)
        object.__setattr__(self, "_size", size)
        object.__setattr__(self, "_why", why)

    @property
    def data(self) -> bytes:
        raise ArchivedPayloadError(self._why)

    def descriptor(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "sha256": self.sha256.hex(),
            "shape": json.loads(self.shape),
            "size": self._size,
        }

    def __repr__(self) -> str:
        return f"ArchivedPayload({self.name!r}, {self.dtype!r}, {self.shape})"


@dataclass
class _ReadState:
    index: ArchiveIndex
    files: SegmentFiles


_READERS: weakref.WeakKeyDictionary[Any, _ReadState] = weakref.WeakKeyDictionary()


def _state(ledger: Ledger, conn: Connection, need: Iterable[int]) -> _ReadState:
    explicit = None if ledger.archive_dir is None else Path(ledger.archive_dir)
    st = _READERS.get(ledger)
    if st is None or st.files.explicit != explicit:
        if st is not None:
            st.files.close()
        st = _READERS[ledger] = _ReadState(ArchiveIndex(()), SegmentFiles(explicit))
    if any(st.index.find(s) is None for s in need):  # archive entries appended since: load them
        try:
            new = ArchiveIndex.load(conn, st.index.max_seq)
        except ArchiveFormatError as exc:
            raise ArchivedPayloadError(f"{ledger.location}: {exc}") from exc
        if new:
            st.index = ArchiveIndex([*st.index.records, *new])
    return st


def fill_archived(ledger: Ledger, conn: Connection, chunk: list[Entry]) -> list[Entry]:
    """``chunk`` with archived payloads (empty in the database) read back from their segments.

    Each byte read is re-hashed against the stored sha256. When the segment is not found the payload becomes
    an ``ArchivedPayload`` stand-in (descriptor right, bytes raise), so listing entries still works.
    """
    from .store import Entry

    todo = [
        e
        for e in chunk
        for p in e._payloads
        if not isinstance(p, ArchivedPayload) and not p.data and payload_size(p.dtype, p.shape) > 0
    ]
    if not todo:
        return chunk
    st = _state(ledger, conn, {e.seq for e in todo})
    out = []
    for e in chunk:
        pls = list(e._payloads)
        changed = False
        for i, p in enumerate(pls):
            if isinstance(p, ArchivedPayload) or p.data:
                continue
            size = payload_size(p.dtype, p.shape)
            if size <= 0:
                continue
            pls[i] = _restore(ledger, st, e.seq, p, size)
            changed = True
        out.append(
            Entry(e.seq, e.kind, e.v, e.ts, e.prev, e.leaf_hash, e.body_bytes, pls, e._body) if changed else e
        )
    return out


def _restore(ledger: Ledger, st: _ReadState, seq: int, p: EncodedPayload, size: int) -> EncodedPayload:
    found = st.index.find(seq)
    if found is None:
        raise ArchivedPayloadError(
            f"{ledger.location}: entry {seq}: payload {p.name!r} has no bytes in the database and no archive "
            "entry holds it (the ledger is damaged; run `gradledger verify`)"
        )
    rec, seg = found
    path = st.files.path(rec, seg)
    if path is None:
        why = (
            f"{ledger.location}: entry {seq}: payload {p.name!r} is archived (archive entry {rec.seq}, "
            f"segment {seg.file}), which is not in {st.files.where(rec)}: give the segment directory "
            "(Ledger.open(..., archive_dir=DIR) / --archive DIR)"
        )
        return ArchivedPayload(p.name, p.dtype, p.shape, p.sha256, size, why)
    try:
        data = st.files.read(path, seq, p.name)
    except Exception as exc:
        raise ArchivedPayloadError(
            f"{path}: entry {seq}: archived payload {p.name!r} cannot be read ({type(exc).__name__}: {exc})"
        ) from exc
    if len(data) != size or hashlib.sha256(data).digest() != p.sha256:
        raise ArchivedPayloadError(
            f"{path}: entry {seq}: archived payload {p.name!r} does not match its stored sha256 (damaged segment; run `gradledger verify`)"
        )
    return EncodedPayload(p.name, p.dtype, p.shape, data, p.sha256)


# ------------------------------------------------------------------------------------------------------
# Archiving
# ------------------------------------------------------------------------------------------------------


@dataclass
class ArchiveResult:
    """What ``archive_run`` did. Sizes in bytes; ``root`` is the tree root of ``size_before`` entries, unchanged."""

    run: str
    before_seq: int
    archive_seq: int | None = None
    entries: int = 0
    payloads: int = 0
    bytes: int = 0
    compressed_bytes: int = 0
    segments: list[dict[str, Any]] = field(default_factory=list)
    out_dir: str = ""
    manifest: str | None = None
    size_before: int = 0
    root: str = ""
    db_bytes_before: int | None = None
    db_bytes_after: int | None = None
    free_bytes_after: int | None = None
    vacuumed: bool = False
    verify_seconds: float = 0.0
    write_seconds: float = 0.0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for k in ("verify_seconds", "write_seconds", "seconds"):
            out[k] = round(out[k], 6)
        return out


Fault = Callable[[str], None]


def archive_run(
    ledger: Ledger,
    run: str,
    before_seq: int,
    out_dir: str | Path,
    *,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    level: int = DEFAULT_LEVEL,
    vacuum: bool = False,
    fault: Fault | None = None,
) -> ArchiveResult:
    """Archive the payloads of run ``run``'s ``step`` entries with seq < ``before_seq`` to ``out_dir``.

    Entries archived before are skipped. Refuses (``ArchiveError``) when the ledger does not verify or a
    segment does not read back identically; ``ArchiveInputError`` for an unknown run, a ``before_seq``
    outside ``(0, size]`` or an unusable directory. ``vacuum`` returns the freed space to the file system
    (SQLite ``VACUUM``; PostgreSQL ``VACUUM FULL payloads``, which locks the table while it runs); without it
    the freed pages are reused by later appends. ``fault`` is a test hook called with the name of each step.
    """
    t0 = time.perf_counter()
    hook: Fault = fault or (lambda _step: None)
    res = ArchiveResult(run=run, before_seq=before_seq)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ArchiveInputError(f"{out}: exists and is not a directory")
    if segment_bytes < 1:
        raise ArchiveInputError(f"segment size must be >= 1 byte, got {segment_bytes}")
    if not 1 <= level <= 22:
        raise ArchiveInputError(f"zstd level must be in 1..22, got {level}")
    n = ledger.size
    if not 0 < before_seq <= n:
        raise ArchiveInputError(f"--before-seq {before_seq} is not in [1, {n}] (the ledger has {n} entries)")
    if not any(e.body.get("run") == run for e in ledger.entries(kind="run", payloads=False)):
        raise ArchiveInputError(f"{ledger.location}: no run named {run!r}")

    # 1. the ledger verifies (payload bytes re-hashed); earlier archives' segments need not be at hand
    vres = ledger.verify()
    res.verify_seconds = vres.seconds
    if not vres.ok:
        raise ArchiveError(
            f"{ledger.location}: refusing to archive: verification failed at seq {vres.first_bad_seq}: {vres.reason}"
        )
    res.size_before = vres.size
    res.root = vres.root.hex() if vres.root else ""
    res.db_bytes_before = database_bytes(ledger)
    hook("verified")

    with ledger._read() as conn:
        index = ArchiveIndex(ArchiveIndex.load(conn))
    seqs = [
        e.seq
        for e in ledger.entries(kind="step", end=before_seq, payloads=False)
        if e.body.get("run") == run and index.find(e.seq) is None
    ]
    res.out_dir = str(out.resolve())
    if not seqs:
        res.seconds = time.perf_counter() - t0
        return res

    # 2. segment files, written, fsynced, re-read and renamed into place
    out.mkdir(parents=True, exist_ok=True)
    tw = time.perf_counter()
    expected: dict[int, list[tuple[str, bytes, int]]] = {}  # seq -> [(name, sha256, size)]
    segments: list[dict[str, Any]] = []
    for group in _groups(ledger, seqs, segment_bytes, expected):
        segments.append(_write_segment(out, ledger.origin, run, group, level))
        hook("segment-written")
    fsync_dir(out)
    res.write_seconds = time.perf_counter() - tw

    body = {
        "format": FORMAT,
        "run": run,
        "before_seq": before_seq,
        "kind": "step",
        "first_seq": seqs[0],
        "last_seq": seqs[-1],
        "entries": len(seqs),
        "payloads": sum(s["payloads"] for s in segments),
        "bytes": sum(s["bytes"] for s in segments),
        "compressed_bytes": sum(s["size"] for s in segments),
        "compression": f"zip+zstd/{level}",
        "segments": segments,
    }
    manifest = out / f"{seqs[0]:012d}-{seqs[-1]:012d}.manifest.json"
    write_atomic(manifest, canonical_json(body) + b"\n")
    hook("manifest-written")

    # 3. one transaction: rows unchanged, the archive entry, payload bytes emptied, the directory hint
    from .store import NewEntry

    p = schema.payloads
    with ledger.appending() as app:
        conn = app.connection
        later = ArchiveIndex(ArchiveIndex.load(conn, index.max_seq))
        if later.archived(seqs):
            raise ArchiveError("another archive of these entries committed meanwhile; nothing was changed")
        for lo in range(0, len(seqs), _IN_CHUNK):
            part = seqs[lo : lo + _IN_CHUNK]
            q = select(p.c.seq, p.c.name, p.c.sha256, func.length(p.c.data)).where(p.c.seq.in_(part))
            got: dict[int, list[tuple[str, bytes, int]]] = {}
            for s, name, sha, length in conn.execute(q.order_by(p.c.seq, p.c.name)):
                got.setdefault(int(s), []).append((name, bytes(sha), int(length)))
            for s in part:
                if got.get(s, []) != expected.get(s, []):
                    raise ArchiveError(
                        f"entry {s}: its payload rows changed while the segments were written; nothing was changed"
                    )
        aseq = app.append_many([NewEntry(KIND, body, {"seqs": np.asarray(seqs, dtype="<i8")})])[0]
        hook("entry-appended")
        for lo in range(0, len(seqs), _IN_CHUNK):
            conn.execute(p.update().where(p.c.seq.in_(seqs[lo : lo + _IN_CHUNK])).values(data=b""))
        conn.execute(schema.meta.insert(), [{"key": f"archive:{aseq}", "value": res.out_dir}])
        hook("payloads-emptied")
    hook("committed")

    res.archive_seq = aseq
    res.entries = len(seqs)
    res.payloads = body["payloads"]
    res.bytes = body["bytes"]
    res.compressed_bytes = body["compressed_bytes"]
    res.segments = segments
    res.manifest = str(manifest.resolve())
    if vacuum:
        reclaim(ledger)
        res.vacuumed = True
    res.db_bytes_after = database_bytes(ledger)
    res.free_bytes_after = free_bytes(ledger)
    res.seconds = time.perf_counter() - t0
    return res


def _groups(
    ledger: Ledger, seqs: Sequence[int], limit: int, expected: dict[int, list[tuple[str, bytes, int]]]
) -> Iterator[list[tuple[int, list[EncodedPayload]]]]:
    """The entries' payloads in segment-sized groups, each entry's leaf and payload hashes re-checked."""
    group: list[tuple[int, list[EncodedPayload]]] = []
    size = 0
    for e in _entries_with_payloads(ledger, seqs):
        if merkle.leaf_hash(e.leaf_data()) != e.leaf_hash:
            raise ArchiveError(
                f"entry {e.seq}: its stored columns no longer hash to its leaf; nothing was changed"
            )
        pls = list(e._payloads)
        for pl in pls:
            if hashlib.sha256(pl.data).digest() != pl.sha256 or payload_size(pl.dtype, pl.shape) != len(
                pl.data
            ):
                raise ArchiveError(
                    f"entry {e.seq}: payload {pl.name!r} no longer matches its sha256; nothing was changed"
                )
        expected[e.seq] = [(pl.name, pl.sha256, len(pl.data)) for pl in pls]
        nbytes = sum(len(pl.data) for pl in pls)
        if group and size + nbytes > limit:
            yield group
            group, size = [], 0
        group.append((e.seq, pls))
        size += nbytes
    if group:
        yield group


def _entries_with_payloads(ledger: Ledger, seqs: Sequence[int]) -> Iterator[Entry]:
    """The entries ``seqs`` with their stored payload bytes, read in short transactions (no archive hook)."""
    from .store import _read_chunk

    for lo in range(0, len(seqs), _IN_CHUNK):
        part = list(seqs[lo : lo + _IN_CHUNK])
        with ledger._read() as conn:
            got = _read_chunk(conn, None, part[0], part[-1] + 1, len(part), True, only=part)
        yield from got


def _info(name: str, level: int) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    zi.compress_type = zipfile.ZIP_ZSTANDARD
    zi.compress_level = level
    zi.external_attr = 0o644 << 16
    return zi


def _write_segment(
    out: Path, origin: str, run: str, group: list[tuple[int, list[EncodedPayload]]], level: int
) -> dict[str, Any]:
    """Write one segment to a temporary name, fsync, re-read every member, rename; return its description."""
    first, last = group[0][0], group[-1][0]
    tmp = out / f".{first:012d}-{last:012d}.{uuid.uuid4().hex}.tmp"
    raw = npay = 0
    try:
        with open(tmp, "wb") as fh:
            with zipfile.ZipFile(fh, "w") as zf:
                for seq, pls in group:
                    for pl in pls:
                        zf.writestr(_info(member_name(seq, pl.name), level), pl.data)
                        raw += len(pl.data)
                        npay += 1
                header = {
                    "format": FORMAT,
                    "origin": origin,
                    "run": run,
                    "first_seq": first,
                    "last_seq": last,
                    "entries": len(group),
                    "payloads": npay,
                    "bytes": raw,
                }
                zf.writestr(_info(SEGMENT_HEADER, level), canonical_json(header) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        # re-read from the file system: every member back, byte for byte (by digest), and nothing else
        with zipfile.ZipFile(tmp) as zf:
            names = set(zf.namelist())
            want = {member_name(seq, pl.name) for seq, pls in group for pl in pls} | {SEGMENT_HEADER}
            if names != want:
                raise ArchiveError(f"{tmp}: the segment read back with other members; nothing was changed")
            for seq, pls in group:
                for pl in pls:
                    if hashlib.sha256(zf.read(member_name(seq, pl.name))).digest() != pl.sha256:
                        raise ArchiveError(
                            f"{tmp}: entry {seq} payload {pl.name!r} read back differently; nothing was changed"
                        )
        digest, size = file_sha256(tmp)
        final = out / f"{first:012d}-{last:012d}.{digest[:16]}{SEGMENT_SUFFIX}"
        os.replace(tmp, final)  # an orphan of a crashed run with this name has these same bytes
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise
    return {
        "file": final.name,
        "sha256": digest,
        "size": size,
        "first_seq": first,
        "last_seq": last,
        "entries": len(group),
        "payloads": npay,
        "bytes": raw,
    }


# ------------------------------------------------------------------------------------------------------
# Space
# ------------------------------------------------------------------------------------------------------


def database_bytes(ledger: Ledger) -> int:
    """SQLite: the database file's pages (page_count x page_size). PostgreSQL: the total relation size (with
    TOAST and indexes) of every table in the ledger's schema (core and indexer tables)."""
    with ledger.engine.connect() as conn:
        if ledger.dialect == "sqlite":
            pc = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
            ps = conn.exec_driver_sql("PRAGMA page_size").scalar_one()
            return int(pc) * int(ps)
        return int(
            conn.exec_driver_sql(
                "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = current_schema() AND c.relkind = 'r'"
            ).scalar_one()
        )


def free_bytes(ledger: Ledger) -> int | None:
    """SQLite: bytes on the free list (reused by later appends; VACUUM returns them). PostgreSQL: None."""
    if ledger.dialect != "sqlite":
        return None
    with ledger.engine.connect() as conn:
        fc = conn.exec_driver_sql("PRAGMA freelist_count").scalar_one()
        ps = conn.exec_driver_sql("PRAGMA page_size").scalar_one()
        return int(fc) * int(ps)


def reclaim(ledger: Ledger) -> None:
    """Return freed space to the file system: SQLite ``VACUUM`` (+ WAL truncate), PostgreSQL ``VACUUM FULL``."""
    if ledger.dialect == "sqlite":
        raw = ledger.engine.raw_connection()
        try:
            con = raw.driver_connection
            assert con is not None
            con.execute("VACUUM")  # the driver connection is in autocommit mode (isolation_level=None)
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            raw.close()
        return
    with ledger.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM FULL payloads")
