"""``--compile``: torch.compile for everything but the in-context levels' inner loops.

What torch.compile (dynamo + inductor) can and cannot do with a compiled spec:

- The inner loops differentiate *inside* the forward pass: the dual-form and sequential
  executors call ``torch.autograd.grad`` on intermediate tensors (the memory's pre-activations),
  the chunk executor ``torch.func.vmap(grad(...))``. Dynamo cannot trace
  ``torch.autograd.grad``: it breaks the graph there, and the gradient is then asked of tensors
  that the compiled graph before the break produced as separate outputs, so autograd finds them
  unused and the step fails ("differentiated Tensor ... not used in the graph"). ``vmap(grad)``
  does trace, but compiling a whole chunk loop took over ten minutes on a 2-core CPU for a
  one-block model.
- So the whole model is compiled with every op that runs an inner loop (a memory, a
  self-modifying memory, a CMS MLP, a MAC block: any op tied to a non-outer level) excluded
  with ``torch.compiler.disable``: those run eagerly (and still record ``loops.stats``), the
  embedding, norms, attention, projections and residual adds between them are compiled.
- Inside those ops, the closed-form chunk step of linear rules (``loops/dual.py``) and of DGD
  (``loops/dgd_dual.py``) is compiled on its own (``CompiledModel.compile_chunk_steps``): for MLP /
  linear memories and built-in objectives it computes its error signals by an explicit
  backward, so it has no ``autograd.grad`` to trace. The compiled step equals the eager one to
  float rounding; what it gains is in docs/benchmarks.md.
- torch 2.13's AOTAutograd cache replays some cached graphs with corrupt output-alias shapes
  (a ``shape '[9385..., ...]' is invalid`` error on the second process that compiles the same
  graph), so that cache is turned off while nestlearn compiles.
- With ``--cuda-graph`` only those chunk steps are compiled (``compile_model(outer=False)``):
  the graph already removes the launch overhead of the eager ops around them, and what the
  compiled chunk steps add on top is their fusion (fewer, larger kernels per chunk step).
- If the compiler still fails on the first compiled step (another torch version, an op it does
  not support), the run says so once and continues eagerly: ``Compiled.fall_back``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from nestlearn.train.errors import TrainError


def _in_context_level(module: nn.Module) -> str | None:
    """The name of the non-outer level ``module`` (or a submodule) runs an inner loop for."""
    for sub in module.modules():
        level = getattr(sub, "level", None)
        if level is not None and hasattr(level, "is_outer") and not level.is_outer:
            return str(level.name)
    return None


def inner_loop_ops(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(qualified name, op, level)`` of every block op whose forward runs an inner loop."""
    for i, block in enumerate(getattr(model, "blocks", [])):
        ops = getattr(block, "ops", None)
        if not isinstance(ops, nn.ModuleDict):
            continue
        for node_id, op in ops.items():
            level = _in_context_level(op)
            if level is not None:
                yield f"blocks.{i}.{node_id}", op, level


@dataclass
class Compiled:
    """A model compiled for training: ``fwd`` is what the trainer calls (the compiled module, or
    after ``fall_back`` the uncompiled ``wrapped``: the model or its DDP wrapper); ``note`` says
    once what was and was not compiled."""

    model: nn.Module
    fwd: nn.Module
    eager_levels: list[str]
    note: str
    _restore: list[Callable[[], None]] = field(default_factory=list)
    active: bool = True
    wrapped: nn.Module | None = None  # None: ``model`` itself

    def release(self) -> None:
        """Undo what compiling changed in place (the ops' eager wrappers, the compiled chunk
        step): at the end of a run, so a later model in the same process runs as it was."""
        for undo in self._restore:
            undo()
        self._restore.clear()

    def fall_back(self, error: BaseException) -> str:
        """Run eagerly from now on; returns the one-line explanation to show the user."""
        self.release()
        # the DDP wrapper, where there is one: the bare model would skip the gradient all-reduce
        self.fwd = self.wrapped if self.wrapped is not None else self.model
        self.active = False
        return (f"--compile: torch.compile failed on this model ({describe_error(error)}); "
                "continuing without compilation (the results are the same, only slower)")


def describe_error(error: BaseException, limit: int = 240) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    # dynamo wraps the backend's error with a long "set TORCH_LOGS=..." epilogue: keep the head
    text = text.split(" Set TORCH_LOGS")[0].split(" You can suppress this exception")[0]
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _configure() -> None:
    """Turn off the AOTAutograd cache (corrupt replays in torch 2.13, see the module doc)."""
    try:
        import torch._functorch.config as functorch_config

        functorch_config.enable_autograd_cache = False
    except (ImportError, AttributeError):
        pass


def compile_model(model: nn.Module, wrapped: nn.Module | None = None, outer: bool = True) -> Compiled:
    """torch.compile ``wrapped`` (``model`` or its DDP wrapper) with ``model``'s inner-loop ops
    running eagerly, and the inner loops' chunk steps compiled on their own; ``outer=False``
    (under ``--cuda-graph``): the chunk steps only. Raises ``TrainError`` only where torch.compile
    is unavailable altogether."""
    wrapped = wrapped if wrapped is not None else model
    try:
        import torch._dynamo as dynamo

        supported = dynamo.is_dynamo_supported()
    except Exception as e:  # noqa: BLE001 - an import-time failure of torch's compiler stack
        raise TrainError(f"--compile: torch.compile is unavailable here ({describe_error(e)}); "
                         "run without --compile") from None
    if not supported:
        raise TrainError(f"--compile: torch.compile does not support this platform (torch {torch.__version__}); "
                         "run without --compile")
    _configure()
    restore: list[Callable[[], None]] = []
    ops = list(inner_loop_ops(model))
    levels = list(dict.fromkeys(level for _, _, level in ops))
    fwd = wrapped
    if outer:
        restore += [_run_eagerly(op) for _, op, _ in ops]
        fwd = torch.compile(wrapped)  # type: ignore[assignment]
    if levels:
        from nestlearn.compile import CompiledModel

        assert isinstance(model, CompiledModel)  # in-context levels: the module of a spec
        model.compile_chunk_steps(True)  # travels with the model's problems (MemoryProblem.compiled)
        restore.append(lambda: model.compile_chunk_steps(False))
        names = ", ".join(f"'{n}'" for n in levels)
        note = (f"--compile: the inner loops of level{'s' if len(levels) > 1 else ''} {names} run their chunk "
                "loop eagerly with the closed-form chunk step (sgd / momentum / decay / dgd rules) compiled; "
                + ("everything else is compiled" if outer else "the rest of the step runs as captured by --cuda-graph"))
    elif outer:
        note = "--compile: the whole model is compiled (it has no in-context level)"
    else:
        note = ("--compile: nothing to compile under --cuda-graph (the spec has no in-context level whose "
                "chunk step could be compiled); the CUDA graph alone runs")
    return Compiled(model=model, fwd=fwd, eager_levels=levels, note=note, _restore=restore, wrapped=wrapped)


def _run_eagerly(op: nn.Module) -> Callable[[], None]:
    """Exclude ``op``'s forward from torch.compile; returns the undo."""
    had = "forward" in op.__dict__
    original = op.__dict__.get("forward")
    op.forward = torch.compiler.disable(op.forward)  # type: ignore[method-assign]

    def undo() -> None:
        if had:
            op.forward = original  # type: ignore[method-assign,assignment]
        else:
            del op.forward

    return undo
