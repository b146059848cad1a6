"""The README's quickstart runs verbatim from a fresh clone of the repository (what is committed, not the
working tree), with this virtualenv's python, and prints what the README says it prints."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quickstart(readme: str) -> str:
    """The fenced ```python block right after the ``<!-- quickstart -->`` marker."""
    m = re.search(r"<!-- quickstart -->\s*```python\n(.*?)```", readme, flags=re.S)
    assert m, "README.md has no ```python block after <!-- quickstart -->"
    return m.group(1)


def test_quickstart_block_is_short_and_uses_the_real_api() -> None:
    code = quickstart((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(code.splitlines()) <= 35
    for name in (
        "instrument.attach",
        "Ledger.create",
        "ingest.",
        "Manifest.create",
        "sign_checkpoint",
        "query.",
    ):
        assert name in code, name


def test_quickstart_runs_verbatim_from_a_fresh_clone(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    code = quickstart((clone / "README.md").read_text(encoding="utf-8"))
    script = clone / "readme_quickstart.py"
    script.write_text(code, encoding="utf-8")
    # the script's directory (the clone) comes first on sys.path, ahead of the editable install of ROOT
    probe = "import importlib.util as u; print(*(u.find_spec(m).origin for m in ('ledger', 'instrument', 'audit')))"
    env = {**os.environ, "PYTHONPATH": str(clone), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    where = subprocess.run(
        [sys.executable, "-c", probe], cwd=clone, env=env, capture_output=True, text=True, timeout=120
    )
    assert where.returncode == 0, where.stderr
    assert all(Path(p).resolve().is_relative_to(clone.resolve()) for p in where.stdout.split()), where.stdout
    res = subprocess.run(
        [sys.executable, script.name], cwd=clone, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0] == "intact: True", res.stdout
    rows = [ln.split() for ln in lines[1:]]
    assert len(rows) == 3 and all(r[0].startswith("anon:") for r in rows), res.stdout
    shares = {r[0]: (r[2], r[-1]) for r in rows}
    # as the README says: the low-consensus annotator has no head share and a mean routing weight of 0.00
    assert ("0.0%", "0.00") in shares.values(), res.stdout
    assert "@example.com" not in res.stdout
    db = b"".join(
        p.read_bytes() for p in clone.glob("quickstart.db*") if not p.name.endswith("pseudonym-key")
    )
    assert b"@example.com" not in db
