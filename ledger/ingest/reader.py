"""Stream JSON elements out of an export file with bounded memory, exact line numbers and a running sha256.

Accepts the three shapes exports come in: a JSON array (Label Studio, Labelbox v1, MAL samples), a sequence
of JSON values such as NDJSON (Labelbox Export v2, MAL imports), and a single pretty-printed object.

Why hand-written rather than ``ijson``: ijson streams arrays but reports neither the line of an element nor
the position of a syntax error, and the ingest contract is a one-line error naming file, line and field.
This reader runs the C ``json`` decoder (``raw_decode``) over a sliding text buffer: it keeps at most one
element (capped by ``max_item_bytes``) plus one read chunk in memory and counts newlines as it goes.

NDJSON fast path: a line of a value sequence that holds one whole value is decoded by ``msgspec`` (about 3x
faster than ``json``; decoding was a fifth of ingest time). msgspec accepts exactly the JSON that ``json``
accepts and returns the same values, integers beyond 64 bits included (orjson would turn those into
floats), but it refuses a few things ``json`` reads (lone surrogate escapes, numbers that overflow a
double): any line msgspec refuses is decoded again by the ``json`` path, which also words every error.
``tests/test_ingest_reader.py`` compares the two paths.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

import msgspec

from ledger.ingest.errors import IngestError

DEFAULT_MAX_ITEM_BYTES = 16 * 1024 * 1024
CHUNK = 1 << 20
_WS = re.compile(r"[ \t\n\r]*")
_NEAR_END = 16  # a truncated token (literal, number, \u escape) fails at most this far before the end


class _BadConstant(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _BadConstant(name)


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_fast_decode = msgspec.json.Decoder().decode


class ExportReader:
    """Iterate ``(line, index, value)`` for every top-level element; ``sha256``/``size`` are final after."""

    def __init__(self, path: str | os.PathLike[str], *, max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> None:
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        self.max_item_bytes = max_item_bytes
        self.mode: str | None = None  # "array" | "sequence"
        self.size = 0
        self._hash = hashlib.sha256()
        self._fh: BinaryIO | None = None
        self._dec = codecs.getincrementaldecoder("utf-8")("strict")
        self._buf = ""
        self._pos = 0
        self._eof = False
        self._line = 1  # line number at self._line_pos
        self._line_pos = 0
        self._raw_newlines = 0  # newlines in all bytes read so far (for decode errors)
        self._first = True

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    # -- errors -------------------------------------------------------------------------------------------
    def error(self, line: int | None, field: str | None, reason: str, item: int | None = None) -> IngestError:
        return IngestError(self.path, line, field, reason, item=item)

    def _line_at(self, pos: int) -> tuple[int, int]:
        line = self._line + self._buf.count("\n", self._line_pos, pos)
        col = pos - self._buf.rfind("\n", 0, pos)
        return line, col

    # -- buffer -------------------------------------------------------------------------------------------
    def _fill(self, want: int = CHUNK) -> None:
        assert self._fh is not None
        if self._pos:
            # Drop consumed text, keeping the line counter in step.
            self._line += self._buf.count("\n", self._line_pos, self._pos)
            self._buf = self._buf[self._pos :]
            self._line_pos = 0
            self._pos = 0
        raw = self._fh.read(want)
        self.size += len(raw)
        self._hash.update(raw)
        self._eof = len(raw) == 0
        pending = self._dec.getstate()[0]
        try:
            text = self._dec.decode(raw, final=self._eof)
        except UnicodeDecodeError as exc:
            data = pending + raw
            line = self._raw_newlines + data.count(b"\n", 0, exc.start) + 1
            col = exc.start - data.rfind(b"\n", 0, exc.start)
            raise self.error(
                line, None, f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {col})"
            ) from None
        self._raw_newlines += raw.count(b"\n")
        if self._first and text:
            self._first = False
            if text.startswith("\ufeff"):
                text = text[1:]
        self._buf += text

    def _skip_ws(self) -> bool:
        """Advance past whitespace; False at end of input."""
        while True:
            self._pos = _WS.match(self._buf, self._pos).end()  # type: ignore[union-attr]
            if self._pos < len(self._buf):
                return True
            if self._eof:
                return False
            self._fill()

    def _element(self, index: int) -> tuple[int, Any]:
        start = self._pos
        line, _ = self._line_at(start)
        self._line += self._buf.count("\n", self._line_pos, start)
        self._line_pos = start
        if self.mode == "sequence":
            end = self._buf.find("\n", start)
            if end == -1 and self._eof:
                end = len(self._buf)
            if 0 <= end - start <= self.max_item_bytes:
                try:
                    obj = _fast_decode(self._buf[start:end])
                except (msgspec.DecodeError, RecursionError):
                    pass  # not one whole value on this line, or not what msgspec reads: the json path
                else:
                    self._pos = end
                    return line, obj
        while True:
            buf = self._buf
            try:
                obj, end = _decoder.raw_decode(buf, self._pos)
            except json.JSONDecodeError as exc:
                maybe_truncated = exc.msg.startswith("Unterminated string") or exc.pos >= len(buf) - _NEAR_END
                if maybe_truncated and not self._eof:
                    self._grow(line, index)
                    continue
                eline, col = self._line_at(exc.pos)
                raise self.error(eline, None, f"invalid JSON: {exc.msg} (column {col})", index) from None
            except _BadConstant as exc:
                raise self.error(line, None, f"invalid JSON: {exc} is not a JSON value", index) from None
            except RecursionError:
                raise self.error(line, None, "invalid JSON: nesting too deep", index) from None
            if end == len(buf) and not self._eof and not isinstance(obj, dict | list | str):
                self._grow(line, index)  # a number may continue in the next chunk
                continue
            if end - self._pos > self.max_item_bytes:
                raise self._too_big(line, index)
            self._pos = end
            return line, obj

    def _grow(self, line: int, index: int) -> None:
        if len(self._buf) - self._pos > self.max_item_bytes:
            raise self._too_big(line, index)
        self._fill(max(CHUNK, len(self._buf) - self._pos))

    def _too_big(self, line: int, index: int) -> IngestError:
        return self.error(
            line,
            None,
            f"element larger than the {self.max_item_bytes}-byte limit (max_item_bytes / --max-item-bytes)",
            index,
        )

    # -- iteration ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[int, int, Any]]:
        with open(self.path, "rb") as fh:
            self._fh = fh
            self._fill()
            if not self._skip_ws():
                self.mode = "sequence"
                return
            index = 0
            if self._buf[self._pos] == "[":
                self.mode = "array"
                self._pos += 1
                if not self._skip_ws():
                    raise self.error(self._line_at(self._pos)[0], None, "invalid JSON: unterminated array")
                if self._buf[self._pos] == "]":
                    self._pos += 1
                else:
                    while True:
                        line, obj = self._element(index)
                        yield line, index, obj
                        index += 1
                        if not self._skip_ws():
                            raise self.error(
                                self._line_at(self._pos)[0], None, "invalid JSON: unterminated array"
                            )
                        ch = self._buf[self._pos]
                        self._pos += 1
                        if ch == "]":
                            break
                        if ch != ",":
                            eline, col = self._line_at(self._pos - 1)
                            raise self.error(
                                eline,
                                None,
                                f"invalid JSON: expected ',' or ']' after an element (column {col})",
                            )
                        if not self._skip_ws():
                            raise self.error(
                                self._line_at(self._pos)[0], None, "invalid JSON: unterminated array"
                            )
                if self._skip_ws():
                    eline, col = self._line_at(self._pos)
                    raise self.error(eline, None, f"invalid JSON: extra data after the array (column {col})")
            else:
                self.mode = "sequence"
                while self._skip_ws():
                    line, obj = self._element(index)
                    yield line, index, obj
                    index += 1
            # Hash any bytes not yet read (there are none once EOF was seen, but be explicit).
            while not self._eof:
                self._fill()
