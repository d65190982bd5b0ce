"""The outer loop: the slowest level of a spec, trained across sequences with torch.optim.

Every faster level learns inside ``model(tokens)`` (its inner loop is part of the forward pass);
this file is the ordinary training loop around it:

    for step in range(start, steps):
        batch = task.batch_at(step)                   # a pure function of the step: resumable
        for micro in batch.shard(rank).split(accum):  # data parallel x gradient accumulation
            logits, state = model(micro.inputs)       # the in-context levels run here
            (sum of token losses / global token count).backward()
        clip, optimizer.step() at lr(step)            # warm-up + cosine
        log, evaluate, checkpoint

A non-finite loss stops the run, names the level whose memory state diverged first and keeps
the last good checkpoint. Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and
returns with ``status == "interrupted"``.
"""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.loops import stats as inner_stats
from nestlearn.spec.errors import SpecError
from nestlearn.tasks import Batch, Task, TaskError, get_task
from nestlearn.train import distributed as D
from nestlearn.train import loggers
from nestlearn.train.checkpoint import (
    CheckpointError,
    check_continues,
    load_checkpoint,
    restore_model,
    rng_state,
    save_checkpoint,
    set_rng_state,
    tree_to,
)
from nestlearn.train.compiling import Compiled, compile_model, inner_loop_ops
from nestlearn.train.config import DEFAULT_STEPS, TrainConfig
from nestlearn.train.cuda_graph import NOTE as CUDA_GRAPH_NOTE
from nestlearn.train.cuda_graph import CaptureFailed, GraphedStep, check_supported
from nestlearn.train.errors import DivergedError, TrainError
from nestlearn.train.metrics import TIMING_KEYS, MetricsLog, first_nonfinite, trace_nonfinite
from nestlearn.train.rundir import RunDir

_T = TypeVar("_T")


# ----------------------------------------------------------------------------- reporting


class Reporter(Protocol):
    """Hooks for progress display (the CLI's rich bar)."""

    def start(self, info: dict[str, Any]) -> None: ...

    def step(self, record: dict[str, Any]) -> None: ...

    def eval(self, record: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...

    def end(self, summary: dict[str, Any]) -> None: ...


class SilentReporter:
    """Shows nothing (the default)."""

    def start(self, info: dict[str, Any]) -> None:
        pass

    def step(self, record: dict[str, Any]) -> None:
        pass

    def eval(self, record: dict[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def end(self, summary: dict[str, Any]) -> None:
        pass


# ----------------------------------------------------------------------------- building blocks


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
    """The autocast dtype (None: plain fp32). ``auto``: bf16 on a CUDA device that has it."""
    if name == "fp32":
        return None
    if device.type != "cuda":
        if name == "auto":
            return None
        raise TrainError(f"--precision {name}: mixed precision needs a CUDA device; use --precision fp32 on CPU")
    if name == "fp16":
        return torch.float16
    if name == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


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
        if not str(config.data).strip():
            raise TrainError("--data: the path is empty; give a text file or folder (or leave --data out "
                             "to train on the Python standard library's sources)")
        options["data"] = config.data
    return get_task(config.task, **options)


def _hyper(value: Any, what: str) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    raise TrainError(f"levels.<outer>.rule.{what}: the outer level is trained by torch.optim, so its "
                     f"hyper-parameters must be numbers (got {value!r})")


def build_optimizer(model: nn.Module, rule: Any, lr: float | None) -> torch.optim.Optimizer:
    """torch.optim for the spec's outer rule; weight decay only on matrices (not norms/biases)."""
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
        return torch.optim.SGD(groups, lr=base_lr, momentum=beta)
    groups = _groups(params, float(rule.weight_decay))
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(groups, lr=base_lr, betas=(rule.b1, rule.b2), eps=rule.eps)


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


def _detach(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def build_model(spec: Any) -> nn.Module:
    """Validate the level graph and compile the spec (every failure is a SpecError/TrainError)."""
    from nestlearn.compile import compile_spec
    from nestlearn.graph import build_graph

    build_graph(spec)
    try:
        return compile_spec(spec)
    except (SpecError, TrainError):
        raise
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise TrainError(f"cannot build a model from spec '{spec.name}': {e}") from None


def _inner_detail(entry: dict[str, list[Tensor]] | None) -> str:
    """What ``loops.stats`` saw of a diverging level's first non-finite inner step, if anything."""
    if not entry:
        return ""
    for loss, norm in zip(entry.get("inner_loss", []), entry.get("update_norm", []), strict=False):
        before, size = float(loss), float(norm)
        if not math.isfinite(before):
            return f": its inner loss was already {before} at the state it started from"
        if not math.isfinite(size):
            return f": its inner loss was {before:.4g} before the update, the update's norm is {size}"
    return ""


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """One training run of ``spec`` under ``config``, writing to the run directory ``out``."""

    def __init__(self, spec: Any, config: TrainConfig, out: str | Path, resume: bool = False,
                 reporter: Reporter | None = None):
        self.spec, self.config, self.resume = spec, config, resume
        self.run = RunDir(out)
        self.reporter: Reporter = reporter or SilentReporter()
        self._stop = False

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.config
        cfg.check()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        check_supported(cfg.cuda_graph, cfg.device, D.env_world())
        device = resolve_device(cfg.device)
        self.dist = D.init_distributed(device.type == "cuda")
        if device.type == "cuda" and self.dist.enabled:
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        self.amp_dtype = resolve_precision(cfg.precision, device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        seed_everything(cfg.seed, cfg.deterministic)

        self.task = build_task(cfg)
        self.total = cfg.steps or int(getattr(self.task, "total_steps", 0) or 0) or DEFAULT_STEPS
        self.warmup = cfg.warmup if cfg.warmup is not None else min(100, round(0.05 * self.total))
        self.eval_every = cfg.eval_every or max(1, self.total // 4)
        self.ckpt_every = cfg.ckpt_every or max(1, self.total // 10)
        world = self.dist.world
        if cfg.batch % (world * cfg.accum):
            raise TrainError(f"--batch {cfg.batch} must be divisible by the number of processes ({world}) "
                             f"times --accum ({cfg.accum})")
        if cfg.carry_state and world > 1:
            raise TrainError("--carry-state is not supported with several processes (each rank would carry "
                             "a different state); run it in one process")
        if cfg.stop_at is not None and cfg.stop_at > self.total:
            raise TrainError(f"--stop-at {cfg.stop_at} is past the end of the run (--steps {self.total})")
        if cfg.warmup is not None and cfg.warmup > self.total:
            raise TrainError(f"--warmup {cfg.warmup} is longer than the run (--steps {self.total}): the learning "
                             f"rate would never reach its peak; give at most {self.total} warm-up steps")

        self.model = build_model(self.spec).to(device)
        outer = self.spec.outer_level
        self.optimizer = build_optimizer(self.model, self.spec.levels[outer].rule, cfg.lr)
        self.base_lr = self.optimizer.param_groups[0]["lr"]
        if self.dist.is_main:
            loggers.check_available(cfg.tensorboard, cfg.wandb)
        self.metrics = MetricsLog(self.run.metrics_path, enabled=self.dist.is_main)
        self.run.prepare(self.spec, cfg, self.resume, write=self.dist.is_main, task=self.task.describe())
        if self.dist.is_main:
            self.metrics.loggers = loggers.build(cfg.tensorboard, cfg.wandb, self.run.path, self.run.path.name,
                                                 {"spec": self.spec.name, **cfg.to_dict()})
        D.barrier(self.dist)

        self.step = 0
        self.carry: list[Any] | None = [None] * cfg.accum if cfg.carry_state else None
        self.phase_rows: list[list[float]] = []
        self.last_ckpt_step: int | None = None
        self.tokens_before = 0
        self.first_loss: float | None = None
        """The loss of step 1 (kept across resumes: the summary's train loss starts there)."""
        if self.resume:
            self._restore()

        self.fwd: nn.Module = D.wrap(self.model, self.dist, device, unused=self._has_unused())
        self.eval_set = self.task.eval_batches(cfg.batch, cfg.seq_len, cfg.eval_batches, cfg.seed)
        self.graphed: GraphedStep | None = None
        if cfg.cuda_graph:  # captured at the first step that uses it
            self.graphed = GraphedStep(self.model, self.amp_dtype, scaled=self.scaler is not None)
        self._graph_said: set[str] = set()
        # last in setup: it switches process-wide state (the compiled chunk steps) that only
        # fit's ``finally`` releases, so nothing after it may fail
        self.compiled: Compiled | None = None
        if cfg.compile:
            # under --cuda-graph only the chunk steps: the graph captures the rest as it runs
            self.compiled = compile_model(self.model, self.fwd, outer=not cfg.cuda_graph)
            self.fwd = self.compiled.fwd

    def _launch_bound_hint(self) -> bool:
        """Say once that --cuda-graph exists: a single CUDA process, no graph asked for, and a spec
        with in-context levels (its eager step is launch-bound)."""
        return (self.device.type == "cuda" and not self.dist.enabled and not self.config.carry_state
                and next(inner_loop_ops(self.model), None) is not None)

    def _has_unused(self) -> bool:
        """Does any trainable parameter get no gradient from a (one-row) batch? DDP must know."""
        if not self.dist.enabled:
            return False
        b = self.task.batch_at(0, 1, self.config.seq_len, self.config.seed).to(self.device)
        with self._autocast():
            logits, _ = self.model(b.inputs)
        logits.float().sum().backward()
        unused = any(p.grad is None for p in self.model.parameters() if p.requires_grad)
        self.model.zero_grad(set_to_none=True)
        return unused

    def _restore(self) -> None:
        ck = load_checkpoint(self.run.last_checkpoint, self.spec)
        restore_model(self.model, ck)
        if ck.optimizer is not None:
            try:
                self.optimizer.load_state_dict(tree_to(ck.optimizer, self.device))
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"checkpoint {ck.path}: its optimizer state does not fit this run's "
                                      f"optimizer ({e}); was the outer rule changed?") from None
        if self.scaler is not None and ck.scaler:
            self.scaler.load_state_dict(ck.scaler)
        cfg = self.config
        check_continues(ck, {"task": self.task.describe(), "seed": cfg.seed, "batch": cfg.batch,
                             "seq_len": cfg.seq_len}, self.total)
        if cfg.carry_state:
            carry = ck.carry if isinstance(ck.carry, list) and len(ck.carry) == cfg.accum else None
            self.carry = tree_to(carry, self.device) if carry else [None] * cfg.accum
        set_rng_state(ck.rng_tensors, ck.rng_meta)
        self.step = ck.step
        self.last_ckpt_step = ck.step
        self.tokens_before = int(ck.extra.get("tokens", 0))
        self.metrics.truncate_after(ck.step)
        self.first_loss = self._first_loss(ck.extra.get("first_loss"))
        self.phase_rows = [list(r) for r in ck.extra.get("phase_rows", [])]

    def _first_loss(self, saved: Any) -> float | None:
        """Step 1's loss for a resumed run: from the checkpoint, else from metrics.jsonl (older
        checkpoints), else None (step 1 was not logged)."""
        if isinstance(saved, (int, float)) and not isinstance(saved, bool):
            return float(saved)
        for rec in self.run.metrics():
            if rec.get("split") == "train" and rec.get("step") == 1 and isinstance(rec.get("loss"), (int, float)):
                return float(rec["loss"])
        return None

    # ---------------------------------------------------------------- pieces of a step
    def _autocast(self) -> AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def lr(self, step: int) -> float:
        cfg = self.config
        return lr_at(step, self.total, self.base_lr, self.warmup, cfg.min_lr_ratio)

    def _micro(self, mb: Batch, n_tok: float, i: int, sync: bool) -> tuple[Tensor, Any]:
        """Forward + backward of one micro-batch; returns ``[loss sum, correct]`` (detached)."""
        state = self.carry[i] if self.carry is not None else None
        with D.no_sync(self.fwd, sync):
            with self._autocast():
                logits, new_state = self.fwd(mb.inputs, state)
            ce = F.cross_entropy(logits.float().flatten(0, 1), mb.targets.flatten(), reduction="none")
            mask = mb.mask.flatten().to(ce.dtype)
            ce_sum = (ce * mask).sum()
            loss = ce_sum * (self.dist.world / n_tok)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        with torch.no_grad():
            correct = ((logits.argmax(-1).flatten() == mb.targets.flatten()).to(ce.dtype) * mask).sum()
        new_state = _detach(new_state)
        if self.carry is not None:
            self.carry[i] = new_state
        return torch.stack([ce_sum.detach(), correct]), new_state

    def _graph_scale(self) -> Tensor | None:
        """The GradScaler's current scale as a device scalar (no host sync), or None without one."""
        if self.scaler is None:
            return None
        return self.scaler.scale(torch.ones((), device=self.device))

    def _graph_once(self, key: str, text: str) -> None:
        if key not in self._graph_said:
            self._graph_said.add(key)
            self.reporter.message(text)

    def _graph_this_step(self, step: int, log: bool, local: Batch, n_tok: float) -> bool:
        """Does this step replay the CUDA graph (capturing it first if need be)? No (eager) when
        there is none or when its micro-batches' shape is not the captured one. A step that
        records per-level stats replays it too, and takes the stats from a no-grad forward
        (``_stats_forward``): an eager training step beside the graph's memory pool ran a
        full-size HOPE out of memory on an 80 GB card."""
        g = self.graphed
        if g is None:
            return False
        done = step + 1
        first = local.split(self.config.accum)[0]
        if not g.fits(first):
            self._graph_once("shape", f"--cuda-graph: step {done}'s micro-batch has shape {list(first.inputs.shape)}, "
                                      "not the captured one; such steps run eagerly")
            return False
        if g.captured:
            return True
        try:
            g.capture(first.to(self.device, non_blocking=True), self.dist.world / n_tok, self._graph_scale())
        except CaptureFailed as e:
            self.graphed = None
            self.reporter.message(f"--cuda-graph: capturing the training step in a CUDA graph failed ({e}); "
                                  "continuing without it (the results are the same, only slower)")
            return False
        return True

    def records_stats(self, step: int) -> bool:
        """Does a graphed log step also record the per-level stats? At evaluation steps and the
        last one (the others: the graph's replay alone, no extra forward)."""
        done = step + 1
        return done % self.eval_every == 0 or done == self.total

    def _stats_forward(self, local: Batch) -> dict[str, dict[str, list[Tensor]]]:
        """The per-level stats of a replayed step: the same micro-batches through the model
        without a graph or autograd, at the parameters the replay used (before the optimizer
        step), so they equal an eager step's."""
        with torch.no_grad(), self._autocast(), inner_stats.collect() as collected:
            for mb in local.split(self.config.accum):
                self.model(mb.inputs.to(self.device, non_blocking=True))
        return collected

    def _graphed_micro(self, mb: Batch, n_tok: float, i: int) -> tuple[Tensor, Any]:
        """``_micro`` by replaying the captured graph; the gradients are summed into ``.grad``."""
        assert self.graphed is not None
        out, state = self.graphed.run(mb, self.dist.world / n_tok, self._graph_scale())
        self.graphed.install_grads(i, self.config.accum)
        return out, state

    def is_log_step(self, step: int) -> bool:
        """Is ``step`` (0-based) one whose record goes to metrics.jsonl?"""
        return (step + 1) % self.config.log_every == 0 or step + 1 == self.total

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step. Under ``--compile``, a failure of the compiled forward or backward
        switches the run to eager execution (said once) and redoes the step from the same state."""
        if self.compiled is None or not self.compiled.active:
            return self._train_step(step)
        carry = list(self.carry) if self.carry is not None else None
        rng = rng_state()
        try:
            return self._train_step(step)
        except (DivergedError, TrainError, TaskError, torch.OutOfMemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - the compiler's failures have many types
            self.reporter.message(self.compiled.fall_back(e))
            self.fwd = self.compiled.fwd
            self.optimizer.zero_grad(set_to_none=True)
            self.carry = carry
            set_rng_state(*rng)
            return self._train_step(step)

    def _train_step(self, step: int) -> dict[str, Any]:
        cfg = self.config
        lr = self.lr(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        batch = self.task.batch_at(step, cfg.batch, cfg.seq_len, cfg.seed)
        n_tok = max(float(batch.mask.sum()), 1.0)
        local = batch.shard(self.dist.rank, self.dist.world) if self.dist.enabled else batch
        sums = torch.zeros(2, device=self.device)
        states = []
        log = self.is_log_step(step)
        graphed = self._graph_this_step(step, log, local, n_tok)
        # at log steps the inner loops also record each level's inner loss and update norm
        # (one extra no-grad objective evaluation per memory); other steps record nothing.
        # A replayed CUDA graph records nothing: such a step's stats come from _stats_forward.
        recording: AbstractContextManager[dict[str, dict[str, list[Tensor]]]] = (
            inner_stats.collect() if log and not graphed else nullcontext({}))
        with recording as collected:
            for i, mb in enumerate(local.split(cfg.accum)):
                mb = mb.to(self.device, non_blocking=True)
                if graphed:
                    s, st = self._graphed_micro(mb, n_tok, i)
                else:
                    s, st = self._micro(mb, n_tok, i, sync=i == cfg.accum - 1)
                sums += s
                states.append(st)
        if log and graphed and self.records_stats(step):
            collected = self._stats_forward(local)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        gn = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
        flags = torch.tensor([1.0 if self._stop else 0.0], device=self.device)
        stats = D.all_reduce_sum(torch.cat([sums, flags]), self.dist)
        loss_sum, correct, stop = stats.tolist()  # the step's one host sync
        gnorm = float(gn)
        self._stop = self._stop or stop > 0
        loss = loss_sum / n_tok
        if not math.isfinite(loss) or (self.scaler is None and not math.isfinite(gnorm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(step + 1, loss, gnorm, states, local)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        rec: dict[str, Any] = {"step": step + 1, "split": "train", "loss": loss}
        if self.task.kind == "lm":
            rec["bits_per_byte"] = loss / math.log(2)
        else:
            rec["accuracy"] = correct / n_tok
        rec["lr"] = lr
        rec["grad_norm"] = gnorm
        if log:
            levels = inner_stats.summarize(collected)
            if levels:
                rec["levels"] = levels
        return rec

    def _diverged(self, step: int, loss: float, gnorm: float, states: list[Any], local: Batch) -> DivergedError:
        """Name where the divergence began: replay the step's micro-batches watching every op's
        output and state; else the first non-finite carried state; else the outer level."""
        where = None
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        recorded: dict[str, dict[str, list[Tensor]]] = {}
        try:
            if bad:
                raise RuntimeError("the weights themselves are non-finite")
            with self._autocast(), inner_stats.collect() as recorded:
                inputs = [mb.inputs.to(self.device) for mb in local.split(self.config.accum)]
                where = trace_nonfinite(self.model, inputs)
        except Exception:  # noqa: BLE001 - a diagnosis must not hide the divergence itself
            where = None
        for st in states:
            if where is not None:
                break
            where = first_nonfinite(self.model, st)
        what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {gnorm}"
        if where is not None and where[2] is not None:
            blk, node, level = where
            detail = _inner_detail(recorded.get(level or ""))
            cause = (f"the inner update of level '{level}' diverged first (block {blk}, node '{node}' produced "
                     f"non-finite values{detail}); lower that level's rate (e.g. levels.{level}.rule.lr=...), use "
                     "grad: truncate:N for it, or lower the outer --lr")
        elif where is not None:
            blk, node, _ = where
            cause = f"node '{node}' of block {blk} produced non-finite values; try a lower --lr"
            level = None
        else:
            level = self.spec.outer_level
            what_outer = f"its weights ({bad[0]}, ...)" if bad else "its weights or gradients"
            cause = (f"every in-context memory stayed finite, so the outer level '{level}' diverged "
                     f"({what_outer}); try a lower --lr or a smaller --clip")
        if self.last_ckpt_step is not None:
            keep = f"the last good checkpoint is kept: {self.run.last_checkpoint} (step {self.last_ckpt_step})"
        else:
            keep = "no checkpoint had been written yet"
        msg = f"training diverged at step {step}: {what}; {cause}. Nothing was saved after the divergence; {keep}."
        return DivergedError(msg, step, level)

    # ---------------------------------------------------------------- evaluation & checkpoints
    def model_fn(self) -> Callable[[Tensor], Tensor]:
        def fn(x: Tensor) -> Tensor:
            with self._autocast():
                return self.model(x)[0].float()  # type: ignore[no-any-return]

        return fn

    def _eval_or_fall_back(self, run: Callable[[], _T]) -> _T:
        """``run`` (an evaluation); under ``--compile`` a compiler failure met there first (the
        chunk step's no-grad variant is compiled at the first evaluation) switches the run to
        eager execution as in ``train_step`` and evaluates again."""
        if self.compiled is None or not self.compiled.active:
            return run()
        try:
            return run()
        except (DivergedError, TrainError, TaskError, torch.OutOfMemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - the compiler's failures have many types
            self.reporter.message(self.compiled.fall_back(e))
            self.fwd = self.compiled.fwd
            return run()

    def evaluate(self, step: int) -> dict[str, Any]:
        metrics = self._eval_or_fall_back(lambda: self.task.evaluate(self.model_fn(), self.eval_set, self.device))
        rec = {"step": step, "split": "val", **metrics}
        self.metrics.log(rec)
        self.reporter.eval(rec)
        return rec

    def _phase_eval(self, step: int) -> None:
        ends = getattr(self.task, "phase_ends", None)
        if ends is None or step not in ends():
            return
        cfg = self.config
        per = self._eval_or_fall_back(lambda: self.task.evaluate_domains(  # type: ignore[attr-defined]
            self.model_fn(), cfg.batch, cfg.seq_len, cfg.eval_batches, cfg.seed, self.device))
        phase = ends().index(step)
        self.phase_rows.append([per[d]["loss"] for d in self.task.domains])  # type: ignore[attr-defined]
        rec = {"step": step, "split": "phase", "phase": phase,
               "domain": self.task.phases[phase], "domains": per}  # type: ignore[attr-defined]
        self.metrics.log(rec)
        self.reporter.eval(rec)

    def save(self, step: int, tokens: int) -> Path | None:
        if not self.dist.is_main:
            return None
        cfg = self.config
        data = {"task": self.task.describe(), "seed": cfg.seed, "batch": cfg.batch, "seq_len": cfg.seq_len,
                "step": step}
        path = save_checkpoint(
            self.run.last_checkpoint, model=self.model, spec=self.spec, step=step, optimizer=self.optimizer,
            carry=self.carry, data=data, scaler=self.scaler.state_dict() if self.scaler is not None else None,
            extra={"tokens": tokens, "phase_rows": self.phase_rows, "total_steps": self.total,
                   "first_loss": self.first_loss},
        )
        self.last_ckpt_step = step
        return path

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train to ``steps`` (or ``stop_at``, or Ctrl-C); returns the summary (also in summary.json)."""
        self.setup()
        clean = False
        try:
            summary = self._fit()
            clean = True
            return summary
        finally:
            if self.compiled is not None:
                self.compiled.release()
            if hasattr(self, "metrics"):
                self.metrics.close()
            D.shutdown(clean)

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        per_step = cfg.batch * cfg.seq_len
        start = self.step
        self.reporter.start({
            "spec": self.spec.name, "task": self.task.describe(), "params": self.model.num_parameters(),  # type: ignore[operator]
            "device": str(self.device), "precision": str(self.amp_dtype or "fp32").replace("torch.", ""),
            "world": self.dist.world, "start": start, "total": self.total, "run_dir": str(self.run.path),
            "tokens_per_step": per_step, "levels": self.model.level_summary(),  # type: ignore[operator]
        })
        if self.compiled is not None:
            self.reporter.message(self.compiled.note)
        if self.graphed is not None:
            self.reporter.message(CUDA_GRAPH_NOTE)
        elif self._launch_bound_hint():
            self.reporter.message(
                "hint: on a GPU, a spec with in-context levels is bound by kernel launches (every chunk of every "
                "memory is its own small kernels); --cuda-graph replays the step from a CUDA graph (HOPE trained "
                "10x faster with it on an H200) and --compile --cuda-graph also fuses the chunk steps")
        if start >= self.total:
            self.reporter.message(f"the run is already complete at step {start} of {self.total}; "
                                  "nothing to do (raise --steps to train longer)")
            done_summary = self.run.summary() or self._summary("done", start, self.tokens_before, 0.0, None, {}, {})
            self.reporter.end(done_summary)
            return done_summary
        status, error = "done", None
        last_train: dict[str, Any] = {}
        last_val: dict[str, Any] = {}
        t_start = time.perf_counter()
        tokens = self.tokens_before + 0
        restore = self._install_signals()
        try:
            self.model.train()
            for step in range(start, self.total):
                if self._stop:
                    status = "interrupted"
                    break
                try:
                    rec = self.train_step(step)
                except DivergedError as e:
                    status, error = "diverged", e
                    break
                except torch.OutOfMemoryError:
                    raise TrainError(
                        f"out of {self.device.type} memory at step {step + 1} (batch {cfg.batch} x {cfg.seq_len} "
                        f"bytes in {cfg.accum} micro-batch(es)); lower --batch or --seq-len, or raise --accum"
                    ) from None
                done = step + 1
                tokens += per_step
                if done == 1:
                    self.first_loss = rec["loss"]
                self._timing(rec, tokens, t_start, sync=self.is_log_step(step))
                if self.is_log_step(step):
                    self.metrics.log(rec)
                last_train = rec
                self.reporter.step(rec)
                self.step = done
                if self.dist.is_main:
                    if done % self.eval_every == 0 or done == self.total:
                        last_val = self.evaluate(done)
                    self._phase_eval(done)
                    stopping = self._stop or done == cfg.stop_at
                    if done % self.ckpt_every == 0 or done == self.total or stopping:
                        self.save(done, tokens)
                if done == cfg.stop_at:
                    status = "stopped"
                    break
            if status == "interrupted" and self.last_ckpt_step != self.step and self.dist.is_main:
                self.save(self.step, tokens)
        finally:
            restore()
        elapsed = time.perf_counter() - t_start
        summary = self._summary(status, start, tokens, elapsed, self.first_loss, last_train, last_val)
        if self.dist.is_main:
            self.run.write_summary(summary)
        self.reporter.end(summary)
        if error is not None:
            raise error
        return summary

    def _timing(self, rec: dict[str, Any], tokens: int, t_start: float, sync: bool) -> None:
        """The wall-clock fields of a step's record: ``tokens`` (trained in the whole run),
        ``time`` (seconds since this session's first step began) and ``tokens_per_s`` = this
        session's tokens / ``time``: everything included (evaluation, checkpoints, compilation,
        graph capture), so it agrees with a stopwatch, the progress line and the summary. With
        ``sync`` (logged steps) a GPU's queued work is waited for before the clock is read."""
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - t_start, 1e-9)
        rec["tokens"] = tokens
        rec["time"] = elapsed
        rec["tokens_per_s"] = (tokens - self.tokens_before) / elapsed

    def _summary(self, status: str, start: int, tokens: int, elapsed: float, first_loss: float | None,
                 last_train: dict[str, Any], last_val: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        done = self.step - start
        s: dict[str, Any] = {
            "status": status, "spec": self.spec.name, "task": self.task.describe(), "run_dir": str(self.run.path),
            "params": self.model.num_parameters(),  # type: ignore[operator]
            "device": str(self.device), "world": self.dist.world, "step": self.step, "steps": self.total,
            "steps_this_session": done, "tokens": tokens, "time_s": elapsed,
            "tokens_per_s": done * cfg.batch * cfg.seq_len / elapsed if elapsed > 0 and done else None,
            "first_loss": first_loss,
            "train": {k: v for k, v in last_train.items() if k not in TIMING_KEYS},
            "val": last_val,
            "checkpoint": str(self.run.last_checkpoint) if self.last_ckpt_step is not None else None,
            "checkpoint_step": self.last_ckpt_step,
        }
        if self.phase_rows and hasattr(self.task, "forgetting") and len(self.phase_rows) == len(self.task.phases):  # type: ignore[attr-defined]
            s["forgetting"] = self.task.forgetting(self.phase_rows)  # type: ignore[attr-defined]
            s["phase_losses"] = self.phase_rows
        return s

    def _install_signals(self) -> Callable[[], None]:
        """First Ctrl-C / SIGTERM: finish the step, save, stop. A second Ctrl-C aborts at once."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            self._stop = True
            self.reporter.message("stopping after this step and saving a checkpoint "
                                  "(press Ctrl-C again to abort without saving)")
            signal.signal(signal.SIGINT, signal.default_int_handler)

        for s in previous:
            signal.signal(s, handler)

        def restore() -> None:
            for s, h in previous.items():
                signal.signal(s, h)

        return restore


def train(spec: Any, config: TrainConfig, out: str | Path, resume: bool = False,
          reporter: Reporter | None = None) -> dict[str, Any]:
    """Train ``spec`` (a ``Spec``) under ``config`` into the run directory ``out``; see ``Trainer``."""
    return Trainer(spec, config, out, resume, reporter).fit()


__all__ = ["Reporter", "SilentReporter", "Trainer", "train", "lr_at", "build_optimizer", "build_task", "build_model",
           "resolve_device", "resolve_precision", "TaskError"]
