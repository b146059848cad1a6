"""TracIn-CP over recorded sketches vs exact TracIn from full per-sample gradients (torch.func, float64)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, grad, vmap

from audit.influence import InfluenceError, TrainingStep, rows_from_table, tracin_scores
from instrument.sketch import Sketcher, sketch_batch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


LR = 0.1


def mlp(h1: int, h2: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    return nn.Sequential(nn.Linear(64, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 10)).to(
        dtype
    )


def digits(seed: int) -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(d.target))
    return (d.data[idx] / 16.0).astype(np.float64), d.target[idx]


def per_sample_flat(
    model: nn.Module, layers: list[str], x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Oracle: each sample's full gradient of each layer's weight+bias, flattened: ``layer -> [B, P]``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None], reduction="sum")

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return {name: torch.cat([g[f"{name}.weight"].flatten(1), g[f"{name}.bias"]], 1) for name in layers}


@dataclass
class Recorded:
    """A training run recorded the way the tracker records it (step payloads + checkpoints), in memory."""

    model: nn.Module
    sketcher: Sketcher
    steps: list[TrainingStep] = field(default_factory=list)
    checkpoint_seqs: list[int] = field(default_factory=list)
    states: list[dict[str, torch.Tensor]] = field(default_factory=list)
    oracle: list[tuple[np.ndarray, dict[str, torch.Tensor], int]] = field(default_factory=list)

    def query_fn(self, x: torch.Tensor, y: torch.Tensor, layers: list[str]) -> Any:
        specs = [self.sketcher.specs[n] for n in layers]

        def query(w: int) -> dict[str, np.ndarray]:
            m = copy.deepcopy(self.model)
            m.load_state_dict(self.states[w])
            out = sketch_batch(m, specs, x, y, lambda o, t: F.cross_entropy(o, t, reduction="none"))
            return {k: v.double().numpy() for k, v in out.items()}

        return query


def train_recorded(
    x: np.ndarray, y: np.ndarray, model: nn.Module, layers: list[str], methods: dict[str, str], k: int,
    epochs: int, batch: int, seed: int, oracle: bool = False, ids: list[str] | None = None,
) -> Recorded:  # fmt: skip
    """SGD with one checkpoint per epoch; each step records the Sketcher's payloads (and, for the oracle,
    every sample's full per-layer gradient at that step)."""
    torch.manual_seed(seed)
    dtype = next(model.parameters()).dtype
    xt, yt = torch.tensor(x, dtype=dtype), torch.tensor(y)
    ids = ids or [f"ex-{i:04d}" for i in range(len(y))]
    all_layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    sk = Sketcher(model, layers, k=k, seed=seed, methods=methods)
    rec = Recorded(model, sk)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    seq = 0
    for epoch in range(epochs):
        perm = torch.randperm(len(yt))
        for lo in range(0, len(perm), batch):
            bi = perm[lo : lo + batch]
            if oracle:
                sk.pause()
                rec.oracle.append((bi.numpy(), per_sample_flat(model, layers, xt[bi], yt[bi]), epoch))
                sk.resume()
            F.cross_entropy(model(xt[bi]), yt[bi]).backward()
            payloads = sk.collect(expected_rows=len(bi))
            opt.step()
            opt.zero_grad()
            rec.steps.append(
                TrainingStep(
                    seq,
                    len(rec.steps),
                    epoch,
                    [ids[i] for i in bi.tolist()],
                    all_layers,
                    np.full(len(all_layers), LR),
                    None,
                    None,
                    payloads,
                )  # fmt: skip
            )
            seq += 1
        rec.checkpoint_seqs.append(seq)
        rec.states.append(copy.deepcopy(model.state_dict()))
        seq += 1
    sk.remove()
    return rec


def exact_tracin(rec: Recorded, layers: list[str], x: torch.Tensor, y: torch.Tensor, n: int) -> np.ndarray:
    """Sum over steps of lr <full per-sample gradient at the step, full query gradient at the window's checkpoint>."""
    q = []
    for state in rec.states:
        m = copy.deepcopy(rec.model)
        m.load_state_dict(state)
        q.append(per_sample_flat(m, layers, x, y))
    exact = np.zeros((len(y), n))
    for rows, grads, window in rec.oracle:
        for name in layers:
            exact[:, rows] += LR * (q[window][name] @ grads[name].T).numpy()
    return exact


def _columns(table: Any, n: int) -> np.ndarray:
    pos = {eid: j for j, eid in enumerate(table.example_ids)}
    return np.array([pos[f"ex-{i:04d}"] for i in range(n)])


# ------------------------------------------------------------------------------------------------- tests
def test_sketched_influence_correlates_with_exact_tracin() -> None:
    """k = 512 Kronecker sketch of a 32x32 hidden layer: Spearman >= 0.9 with exact TracIn for every query."""
    x, y = digits(0)
    xtr, ytr, xq, yq = x[:400], y[:400], torch.tensor(x[1500:1510]), torch.tensor(y[1500:1510])
    layers = ["2"]
    rec = train_recorded(xtr, ytr, mlp(32, 32), layers, {}, k=512, epochs=3, batch=40, seed=0, oracle=True)
    spec = rec.sketcher.specs["2"]
    assert spec.method == "kron" and (spec.k_out, spec.k_in) == (32, 16)  # input side really projected
    exact = exact_tracin(rec, layers, xq, yq, len(ytr))
    table = tracin_scores(
        lambda: rec.steps, rec.checkpoint_seqs, [0, 1, 2], rec.query_fn(xq, yq, layers), [spec], 5
    )
    est = table.totals[:, _columns(table, len(ytr))]
    rhos = [spearmanr(est[q], exact[q]).statistic for q in range(len(yq))]
    assert min(rhos) >= 0.9, rhos


def test_rank1_path_equals_exact_tracin_with_routing_and_clipping() -> None:
    x, y = digits(1)
    xtr, ytr, xq, yq = x[:240], y[:240], torch.tensor(x[1500:1506]), torch.tensor(y[1500:1506])
    layers = ["2", "4"]
    rec = train_recorded(
        xtr,
        ytr,
        mlp(24, 16),
        layers,
        {"2": "rank1", "4": "rank1"},
        k=64,
        epochs=2,
        batch=30,
        seed=1,
        oracle=True,
    )
    assert rec.steps[0].payloads["g.4"].dtype == np.dtype("<f8")  # float64 model: factors stored losslessly
    # give the recorded steps routing weights, clip factors and an untrained layer; the oracle applies the same
    rng = np.random.default_rng(0)
    steps, coefs = [], []
    for st in rec.steps:
        b = len(st.example_ids)
        w = rng.uniform(0, 1, (b, 3)).astype(np.float32)
        w[: b // 4] = 0.0  # barred from every layer
        clip = rng.uniform(0.2, 1, b).astype(np.float32)
        lr = np.array([LR, LR, LR * 0.5]) if st.epoch == 0 else np.array([LR, LR, np.nan])
        steps.append(
            TrainingStep(st.seq, st.step, st.epoch, st.example_ids, st.layers, lr, w, clip, st.payloads)
        )
        coefs.append({"2": np.nan_to_num(lr[1]) * w[:, 1] * clip, "4": np.nan_to_num(lr[2]) * w[:, 2] * clip})
    qgrads = []
    for state in rec.states:
        m = copy.deepcopy(rec.model)
        m.load_state_dict(state)
        qgrads.append(per_sample_flat(m, layers, xq, yq))
    exact = np.zeros((2, len(layers), len(yq), len(ytr)))  # [window, layer, Q, N]
    for (rows, grads, window), coef in zip(rec.oracle, coefs, strict=True):
        for li, name in enumerate(layers):
            exact[window, li][:, rows] += (qgrads[window][name] @ grads[name].T).numpy() * coef[name]
    specs = [rec.sketcher.specs[n] for n in layers]
    table = tracin_scores(
        lambda: steps, rec.checkpoint_seqs, [0, 1], rec.query_fn(xq, yq, layers), specs, top=8
    )
    cols = _columns(table, len(ytr))
    want = exact.sum((0, 1))
    assert np.abs(table.totals[:, cols] - want).max() <= 1e-6 * np.abs(want).max()
    # per-checkpoint and per-layer breakdown of the top rows equals the exact split
    inv = {c: i for i, c in enumerate(cols)}
    for qi in range(len(yq)):
        for col in table.top[qi]:
            got = table.breakdown[qi][int(col)]
            np.testing.assert_allclose(got, exact[:, :, qi, inv[int(col)]], rtol=1e-6, atol=1e-9)
        assert list(table.totals[qi, table.top[qi]]) == sorted(table.totals[qi, table.top[qi]], reverse=True)
        assert table.totals[qi, table.top[qi][0]] == table.totals[qi].max()
    # one window only ("last"): the exact score restricted to that window
    last = tracin_scores(lambda: steps, rec.checkpoint_seqs, [1], rec.query_fn(xq, yq, layers), specs, top=3)
    np.testing.assert_allclose(
        last.totals[:, _columns(last, len(ytr))], exact[1].sum(0), rtol=1e-6, atol=1e-9
    )
    # combined queries: the sum of the per-query scores
    comb = tracin_scores(
        lambda: steps, rec.checkpoint_seqs, [0, 1], rec.query_fn(xq, yq, layers), specs, 4, combine=True
    )
    np.testing.assert_allclose(comb.totals[0, _columns(comb, len(ytr))], want.sum(0), rtol=1e-6, atol=1e-9)


def test_uncovered_steps_and_missing_payloads_are_reported() -> None:
    x, y = digits(2)
    rec = train_recorded(x[:60], y[:60], mlp(8, 8), ["4"], {"4": "rank1"}, 16, epochs=2, batch=20, seed=2)
    spec = rec.sketcher.specs["4"]
    q = rec.query_fn(torch.tensor(x[100:102]), torch.tensor(y[100:102]), ["4"])
    # drop the last checkpoint: the second epoch's steps are after the run's last checkpoint
    t = tracin_scores(lambda: rec.steps, rec.checkpoint_seqs[:1], [0], q, [spec], 3)
    assert t.uncovered_steps == 3 and t.steps == 3 and t.sample_steps == 60
    broken = list(rec.steps)
    st = broken[1]
    broken[1] = TrainingStep(st.seq, st.step, st.epoch, st.example_ids, st.layers, st.lr, None, None, {})
    with pytest.raises(InfluenceError, match=r"step entry 1 \(step 1\) has no 'g.4' payload"):
        tracin_scores(lambda: broken, rec.checkpoint_seqs, [0, 1], q, [spec], 3)
    with pytest.raises(InfluenceError, match="top must be >= 1"):
        tracin_scores(lambda: rec.steps, rec.checkpoint_seqs, [0], q, [spec], 0)


def poisoned_digits(seed: int = 0, n_train: int = 1300) -> SimpleNamespace:
    """Digits with 20 training images stamped with a 3x3 corner patch and relabelled to class 0."""
    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.copy()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    tr, te = idx[:n_train], idx[n_train:]
    xtr, ytr = x[tr].copy(), y[tr].copy()
    poison = rng.choice(np.flatnonzero(ytr != 0), 20, replace=False)

    def stamp(a: np.ndarray) -> np.ndarray:
        a = a.reshape(-1, 8, 8).copy()
        a[:, 5:8, 5:8] = 1.0
        return a.reshape(-1, 64)

    xtr[poison] = stamp(xtr[poison])
    ytr[poison] = 0
    mu, sd = xtr.mean(0), xtr.std(0) + 0.1
    test_src = te[y[te] != 0][:30]
    return SimpleNamespace(
        x=((xtr - mu) / sd).astype(np.float32), y=ytr, poison=poison,
        x_trig=((stamp(x[test_src]) - mu) / sd).astype(np.float32), target=0,
    )  # fmt: skip


def test_planted_poison_is_found_at_the_last_layer() -> None:
    """20 poisoned labels; for triggered test inputs the top-20 proponents at the last layer (exact rank-1
    path) hold >= 15 of them, and each row names the annotator that produced the label."""
    data = poisoned_digits()
    ids = [f"ex-{i:04d}" for i in range(len(data.y))]
    model = mlp(128, 64, torch.float32)
    rec = train_recorded(data.x, data.y, model, ["4"], {"4": "rank1"}, 0, epochs=6, batch=64, seed=0, ids=ids)
    xq = torch.tensor(data.x_trig)
    with torch.no_grad():
        pred = model(xq).argmax(1)
    xq = xq[pred == data.target]  # the predictions we ask about: triggered inputs classified as the target
    assert len(xq) >= 10
    yq = torch.full((len(xq),), data.target)
    # provenance: the poisoner is one annotator; everyone else labelled the rest
    poisoned_ids = {ids[i] for i in data.poison}
    prov = {
        eid: SimpleNamespace(
            label_id=f"lab-{eid}",
            label_seq=None,
            annotator="ann-poison" if eid in poisoned_ids else f"ann-{i % 7}",
            producer="human",
            source="jsonl",
            consensus=1.0,
            consensus_method=None,
            review=None,
            domain=None,
        )  # fmt: skip
        for i, eid in enumerate(ids)
    }
    spec = rec.sketcher.specs["4"]
    windows = list(range(len(rec.checkpoint_seqs)))
    table = tracin_scores(
        lambda: rec.steps, rec.checkpoint_seqs, windows, rec.query_fn(xq, yq, ["4"]), [spec], 20
    )
    hits = [sum(table.example_ids[c] in poisoned_ids for c in row) for row in table.top]
    assert min(hits) >= 15, hits
    combined = tracin_scores(
        lambda: rec.steps, rec.checkpoint_seqs, windows, rec.query_fn(xq, yq, ["4"]), [spec], 20, combine=True
    )
    rows = rows_from_table(combined, rec.checkpoint_seqs, prov)
    assert len(rows) == 20 and [r.rank for r in rows] == list(range(1, 21))
    flagged = [r for r in rows if r.example_id in poisoned_ids]
    assert len(flagged) >= 15
    assert all(r.annotator == "ann-poison" and r.label_id == f"lab-{r.example_id}" for r in flagged)
    assert all(r.annotator != "ann-poison" for r in rows if r.example_id not in poisoned_ids)
    for r in rows:  # per-checkpoint contributions add up to the score
        assert abs(sum(r.checkpoints.values()) - r.score) <= 1e-9 * max(1.0, abs(r.score))


# ----------------------------------------------------------------------------- through the ledger, end to end
POISONER = "mallory@example.com"


def poison_model() -> nn.Module:
    """The model factory an influence query rebuilds the architecture with (weights come from the store)."""
    return mlp(128, 64, torch.float32)


@pytest.fixture(scope="module")
def poisoned_ledger(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    import json

    import instrument
    from instrument.sketch import StateStore
    from ledger import ingest
    from ledger.ingest.pseudonym import Pseudonymizer
    from ledger.provenance import Manifest
    from ledger.store import Ledger

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("influence")
    data = poisoned_digits()
    ids = [f"ex-{i:04d}" for i in range(len(data.y))]
    poisoned = {ids[i] for i in data.poison}
    path = tmp / "run.db"
    pseud = Pseudonymizer(bytes(range(32)))
    led = Ledger.open(path, create=True)
    rows = [
        {"item_id": eid, "label_id": f"lab-{eid}", "value": str(int(data.y[i])),
         "producer": POISONER if eid in poisoned else f"annotator{i % 5}@example.com", "consensus": 0.9}
        for i, eid in enumerate(ids)
    ]  # fmt: skip
    (tmp / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest.ingest("jsonl", tmp / "labels.jsonl", led, pseudonym_key=pseud)
    man = Manifest.create(led, "digits-train", {eid: f"lab-{eid}" for eid in ids})
    torch.manual_seed(0)
    model = poison_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    crit = nn.CrossEntropyLoss()
    sk = Sketcher(model, ["2", "4"], k=128, seed=5, methods={"4": "rank1"})
    store = StateStore(StateStore.beside(path))
    tr = instrument.attach(
        model, opt, ledger=led, run="poisoned", labels=man, criterion=crit, sketch=sk, states=store
    )
    x, y = torch.tensor(data.x), torch.tensor(data.y)
    for epoch in range(6):
        tr.epoch(epoch)
        perm = torch.randperm(len(y)).tolist()
        for lo in range(0, len(perm), 64):
            b = perm[lo : lo + 64]
            with tr.batch([ids[i] for i in b]):
                crit(model(x[b]), y[b]).backward()
            opt.step()
            opt.zero_grad()
        if epoch < 5:
            tr.checkpoint(f"epoch{epoch}")
    tr.close()  # also removes the sketcher's hooks
    with torch.no_grad():
        xq = torch.tensor(data.x_trig)
        xq = xq[model(xq).argmax(1) == data.target]
    torch.set_num_threads(n)
    yield SimpleNamespace(
        led=led, path=path, store=store, xq=xq.numpy(), yq=np.zeros(len(xq), dtype=np.int64),
        poisoned=poisoned, pseudonym=pseud.pseudonym(POISONER), tmp=tmp,
    )  # fmt: skip
    led.close()


def test_influence_api_names_the_poisoner_from_the_ledger(poisoned_ledger: SimpleNamespace) -> None:
    import audit
    import audit.influence as influence_module

    p = poisoned_ledger
    res = audit.influence(p.led, "poisoned", poison_model, p.xq, p.yq, layers="4", top=20, combine=True)
    assert influence_module is audit.influence  # the module is the callable API
    assert res.methods == {"4": "rank1"} and len(res.checkpoints) == 6 and res.uncovered_steps == 0
    assert res.sample_steps == 6 * 1300 and res.examples == 1300
    flagged = [r for r in res.rows if r.example_id in p.poisoned]
    assert len(flagged) >= 15, [r.example_id for r in res.rows]
    assert all(r.annotator == p.pseudonym and r.label_id == f"lab-{r.example_id}" for r in flagged)
    assert all(r.annotator != p.pseudonym and r.annotator is not None for r in res.rows if r not in flagged)
    assert all(r.consensus == 0.9 and r.label_seq is not None for r in res.rows)
    for r in res.rows:
        assert abs(sum(r.checkpoints.values()) - r.score) <= 1e-9 * max(1.0, abs(r.score))
    # per query, last checkpoint only, two layers (kron + rank1): still dominated by the poison
    per_q = audit.influence(p.led, "poisoned", poison_model, p.xq[:5], p.yq[:5], top=20, checkpoints="last")
    assert (
        per_q.layers == ["2", "4"] and len(per_q.checkpoints) == 1 and per_q.checkpoints[0]["tag"] == "final"
    )
    for q in range(5):
        rows = per_q.for_query(q)
        assert sum(r.example_id in p.poisoned for r in rows) >= 15
        assert all(abs(sum(r.layers.values()) - r.score) <= 1e-9 * max(1.0, abs(r.score)) for r in rows)
    assert res.to_json()["rows"][0]["annotator"] is not None


def test_state_files_are_verified_against_the_checkpoint_entry(poisoned_ledger: SimpleNamespace) -> None:
    import shutil

    from audit.influence import influence
    from instrument.sketch import StateError, StateStore
    from ledger.records import checkpoints

    p = poisoned_ledger
    last = checkpoints(p.led, "poisoned")[-1]
    bad = StateStore(p.tmp / "tampered.states")
    shutil.copytree(p.store.directory, bad.directory)
    state = torch.load(bad.path(last.state_dict_sha256), weights_only=True)
    state["4.bias"][0] += 1e-3
    torch.save(state, bad.path(last.state_dict_sha256))
    with pytest.raises(StateError, match="tensor '4.bias' sha256 .* does not match checkpoint entry"):
        influence(
            p.led, "poisoned", poison_model, p.xq[:2], p.yq[:2], layers="4", checkpoints="last", states=bad
        )
    bad.path(last.state_dict_sha256).unlink()
    with pytest.raises(StateError, match="no state file"):
        influence(
            p.led, "poisoned", poison_model, p.xq[:2], p.yq[:2], layers="4", checkpoints="last", states=bad
        )
    with pytest.raises(InfluenceError, match="no sketches for layer"):
        influence(p.led, "poisoned", poison_model, p.xq[:2], p.yq[:2], layers="0")
    with pytest.raises(InfluenceError, match="no run named 'nope'"):
        influence(p.led, "nope", poison_model, p.xq[:2], p.yq[:2])
    with pytest.raises(InfluenceError, match="no checkpoint with seq or tag 'epoch9'"):
        influence(p.led, "poisoned", poison_model, p.xq[:2], p.yq[:2], checkpoints=["epoch9"])


def test_cli_influence(
    poisoned_ledger: SimpleNamespace, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import shutil

    from click.testing import CliRunner

    from audit.cli import main
    from ledger.records import checkpoints

    p = poisoned_ledger
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qmodel.py").write_text(
        "from torch import nn\n\n\ndef make():\n"
        "    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))\n"
    )
    np.savez(tmp_path / "q.npz", x=p.xq[:6], y=p.yq[:6], model=np.array("qmodel:make"))
    runner = CliRunner()
    args = ["influence", str(p.path), "--run", "poisoned", "--layer", "4", "--input", "q.npz", "--top", "20"]
    out = runner.invoke(main, [*args, "--combine", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["combined"] and doc["queries"] == 6 and len(doc["rows"]) == 20
    assert sum(r["annotator"] == p.pseudonym for r in doc["rows"]) >= 15
    text = runner.invoke(main, [*args, "--checkpoints", "last", "--top", "3"])
    assert text.exit_code == 0, text.output
    assert "query 5 of q.npz: top proponents" in text.output and p.pseudonym in text.output
    assert "checkpoints final@" in text.output
    # a state file that does not match its signed checkpoint entry: verification failure, exit 1
    states = tmp_path / "states"
    shutil.copytree(p.store.directory, states)
    last = checkpoints(p.led, "poisoned")[-1]
    state = torch.load(states / f"{last.state_dict_sha256}.pt", weights_only=True)
    state["4.weight"].mul_(1.01)
    torch.save(state, states / f"{last.state_dict_sha256}.pt")
    bad = runner.invoke(main, [*args, "--checkpoints", "last", "--states", str(states)])
    assert bad.exit_code == 1 and "verification failed" in bad.output and "'4.weight'" in bad.output
    # bad input: exit 2 with a one-line reason
    np.savez(tmp_path / "nomodel.npz", x=p.xq[:2], y=p.yq[:2])
    r = runner.invoke(main, ["influence", str(p.path), "--run", "poisoned", "--input", "nomodel.npz"])
    assert r.exit_code == 2 and "nomodel.npz: missing array 'model'" in r.output
    np.savez(tmp_path / "badref.npz", x=p.xq[:2], y=p.yq[:2], model=np.array("qmodel:nothere"))
    r = runner.invoke(main, ["influence", str(p.path), "--run", "poisoned", "--input", "badref.npz"])
    assert r.exit_code == 2 and "field 'model' = 'qmodel:nothere': cannot import it" in r.output
    r = runner.invoke(main, [*args[:5], "0", "--input", "q.npz"])
    assert r.exit_code == 2 and "no sketches for layer(s) ['0']" in r.output
    r = runner.invoke(main, ["influence", str(tmp_path / "none.db"), "--run", "x", "--input", "q.npz"])
    assert r.exit_code == 2 and "error:" in r.output
