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

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from nestlearn.compile.model import CompiledModel
from nestlearn.compile.wavefront import streams_enabled
from nestlearn.tasks import ContinualTask, TaskError, domain_perf
from nestlearn.train import distributed as D
from nestlearn.train import loggers, oom
from nestlearn.train.batches import Batches
from nestlearn.train.build import (
    build_model,
    build_optimizer,
    build_task,
    is_fused,
    keep_kernels,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_tf32,
)
from nestlearn.train.carry import EvalState, eval_state_of, evaluation_fn, joined
from nestlearn.train.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    check_continues,
    checkpoint_contents,
    load_checkpoint,
    restore_model,
    set_rng_state,
    tree_to,
)
from nestlearn.train.compiling import Compiled, compile_model, inner_loop_ops
from nestlearn.train.config import DEFAULT_STEPS, TrainConfig
from nestlearn.train.cuda_graph import NOTE as CUDA_GRAPH_NOTE
from nestlearn.train.cuda_graph import GraphedStep, check_supported
from nestlearn.train.errors import DivergedError, TrainError
from nestlearn.train.metrics import TIMING_KEYS, DeadRunWatch, MetricsLog
from nestlearn.train.reporting import Reporter, SilentReporter
from nestlearn.train.rundir import RunDir
from nestlearn.train.step import Queued, Steps, phase

_T = TypeVar("_T")


# ----------------------------------------------------------------------------- the trainer


class Trainer(Steps):
    """One training run of ``spec`` under ``config``, writing to the run directory ``out``.

    The step itself (forward, backward, optimizer, divergence diagnosis) is :class:`Steps`
    (:mod:`nestlearn.train.step`); the pieces it is built from are in :mod:`nestlearn.train.build`."""

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
        # process-wide (the kernels read it at each launch): fit's ``finally`` puts it back
        self._matmul_before, self._tf32_note = set_tf32(cfg.tf32, device)

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
        if cfg.wavefront is not None:
            cast(CompiledModel, self.model).set_wavefront(cfg.wavefront)
        outer = self.spec.outer_level
        self.optimizer = build_optimizer(self.model, self.spec.levels[outer].rule, cfg.lr, fused=self._fuse())
        self.base_lr = self.optimizer.param_groups[0]["lr"]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.lag = self._lags()
        self._bad = None
        self.batches = Batches(lambda k: self.task.batch_at(k, cfg.batch, cfg.seq_len, cfg.seed), device,
                               self.dist.rank, self.dist.world)
        self.writer = CheckpointWriter()
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
        self.phase_rows: list[list[float]] = []  # per phase: each domain's loss (nats)
        self.phase_perf: list[list[float]] = []  # per phase: each domain's performance (domain_perf)
        self.last_ckpt_step: int | None = None
        self.tokens_before = 0
        self.first_loss: float | None = None
        """The loss of step 1 (kept across resumes: the summary's train loss starts there)."""
        self.dead = DeadRunWatch()
        """Says once when the outer gradient has stayed at zero (a run that stopped learning)."""
        if self.resume:
            self._restore()

        self.fwd: nn.Module = D.wrap(self.model, self.dist, device, unused=self._has_unused())
        self.eval_set = self.task.eval_batches(cfg.batch, cfg.seq_len, cfg.eval_batches, cfg.seed)
        self.graphed: GraphedStep | None = None
        if cfg.cuda_graph:  # captured at the first step that uses it
            self.graphed = GraphedStep(self.model, self.amp_dtype, scaled=self.scaler is not None)
        self._said_once: set[str] = set()
        # last in setup: it switches this model's chunk steps to compiled ones, which only fit's
        # ``finally`` switches back, so nothing after it may fail
        self.compiled: Compiled | None = None
        if cfg.compile:
            # under --cuda-graph only the chunk steps: the graph captures the rest as it runs
            self.compiled = compile_model(self.model, self.fwd, outer=not cfg.cuda_graph)
            self.fwd = self.compiled.fwd

    def _fuse(self) -> bool:
        """Fused optimizer kernels: on CUDA (on the CPU, torch's default kernels as before)."""
        return self.device.type == "cuda"

    def _lags(self) -> bool:
        """Read each step's numbers a step late (``step.py``)? Where the host would otherwise
        wait for the device at every step: one CUDA process, and a fused optimizer (it skips a
        diverged step's update on the device) without a GradScaler (which reads the host)."""
        return (self.device.type == "cuda" and not self.dist.enabled and self.scaler is None
                and is_fused(self.optimizer))

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
            fused = is_fused(self.optimizer)
            try:
                self.optimizer.load_state_dict(tree_to(ck.optimizer, self.device))
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"checkpoint {ck.path}: its optimizer state does not fit this run's "
                                      f"optimizer ({e}); was the outer rule changed?") from None
            keep_kernels(self.optimizer, fused)
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
        self.phase_perf = [list(r) for r in ck.extra.get("phase_perf", [])]

    def _first_loss(self, saved: Any) -> float | None:
        """Step 1's loss for a resumed run: from the checkpoint, else from metrics.jsonl (older
        checkpoints), else None (step 1 was not logged)."""
        if isinstance(saved, (int, float)) and not isinstance(saved, bool):
            return float(saved)
        for rec in self.run.metrics():
            if rec.get("split") == "train" and rec.get("step") == 1 and isinstance(rec.get("loss"), (int, float)):
                return float(rec["loss"])
        return None

    def _wavefront_note(self, segment: int) -> str:
        """What ``--wavefront`` does to this run, said once (or why it does nothing)."""
        depth = len(self.model.blocks)  # type: ignore[arg-type]
        seq = self.config.seq_len
        if depth < 2 or seq <= segment:
            why = "the model has one block" if depth < 2 else f"--seq-len {seq} fits in one segment"
            return f"--wavefront {segment}: no effect ({why})"
        pieces = -(-seq // segment)
        note = (f"--wavefront {segment}: {depth} blocks over {pieces} segments of up to {segment} tokens, "
                f"{pieces + depth - 1} steps instead of {pieces * depth}")
        if self.device.type != "cuda":
            return note
        how = (", each block on its own CUDA stream" if streams_enabled()
               else "; on CUDA in that order on one stream (NESTLEARN_WAVEFRONT_STREAMS=0: no overlap)")
        return (note + how + " (unproven in training at full size: one run diverged where the block loop did "
                "not; docs/training-health.md section 7)")

    # ---------------------------------------------------------------- pieces of a step
    # ---------------------------------------------------------------- evaluation & checkpoints
    def model_fn(self) -> Callable[[Tensor], Tensor]:
        """The model as evaluation sees it: every held-out row started from the state the
        training stream carries at this moment (``--carry-state``; ``carry.py`` says how rows
        and micro-batches map), else from the initial state. The carry itself is not touched."""
        return evaluation_fn(self.model, joined(self.carry), self._autocast)

    @property
    def eval_state(self) -> EvalState:
        """Where evaluation starts now: ``carried`` or ``initial`` (recorded with every result)."""
        return eval_state_of(getattr(self, "carry", None))

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
        rec = {"step": step, "split": "val", **metrics, "eval_state": self.eval_state}
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
        self.phase_perf.append([domain_perf(per[d]) for d in self.task.domains])  # type: ignore[attr-defined]
        rec = {"step": step, "split": "phase", "phase": phase,
               "domain": self.task.phases[phase], "domains": per,  # type: ignore[attr-defined]
               "eval_state": self.eval_state}
        self.metrics.log(rec)
        self.reporter.eval(rec)

    def save(self, step: int, tokens: int) -> Path | None:
        if not self.dist.is_main:
            return None
        cfg = self.config
        data = {"task": self.task.describe(), "seed": cfg.seed, "batch": cfg.batch, "seq_len": cfg.seq_len,
                "step": step}
        path = self.run.last_checkpoint
        contents = checkpoint_contents(
            model=self.model, spec=self.spec, step=step, optimizer=self.optimizer,
            carry=self.carry, data=data, scaler=self.scaler.state_dict() if self.scaler is not None else None,
            extra={"tokens": tokens, "phase_rows": self.phase_rows, "phase_perf": self.phase_perf, "total_steps": self.total,
                   "first_loss": self.first_loss},
        )
        self.writer.submit(path, *contents)  # written in the background; fit waits for it
        self.last_ckpt_step = step
        return path

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train to ``steps`` (or ``stop_at``, or Ctrl-C); returns the summary (also in summary.json)."""
        try:
            self.setup()
        except BaseException:
            self._restore_matmul_precision()  # --tf32 is set early in setup
            raise
        clean = False
        try:
            summary = self._fit()
            clean = True
            return summary
        finally:
            try:
                if hasattr(self, "writer"):
                    self.writer.wait()  # no run ends before its last checkpoint is on disk
            finally:
                if self.compiled is not None:
                    self.compiled.release()
                self._restore_matmul_precision()
                if hasattr(self, "metrics"):
                    self.metrics.close()
                D.shutdown(clean)

    def _restore_matmul_precision(self) -> None:
        """Undo ``--tf32``'s process-wide setting (where setup got as far as making it)."""
        if hasattr(self, "_matmul_before"):
            torch.set_float32_matmul_precision(self._matmul_before)

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
        if cfg.carry_state:
            self.reporter.message("--carry-state: every evaluation starts its held-out rows from the state the "
                                  "training stream carries at that moment, and leaves that state as it was")
        if self._tf32_note:
            self.reporter.message(self._tf32_note)
        if cfg.wavefront is not None:
            self.reporter.message(self._wavefront_note(cfg.wavefront))
        if self.graphed is not None:
            self.reporter.message(CUDA_GRAPH_NOTE)
        elif self._launch_bound_hint():
            self.reporter.message(
                "hint: on a GPU, a spec with in-context levels is bound by kernel launches (every chunk of every "
                "memory is its own small kernels); --cuda-graph replays the step from a CUDA graph (docs/benchmarks.md "
                "has the gain) and --compile --cuda-graph also fuses the chunk steps")
        if start >= self.total:
            self.reporter.message(f"the run is already complete at step {start} of {self.total}; "
                                  "nothing to do (raise --steps to train longer)")
            done_summary = self.run.summary() or self._summary("done", start, self.tokens_before, 0.0, None, {}, {})
            self.reporter.end(done_summary)
            return done_summary
        status, error = "done", None
        self._last_train: dict[str, Any] = {}
        self._last_val: dict[str, Any] = {}
        self._t_start = time.perf_counter()
        self._tokens = self.tokens_before + 0
        restore = self._install_signals()
        queued: Queued | None = None  # a step read a step late (``lag``)
        try:
            self.model.train()
            for step in range(start, self.total):
                try:
                    if self._stop:
                        if queued is not None:  # the last step queued: read it, save after it
                            self._record(queued, latest=True)
                        status = "interrupted"
                        break
                    q = self.train_step(step)
                    if queued is not None:
                        self._record(queued, latest=False)  # the device is busy with ``q`` meanwhile
                    queued = None
                    if self.lag and not self._settles(step):
                        queued = q
                    elif self._record(q, latest=True):
                        status = "stopped"
                        break
                except DivergedError as e:
                    status, error = "diverged", e
                    break
                except torch.OutOfMemoryError:
                    raise TrainError(oom.message(self.device.type, step + 1, cfg.batch, cfg.seq_len, cfg.accum,
                                                 self.model)) from None
            if status == "interrupted" and self.last_ckpt_step != self.step and self.dist.is_main:
                self.save(self.step, self._tokens)
            self.writer.wait()
        finally:
            restore()
        elapsed = time.perf_counter() - self._t_start
        summary = self._summary(status, start, self._tokens, elapsed, self.first_loss, self._last_train,
                                self._last_val)
        if self.dist.is_main:
            self.run.write_summary(summary)
        self.reporter.end(summary)
        if error is not None:
            raise error
        return summary

    def _settles(self, step: int) -> bool:
        """Must step ``step``'s numbers be read before the next step is queued? Where something
        after it reads the weights or ends the run: an evaluation, a phase's end, a checkpoint,
        ``--stop-at``, the last step, a stop asked for (these must see the step checked finite)."""
        done = step + 1
        ends = getattr(self.task, "phase_ends", None)
        return (self._stop or done % self.eval_every == 0 or done % self.ckpt_every == 0 or done == self.total
                or done == self.config.stop_at or self._out_of_time() or (ends is not None and done in ends()))

    def _out_of_time(self) -> bool:
        """``time_limit`` seconds of training have passed (checked once a step has been queued).
        Across processes the main one decides, through the stop flag every step already shares
        (so all ranks stop at the same step, as after Ctrl-C)."""
        limit = self.config.time_limit
        over = limit is not None and time.perf_counter() - self._t_start >= limit
        if over and self.dist.enabled:
            self._stop = self._stop or self.dist.is_main
            return False
        return over

    def _record(self, q: Queued, latest: bool) -> bool:
        """Read step ``q`` (``DivergedError`` if it diverged), log it and, where it is the
        ``latest`` step queued (the weights are its result), evaluate and checkpoint after it.
        True where the run stops here (``--stop-at``)."""
        cfg = self.config
        rec = self.finish(q)
        done = q.step + 1
        self._tokens += cfg.batch * cfg.seq_len
        if done == 1:
            self.first_loss = rec["loss"]
        with phase("record"):
            # lagged: ``finish`` waited for the step itself, so the clock needs no other sync
            self._timing(rec, self._tokens, self._t_start, sync=self.is_log_step(q.step) and not self.lag)
            if self.is_log_step(q.step):
                self.metrics.log(rec)
            self._last_train = rec
            self.reporter.step(rec)
            dead = self.dead.update(done, rec["grad_norm"], rec["loss"])
            if dead is not None:
                self.reporter.message(dead)
        self.step = done
        if not latest:
            return False
        timed_out = self._out_of_time() and done < self.total
        if timed_out:
            self.reporter.message(f"time limit ({cfg.time_limit:g} s) reached at step {done} of {self.total}: "
                                  "evaluating and saving; --resume continues the run")
        if self.dist.is_main:
            if done % self.eval_every == 0 or done == self.total or timed_out:
                with phase("evaluate"):
                    self._last_val = self.evaluate(done)
            self._phase_eval(done)
            stopping = self._stop or done == cfg.stop_at or timed_out
            if done % self.ckpt_every == 0 or done == self.total or stopping:
                with phase("checkpoint"):
                    self.save(done, self._tokens)
        return done == cfg.stop_at or timed_out

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
        if self.dead.since is not None:
            s["dead_since"] = self.dead.since  # the outer gradient was 0 from this step on (DeadRunWatch)
        task = self.task
        if isinstance(task, ContinualTask) and self.phase_rows and len(self.phase_rows) == len(task.phases):
            # forgetting in % as the paper (and the suite's tables) define it; a checkpoint from
            # before phase_perf was recorded can give only the loss increase
            if len(self.phase_perf) == len(task.phases):
                s["forgetting"] = task.forgetting_percent(self.phase_perf)
                s["phase_perf"] = self.phase_perf
            s["loss_increase"] = task.loss_increase(self.phase_rows)
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


__all__ = ["Trainer", "train"]
