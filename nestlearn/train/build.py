"""The pieces a training run is built from: the device and precision, the task, the model,
the outer optimizer (the rules marked ``usable_as_outer``) and its learning-rate schedule. Each failure a user can
cause is a ``TrainError`` (or the spec's ``SpecError``) with one clear message."""

from __future__ import annotations

import math
import os
import random
from typing import Any

import torch
from torch import nn

from nestlearn.spec.errors import SpecError
from nestlearn.tasks import Task, get_task
from nestlearn.train.config import TrainConfig
from nestlearn.train.errors import TrainError


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: CUDA is not available here "
                         f"(torch {torch.__version__}, {torch.cuda.device_count()} GPUs); use --device cpu or auto")
    if name in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32). ``auto``: bf16 on a CUDA device that has it, fp32
    elsewhere. On a CPU ``bf16`` is taken when asked (CPU autocast: the GPU's activation numerics,
    e.g. to reproduce a GPU run's instability at a size the CPU trains); fp16 needs a GPU (its loss
    scaling is CUDA's)."""
    if name == "fp32":
        return None
    if device.type != "cuda":
        if name == "auto":
            return None
        if name == "bf16":
            return torch.bfloat16
        raise TrainError(f"--precision {name}: fp16 needs a CUDA device; use --precision bf16 or fp32 on CPU")
    if name == "fp16":
        return torch.float16
    if name == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def set_tf32(on: bool, device: torch.device) -> tuple[str, str | None]:
    """``--tf32``: fp32 matrix products on TF32 tensor cores on a CUDA device (the in-context
    levels' kernels read the same setting: ``loops/dgd_triton.precision``). Returns the matmul
    precision to restore when the run ends, and the line to say (None: nothing to say)."""
    before = torch.get_float32_matmul_precision()
    if not on:
        return before, None
    if device.type != "cuda":
        return before, f"--tf32: no effect on {device.type} (TF32 is a CUDA tensor-core format)"
    torch.set_float32_matmul_precision("high")
    return before, ("--tf32: fp32 matrix products on TF32 tensor cores, the in-context levels' kernels "
                    "included (about 1e-3 relative error per product)")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def build_task(config: TrainConfig) -> Task:
    options = dict(config.task_options)
    if config.data is not None:
        if config.task != "lm":
            raise TrainError(f"--data applies to --task lm, not to --task {config.task}")
        options["data"] = config.data
    return get_task(config.task, **options)


def _hyper(value: Any, what: str) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    raise TrainError(f"levels.<outer>.rule.{what}: the outer level is trained by torch.optim, so its "
                     f"hyper-parameters must be numbers (got {value!r})")


def build_optimizer(model: nn.Module, rule: Any, lr: float | None, fused: bool = False) -> torch.optim.Optimizer:
    """torch.optim for the spec's outer rule; weight decay only on matrices (not norms/biases).
    ``fused``: torch's fused kernels (one or two launches for every parameter, and an update that
    a device-side ``found_inf`` flag can skip without a host sync; ``Steps`` relies on that);
    where the parameters do not allow them, torch's default (``foreach`` on CUDA)."""
    from nestlearn.rules import RULES

    name = rule.name
    outer_rules = [n for n, entry in RULES.items() if entry.cls.usable_as_outer]
    if name not in outer_rules:
        raise TrainError(f"levels.<outer>.rule.name: '{name}' cannot train the outer level; "
                         f"use one of {', '.join(outer_rules)}")
    base_lr = lr if lr is not None else _hyper(rule.lr, "lr")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainError("the model has no trainable parameters")
    if name in ("sgd", "momentum"):
        decay = _hyper(getattr(rule, "decay", 0.0), "decay")
        groups = _groups(params, decay / base_lr if decay else 0.0)  # W <- (1 - decay) W at the base lr
        beta = _hyper(rule.beta, "beta") if name == "momentum" else 0.0
        return _fused_or_default(torch.optim.SGD, groups, fused, lr=base_lr, momentum=beta)
    groups = _groups(params, float(rule.weight_decay))
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return _fused_or_default(cls, groups, fused, lr=base_lr, betas=(rule.b1, rule.b2), eps=rule.eps)


def _fused_or_default(cls: type[torch.optim.Optimizer], groups: list[dict[str, Any]], fused: bool,
                      **kw: Any) -> torch.optim.Optimizer:
    # torch checks a fused optimizer's parameters only at its first step: check them here
    if fused and all(p.is_floating_point() and not p.is_sparse for g in groups for p in g["params"]):
        try:
            return cls(groups, fused=True, **kw)  # type: ignore[call-arg]
        except (RuntimeError, ValueError):  # a parameter fused kernels do not take (dtype, device)
            pass
    return cls(groups, **kw)  # type: ignore[call-arg]


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return all(bool(g.get("fused")) for g in optimizer.param_groups)


def keep_kernels(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """After ``load_state_dict`` (which takes the saved groups' ``fused`` / ``foreach``): this
    run's kernel choice again, with each ``step`` counter where those kernels want it (on the
    parameter's device for fused ones; on the CPU otherwise, as a fresh optimizer keeps it: a
    counter on the GPU made the plain kernels read it back to the host at every step)."""
    for group in optimizer.param_groups:
        if "fused" in group:
            group["fused"] = fused
            if fused:
                group["foreach"] = None
        on_device = fused or bool(group.get("capturable"))
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.to(p.device if on_device else "cpu", torch.float32)


def _groups(params: list[nn.Parameter], decay: float) -> list[dict[str, Any]]:
    mats = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return [g for g in ({"params": mats, "weight_decay": decay}, {"params": rest, "weight_decay": 0.0})
            if g["params"]]


def lr_at(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio * base`` at ``total``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_model(spec: Any) -> nn.Module:
    """Validate the level graph and compile the spec (every failure is a SpecError/TrainError)."""
    from nestlearn.compile import compile_spec
    from nestlearn.graph import build_graph

    graph = build_graph(spec)  # its SpecError passes through as it is
    try:
        return compile_spec(graph)
    except (SpecError, TrainError):
        raise
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise TrainError(f"cannot build a model from spec '{spec.name}': {e}") from None
