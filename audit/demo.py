"""The end-to-end gradledger demo: annotation export → ledger → governed training → audit → signed evidence.

``run_demo(out)`` runs every step into the directory ``out`` (embedded SQLite, no network) and returns a
summary. Each step is a small function so the examples (``examples/digits_governed.py``) and tests can reuse
them:

1. ``write_annotations``: a simulated Labelbox Export v2 NDJSON for scikit-learn's ``load_digits`` (``audit.demo_data``:
   careful annotators, one careless one, consensus rows, reviews that reject, gold rows; e-mail identities).
2. ``make_keys`` / ``init_ledger`` / ``ingest_export``: a signing key pair, the ledger, the pseudonymised ingest.
3. ``build_manifest``: one training example per label (a consensus row gives three), with content hashes.
4. ``write_policy``: low consensus → shallow layers only, rejected → excluded, gold → all layers.
5. ``train``: a small CNN with instrumentation (routed run, an unrouted baseline for comparison, a DP run);
   ``sign``: a signed checkpoint note after each run.
6. ``verify_ledger``: full deep verify against the last signed checkpoint and the public key.
7. ``who_shaped``: which annotators / labels shaped the last layer (``audit.query``), against the baseline.
8. ``memorisation``: memorisation / mislabel candidates with the loss and AUM baselines, scored against the
   simulation's ground truth; ``record_profile``: an entropy depth profile on held-out images (a ``profile``
   entry); ``write_report``: the self-contained HTML report.
9. ``write_lineage``: the run's lineage graph as GraphML.
10. ``write_export``: a signed provenance export with evidence.
11. ``auditor_verify``: the export verified with the bundle and the public key only.
12. ``tamper_check``: flip one bit in a copy of the database; verify names the entry. ``privacy_check``: no
    e-mail address from the export is in the ledger's bytes.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ledger import keys
from ledger.store import Ledger, VerifyResult

from .demo_data import CARELESS, Simulation, SimulationConfig, email, simulate, write_labelbox_export

Say = Callable[[str], None]

HEAD = "head"
SHALLOW = ("conv1", "conv2", "fc")

POLICY_YAML = """\
# The demo's routing policy (first matching rule wins). Layer names are the CNN's module names.
gradledger_policy: 1
name: digits-consensus-depth
groups:
  shallow: ["conv1", "conv2", "fc"]
  deep: ["head"]
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
default: {"*": 1.0}
"""


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and training settings. The defaults are what ``make demo`` runs; ``quick()`` is for tests."""

    seed: int = 0
    limit: int | None = None  # digits images used (None: all 1,797)
    epochs: int = 8
    dp_epochs: int = 3
    batch_size: int = 64
    lr: float = 0.1
    baseline: bool = True  # also train without the policy, to show what the policy changed
    dp: bool = True
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    top: int = 10

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(limit=360, epochs=3, dp_epochs=1, batch_size=32)


@dataclass
class Paths:
    out: Path
    export: Path = field(init=False)
    ledger: Path = field(init=False)
    keys: Path = field(init=False)
    pseudonym_key: Path = field(init=False)
    policy: Path = field(init=False)
    checkpoints: Path = field(init=False)

    def __post_init__(self) -> None:
        self.export = self.out / "labelbox-export.ndjson"
        self.ledger = self.out / "ledger.db"
        self.keys = self.out / "keys"
        self.pseudonym_key = self.keys / "pseudonym.key"
        self.policy = self.out / "policy.yaml"
        self.checkpoints = self.out / "checkpoints"


# ----- 1-4: data, keys, ledger, ingest, manifest, policy -----------------------------------------------------
def write_annotations(paths: Paths, config: DemoConfig) -> Simulation:
    sim = simulate(SimulationConfig(seed=config.seed, limit=config.limit))
    write_labelbox_export(sim, paths.export)
    return sim


def make_keys(paths: Paths) -> keys.KeyFiles:
    """The Ed25519 checkpoint-signing key pair and the pseudonym key (both outside the ledger)."""
    from ledger.ingest.pseudonym import create_key

    kf = keys.save_keypair(paths.keys, "gradledger-demo")
    create_key(paths.pseudonym_key)
    return kf


def init_ledger(paths: Paths) -> Ledger:
    if paths.ledger.exists():
        raise FileExistsError(f"{paths.ledger}: already exists; choose an empty --out directory")
    import audit.aggregates  # noqa: F401  (query aggregates are maintained in each step's transaction)

    return Ledger.create(paths.ledger)


def ingest_export(led: Ledger, paths: Paths) -> Any:
    from ledger import ingest

    return ingest.labelbox(paths.export, led, pseudonym_key=paths.pseudonym_key)


def build_manifest(led: Ledger, sim: Simulation) -> Any:
    """One training example per (non-skipped) label, pinned to its annotation entry, with the image hash."""
    from ledger.provenance import Manifest

    mapping = {
        ex: {"label_ids": [lab.label_id], "content_sha256": sim.content_sha256(lab.image)}
        for ex, lab in sim.examples.items()
    }
    # domain tag: the class the label assigns (the slice annotation leads think in)
    domains = {ex: f"digit-{lab.value}" for ex, lab in sim.examples.items()}
    return Manifest.create(led, "digits-labelbox", mapping, domains)


def write_policy(paths: Paths) -> Any:
    from instrument import Policy

    paths.policy.write_text(POLICY_YAML, encoding="utf-8")
    return Policy.load(paths.policy)


def assigned_class(value: Any) -> int:
    """The digit a Labelbox label value assigns (its ``digit`` radio answer)."""
    for c in value.get("classifications", []):
        if c.get("name") == "digit":
            return int(c["radio_answer"]["name"])
    raise ValueError("label has no 'digit' classification")


# ----- 5: training -----------------------------------------------------------------------------------------
def make_model(seed: int) -> nn.Sequential:
    """A small CNN for 8×8 digits; its layers (modules owning parameters): conv1, conv2, fc, head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 8, 3, padding=1),
            act1=nn.ReLU(),
            conv2=nn.Conv2d(8, 16, 3, padding=1),
            act2=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flat=nn.Flatten(),
            fc=nn.Linear(16 * 4 * 4, 64),
            act3=nn.ReLU(),
            head=nn.Linear(64, 10),
        )
    )


@dataclass
class Dataset:
    ids: list[str]
    x: torch.Tensor  # [N, 1, 8, 8]
    y: torch.Tensor  # [N] the label's assigned class
    x_test: torch.Tensor
    y_test: torch.Tensor  # scikit-learn's labels


def training_data(sim: Simulation, manifest: Any) -> Dataset:
    """Inputs from the images, targets from the *ingested* label values (what the ledger says was trained on)."""
    ids = sorted(manifest)
    imgs = [sim.examples[ex].image for ex in ids]
    y = [assigned_class(manifest[ex].value) for ex in ids]
    mu, sd = sim.images[sim.train_images].mean(), sim.images[sim.train_images].std()

    def tensor(idx: list[int]) -> torch.Tensor:
        return torch.from_numpy((sim.images[idx] - mu) / sd).float().unsqueeze(1)

    return Dataset(
        ids,
        tensor(imgs),
        torch.tensor(y),
        tensor(sim.test_images),
        torch.from_numpy(sim.targets[sim.test_images]),
    )


@dataclass
class RunOutcome:
    run: str
    steps: int
    final_checkpoint_seq: int
    test_accuracy: float
    seconds: float
    eps: float | None = None
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "model"}


def train(
    led: Ledger,
    data: Dataset,
    manifest: Any,
    config: DemoConfig,
    run: str,
    *,
    policy: Any = None,
    dp: bool = False,
    epochs: int | None = None,
) -> RunOutcome:
    """Train the CNN with the tracker attached: one ``step`` entry per optimizer step, a checkpoint per epoch."""
    import instrument

    t0 = time.perf_counter()
    model = make_model(config.seed)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    crit = nn.CrossEntropyLoss()
    dpc = (
        instrument.DPConfig(config.noise_multiplier, config.max_grad_norm, config.delta, accountant="rdp")
        if dp
        else None
    )
    tracker = instrument.attach(
        model,
        opt,
        ledger=led,
        run=run,
        policy=policy,
        labels=manifest,
        criterion=crit,
        dp=dpc,
        seed=config.seed,
    )
    gen = torch.Generator().manual_seed(config.seed)
    n = len(data.ids)
    for epoch in range(epochs if epochs is not None else config.epochs):
        tracker.epoch(epoch)
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, config.batch_size):
            idx = perm[start : start + config.batch_size]
            with tracker.batch([data.ids[i] for i in idx]):
                loss = crit(model(data.x[idx]), data.y[idx])
                loss.backward()
                opt.step()
                opt.zero_grad()
        if epoch < (epochs or config.epochs) - 1:
            tracker.checkpoint(f"epoch-{epoch}")
    last = tracker.close()
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    eps = None
    if dp:
        eps = led.entry(last).body["dp"]["eps"]
    steps = tracker.step_index
    return RunOutcome(run, steps, last, acc, time.perf_counter() - t0, eps, model)


def sign(led: Ledger, kf: keys.KeyFiles, paths: Paths, name: str) -> Path:
    """Sign (origin, size, root) and keep the note outside the database."""
    paths.checkpoints.mkdir(exist_ok=True)
    text = led.sign_checkpoint(keys.load_private_key(kf.private), kf.verifier_key.name)
    path = paths.checkpoints / f"{name}.txt"
    path.write_text(text, encoding="utf-8")
    return path


# ----- 6-9: audit --------------------------------------------------------------------------------------------
def verify_ledger(led: Ledger, checkpoint: Path, kf: keys.KeyFiles) -> VerifyResult:
    """Full verify: every byte re-hashed, the tree, every stored note, the signed checkpoint, the aggregates."""
    return led.verify(
        checkpoint=checkpoint.read_text(encoding="utf-8"), pubkey=keys.load_verifier(kf.public), deep=True
    )


def pseudonym_of(paths: Paths, identity: str) -> str:
    """The pseudonym ingest gave ``identity`` (the demo holds the key; an auditor does not)."""
    from ledger.ingest.pseudonym import Pseudonymizer

    return Pseudonymizer.from_file(paths.pseudonym_key).pseudonym(identity)


@dataclass
class Shaping:
    """How much one annotator's labels shaped each layer of a run (shares of the ``update`` metric)."""

    run: str
    annotator: str
    shares: dict[str, float]  # layer -> share of the layer's total update
    weights: dict[str, float | None]  # layer -> mean routing weight their labels received
    examples: int
    top_annotators: list[dict[str, Any]]  # the head layer by annotator
    top_labels: list[dict[str, Any]]  # the head layer by label


def who_shaped(led: Ledger, run: str, annotator: str, top: int) -> Shaping:
    """Which annotators and labels shaped the last layer of ``run``; ``annotator``'s share of every layer."""
    from audit import query

    res = query.annotator(led, annotator, run=run).runs[0]
    by_ann = query.layer(led, run, HEAD, by="annotator", top=top)
    by_label = query.layer(led, run, HEAD, by="label", top=top)

    def short(row: Any) -> dict[str, Any]:
        keep = ("rank", "key", "score", "share", "weight", "annotator", "consensus", "review", "example_id")
        return {k: getattr(row, k) for k in keep}

    return Shaping(
        run,
        annotator,
        {r["layer"]: r["update_share"] for r in res["layers"]},
        {r["layer"]: r["weight"] for r in res["layers"]},
        res["examples"],
        [short(r) for r in by_ann.rows],
        [short(r) for r in by_label.rows],
    )


def barred_from_head(manifest: Any, policy: Any, layers: list[str], ids: list[str]) -> list[str]:
    """Examples whose routing weight for the head is 0 under ``policy`` (recomputed from the provenance)."""
    bound = policy.bind(layers)
    weights, _ = bound.route([manifest[ex] for ex in ids])
    j = layers.index(HEAD)
    return [ex for ex, w in zip(ids, weights[:, j], strict=True) if w == 0.0]


def memorisation(led: Ledger, run: str, wrong: set[str], top: int) -> dict[str, Any]:
    """Rank memorisation candidates (self-influence) with the loss / AUM baselines; score vs the truth."""
    from audit.memorization import rank_memorization

    res = rank_memorization(led.steps(run))
    scores = res.evaluate(wrong & set(res.example_ids))
    return {
        "evaluation": scores,
        "top": [r.to_dict() for r in res.top(top)],
        "wrong_in_top": sum(r.example_id in wrong for r in res.top(top)),
        "summary": res.summary,
    }


def tamper_check(paths: Paths, seq: int) -> tuple[Path, VerifyResult]:
    """Copy the database, flip one bit of one payload byte of entry ``seq``, verify the copy."""
    copy = paths.out / "ledger-tampered.db"
    shutil.copyfile(paths.ledger, copy)
    con = sqlite3.connect(copy)
    try:
        (data,) = con.execute(
            "SELECT data FROM payloads WHERE seq = ? AND name = 'grad_norms'", (seq,)
        ).fetchone()
        b = bytearray(data)
        b[17] ^= 0x01
        con.execute("UPDATE payloads SET data = ? WHERE seq = ? AND name = 'grad_norms'", (bytes(b), seq))
        con.commit()
    finally:
        con.close()
    with Ledger.open(copy) as bad:
        return copy, bad.verify()


def privacy_check(paths: Paths, identities: list[str]) -> list[str]:
    """E-mail addresses from the export found in the ledger's bytes (database + WAL); should be empty."""
    blobs = b"".join(p.read_bytes() for p in paths.out.glob("ledger.db*") if p.is_file())
    return [who for who in identities if who.encode() in blobs or who.upper().encode() in blobs]


def demo_model() -> nn.Sequential:
    """The demo CNN's architecture (a zero-argument factory, as ``gradledger profile --model`` expects)."""
    return make_model(0)


def record_profile(led: Ledger, sim: Simulation, data: Dataset, paths: Paths, run: RunOutcome) -> Any:
    """Entropy depth profile of the run's final model on the held-out test images (domain = true class),
    from a data file anyone can re-run with ``gradledger profile``; appended as a ``profile`` entry."""
    from audit.profiles import ProbeSettings
    from audit.profiles_ledger import compute_profile, load_data
    from audit.profiles_ledger import record_profile as append_profile
    from ledger.records import checkpoints

    path = paths.out / "profile-data.npz"
    y = data.y_test.numpy()
    np.savez(
        path,
        x=data.x_test.numpy(),
        y=y,
        domain=np.array([f"digit-{c}" for c in y]),
        ids=np.array([f"test-{i:04d}" for i in sim.test_images]),
        model=np.array("audit.demo:demo_model"),
    )
    pdata = load_data(path)
    assert run.model is not None
    result = compute_profile(run.model, pdata, list(SHALLOW) + [HEAD], ProbeSettings(folds=3, n_boot=200))
    cp = checkpoints(led, run.run)[-1]
    seq = append_profile(led, result, pdata, run.run, "audit.demo:demo_model", cp)
    return seq, result


def write_report(led: Ledger, kf: keys.KeyFiles, paths: Paths, run: str, top: int) -> tuple[Path, Any]:
    """The self-contained HTML report an auditor or annotation lead reads (``gradledger report``)."""
    from audit import report as rp

    rep = rp.build_report(led, run, pubkey=keys.load_verifier(kf.public), top=top)
    path = paths.out / "report.html"
    path.write_text(rp.render_html(rep), encoding="utf-8")
    return path, rep


def write_lineage(led: Ledger, paths: Paths, run: str) -> tuple[Path, int, int]:
    """The run's lineage graph (annotator → label → example → run → layer → checkpoint) as GraphML."""
    from audit import lineage

    g = lineage.graph(led, run=run)
    path = paths.out / "lineage.graphml"
    lineage.write(g, path, "graphml")
    return path, g.number_of_nodes(), g.number_of_edges()


def write_export(led: Ledger, kf: keys.KeyFiles, paths: Paths, run: str, top: int) -> Path:
    """A signed provenance export (DSSE over an in-toto Statement) with the run's entries and their proofs."""
    from audit.export import build_export

    bundle = build_export(
        led, run, keys.load_private_key(kf.private), kf.verifier_key.name, evidence=True, top=top
    )
    path = paths.out / "bundle.json"
    path.write_text(json.dumps(bundle) + "\n", encoding="utf-8")
    return path


def auditor_verify(bundle: Path, public_key: Path) -> Any:
    """What an auditor runs: the bundle file and the public key, nothing else (``gradledger verify-export``).

    Raises ``ledger.note.VerificationError`` (exit 1) or ``audit.export.BundleError`` (exit 2) on failure.
    """
    from audit.export import verify_bundle

    return verify_bundle(bundle.read_bytes(), keys.load_verifier(public_key))


# ----- the walk-through --------------------------------------------------------------------------------------
def _fmt_share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"


def run_demo(out: Path, say: Say = print, config: DemoConfig | None = None) -> dict[str, Any]:
    """Run every step into ``out``; returns the summary (paths, figures, verification outcomes)."""

    config = config or DemoConfig()
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    # one thread (torch and BLAS): these tensors are tiny, and on a shared 2-core machine extra threads only
    # contend (7x slower training, 10x slower probes)
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency: BLAS threads for the probes

    try:
        with threadpool_limits(limits=1):
            return _run(out, say, config, t_start)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, say: Say, config: DemoConfig, t_start: float) -> dict[str, Any]:
    from .demo_data import identities

    out.mkdir(parents=True, exist_ok=True)
    paths = Paths(out)
    if paths.ledger.exists() or paths.keys.exists():
        raise FileExistsError(
            f"{out}: already holds a demo (ledger.db / keys); choose an empty --out directory"
        )

    sim = write_annotations(paths, config)
    careless = email(CARELESS)
    say(
        f"1. wrote a Labelbox Export v2 NDJSON of {len(sim.labels)} labels on {len(sim.train_images)} digits "
        f"images ({len(sim.wrong_examples())} wrong, {len(sim.wrong_examples(careless))} of them by the careless "
        f"annotator): {paths.export}"
    )
    kf = make_keys(paths)
    say(f"2. keys: signing {kf.private} (public {kf.public}); pseudonym key {paths.pseudonym_key}")
    led = init_ledger(paths)
    try:
        summ = ingest_export(led, paths)
        say(
            f"3. ingested into {paths.ledger}: {summ.records} label records, {summ.items} items, "
            f"{summ.annotators} annotators (pseudonymised), {summ.skipped} skipped"
        )
        manifest = build_manifest(led, sim)
        policy = write_policy(paths)
        say(
            f"4. manifest '{manifest.name}' (seq {manifest.seq}, {len(manifest)} examples); policy {paths.policy} "
            f"({policy.digest[:19]}...)"
        )
        data = training_data(sim, manifest)
        runs: dict[str, RunOutcome] = {}
        notes: dict[str, Path] = {}
        runs["governed"] = train(led, data, manifest, config, "digits-cnn", policy=policy)
        notes["digits-cnn"] = sign(led, kf, paths, "digits-cnn")
        say(_run_line("5. trained", runs["governed"], notes["digits-cnn"]))
        if config.baseline:
            runs["baseline"] = train(led, data, manifest, config, "digits-cnn-unrouted")
            notes["digits-cnn-unrouted"] = sign(led, kf, paths, "digits-cnn-unrouted")
            say(_run_line("   baseline without the policy", runs["baseline"], notes["digits-cnn-unrouted"]))
        if config.dp:
            runs["dp"] = train(
                led, data, manifest, config, "digits-cnn-dp", policy=policy, dp=True, epochs=config.dp_epochs
            )
            notes["digits-cnn-dp"] = sign(led, kf, paths, "digits-cnn-dp")
            say(_run_line("   DP-SGD", runs["dp"], notes["digits-cnn-dp"]))
        prof_seq, prof = record_profile(led, sim, data, paths, runs["governed"])
        late = {d: prof.entropy[d][HEAD].mean for d in prof.domains}
        worst = sorted(late, key=lambda d: -late[d])[:3]
        say(
            f"   depth profile of digits-cnn on {len(sim.test_images)} held-out images (profile entry seq {prof_seq}): "
            "most uncertain at the head: " + ", ".join(f"{d} {late[d]:.2f}" for d in worst)
        )
        # a final note covering every entry (the profile included): the one the summary and the auditor cite
        notes["final"] = sign(led, kf, paths, "final")
        last_note = notes["final"]

        ok = verify_ledger(led, last_note, kf)
        say(
            f"6. verify --deep against {last_note.name} with {kf.public.name}: "
            f"{'intact' if ok.ok else 'FAILED: ' + str(ok.reason)} ({ok.size} entries, {ok.bytes_hashed:,} bytes "
            "re-hashed, aggregates rebuilt and compared)"
        )

        pseud = pseudonym_of(paths, careless)
        layers = list(_run_layers(led, "digits-cnn"))
        their = [ex for ex, lab in sim.examples.items() if lab.annotator == careless]
        barred = barred_from_head(manifest, policy, layers, their)
        shaping = who_shaped(led, "digits-cnn", pseud, config.top)
        say(f"7. which annotators shaped the last layer ('{HEAD}') of digits-cnn (update metric):")
        for r in shaping.top_annotators:
            flag = "  <- the careless annotator" if r["key"] == pseud else ""
            say(f"     {r['key']:40s} share {_fmt_share(r['share'])}  mean weight {r['weight']:.2f}{flag}")
        say(
            f"   careless annotator {pseud}: {shaping.examples} labels, {len(barred)} of them barred from "
            f"'{HEAD}' by the policy (low consensus or rejected); share per layer: "
            + ", ".join(f"{k} {_fmt_share(v)}" for k, v in shaping.shares.items())
        )
        say("   top labels for the head: " + "; ".join(
            f"{r['key']} by {str(r['annotator'])[:13]}... (share {_fmt_share(r['share']).strip()}, consensus "
            f"{'-' if r['consensus'] is None else format(r['consensus'], '.2f')}, review {r['review'] or '-'})"
            for r in shaping.top_labels[:3]
        ))  # fmt: skip
        base_shaping = None
        if config.baseline:
            base_shaping = who_shaped(led, "digits-cnn-unrouted", pseud, config.top)
            say(
                f"   without the policy their '{HEAD}' share would be {_fmt_share(base_shaping.shares[HEAD])} "
                f"(governed: {_fmt_share(shaping.shares[HEAD])})"
            )

        wrong = sim.wrong_examples()
        mem = memorisation(led, "digits-cnn", wrong, config.top)
        ev = mem["evaluation"]
        best = max(ev, key=lambda k: ev[k]["auroc"])
        say(
            f"8. memorisation candidates (digits-cnn): AUROC for finding the {len(wrong)} wrong labels: "
            + ", ".join(f"{k} {v['auroc']:.3f}" for k, v in ev.items())
            + f" (best: {best}); {mem['wrong_in_top']} of the top {config.top} by self-influence are wrong labels"
        )
        report_path, rep = write_report(led, kf, paths, "digits-cnn", config.top)
        say(
            f"   HTML report: {report_path} (ledger {'intact' if rep.chain_ok else 'FAILED'}; sections "
            + ", ".join(f"{x.id} {x.status}" for x in rep.sections)
            + ")"
        )
        graph_path, n_nodes, n_edges = write_lineage(led, paths, "digits-cnn")
        say(f"9. lineage graph of digits-cnn: {n_nodes} nodes, {n_edges} edges -> {graph_path} (GraphML)")
        bundle_path = write_export(led, kf, paths, "digits-cnn", config.top)
        say(
            f"10. signed provenance export of digits-cnn (DSSE, in-toto Statement, entries with inclusion "
            f"proofs): {bundle_path} ({bundle_path.stat().st_size:,} bytes)"
        )
        led_size = led.size
        first_step = next(led.entries(kind="step", payloads=False)).seq
    finally:
        led.close()

    report = auditor_verify(bundle_path, kf.public)
    say(
        f"11. as an auditor, with {bundle_path.name} and {kf.public.name} only: "
        + ", ".join(f"{c.name} {c.status}" for c in report.checks)
    )
    # the file must be closed (WAL checkpointed) before it is copied or grepped
    bad_path, bad = tamper_check(paths, first_step)
    say(
        f"12. flipped one bit of entry {first_step}'s grad_norms in a copy ({bad_path.name}): verify says "
        f"{'intact' if bad.ok else f'FAILED at seq {bad.first_bad_seq}: {bad.reason}'}"
    )
    leaked = privacy_check(paths, identities())
    say(f"   e-mail addresses from the export found in the ledger's bytes: {len(leaked)}")

    summary: dict[str, Any] = {
        "out": str(out),
        "export": str(paths.export),
        "ledger": str(paths.ledger),
        "private_key": str(kf.private),
        "public_key": str(kf.public),
        "verifier_key": str(kf.verifier),
        "pseudonym_key": str(paths.pseudonym_key),
        "policy": str(paths.policy),
        "checkpoint": str(last_note),
        "checkpoints": {k: str(v) for k, v in notes.items()},
        "entries": led_size,
        "root": ok.root.hex() if ok.root else None,
        "verify_ok": ok.ok,
        "verify_reason": ok.reason,
        "runs": {k: v.to_json() for k, v in runs.items()},
        "careless_annotator": pseud,
        "careless_labels": len(their),
        "careless_barred_from_head": len(barred),
        "shaping": asdict(shaping),
        "shaping_unrouted": asdict(base_shaping) if base_shaping else None,
        "memorisation": mem,
        "profile_seq": prof_seq,
        "profile_data": str(paths.out / "profile-data.npz"),
        "report": str(report_path),
        "report_chain_ok": rep.chain_ok,
        "report_sections": {x.id: x.status for x in rep.sections},
        "lineage": str(graph_path),
        "lineage_nodes": n_nodes,
        "lineage_edges": n_edges,
        "bundle": str(bundle_path),
        "bundle_checks": [asdict(c) for c in report.checks],
        "bundle_verify_ok": all(c.status == "ok" for c in report.checks),
        "tampered_copy": str(bad_path),
        "tampered_seq": first_step,
        "tampered_verify_ok": bad.ok,
        "tampered_first_bad_seq": bad.first_bad_seq,
        "tampered_reason": bad.reason,
        "emails_in_ledger": leaked,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    summary_path = out / "summary.json"
    summary["summary"] = str(summary_path)
    summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    say(f"done in {summary['seconds']} s. Files:")
    files = ("export", "ledger", "policy", "public_key", "checkpoint", "report", "lineage", "bundle")
    for name in (*files, "profile_data", "tampered_copy", "summary"):
        say(f"   {name:14s} {summary[name]}")
    return summary


def _run_layers(led: Ledger, run: str) -> list[str]:
    from ledger.records import run_record

    return list(run_record(led, run).layers)


def _run_line(prefix: str, r: RunOutcome, note: Path) -> str:
    eps = f", ε = {r.eps:.2f}" if r.eps is not None else ""
    return (
        f"{prefix} run '{r.run}': {r.steps} steps in {r.seconds:.1f} s, test accuracy {100 * r.test_accuracy:.1f}%"
        f"{eps}; signed {note}"
    )
