"""The spec's shape: pydantic v2 models for a whole nestlearn spec.

The schema checks types and names field by field; structural checks that need the whole
graph (unknown ids, cycles, init edges, dimensions) live in :mod:`nestlearn.graph`.
Every model forbids unknown keys so that a typo is an error at its own position, not a
silently ignored value.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nestlearn.spec.errors import suggest

IDENT = r"^[A-Za-z_][A-Za-z0-9_\-]*$"


def _numeric_kind(tp: Any) -> str | None:
    """``"int"`` / ``"float"`` when ``tp`` takes numbers but not booleans, else None."""
    seen: set[Any] = set()

    def walk(t: Any) -> None:
        seen.add(t)
        for a in get_args(t):
            walk(a)

    walk(tp)
    if bool in seen or Any in seen:
        return None
    return "float" if float in seen else "int" if int in seen else None


class _BoolText(str):
    """A boolean given where a number belongs: a string that fails number parsing at its own
    position and shows as the YAML the user wrote (``true``, not ``'true'``)."""

    def __repr__(self) -> str:
        return str(self)


class Strict(BaseModel):
    # inf / nan are never a sensible size or hyper-parameter: rejected at their position
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=False, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        # pydantic's lax mode reads `dim: true` as 1 and `beta: false` as 0.0: a typo, not a number
        if not isinstance(data, dict) or not any(isinstance(v, bool) for v in data.values()):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            key = field.alias if field.alias in out else name
            if isinstance(out.get(key), bool) and _numeric_kind(field.annotation) is not None:
                out[key] = _BoolText("true" if out[key] else "false")
        return out


# ----------------------------------------------------------------------------- hyper-parameters


class Learned(Strict):
    """A scalar meta-learned by the outer level, starting at ``learned``."""

    learned: float


class Gate(Strict):
    """A data-dependent value ``max * sigmoid(Linear(x) + bias)``, one per head.

    ``token``: a value per token. ``chunk``: one value per chunk, computed from the chunk's
    first token (causal, and identical however a stream is split into calls).
    """

    gate: Literal["token", "chunk"]
    max: float = Field(1.0, gt=0)
    bias: float = 0.0


Hyper = Union[float, Learned, Gate]


def hyper_text(value: Any) -> str:
    """How a hyper-parameter reads in messages and listings: ``0.1``, ``learned(0.01)``,
    ``gate(token, max 0.002)``."""
    if isinstance(value, Learned):
        return f"learned({value.learned:g})"
    if isinstance(value, Gate):
        return f"gate({value.gate}, max {value.max:g})"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class _RuleBase(Strict):
    def hypers(self) -> dict[str, Hyper]:
        return {k: v for k, v in self.__dict__.items() if k != "name"}


DecayTo = Literal["zero", "init"]
DECAY_TO_HELP = (
    "where forgetting pulls the fast weights: 'zero' (W <- (1 - decay) W, the papers' form) or "
    "'init' (W <- W_0 + (1 - decay)(W - W_0), toward the level's initial, meta-learned state: a deep "
    "memory then cannot be washed out to the vanishing-gradient point W = 0; docs/training-health.md)")


class _ForgettingRule(_RuleBase):
    def hypers(self) -> dict[str, Hyper]:
        return {k: v for k, v in self.__dict__.items() if k not in ("name", "decay_to")}


class SgdRule(_ForgettingRule):
    """``W <- (1 - decay) W - lr * g``."""

    name: Literal["sgd"]
    lr: Hyper = 0.1
    decay: Hyper = 0.0
    decay_to: DecayTo = Field("zero", description=DECAY_TO_HELP)


class MomentumRule(_ForgettingRule):
    """Titans' surprise: ``S <- beta S - lr g``; ``W <- (1 - decay) W + S``."""

    name: Literal["momentum"]
    lr: Hyper = 0.1
    beta: Hyper = 0.9
    decay: Hyper = 0.0
    decay_to: DecayTo = Field("zero", description=DECAY_TO_HELP)


class AdamRule(_RuleBase):
    """Adam (``weight_decay`` as L2 on the gradient, like torch.optim.Adam)."""

    name: Literal["adam"]
    lr: Hyper = 1e-3
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    eps_root: float = Field(
        0.0, ge=0,
        description="added to the bias-corrected second moment inside the square root "
        "(torchopt/optax: sqrt(v_hat + eps_root) + eps); > 0 keeps the step differentiable where "
        "v_hat = 0, which grad: unroll needs. In-context levels only (torch.optim has none).",
    )


class AdamWRule(_RuleBase):
    """AdamW (decoupled weight decay, like torch.optim.AdamW)."""

    name: Literal["adamw"]
    lr: Hyper = 1e-3
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    eps_root: float = Field(
        0.0, ge=0,
        description="added to the bias-corrected second moment inside the square root "
        "(torchopt/optax: sqrt(v_hat + eps_root) + eps); > 0 keeps the step differentiable where "
        "v_hat = 0, which grad: unroll needs. In-context levels only (torch.optim has none).",
    )


class DgdRule(_RuleBase):
    """Delta gradient descent (HOPE): ``W <- W((1-decay) I - proj x x^T) - lr m``, ``m <- beta m + g``,
    with ``proj = lr`` unless given."""

    name: Literal["dgd"]
    lr: Hyper = 0.1
    decay: Hyper = 0.0
    beta: Hyper = 0.0
    proj: Hyper | None = Field(None, description=(
        "the rate of the projection term W x x^T (unit x), which sets the transition's eigenvalue along x "
        "(1 - decay - proj: negative for proj > 1 - decay, the sign flip state tracking needs), apart from "
        "the gradient step's rate lr (which the chunk-step bound limits); default: lr, the paper's DGD"))

    def hypers(self) -> dict[str, Hyper]:
        return {k: v for k, v in self.__dict__.items() if k != "name" and not (k == "proj" and v is None)}


class DmgdRule(_RuleBase):
    """Deep momentum gradient descent (Nested Learning Eq. 50): the momentum is a memory ``m``
    (linear or MLP) trained in context on the gradients, ``phi <- beta phi - lr grad L2(phi; u)``,
    and the fast weight adds its read, ``W <- (1 - decay) W + m(I)``. ``momentum: linear`` with
    the ``dot`` objective is exactly the ``momentum`` rule. See nestlearn/rules/dmgd.py."""

    name: Literal["dmgd"]
    lr: Hyper = Field(0.1, description="eta: the momentum memory's inner learning rate")
    beta: Hyper = Field(0.9, description="alpha: decay of the momentum memory's parameters")
    decay: Hyper = Field(0.0, description="forgetting of the fast weights: W <- (1 - decay) W + m(I)")
    momentum: Literal["mlp", "linear"] = Field(
        "mlp", description="the momentum memory: 'mlp' (D act(U x)) or 'linear' (M x = momentum)")
    momentum_objective: Literal["dot", "l2"] = Field(
        "dot", description="its inner objective over keys I and values -grad: 'dot' = <m(I), g> "
        "(the paper's), 'l2' = ||m(I) + g||^2")
    expand: float = Field(1.0, gt=0, le=64, description="MLP hidden width / the weight's input width")
    act: Literal["gelu", "silu", "tanh", "relu"] = Field("gelu", description="MLP activation")
    init_std: float = Field(1.0, gt=0, description="std of the MLP's first layer at init (its second starts at 0)")
    seed: int = Field(0, ge=0, description="seed of that deterministic initial draw")

    def hypers(self) -> dict[str, Hyper]:
        return {"lr": self.lr, "beta": self.beta, "decay": self.decay}


class MuonRule(_RuleBase):
    """Momentum whose output is orthogonalised by Newton-Schulz iterations."""

    name: Literal["muon"]
    lr: Hyper = 0.02
    beta: Hyper = 0.95
    ns_steps: int = Field(5, ge=1, le=20)


class M3Rule(_RuleBase):
    """Multi-scale momentum Muon (Nested Learning Sec. 7.2, Alg. 1): a fast momentum every step
    and slow momenta refreshed every ``C`` steps from the gradients accumulated since, each
    orthogonalised by Newton-Schulz, summed with weight ``alpha`` on the slow ones, optionally
    divided by ``sqrt(V) + eps``. ``every: []`` is exactly ``muon``. See nestlearn/rules/m3.py."""

    name: Literal["m3"]
    lr: Hyper = Field(0.02, description="step size")
    beta: Hyper = Field(0.95, description="decay of the fast momentum (Muon's beta; Alg. 1 uses 1)")
    alpha: Hyper = Field(1.0, description="weight of the orthogonalised slow momenta in the update")
    every: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [16], description="update period C of each slow momentum, in steps")
    slow_beta: float = Field(1.0, ge=0, le=1, description="decay of a slow momentum at each of its updates (Alg. 1: 1)")
    b1: float = Field(1.0, gt=0, description="gain on the gradient in the fast momentum (Alg. 1's beta_1)")
    b3: float = Field(1.0, gt=0, description="gain on the accumulated gradients in a slow momentum (Alg. 1's beta_3)")
    b2: Annotated[float, Field(gt=0)] | None = Field(
        None, description="gain of the second moment V += b2 g^2 (Alg. 1's beta_2); null: no second moment")
    eps: float = Field(1e-8, gt=0, description="added to sqrt(V) (only with b2)")
    ns_steps: int = Field(5, ge=1, le=20, description="Newton-Schulz iterations")

    @field_validator("every", mode="before")
    @classmethod
    def _one_period(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) else v

    def hypers(self) -> dict[str, Hyper]:
        return {"lr": self.lr, "beta": self.beta, "alpha": self.alpha}


class TorchoptRule(Strict):
    """Any ``torchopt`` transformation, e.g. ``{name: torchopt, fn: adam, args: {lr: 0.01}}``."""

    name: Literal["torchopt"]
    fn: str
    args: dict[str, Any] = Field(default_factory=dict)

    def hypers(self) -> dict[str, Hyper]:
        return {}


RuleSpec = Annotated[  # the spec's rules: a new rule is a class here, a row in rules.RULES and its tests
    Union[
        SgdRule, MomentumRule, AdamRule, AdamWRule, DgdRule, DmgdRule, MuonRule, M3Rule, TorchoptRule
    ],
    Field(discriminator="name"),
]

# ----------------------------------------------------------------------------- levels

GRAD_MODE = r"^(unroll|first_order|stop|truncate:[1-9][0-9]*)$"


class LevelSpec(Strict):
    """A set of states updated every ``period`` tokens by ``rule`` on ``objective``."""

    period: Union[Literal["outer"], Annotated[int, Field(gt=0)]]
    rule: RuleSpec
    objective: str = "l2"
    grad: Annotated[str, Field(pattern=GRAD_MODE)] = "unroll"
    chunk: Annotated[int, Field(gt=0)] | None = None
    """Execution chunk for period-1 levels whose rule has an exact parallel form (e.g. DeltaNet)."""
    remat: Annotated[int, Field(gt=0)] | None = None
    """Recompute this level's inner loop in the backward, per group of ``remat`` chunks: only
    the carried state at each group boundary is kept, so activation memory grows with the
    number of groups instead of every chunk's intermediates. Same results; costs one more
    forward of the inner loop."""
    clip: Annotated[float, Field(gt=0)] | None = None
    """Clip each token's inner gradient to this norm (per sequence and head, jointly over all of
    the level's fast weights) before the rule sees it, as titans-pytorch's ``max_grad_norm``: a
    bound on any one token's push, e.g. a long run of one byte. In-context levels only."""
    max_gain: Annotated[float, Field(gt=0)] | None = None
    """Hold each token's chunk gain ``S(C, beta) * lr_t * c_t`` at most this, by scaling its inner
    gradient (after any ``clip``): ``c_t`` is the memory's curvature along the token's own error
    (``|k|^2`` for a linear memory; an MLP's grows with its initial weights, which the outer level
    learns), ``S(C, beta)`` the chunk's accumulated step. Past a gain of 1 a chunk of tokens
    pushing the same way overshoots the ``l2`` objective (docs/training-health.md §1, §7); unlike
    ``clip`` the bound is in those units, whatever the memory's size. In-context ``l2`` levels
    whose rule sums gradients (sgd, momentum, dgd)."""
    read: Literal["updated", "chunk_start"] = "updated"
    """``updated``: token t is read with the state after its own update (TTT's mini-batch
    semantics); ``chunk_start``: with the state at its chunk's start, so the weights are constant
    within a chunk and jump at its end (the CMS of Nested Learning, Eq. 71)."""

    @property
    def is_outer(self) -> bool:
        return self.period == "outer"

    @field_validator("objective")
    @classmethod
    def _objective_name(cls, v: str) -> str:
        if v in ("l2", "dot") or re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", v):
            return v
        raise ValueError(
            f"unknown objective {v!r}: use 'l2', 'dot' or a callable as 'package.module:function'"
            + suggest(v, ["l2", "dot"])
        )


# ----------------------------------------------------------------------------- model


class ModelSpec(Strict):
    vocab: Annotated[int, Field(gt=1)] = 256
    dim: Annotated[int, Field(gt=0)] = 256
    depth: Annotated[int, Field(gt=0)] = 4
    heads: Annotated[int, Field(gt=0)] = 4
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    tie_embeddings: bool = False
    input: Literal["tokens", "embeddings"] = "tokens"
    max_len: Annotated[int, Field(gt=0)] = 1 << 20

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSpec:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        return self


# ----------------------------------------------------------------------------- block nodes

Inputs = Union[str, list[str]]


class _Node(Strict):
    """A block node. Its class attributes are the op's facts, which the level graph reads
    (``nestlearn/graph``): no list of op names anywhere else."""

    id: Annotated[str, Field(pattern=IDENT)]
    inputs: Inputs = Field(alias="in")

    variadic: ClassVar[bool] = False
    """Takes 2 or more inputs of one width (else exactly 1)."""
    out_width: ClassVar[Literal["same", "dim", "model"]] = "same"
    """Output width: its input's (``same``), its ``dim`` field's (``dim``, default: the input's),
    or ``model.dim``, which its inputs must have too (``model``)."""
    owner: ClassVar[Literal["outer", "level", "none"]] = "outer"
    """Whose parameters it has: the outer level's, the level its ``level`` field names, or none."""
    nests: ClassVar[bool] = False
    """Its ``init`` may name a slower in-context level (a nested CMS level, ``compile.NestedInit``)."""

    def input_ids(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class NormNode(_Node):
    op: Literal["rmsnorm", "layernorm"]


class L2NormNode(_Node):
    op: Literal["l2norm"]
    owner: ClassVar[Literal["outer", "level", "none"]] = "none"


class LinearNode(_Node):
    op: Literal["linear"]
    out_width: ClassVar[Literal["same", "dim", "model"]] = "dim"
    dim: Annotated[int, Field(gt=0)] | None = None
    bias: bool = False


class ConvNode(_Node):
    """Depth-wise causal convolution over time (the paper's short convolution)."""

    op: Literal["conv"]
    width: Annotated[int, Field(gt=0, le=64)] = 4


class AddNode(_Node):
    op: Literal["add"]
    variadic: ClassVar[bool] = True
    owner: ClassVar[Literal["outer", "level", "none"]] = "none"


class MulNode(_Node):
    op: Literal["mul"]
    variadic: ClassVar[bool] = True
    owner: ClassVar[Literal["outer", "level", "none"]] = "none"


class ActNode(_Node):
    op: Literal["act"]
    owner: ClassVar[Literal["outer", "level", "none"]] = "none"
    fn: Literal["silu", "gelu", "relu", "sigmoid", "tanh", "identity"] = "silu"


class MemorySpec(Strict):
    """The parametric memory's own architecture (its parameters are the fast state)."""

    type: Literal["linear", "mlp", "ttt-linear", "ttt-mlp"] = "linear"
    """``ttt-*``: TTT's inner model ``x + LN(f_res(x))`` (nestlearn/memories/ttt.py)."""
    expand: Annotated[float, Field(gt=0)] = 4.0
    depth: Annotated[int, Field(ge=2, le=8)] = 2
    act: Literal["silu", "gelu", "relu", "tanh"] = "gelu"
    residual: bool = True
    """MLP memories: ``M(x) = x + W_L ... act(W_1 x)`` (the paper's Eq. 89)."""
    bias: bool = False
    init_std: Annotated[float, Field(gt=0)] | None = None
    """TTT memories: std of the fast weights' initial draw (TTT's paper: 0.02). Default: fan-in
    scaled to each layer's input RMS (the keys' RMS is 1/sqrt(d_head) when ``qk_norm`` L2-normalises
    them), so the pre-norm activations start with a spread of order 1. A small draw makes the
    memory's layer norm divide by a tiny spread, which multiplies the inner gradients and the
    curvature of the inner loss by hundreds (docs/training-health.md)."""


Source = Annotated[str, Field(pattern=IDENT)]


class MemoryNode(_Node):
    """A parametric associative memory owned by an in-context ``level``.

    ``query``, ``key`` and ``value`` are ``proj`` (a learned projection of the input, owned by
    the outer level), ``input`` (the input itself) or the id of another node (a ``generate``
    edge). ``init`` names the level whose parameter is the memory's initial state (the
    meta-learned ``init`` edge); ``zeros`` starts every sequence from zero.
    """

    op: Literal["memory"]
    out_width: ClassVar[Literal["same", "dim", "model"]] = "model"
    owner: ClassVar[Literal["outer", "level", "none"]] = "level"
    nests: ClassVar[bool] = True
    level: str
    memory: MemorySpec = Field(default_factory=MemorySpec)
    heads: Annotated[int, Field(gt=0)] | None = None
    query: Source = "proj"
    key: Source = "proj"
    value: Source = "proj"
    qk_norm: bool = True
    conv: Annotated[int, Field(ge=0, le=64)] = 0
    init: str = "outer"
    out_proj: bool = True


class MLPNode(_Node):
    """A feed-forward MLP. At the outer level this is a Transformer's FFN; at an in-context
    level it is a Continuum Memory System level (its weights learn in context every period)."""

    op: Literal["mlp"]
    out_width: ClassVar[Literal["same", "dim", "model"]] = "model"
    owner: ClassVar[Literal["outer", "level", "none"]] = "level"
    nests: ClassVar[bool] = True
    expand: Annotated[float, Field(gt=0)] = 4.0
    act: Literal["silu", "gelu", "relu", "tanh"] = "gelu"
    level: str = "outer"
    init: str = "outer"
    kv_norm: bool = Field(False, description=(
        "in-context levels only: RMS-normalise the level's keys W_k x and values W_v x (no gain), so "
        "their scale is fixed at RMS 1 and the outer level cannot raise the level's effective inner "
        "rate by growing W_k, W_v (docs/training-health.md)"))


class AttentionNode(_Node):
    """Softmax attention: the non-parametric memory (no fast state; reads its context)."""

    op: Literal["attention"]
    out_width: ClassVar[Literal["same", "dim", "model"]] = "model"
    heads: Annotated[int, Field(gt=0)] | None = None
    window: Annotated[int, Field(gt=0)] | None = None
    persistent: Annotated[int, Field(ge=0)] = 0
    rope: bool = False


class SelfModNode(_Node):
    """HOPE's self-modifying memory: k, v, lr and decay come from memories that learn in
    context from values they generate themselves; q is a fixed projection."""

    op: Literal["selfmod"]
    out_width: ClassVar[Literal["same", "dim", "model"]] = "model"
    owner: ClassVar[Literal["outer", "level", "none"]] = "level"
    level: str
    memory: MemorySpec = Field(default_factory=lambda: MemorySpec(type="linear"))
    heads: Annotated[int, Field(gt=0)] | None = None
    conv: Annotated[int, Field(ge=0, le=64)] = 4
    init: str = "outer"
    gen_period: Annotated[int, Field(gt=0)] | None = None
    """Tokens per update of the k / v / lr / decay memories (default: the level's period, which
    always sets the main memory's chunk). Generation reads the state at the previous one's end."""
    gen_lr_max: Annotated[float, Field(gt=0)] | None = None
    """The generators' own rate maximum: they learn with ``gen_lr_max * sigmoid(...)`` from the
    same generated gate the main memory scales by the rule's ``lr`` maximum (default: that maximum,
    one rate for all, as in the paper). Lets the main memory write at full strength while the
    generators that make its keys and values move slowly."""


class MACNode(_Node):
    """Titans' Memory as Context (arXiv:2501.00663, Sec. 4.1, Eq. 21-25): segment attention over
    ``[persistent || retrieved || segment]`` and a neural memory written with the attention's
    output, whose second read gates that output. The segment length is the ``level``'s period
    (one memory update per segment). See docs/specs/titans-mac.md and nestlearn/compile/mac.py.

    ``memory``, ``heads``, ``conv``, ``qk_norm`` and ``init`` are the neural memory's (as in a
    ``memory`` node, with q, k, v = SiLU(conv(W x))); ``persistent`` is the number of learned
    persistent tokens N_p; ``rope`` rotates queries and keys by their index in the concatenation.
    """

    op: Literal["mac"]
    out_width: ClassVar[Literal["same", "dim", "model"]] = "model"
    owner: ClassVar[Literal["outer", "level", "none"]] = "level"
    level: str
    memory: MemorySpec = Field(default_factory=lambda: MemorySpec(type="mlp"))
    heads: Annotated[int, Field(gt=0)] | None = None
    persistent: Annotated[int, Field(ge=0)] = 0
    conv: Annotated[int, Field(ge=0, le=64)] = 4
    qk_norm: bool = True
    rope: bool = False
    init: str = "outer"


NodeSpec = Annotated[  # the block's ops: a new op is a class here, a builder in compile.OPS and its tests
    Union[
        NormNode, L2NormNode, LinearNode, ConvNode, AddNode, MulNode, ActNode,
        MemoryNode, MLPNode, AttentionNode, SelfModNode, MACNode,
    ],
    Field(discriminator="op"),
]

# ----------------------------------------------------------------------------- the spec


class Spec(Strict):
    """A whole nestlearn spec."""

    nestlearn: Literal[1] = Field(1, description="format version")
    name: str = "unnamed"
    description: str = ""
    model: ModelSpec = Field(default_factory=ModelSpec)
    levels: dict[Annotated[str, Field(pattern=IDENT)], LevelSpec]
    block: list[NodeSpec] = Field(min_length=1)
    output: str | None = None
    """The block's output node (default: the last node)."""
    profiles: dict[Annotated[str, Field(pattern=IDENT)], dict[str, Any]] = Field(default_factory=dict)
    """Named sets of overrides ``{path.to.key: value}``, e.g. ``cpu: {model.dim: 128}``; one is
    applied on request (``load_spec(path, profile=NAME)``, ``nestlearn run --profile NAME``;
    ``nestlearn run`` applies ``cpu`` by itself on a CPU). The loader checks every path."""

    @property
    def outer_level(self) -> str:
        return next(k for k, v in self.levels.items() if v.is_outer)

    @model_validator(mode="after")
    def _one_outer(self) -> Spec:
        outer = [k for k, v in self.levels.items() if v.is_outer]
        if len(outer) != 1:
            raise ValueError(
                f"exactly one level must have 'period: outer' (found {len(outer)}: {outer})"
            )
        return self
