"""Depth profiles as provenance: run the probe pipeline for a run's checkpoint and append a ``profile`` entry.

The feedback given to annotators ("this slice stays ambiguous deep in the network") is itself recorded,
with everything needed to recompute it: which data (file sha256 and an inputs digest over the activations,
labels and domain tags), which model (the checkpoint entry and its ``state_dict_sha256``, the factory that
builds the architecture), which probe settings, and the results.

Data file (``.npz``, loaded with ``allow_pickle=False``):

=========  =========================================================================================
``x``      model inputs, first axis = examples (cast to the model's parameter dtype)
``y``      optional int labels ``[N]``; ``-1`` = unlabelled (probes are fitted on labelled rows only, so
           at least two classes need ``folds`` labelled examples each)
``domain`` optional string tags ``[N]`` (class, source, slice ...); default ``"all"``
``ids``    optional string example ids ``[N]``; default ``row-<i>``
``model``  optional 0-d string ``"package.module:function"``; ``function()`` returns the run's
           architecture as an ``nn.Module`` (``--model`` on the command line overrides it)
``state``  optional 0-d string: a ``torch.save``'d state dict (path relative to the .npz); default: the
           run's :class:`instrument.sketch.StateStore` (``<ledger>.states/<state_dict_sha256>.pt``)
=========  =========================================================================================

The weights are never trusted: after loading them into the model, the model's digests
(``instrument.tracker.model_digests``) must equal the chosen ``checkpoint`` entry's ``state_dict_sha256``,
else :class:`ProfileInputError`. (Loading from the StateStore additionally re-hashes the file.)

The ``profile`` entry (v1): the body of :meth:`audit.profiles.ProfileResult.entry_body` (``run``, ``data`` =
``sha256:<file digest>``, settings, inputs_digest, layers, classes, entropy, depth, probe_accuracy) plus
``data_file`` {name, sha256, size, examples}, ``model`` {factory, checkpoint_seq, checkpoint_tag,
state_dict_sha256}, ``domains`` (sorted) and ``example_ids``; payloads ``example_entropy`` <f8 [N, L],
``example_depth`` <i4 [N], ``probe_predictions`` <i8 [N, L], ``evaluated`` bool [N], ``domain_index``
<i4 [N] (into ``domains``). :func:`load_profile` rebuilds the :class:`~audit.profiles.ProfileResult`
from it, which is what the ambiguity queue reads.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audit.profiles import Estimate, ProbeSettings, ProfileResult, collect_activations, entropy_profile

PROFILE_V = 1


class ProfileInputError(ValueError):
    """Unusable input for a profile (data file, model factory, state); the message names file and field."""


@dataclass(frozen=True)
class ProfileData:
    """A loaded data file."""

    path: Path
    sha256: str
    size: int
    x: np.ndarray
    y: np.ndarray  # [N] int64, -1 = unlabelled
    domains: list[str]
    ids: list[str]
    model: str | None
    state: Path | None


@dataclass(frozen=True)
class StoredProfile:
    """A ``profile`` entry read back: the body, the rebuilt result and the per-example ids and domains."""

    seq: int
    body: dict[str, Any]
    result: ProfileResult
    example_ids: list[str]
    example_domains: list[str]


# ------------------------------------------------------------------------------------------------ inputs
def _scalar_str(arr: np.ndarray, path: Path, key: str) -> str:
    if arr.dtype.kind != "U" or arr.ndim != 0:
        raise ProfileInputError(
            f"{path}: field {key!r} must be a 0-d string, got dtype {arr.dtype} shape {arr.shape}"
        )
    return str(arr)


def load_data(path: str | os.PathLike[str]) -> ProfileData:
    """Read and check a data file (module docstring); ProfileInputError naming the field on any problem."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ProfileInputError(f"{p}: no such data file") from None
    except OSError as exc:
        raise ProfileInputError(f"{p}: cannot read data file ({exc.strerror})") from None
    if not raw.startswith(b"PK"):
        raise ProfileInputError(f"{p}: not an .npz data file (not a zip archive; write it with numpy.savez)")
    try:
        import io

        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            fields = {k: npz[k] for k in npz.files}
    except ValueError as exc:
        reason = "object arrays are not allowed" if "pickle" in str(exc) else str(exc)
        raise ProfileInputError(f"{p}: not a usable .npz data file ({reason})") from None
    except Exception as exc:  # zipfile / format errors
        raise ProfileInputError(f"{p}: not an .npz data file ({type(exc).__name__}: {exc})") from None
    unknown = sorted(set(fields) - {"x", "y", "domain", "ids", "model", "state"})
    if unknown:
        raise ProfileInputError(f"{p}: unknown field(s) {unknown} (expected x, y, domain, ids, model, state)")
    if "x" not in fields:
        raise ProfileInputError(f"{p}: field 'x' (model inputs) is missing")
    x = fields["x"]
    if x.ndim < 1 or x.shape[0] == 0:
        raise ProfileInputError(f"{p}: field 'x' must have at least one example, got shape {x.shape}")
    if x.dtype.kind not in "fiub":
        raise ProfileInputError(f"{p}: field 'x' must be numeric, got dtype {x.dtype}")
    n = x.shape[0]
    if "y" in fields:
        y = fields["y"]
        if y.shape != (n,) or y.dtype.kind not in "iu":
            raise ProfileInputError(
                f"{p}: field 'y' must be integers of shape ({n},), got {y.dtype} {y.shape}"
            )
        y = y.astype(np.int64)
        if (y < -1).any():
            raise ProfileInputError(f"{p}: field 'y' has values below -1 (-1 means unlabelled)")
    else:
        y = np.full(n, -1, np.int64)
    tags: dict[str, list[str]] = {}
    for key, default in (("domain", "all"), ("ids", None)):
        if key in fields:
            arr = fields[key]
            if arr.shape != (n,) or arr.dtype.kind != "U":
                raise ProfileInputError(
                    f"{p}: field {key!r} must be strings of shape ({n},), got {arr.dtype} {arr.shape}"
                )
            tags[key] = [str(v) for v in arr]
        else:
            tags[key] = [default if default is not None else f"row-{i}" for i in range(n)]
    if len(set(tags["ids"])) != n:
        raise ProfileInputError(f"{p}: field 'ids' has duplicate example ids")
    model = _scalar_str(fields["model"], p, "model") if "model" in fields else None
    state = None
    if "state" in fields:
        s = Path(_scalar_str(fields["state"], p, "state"))
        state = s if s.is_absolute() else p.parent / s
    return ProfileData(
        p, hashlib.sha256(raw).hexdigest(), len(raw), x, y, tags["domain"], tags["ids"], model, state
    )


def resolve_factory(ref: str) -> Callable[[], Any]:
    """``"package.module:function"`` -> the function (imported with the working directory on sys.path)."""
    mod_name, sep, fn_name = ref.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ProfileInputError(f"model factory {ref!r}: expected 'module:function'")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ProfileInputError(f"model factory {ref!r}: cannot import {mod_name!r} ({exc})") from None
    finally:
        if added:
            sys.path.remove(cwd)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ProfileInputError(f"model factory {ref!r}: {mod_name} has no callable {fn_name!r}")
    return fn


def pick_checkpoint(ledger: Any, run: str, which: str | None) -> Any:
    """The run's checkpoint entry by seq or tag (default: the latest); ProfileInputError otherwise."""
    from ledger.records import checkpoints

    cps = checkpoints(ledger, run)
    if not cps:
        raise ProfileInputError(f"run {run!r} has no checkpoint entry: a profile needs verified weights")
    if which is None:
        return cps[-1]
    found = [c for c in cps if str(c.seq) == which or c.tag == which]
    if not found:
        known = ", ".join(f"{c.seq} ({c.tag})" for c in cps)
        raise ProfileInputError(f"run {run!r} has no checkpoint {which!r} (checkpoints: {known})")
    return found[-1]


def load_verified_model(
    factory: str, checkpoint: Any, layers: Sequence[str], *, state_file: Path | None, states_dir: Path | None
) -> Any:
    """Build the model, load the checkpoint's weights, and check its digests against the entry."""
    import torch

    from instrument.sketch import StateError, StateStore
    from instrument.tracker import model_digests

    model = resolve_factory(factory)()
    if not isinstance(model, torch.nn.Module):
        raise ProfileInputError(
            f"model factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    try:
        if state_file is not None:
            try:
                state = torch.load(state_file, map_location="cpu", weights_only=True)
            except FileNotFoundError:
                raise ProfileInputError(f"{state_file}: no such state file") from None
            except Exception as exc:
                raise ProfileInputError(f"{state_file}: unreadable state file ({exc})") from None
        else:
            if states_dir is None:
                raise ProfileInputError("no state file: give 'state' in the data file or --states DIR")
            state = StateStore(states_dir).load(checkpoint)
    except StateError as exc:
        raise ProfileInputError(str(exc)) from None
    if not isinstance(state, dict):
        raise ProfileInputError(f"{state_file}: not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ProfileInputError(
            f"model factory {factory!r}: the state does not fit the model ({first})"
        ) from None
    got = model_digests(model, [name for name in layers if name in dict(model.named_modules())])
    if got["state_dict_sha256"] != checkpoint.state_dict_sha256:
        where = state_file if state_file is not None else f"state store {states_dir}"
        raise ProfileInputError(
            f"{where}: weights digest {got['state_dict_sha256'][:16]}... does not match checkpoint entry "
            f"{checkpoint.seq} ({checkpoint.state_dict_sha256[:16]}...): refusing to profile unverified weights"
        )
    return model.eval()


# ------------------------------------------------------------------------------------------------ compute
def compute_profile(
    model: Any, data: ProfileData, layers: Sequence[str], settings: ProbeSettings
) -> ProfileResult:
    """Activations of ``layers`` on ``data.x``, the model's own predictions, and the cross-fitted profile."""
    import torch

    param = next(iter(model.parameters()), None)
    x = torch.as_tensor(data.x)
    if param is not None and x.is_floating_point():
        x = x.to(param.dtype)
    acts = collect_activations(model, x, [*layers, ""])
    out = acts.pop("")
    final = out.argmax(axis=1) if out.ndim == 2 and out.shape[1] > 1 else None
    try:
        return entropy_profile(
            acts, data.y, data.domains, layers=layers, final_predictions=final, settings=settings
        )
    except ValueError as exc:
        raise ProfileInputError(f"{data.path}: {exc}") from None


def entry_parts(
    result: ProfileResult, data: ProfileData, run: str, factory: str, checkpoint: Any
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Body and payloads of the ``profile`` entry (module docstring)."""
    body = result.entry_body(run=run, data=f"sha256:{data.sha256}")
    body.update(
        data_file={
            "name": data.path.name,
            "sha256": data.sha256,
            "size": data.size,
            "examples": len(data.ids),
        },
        model={
            "factory": factory,
            "checkpoint_seq": checkpoint.seq,
            "checkpoint_tag": checkpoint.tag,
            "state_dict_sha256": checkpoint.state_dict_sha256,
        },
        domains=list(result.domains),
        example_ids=list(data.ids),
    )
    pos = {d: k for k, d in enumerate(result.domains)}
    payloads = {
        "example_entropy": np.ascontiguousarray(result.example_entropy, dtype="<f8"),
        "example_depth": np.ascontiguousarray(result.example_depth, dtype="<i4"),
        "probe_predictions": np.ascontiguousarray(result.probe_predictions, dtype="<i8"),
        "evaluated": np.ascontiguousarray(result.evaluated, dtype=bool),
        "domain_index": np.array([pos[d] for d in data.domains], dtype="<i4"),
    }
    return body, payloads


def record_profile(
    ledger: Any, result: ProfileResult, data: ProfileData, run: str, factory: str, checkpoint: Any
) -> int:
    """Append the ``profile`` entry; return its seq."""
    body, payloads = entry_parts(result, data, run, factory, checkpoint)
    return int(ledger.append("profile", body, payloads, v=PROFILE_V))


# ------------------------------------------------------------------------------------------------ read back
def _estimate(d: dict[str, Any]) -> Estimate:
    if not d.get("n"):
        return Estimate(math.nan, math.nan, math.nan, 0)
    low, high = d["ci"]
    return Estimate(float(d["mean"]), float(low), float(high), int(d["n"]))


def settings_from_body(body: dict[str, Any]) -> ProbeSettings:
    s = body["settings"]
    return ProbeSettings(
        folds=int(s["folds"]), C=float(s["C"]), max_iter=int(s["max_iter"]), n_boot=int(s["n_boot"]),
        ci=float(s["ci"]), seed=int(s["seed"]), evaluate=str(s["evaluate"]), unit_norm=bool(s["unit_norm"]),
    )  # fmt: skip


def profile_from_entry(entry: Any) -> StoredProfile:
    """Rebuild a :class:`StoredProfile` from a ``profile`` entry written by :func:`record_profile`."""
    if entry.kind != "profile":
        raise ValueError(f"entry {entry.seq} is a {entry.kind!r} entry, not a profile")
    b = entry.body
    pl = entry.payloads
    missing = [
        k
        for k in ("example_entropy", "example_depth", "probe_predictions", "evaluated", "domain_index")
        if k not in pl
    ]
    if missing or "example_ids" not in b:
        raise ValueError(f"profile entry {entry.seq} has no per-example data ({missing or ['example_ids']})")
    domains = list(b["domains"])
    result = ProfileResult(
        layers=list(b["layers"]),
        domains=domains,
        classes=[int(c) for c in b["classes"]],
        entropy={d: {lay: _estimate(e) for lay, e in per.items()} for d, per in b["entropy"].items()},
        depth={d: _estimate(e) for d, e in b["depth"].items()},
        example_entropy=np.asarray(pl["example_entropy"], dtype=np.float64),
        example_depth=np.asarray(pl["example_depth"], dtype=np.int64),
        probe_predictions=np.asarray(pl["probe_predictions"], dtype=np.int64),
        evaluated=np.asarray(pl["evaluated"], dtype=bool),
        inputs_digest=str(b["inputs_digest"]),
        settings=settings_from_body(b),
        probe_accuracy={k: float(v) for k, v in b.get("probe_accuracy", {}).items()},
    )
    ex_domains = [domains[int(k)] for k in pl["domain_index"]]
    return StoredProfile(entry.seq, b, result, list(b["example_ids"]), ex_domains)


def latest_profile_seq(ledger: Any, run: str) -> int | None:
    """Seq of the run's most recent ``profile`` entry (bodies only are read), or None."""
    seq = None
    for e in ledger.entries(kind="profile", payloads=False):
        if e.body.get("run") == run:
            seq = e.seq
    return seq


def load_profile(ledger: Any, run: str, seq: int | None = None) -> StoredProfile | None:
    """The run's latest ``profile`` entry (or the one at ``seq``), rebuilt; None when the run has none."""
    if seq is None:
        seq = latest_profile_seq(ledger, run)
        if seq is None:
            return None
    entry = ledger.entry(seq)
    if entry.kind != "profile" or entry.body.get("run") != run:
        raise ValueError(f"entry {seq} is not a profile entry of run {run!r}")
    return profile_from_entry(entry)
