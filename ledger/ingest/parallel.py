"""Parallel ingest of NDJSON exports: worker processes decode, normalise and encode; this process appends.

Why: one process tops out at ~14k labels/s on the benchmark export (73 us of CPU per label), about half of
it decoding, normalising and encoding labels (Python code per label) and half appending. Worker processes
do the per-label work on the other cores while this process keeps the single write transaction, the
duplicate and seed lookups and the file order (39 us per label left here; see BENCHMARKS.md).

Determinism: blocks of whole lines go out in file order and their results come back in the same order
(through a bounded window, so memory stays bounded), one element at a time into the same ``_Run`` the
serial path uses: entries, their order, chunk boundaries and counts are exactly the serial ones.

Exactness: a worker only handles lines that each hold one whole value that ``msgspec`` decodes (the
reader's own fast path). At any other line -- invalid JSON, a value spread over several lines, bad UTF-8,
an oversized line, an element msgspec refuses -- it stops and the parallel attempt is abandoned (its
transaction rolled back); the caller then ingests the file serially, which reads it exactly and words any
error. Errors found while normalising a decoded element (a missing field...) are the serial ones and are
raised as they are.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import msgspec

from ledger.ingest.context import ParseContext
from ledger.ingest.errors import IngestError
from ledger.ingest.pseudonym import Pseudonymizer

if TYPE_CHECKING:
    from ledger.ingest.pipeline import Encoded, _Run

BLOCK_BYTES = 1 << 19  # lines handed to a worker at a time (~200 labels of the benchmark export)
WORKER_NICE = 10  # workers run at a lower priority than the ingesting process (see worker_main)
MIN_BYTES = 64 << 20  # below this, starting worker processes costs more than it saves
_BOM = b"\xef\xbb\xbf"
_decode = msgspec.json.Decoder().decode


class Fallback(Exception):
    """The export needs the serial reader (see the module docstring); nothing is kept of this attempt."""


def default_workers(path: str) -> int:
    """Worker processes for an ingest of ``path`` when the caller does not say: none for small files."""
    if os.path.getsize(path) < MIN_BYTES:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


@dataclass
class WorkerSetup:
    """What a worker needs to turn lines into ``Encoded`` records exactly as ``_Run`` would."""

    source: str
    fmt: str
    path: str
    export_ref: dict[str, Any]
    mal_links: bool
    pseud: Pseudonymizer
    project: str | None
    checkpoint_seq: int | None
    model_version: str | None
    max_item_bytes: int


@dataclass
class BlockResult:
    """Per element of the block (in order): its encoded records and item keys; who was seen; new map pairs."""

    elements: list[list[Encoded]] = field(default_factory=list)
    items: list[list[str]] = field(default_factory=list)
    annotators: set[str] = field(default_factory=set)
    pairs: dict[str, str] = field(default_factory=dict)
    fallback_line: int | None = None


class _Worker:
    def __init__(self, setup: WorkerSetup) -> None:
        from ledger.ingest.pipeline import RecordEncoder

        self.setup = setup
        self.ctx = ParseContext(
            setup.pseud,
            project=setup.project,
            checkpoint_seq=setup.checkpoint_seq,
            model_version=setup.model_version,
        )
        self.encoder = RecordEncoder(setup.path, setup.export_ref, setup.mal_links, to_pickle=True)

    def block(self, data: bytes, first_line: int) -> BlockResult:
        from ledger.ingest.pipeline import parse_element

        s = self.setup
        out = BlockResult()
        for n, raw in enumerate(data.split(b"\n")):
            if not raw.strip(b" \t\r"):
                continue
            line = first_line + n
            if len(raw) > s.max_item_bytes:
                out.fallback_line = line
                break
            try:
                element = _decode(raw)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                out.fallback_line = line
                break
            recs = parse_element(s.source, s.fmt, element, line, self.ctx, s.path, None)
            out.elements.append(self.encoder.encode(recs))
            out.items.append([r.item_id or r.global_key for r in recs])
        out.annotators, self.ctx.annotators = self.ctx.annotators, set()
        out.pairs = self.ctx.pseud.take_new_pairs()
        return out


def worker_main() -> None:
    """A worker process (started by ``Pool``): setup, then one result per block, in order, until EOF."""
    import traceback

    # The ingesting process (SQLite inserts, hashes, file order) is the critical path and the workers
    # usually outnumber the free cores: a lower priority keeps the scheduler from pausing the appender
    # for a worker (measured: ~3-5% more labels/s on 2 cores, BENCHMARKS.md "Annotation ingest").
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICE)
    out_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints go to stderr, never into the result stream
    inbox, outbox = Connection(0, writable=False), Connection(out_fd, readable=False)
    worker = _Worker(inbox.recv())
    # Everything alive now (the imported library: ~10^5 objects) stays alive: keep it out of the garbage
    # collector's full passes, which otherwise re-traverse it while the worker allocates per label (~5-7%
    # of a worker's CPU, BENCHMARKS.md "Annotation ingest").
    gc.freeze()
    while True:
        try:
            data, first_line = inbox.recv()
        except EOFError:
            return
        try:
            outbox.send(("ok", worker.block(data, first_line)))
        except IngestError as exc:
            outbox.send(("error", exc))
        except Exception:  # noqa: BLE001 - a bug: report it whole to the writing process
            outbox.send(("crash", traceback.format_exc()))


class Pool:
    """Worker processes fed in turn, blocks in file order, read back in the same order.

    Plain subprocesses talking pickles over their stdin/stdout rather than ``multiprocessing.Pool``: a
    spawned pool re-imports the caller's ``__main__`` (scripts without a main guard fail), and a forked one
    would copy a process that holds an open write transaction and perhaps other threads' locks.

    Started before the ingest hashes the export (``ledger.ingest.pipeline``): each worker spends ~0.5-0.9 s
    of CPU importing the library, which then overlaps the ~1 s hash pass over a 1 GB export instead of
    following it. ``setup`` is sent when it is known (``run_blocks``). Use as a context manager: leaving it
    kills whatever still runs.
    """

    def __init__(self, workers: int) -> None:
        boot = "import sys; sys.path[:0] = sys.argv[1:]; from ledger.ingest.parallel import worker_main; worker_main()"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.to: list[Connection] = []
        self.back: list[Connection] = []
        self.closed = False
        try:
            for _ in range(workers):
                p = subprocess.Popen(
                    [sys.executable, "-c", boot, *sys.path], stdin=subprocess.PIPE, stdout=subprocess.PIPE
                )
                self.procs.append(p)
                self.to.append(Connection(os.dup(p.stdin.fileno()), readable=False))  # type: ignore[union-attr]
                self.back.append(Connection(os.dup(p.stdout.fileno()), writable=False))  # type: ignore[union-attr]
        except BaseException:
            self.close(ok=False)
            raise

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(ok=False)

    def close(self, ok: bool) -> None:
        """End the workers: at EOF of their input (``ok``) or killed. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for c in self.to:
            c.close()
        for p in self.procs:
            if not ok:
                p.kill()
            p.stdin.close()  # type: ignore[union-attr]
            p.wait()
            p.stdout.close()  # type: ignore[union-attr]
        for c in self.back:
            c.close()


def start_pool(workers: int) -> Pool | None:
    """``Pool(workers)``, or None when no processes can be had here (limits, sandbox): ingest serially."""
    try:
        return Pool(workers)
    except OSError:
        return None


def run_blocks(run: _Run, setup: WorkerSetup, pool: Pool) -> tuple[str, int]:
    """Feed every line of ``run.path`` through the ``pool``'s workers into ``run``; returns (sha256, size).

    Raises ``Fallback`` when the serial reader must take over, ``IngestError`` as the serial path would.
    A feeder thread reads and sends blocks (at most ``window`` ahead of the results taken); this thread takes
    the results in order and appends. The pool is closed on return (its workers cannot be used again).
    """
    reader = BlockReader(setup.path, setup.max_item_bytes)
    workers = len(pool.procs)
    try:
        for c in pool.to:
            c.send(setup)
    except OSError:  # a worker already died (it could not start): the serial path needs none
        pool.close(ok=False)
        raise Fallback from None
    window = threading.Semaphore(2 * workers + 2)
    sent: queue.Queue[tuple[str, Any]] = queue.Queue()
    stop = threading.Event()

    def feed() -> None:
        try:
            for k, block in enumerate(reader):
                while not window.acquire(timeout=0.5):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                pool.to[k % workers].send(block)
                sent.put(("block", k % workers))
            sent.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the taking thread, which raises it
            sent.put(("raise", exc))

    feeder = threading.Thread(target=feed, name="gradledger-ingest-feeder", daemon=True)
    feeder.start()
    ok = False
    try:
        while True:
            what, arg = sent.get()
            if what == "end":
                break
            if what == "raise":
                raise arg
            try:
                status, res = pool.back[arg].recv()
            except EOFError:
                code = pool.procs[arg].wait()
                raise RuntimeError(
                    f"parallel ingest worker exited unexpectedly (exit status {code})"
                ) from None
            window.release()
            if status == "error":
                raise res
            if status == "crash":
                raise RuntimeError(f"parallel ingest worker failed:\n{res}")
            _take(run, res)
        ok = True
    finally:
        stop.set()
        pool.close(ok)
        feeder.join()
    return reader.sha256, reader.size


class BlockReader:
    """Whole lines of a file in blocks of about ``BLOCK_BYTES``, with the first line's number; hashes as it reads."""

    def __init__(self, path: str, max_item_bytes: int) -> None:
        self.path = path
        self.max_item_bytes = max_item_bytes
        self.size = 0
        self._hash = hashlib.sha256()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        line = 1
        rest = b""
        with open(self.path, "rb") as fh:
            first = True
            while True:
                raw = fh.read(BLOCK_BYTES)
                self.size += len(raw)
                self._hash.update(raw)
                if first:
                    first = False
                    if raw.startswith(_BOM):
                        raw = raw[len(_BOM) :]
                if not raw:
                    if rest:
                        yield rest, line
                    return
                data = rest + raw
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # no line end yet: one long line
                    if len(data) > self.max_item_bytes + 2:
                        raise Fallback  # the serial reader refuses it with bounded reads
                    rest = data
                    continue
                block, rest = data[:cut], data[cut:]
                yield block, line
                line += block.count(b"\n")


def first_element(path: str, max_item_bytes: int) -> Any:
    """The first value of an NDJSON file if its first non-blank line holds exactly one (else ``Fallback``)."""
    with open(path, "rb") as fh:
        start = True
        while raw := fh.readline(max_item_bytes + 1):
            if start and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            start = False
            if not raw.strip(b" \t\r\n"):
                continue
            if len(raw) > max_item_bytes or raw.lstrip(b" \t\r").startswith(b"["):
                raise Fallback  # oversized, or a JSON array export: the serial reader
            try:
                return _decode(raw)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                raise Fallback from None
    raise Fallback  # empty: the serial reader


def _take(run: _Run, res: BlockResult) -> None:
    run.ctx.annotators |= res.annotators
    run.ctx.pseud.add_pairs(res.pairs)
    for encs, keys in zip(res.elements, res.items, strict=True):
        run.add_encoded(encs, keys)
    if res.fallback_line is not None:
        raise Fallback
