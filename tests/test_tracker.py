"""End-to-end tracker tests on a small float64 MLP with a real SQLite ledger.

Every recorded number is compared with an independent computation: per-sample per-layer gradient norms with
``torch.func`` (vmap of grad of functional_call), losses and margins recomputed from the logits, update norms
from parameter snapshots taken by the test, digests from raw little-endian bytes.
"""

from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rfc8785
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import instrument
from instrument.tracker import attach
from ledger.records import checkpoints, iter_steps, run_record
from ledger.store import Ledger

torch.set_num_threads(1)
LAYERS = ["0", "2", "4"]


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def oracle_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """[B, L] norms of each sample's own-loss gradient, per layer, via torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    cols = []
    for layer in LAYERS:
        sq = sum(g[k].flatten(1).pow(2).sum(1) for k in g if k.rsplit(".", 1)[0] == layer)
        cols.append(torch.as_tensor(sq).sqrt())
    return torch.stack(cols, 1).numpy()


def oracle_loss_margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits = model(x)
    losses = -torch.log_softmax(logits, 1)[torch.arange(len(y)), y]
    margins = []
    for row, label in zip(logits, y, strict=True):
        other = max(float(v) for j, v in enumerate(row) if j != int(label))
        margins.append(float(row[label]) - other)
    return losses.numpy(), np.array(margins)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def update_norms(before: dict[str, torch.Tensor], model: nn.Module) -> np.ndarray:
    after = {k: v.detach() for k, v in model.named_parameters()}
    return np.array(
        [
            math.sqrt(
                sum(
                    float((after[k] - before[k]).pow(2).sum()) for k in before if k.rsplit(".", 1)[0] == layer
                )
            )
            for layer in LAYERS
        ]
    )


@pytest.fixture
def led(tmp_path: Path) -> Any:
    ledger = Ledger.open(tmp_path / "l.db", create=True)
    yield ledger
    ledger.close()


def make_opt(model: nn.Module) -> torch.optim.Optimizer:
    head = list(model[4].parameters())
    body = [p for n, p in model.named_parameters() if not n.startswith("4.")]
    return torch.optim.SGD([{"params": body}, {"params": head, "lr": 0.05}], lr=0.1, momentum=0.9)


@pytest.mark.parametrize("defer", [True, False], ids=["losses-on-writer", "losses-at-once"])
def test_steps_match_independent_oracles(led: Any, defer: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from instrument import tracker as T

    if not defer:  # every criterion input recomputed in the forward hook instead of on the writer thread
        monkeypatch.setattr(T, "_DEFER_ELEMS", -1)
    model = make_model()
    opt = make_opt(model)
    crit = nn.CrossEntropyLoss()
    tr = attach(model, opt, ledger=led, run="exp-1", criterion=crit, seed=7)
    x, y = data(24)
    expect = []
    for step in range(3):
        xb, yb = x[8 * step : 8 * step + 8], y[8 * step : 8 * step + 8]
        ids = [f"ex{8 * step + i}" for i in range(8)]
        norms = oracle_norms(model, xb, yb)
        losses, margins = oracle_loss_margin(model, xb, yb)
        before = snapshot(model)
        tr.epoch(step // 2)
        with tr.batch(ids):
            loss = crit(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
        expect.append((ids, norms, losses, margins, update_norms(before, model), step // 2))
    tr.flush()
    records = list(led.steps("exp-1"))
    assert [r.step for r in records] == [0, 1, 2]
    for rec, (ids, norms, losses, margins, upd, epoch) in zip(records, expect, strict=True):
        assert rec.run == "exp-1" and rec.example_ids == ids and rec.layers == LAYERS and rec.epoch == epoch
        assert rec.grad_norms.dtype == np.float32 and rec.grad_norms.shape == (8, 3)
        np.testing.assert_allclose(rec.grad_norms, norms, rtol=1e-6)
        np.testing.assert_array_equal(rec.weights, np.ones((8, 3), np.float32))
        np.testing.assert_allclose(rec.losses, losses, rtol=1e-6)
        np.testing.assert_allclose(rec.margins, margins, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(rec.update_norms, upd, rtol=1e-12)
        np.testing.assert_array_equal(rec.lr, [0.1, 0.1, 0.05])
        assert rec.micro_batches == [8] and rec.rule_ids is None and rec.policy_seq is None
        assert rec.clip_factors is None and rec.eps is None and rec.flags == {}
    assert records[0].run_seq == run_record(led, "exp-1").seq
    tr.close()
    assert led.verify().ok


def test_run_entry_records_architecture_optimizer_and_versions(led: Any) -> None:
    model = make_model()
    opt = make_opt(model)
    tr = attach(
        model,
        opt,
        ledger=led,
        run="r",
        loss_reduction="sum",
        criterion=nn.CrossEntropyLoss(reduction="sum"),
        seed=3,
    )
    rec = run_record(led, "r")
    assert (
        rec.layers == LAYERS
        and rec.seed == 3
        and rec.loss_reduction == "sum"
        and rec.criterion == "CrossEntropyLoss"
    )
    first = rec.architecture["layers"][0]
    assert first == {
        "name": "0",
        "type": "torch.nn.modules.linear.Linear",
        "params": {"weight": [8, 6], "bias": [8]},
    }
    assert rec.architecture["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert rec.optimizer["class"] == "torch.optim.sgd.SGD"
    groups = rec.optimizer["param_groups"]
    assert groups[1]["hyper"]["lr"] == 0.05 and groups[0]["hyper"]["momentum"] == 0.9
    assert groups[1]["params"] == ["4.weight", "4.bias"]
    assert set(rec.versions) == {"gradledger", "torch", "opacus", "numpy", "python"}
    assert rec.versions["torch"] == torch.__version__
    assert rec.policy_seq is None and rec.manifest_seq is None and rec.dp is None
    with pytest.raises(ValueError, match="run 'r' already exists"):
        attach(make_model(), make_opt(make_model()), ledger=led, run="r")
    tr.close()


def test_gradient_accumulation_makes_one_step_entry(led: Any) -> None:
    model = make_model()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    tr = attach(model, opt, ledger=led, run="acc", criterion=crit)
    x, y = data(10)
    parts = [(0, 4), (4, 10)]
    norms = np.concatenate([oracle_norms(model, x[a:b], y[a:b]) for a, b in parts])
    losses = np.concatenate([oracle_loss_margin(model, x[a:b], y[a:b])[0] for a, b in parts])
    before = snapshot(model)
    for k, (a, b) in enumerate(parts):
        with tr.batch([f"e{i}" for i in range(a, b)]):
            crit(model(x[a:b]), y[a:b]).backward()
            if k == len(parts) - 1:
                opt.step()  # the step inside the last context closes the accumulated step
                opt.zero_grad()
    # reference: plain autograd over the same micro-batches
    for a, b in parts:
        crit(ref(x[a:b]), y[a:b]).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    # a second accumulated step, with optimizer.step() after the contexts
    for a, b in parts:
        with tr.batch([f"f{i}" for i in range(a, b)], epoch=1):
            crit(model(x[a:b]), y[a:b]).backward()
    opt.step()
    opt.zero_grad()
    tr.flush()
    recs = list(iter_steps(led, "acc"))
    assert len(recs) == 2 and [r.micro_batches for r in recs] == [[4, 6], [4, 6]]
    assert recs[0].example_ids == [f"e{i}" for i in range(10)] and recs[1].epoch == 1
    np.testing.assert_allclose(recs[0].grad_norms, norms, rtol=1e-6)
    np.testing.assert_allclose(recs[0].losses, losses, rtol=1e-6)
    np.testing.assert_allclose(recs[0].update_norms, update_norms(before, ref), rtol=1e-10)
    tr.close()


def _hook_count(model: nn.Module, opt: torch.optim.Optimizer, crit: nn.Module) -> int:
    n = len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)  # type: ignore[attr-defined]
    for m in [*model.modules(), crit]:
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    n += sum(len(p._backward_hooks or {}) for p in model.parameters())  # type: ignore[attr-defined]
    return n


def test_pause_costs_nothing_and_resume_continues(led: Any) -> None:
    model = make_model()
    ref = copy.deepcopy(model)
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    assert _hook_count(model, opt, crit) == 0
    tr = attach(model, opt, ledger=led, run="p", criterion=crit)
    assert _hook_count(model, opt, crit) > 0
    x, y = data(8)
    with tr.batch(list("abcdefgh")):
        crit(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    crit(ref(x), y).backward()
    ref_opt.step()
    ref_opt.zero_grad()
    tr.pause()
    assert _hook_count(model, opt, crit) == 0  # nothing left to run
    size = led.size
    x2, y2 = data(8, seed=5)
    with tr.batch(list("abcdefgh")):  # a no-op context while paused
        crit(model(x2), y2).backward()
        crit(ref(x2), y2).backward()
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)  # bit-identical to plain PyTorch
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert led.size == size
    tr.resume()
    with tr.batch(list("ijklmnop")):
        crit(model(x2), y2).backward()
        opt.step()
        opt.zero_grad()
    tr.flush()
    assert [r.step for r in led.steps("p")] == [0, 1]
    tr.close()
    assert _hook_count(model, opt, crit) == 0


def _independent_descriptor(t: torch.Tensor) -> dict[str, Any]:
    arr = t.detach().numpy()
    raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes(order="C")
    return {"dtype": "float64", "shape": list(arr.shape), "sha256": hashlib.sha256(raw).hexdigest()}


def test_checkpoint_digests_are_stable_and_recomputable(led: Any) -> None:
    model = make_model()
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = attach(model, opt, ledger=led, run="c", criterion=crit)
    s1, s2 = tr.checkpoint("start"), tr.checkpoint("again")
    c1, c2 = (r for r in checkpoints(led, "c") if r.seq in (s1, s2))
    assert c1.state_dict_sha256 == c2.state_dict_sha256 and c1.layer_sha256 == c2.layer_sha256
    assert c1.tag == "start" and c1.step == 0
    for layer in LAYERS:
        mod = model.get_submodule(layer)
        params = {n: _independent_descriptor(p) for n, p in mod.named_parameters()}
        assert c1.body["layers"][layer]["params"] == params
        assert c1.layer_sha256[layer] == hashlib.sha256(rfc8785.dumps(params)).hexdigest()
    sd = {k: _independent_descriptor(v) for k, v in model.state_dict().items()}
    assert c1.tensors == sd and c1.state_dict_sha256 == hashlib.sha256(rfc8785.dumps(sd)).hexdigest()
    x, y = data(4)
    with tr.batch(["a", "b", "c", "d"]):
        crit(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    final = tr.close()
    last = checkpoints(led, "c")[-1]
    assert last.seq == final and last.tag == "final" and last.step == 1
    assert last.state_dict_sha256 != c1.state_dict_sha256
    assert all(last.layer_sha256[k] != c1.layer_sha256[k] for k in LAYERS)
    with pytest.raises(RuntimeError, match="is closed"), tr.batch(["a"]):
        pass


def test_mismatched_ids_and_batch_is_a_clear_error(led: Any) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = attach(model, opt, ledger=led, run="bad", criterion=nn.CrossEntropyLoss())
    x, y = data(4)
    size = led.size
    msg = "tracker.batch got 3 example ids but the model input batch has 4 rows"
    with pytest.raises(ValueError, match=msg), tr.batch(["a", "b", "c"]):
        model(x)
    assert led.size == size
    with tr.batch(["a", "b", "c", "d"]):  # the tracker is usable afterwards
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    tr.flush()
    assert [len(r.example_ids) for r in led.steps("bad")] == [4]
    tr.close()


def test_nan_loss_is_recorded_and_flagged_not_crashed(led: Any) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    tr = attach(model, opt, ledger=led, run="nan", criterion=crit)
    x, y = data(4)
    x[2, 0] = float("nan")
    with tr.batch(["a", "b", "c", "d"]):
        crit(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    tr.flush()
    (rec,) = led.steps("nan")
    assert (
        rec.flags["nan_loss"] == [2]
        and math.isnan(rec.losses[2])
        and np.isfinite(rec.losses[[0, 1, 3]]).all()
    )
    assert 2 in rec.flags["nonfinite_grad_norm"]
    assert led.verify().ok
    tr.close()


def test_attach_refuses_unsupported_or_inconsistent_criteria(led: Any) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="criterion KLDivLoss is not supported"):
        attach(model, opt, ledger=led, run="x", criterion=nn.KLDivLoss())
    with pytest.raises(ValueError, match="reduction='sum' but loss_reduction='mean'"):
        attach(model, opt, ledger=led, run="x", criterion=nn.CrossEntropyLoss(reduction="sum"))
    with pytest.raises(ValueError, match="routing policy needs labels"):
        attach(model, opt, ledger=led, run="x", policy=object())  # type: ignore[arg-type]
    assert led.size == 1  # nothing appended by refused attaches


def test_public_exports() -> None:
    assert instrument.attach is attach
    assert {"Tracker", "Policy", "DPConfig"} <= set(dir(instrument))


# ----- routing policy + manifest, end to end ------------------------------------------------------------
POLICY_YAML = """\
gradledger_policy: 1
name: demo
groups:
  shallow: ["0", "2"]
  deep: ["4"]
rules:
  - name: excluded
    when: {any: [{review: reject}, {rights: withdrawn}]}
    weights: {"*": 0.0}
  - name: gold
    when: {gold: true}
    weights: {"*": 1.0}
  - name: low-consensus
    when: {consensus: {lt: 0.7}}
    weights: {shallow: 1.0, deep: 0.0}
default: {"*": 0.5}
"""
# example -> (export row fields, expected rule index, expected weights for layers 0, 2, 4)
PROVENANCE: dict[str, tuple[dict[str, Any], int, list[float]]] = {
    "e0": ({"consensus": 0.9}, -1, [0.5, 0.5, 0.5]),
    "e1": ({"consensus": 0.5}, 2, [1, 1, 0]),
    "e2": ({"consensus": 0.95, "review": "reject", "reviewer": "rev@example.com"}, 0, [0, 0, 0]),
    "e3": ({"consensus": 0.3, "gold": True}, 1, [1, 1, 1]),
    "e4": ({"consensus": 0.9, "rights": "withdrawn"}, 0, [0, 0, 0]),
    "e5": ({}, -1, [0.5, 0.5, 0.5]),  # no consensus score: `lt` never matches a missing value
    "e6": ({"consensus": 0.69, "review": "approve", "reviewer": "rev@example.com"}, 2, [1, 1, 0]),
    "e7": ({"consensus": 0.7}, -1, [0.5, 0.5, 0.5]),
}


@pytest.fixture
def manifest(led: Any, tmp_path: Path) -> Any:
    import json

    from ledger import ingest
    from ledger.ingest.pseudonym import Pseudonymizer
    from ledger.provenance import Manifest

    rows = [
        {"item_id": ex, "label_id": f"lab-{ex}", "value": "cat", "producer": "ann@example.com", **fields}
        for ex, (fields, _, _) in PROVENANCE.items()
    ]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest.ingest("jsonl", path, led, pseudonym_key=Pseudonymizer(bytes(range(32))))
    return Manifest.create(led, "train-v1", {ex: f"lab-{ex}" for ex in PROVENANCE})


def test_policy_routes_each_example_and_the_step_proves_it(led: Any, manifest: Any) -> None:
    policy = instrument.Policy.from_yaml(POLICY_YAML, "demo.yaml")
    model = make_model()
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = attach(model, opt, ledger=led, run="routed", policy=policy, labels=manifest, criterion=crit)
    ids = list(PROVENANCE)
    x, y = data(len(ids))
    w = torch.tensor([PROVENANCE[i][2] for i in ids], dtype=torch.float64)
    # independent oracle of the routed update: Δθ_l = -lr · Σ_i w_il ∇ℓ_i / B (torch.func per-sample grads)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    expected = {
        k: params[k] - 0.1 * torch.tensordot(w[:, LAYERS.index(k.rsplit(".", 1)[0])], g, dims=1) / len(ids)
        for k, g in per.items()
    }
    with tr.batch(ids):
        crit(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k], rtol=1e-10, atol=1e-12)
    tr.flush()
    (rec,) = led.steps("routed")
    np.testing.assert_array_equal(rec.weights, np.array([PROVENANCE[i][2] for i in ids], np.float32))
    np.testing.assert_array_equal(rec.rule_ids, [PROVENANCE[i][1] for i in ids])
    np.testing.assert_allclose(rec.grad_norms, oracle_norms(make_model(), x, y), rtol=1e-6)  # unrouted norms
    # the step names the policy entry, which rebuilds to the same policy; the run entry pins both digests
    assert instrument.Policy.from_entry(led, rec.policy_seq) == policy
    run = run_record(led, "routed")
    assert (run.policy_seq, run.policy_digest) == (rec.policy_seq, policy.digest)
    assert (run.manifest_seq, run.manifest_digest) == (manifest.seq, manifest.digest)
    tr.close()
    # a second run under the same policy reuses its entry
    tr2 = attach(
        make_model(),
        torch.optim.SGD(make_model().parameters(), lr=0.1),
        ledger=led,
        run="r2",
        policy=policy,
        labels=manifest,
    )
    assert tr2.policy_seq == rec.policy_seq
    tr2.close()


def test_unknown_example_id_names_id_and_manifest(led: Any, manifest: Any) -> None:
    policy = instrument.Policy.from_yaml(POLICY_YAML, "demo.yaml")
    model = make_model()
    tr = attach(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        ledger=led,
        run="u",
        policy=policy,
        labels=manifest,
    )
    size = led.size
    with (
        pytest.raises(KeyError, match=r"example id 'e99' is not in manifest 'train-v1' \(seq \d+"),
        tr.batch(["e0", "e99"]),
    ):
        pass
    assert led.size == size
    # without a policy the manifest still guards the ids
    tr.close()
    tr2 = attach(
        make_model(), torch.optim.SGD(model.parameters(), lr=0.1), ledger=led, run="u2", labels=manifest
    )
    with pytest.raises(KeyError, match="'nope' is not in manifest 'train-v1'"), tr2.batch(["nope"]):
        pass
    tr2.close()


def test_policy_glob_matching_no_layer_fails_at_attach(led: Any, manifest: Any) -> None:
    policy = instrument.Policy.from_yaml(
        POLICY_YAML.replace('deep: ["4"]', 'deep: ["4", "head.*"]'), "demo.yaml"
    )
    model = make_model()
    size = led.size
    with pytest.raises(
        instrument.PolicyError, match=r"demo.yaml:5: groups\.deep\[1\]: glob 'head\.\*' matches no layer"
    ):
        attach(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            ledger=led,
            run="g",
            policy=policy,
            labels=manifest,
        )
    assert led.size == size


def test_dp_sample_rate_is_derived_from_the_manifest(led: Any, manifest: Any) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = instrument.DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, accountant="rdp")
    tr = attach(model, opt, ledger=led, run="dp", labels=manifest, dp=dp, seed=1)
    x, y = data(4)
    with tr.batch(["e0", "e1", "e2", "e3"]):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    tr.flush()
    (rec,) = led.steps("dp")
    assert (
        rec.eps is not None
        and rec.eps > 0
        and rec.clip_factors is not None
        and rec.clip_factors.shape == (4,)
    )
    body = led.entry(rec.seq).body
    assert body["dp"]["sample_rate"] == 4 / len(PROVENANCE) and body["dp"]["eps_step"] == 0
    tr.close()


@pytest.mark.parametrize("max_pending", [0, 1, 8])
def test_background_and_synchronous_appends_record_the_same_steps(tmp_path: Path, max_pending: int) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    x, y = data(40)
    with Ledger.open(tmp_path / f"w{max_pending}.db", create=True) as led:
        tr = attach(model, opt, ledger=led, run="w", criterion=crit, max_pending=max_pending)
        for s in range(10):
            with tr.batch([f"e{4 * s + i}" for i in range(4)]):
                crit(model(x[4 * s : 4 * s + 4]), y[4 * s : 4 * s + 4]).backward()
                opt.step()
                opt.zero_grad()
        final = tr.close()  # flushes: every step precedes the final checkpoint
        recs = list(led.steps("w"))
        assert [r.step for r in recs] == list(range(10))
        assert all(r.seq < final for r in recs), ([r.seq for r in recs], final)
        assert [r.example_ids[0] for r in recs] == [f"e{4 * s}" for s in range(10)]
        assert led.verify().ok


def test_a_failed_append_is_raised_and_no_later_step_is_recorded(
    led: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = attach(model, opt, ledger=led, run="f")
    x, y = data(4)

    def step() -> None:
        with tr.batch(["a", "b", "c", "d"]):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    step()
    tr.flush()
    real = led.append_many

    def boom(entries: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(led, "append_many", boom)
    step()
    with pytest.raises(RuntimeError, match="appending a step entry failed: disk full"):
        tr.flush()
    monkeypatch.setattr(led, "append_many", real)
    with pytest.raises(RuntimeError, match="disk full"):
        step()  # sticky: the run cannot silently continue with a gap
    with pytest.raises(RuntimeError, match="disk full"):
        tr.close()  # hooks are removed all the same
    assert [r.step for r in led.steps("f")] == [0]
    assert len(opt._optimizer_step_pre_hooks) == 0  # type: ignore[attr-defined]


class AttnNet(nn.Module):
    """A fallback-kernel layer (MultiheadAttention uses its child out_proj's parameters) and a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.frozen(h).mean(1))


def test_fallback_layers_cover_their_children_in_updates_dp_and_checkpoints(led: Any) -> None:
    torch.manual_seed(0)
    model = AttnNet().double()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    dp = instrument.DPConfig(0.5, 1.0, 1e-5, "rdp", sample_rate=0.1, seed=3)
    tr = attach(model, opt, ledger=led, run="attn", dp=dp)
    assert tr.layers == ["inp", "attn", "head"]
    expected = {
        "inp": ["weight", "bias"],
        "attn": ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"],
        "head": ["weight", "bias"],
    }
    run = run_record(led, "attn")
    assert {lay["name"]: sorted(lay["params"]) for lay in run.architecture["layers"]} == {
        k: sorted(v) for k, v in expected.items()
    }
    assert tr.mechanism is not None and len(tr.mechanism.params) == 8  # noise reaches out_proj too
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.randn(4, 5, 4, dtype=torch.float64)
    with tr.batch(["a", "b", "c", "d"]):
        nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
        opt.zero_grad()
    final = tr.close()
    (rec,) = led.steps("attn")
    after = dict(model.named_parameters())
    for li, (layer, pnames) in enumerate(expected.items()):
        diff = math.sqrt(
            sum(float((after[f"{layer}.{p}"] - before[f"{layer}.{p}"]).pow(2).sum()) for p in pnames)
        )
        assert rec.update_norms is not None and rec.update_norms[li] == pytest.approx(diff, rel=1e-12)
    assert float((after["attn.out_proj.bias"] - before["attn.out_proj.bias"]).abs().sum()) > 0
    ck = led.entry(final).body
    assert sorted(ck["layers"]["attn"]["params"]) == sorted(expected["attn"])
    assert "frozen.weight" in ck["state_dict"] and "frozen" not in ck["layers"]  # frozen: state, not a layer


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.out = nn.Linear(6, 11)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(idx)))


def test_token_level_losses_from_flattened_outputs(led: Any) -> None:
    torch.manual_seed(0)
    model = TokenNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss(ignore_index=-100)
    tr = attach(model, opt, ledger=led, run="tok", criterion=crit)
    idx = torch.randint(0, 11, (3, 5))
    tgt = torch.randint(0, 11, (3, 5))
    tgt[0, :2] = -100  # ignored positions do not count in sample 0's mean
    tgt[2, :] = -100  # a sample with every position ignored: loss 0, not NaN
    with torch.no_grad():
        logits = model(idx)
    expect = []
    for i in range(3):
        keep = tgt[i] != -100
        expect.append(
            float(nn.functional.cross_entropy(logits[i][keep], tgt[i][keep])) if keep.any() else 0.0
        )
    with tr.batch(["s0", "s1", "s2"]):
        out = model(idx)
        crit(out.reshape(-1, 11), tgt.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    with (
        pytest.raises(ValueError, match=r"3 example ids but the criterion's input has 4 rows"),
        tr.batch(["a", "b", "c"]),
    ):
        crit(model(idx).reshape(-1, 11)[:4], tgt.reshape(-1)[:4])
    tr.close()
    (rec,) = led.steps("tok")
    np.testing.assert_allclose(rec.losses, expect, rtol=1e-6)
    assert rec.margins is None  # margins are per example, not per token


@pytest.mark.parametrize("chunk", [1, 7, 1 << 18])
@pytest.mark.parametrize(
    "crit",
    [
        nn.CrossEntropyLoss(ignore_index=2, label_smoothing=0.1),
        nn.CrossEntropyLoss(weight=torch.rand(5, dtype=torch.float64) + 0.5),
        nn.MSELoss(),
        nn.BCEWithLogitsLoss(pos_weight=torch.full((5,), 2.0, dtype=torch.float64)),
        nn.HuberLoss(delta=0.5),
    ],
    ids=["ce-ignore-smooth", "ce-weight", "mse", "bce-logits", "huber"],
)
def test_per_sample_losses_match_a_loop_over_samples(
    crit: nn.Module, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunked recomputation (any chunk size) equals each sample's own criterion value, computed alone."""
    from instrument import tracker as T

    monkeypatch.setattr(T, "_CHUNK_ELEMS", chunk)
    g = torch.Generator().manual_seed(0)
    n, k = 4, 3  # 4 samples, 3 rows each, flattened batch-major
    inp = torch.randn(n * k, 5, generator=g, dtype=torch.float64)
    if isinstance(crit, nn.CrossEntropyLoss):
        tgt = torch.randint(0, 5, (n * k,), generator=g)
    else:
        tgt = torch.rand(n * k, 5, generator=g, dtype=torch.float64)
    got = T._per_sample_loss(crit, inp, tgt, n)
    expect = []
    for i in range(n):
        rows = slice(i * k, i * k + k)
        x, t = inp[rows], tgt[rows]
        if isinstance(crit, nn.CrossEntropyLoss) and crit.ignore_index == 2:
            keep = t != 2
            x, t = x[keep], t[keep]
        if isinstance(crit, nn.CrossEntropyLoss) and crit.weight is not None:
            # class-weighted per-sample loss, unnormalised: the mean of w_y * loss over the sample's rows
            expect.append(
                float((crit.weight[t] * nn.functional.cross_entropy(x, t, reduction="none")).mean())
            )
            continue
        expect.append(float(type(crit)(**_crit_kwargs(crit), reduction="mean")(x, t)))
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-12)


def _crit_kwargs(crit: nn.Module) -> dict[str, Any]:
    if isinstance(crit, nn.CrossEntropyLoss):
        return {"ignore_index": crit.ignore_index, "label_smoothing": crit.label_smoothing}
    if isinstance(crit, nn.BCEWithLogitsLoss):
        return {"pos_weight": crit.pos_weight}
    if isinstance(crit, nn.HuberLoss):
        return {"delta": crit.delta}
    return {}


@pytest.mark.parametrize(
    "crit",
    [
        nn.CrossEntropyLoss(),
        nn.CrossEntropyLoss(ignore_index=2, label_smoothing=0.1),
        nn.CrossEntropyLoss(weight=torch.rand(5, dtype=torch.float64) + 0.5, ignore_index=1),
        nn.NLLLoss(ignore_index=4),
    ],
    ids=["ce", "ce-ignore-smooth", "ce-weight-ignore", "nll-ignore"],
)
def test_one_row_per_sample_losses_equal_the_chunked_path_bit_for_bit(
    crit: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The [B, C] fast path (the criterion's own per-row loss) gives the chunked masked mean's exact bytes,
    ignored targets (0) and a perfectly confident row (loss -0.0 -> 0.0) included, and each sample's own loss."""
    from instrument import tracker as T

    g = torch.Generator().manual_seed(0)
    n = 9
    inp = torch.randn(n, 5, generator=g, dtype=torch.float64) * 3
    inp[0] = torch.tensor([200.0, -200, -200, -200, -200], dtype=torch.float64)  # p(class 0) = 1 exactly
    if isinstance(crit, nn.NLLLoss):
        inp = torch.log_softmax(inp, 1)
    tgt = torch.randint(0, 5, (n,), generator=g)
    tgt[0], tgt[1], tgt[2], tgt[3] = 0, 1, 2, 4  # every ignore_index used above occurs
    fast = T._per_sample_loss(crit, inp, tgt, n)
    monkeypatch.setattr(T, "_CHUNK_ELEMS", 1)  # one row per chunk: the general masked path
    chunked = T._per_sample_loss(crit, inp, tgt, n)
    assert fast.numpy().tobytes() == chunked.numpy().tobytes()
    ignore = getattr(crit, "ignore_index", -100)
    for i in range(n):
        if int(tgt[i]) == ignore:
            assert float(fast[i]) == 0.0
            continue
        alone = type(crit)(**{k: getattr(crit, k) for k in ("weight", "label_smoothing") if hasattr(crit, k)})
        expect = float(alone(inp[i : i + 1], tgt[i : i + 1]))
        if getattr(crit, "weight", None) is not None:  # mean of one weighted row divides by w_y: undo it
            expect *= float(crit.weight[tgt[i]])
        assert float(fast[i]) == pytest.approx(expect, rel=1e-12, abs=1e-300)


def test_update_norm_buffers_are_kept_between_steps_and_released_by_pause_and_close(led: Any) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    crit = nn.CrossEntropyLoss()
    tr = attach(model, opt, ledger=led, run="u", criterion=crit)
    x, y = data(8)
    expect = []

    def step(ids: list[str]) -> None:
        before = snapshot(model)
        with tr.batch(ids):
            crit(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        expect.append(update_norms(before, model))

    step(list("abcdefgh"))
    kept = tr._before
    assert kept is not None
    step(list("abcdefgh"))
    assert tr._before is kept  # reused, not reallocated
    tr.pause()
    assert tr._before is None
    tr.resume()
    step(list("ijklmnop"))
    tr.close()
    assert tr._before is None
    got = [r.update_norms for r in led.steps("u")]
    assert len(got) == 3
    for g, e in zip(got, expect, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-12)


def test_losses_use_the_criterion_settings_of_their_own_step(led: Any) -> None:
    """Losses recomputed later (on the writer thread) use the settings and class weights the step ran with,
    not ones the loop changes afterwards, nor logits it modifies in place after the loss."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    tr = attach(model, opt, ledger=led, run="s", criterion=crit, max_pending=8)
    x, y = data(8)
    y[0] = 1
    expect = []
    for smoothing, ignore in [(0.0, -100), (0.2, 1), (0.1, 2)]:
        crit.label_smoothing, crit.ignore_index = smoothing, ignore
        with torch.no_grad():
            logits = model(x)
        per = nn.functional.cross_entropy(
            logits, y, weight=crit.weight, ignore_index=ignore, label_smoothing=smoothing, reduction="none"
        )
        expect.append(per.numpy().copy())
        with tr.batch([f"e{i}" for i in range(8)]):
            out = model(x)
            crit(out, y).backward()
            out.data.zero_()  # in place after the loss: the recorded losses must not see it
            opt.step()
            opt.zero_grad()
        crit.weight.mul_(3.0)  # in place after the step: not the weights this step ran with
    tr.flush()
    recs = list(led.steps("s"))
    assert len(recs) == 3
    for rec, e in zip(recs, expect, strict=True):
        assert rec.losses is not None
        np.testing.assert_allclose(rec.losses, e.astype(np.float32), rtol=1e-6)
    assert float(recs[1].losses[0]) == 0.0  # y[0] = 1 was ignored in step 1 only
    tr.close()


def test_losses_under_cpu_autocast_are_computed_as_the_criterion_computed_them(led: Any) -> None:
    """Under autocast the recomputation runs inside the criterion's context (cross-entropy upcast to float32),
    not later on the writer thread, where bfloat16 logits would give bfloat16-rounded losses."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    tr = attach(model, opt, ledger=led, run="ac", criterion=crit)
    x, y = torch.randn(8, 6) * 3, torch.randint(0, 5, (8,))
    with torch.no_grad():
        logits = model(x).to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expect = nn.functional.cross_entropy(logits, y, reduction="none")
        plain_bf16 = nn.functional.cross_entropy(logits, y, reduction="none").float()
    assert expect.dtype == torch.float32 and not torch.equal(
        expect, plain_bf16
    )  # the test can tell them apart
    with tr.batch([f"e{i}" for i in range(8)]):
        out = model(x).to(torch.bfloat16)  # the engine runs the layers outside autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = crit(out, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    tr.flush()
    (rec,) = list(led.steps("ac"))
    assert rec.losses is not None
    np.testing.assert_array_equal(rec.losses, expect.numpy())
    tr.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(48, 7), (6, 7, 3, 4)], ids=["tokens", "pixels"])
def test_chunked_cross_entropy_gives_the_bytes_of_one_pass(
    dtype: torch.dtype, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many chunks through one reused log-softmax buffer (nll_loss of log_softmax, as ATen computes
    cross-entropy) give the same bytes as a single F.cross_entropy pass, weights and ignore_index included."""
    from instrument import tracker as T

    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g, dtype=dtype) * 3
    t_shape = (shape[0], *shape[2:])
    y = torch.randint(0, shape[1], t_shape, generator=g)
    y.view(-1)[::5] = 2
    for crit in (
        nn.CrossEntropyLoss(),
        nn.CrossEntropyLoss(ignore_index=2, weight=torch.rand(shape[1], generator=g, dtype=dtype) + 0.5),
    ):
        one = T._per_sample_loss(crit, x, y, 6)
        monkeypatch.setattr(T, "_CHUNK_ELEMS", 1)  # one row per chunk
        many = T._per_sample_loss(crit, x, y, 6)
        cfg = T._LossConfig.of(crit)
        pieces = torch.cat(T._class_losses(cfg, x, y, 1))
        monkeypatch.undo()
        assert many.numpy().tobytes() == one.numpy().tobytes()
        whole = nn.functional.cross_entropy(
            x, y, weight=crit.weight, ignore_index=crit.ignore_index, reduction="none"
        )
        assert pieces.numpy().tobytes() == whole.numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("k", [1, 6], ids=["row-per-sample", "tokens"])
def test_cross_entropy_losses_from_its_saved_log_probs_equal_the_recomputation_bit_for_bit(
    dtype: torch.dtype, reduction: str, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-sample losses read from the log-softmax that cross-entropy saved for backward have the exact bytes
    of the chunked recomputation (class weights, ignore_index, a perfectly confident row included)."""
    from instrument import tracker as T

    g = torch.Generator().manual_seed(11)
    n, c = 5, 7
    for kwargs in ({}, {"ignore_index": 2}, {"weight": torch.rand(c, generator=g, dtype=dtype) + 0.5}):
        crit = nn.CrossEntropyLoss(reduction=reduction, **kwargs)
        inp = (torch.randn(n * k, c, generator=g, dtype=dtype) * 4).requires_grad_()
        with torch.no_grad():
            inp[0] = torch.tensor([300.0, -300, -300, -300, -300, -300, -300])  # p(class 0) = 1 exactly
        tgt = torch.randint(0, c, (n * k,), generator=g)
        tgt[0], tgt[1] = 0, 2
        out = crit(inp, tgt)
        logp = T._saved_log_probs(crit, inp.detach(), tgt, out)
        assert logp is not None
        saved = T._per_sample_loss(crit, inp.detach(), tgt, n, logp)
        recomputed = T._per_sample_loss(crit, inp.detach(), tgt, n)
        monkeypatch.setattr(T, "_CHUNK_ELEMS", 1)  # one row per chunk through the reused buffer
        chunked = T._per_sample_loss(crit, inp.detach(), tgt, n)
        monkeypatch.undo()
        assert saved.numpy().tobytes() == recomputed.numpy().tobytes() == chunked.numpy().tobytes()


def test_saved_log_probs_are_used_only_where_they_are_exactly_log_softmax_of_the_input() -> None:
    from instrument import tracker as T

    class Tempered(nn.CrossEntropyLoss):  # a subclass may feed nll_loss something else
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return super().forward(x / 2, t)

    x = torch.randn(6, 4, requires_grad=True)
    t = torch.randint(0, 4, (6,))
    assert T._saved_log_probs(nn.CrossEntropyLoss(), x.detach(), t, nn.CrossEntropyLoss()(x, t)) is not None
    smooth = nn.CrossEntropyLoss(label_smoothing=0.1)
    assert T._saved_log_probs(smooth, x.detach(), t, smooth(x, t)) is None
    assert T._saved_log_probs(Tempered(), x.detach(), t, Tempered()(x, t)) is None
    nll = nn.NLLLoss()
    assert T._saved_log_probs(nll, x.detach(), t, nll(torch.log_softmax(x, 1), t)) is None
    with torch.no_grad():  # no autograd node to read
        assert T._saved_log_probs(nn.CrossEntropyLoss(), x, t, nn.CrossEntropyLoss()(x, t)) is None
    x3, t3 = torch.randn(2, 4, 3, requires_grad=True), torch.randint(0, 4, (2, 3))  # class dim 1 of [N, C, d]
    assert T._saved_log_probs(nn.CrossEntropyLoss(), x3.detach(), t3, nn.CrossEntropyLoss()(x3, t3)) is None
    soft = torch.softmax(torch.randn(6, 4), 1)  # probability targets
    assert T._saved_log_probs(nn.CrossEntropyLoss(), x.detach(), soft, nn.CrossEntropyLoss()(x, soft)) is None


@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["saved-log-probs", "recomputed"])
def test_token_level_step_losses_come_from_the_criterions_own_log_probs(
    led: Any, smoothing: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large token-level input (recorded at once, not deferred) takes its losses from the saved log-softmax:
    no recomputation runs, and the recorded losses are the independent per-sample values."""
    from instrument import tracker as T

    monkeypatch.setattr(T, "_DEFER_ELEMS", -1)
    calls: list[int] = []
    real = T._class_losses
    monkeypatch.setattr(T, "_class_losses", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = TokenNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=smoothing)
    tr = attach(model, opt, ledger=led, run="tok-saved", criterion=crit)
    idx = torch.randint(0, 11, (4, 5))
    tgt = torch.randint(0, 11, (4, 5))
    tgt[1, :3] = -100
    with torch.no_grad():
        logits = model(idx)
    expect = [
        float(nn.functional.cross_entropy(logits[i], tgt[i], ignore_index=-100, label_smoothing=smoothing))
        for i in range(4)
    ]
    with tr.batch(["s0", "s1", "s2", "s3"]):
        crit(model(idx).reshape(-1, 11), tgt.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    tr.close()
    (rec,) = led.steps("tok-saved")
    np.testing.assert_allclose(rec.losses, expect, rtol=1e-6)
    assert bool(calls) == (smoothing != 0.0)


def test_loss_config_reads_each_criterions_own_settings() -> None:
    from instrument import tracker as T

    class MyHuber(nn.HuberLoss):
        pass

    w, pw = torch.rand(3) + 0.5, torch.rand(3) + 0.5
    cases = [
        (nn.CrossEntropyLoss(weight=w, ignore_index=4, label_smoothing=0.2), dict(weight=w, ignore_index=4, label_smoothing=0.2)),
        (nn.NLLLoss(weight=w, ignore_index=1), dict(weight=w, ignore_index=1)),
        (nn.BCEWithLogitsLoss(weight=w, pos_weight=pw), dict(weight=w, pos_weight=pw)),
        (nn.BCELoss(weight=w), dict(weight=w)),
        (nn.HuberLoss(delta=0.3), dict(delta=0.3)),
        (MyHuber(delta=0.7), dict(delta=0.7)),
        (nn.SmoothL1Loss(beta=2.5), dict(beta=2.5)),
        (nn.MSELoss(), {}),
    ]  # fmt: skip
    for crit, settings in cases:
        for _ in range(2):  # the second call goes through the per-class cache of setting names
            cfg = T._LossConfig.of(crit)
            assert cfg == T._LossConfig(type(crit), **settings)
        crit_settings = dict(settings)
        if "ignore_index" in settings:  # a setting changed between calls is read afresh
            crit.ignore_index = crit_settings["ignore_index"] = 7
            assert T._LossConfig.of(crit) == T._LossConfig(type(crit), **crit_settings)
