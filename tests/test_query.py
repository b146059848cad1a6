"""``audit.query`` and ``gradledger query`` on a real tiny run: every answer equals a brute-force recomputation.

The run: a small MLP trained with ``instrument.attach`` under a routing policy and a manifest of ingested
labels (two annotators, consensus scores, reviews, a seeded label), 4 epochs with gradient accumulation in one
of them and a duplicated example in one batch, on a SQLite ledger; folds are made frequent so whole-run
answers combine folded totals and unfolded steps.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import instrument
from audit import aggregates, query
from audit.cli import main
from ledger import ingest
from ledger.ingest.pseudonym import Pseudonymizer
from ledger.provenance import Manifest
from ledger.store import Ledger
from tests.ingest_support import expected_pseudonym
from tests.query_support import brute_force

torch.set_num_threads(1)
LAYERS = ["0", "2", "4"]
N_EX = 20
EPOCHS = 4
POLICY = """\
gradledger_policy: 1
name: depth
groups:
  shallow: ["0", "2"]
  deep: ["4"]
rules:
  - name: excluded
    when: {review: reject}
    weights: {"*": 0.0}
  - name: low-consensus
    when: {consensus: {lt: 0.7}}
    weights: {shallow: 1.0, deep: 0.25}
default: {"*": 1.0}
"""
ANA, BEN = "ana@example.com", "ben@example.com"


def _rows() -> list[dict[str, Any]]:
    rows = []
    for i in range(N_EX):
        r: dict[str, Any] = {
            "item_id": f"item-{i}",
            "label_id": f"lab-{i}",
            "value": str(i % 3),
            "producer": ANA if i % 2 == 0 else BEN,
            "consensus": [0.9, 0.5, 0.8, 0.6][i % 4],
            "domain": "news" if i < 10 else "forum",
        }
        if i == 3:
            r.update(review="reject", reviewer="rev@example.com")
        if i == 4:
            r.update(review="approve", reviewer="rev@example.com")
        rows.append(r)
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    mp = pytest.MonkeyPatch()
    mp.setattr(aggregates, "FOLD_MIN_SAMPLES", 0)
    mp.setattr(aggregates, "FOLD_EPOCHS", 1)
    tmp = tmp_path_factory.mktemp("q")
    led = Ledger.open(tmp / "q.db", create=True)
    path = tmp / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    ingest.ingest("jsonl", path, led, pseudonym_key=Pseudonymizer(bytes(range(32))))
    man = Manifest.create(led, "train", {f"ex{i}": f"lab-{i}" for i in range(N_EX)})
    policy = instrument.Policy.from_yaml(POLICY, "policy.yaml")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    crit = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_EX, 5, generator=g)
    y = torch.randint(0, 3, (N_EX,), generator=g)
    tr = instrument.attach(model, opt, ledger=led, run="mlp", policy=policy, labels=man, criterion=crit)
    for epoch in range(EPOCHS):
        tr.epoch(epoch)
        order = torch.randperm(N_EX, generator=g).tolist()
        batches = [order[k : k + 8] for k in range(0, N_EX, 8)]
        if epoch == 1:
            batches[0] = batches[0][:-1] + [batches[0][0]]  # a duplicated example in one batch
        for bi, b in enumerate(batches):
            ids = [f"ex{i}" for i in b]
            if epoch == 2 and bi == 0:  # gradient accumulation: two micro-batches, one optimizer step
                for part in (b[:3], b[3:]):
                    with tr.batch([f"ex{i}" for i in part]):
                        crit(model(x[part]), y[part]).backward()
                opt.step()
                opt.zero_grad()
                continue
            with tr.batch(ids):
                crit(model(x[b]), y[b]).backward()
                opt.step()
                opt.zero_grad()
        sched.step()
    tr.close()
    records = list(led.steps("mlp"))
    yield {"ledger": led, "path": tmp / "q.db", "manifest": man, "records": records}
    led.close()
    mp.undo()


EPOCH_RANGES = [None, (0, 0), (1, 2), (0, EPOCHS - 1), (3, 3)]


def test_run_folds_and_keeps_an_unfolded_tail(trained: Any) -> None:
    led = trained["ledger"]
    with led.engine.connect() as conn:
        ft, n_steps = conn.execute(
            aggregates.runs.select().with_only_columns(
                aggregates.runs.c.folded_through, aggregates.runs.c.n_steps
            )
        ).one()
    last = trained["records"][-1].seq
    assert 0 < ft < last and n_steps == len(trained["records"])
    assert any(r.micro_batches == [3, 5] for r in trained["records"])
    assert any(len(set(r.example_ids)) < len(r.example_ids) for r in trained["records"])


@pytest.mark.parametrize("epochs", EPOCH_RANGES)
@pytest.mark.parametrize("metric", ["update", "self-influence"])
def test_layer_by_label_equals_brute_force(trained: Any, metric: str, epochs: Any) -> None:
    led, man = trained["ledger"], trained["manifest"]
    oracle = brute_force(trained["records"], "mean", epochs)
    key = "update" if metric == "update" else "self_influence"
    for j, layer in enumerate(LAYERS):
        res = query.layer(led, "mlp", layer, top=100, metric=metric, epochs=epochs)
        scores = {ex: v[j] for ex, v in oracle.metric(key).items()}
        total = sum(scores.values())
        assert res.total == pytest.approx(total, rel=1e-12)
        assert res.examples == len(scores) and res.sample_steps == sum(oracle.count.values())
        assert res.excluded_nonfinite == oracle.excluded[j] == 0
        assert [r.example_id for r in res.rows] == sorted(scores, key=lambda e: -scores[e])
        for r in res.rows:
            ex = r.example_id
            assert r.score == pytest.approx(scores[ex], rel=1e-12, abs=1e-300)
            assert r.share == pytest.approx(scores[ex] / total, rel=1e-12)
            assert r.weight == pytest.approx(oracle.weight[ex][j] / oracle.count[ex], rel=1e-12)
            assert r.sample_steps == oracle.count[ex]
            prov = man[ex]
            assert (r.label_id, r.annotator, r.consensus, r.consensus_method, r.review) == (
                prov.label_id, prov.annotator, prov.consensus, prov.consensus_method, prov.review,
            )  # fmt: skip
    # the rejected label's update is routed to zero in every layer, its self-influence is not
    rej = query.layer(led, "mlp", "0", top=100, metric=metric, epochs=epochs)
    row = next(r for r in rej.rows if r.example_id == "ex3")
    assert row.weight == 0.0 and (row.score == 0.0) == (metric == "update")


@pytest.mark.parametrize("by", ["annotator", "source", "domain"])
@pytest.mark.parametrize("epochs", [None, (1, 2)])
def test_layer_by_group_equals_brute_force(trained: Any, by: str, epochs: Any) -> None:
    led, man = trained["ledger"], trained["manifest"]
    oracle = brute_force(trained["records"], "mean", epochs)
    j = 2
    groups: dict[str, list[str]] = {}
    for ex in oracle.update:
        p = man[ex]
        k = {"annotator": p.annotator, "source": p.source, "domain": p.domain}[by]
        groups.setdefault(k, []).append(ex)
    total = sum(v[j] for v in oracle.update.values())
    res = query.layer(led, "mlp", "4", top=10, by=by, epochs=epochs)
    assert {r.key for r in res.rows} == set(groups)
    for r in res.rows:
        members = groups[r.key]
        score = sum(oracle.update[e][j] for e in members)
        assert r.score == pytest.approx(score, rel=1e-12)
        assert r.share == pytest.approx(score / total, rel=1e-12)
        assert r.examples == len(members) and r.sample_steps == sum(oracle.count[e] for e in members)
        assert r.weight == pytest.approx(
            sum(oracle.weight[e][j] for e in members) / sum(oracle.count[e] for e in members), rel=1e-12
        )
    assert [r.score for r in res.rows] == sorted((r.score for r in res.rows), reverse=True)
    if by == "annotator":
        assert {r.key for r in res.rows} == {
            expected_pseudonym(ANA, bytes(range(32))),
            expected_pseudonym(BEN, bytes(range(32))),
        }


def test_top_k_truncates_in_rank_order(trained: Any) -> None:
    full = query.layer(trained["ledger"], "mlp", "2", top=100)
    top3 = query.layer(trained["ledger"], "mlp", "2", top=3)
    assert [r.example_id for r in top3.rows] == [r.example_id for r in full.rows[:3]]
    assert [r.rank for r in top3.rows] == [1, 2, 3]


def test_label_profile_equals_brute_force(trained: Any) -> None:
    led, man = trained["ledger"], trained["manifest"]
    res = query.label(led, "lab-5")
    (run,) = res.runs
    assert run["example_id"] == "ex5" and run["layers"] == LAYERS
    oracle = brute_force(trained["records"], "mean")
    for ep in run["epochs"]:
        u, s = oracle.by_epoch[("ex5", ep["epoch"])]
        np.testing.assert_allclose(ep["update"], u, rtol=1e-12)
        np.testing.assert_allclose(ep["self_influence"], s, rtol=1e-12)
    assert [e["epoch"] for e in run["epochs"]] == list(range(EPOCHS))
    np.testing.assert_allclose(run["totals"]["update"], oracle.update["ex5"], rtol=1e-12)
    # ex5 has consensus 0.5: the low-consensus rule, weights 1/1/0.25, recorded under the run's policy entry
    assert [(r["name"], r["rule"]) for r in run["routing"]["rules"]] == [("low-consensus", 1)]
    assert run["routing"]["policy_seq"] == trained["records"][0].policy_seq
    assert [w["weights"] for w in run["routing"]["weights"]] == [[1.0, 1.0, 0.25]]
    p = run["provenance"]
    prov = man["ex5"]
    assert (p["annotator"], p["consensus"], p["label_seq"]) == (
        prov.annotator,
        prov.consensus,
        prov.label_seq,
    )
    assert "reviews" in p and "seeded_from" in p
    rej = query.label(led, "lab-3").runs[0]["provenance"]
    assert rej["review"] == "reject" and rej["reviews"][0]["decision"] == "reject"


def test_annotator_equals_brute_force(trained: Any) -> None:
    led, man = trained["ledger"], trained["manifest"]
    pseud = expected_pseudonym(BEN, bytes(range(32)))
    res = query.annotator(led, pseud)
    (run,) = res.runs
    oracle = brute_force(trained["records"], "mean")
    mine = [ex for ex in oracle.update if man[ex].annotator == pseud]
    assert run["examples"] == len(mine) == N_EX // 2
    for j, row in enumerate(run["layers"]):
        for key in ("update", "self_influence"):
            got = sum(oracle.metric(key)[e][j] for e in mine)
            tot = sum(v[j] for v in oracle.metric(key).values())
            assert row["layer"] == LAYERS[j]
            assert row[key] == pytest.approx(got, rel=1e-12)
            assert row[f"{key}_share"] == pytest.approx(got / tot, rel=1e-12)


def test_unknown_names_and_bad_input_raise_query_errors(trained: Any) -> None:
    led = trained["ledger"]
    with pytest.raises(query.QueryError, match="unknown run 'mpl'.*'mlp'"):
        query.layer(led, "mpl", "0")
    with pytest.raises(query.QueryError, match=r"unknown layer '5' in run 'mlp' \(known: 0, 2, 4\)"):
        query.layer(led, "mlp", "5")
    with pytest.raises(query.QueryError, match="lab-55|unknown label"):
        query.label(led, "lab-55")
    with pytest.raises(query.QueryError, match="unknown annotator"):
        query.annotator(led, "anon:nobody")
    for bad in ("1:0", "a:b", "-1:2", "1:2:3"):
        with pytest.raises(query.QueryError, match="--epochs"):
            query.parse_epochs(bad)
    assert query.parse_epochs("2") == (2, 2) and query.parse_epochs("0:3") == (0, 3)


# ----- CLI ------------------------------------------------------------------------------------------------


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_cli_layer_json_shape(trained: Any) -> None:
    path = str(trained["path"])
    r = _cli(
        "query", "layer", path, "--run", "mlp", "--layer", "4", "--top", "5", "--epochs", "1:2", "--json"
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert (d["run"], d["layer"], d["metric"], d["by"], d["epochs"]) == (
        "mlp",
        "4",
        "update",
        "label",
        [1, 2],
    )
    assert len(d["rows"]) == 5
    row = d["rows"][0]
    for k in (
        "label_id",
        "example_id",
        "annotator",
        "consensus",
        "consensus_method",
        "review",
        "weight",
        "score",
        "share",
    ):
        assert k in row
    api = query.layer(trained["ledger"], "mlp", "4", top=5, epochs=(1, 2))
    assert [x["score"] for x in d["rows"]] == [x.score for x in api.rows]
    r = _cli(
        "query", "layer", path, "--run", "mlp", "--layer", "0", "--by", "domain", "--metric", "self-influence"
    )
    assert r.exit_code == 0 and "news" in r.output and "forum" in r.output


def test_cli_label_and_annotator_json(trained: Any) -> None:
    path = str(trained["path"])
    r = _cli("query", "label", path, "lab-5", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["label_id"] == "lab-5" and d["runs"][0]["routing"]["rules"][0]["name"] == "low-consensus"
    pseud = expected_pseudonym(ANA, bytes(range(32)))
    r = _cli("query", "annotator", path, pseud, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert [x["layer"] for x in d["runs"][0]["layers"]] == LAYERS
    assert _cli("query", "label", path, "lab-5").exit_code == 0
    assert _cli("query", "annotator", path, pseud).exit_code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["layer", "{p}", "--run", "mlq", "--layer", "0"], "did you mean 'mlp'"),
        (["layer", "{p}", "--run", "mlp", "--layer", "9"], "unknown layer"),
        (["layer", "{p}", "--run", "mlp", "--layer", "0", "--epochs", "3:1"], "--epochs '3:1'"),
        (["layer", "{p}", "--run", "mlp", "--layer", "0", "--epochs", "x"], "--epochs 'x'"),
        (["layer", "{p}", "--run", "mlp", "--layer", "0", "--top", "0"], "--top"),
        (["label", "{p}", "lab-500"], "did you mean"),
        (["annotator", "{p}", "anon:zzz"], "unknown annotator"),
        (["layer", "{missing}", "--run", "mlp", "--layer", "0"], "no such ledger"),
    ],
)
def test_cli_errors_exit_2_with_one_line(trained: Any, tmp_path: Path, args: list[str], message: str) -> None:
    fill = {"p": str(trained["path"]), "missing": str(tmp_path / "nope.db")}
    r = CliRunner().invoke(main, ["query", *[a.format(**fill) for a in args]])
    assert r.exit_code == 2
    err = r.stderr if hasattr(r, "stderr") else r.output
    assert message in err and err.strip().count("\n") == 0


# ----- verify --deep ------------------------------------------------------------------------------------


def test_verify_deep_catches_an_edited_aggregate(trained: Any, tmp_path: Path) -> None:
    trained["ledger"].close()  # checkpoint the WAL into the file before copying it
    copy = tmp_path / "edited.db"
    shutil.copy(trained["path"], copy)
    assert _cli("verify", str(copy), "--deep").exit_code == 0
    con = sqlite3.connect(copy)
    (data,) = con.execute("SELECT data FROM qa_base WHERE metric='update' AND layer=2").fetchone()
    arr = np.frombuffer(data, "<f8").copy()
    arr[0] *= 1 + 1e-15 if arr[0] else 0.0
    arr[0] += 1e-300 if arr[0] == 0 else 0.0
    con.execute("UPDATE qa_base SET data=? WHERE metric='update' AND layer=2", (arr.tobytes(),))
    con.commit()
    con.close()
    plain = _cli("verify", str(copy))
    assert plain.exit_code == 0, plain.output  # aggregates are not evidence
    deep = _cli("verify", str(copy), "--deep")
    assert deep.exit_code == 1
    assert "qa_base" in deep.output and "query_aggregates" in deep.output
