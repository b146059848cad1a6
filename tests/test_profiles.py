"""Entropy depth profiles and annotation priorities: exact pieces, cross-fitting, errors, exports, and the
three-domain digits validation of issue 6 (noised tops ambiguity, flipped tops label disagreement)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import support_digits as sd
import torch
from torch import nn

from audit.memorization import rank_memorization
from audit.priorities import (
    AMBIGUITY,
    DISAGREEMENT,
    ambiguity_queue,
    disagreement_queue,
    label_studio_tasks,
    labelbox_ndjson,
)
from audit.profiles import (
    ProbeSettings,
    bootstrap_mean,
    collect_activations,
    entropy_profile,
    normalised_entropy,
    prediction_depth,
)

TRAIN = dict(epochs=60, batch_size=64, lr=0.05, momentum=0.9)


def test_normalised_entropy_exact_values():
    p = np.array([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert normalised_entropy(p) == pytest.approx([1.0, 0.0, math.log(2) / math.log(4)])


def test_prediction_depth_by_hand():
    preds = np.array(
        [
            [3, 3, 3],  # agrees everywhere -> 0
            [1, 3, 3],  # from layer 1
            [3, 1, 3],  # only the last -> 2
            [3, 3, 1],  # last disagrees -> L = 3
        ]
    )
    assert list(prediction_depth(preds, np.array([3, 3, 3, 3]))) == [0, 1, 2, 3]


def test_bootstrap_mean_interval():
    rng = np.random.default_rng(0)
    est = bootstrap_mean(np.full(10, 0.3), 200, 0.95, rng)
    assert (est.mean, est.low, est.high, est.n) == pytest.approx((0.3, 0.3, 0.3, 10))
    v = np.random.default_rng(1).uniform(size=400)
    est = bootstrap_mean(v, 1000, 0.95, np.random.default_rng(2))
    assert est.low < v.mean() < est.high
    # ~ 1.96 standard errors each side
    se = v.std() / math.sqrt(len(v))
    assert est.high - est.low == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_mean(np.array([]), 10, 0.95, rng).n == 0


def test_cross_fitting_keeps_labels_out_of_their_own_probe():
    # Pure-noise features in 300 dimensions: an in-sample probe fits the 200 random labels perfectly;
    # an out-of-fold probe can only guess.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 300))
    y = rng.integers(0, 2, 200)
    prof = entropy_profile({"h": x}, y, ["d"] * 200, settings=ProbeSettings(C=100.0, n_boot=50))
    assert prof.probe_accuracy["h"] < 0.65


def _synthetic(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    n = 600
    y = rng.integers(0, 3, n)
    centers = np.eye(3) * 4.0
    domains = ["sharp" if i % 2 == 0 else "blurry" for i in range(n)]
    spread = np.where(np.array(domains) == "sharp", 0.5, 3.0)[:, None]
    deep = centers[y] + rng.normal(size=(n, 3)) * spread
    shallow = rng.normal(size=(n, 5))  # carries no label information
    return {"shallow": shallow, "deep": deep}, y, domains


def test_entropy_profile_orders_domains_and_records_provenance():
    acts, y, domains = _synthetic(np.random.default_rng(0))
    prof = entropy_profile(
        acts, y, domains, layers=["shallow", "deep"], final_predictions=y, settings=ProbeSettings(n_boot=300)
    )
    assert prof.domains == ["blurry", "sharp"] and prof.classes == [0, 1, 2]
    deep_sharp, deep_blurry = prof.entropy["sharp"]["deep"], prof.entropy["blurry"]["deep"]
    assert deep_sharp.n == deep_blurry.n == 300
    assert deep_sharp.high < deep_blurry.low  # separated intervals
    assert prof.entropy["sharp"]["shallow"].mean > 0.9  # no information: near-uniform
    # final = the true class: blurry examples' deep probe misses it more often, so they sit deeper.
    assert prof.depth["blurry"].mean > prof.depth["sharp"].mean + 0.1
    body = prof.entry_body()
    json.dumps(body)  # JSON-ready for a `profile` entry
    assert body["settings"]["folds"] == 5 and len(body["inputs_digest"]) == 64
    assert body["entropy"]["sharp"]["deep"] == {
        "mean": deep_sharp.mean,
        "ci": [deep_sharp.low, deep_sharp.high],
        "n": 300,
    }
    assert prof.entry_body(run="r1", data="held-out.npz")["run"] == "r1"
    acts2 = dict(acts)
    acts2["deep"] = acts["deep"] + 1e-3
    again = entropy_profile(
        acts, y, domains, layers=["shallow", "deep"], final_predictions=y, settings=ProbeSettings(n_boot=300)
    )
    assert again.inputs_digest == prof.inputs_digest and again.entry_body() == body  # deterministic
    other = entropy_profile(acts2, y, domains, layers=["shallow", "deep"], settings=ProbeSettings(n_boot=300))
    assert other.inputs_digest != prof.inputs_digest


def test_unlabelled_examples_are_scored_and_selectable():
    acts, y, domains = _synthetic(np.random.default_rng(1))
    y = y.copy()
    y[:100] = -1
    prof = entropy_profile(acts, y, domains, settings=ProbeSettings(n_boot=100, evaluate="unlabelled"))
    assert prof.evaluated.sum() == 100
    assert sum(prof.depth[d].n for d in prof.domains) == 100
    one_domain = entropy_profile(
        acts,
        y,
        ["seen" if i < 100 else "train-only" for i in range(len(y))],
        settings=ProbeSettings(n_boot=50, evaluate="unlabelled"),
    )
    assert one_domain.entry_body()["depth"]["train-only"] == {"mean": None, "ci": [None, None], "n": 0}
    assert np.all((prof.example_entropy >= 0) & (prof.example_entropy <= 1 + 1e-12))


def test_profile_input_errors():
    acts, y, domains = _synthetic(np.random.default_rng(2))
    with pytest.raises(ValueError, match="domains has 3 entries"):
        entropy_profile(acts, y, domains[:3])
    with pytest.raises(ValueError, match="layer 'nope' has no activations"):
        entropy_profile(acts, y, domains, layers=["nope"])
    bad = dict(acts)
    bad["deep"] = acts["deep"].copy()
    bad["deep"][0, 0] = np.nan
    with pytest.raises(ValueError, match="'deep': activations contain NaN"):
        entropy_profile(bad, y, domains)
    few = y.copy()
    few[few == 2] = 0
    few[:3] = 2
    with pytest.raises(ValueError, match="class 2 has 3 labelled example"):
        entropy_profile(acts, few, domains)
    with pytest.raises(ValueError, match="evaluate must be one of"):
        entropy_profile(acts, y, domains, settings=ProbeSettings(evaluate="some"))


def test_collect_activations_matches_manual_forward():
    model = sd.make_mlp(0)
    model.train()
    x = torch.randn(37, 64)
    acts = collect_activations(model, x, ["1", "3", ""], batch_size=10)
    with torch.no_grad():
        h1 = torch.relu(model[0](x))
        h2 = torch.relu(model[2](h1))
        out = model[4](h2)
    np.testing.assert_allclose(acts["1"], h1.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(acts["3"], h2.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(acts[""], out.numpy(), rtol=1e-6, atol=1e-6)
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="no module"):
        collect_activations(model, x, ["9"])
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    got = collect_activations(conv, [torch.randn(4, 1, 5, 5)], ["0"])
    assert got["0"].shape == (4, 2 * 3 * 3)


@pytest.fixture(scope="module")
def planted():
    p = sd.planted_domains(0, noise_sigma=0.5, flip_fraction=0.3)
    with sd.one_thread():
        model, recs = sd.train(p.data.x_train, p.y_assigned, p.data.ids, seed=0, **TRAIN)
    return p, model, recs


def test_planted_domains_top_their_queues(planted):
    p, model, recs = planted
    d = p.data
    # Label disagreement: from the training run's step records (labelled data).
    mem = rank_memorization(recs)
    dis = disagreement_queue(mem, dict(zip(d.ids, p.train_domains, strict=True)))
    assert dis.name == DISAGREEMENT
    assert [e.domain for e in dis.domains][0] == "flipped"
    top = dis.domains[0]
    flipped_ids = {d.ids[i] for i in np.flatnonzero(p.flipped)}
    listed = {i.example_id for i in top.items}
    assert len(listed & flipped_ids) / len(listed) >= 0.8  # the listed items are mostly the flips
    # Ambiguity: cross-fitted probes on held-out (test-split) activations with their true labels.
    x = torch.as_tensor(d.x_test)
    acts = collect_activations(model, x, ["1", "3", "4"])
    with torch.no_grad():
        final = model(x).argmax(1).numpy()
    prof = entropy_profile(acts, d.y_test, p.test_domains, final_predictions=final)
    test_ids = [f"test-{i:04d}" for i in range(len(d.y_test))]
    amb = ambiguity_queue(prof, test_ids, p.test_domains)
    assert amb.name == AMBIGUITY
    assert amb.domains[0].domain == "noised"
    noised, runner_up = amb.domains[0], amb.domains[1]
    assert noised.detail["entropy_ci"][0] > runner_up.detail["entropy_ci"][1]  # intervals apart
    assert prof.depth["noised"].mean > max(prof.depth["clean"].mean, prof.depth["flipped"].mean)
    # The queues stay separate: each ranks by its own criterion.
    assert dis.criterion != amb.criterion


def test_exports_are_well_formed(planted):
    p, _, recs = planted
    mem = rank_memorization(recs)
    queue = disagreement_queue(mem, dict(zip(p.data.ids, p.train_domains, strict=True)), top_per_domain=5)
    text = labelbox_ndjson(queue, row_data_for=lambda e: f"https://example.org/{e}.png")
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == len(queue.items()) and text.endswith("\n")
    assert all(1 <= r["priority"] <= 5 and r["queue"] == DISAGREEMENT for r in rows)
    assert rows[0]["global_key"] == queue.items()[0].example_id
    assert rows[0]["row_data"] == f"https://example.org/{rows[0]['global_key']}.png"
    assert rows[0]["priority"] == 1 and rows[0]["domain"] == queue.domains[0].domain
    tasks = label_studio_tasks(queue, data_for=lambda e: {"image": f"/data/{e}.png"})
    json.dumps(tasks)
    assert tasks[0]["data"]["image"] == f"/data/{tasks[0]['data']['example_id']}.png"
    assert {"priority", "queue", "domain", "reason"} <= set(tasks[0]["data"])
    assert "score" in tasks[0]["meta"]
    assert labelbox_ndjson(queue.__class__(queue.name, queue.criterion, [])) == ""
