"""``gradledger report``: one self-contained, e-mail-free HTML file with every section, on a real tiny ledger
(tests/support_analytics.py) with a profile entry, a signed checkpoint and a second, DP-trained run."""

from __future__ import annotations

import base64
import json
import re
import shutil
import sqlite3
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import pytest
from click.testing import CliRunner
from threadpoolctl import threadpool_limits

from audit import report as rp
from audit.cli import main
from ledger import keys
from ledger.store import Ledger
from tests.support_analytics import ANNOTATORS, RUN, add_dp_run, build_copy
from tests.support_digits import one_thread

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


class _Refs(HTMLParser):
    """Every tag name and every attribute that can load or link a resource."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.refs: list[tuple[str, str, str]] = []
        self.sections: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "action", "poster", "background"):
                self.refs.append((tag, name, value or ""))
            if tag == "section" and name == "id":
                self.sections.append(value or "")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("report")
    with threadpool_limits(1), one_thread():
        b = build_copy(tmp_path_factory, tmp)
        res = cli("profile", b.path, "--run", RUN, "--data", b.data, "--n-boot", "100", "--json")
        assert res.exit_code == 0, res.output
        add_dp_run(b.path)
        files = keys.save_keypair(tmp / "keys")
        with Ledger.open(b.path) as led:
            led.sign_checkpoint(keys.load_private_key(files.private), keys.DEFAULT_KEY_NAME)
        out = tmp / "report.html"
        res = cli("report", b.path, "--run", RUN, "-o", out, "--pubkey", files.public, "--json")
        yield {"built": b, "tmp": tmp, "result": res, "html": out, "pub": files.public}


def test_report_is_written_with_a_json_summary(env: dict[str, Any]) -> None:
    res = env["result"]
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["output"] == str(env["html"]) and out["chain_ok"] is True and out["run"] == RUN
    assert out["bytes"] == len(env["html"].read_bytes())
    assert list(out["sections"]) == list(rp.SECTION_IDS)
    assert out["sections"]["integrity"] == "ok" and out["sections"]["profile"] == "ok"
    assert res.stderr == ""  # --json: no progress output


def test_report_is_self_contained(env: dict[str, Any]) -> None:
    page = env["html"].read_text(encoding="utf-8")
    p = _Refs()
    p.feed(page)
    assert "http://" not in page and "https://" not in page
    assert not {"script", "link", "iframe", "object", "embed"} & set(p.tags)
    assert "@import" not in page and "url(" not in page
    imgs = [v for tag, name, v in p.refs if tag == "img"]
    assert len(imgs) == 3  # consensus bands, depth heatmap, trajectories (no DP in this run: no epsilon plot)
    for tag, name, value in p.refs:
        if tag == "img":
            assert value.startswith("data:image/png;base64,")
            assert base64.b64decode(value.split(",", 1)[1]).startswith(PNG_MAGIC)
        else:
            assert tag == "a" and name == "href" and value.startswith("#"), (tag, name, value)
            assert value[1:] in p.sections


def test_report_contains_every_section_with_its_explanation(env: dict[str, Any]) -> None:
    page = env["html"].read_text(encoding="utf-8")
    p = _Refs()
    p.feed(page)
    assert p.sections == list(rp.SECTION_IDS)
    assert page.count('class="meaning"') == len(rp.SECTION_IDS)
    for title in ("Is the record intact?", "What was trained", "Which labels shaped which layers",
                  "Where the model stays uncertain", "memorisation candidates", "What to send back to annotators",
                  "Who labelled the data", "Which rules routed which labels", "Privacy budget"):  # fmt: skip
        assert title in page
    with Ledger.open(env["built"].path) as led:
        cp = led.checkpoints()[-1]
        res = led.verify()
    integrity = page[page.index('id="integrity"') : page.index('id="run"')]
    assert "intact" in integrity and res.root.hex() in integrity and cp.root.hex() in integrity
    assert "signature checked against the given public key" in integrity
    routing = page[page.index('id="routing"') : page.index('id="privacy"')]
    assert "consensus-routing" in routing and "low-consensus" in routing and "sha256:" in routing
    assert "not</b> enabled" in page[page.index('id="privacy"') :]  # this run had no DP


def test_report_memorisation_shows_the_baselines_beside_the_score(env: dict[str, Any]) -> None:
    page = env["html"].read_text(encoding="utf-8")
    sec = page[page.index('id="memorization"') : page.index('id="priorities"')]
    assert "Mean loss (rank)" in sec and "Margin AUM (rank)" in sec and "Score (1 = average)" in sec
    rows = json.loads(cli("memorization", env["built"].path, "--run", RUN, "--top", 3, "--json").stdout)[
        "rows"
    ]
    for r in rows:
        assert f"<td>{r['example_id']}</td>" in sec
        assert (
            f"{float(r['mean_loss']):.3g} ({r['loss_rank']})" in sec
            and f"{float(r['aum']):.3g} ({r['aum_rank']})" in sec
        )
    assert "Check against reviewers" in sec


def test_report_has_no_email_addresses_only_pseudonyms(env: dict[str, Any]) -> None:
    page = env["html"].read_text(encoding="utf-8")
    assert not rp.EMAIL.search(page)
    for who in ANNOTATORS:
        assert who not in page and who.split("@")[0] + "@" not in page
    assert len(set(re.findall(r"anon:[0-9a-f]{32}", page))) == 3  # the three annotators, by pseudonym


def test_text_escapes_and_drops_email() -> None:
    assert rp.text("<script>alert(1)</script> ana@example.com & co") == (
        "&lt;script&gt;alert(1)&lt;/script&gt; [e-mail removed] &amp; co"
    )


def test_report_dp_run_shows_epsilon_per_step(env: dict[str, Any]) -> None:
    out = env["tmp"] / "dp.html"
    res = cli("report", env["built"].path, "--run", "digits-dp", "-o", out)
    assert res.exit_code == 0 and "wrote" in res.stdout
    page = out.read_text(encoding="utf-8")
    with Ledger.open(env["built"].path) as led:
        eps = [s.eps for s in led.steps("digits-dp")]
    sec = page[page.index('id="privacy"') :]
    assert eps and eps[-1] is not None and f"epsilon = {eps[-1]:.4g}</b>" in sec
    assert "data:image/png;base64," in sec and "rdp" in sec
    assert "No routing policy" in page[page.index('id="routing"') :]
    assert 'id="profile"' in page and "No depth profile has been recorded" in page


def test_report_on_a_tampered_ledger_is_written_and_exits_1(env: dict[str, Any]) -> None:
    bad = env["tmp"] / "tampered.db"
    shutil.copy(env["built"].path, bad)
    with sqlite3.connect(bad) as c:
        seq, data = c.execute(
            "SELECT seq, data FROM payloads WHERE name = 'grad_norms' ORDER BY seq LIMIT 1"
        ).fetchone()
        b = bytearray(data)
        b[5] ^= 0x01
        c.execute("UPDATE payloads SET data = ? WHERE seq = ? AND name = 'grad_norms'", (bytes(b), seq))
    out = env["tmp"] / "bad.html"
    res = cli("report", bad, "--run", RUN, "-o", out, "--json")
    assert res.exit_code == 1
    assert json.loads(res.stdout)["chain_ok"] is False
    page = out.read_text(encoding="utf-8")
    assert "FAILED" in page and f"at seq {seq:,}" in page and "do not rely on the figures below" in page


def test_report_bad_pubkey_and_unwritable_output_exit_2(env: dict[str, Any]) -> None:
    bogus = env["tmp"] / "bogus.pub"
    bogus.write_text("not a key\n")
    out = env["tmp"] / "x.html"
    res = cli("report", env["built"].path, "--run", RUN, "-o", out, "--pubkey", bogus)
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and not out.exists()
    res = cli("report", env["built"].path, "--run", RUN, "-o", env["tmp"] / "no" / "dir" / "r.html")
    assert res.exit_code == 2 and "cannot write" in res.stderr
