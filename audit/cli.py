"""The ``gradledger`` command: a click group; each command family lives in its own ``cli_*`` module."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn, TypeVar

import click

if TYPE_CHECKING:
    from ledger.store import Ledger

T = TypeVar("T")


def fail(msg: str, code: int = 2) -> NoReturn:
    """The CLI's one-line error: ``error: ...`` on stderr, then exit ``code`` (2 = usage / unreadable input)."""
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def with_ledger(
    path: str,
    fn: Callable[[Ledger], T],
    errors: tuple[type[Exception], ...] = (),
    verbatim: tuple[type[Exception], ...] = (),
) -> T:
    """Open LEDGER and return ``fn(ledger)``, closing it after. Input problems become one line and exit 2:
    ``verbatim`` errors (which name their own file and field) as they are, ``LedgerError`` and ``errors``
    prefixed with the ledger path."""
    from ledger.errors import LedgerError
    from ledger.store import Ledger

    try:
        led = Ledger.open(path)
    except LedgerError as exc:
        fail(str(exc))
    try:
        return fn(led)
    except verbatim as exc:
        fail(str(exc))
    except Exception as exc:
        if isinstance(exc, (*errors, LedgerError)):
            fail(f"{path}: {exc}")
        raise
    finally:
        led.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gradledger")
def main() -> None:
    """gradledger: tamper-evident provenance from annotation exports through training, layer by layer.

    Exit codes: 0 ok / intact, 1 verification failed, 2 usage or unreadable input.
    """


def _register() -> None:
    """Import the command modules so their commands attach to ``main``."""
    # Each module calls ``main.add_command`` (or uses ``@main.command``) at import time.
    from audit import (  # noqa: F401
        cli_analytics,
        cli_archive,
        cli_demo,
        cli_export,
        cli_influence,
        cli_ingest,  # noqa: F401
        cli_ledger,
        cli_query,
        cli_report,
    )


if __name__ == "__main__":  # ``python -m audit.cli``: run the one registered copy of the group
    from audit.cli import main as _main

    _main()
else:
    _register()
