"""``TrainConfig``: every knob of a training run, as a pydantic model whose field types hold the
bounds, once: the constructor, ``TrainConfig.check``, a hand-edited ``config.json`` and the CLI's
flags (``TrainConfig.check_values``, ``check_flag``) all check against them, and every violation
is a ``TrainError`` that names the flag: ``--batch: must be at least 1, got 0``."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, model_validator
from pydantic_core import ErrorDetails

from nestlearn.train.errors import TrainError

# Defaults of ``nestlearn run SPEC`` with no other argument: small enough that a few-million
# parameter spec visibly learns in a few minutes on a 2-core laptop CPU.
DEFAULT_STEPS = 300
DEFAULT_BATCH = 16
DEFAULT_SEQ_LEN = 128

# Upper bounds of the whole-number knobs: beyond them torch overflows its int64 arguments (an
# "Overflow when unpacking long long" from deep inside) or spawns threads until it crashes.
MAX_COUNT = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_THREADS = 1024

Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
"""A whole number of steps, rows, tokens, batches: 1 to ``MAX_COUNT``."""
Size = Annotated[int, Field(ge=0, le=MAX_COUNT)]
"""A whole number that may be 0 (warm-up steps, top-k)."""
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Threads = Annotated[int, Field(ge=1, le=MAX_THREADS)]
Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Ratio = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Text = Annotated[str, Field(pattern=r"\S")]
"""A path or a name: not empty, not only spaces."""

_STRICT = ConfigDict(strict=True)  # a config.json edited by hand may hold anything: no coercion

_KINDS = {  # what a field's value must be, where its type alone does not say it well
    "lr": "a positive finite number",
    "clip": "a finite number >= 0 (0 disables clipping)",
    "data": "a path",
    "tensorboard": "a directory",
    "task_options": "KEY=VALUE pairs",
}
_EMPTY = {  # what an empty (or blank) text means, and what to give instead
    "data": "the path is empty; give a text file or folder (or leave --data out to train on the Python standard "
            "library's sources)",
    "tensorboard": "the directory is empty; give the directory to write TensorBoard logs to",
}
_FLAGS = {"task_options": "--task-opt"}


class TrainConfig(BaseModel):
    """A run's settings. ``steps=None`` means the task's own length (``continual``) or
    ``DEFAULT_STEPS``; ``warmup=None`` means 5% of the steps; ``eval_every=None`` four evaluations
    per run; ``ckpt_every=None`` ten checkpoints per run (and one at the end or on Ctrl-C)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    task: str = "lm"
    task_options: dict[str, Any] = Field(default_factory=dict)
    data: Text | None = None
    steps: Count | None = None
    batch: Count = DEFAULT_BATCH
    seq_len: Count = DEFAULT_SEQ_LEN
    lr: Rate | None = None
    warmup: Size | None = None
    min_lr_ratio: Ratio = 0.1
    clip: NonNegative = 1.0
    accum: Count = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    tf32: bool = False
    """CUDA only: fp32 matrix products on TF32 tensor cores (``torch.set_float32_matmul_precision
    ("high")``), the in-context levels' Triton kernels and closed forms included; faster, with about
    1e-3 relative error in each product. Off: fp32 everywhere the inner loops run in fp32."""
    compile: bool = False
    cuda_graph: bool = False
    """Capture each step's forward + loss + backward in a CUDA graph and replay it (CUDA only)."""
    wavefront: Count | None = None
    """Run the blocks as a wavefront over segments of this many tokens (``compile/wavefront.py``):
    the same math; on CUDA each block on its own stream, so blocks overlap."""
    seed: Seed = 0
    threads: Threads | None = None
    """CPU threads for torch (default: torch's choice; 1 is often fastest for tiny models)."""
    deterministic: bool = False
    carry_state: bool = False
    eval_every: Count | None = None
    eval_batches: Count = 4
    ckpt_every: Count | None = None
    log_every: Count = 1
    stop_at: Count | None = None
    """Stop (with a checkpoint) after this many steps of a ``steps``-long schedule; resume later."""
    time_limit: float | None = Field(default=None, gt=0)
    """Stop (with an evaluation and a checkpoint) at the first step that ends after this many seconds of
    training, keeping the schedule of ``steps``; resume later. For leases and job limits."""
    profile: str | None = None
    """The spec profile the run's spec was resolved with (a record; the spec already has it)."""
    tensorboard: Text | None = None
    """Also log every metrics record to TensorBoard, in this directory (``train/loggers.py``)."""
    wandb: bool = False
    """Also log every metrics record to Weights & Biases (offline without an API key)."""

    @model_validator(mode="wrap")
    @classmethod
    def _one_message(cls, data: Any, handler: Any, info: ValidationInfo) -> Any:
        """A ``TrainError`` naming the flag of the first bad value, not pydantic's report."""
        try:
            return handler(data)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            name = str(err["loc"][0]) if err["loc"] else ""
            field = cls.model_fields.get(name)
            if field is None:
                raise TrainError(f"unknown setting {name!r}") from None
            flags = (info.context or {}).get("flags", {})
            flag = flags.get(name) or _FLAGS.get(name, "--" + name.replace("_", "-"))
            annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
            raise TrainError(f"{flag}: {_message(err, annotation, name)}") from None

    @classmethod
    def check_values(cls, values: dict[str, Any], flags: dict[str, str] | None = None) -> None:
        """Check some settings alone (e.g. the flags given, before they meet a run's saved
        settings): ``TrainError`` for the first bad one, named by its flag (``flags`` renames:
        ``{"eval_batches": "--batches"}``). ``None`` values are left out."""
        cls.model_validate({k: v for k, v in values.items() if v is not None}, context={"flags": flags or {}})

    def check(self) -> None:
        """Raise ``TrainError`` naming the first bad value (values may have been set after
        construction), or a combination of settings that cannot run."""
        type(self).model_validate(self.model_dump())
        if self.cuda_graph and self.carry_state:
            raise TrainError("--cuda-graph: cannot be combined with --carry-state (the carried state would be a "
                             "new input of the captured step at every batch); use one of them")
        if self.batch % self.accum:
            raise TrainError(f"--accum: the batch of {self.batch} rows cannot be split into {self.accum} "
                             "equal micro-batches; choose an --accum that divides --batch")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A config from its ``to_dict`` (e.g. a run's config.json; unknown keys are ignored)."""
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        return cls.model_validate({k: v for k, v in data.items() if k in cls.model_fields})


def check_flag(flag: str, value: Any, annotation: Any) -> Any:
    """``value`` of ``flag`` checked against ``annotation`` (e.g. ``Count``: its type and bounds)
    with the messages of ``TrainConfig``; ``TrainError`` if it does not fit."""
    try:
        return TypeAdapter(annotation, config=_STRICT).validate_python(value)
    except ValidationError as exc:
        raise TrainError(f"{flag}: {_message(exc.errors(include_url=False)[0], annotation)}") from None


def _message(err: ErrorDetails, annotation: Any, name: str | None = None) -> str:
    """``must be ..., got X`` for one pydantic error of a value of type ``annotation`` (of the
    setting ``name``, if it is one)."""
    from nestlearn.spec.errors import show
    from nestlearn.spec.walk import describe, unwrap

    t, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    base, _, meta = unwrap(annotation)
    if get_origin(base) is Literal:
        return f"expected one of {', '.join(map(str, get_args(base)))}, got {show(value)}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int and number and t == "greater_than_equal":
        return f"must be at least {ctx['ge']}, got {value}"
    if base is int and number and t == "less_than_equal":
        return f"must be at most {ctx['le']}, got {value}"
    if base is float and number:  # out of bounds, or not finite
        bounds = {k: getattr(m, k) for m in meta for k in ("gt", "ge", "le") if getattr(m, k, None) is not None}
        if "ge" in bounds and "le" in bounds:
            where = f"in [{bounds['ge']:g}, {bounds['le']:g}]"
        else:
            where = " and ".join(f"{sym} {bounds[k]:g}" for k, sym in (("gt", ">"), ("ge", ">="), ("le", "<="))
                                 if k in bounds)
        return f"must be a finite number {where}, got {float(value):g}"
    if t == "string_pattern_mismatch" and name in _EMPTY:
        return _EMPTY[name]
    kind = _KINDS.get(name or "") or ("a whole number" if base is int else describe(annotation))
    return f"must be {kind}, got {value!r}"
