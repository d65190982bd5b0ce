"""One optimizer step of the outer loop: the micro-batches' forward and backward (eager or
replayed from a CUDA graph), clipping, the optimizer, and the diagnosis of a divergence.

``Steps`` is the part of :class:`nestlearn.train.loop.Trainer` that runs a step; the trainer
sets up every attribute declared here (``Trainer.setup``).

A step is queued (``train_step``) and then read (``finish``). With ``lag`` (one CUDA process,
a fused optimizer, no GradScaler) the host reads a step's numbers (loss, accuracy, gradient
norm) only after it has queued the next one, from a pinned copy, so it never waits for the
device between steps. The divergence check then comes a step late, and the update it would
have refused must not happen: every step's finiteness goes into a device flag (``_bad``,
sticky) that the fused optimizer takes as ``found_inf`` and so skips its update, as a
GradScaler's optimizer does. A diverged step therefore leaves the weights and the optimizer
state as they were before it, as the synchronous check does, and ``_diverged`` diagnoses it on
its own batch. Steps that evaluate, checkpoint or end the run are read at once (``Trainer``).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.compile.model import CompiledModel
from nestlearn.loops import stats as inner_stats
from nestlearn.tasks import Batch, Task, TaskError
from nestlearn.train import distributed as D
from nestlearn.train.batches import Batches
from nestlearn.train.build import lr_at
from nestlearn.train.checkpoint import rng_state, set_rng_state
from nestlearn.train.compiling import Compiled
from nestlearn.train.config import TrainConfig
from nestlearn.train.cuda_graph import CaptureFailed, GraphedStep
from nestlearn.train.errors import DivergedError, TrainError
from nestlearn.train.metrics import first_nonfinite, trace_nonfinite
from nestlearn.train.reporting import Reporter
from nestlearn.train.rundir import RunDir


def _detach(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def phase(name: str) -> torch.profiler.record_function:
    """A named range of the training step (``nestlearn.<name>``) in a torch.profiler trace:
    ``python -m bench.trainer_profile`` sums them to show where a step's time goes."""
    return torch.profiler.record_function(f"nestlearn.{name}")


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


@dataclass
class Queued:
    """A step whose update is queued on the device; ``Steps.finish`` reads its numbers."""

    step: int
    lr: float
    n_tok: float
    log: bool
    values: Tensor
    """``[loss sum, correct, gradient norm]`` on the host once ``ready`` has fired."""
    ready: torch.cuda.Event | None
    local: Batch
    """This process's rows of the batch (on the device), for the diagnosis of a divergence."""
    states: list[Any] = field(default_factory=list)
    collected: dict[str, dict[str, list[Tensor]]] = field(default_factory=dict)


class Steps:
    """The step machinery of a ``Trainer`` (see :mod:`nestlearn.train.loop`)."""

    spec: Any
    config: TrainConfig
    run: RunDir
    reporter: Reporter
    task: Task
    model: nn.Module
    fwd: nn.Module
    device: torch.device
    dist: D.DistInfo
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    optimizer: torch.optim.Optimizer
    compiled: Compiled | None
    graphed: GraphedStep | None
    carry: list[Any] | None
    total: int
    warmup: int
    eval_every: int
    base_lr: float
    last_ckpt_step: int | None
    batches: Batches
    params: list[nn.Parameter]
    lag: bool
    """Read each step's numbers a step late (see the module's docstring)."""
    _bad: Tensor | None
    _stop: bool
    _said_once: set[str]

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
            self.carry[i] = cast(CompiledModel, self.model).carried(new_state)
        return torch.stack([ce_sum.detach(), correct]), new_state

    def _graph_scale(self) -> Tensor | None:
        """The GradScaler's current scale as a device scalar (no host sync), or None without one."""
        if self.scaler is None:
            return None
        return self.scaler.scale(torch.ones((), device=self.device))

    def _say_once(self, key: str, text: str) -> None:
        """``text`` through the reporter, the first time ``key`` comes up in this run."""
        if key not in self._said_once:
            self._said_once.add(key)
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
            self._say_once("shape", f"--cuda-graph: step {done}'s micro-batch has shape {list(first.inputs.shape)}, "
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

    def train_step(self, step: int) -> Queued:
        """Queue one optimizer step (``finish`` reads it). Under ``--compile``, a failure of the
        compiled forward or backward switches the run to eager execution (said once) and redoes
        the step from the same state."""
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

    def _train_step(self, step: int) -> Queued:
        cfg = self.config
        lr = self.lr(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with phase("data"):
            local, n_tok = self.batches.get(step)
        sums: Tensor | None = None
        states = []
        log = self.is_log_step(step)
        graphed = self._graph_this_step(step, log, local, n_tok)
        # at log steps the inner loops also record each level's inner loss and update norm
        # (one extra no-grad objective evaluation per memory); other steps record nothing.
        # A replayed CUDA graph records nothing: such a step's stats come from _stats_forward.
        recording: AbstractContextManager[dict[str, dict[str, list[Tensor]]]] = (
            inner_stats.collect() if log and not graphed else nullcontext({}))
        with recording as collected, phase("forward_backward"):
            for i, mb in enumerate(local.split(cfg.accum)):
                if graphed:
                    s, st = self._graphed_micro(mb, n_tok, i)
                else:
                    s, st = self._micro(mb, n_tok, i, sync=i == cfg.accum - 1)
                sums = s.clone() if sums is None else sums + s  # clone: a replay's output is overwritten
                states.append(st)
        assert sums is not None
        if log and graphed and self.records_stats(step):
            collected = self._stats_forward(local)
        with phase("clip"):
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            gn = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip if cfg.clip > 0 else float("inf"))
        q = Queued(step, lr, n_tok, log, sums, None, local, states, collected)
        if self.lag:
            self._lagged_update(q, gn)
        else:
            self._synced_update(q, gn)
        if step + 1 < self.total:
            self.batches.prefetch(step + 1)
        return q

    def _synced_update(self, q: Queued, gn: Tensor) -> None:
        """Read the step's numbers now (one host sync) and update only if they are finite."""
        with phase("host_sync"):
            flags = torch.tensor([1.0 if self._stop else 0.0], device=self.device) if self.dist.enabled else None
            stats = D.all_reduce_sum(torch.cat([q.values, flags]), self.dist) if flags is not None else q.values
            vals = stats.tolist()  # the step's one host sync
            loss_sum, correct, gnorm = vals[0], vals[1], float(gn)
        if len(vals) > 2:
            self._stop = self._stop or vals[2] > 0
        q.values = torch.tensor([loss_sum, correct, gnorm], dtype=torch.float64)
        if not math.isfinite(loss_sum) or (self.scaler is None and not math.isfinite(gnorm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(q.step + 1, loss_sum / q.n_tok, gnorm, q.states, q.local)
        with phase("optimizer"):
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def _lagged_update(self, q: Queued, gn: Tensor) -> None:
        """Update with no host sync: a non-finite loss or gradient norm, of this step or of any
        earlier one, sets ``_bad``, and the fused optimizer then skips its update (``found_inf``);
        the step's numbers go to pinned host memory, read by ``finish`` a step later."""
        vals = torch.cat([q.values.float(), gn.detach().float().reshape(1)])
        bad = torch.isfinite(vals).all().logical_not().float()  # the count ``correct`` is always finite
        self._bad = bad if self._bad is None else torch.maximum(self._bad, bad)
        with phase("optimizer"):
            self.optimizer.found_inf = self._bad  # type: ignore[attr-defined]
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf  # type: ignore[attr-defined]
            self.optimizer.zero_grad(set_to_none=True)
        if vals.is_cuda:
            q.values = torch.empty(vals.shape, dtype=vals.dtype, pin_memory=True)
            q.values.copy_(vals, non_blocking=True)
            q.ready = torch.cuda.Event()
            q.ready.record()
        else:
            q.values = vals

    def finish(self, q: Queued) -> dict[str, Any]:
        """The record of a queued step (waiting for the device only as far as that step); raises
        ``DivergedError`` if its loss or gradient norm is not finite."""
        with phase("host_sync"):
            if q.ready is not None:
                q.ready.synchronize()
            loss_sum, correct, gnorm = q.values.tolist()
        loss = loss_sum / q.n_tok
        if not math.isfinite(loss) or (self.scaler is None and not math.isfinite(gnorm)):
            raise self._diverged(q.step + 1, loss, gnorm, q.states, q.local)
        rec: dict[str, Any] = {"step": q.step + 1, "split": "train", "loss": loss}
        if self.task.kind == "lm":
            rec["bits_per_byte"] = loss / math.log(2)
        else:
            rec["accuracy"] = correct / q.n_tok
        rec["lr"] = q.lr
        rec["grad_norm"] = gnorm
        if q.log:
            levels = inner_stats.summarize(q.collected)
            if levels:
                rec["levels"] = levels
                self._warn_gains(q.step + 1, levels)
        return rec

    def _warn_gains(self, step: int, levels: dict[str, dict[str, float]]) -> None:
        """Say once per level when its chunk gain passes 1 (``loops/stats.py``): its inner step can
        then overshoot and diverge within a sequence (docs/training-health.md §7). Levels with a
        ``clip`` or ``max_gain`` are bounded per token and not flagged."""
        for name, vals in levels.items():
            gain = vals.get("chunk_gain")
            level = self.spec.levels.get(name)
            if (gain is None or gain <= 1 or level is None or getattr(level, "clip", None) is not None
                    or getattr(level, "max_gain", None) is not None):
                continue
            self._say_once(f"gain:{name}", (
                f"step {step}: level '{name}' has chunk gain {gain:.2f} > 1 at its starting weights (learning rate x "
                "chunk movement x its last layer's squared input): a chunk of tokens pushing the same way overshoots its "
                "objective and the inner loop can diverge (docs/training-health.md, section 7); lower "
                f"levels.{name}.rule.lr, set levels.{name}.max_gain (e.g. 0.5) or levels.{name}.clip, or lower "
                "the outer --lr"))

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
