"""Experiment files: a grid of specs x tasks x seeds under one shared budget.

    name: formal
    seeds: 3                           # or a list: [0, 1, 2]
    budget: {steps: 300, batch: 16, seq_len: 128}
    model: {dim: 64, depth: 2}         # model.* overrides applied to every spec
    params: {tolerance: 0.10}          # flag rows whose parameter count is off the row median
    specs:
      - models/hope.yaml               # label: the file's stem
      - {path: specs/transformer.yaml, label: gpt, overrides: [model.heads=4]}
    tasks:
      - {name: parity, options: {max_len: 16}, seq_len: 64, eval_lengths: [1, 2, 4]}

Spec paths are looked up in the working directory, then next to the experiment file, then one
folder above it (``experiments/`` sits at the repository root). Every problem is reported as
``file:line:col: path.to.field: message``, with the spec loader's own messages for spec errors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from nestlearn.suite.errors import SuiteError
from nestlearn.suite.yamlpos import PositionedYaml, PositionError, read_positioned


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _spec_shorthand(v: Any) -> Any:
    return {"path": v} if isinstance(v, str) else v


def _task_shorthand(v: Any) -> Any:
    return {"name": v} if isinstance(v, str) else v


Positive = Annotated[int, Field(gt=0)]


class SpecEntry(_Strict):
    path: str
    label: str | None = None
    overrides: list[str] = Field(default_factory=list)
    profile: str = "none"
    """The spec profile to apply (``none``: the sizes as written, then the experiment's ``model``)."""


class TaskEntry(_Strict):
    name: str
    label: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    seq_len: Positive | None = None
    """Training sequence length (default: the budget's)."""
    steps: Positive | None = None
    """Steps for this task (default: the budget's; ``continual``: the sum of its phase_steps)."""
    metric: str | None = None
    """The metric the table reports (default: bits_per_byte for text, accuracy otherwise)."""
    eval_lengths: list[Positive] = Field(default_factory=list)
    """Length generalisation: evaluate the final model at these multiples of ``seq_len``."""


class Budget(_Strict):
    steps: Positive | None = 300
    batch: Positive = 16
    seq_len: Positive = 128
    lr: Annotated[float, Field(gt=0)] | None = None
    """Outer learning rate for every spec (default: each spec's own)."""
    warmup: Annotated[int, Field(ge=0)] | None = None
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    clip: Annotated[float, Field(ge=0)] = 1.0
    eval_batches: Positive = 4
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    cuda_graph: bool = False
    compile: bool = False
    wavefront: Positive | None = None
    """The blocks as a wavefront over segments of this many tokens (``nestlearn run --wavefront``):
    execution only, the same results, so it leaves a run's fingerprint alone."""
    threads: Positive | None = None
    carry_state: bool = False
    """Carry every in-context level's state from one batch to the next (``nestlearn run
    --carry-state``): levels then remember across the stream, not only within a sequence, and
    every evaluation starts from the carried state (each result's ``eval_state`` says so)."""


class ParamsPolicy(_Strict):
    tolerance: Annotated[float, Field(ge=0)] = 0.10
    reference: Literal["median", "first"] = "median"
    match: Literal["dim"] | None = None
    """``dim``: search each spec's model.dim so its count is closest to ``target``."""
    target: Positive | None = None
    """The count ``match`` aims at (default: the first spec's count)."""


class ExperimentFile(_Strict):
    name: str
    description: str = ""
    out: str | None = None
    seeds: Positive | list[Annotated[int, Field(ge=0)]] = 3
    budget: Budget = Field(default_factory=Budget)
    model: dict[str, int | float | str | bool] = Field(default_factory=dict)
    overrides: list[str] = Field(default_factory=list)
    params: ParamsPolicy = Field(default_factory=ParamsPolicy)
    specs: list[Annotated[SpecEntry, BeforeValidator(_spec_shorthand)]] = Field(min_length=1)
    tasks: list[Annotated[TaskEntry, BeforeValidator(_task_shorthand)]] = Field(min_length=1)


@dataclass(frozen=True)
class SpecRow:
    """One spec of the grid, resolved: its file, label and every override in the order applied."""

    label: str
    path: Path
    overrides: tuple[str, ...]
    profile: str
    index: int


@dataclass(frozen=True)
class TaskRow:
    label: str
    name: str
    options: dict[str, Any]
    seq_len: int
    steps: int | None
    metric: str
    eval_lengths: tuple[int, ...]
    kind: str  # "lm", "synthetic" or "continual"
    index: int


@dataclass(frozen=True)
class Run:
    """One cell of the grid: ``<out>/<task>/<spec>/seed<k>``."""

    task: TaskRow
    spec: SpecRow
    seed: int

    @property
    def key(self) -> str:
        return f"{self.task.label}/{self.spec.label}/seed{self.seed}"


@dataclass
class Experiment:
    name: str
    file: Path
    description: str
    out: Path
    seeds: list[int]
    budget: Budget
    params: ParamsPolicy
    specs: list[SpecRow]
    tasks: list[TaskRow]
    doc: PositionedYaml | None = field(default=None, repr=False)

    def grid(self) -> list[Run]:
        """Task by task, seed by seed, every spec: a partial grid already compares the specs."""
        return [Run(t, s, seed) for t in self.tasks for seed in self.seeds for s in self.specs]

    def spec(self, label: str) -> SpecRow:
        return next(s for s in self.specs if s.label == label)


def _loc_of(err: Any) -> tuple[str | int, ...]:
    # pydantic puts the tag of a BeforeValidator'd / union member in the loc; keep real keys only
    return tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))


def _pydantic_messages(exc: ValidationError, doc: PositionedYaml) -> list[str]:
    out = []
    for err in exc.errors(include_url=False):
        loc = _loc_of(err)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "this field is required"
        elif err["type"] == "too_short":
            msg = "needs at least one entry"
        elif err["type"] == "model_type" and loc[:1] == ("specs",) and len(loc) == 2:
            msg = "expected a spec file path, or a mapping with path (and label, overrides, profile)"
        elif err["type"] == "model_type" and loc[:1] == ("tasks",) and len(loc) == 2:
            msg = "expected a task name, or a mapping with name (and label, options, seq_len, eval_lengths, ...)"
        out.append(doc.message(loc, msg, key=err["type"] == "extra_forbidden"))
    return list(dict.fromkeys(out))


def _find_spec(path: str, exp_file: Path) -> Path | None:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p if p.is_file() else None
    for base in (Path.cwd(), exp_file.parent, exp_file.parent.parent):
        if (base / p).is_file():
            return base / p
    return None


def _safe_label(text: str) -> bool:
    return bool(text) and all(c.isalnum() or c in "-_.+" for c in text) and text not in (".", "..")


def default_metric(kind: str, name: str) -> str:
    if kind == "continual":
        return "forgetting"
    if kind == "lm":
        return "bits_per_byte"
    return "sequence_accuracy" if name == "niah" else "accuracy"


def load_experiment(path: str | Path, data: str | None = None, out: str | Path | None = None,
                    steps: int | None = None, seeds: int | None = None) -> Experiment:
    """Read, validate and resolve an experiment file; ``SuiteError`` with every problem found.
    ``data``: a corpus for every ``lm`` task (``--data``); ``out``: the output folder; ``steps``
    / ``seeds``: override every task's steps and the seeds (0..seeds-1), e.g. for a smoke test."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SuiteError(f"{file}: no such experiment file") from None
    except IsADirectoryError:
        raise SuiteError(f"{file}: is a directory, not an experiment file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SuiteError(f"{file}: cannot read the experiment file ({e})") from None
    try:
        doc = read_positioned(text, str(file))
    except PositionError as e:
        raise SuiteError(str(e)) from None
    if not isinstance(doc.data, dict):
        raise SuiteError(doc.message((), "an experiment file is a mapping with name, specs and tasks "
                                         "(see nestlearn/suite/experiment.py)"))
    try:
        raw = ExperimentFile.model_validate(doc.data)
    except ValidationError as e:
        raise SuiteError("\n".join(_pydantic_messages(e, doc))) from None

    problems: list[str] = []
    if seeds is not None:
        raw.seeds = seeds
    seed_list = list(range(raw.seeds)) if isinstance(raw.seeds, int) else list(raw.seeds)
    if len(set(seed_list)) != len(seed_list):
        problems.append(doc.message(("seeds",), f"seeds repeat: {seed_list}"))
    if not _safe_label(raw.name):
        problems.append(doc.message(("name",), f"'{raw.name}' must be letters, digits, '-', '_', '.' or '+' "
                                               "(it names the output folder)"))
    shared = [f"model.{k}={_show(v)}" for k, v in raw.model.items()] + list(raw.overrides)

    specs: list[SpecRow] = []
    for i, s in enumerate(raw.specs):
        found = _find_spec(s.path, file)
        if found is None:
            problems.append(doc.message(("specs", i, "path"), f"no such spec file '{s.path}' (looked in the "
                                        f"working directory and next to {file})"))
            continue
        label = s.label or Path(s.path).stem
        if not _safe_label(label):
            problems.append(doc.message(("specs", i, "label"), f"'{label}' must be letters, digits, '-', '_', "
                                        "'.' or '+' (it names a folder)"))
        elif label in {r.label for r in specs}:
            problems.append(doc.message(("specs", i), f"the label '{label}' is used twice; give each spec its "
                                        "own 'label'"))
        specs.append(SpecRow(label, found, tuple(shared + list(s.overrides)), s.profile, i))

    tasks: list[TaskRow] = []
    for i, t in enumerate(raw.tasks):
        row = _task_row(t, i, raw.budget, data, doc, problems, steps)
        if row is None:
            continue
        if row.label in {r.label for r in tasks}:
            problems.append(doc.message(("tasks", i), f"the label '{row.label}' is used twice; give each task "
                                        "its own 'label'"))
        tasks.append(row)
    if problems:
        raise SuiteError("\n".join(problems))
    where = Path(out) if out is not None else Path(raw.out or f"runs/suite/{raw.name}")
    if data is not None and not any(t.name == "lm" for t in tasks):
        raise SuiteError(f"--data: {file} has no 'lm' task to train on it")
    if out is None and data is not None:  # results on another corpus never mix with the default's
        stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(data.rstrip("/")).stem) or "data"
        where = where.with_name(f"{where.name}-{stem}")
    return Experiment(raw.name, file, raw.description, where, seed_list, raw.budget, raw.params, specs, tasks, doc)


def _show(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _task_row(t: TaskEntry, i: int, budget: Budget, data: str | None, doc: PositionedYaml,
              problems: list[str], steps_override: int | None) -> TaskRow | None:
    from nestlearn.tasks import TaskError, get_task

    options = dict(t.options)
    if data is not None and t.name == "lm":
        options["data"] = data
    try:
        task = get_task(t.name, **options)
    except TaskError as e:
        if data is not None and t.name == "lm":
            problems.append(f"--data: {e}")  # the flag's fault, not the file's
            return None
        loc: tuple[str | int, ...] = ("tasks", i, "options") if t.options else ("tasks", i, "name")
        problems.append(doc.message(loc, str(e)))
        return None
    kind = "continual" if t.name == "continual" else str(task.kind)
    label = t.label or t.name
    if not _safe_label(label):
        problems.append(doc.message(("tasks", i, "label"), f"'{label}' must be letters, digits, '-', '_', '.' "
                                    "or '+' (it names a folder)"))
        return None
    if kind == "continual" and t.eval_lengths:
        problems.append(doc.message(("tasks", i, "eval_lengths"), "continual runs report forgetting, not "
                                    "length generalisation; remove eval_lengths"))
    metric = t.metric or default_metric(kind, t.name)
    allowed = ("forgetting",) if kind == "continual" else (
        ("loss", "bits_per_byte", "perplexity") if kind == "lm" else ("loss", "accuracy", "sequence_accuracy"))
    if metric not in allowed:
        problems.append(doc.message(("tasks", i, "metric"), f"'{metric}' is not a metric of task '{t.name}'; "
                                    f"choose {' or '.join(allowed)}"))
    steps = (steps_override or t.steps or (int(getattr(task, "total_steps", 0)) if kind == "continual" else None)
             or budget.steps)
    return TaskRow(label, t.name, options, t.seq_len or budget.seq_len, steps, metric,
                   tuple(sorted(set(t.eval_lengths))), kind, i)


def fingerprint(run: Run, exp: Experiment, spec_hash: str) -> str:
    """What makes a run's training: a changed experiment file must not reuse an old result.
    (Not the evaluation lengths: new ones are evaluated from the kept checkpoint.)"""
    b = exp.budget.model_dump()
    if not b.get("carry_state"):  # added later: off, the runs made before it keep their fingerprint
        b.pop("carry_state", None)
    payload = {"spec": spec_hash, "overrides": list(run.spec.overrides), "profile": run.spec.profile,
               "task": run.task.name, "options": run.task.options, "seq_len": run.task.seq_len,
               "steps": run.task.steps, "seed": run.seed,
               "budget": {k: v for k, v in b.items() if k not in ("device", "threads", "cuda_graph", "compile", "wavefront")}}
    if b.get("carry_state"):
        # a carrying run's phase evaluations, made while it trains, now start from the carried
        # state: results evaluated from the initial state before that must not be kept
        payload["eval_state"] = "carried"
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
