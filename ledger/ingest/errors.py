"""Typed ingest errors: one line naming file, line, field and reason (the CLI prints it and exits 2)."""

from __future__ import annotations


class IngestError(ValueError):
    """An export could not be ingested. Nothing was appended.

    ``str(err)`` is the one-line message ``FILE:LINE: FIELD: REASON`` (line and field omitted when unknown).
    """

    def __init__(
        self, path: str, line: int | None, field: str | None, reason: str, *, item: int | None = None
    ) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.reason = reason
        self.item = item  # 0-based position of the element in a JSON array export, when known
        super().__init__(self._format())

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # Exceptions pickle as cls(*args) = cls(message): rebuild from the fields instead (parallel ingest
        # raises these in worker processes and re-raises them here).
        return (_rebuild, (self.path, self.line, self.field, self.reason, self.item))

    def _format(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
        if self.item is not None:
            where += f" (item {self.item})"
        parts = [where]
        if self.field:
            parts.append(f"field {self.field!r}")
        parts.append(self.reason.replace("\n", " "))
        return ": ".join(parts)


def _rebuild(path: str, line: int | None, field: str | None, reason: str, item: int | None) -> IngestError:
    return IngestError(path, line, field, reason, item=item)


class FieldError(ValueError):
    """Raised by parsers while normalising one element; the reader adds file and line."""

    def __init__(self, field: str | None, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field else reason)


class PseudonymKeyError(ValueError):
    """The pseudonym key file is missing, malformed or readable by others."""
