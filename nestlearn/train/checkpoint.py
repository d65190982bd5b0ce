"""Checkpoints in safetensors, written atomically (temp file + ``os.replace``).

One file holds the model's parameters, the optimizer state, the carried in-context state, the
RNG states, the step, the data position and the hash of the resolved spec. Nested Python
structures (optimizer state, carried memory state) are flattened into named tensors plus a JSON
skeleton in the file's metadata; Python ints become int64 tensors, so everything is restored
exactly. Loading checks the format and the spec and fails with one clear message.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nestlearn.files import atomic_write
from nestlearn.train.errors import CheckpointError

FORMAT = "nestlearn-checkpoint/1"


# ----------------------------------------------------------------------------- nested trees


def host_copy(t: Tensor) -> Tensor:
    """A contiguous CPU copy of ``t`` that shares no memory with it (one copy, not two: a GPU
    tensor's ``.cpu()`` already is one)."""
    return t.detach().to("cpu", copy=True).contiguous()



def flatten_tree(tree: Any, prefix: str) -> tuple[dict[str, Tensor], Any]:
    """``tree`` (dicts, lists, tuples, tensors, ints, floats, bools, strings, None) -> named
    tensors under ``prefix`` and a JSON skeleton that ``unflatten_tree`` inverts."""
    tensors: dict[str, Tensor] = {}

    def go(x: Any, path: str) -> Any:
        if isinstance(x, Tensor):
            tensors[path] = host_copy(x)
            return {"T": path}
        if isinstance(x, bool):
            return {"b": x}
        if isinstance(x, int):
            tensors[path] = torch.tensor(x, dtype=torch.int64)
            return {"i": path}
        if isinstance(x, float):
            return {"f": x}
        if isinstance(x, str):
            return {"s": x}
        if x is None:
            return {"n": None}
        if isinstance(x, dict):
            items = []
            for k, v in x.items():
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise TypeError(f"cannot checkpoint a dict key of type {type(k).__name__} at {path}")
                items.append([k, go(v, f"{path}/{k}")])
            return {"d": items}
        if isinstance(x, (list, tuple)):
            kind = "l" if isinstance(x, list) else "t"
            return {kind: [go(v, f"{path}/{i}") for i, v in enumerate(x)]}
        raise TypeError(f"cannot checkpoint a value of type {type(x).__name__} at {path}")

    skeleton = go(tree, prefix)
    return tensors, skeleton


def unflatten_tree(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    (kind, val), = skeleton.items()
    if kind == "T":
        return tensors[val]
    if kind == "i":
        return int(tensors[val].item())
    if kind in ("b", "f", "s", "n"):
        return val
    if kind == "d":
        return {k: unflatten_tree(v, tensors) for k, v in val}
    if kind == "l":
        return [unflatten_tree(v, tensors) for v in val]
    if kind == "t":
        return tuple(unflatten_tree(v, tensors) for v in val)
    raise ValueError(f"unknown skeleton node {kind!r}")


def tree_to(tree: Any, device: torch.device | str) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, tree)


# ----------------------------------------------------------------------------- spec identity


RULE_OPTIONS_ADDED: dict[str, Any] = {"decay_to": "zero", "proj": None}
"""Rule options added after specs were first hashed, with the default that reproduces what such
a spec did before: left out of the identity at that default, so earlier runs, checkpoints and
suite results still match their specs."""


NODE_OPTIONS_ADDED: dict[str, Any] = {"kv_norm": False, "gen_lr_max": None}
"""Block-node options added after specs were first hashed (as ``RULE_OPTIONS_ADDED``)."""

LEVEL_OPTIONS_ADDED: dict[str, Any] = {"max_gain": None}
"""Level options added after specs were first hashed (as ``RULE_OPTIONS_ADDED``)."""


def spec_data(spec: Any) -> dict[str, Any]:
    """The spec as plain data; an empty ``profiles`` is left out (resolved specs have none, and
    specs written before profiles existed keep their hash), and so are ``RULE_OPTIONS_ADDED`` at
    their old behaviour (and ``NODE_OPTIONS_ADDED`` and ``LEVEL_OPTIONS_ADDED`` likewise)."""
    data: dict[str, Any] = spec.model_dump(mode="json", by_alias=True)
    if not data.get("profiles"):
        data.pop("profiles", None)
    for level in (data.get("levels") or {}).values():
        if isinstance(level, dict):
            _drop_added(level, LEVEL_OPTIONS_ADDED)
            if isinstance(level.get("rule"), dict):
                _drop_added(level["rule"], RULE_OPTIONS_ADDED)
    for node in data.get("block") or []:
        if isinstance(node, dict):
            _drop_added(node, NODE_OPTIONS_ADDED)
    return data


def _drop_added(entry: dict[str, Any], added: dict[str, Any]) -> None:
    """Leave out of ``entry`` every option of ``added`` set to the value it had before it existed."""
    for key, old in added.items():
        if key in entry and entry[key] == old:
            entry.pop(key)


def spec_json(spec: Any) -> str:
    """The resolved spec as canonical JSON (what the hash is taken of)."""
    return json.dumps(spec_data(spec), sort_keys=True, separators=(",", ":"))


def spec_hash(spec: Any) -> str:
    return hashlib.sha256(spec_json(spec).encode()).hexdigest()[:16]


def _leaves(x: Any, path: str = "") -> dict[str, Any]:
    if isinstance(x, dict):
        out: dict[str, Any] = {}
        for k, v in x.items():
            out.update(_leaves(v, f"{path}.{k}" if path else str(k)))
        return out
    if isinstance(x, list):
        out = {}
        for i, v in enumerate(x):
            out.update(_leaves(v, f"{path}.{i}" if path else str(i)))
        return out
    return {path: x}


def spec_diff(old_json: str, new_json: str, limit: int = 6) -> list[str]:
    """Human-readable differences ``path: old -> new`` between two canonical spec JSONs."""
    try:
        a, b = _leaves(json.loads(old_json)), _leaves(json.loads(new_json))
    except (ValueError, TypeError):
        return []
    diffs = [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
             for k in sorted(set(a) | set(b)) if a.get(k, object()) != b.get(k, object())]
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
    return diffs


# ----------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    return tensors, {"python": random.getstate()}


def set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    py = meta.get("python")
    if py is not None:
        random.setstate((py[0], tuple(py[1]), py[2]))


# ----------------------------------------------------------------------------- save / load


@dataclass
class Checkpoint:
    """What a checkpoint file holds, already unflattened."""

    path: Path
    step: int
    spec_hash: str
    spec_json: str
    model: dict[str, Tensor]
    optimizer: dict[str, Any] | None = None
    carry: Any = None
    data: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    rng_tensors: dict[str, Tensor] = field(default_factory=dict)
    rng_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spec_name(self) -> str:
        try:
            return str(json.loads(self.spec_json).get("name", "?"))
        except ValueError:
            return "?"


def save_checkpoint(
    path: str | Path, *, model: torch.nn.Module, spec: Any, step: int,
    optimizer: torch.optim.Optimizer | None = None, carry: Any = None, data: dict[str, Any] | None = None,
    scaler: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically; returns its path."""
    tensors, meta = checkpoint_contents(model=model, spec=spec, step=step, optimizer=optimizer, carry=carry,
                                        data=data, scaler=scaler, extra=extra)
    return write_checkpoint(path, tensors, meta)


def write_checkpoint(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> Path:
    """Serialize what ``checkpoint_contents`` took and write it atomically (touches no model)."""
    from safetensors.torch import save

    path = Path(path)
    atomic_write(path, save(tensors, metadata=meta))
    return path


def checkpoint_contents(
    *, model: torch.nn.Module, spec: Any, step: int, optimizer: torch.optim.Optimizer | None = None,
    carry: Any = None, data: dict[str, Any] | None = None, scaler: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A checkpoint's tensors (host copies: training may go on at once) and metadata."""
    tensors: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        tensors[f"model/{name}"] = host_copy(t)  # a copy: tied weights, and training goes on
    meta: dict[str, str] = {"format": FORMAT, "step": str(int(step)), "spec_hash": spec_hash(spec),
                            "spec": spec_json(spec), "data": json.dumps(data or {}),
                            "extra": json.dumps(extra or {}), "scaler": json.dumps(scaler)}
    if optimizer is not None:
        t_opt, sk = flatten_tree(optimizer.state_dict(), "optim")
        tensors.update(t_opt)
        meta["optim_tree"] = json.dumps(sk)
    if carry is not None:
        t_carry, sk = flatten_tree(carry, "carry")
        tensors.update(t_carry)
        meta["carry_tree"] = json.dumps(sk)
    t_rng, m_rng = rng_state()
    tensors.update(t_rng)
    meta["rng"] = json.dumps(m_rng)
    return tensors, meta


class CheckpointWriter:
    """Writes checkpoints on a background thread (serializing and fsyncing a 13M-parameter
    model with its AdamW state takes about a second), one at a time, in order. The contents
    are taken on the caller's thread first (``checkpoint_contents``), so training goes on while
    the file is written; ``wait`` (before a run reports its end) blocks until the last write is
    on disk and raises its error, if any."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, path: str | Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
        self.wait()

        def write() -> None:
            try:
                write_checkpoint(path, tensors, meta)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=write, name="nestlearn-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def load_checkpoint(path: str | Path, spec: Any = None) -> Checkpoint:
    """Read ``path``; with ``spec``, refuse a checkpoint written by a different spec."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        tensors: dict[str, Tensor] = {}
        with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types (and OSError) for bad files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a safetensors file ({_short(e)}); "
            "delete it to start the run over, or point --out at another run directory"
        ) from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nestlearn checkpoint (format {meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    try:
        ck = Checkpoint(
            path=path, step=int(meta["step"]), spec_hash=meta["spec_hash"], spec_json=meta["spec"],
            model={k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")},
            data=json.loads(meta.get("data", "{}")), scaler=json.loads(meta.get("scaler", "null")),
            extra=json.loads(meta.get("extra", "{}")),
            rng_tensors={k: v for k, v in tensors.items() if k.startswith("rng/")},
            rng_meta=json.loads(meta.get("rng", "{}")),
        )
        if "optim_tree" in meta:
            ck.optimizer = unflatten_tree(json.loads(meta["optim_tree"]), tensors)
        if "carry_tree" in meta:
            ck.carry = unflatten_tree(json.loads(meta["carry_tree"]), tensors)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata is incomplete ({_short(e)}); "
                              "delete it to start the run over") from None
    if spec is not None:
        check_spec(ck, spec)
    return ck


def check_resumable(path: str | Path, spec: Any, settings: dict[str, Any], steps: int | None) -> None:
    """Refuse, from the checkpoint's header alone (no tensors read), a resume that the full
    restore would refuse: another spec, another data stream (``settings``: seed, batch,
    seq_len), or ``steps`` before the checkpoint's step. Run before a resume rewrites the run's
    spec.yaml / config.json, so a refused resume leaves the run directory as it was."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
            meta = f.metadata() or {}
        data = json.loads(meta.get("data", "{}"))
        step, stored_hash, stored_json = int(meta["step"]), meta["spec_hash"], meta["spec"]
    except Exception:  # noqa: BLE001 - load_checkpoint reports a corrupt file in detail
        load_checkpoint(path)
        return
    if meta.get("format") != FORMAT or not isinstance(data, dict):
        return
    ck = Checkpoint(path=path, step=step, spec_hash=stored_hash, spec_json=stored_json, model={}, data=data)
    check_spec(ck, spec)
    check_continues(ck, settings, steps)


def check_continues(ck: Checkpoint, settings: dict[str, Any], steps: int | None) -> None:
    """Refuse a resume whose data stream (``settings``: task, seed, batch, seq_len) differs from
    the checkpoint's, or whose ``steps`` end before the checkpoint's step."""
    for key, value in settings.items():
        if key in ck.data and ck.data[key] != value:
            raise CheckpointError(f"--resume: the checkpoint's data stream has {key}={ck.data[key]!r} but this run "
                                  f"has {value!r}; resume with the original settings "
                                  f"(see {Path(ck.path).parent.parent / 'config.json'})")
    if steps is not None and ck.step > steps:
        raise CheckpointError(f"--resume: the checkpoint is at step {ck.step}, past --steps {steps}")


def check_spec(ck: Checkpoint, spec: Any) -> None:
    mine = spec_hash(spec)
    if ck.spec_hash == mine or _same_under_current_schema(ck.spec_json, spec):
        return
    diff = spec_diff(ck.spec_json, spec_json(spec))
    lines = [f"checkpoint {ck.path} was written by another spec ('{ck.spec_name}', hash {ck.spec_hash}; "
             f"this run's spec '{getattr(spec, 'name', '?')}' has hash {mine})"]
    if diff:
        lines.append("  differences (checkpoint -> this run): " + "; ".join(diff))
    lines.append("  resume with the same spec, overrides and profile (the run directory keeps the result in spec.yaml), "
                 "or choose a new --out")
    raise CheckpointError("\n".join(lines))


def _same_under_current_schema(stored_json: str, spec: Any) -> bool:
    """A checkpoint written before the schema gained a field (with a default) describes the same
    model: re-read its spec with today's schema and compare again."""
    try:
        again = type(spec).model_validate(json.loads(stored_json))
    except Exception:  # noqa: BLE001 - any failure means "not the same spec"
        return False
    return spec_hash(again) == spec_hash(spec)


def restore_model(model: torch.nn.Module, ck: Checkpoint) -> None:
    try:
        model.load_state_dict(ck.model, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ck.path} does not fit this model: {_short(e, 300)}") from None


def _short(e: BaseException, n: int = 160) -> str:
    s = " ".join(str(e).split()) or type(e).__name__
    return s if len(s) <= n else s[: n - 3] + "..."
