"""The ``gradledger`` command: a click group; each command family lives in its own ``cli_*`` module."""

from __future__ import annotations

import sys
from typing import NoReturn

import click


def fail(msg: str, code: int = 2) -> NoReturn:
    """The CLI's one-line error: ``error: ...`` on stderr, then exit ``code`` (2 = usage / unreadable input)."""
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


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
