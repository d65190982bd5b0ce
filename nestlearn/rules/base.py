"""The inner-rule interface: optax-style ``(init, step)`` over dicts of batched tensors.

Parameters and optimiser state are dicts keyed like ``named_parameters()``, every tensor
with leading ``[batch, heads]`` dimensions (each sequence and head owns its fast weights).
``step`` is one update; it *is* the sequential reference of the rule. Per-token
hyper-parameters arrive in ``hp`` as tensors shaped ``[batch, heads]`` (or plain floats).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from torch import Tensor

from nestlearn.spec.schema import Gate, Learned, hyper_text

Params = dict[str, Tensor]
State = dict[str, Any]
HyperValue = Union[float, Learned, Gate]


def bcast(h: Tensor | float, like: Tensor) -> Tensor | float:
    """A per-(batch, head) value shaped to multiply a ``[B, H, ...]`` tensor."""
    if isinstance(h, Tensor) and h.dim() > 0:
        return h.reshape(h.shape + (1,) * (like.dim() - h.dim()))
    return h


@dataclass
class Rule:
    """Base class. ``hypers`` are the values that may be constants, learned or gated."""

    hypers: dict[str, HyperValue] = field(default_factory=dict)

    name = "rule"
    #: True when the update is ``S <- beta S - lr g; W <- (1 - decay) W + S`` (or its
    #: beta = 0 special case): a closed form over a chunk exists (see loops/dual.py).
    linear = False
    #: True when ``step`` needs the memory's layer inputs (``inputs``), e.g. DGD.
    needs_inputs = False
    #: True when a chunk's step is ``lr`` times a (momentum-weighted) sum of its gradients, so the
    #: chunk-step stability bound applies (``nestlearn/stability.py``): sgd, momentum, dgd.
    sums_gradients = False
    #: True when the update's size does not shrink with the gradient (orthogonalised by Newton-Schulz:
    #: muon, m3). Near the memory's optimum the inner steps then keep their size and oscillate, and an
    #: outer gradient unrolled through many of them grows with the sequence's length
    #: (``nestlearn/stability.py`` warns unless the level's ``grad`` truncates).
    fixed_size_step = False
    #: True when the outer level (trained by torch.optim) may use this rule: sgd, momentum, adam, adamw.
    usable_as_outer = False

    def init(self, params: Params) -> State:
        return {}

    def step(
        self,
        params: Params,
        state: State,
        grads: Params,
        hp: Mapping[str, Tensor | float],
        inputs: Mapping[str, Tensor] | None = None,
    ) -> tuple[Params, State]:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}(" + ", ".join(f"{k}={hyper_text(v)}" for k, v in self.hypers.items()) + ")"
