"""``audit.lineage`` and ``gradledger lineage`` on a small real run (tests/lineage_support.py).

Contribution weights are checked against the brute-force oracle of tests/query_support.py (one sample-step at
a time in Python floats, sharing no code with audit.contributions); links against the ledger entries.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
from click.testing import CliRunner

from audit import lineage
from audit.cli import main
from ledger.store import Ledger
from tests.ingest_support import EMAIL
from tests.lineage_support import LAYERS, N_EX, Built, build
from tests.query_support import brute_force


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(tmp_path_factory.mktemp("lineage"))


@pytest.fixture(scope="module")
def g(built: Built) -> nx.DiGraph:
    with Ledger.open(built.path) as led:
        return lineage.graph(led, run="mlp", top=N_EX)


@pytest.fixture(scope="module")
def oracle(built: Built) -> Any:
    with Ledger.open(built.path) as led:
        return brute_force(list(led.steps("mlp")), "mean")


def _kind(g: nx.DiGraph, kind: str) -> list[str]:
    return sorted(n for n, d in g.nodes(data=True) if d["kind"] == kind)


def _edges(g: nx.DiGraph, kind: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [(a, b, d) for a, b, d in g.edges(data=True) if d["kind"] == kind]


def test_nodes_and_links_match_the_ledger(built: Built, g: nx.DiGraph) -> None:
    assert len(_kind(g, "example")) == N_EX
    assert _kind(g, "layer") == [f"layer:mlp/{n}" for n in LAYERS]
    assert _kind(g, "checkpoint") == [f"checkpoint:{s}" for s in sorted(built.checkpoints)]
    assert len(_kind(g, "annotator")) == 3 and all(
        n.startswith("annotator:anon:") for n in _kind(g, "annotator")
    )
    assert len(_kind(g, "suggestion")) == 2
    # every node and edge names the entry that proves it
    for n, d in g.nodes(data=True):
        assert isinstance(d.get("seq"), int), n
    for a, b, d in g.edges(data=True):
        assert isinstance(d.get("seq"), int) or isinstance(d.get("first_seq"), int), (a, b, d)
    with Ledger.open(built.path) as led:
        man = led.entry(built.manifest_seq).body["examples"]
        for ex, rec in man.items():
            labels = sorted(
                a for a, _, d in g.in_edges(f"example:{ex}", data=True) if d["kind"] == "label_of"
            )
            want = sorted(f"label:jsonl:{lab['label_id']}" for lab in rec["labels"])
            assert labels == want
            for lab in rec["labels"]:
                node = g.nodes[f"label:jsonl:{lab['label_id']}"]
                assert node["seq"] == lab["seq"] and led.entry(lab["seq"]).kind == "annotation"
                ann = [a for a, _ in g.in_edges(f"label:jsonl:{lab['label_id']}")]
                body = led.entry(lab["seq"]).body
                assert f"annotator:{body['producer']['id']}" in ann
                assert any(a.startswith("export:") for a in ann)
        assert len(man["ex5"]["labels"]) == 2  # the consensus item has both annotators' labels
        for cp in built.checkpoints:
            body = led.entry(cp).body
            for name in LAYERS:
                assert (
                    g.edges[f"layer:mlp/{name}", f"checkpoint:{cp}"]["sha256"]
                    == body["layers"][name]["sha256"]
                )
        pol = [a for a, _, d in g.in_edges("run:mlp", data=True) if d["kind"] == "routed"]
        assert pol and led.entry(g.nodes[pol[0]]["seq"]).kind == "policy"
        for s in built.suggestions:
            sugg = led.entry(s).body
            assert g.has_edge(
                f"checkpoint:{built.checkpoints[-1]}", f"suggestion:gradledger:{sugg['suggestion_id']}"
            )
    # suggestion -> corrected label (seeded_from), with the correcting annotator
    assert g.edges["suggestion:gradledger:s-1", "label:jsonl:fix-1"]["kind"] == "seeded"
    assert any(a.startswith("annotator:") for a, _ in g.in_edges("label:jsonl:fix-1"))


def test_contribution_weights_equal_the_brute_force_oracle(g: nx.DiGraph, oracle: Any) -> None:
    for a, b, d in _edges(g, "contribution"):
        ex, j = a.removeprefix("example:"), LAYERS.index(b.rsplit("/", 1)[1])
        assert d["weight"] == pytest.approx(oracle.update[ex][j], rel=1e-12, abs=1e-15)
        assert d["self_influence"] == pytest.approx(oracle.self_influence[ex][j], rel=1e-12)
        assert d["steps"] == oracle.count[ex]
    assert len(_edges(g, "contribution")) == N_EX * len(LAYERS)
    for _, b, d in _edges(g, "trains"):
        j = LAYERS.index(b.rsplit("/", 1)[1])
        assert d["weight"] == pytest.approx(sum(v[j] for v in oracle.update.values()), rel=1e-12)
        assert sum(json.loads(d["by_epoch"])) == pytest.approx(d["weight"], rel=1e-12)
        for ep, tot in zip(json.loads(d["epochs"]), json.loads(d["by_epoch"]), strict=True):
            want = sum(u[j] for (ex, e), (u, _) in oracle.by_epoch.items() if e == ep)
            assert tot == pytest.approx(want, rel=1e-12)
    for a, _, d in _edges(g, "trained_on"):
        assert d["weight"] == pytest.approx(sum(oracle.update[a.removeprefix("example:")]), rel=1e-12)
    # the policy's "excluded" rule (review: reject) zeroes lab-3's example in every layer
    for name in LAYERS:
        assert g.edges["example:ex3", f"layer:mlp/{name}"]["weight"] == 0.0
        assert oracle.update["ex3"][LAYERS.index(name)] == 0.0


def test_top_k_contribution_edges_and_truncation(built: Built, oracle: Any) -> None:
    with Ledger.open(built.path) as led:
        small = lineage.graph(led, run="mlp", top=3)
        cut = lineage.graph(led, run="mlp", top=2, max_examples=4)
    for name in LAYERS:
        j = LAYERS.index(name)
        got = [
            a.removeprefix("example:")
            for a, _ in small.in_edges(f"layer:mlp/{name}")
            if a.startswith("example:")
        ]
        want = sorted(oracle.update, key=lambda ex: -oracle.update[ex][j])[:3]
        assert sorted(got) == sorted(want)
    assert not small.graph["examples_truncated"] and cut.graph["examples_truncated"]
    kept = {n.removeprefix("example:") for n in _kind(cut, "example")}
    top2 = {
        ex for j in range(len(LAYERS)) for ex in sorted(oracle.update, key=lambda e: -oracle.update[e][j])[:2]
    }
    assert kept == top2
    assert cut.nodes["run:mlp"]["examples"] == N_EX  # run totals stay exact


def test_focus_subgraphs(g: nx.DiGraph) -> None:
    lab = lineage.focus(g, lineage.resolve_focus(g, label="lab-7"))
    assert "label:jsonl:lab-7" in lab and "example:ex7" in lab and "run:mlp" in lab
    assert any(n.startswith("annotator:") for n in lab) and any(n.startswith("export:") for n in lab)
    assert set(_kind(lab, "layer")) == set(_kind(g, "layer")) and _kind(lab, "checkpoint")
    assert "example:ex8" not in lab and "label:jsonl:lab-8" not in lab  # not every example of the run
    ann = g.nodes["label:jsonl:lab-7"]
    pseud = next(a for a, _ in g.in_edges("label:jsonl:lab-7") if a.startswith("annotator:"))
    by_ann = lineage.focus(g, lineage.resolve_focus(g, annotator=pseud.removeprefix("annotator:")))
    assert "label:jsonl:lab-7" in by_ann and "label:jsonl:lab-8" not in by_ann and ann["kind"] == "label"
    cp = max(_kind(g, "checkpoint"), key=lambda n: g.nodes[n]["seq"])
    by_cp = lineage.focus(g, lineage.resolve_focus(g, checkpoint=g.nodes[cp]["seq"]))
    assert "label:jsonl:fix-1" in by_cp and "suggestion:gradledger:s-2" in by_cp and "run:mlp" in by_cp
    layer = lineage.focus(g, lineage.resolve_focus(g, layer="4"), radius=1)
    assert {d["kind"] for _, d in layer.nodes(data=True)} <= {"layer", "run", "example", "checkpoint"}
    with pytest.raises(lineage.LineageError, match="not in the lineage graph"):
        lineage.resolve_focus(g, label="nope")


def test_files_parse_back(g: nx.DiGraph, tmp_path: Path) -> None:
    for fmt in lineage.FORMATS:
        lineage.write(g, tmp_path / f"g.{fmt}", fmt)
    gm = nx.read_graphml(tmp_path / "g.graphml")
    assert gm.number_of_nodes() == g.number_of_nodes() and gm.number_of_edges() == g.number_of_edges()
    e = ("example:ex0", "layer:mlp/4")
    assert (
        gm.edges[e]["weight"] == g.edges[e]["weight"]
        and gm.nodes["run:mlp"]["seq"] == g.nodes["run:mlp"]["seq"]
    )
    js = nx.node_link_graph(json.loads((tmp_path / "g.json").read_text()), edges="edges")
    assert nx.utils.graphs_equal(js, g)
    dot = (tmp_path / "g.dot").read_text()
    assert dot.startswith("digraph lineage {") and dot.rstrip().endswith("}")
    assert len(re.findall(r"^  \".*\" -> \".*\" \[", dot, re.M)) == g.number_of_edges()
    assert len(re.findall(r"^  \"[^\"]*\" \[", dot, re.M)) == g.number_of_nodes()
    try:
        import pydot  # optional: a real DOT parser when installed
    except ImportError:
        pass
    else:
        (parsed,) = pydot.graph_from_dot_data(dot)
        assert len(parsed.get_edges()) == g.number_of_edges()
    for p in tmp_path.iterdir():
        assert not EMAIL.findall(p.read_bytes()), p


def test_dot_quoting() -> None:
    h = nx.DiGraph()
    h.add_node('label:x:"quoted" \\ back\nline', kind="label", seq=1)
    h.add_edge('label:x:"quoted" \\ back\nline', "example:e", kind="label_of", seq=2)
    dot = lineage.to_dot(h)
    assert '"label:x:\\"quoted\\" \\\\ back\\nline"' in dot
    assert dot.count("\n") == len(dot.splitlines())  # no raw newline inside an ID


def test_cli(built: Built, tmp_path: Path) -> None:
    r = CliRunner()
    for fmt, focus in (("graphml", []), ("dot", ["--layer", "2"]), ("json", ["--annotator", _ann(built)])):
        out = tmp_path / f"x.{fmt}"
        res = r.invoke(
            main,
            ["lineage", str(built.path), "--run", "mlp", *focus, "--format", fmt, "-o", str(out), "--json"],
        )
        assert res.exit_code == 0, res.output
        summary = json.loads(res.output)
        assert summary["nodes"] > 0 and out.exists()
    res = r.invoke(
        main,
        [
            "lineage",
            str(built.path),
            "--label",
            "lab-1",
            "--format",
            "graphml",
            "-o",
            str(tmp_path / "l.graphml"),
        ],
    )
    assert res.exit_code == 0 and nx.read_graphml(tmp_path / "l.graphml").has_node("label:jsonl:lab-1")
    for args, msg in (
        (["--run", "nope"], "no run named 'nope'"),
        (["--label", "nope"], "label 'nope' is not in the lineage graph"),
        (["--label", "lab-1", "--layer", "0"], "at most one of"),
        (["--checkpoint", "1"], "checkpoint seq 1 is not in"),
    ):
        out = tmp_path / "bad.graphml"
        res = r.invoke(main, ["lineage", str(built.path), *args, "-o", str(out)])
        assert res.exit_code == 2 and msg in res.output, res.output
        assert not out.exists()
    res = r.invoke(main, ["lineage", str(tmp_path / "missing.db"), "-o", str(tmp_path / "m.graphml")])
    assert res.exit_code == 2 and not (tmp_path / "missing.db").exists()


def _ann(built: Built) -> str:
    with Ledger.open(built.path) as led:
        return next(
            e.body["producer"]["id"]
            for e in led.entries(kind="annotation")
            if e.body["producer"]["kind"] == "human"
        )


def test_lineage_bench_quick(tmp_path: Path) -> None:
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "lineage_bench.py"
    res = subprocess.run(
        [sys.executable, str(bench), "--quick", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["lineage"]["nodes"] > out["config"]["examples"] and out["export"]["evidence_entries"] > 0
    assert out["export"]["bundle_bytes_evidence"] > out["export"]["bundle_bytes_no_evidence"]
