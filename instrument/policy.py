"""Routing policies: from a label's provenance to a weight per layer group.

A policy decides, for each training example, how strongly its gradient may update each layer
(``w_il`` in [0, 1]). It is declarative so an auditor can read it, hashed (RFC 8785 + SHA-256) so a
ledger can prove which policy a run used, and recorded as a ``policy`` entry that every ``step`` entry
references by ``policy_seq``; each example's matched rule index is recorded in the step too.

File format (YAML or JSON; the same structure as the Python dataclasses below)::

    gradledger_policy: 1              # format version, required
    name: consensus-depth             # free text, required
    groups:                           # layer groups: name -> fnmatch globs over qualified module names
      shallow: ["encoder.*"]          # every glob must match at least one layer (checked at attach);
      deep: ["head", "decoder.*"]     # a layer may belong to at most one group
    rules:                            # evaluated in order: the FIRST matching rule wins
      - name: excluded
        when: {any: [{review: reject}, {rights: withdrawn}]}
        weights: {"*": 0.0}           # "*" = every layer not named by another key of this mapping
      - name: gold
        when: {gold: true}
        weights: {"*": 1.0}
      - name: low-consensus
        when: {consensus: {lt: 0.7}}
        weights: {shallow: 1.0, deep: 0.0}
    default: {"*": 1.0}               # weights when no rule matches (required)

``when`` is a mapping; all of its entries must hold (an empty or absent ``when`` always matches).
Keys are provenance fields of :class:`ledger.provenance.LabelProvenance`:
``consensus`` (number in [0, 1] or null), ``review`` (approve | reject | fix | null), ``gold`` (bool),
``source``, ``annotator`` (pseudonym), ``domain``, ``rights``, ``producer`` (human | model | program),
``consensus_method``, ``label_id``; or the combinators ``any: [cond, ...]``, ``all: [cond, ...]``,
``not: cond``. A field's value is either a scalar (equality; ``null`` matches a missing value), a list
(membership) or a mapping of operators: ``eq``, ``ne``, ``in``, ``not_in``, ``lt``, ``le``, ``gt``, ``ge``
(the order operators never match a missing value). A ``weights`` mapping names layer groups or ``"*"``; it
must give a weight to every group (``"*"`` covers the rest), each weight in [0, 1].

Validation errors are :class:`PolicyError` (a ``ValueError``) naming the file, line (YAML), field path
and reason, e.g. ``policy.yaml:7: rules[1].weights.deep: 1.5 is outside [0, 1]``. The digest is over
the normalised form (scalar conditions become ``{"eq": v}``, lists ``{"in": [...]}``, weights floats),
so a YAML file and the equivalent Python object hash identically.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import rfc8785
import yaml

if TYPE_CHECKING:  # pragma: no cover
    from ledger.provenance import LabelProvenance

FORMAT_VERSION = 1
DEFAULT_RULE = -1  # rule index recorded for examples that matched no rule (the policy's default)

# Provenance fields a condition may test, with the values a string field may take (None = free text).
_STRING_FIELDS: dict[str, frozenset[str] | None] = {
    "review": frozenset({"approve", "reject", "fix"}),
    "producer": frozenset({"human", "model", "program"}),
    "source": None,
    "annotator": None,
    "domain": None,
    "rights": None,
    "consensus_method": None,
    "label_id": None,
}
_NUMBER_FIELDS = frozenset({"consensus"})
_BOOL_FIELDS = frozenset({"gold"})
FIELDS = frozenset(_STRING_FIELDS) | _NUMBER_FIELDS | _BOOL_FIELDS
_ORDER_OPS = {"lt": float.__lt__, "le": float.__le__, "gt": float.__gt__, "ge": float.__ge__}
_OPS = frozenset({"eq", "ne", "in", "not_in"}) | frozenset(_ORDER_OPS)
_COMBINATORS = frozenset({"any", "all", "not"})
_TOP_KEYS = ("gradledger_policy", "name", "groups", "rules", "default")
_RULE_KEYS = ("name", "when", "weights")


class PolicyError(ValueError):
    """A policy that cannot be used: ``source[:line]: field.path: reason``."""

    def __init__(self, source: str, path: str, reason: str, line: int | None = None) -> None:
        self.source, self.path, self.reason, self.line = source, path, reason, line
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {path}: {reason}" if path else f"{where}: {reason}")


@dataclass(frozen=True)
class Rule:
    """One routing rule: when ``when`` holds, the example gets ``weights`` (group -> weight)."""

    name: str
    weights: Mapping[str, float]
    when: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Policy:
    """A validated routing policy. Construct directly, or with :meth:`load` / :meth:`from_dict`.

    Two policies are equal when their normalised forms (and so their digests) are equal.
    """

    name: str
    groups: Mapping[str, Sequence[str]]
    rules: Sequence[Rule]
    default: Mapping[str, float]
    source: str = "<python>"
    _lines: Mapping[str, int] = field(default_factory=dict, repr=False)
    _normal: dict[str, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        normal = _normalise(self.to_raw(), self.source, self._lines)
        object.__setattr__(self, "_normal", normal)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and self.canonical_bytes == other.canonical_bytes

    def __hash__(self) -> int:
        return hash(self.canonical_bytes)

    # ----- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], source: str = "<dict>", lines: Mapping[str, int] | None = None
    ) -> Policy:
        """Build from the file structure (a parsed YAML / JSON document)."""
        lines = dict(lines or {})
        if not isinstance(data, Mapping):
            raise PolicyError(
                source, "", f"a policy is a mapping, got {type(data).__name__}", _line(lines, "")
            )
        _check_keys(data, _TOP_KEYS, "", source, lines)
        for key in _TOP_KEYS:
            if key not in data:
                raise PolicyError(source, key, "required field is missing", _line(lines, ""))
        version = data["gradledger_policy"]
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise PolicyError(
                source,
                "gradledger_policy",
                f"unsupported format version {version!r} (expected {FORMAT_VERSION})",
                _line(lines, "gradledger_policy"),
            )
        rules_raw = data["rules"]
        if not isinstance(rules_raw, list):
            raise PolicyError(source, "rules", "must be a list of rules", _line(lines, "rules"))
        rules = []
        for i, r in enumerate(rules_raw):
            path = f"rules[{i}]"
            if not isinstance(r, Mapping):
                raise PolicyError(
                    source, path, "a rule is a mapping with name, when, weights", _line(lines, path)
                )
            _check_keys(r, _RULE_KEYS, path, source, lines)
            for key in ("name", "weights"):
                if key not in r:
                    raise PolicyError(
                        source, f"{path}.{key}", "required field is missing", _line(lines, path)
                    )
            rules.append(Rule(name=r["name"], weights=r["weights"], when=r.get("when") or {}))
        return cls(
            name=data["name"],
            groups=data["groups"],
            rules=rules,
            default=data["default"],
            source=source,
            _lines=lines,
        )

    @classmethod
    def from_yaml(cls, text: str, source: str = "<yaml>") -> Policy:
        """Parse YAML text (JSON is accepted too); errors carry the line number."""
        data, lines = _load_yaml_with_lines(text, source)
        return cls.from_dict(data, source, lines)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Load a ``.yaml`` / ``.yml`` / ``.json`` policy file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(str(p), "", f"cannot read policy file: {exc.strerror or exc}") from exc
        if p.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise PolicyError(str(p), "", f"invalid JSON: {exc.msg}", exc.lineno) from exc
            return cls.from_dict(data, str(p))
        return cls.from_yaml(text, str(p))

    # ----- serialisation and identity ------------------------------------------------------------
    def to_raw(self) -> dict[str, Any]:
        """The structure as given (not normalised), in file layout."""
        return {
            "gradledger_policy": FORMAT_VERSION,
            "name": self.name,
            "groups": self.groups,
            "rules": [{"name": r.name, "when": r.when, "weights": r.weights} for r in self.rules],
            "default": self.default,
        }

    def to_dict(self) -> dict[str, Any]:
        """The normalised form: what is hashed and recorded in the ``policy`` entry."""
        return json.loads(json.dumps(self._normal))

    @property
    def canonical_bytes(self) -> bytes:
        return rfc8785.dumps(self._normal)

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the RFC 8785 bytes of :meth:`to_dict`."""
        return "sha256:" + hashlib.sha256(self.canonical_bytes).hexdigest()

    # ----- evaluation ----------------------------------------------------------------------------
    def match(self, prov: LabelProvenance) -> int:
        """Index of the first rule whose condition holds for ``prov``, or ``DEFAULT_RULE`` (-1)."""
        for i, rule in enumerate(self._normal["rules"]):
            if _holds(rule["when"], prov):
                return i
        return DEFAULT_RULE

    def rule_name(self, index: int) -> str:
        return "default" if index == DEFAULT_RULE else str(self.rules[index].name)

    def bind(self, layer_names: Sequence[str]) -> BoundPolicy:
        """Resolve groups against a model's layers; errors name any glob that matches no layer."""
        return BoundPolicy(self, list(layer_names))

    # ----- ledger --------------------------------------------------------------------------------
    def record(self, ledger: Any) -> int:
        """Append a ``policy`` entry (or reuse an earlier one with the same digest); return its seq."""
        digest = self.digest
        for e in ledger.entries(kind="policy", payloads=False):
            if e.body.get("digest") == digest:
                return int(e.seq)
        return int(ledger.append("policy", {"name": self.name, "digest": digest, "policy": self.to_dict()}))

    @classmethod
    def from_entry(cls, ledger: Any, seq: int) -> Policy:
        """Rebuild the policy recorded at ``seq`` and check its digest."""
        e = ledger.entry(seq)
        if e.kind != "policy":
            raise PolicyError(f"ledger entry {seq}", "", f"is a {e.kind!r} entry, not a policy")
        pol = cls.from_dict(e.body["policy"], source=f"ledger entry {seq}")
        if pol.digest != e.body.get("digest"):
            raise PolicyError(
                f"ledger entry {seq}", "digest", "recorded digest does not match the policy body"
            )
        return pol


class BoundPolicy:
    """A policy resolved against concrete layer names: a weight table [rules + 1, L]."""

    def __init__(self, policy: Policy, layer_names: list[str]) -> None:
        self.policy = policy
        self.layer_names = layer_names
        src, lines = policy.source, policy._lines
        normal = policy._normal
        group_of: dict[str, str] = {}
        for gname, globs in normal["groups"].items():
            for gi, glob in enumerate(globs):
                hits = fnmatch.filter(layer_names, glob)
                if not hits:
                    raise PolicyError(
                        src,
                        f"groups.{gname}[{gi}]",
                        f"glob {glob!r} matches no layer of the model (layers: {', '.join(layer_names)})",
                        _line(lines, f"groups.{gname}[{gi}]"),
                    )
                for layer in hits:
                    if group_of.get(layer, gname) != gname:
                        raise PolicyError(
                            src,
                            f"groups.{gname}",
                            f"layer {layer!r} is in both group {group_of[layer]!r} and group {gname!r}",
                            _line(lines, f"groups.{gname}"),
                        )
                    group_of[layer] = gname
        self.group_of = group_of
        rows = [(f"rules[{i}]", r["weights"]) for i, r in enumerate(normal["rules"])] + [
            ("default", normal["default"])
        ]
        table = np.empty((len(rows), len(layer_names)), dtype=np.float32)
        for ri, (path, weights) in enumerate(rows):
            for li, layer in enumerate(layer_names):
                g = group_of.get(layer)
                if g is not None and g in weights:
                    table[ri, li] = weights[g]
                elif "*" in weights:
                    table[ri, li] = weights["*"]
                else:
                    raise PolicyError(
                        src,
                        f"{path}.weights",
                        f"layer {layer!r} is in no layer group, so this rule needs a '*' weight for it",
                        _line(lines, f"{path}.weights"),
                    )
        self.table = table  # row r = rule r; the last row is the default

    def route(self, provenances: Sequence[LabelProvenance]) -> tuple[np.ndarray, np.ndarray]:
        """Weights [B, L] float32 and matched rule indices [B] int32 (-1 = default)."""
        rule_ids = np.fromiter(
            (self.policy.match(p) for p in provenances), dtype=np.int32, count=len(provenances)
        )
        return self.table[rule_ids], rule_ids  # index -1 is the default row


# ----- validation / normalisation ----------------------------------------------------------------
def _line(lines: Mapping[str, int], path: str) -> int | None:
    """The line of ``path`` or of its nearest enclosing field that has one (YAML only)."""
    while True:
        if path in lines:
            return lines[path]
        if not path:
            return None
        cut = max(path.rfind("."), path.rfind("["))
        path = path[: max(cut, 0)]


def _check_keys(
    data: Mapping[str, Any], allowed: Sequence[str], path: str, source: str, lines: Mapping[str, int]
) -> None:
    for key in data:
        if key not in allowed:
            sub = f"{path}.{key}" if path else str(key)
            raise PolicyError(
                source,
                sub,
                f"unknown field {key!r} (allowed: {', '.join(allowed)})",
                _line(lines, sub),
            )


def _weight(value: Any, path: str, source: str, lines: Mapping[str, int]) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(
            source, path, f"weight must be a number in [0, 1], got {value!r}", _line(lines, path)
        )
    w = float(value)
    if not (0.0 <= w <= 1.0):  # also rejects NaN
        raise PolicyError(source, path, f"{value!r} is outside [0, 1]", _line(lines, path))
    return w


def _weights(
    value: Any, groups: Mapping[str, Any], path: str, source: str, lines: Mapping[str, int]
) -> dict[str, float]:
    if not isinstance(value, Mapping) or not value:
        raise PolicyError(
            source, path, "must be a non-empty mapping of layer group (or '*') to weight", _line(lines, path)
        )
    out = {}
    for key, w in value.items():
        if key != "*" and key not in groups:
            raise PolicyError(
                source,
                f"{path}.{key}",
                f"unknown layer group {key!r} (groups: {', '.join(groups) or 'none'}; '*' = the rest)",
                _line(lines, f"{path}.{key}"),
            )
        out[str(key)] = _weight(w, f"{path}.{key}", source, lines)
    if "*" not in out:
        missing = [g for g in groups if g not in out]
        if missing:
            raise PolicyError(
                source,
                path,
                f"no weight for layer group(s) {', '.join(missing)} (name them or add '*')",
                _line(lines, path),
            )
    return out


def _scalar(fieldname: str, value: Any, path: str, source: str, lines: Mapping[str, int]) -> Any:
    """Check a value a field may be compared with; return it normalised."""
    if value is None:
        return None
    if fieldname in _NUMBER_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise PolicyError(
                source, path, f"{fieldname} compares with a finite number, got {value!r}", _line(lines, path)
            )
        return float(value)
    if fieldname in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise PolicyError(
                source, path, f"{fieldname} is true or false, got {value!r}", _line(lines, path)
            )
        return value
    if not isinstance(value, str):
        raise PolicyError(
            source, path, f"{fieldname} compares with a string, got {value!r}", _line(lines, path)
        )
    allowed = _STRING_FIELDS[fieldname]
    if allowed is not None and value not in allowed:
        raise PolicyError(
            source,
            path,
            f"{value!r} is not a valid {fieldname} (one of: {', '.join(sorted(allowed))})",
            _line(lines, path),
        )
    return value


def _condition(cond: Any, path: str, source: str, lines: Mapping[str, int]) -> dict[str, Any]:
    if not isinstance(cond, Mapping):
        raise PolicyError(source, path, "a condition is a mapping of field to test", _line(lines, path))
    out: dict[str, Any] = {}
    for key, value in cond.items():
        sub = f"{path}.{key}"
        if key in ("any", "all"):
            if not isinstance(value, list) or not value:
                raise PolicyError(
                    source, sub, f"{key} takes a non-empty list of conditions", _line(lines, sub)
                )
            out[key] = [_condition(c, f"{sub}[{i}]", source, lines) for i, c in enumerate(value)]
        elif key == "not":
            out[key] = _condition(value, sub, source, lines)
        elif key in FIELDS:
            out[key] = _field_test(key, value, sub, source, lines)
        else:
            raise PolicyError(
                source,
                sub,
                f"unknown field {key!r} (fields: {', '.join(sorted(FIELDS))}; combinators: any, all, not)",
                _line(lines, sub),
            )
    return out


def _field_test(name: str, value: Any, path: str, source: str, lines: Mapping[str, int]) -> dict[str, Any]:
    if isinstance(value, list):
        value = {"in": value}
    elif not isinstance(value, Mapping):
        value = {"eq": value}
    if not value:
        raise PolicyError(source, path, "empty test", _line(lines, path))
    out: dict[str, Any] = {}
    for op, arg in value.items():
        sub = f"{path}.{op}"
        if op not in _OPS:
            raise PolicyError(
                source,
                sub,
                f"unknown operator {op!r} (one of: {', '.join(sorted(_OPS))})",
                _line(lines, sub),
            )
        if op in _ORDER_OPS:
            if name not in _NUMBER_FIELDS:
                raise PolicyError(
                    source, sub, f"{op} needs a numeric field; {name} is not numeric", _line(lines, sub)
                )
            if arg is None:
                raise PolicyError(source, sub, f"{op} needs a number, got null", _line(lines, sub))
            out[op] = _scalar(name, arg, sub, source, lines)
        elif op in ("in", "not_in"):
            if not isinstance(arg, list) or not arg:
                raise PolicyError(source, sub, f"{op} takes a non-empty list", _line(lines, sub))
            out[op] = [_scalar(name, a, f"{sub}[{i}]", source, lines) for i, a in enumerate(arg)]
        else:
            out[op] = _scalar(name, arg, sub, source, lines)
    return out


def _normalise(raw: Mapping[str, Any], source: str, lines: Mapping[str, int]) -> dict[str, Any]:
    name = raw["name"]
    if not isinstance(name, str) or not name:
        raise PolicyError(source, "name", "must be a non-empty string", _line(lines, "name"))
    groups_raw = raw["groups"]
    if not isinstance(groups_raw, Mapping):
        raise PolicyError(
            source, "groups", "must be a mapping of group name to a list of globs", _line(lines, "groups")
        )
    groups: dict[str, list[str]] = {}
    for g, globs in groups_raw.items():
        path = f"groups.{g}"
        if not isinstance(g, str) or not g or g == "*":
            raise PolicyError(
                source, path, "a group name is a non-empty string other than '*'", _line(lines, path)
            )
        if isinstance(globs, str):
            globs = [globs]
        if not isinstance(globs, Sequence) or not globs or not all(isinstance(x, str) and x for x in globs):
            raise PolicyError(
                source, path, "must be a non-empty list of module-name globs", _line(lines, path)
            )
        groups[g] = list(globs)
    rules = []
    seen: set[str] = set()
    for i, r in enumerate(raw["rules"]):
        path = f"rules[{i}]"
        if not isinstance(r["name"], str) or not r["name"]:
            raise PolicyError(
                source,
                f"{path}.name",
                "must be a non-empty string",
                _line(lines, f"{path}.name"),
            )
        if r["name"] in seen or r["name"] == "default":
            raise PolicyError(
                source,
                f"{path}.name",
                f"duplicate or reserved rule name {r['name']!r}",
                _line(lines, f"{path}.name"),
            )
        seen.add(r["name"])
        rules.append(
            {
                "name": r["name"],
                "when": _condition(r["when"] or {}, f"{path}.when", source, lines),
                "weights": _weights(r["weights"], groups, f"{path}.weights", source, lines),
            }
        )
    default = _weights(raw["default"], groups, "default", source, lines)
    return {
        "gradledger_policy": FORMAT_VERSION,
        "name": name,
        "groups": groups,
        "rules": rules,
        "default": default,
    }


# ----- condition evaluation --------------------------------------------------------------------
def _holds(cond: Mapping[str, Any], prov: Any) -> bool:
    """Evaluate a normalised condition against one provenance record (all entries must hold)."""
    for key, value in cond.items():
        if key == "any":
            ok = any(_holds(c, prov) for c in value)
        elif key == "all":
            ok = all(_holds(c, prov) for c in value)
        elif key == "not":
            ok = not _holds(value, prov)
        else:
            ok = all(_test(getattr(prov, key), op, arg) for op, arg in value.items())
        if not ok:
            return False
    return True


def _test(v: Any, op: str, arg: Any) -> bool:
    if op == "eq":
        return bool(v == arg)
    if op == "ne":
        return bool(v != arg)
    if op == "in":
        return v in arg
    if op == "not_in":
        return v not in arg
    # order operators: a missing (None) or non-finite value never matches
    if v is None or isinstance(v, bool) or not math.isfinite(v):
        return False
    return _ORDER_OPS[op](float(v), arg)


# ----- YAML with line numbers ---------------------------------------------------------------------
def _load_yaml_with_lines(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML keeping the 1-based line of every field path; reject duplicate keys."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise PolicyError(
            source, "", f"invalid YAML: {getattr(exc, 'problem', exc)}", mark.line + 1 if mark else None
        ) from exc
    if node is None:
        raise PolicyError(source, "", "empty policy file")
    lines: dict[str, int] = {}
    constructor = yaml.SafeLoader("")

    def walk(n: yaml.Node, path: str) -> Any:
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for k, v in n.value:
                key = constructor.construct_object(k, deep=True)
                sub = f"{path}.{key}" if path else str(key)
                if key in out:
                    raise PolicyError(source, sub, "duplicate key", k.start_mark.line + 1)
                lines[sub] = k.start_mark.line + 1
                out[key] = walk(v, sub)
            return out
        if isinstance(n, yaml.SequenceNode):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(n.value)]
        return constructor.construct_object(n, deep=True)

    return walk(node, ""), lines
