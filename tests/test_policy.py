"""Routing policy: parsing, validation errors, first-match semantics, layer binding and hashing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rfc8785

from instrument.policy import DEFAULT_RULE, Policy, PolicyError, Rule
from ledger.provenance import LabelProvenance

LAYERS = ["embed", "enc.0", "enc.1", "head"]

DEMO_YAML = """\
gradledger_policy: 1
name: consensus-depth
groups:
  shallow: ["embed", "enc.*"]
  deep: [head]
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


def prov(**kw: Any) -> LabelProvenance:
    base: dict[str, Any] = dict(
        example_id="ex",
        label_id=None,
        label_seq=None,
        annotator=None,
        producer=None,
        source=None,
        consensus=None,
        consensus_method=None,
        review=None,
        gold=False,
        domain=None,
        rights=None,
        value=None,
    )
    base.update(kw)
    return LabelProvenance(**base)


def demo_python() -> Policy:
    return Policy(
        name="consensus-depth",
        groups={"shallow": ["embed", "enc.*"], "deep": ["head"]},
        rules=[
            Rule("excluded", {"*": 0}, {"any": [{"review": {"eq": "reject"}}, {"rights": "withdrawn"}]}),
            Rule("gold", {"*": 1}, {"gold": True}),
            Rule("low-consensus", {"shallow": 1, "deep": 0.0}, {"consensus": {"lt": 0.7}}),
        ],
        default={"*": 1},
    )


def test_demo_policy_routes_as_described() -> None:
    bound = Policy.from_yaml(DEMO_YAML, "demo.yaml").bind(LAYERS)
    cases = [
        (prov(consensus=0.5), 2, [1, 1, 1, 0]),  # low consensus: shallow only
        (prov(consensus=0.9), DEFAULT_RULE, [1, 1, 1, 1]),
        (prov(consensus=None), DEFAULT_RULE, [1, 1, 1, 1]),  # missing score never matches `lt`
        (prov(review="reject", gold=True), 0, [0, 0, 0, 0]),  # first match wins over gold
        (prov(rights="withdrawn", consensus=0.95), 0, [0, 0, 0, 0]),
        (prov(gold=True, consensus=0.1), 1, [1, 1, 1, 1]),  # gold before low-consensus
        (prov(review="approve", consensus=0.69999), 2, [1, 1, 1, 0]),
        (prov(consensus=0.7), DEFAULT_RULE, [1, 1, 1, 1]),  # boundary: lt is strict
    ]
    weights, rules = bound.route([c[0] for c in cases])
    assert weights.dtype == np.float32 and weights.shape == (len(cases), len(LAYERS))
    assert rules.dtype == np.int32
    np.testing.assert_array_equal(rules, [c[1] for c in cases])
    np.testing.assert_array_equal(weights, np.array([c[2] for c in cases], dtype=np.float32))


def test_yaml_json_and_python_forms_hash_identically(tmp_path: Path) -> None:
    from_yaml = Policy.from_yaml(DEMO_YAML, "demo.yaml")
    jpath = tmp_path / "p.json"
    jpath.write_text(json.dumps(from_yaml.to_raw()))
    from_json = Policy.load(jpath)
    py = demo_python()
    assert from_yaml.digest == from_json.digest == py.digest
    assert from_yaml == py
    # independent recomputation of the digest: RFC 8785 over the normalised dict
    assert py.digest == "sha256:" + hashlib.sha256(rfc8785.dumps(py.to_dict())).hexdigest()
    normal = py.to_dict()
    assert normal["rules"][1]["when"] == {"gold": {"eq": True}}
    assert normal["rules"][0]["when"]["any"][1] == {"rights": {"eq": "withdrawn"}}
    # a semantic change changes the digest
    changed = Policy.from_yaml(DEMO_YAML.replace("lt: 0.7", "lt: 0.8"), "x.yaml")
    assert changed.digest != py.digest
    # round trip through the normalised form
    assert Policy.from_dict(normal).digest == py.digest


def test_operators_and_combinators() -> None:
    pol = Policy(
        name="ops",
        groups={"a": ["embed"]},
        rules=[
            Rule("r0", {"*": 0.25}, {"source": ["labelbox", "labelstudio"], "producer": {"ne": "model"}}),
            Rule("r1", {"*": 0.5}, {"not": {"domain": None}, "consensus": {"ge": 0.2, "le": 0.4}}),
            Rule(
                "r2",
                {"a": 0.0, "*": 0.75},
                {"all": [{"annotator": {"not_in": ["p1"]}}, {"consensus": {"gt": 0.9}}]},
            ),
        ],
        default={"*": 1.0},
    )
    b = pol.bind(LAYERS)
    ps = [
        prov(source="labelbox", producer="human"),  # r0
        prov(source="labelbox", producer="model", domain="x", consensus=0.4),  # r1 (le inclusive)
        prov(source="jsonl", domain=None, consensus=0.3),  # domain missing -> not r1 -> default
        prov(annotator="p2", consensus=0.95),  # r2
        prov(annotator="p1", consensus=0.95),  # excluded annotator -> default
        prov(consensus=float("nan"), domain="d"),  # NaN never satisfies an order test
    ]
    w, r = b.route(ps)
    np.testing.assert_array_equal(r, [0, 1, DEFAULT_RULE, 2, DEFAULT_RULE, DEFAULT_RULE])
    np.testing.assert_array_equal(w[3], [0.0, 0.75, 0.75, 0.75])
    np.testing.assert_array_equal(w[0], [0.25] * 4)
    assert pol.rule_name(DEFAULT_RULE) == "default" and pol.rule_name(2) == "r2"


def test_unknown_field_names_field_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(DEMO_YAML.replace("  - name: gold\n", "  - name: gold\n    wieghts: {a: 1}\n"))
    with pytest.raises(PolicyError) as ei:
        Policy.load(path)
    msg = str(ei.value)
    assert str(path) in msg and "wieghts" in msg and "unknown field" in msg
    assert f"{path}:11:" in msg  # the line of the bad key
    jpath = tmp_path / "bad.json"
    raw = demo_python().to_raw()
    raw["colour"] = "red"
    jpath.write_text(json.dumps(raw))
    with pytest.raises(PolicyError, match=r"bad\.json: colour: unknown field 'colour'"):
        Policy.load(jpath)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (("deep: 0.0}", "deep: 1.5}"), r"demo.yaml:15: rules\[2\]\.weights\.deep: 1.5 is outside \[0, 1\]"),
        (("deep: 0.0}", "deep: -0.1}"), r"rules\[2\]\.weights\.deep: -0.1 is outside"),
        (("deep: 0.0}", "deep: .nan}"), r"rules\[2\]\.weights\.deep: nan is outside"),
        (("deep: 0.0}", "deep: yes}"), r"weight must be a number"),
        (("{shallow: 1.0, deep: 0.0}", "{shallow: 1.0}"), r"no weight for layer group\(s\) deep"),
        (("deep: 0.0}", "middle: 0.0}"), r"unknown layer group 'middle'"),
        (("review: reject", "review: rejected"), r"'rejected' is not a valid review"),
        (("consensus: {lt: 0.7}", "consensus: {lt: high}"), r"consensus compares with a finite number"),
        (("consensus: {lt: 0.7}", "consensus: {below: 0.7}"), r"unknown operator 'below'"),
        (("consensus: {lt: 0.7}", "consenus: {lt: 0.7}"), r"rules\[2\]\.when\.consenus: unknown field"),
        (("gold: true", "gold: 1"), r"gold is true or false"),
        (("gradledger_policy: 1", "gradledger_policy: 2"), r"unsupported format version 2"),
        (("name: gold", "name: excluded"), r"duplicate or reserved rule name"),
        (('default: {"*": 1.0}', ""), r"default: required field is missing"),
        (("deep: [head]", "deep: [head]\n  deep: [embed]"), r"groups\.deep: duplicate key"),
        (("name: consensus-depth", "name: [oops"), r"invalid YAML"),
    ],
)
def test_validation_errors(edit: tuple[str, str], fragment: str) -> None:
    text = DEMO_YAML.replace(*edit, 1)
    assert text != DEMO_YAML
    with pytest.raises(PolicyError, match=fragment):
        Policy.from_yaml(text, "demo.yaml")


def test_bind_errors_name_the_glob_and_layer() -> None:
    pol = Policy.from_yaml(DEMO_YAML.replace("deep: [head]", "deep: [head, 'decoder.*']"), "p.yaml")
    with pytest.raises(
        PolicyError, match=r"p.yaml:\d+: groups\.deep\[1\]: glob 'decoder\.\*' matches no layer"
    ):
        pol.bind(LAYERS)
    overlap = Policy(name="o", groups={"a": ["enc.*"], "b": ["enc.1"]}, rules=[], default={"*": 1})
    with pytest.raises(PolicyError, match=r"layer 'enc.1' is in both group 'a' and group 'b'"):
        overlap.bind(LAYERS)
    uncovered = Policy(name="u", groups={"a": ["enc.*"]}, rules=[Rule("r", {"a": 0.5})], default={"*": 1})
    with pytest.raises(PolicyError, match=r"rules\[0\]\.weights: layer 'embed' is in no layer group"):
        uncovered.bind(LAYERS)


def test_python_object_is_validated_too() -> None:
    with pytest.raises(PolicyError, match=r"<python>: rules\[0\]\.weights\.\*: 2 is outside \[0, 1\]"):
        Policy(name="p", groups={}, rules=[Rule("r", {"*": 2})], default={"*": 1})
    with pytest.raises(PolicyError, match=r"when\.colour: unknown field"):
        Policy(name="p", groups={}, rules=[Rule("r", {"*": 1}, {"colour": "red"})], default={"*": 1})
