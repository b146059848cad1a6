"""``gradledger memorization | profile | priorities`` on a real tiny run (tests/support_analytics.py).

Every figure the commands print is checked against an independent recomputation: baselines from the raw
step records, the review check with scikit-learn, the profile entry by re-running the probes on the
verified weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from audit import progress
from audit.cli import main
from audit.profiles import collect_activations, entropy_profile
from audit.profiles_ledger import settings_from_body
from audit.report import EMAIL
from instrument.sketch import StateStore
from ledger.records import checkpoints
from ledger.store import Ledger
from tests.support_analytics import RUN, Built, build_copy, digits_mlp
from tests.support_digits import one_thread

N_BOOT = "100"


def cli(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error_line(res: Any) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """BLAS and torch on one thread: the probes are small, and threads only contend on a shared machine."""
    with threadpool_limits(1), one_thread():
        yield


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("analytics")
    b = build_copy(tmp_path_factory, tmp)
    shutil.copy(b.path, tmp / "noprofile.db")  # the same run before any profile entry
    return b


@pytest.fixture(scope="module")
def profiled(built: Built) -> dict[str, Any]:
    with Ledger.open(built.path) as led:
        size = led.size
    res = cli("profile", built.path, "--run", RUN, "--data", built.data, "--n-boot", N_BOOT, "--json")
    assert res.exit_code == 0, res.output
    return {"out": json.loads(res.stdout), "size_before": size}


# ---- memorization -----------------------------------------------------------------------------------------


def _raw_baselines(path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Mean loss and AUM per example straight from the step payloads (Python floats, no audit code)."""
    loss: dict[str, list[float]] = {}
    margin: dict[tuple[str, int], list[float]] = {}
    table: list[str] = []  # step v 3: the run's example table (docs/ARCHITECTURE.md), decoded here by hand
    with Ledger.open(path) as led:
        for e in led.entries(kind="step"):
            if e.body["run"] != RUN:
                continue
            ids = e.body.get("example_ids")
            if ids is None:
                table.extend(e.body.get("new_ids", []))
                raw = e.payloads.get("example_index")
                if raw is None:
                    ids = e.body["new_ids"]
                else:
                    a = np.asarray(raw).astype(np.int64)
                    ids = [table[i] for i in (a if a.ndim == 1 else a[:, 0] | a[:, 1] << 8 | a[:, 2] << 16)]
            for i, ex in enumerate(ids):
                loss.setdefault(ex, []).append(float(e.payloads["losses"][i]))
                margin.setdefault((ex, e.body["epoch"]), []).append(float(e.payloads["margins"][i]))
    mean_loss = {ex: sum(v) / len(v) for ex, v in loss.items()}
    per_ex: dict[str, list[float]] = {}
    for (ex, _), v in margin.items():
        per_ex.setdefault(ex, []).append(sum(v) / len(v))
    return mean_loss, {ex: sum(v) / len(v) for ex, v in per_ex.items()}


def test_memorization_json_rows_carry_provenance_and_baselines(built: Built) -> None:
    res = cli("memorization", built.path, "--run", RUN, "--top", 15, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["run"] == RUN and out["layers"] == ["0", "2", "4"] and len(out["epochs"]) == 8
    assert len(out["rows"]) == 15 and [r["rank"] for r in out["rows"]] == sorted(
        r["rank"] for r in out["rows"]
    )
    assert out["summary"]["examples"] == len(built.ids)
    mean_loss, aum = _raw_baselines(built.path)
    for r in out["rows"]:
        k = int(r["example_id"].split("-")[1])
        assert r["label_id"] == f"lab-{k}"
        assert r["annotator"].startswith("anon:") and "@" not in r["annotator"]
        assert r["domain"] == built.domains[r["example_id"]]
        assert r["class"] in ("memorised", "unresolved", "easy")
        assert len(r["trajectory"]) == 8 and math.isclose(sum(r["trajectory"]), r["score"], rel_tol=1e-9)
        assert math.isclose(r["mean_loss"], mean_loss[r["example_id"]], rel_tol=1e-6)
        assert math.isclose(r["aum"], aum[r["example_id"]], rel_tol=1e-6, abs_tol=1e-9)
        assert r["loss_rank"] == 1 + sum(v > mean_loss[r["example_id"]] for v in mean_loss.values())
        assert r["aum_rank"] == 1 + sum(v < aum[r["example_id"]] for v in aum.values())


def test_memorization_review_check_is_an_independent_auroc(built: Built) -> None:
    out = json.loads(cli("memorization", built.path, "--run", RUN, "--json").stdout)
    rc = out["review_check"]
    assert rc["positives"] == len(built.reviewed_fix) > 0
    mean_loss, aum = _raw_baselines(built.path)
    ids = sorted(mean_loss)
    y = [e in built.reviewed_fix for e in ids]
    assert math.isclose(
        rc["signals"]["mean_loss"]["auroc"], roc_auc_score(y, [mean_loss[e] for e in ids]), rel_tol=1e-6
    )
    assert math.isclose(rc["signals"]["aum"]["auroc"], roc_auc_score(y, [-aum[e] for e in ids]), rel_tol=1e-6)
    assert set(rc["signals"]) == {"self_influence", "mean_loss", "aum"}


def test_memorization_text_prints_baselines_beside_the_score(built: Built) -> None:
    res = cli("memorization", built.path, "--run", RUN, "--top", 5)
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    header = next(ln for ln in lines if ln.startswith("rank"))
    assert "mean_loss (rank)" in header and "AUM (rank)" in header and "score" in header
    rows = json.loads(cli("memorization", built.path, "--run", RUN, "--top", 5, "--json").stdout)["rows"]
    body = lines[lines.index(header) + 1 :]
    assert len(body) == 5
    for line, r in zip(body, rows, strict=True):
        assert r["example_id"] in line and f"{r['mean_loss']:.3g} ({r['loss_rank']})" in line
        assert f"{r['aum']:.3g} ({r['aum_rank']})" in line
    assert "AUROC" in res.stdout  # the review check is printed with every signal's figure
    assert not EMAIL.search(res.stdout)


def test_memorization_layer_filter_and_unknown_layer(built: Built) -> None:
    out = json.loads(cli("memorization", built.path, "--run", RUN, "--layer", "4", "--json").stdout)
    assert out["layers"] == ["4"] and set(out["rows"][0]["layer_scores"]) == {"4"}
    res = cli("memorization", built.path, "--run", RUN, "--layer", "9")
    assert res.exit_code == 2 and "layer(s) ['9']" in one_error_line(res)


@pytest.mark.parametrize(
    "args",
    [
        ["memorization"],
        ["priorities"],
        ["profile", "--data", "DATA"],
        ["report", "-o", "OUT"],
    ],
)
def test_unknown_run_exits_2_with_one_line(built: Built, tmp_path: Path, args: list[str]) -> None:
    args = [str(built.data) if a == "DATA" else str(tmp_path / "r.html") if a == "OUT" else a for a in args]
    with Ledger.open(built.path) as led:
        size = led.size
    res = cli(args[0], built.path, "--run", "nope", *args[1:])
    assert res.exit_code == 2
    assert "no run named 'nope'" in one_error_line(res) and "digits" in res.stderr
    with Ledger.open(built.path) as led:
        assert led.size == size
    assert not (tmp_path / "r.html").exists()


def test_missing_ledger_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    res = cli("memorization", tmp_path / "none.db", "--run", RUN)
    assert res.exit_code == 2 and one_error_line(res)
    assert not (tmp_path / "none.db").exists()


# ---- profile ----------------------------------------------------------------------------------------------


def test_profile_appends_one_entry_whose_body_recomputes(built: Built, profiled: dict[str, Any]) -> None:
    out = profiled["out"]
    with Ledger.open(built.path) as led:
        assert led.size == profiled["size_before"] + 1
        entry = led.entry(out["seq"])
        final = checkpoints(led, RUN)[-1]
        state = StateStore(StateStore.beside(built.path)).load(final)
    assert entry.kind == "profile" and entry.body["run"] == RUN
    body = entry.body
    assert body["data_file"]["sha256"] == hashlib.sha256(built.data.read_bytes()).hexdigest()
    assert body["model"] == {
        "factory": "tests.support_analytics:digits_mlp",
        "checkpoint_seq": final.seq,
        "checkpoint_tag": "final",
        "state_dict_sha256": final.state_dict_sha256,
    }
    # Recompute independently: the verified weights, hooks, the probes with the recorded settings.
    model = digits_mlp()
    model.load_state_dict(state)
    with np.load(built.data) as f:
        x, y, dom, ids = f["x"], f["y"], [str(d) for d in f["domain"]], [str(i) for i in f["ids"]]
    acts = collect_activations(model, torch.as_tensor(x), ["0", "2", "4"])
    with torch.no_grad():
        final_pred = model.eval()(torch.as_tensor(x)).argmax(1).numpy()
    again = entropy_profile(acts, y, dom, final_predictions=final_pred, settings=settings_from_body(body))
    expect = again.entry_body(run=RUN, data=f"sha256:{body['data_file']['sha256']}")
    for key, value in expect.items():
        assert body[key] == value, key
    assert body["example_ids"] == ids and body["domains"] == sorted(set(dom))
    np.testing.assert_array_equal(entry.payloads["example_entropy"], again.example_entropy)
    np.testing.assert_array_equal(entry.payloads["example_depth"], again.example_depth)
    np.testing.assert_array_equal(entry.payloads["evaluated"], again.evaluated)
    assert [body["domains"][k] for k in entry.payloads["domain_index"]] == dom
    # The CLI's JSON is the entry body (without the id list).
    assert out["inputs_digest"] == body["inputs_digest"] and out["entropy"] == body["entropy"]


def test_profile_refuses_weights_that_do_not_match_the_checkpoint(built: Built, tmp_path: Path) -> None:
    state = digits_mlp().state_dict()  # untrained weights: not the run's final checkpoint
    torch.save(state, tmp_path / "wrong.pt")
    with np.load(built.data) as f:
        np.savez(tmp_path / "d.npz", **{k: f[k] for k in f.files}, state=np.array("wrong.pt"))
    with Ledger.open(built.path) as led:
        size = led.size
    res = cli("profile", built.path, "--run", RUN, "--data", tmp_path / "d.npz")
    assert res.exit_code == 2 and "does not match checkpoint entry" in one_error_line(res)
    with Ledger.open(built.path) as led:
        assert led.size == size


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"y": np.zeros(3, np.int64)}, "field 'x' (model inputs) is missing"),
        (
            {"x": np.zeros((3, 64), np.float32), "y": np.zeros(4, np.int64)},
            "field 'y' must be integers of shape (3,)",
        ),
        ({"x": np.zeros((3, 64), np.float32), "extra": np.zeros(1)}, "unknown field(s) ['extra']"),
        (
            {"x": np.zeros((3, 64), np.float32), "domain": np.array([1, 2, 3])},
            "field 'domain' must be strings",
        ),
        ({"x": np.zeros((3, 64), np.float32), "y": np.zeros(3, np.int64)}, "no model factory"),
        (
            {"x": np.zeros((3, 64), np.float32), "model": np.array("nosuchmodule_xyz:f")},
            "cannot import 'nosuchmodule_xyz'",
        ),
    ],
)
def test_profile_bad_data_file_exits_2_naming_the_field(
    built: Built, tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    np.savez(tmp_path / "bad.npz", **fields)
    res = cli("profile", built.path, "--run", RUN, "--data", tmp_path / "bad.npz")
    assert res.exit_code == 2
    line = one_error_line(res)
    assert message in line
    assert "bad.npz" in line or "nosuchmodule" in message  # the import error names the factory instead


def test_profile_not_an_npz(built: Built, tmp_path: Path) -> None:
    (tmp_path / "x.npz").write_text("hello")
    res = cli("profile", built.path, "--run", RUN, "--data", tmp_path / "x.npz")
    assert res.exit_code == 2 and "not an .npz data file" in one_error_line(res)


# ---- priorities -------------------------------------------------------------------------------------------


def test_priorities_two_separate_queues_with_planted_domains_on_top(
    built: Built, profiled: dict[str, Any], tmp_path: Path
) -> None:
    res = cli(
        "priorities", built.path, "--run", RUN, "--top", 4, "--json",
        "--labelbox-out", tmp_path / "lb.ndjson", "--labelstudio-out", tmp_path / "ls.json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    amb, dis = out["queues"]["ambiguity"], out["queues"]["label_disagreement"]
    assert amb["queue"] == "ambiguity" and dis["queue"] == "label_disagreement"
    assert out["ambiguity_source"]["profile_seq"] == profiled["out"]["seq"]
    assert amb["domains"][0]["domain"] == "noised"  # pixel noise: the ambiguous slice
    assert dis["domains"][0]["domain"] == "flipped"  # 30% flipped labels: the slice to relabel
    for q in (amb, dis):
        assert [d["rank"] for d in q["domains"]] == [1, 2, 3]
        assert all(len(d["items"]) <= 4 for d in q["domains"])
    # Exports: one file per queue, every line / task of a file belongs to that queue only.
    written = sorted(Path(p).name for p in out["written"])
    assert written == [
        "lb.ambiguity.ndjson",
        "lb.label_disagreement.ndjson",
        "ls.ambiguity.json",
        "ls.label_disagreement.json",
    ]
    for name, q in (("ambiguity", amb), ("label_disagreement", dis)):
        rows = [json.loads(line) for line in (tmp_path / f"lb.{name}.ndjson").read_text().splitlines()]
        assert [r["global_key"] for r in rows] == [i["example_id"] for d in q["domains"] for i in d["items"]]
        assert {r["queue"] for r in rows} == {name} and all(1 <= r["priority"] <= 5 for r in rows)
        tasks = json.loads((tmp_path / f"ls.{name}.json").read_text())
        assert [t["data"]["example_id"] for t in tasks] == [r["global_key"] for r in rows]
        assert {t["data"]["queue"] for t in tasks} == {name}
    tasks = json.loads((tmp_path / "ls.label_disagreement.json").read_text())
    assert all(t["data"]["label_id"] == "lab-" + str(int(t["data"]["example_id"][3:])) for t in tasks)


def test_priorities_without_a_profile_reports_ambiguity_unavailable(built: Built, tmp_path: Path) -> None:
    res = cli(
        "priorities",
        built.path.parent / "noprofile.db",
        "--run",
        RUN,
        "--json",
        "--labelbox-out",
        tmp_path / "t.ndjson",
    )
    assert res.exit_code == 0
    out = json.loads(res.stdout)
    assert out["queues"]["ambiguity"] is None and "no profile entry" in out["ambiguity_unavailable"]
    assert out["queues"]["label_disagreement"]["domains"]
    assert [Path(p).name for p in out["written"]] == ["t.label_disagreement.ndjson"]


# ---- progress -----------------------------------------------------------------------------------------------


def test_progress_is_silent_when_piped(built: Built) -> None:
    res = cli("memorization", built.path, "--run", RUN, "--top", 2)
    assert "reading steps" not in res.output and "\r" not in res.output
    assert res.stderr == ""


def test_progress_shows_on_a_terminal_but_never_with_json(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "_isatty", lambda stream: True)
    res = cli("memorization", built.path, "--run", RUN, "--top", 2)
    assert "reading steps" in res.stderr and "reading steps" not in res.stdout
    res = cli("memorization", built.path, "--run", RUN, "--top", 2, "--json")
    assert res.stderr == "" and json.loads(res.stdout)["rows"]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_activity_line_ticks_and_is_erased() -> None:
    import time

    buf = _Tty()
    with progress.activity("verifying", show=True, file=buf, interval=0.01):
        time.sleep(0.1)
    text = buf.getvalue()
    assert "verifying ... " in text and text.endswith("\r")
    buf = _Tty()
    with progress.activity("verifying", show=False, file=buf, interval=0.01):
        time.sleep(0.05)
    assert buf.getvalue() == ""


def test_a_profile_entry_without_per_example_data_degrades_to_unavailable(
    built: Built, tmp_path: Path
) -> None:
    db = tmp_path / "other.db"
    shutil.copy(built.path.parent / "noprofile.db", db)
    with Ledger.open(db) as led:
        led.append("profile", {"run": RUN, "settings": {}, "layers": ["0"]})  # e.g. written by another tool
    out = json.loads(cli("priorities", db, "--run", RUN, "--json").stdout)
    assert out["queues"]["ambiguity"] is None and "no per-example data" in out["ambiguity_unavailable"]
    assert out["queues"]["label_disagreement"]["domains"]


def test_verify_and_ingest_stay_quiet_under_json_even_on_a_terminal(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "_isatty", lambda stream: True)
    res = cli("verify", built.path, "--json")
    assert res.exit_code == 0 and res.stderr == "" and json.loads(res.stdout)["ok"] is True
    rows = tmp_path / "l.jsonl"
    rows.write_text(json.dumps({"item_id": "a", "label_id": "b", "value": "1"}) + "\n")
    key = tmp_path / "k"
    key.write_text(bytes(range(32)).hex())
    key.chmod(0o600)
    res = cli("ingest", "jsonl", rows, "--ledger", tmp_path / "n.db", "--pseudonym-key", key, "--json")
    assert res.exit_code == 0, res.output
    assert res.stderr == "" and json.loads(res.stdout)["records"] == 1
