"""Progress display for long commands: a bar (known amount of work) or a ticking timer (unknown amount).

Shown only to a person watching: when both stdout and stderr are terminals and the command was not asked
for ``--json``. Piped output, redirected output and JSON output stay byte-for-byte free of it. The display
goes to stderr, so even when shown it never mixes into what a command prints on stdout.

The bar is ``click.progressbar`` (maintained, handles terminal width and ETA). click has no indeterminate
mode, so :func:`activity` is a few lines of our own: a daemon thread that rewrites one stderr line with the
elapsed time until the wrapped call returns. It is for library calls that report no progress (ingest,
verify): it says that work is going on and for how long, and claims no fraction done.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

import click

T = TypeVar("T")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


def wanted(as_json: bool = False) -> bool:
    """True when a progress display should be shown: interactive terminal, human-readable output."""
    return not as_json and _isatty(sys.stdout) and _isatty(sys.stderr)


class Stages:
    """A bar over named stages of a command (``advance(label)`` after each); silent when not shown."""

    def __init__(self, bar: Any | None) -> None:
        self._bar = bar

    def advance(self, label: str | None = None, n: int = 1) -> None:
        if self._bar is None:
            return
        if label is not None:
            self._bar.label = label
        self._bar.update(n)


@contextlib.contextmanager
def stages(total: int, label: str, *, show: bool, file: TextIO | None = None) -> Iterator[Stages]:
    """``with stages(5, "report", show=wanted(as_json)) as s: ... s.advance("plots")``."""
    if not show:
        yield Stages(None)
        return
    with click.progressbar(length=total, label=label, file=file or sys.stderr, show_eta=False) as bar:
        yield Stages(bar)


def iterate(
    items: Iterable[T], *, length: int | None, label: str, show: bool, file: TextIO | None = None
) -> Iterator[T]:
    """Yield ``items`` unchanged, advancing a bar of ``length`` per item when shown."""
    if not show:
        yield from items
        return
    with click.progressbar(items, length=length, label=label, file=file or sys.stderr) as bar:
        yield from bar


@contextlib.contextmanager
def activity(label: str, *, show: bool, file: TextIO | None = None, interval: float = 0.2) -> Iterator[None]:
    """Rewrite ``label ... 3.4 s`` on one stderr line while the body runs; erase it afterwards."""
    if not show:
        yield
        return
    out = file or sys.stderr
    stop = threading.Event()
    start = time.monotonic()
    width = 0

    def tick() -> None:
        nonlocal width
        while not stop.wait(interval):
            text = f"{label} ... {time.monotonic() - start:.1f} s"
            width = max(width, len(text))
            out.write("\r" + text)
            out.flush()

    thread = threading.Thread(target=tick, name="gradledger-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if width:
            out.write("\r" + " " * width + "\r")
            out.flush()
