"""The README's CLI reference is generated from click and must match it: every command and option documented,
nothing documented that does not exist.

Regenerate the section after changing a command: ``.venv/bin/python tests/test_cli_reference.py --write``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import click

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"


def commands(
    group: click.Group, path: tuple[str, ...] = ("gradledger",)
) -> Iterator[tuple[str, click.Command]]:
    """Every leaf command as ("gradledger query layer", command), sorted."""
    for name in sorted(group.commands):
        cmd = group.commands[name]
        if isinstance(cmd, click.Group):
            yield from commands(cmd, (*path, name))
        else:
            yield " ".join((*path, name)), cmd


def _usage(name: str, cmd: click.Command) -> str:
    args = " ".join(p.human_readable_name for p in cmd.params if isinstance(p, click.Argument))
    return f"{name} [OPTIONS]{' ' + args if args else ''}"


def _option(p: click.Option) -> str:
    flags = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
    meta = "" if p.is_flag else f" {p.make_metavar(click.Context(click.Command('x')))}"
    extra = []
    if p.required:
        extra.append("required")
    if p.multiple:
        extra.append("repeatable")
    if p.show_default and p.default is not None and not p.is_flag:
        extra.append(f"default: {p.default}")
    help_text = " ".join((p.help or "").split())
    return f"- {flags}{meta}: {help_text}{' (' + '; '.join(extra) + ')' if extra else ''}"


def render() -> str:
    """The reference section (without the markers), from the live click tree."""
    from audit.cli import main

    out = [
        "Generated from the click definitions (`tests/test_cli_reference.py --write`); every command also has "
        "`--help`. Exit codes everywhere: 0 ok / intact, 1 verification failed, 2 usage or unreadable input.",
        "",
    ]
    for name, cmd in commands(main):
        out.append(f"#### `{name}`")
        out.append(f"`{_usage(name, cmd)}`: {cmd.get_short_help_str(limit=300)}")
        out.append("")
        opts = [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]
        out.extend(_option(p) for p in opts)
        if opts:
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def readme_section() -> str:
    text = README.read_text(encoding="utf-8")
    assert START in text and END in text, f"README.md has no {START} ... {END} section"
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def test_every_command_and_option_is_documented() -> None:
    from audit.cli import main

    section = readme_section()
    blocks = dict(re.findall(r"^#### `([^`]+)`\n(.*?)(?=^#### |\Z)", section, flags=re.S | re.M))
    documented = set(blocks)
    live = dict(commands(main))
    assert documented - set(live) == set(), f"documented but not a command: {documented - set(live)}"
    assert set(live) - documented == set(), f"commands missing from README: {set(live) - documented}"
    for name, cmd in live.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden:
                for o in p.opts:
                    assert f"`{o}`" in blocks[name], f"{name}: option {o} is not documented"
            if isinstance(p, click.Argument):
                assert p.human_readable_name in blocks[name], f"{name}: argument {p.human_readable_name}"
        documented_opts = set(re.findall(r"^- `(--?[\w-]+)`", blocks[name], flags=re.M))
        live_opts = {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts}
        assert documented_opts <= live_opts, f"{name}: documented options that do not exist"


def test_reference_is_current() -> None:
    """The section is exactly what the generator writes (help texts included)."""
    assert readme_section() == render(), (
        "README CLI reference is stale: run tests/test_cli_reference.py --write"
    )


def write() -> None:
    text = README.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{render()}{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    sys.path.insert(0, str(README.parent))
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        sys.stdout.write(render())
