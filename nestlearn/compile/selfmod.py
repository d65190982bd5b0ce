"""HOPE's self-modifying memory (Nested Learning §8, Eq. 83-90), chunk-wise.

Per head, with ``x`` the (short-convolved) input and ``G`` the generators' chunk-start state:

    k_t = normalize(M_k,G(x_t))     v_t = M_v,G(x_t)                 (generated keys / values)
    lr_t = max_lr sigmoid(M_lr,G(x_t) + b_lr)   decay_t = max_decay sigmoid(M_decay,G(x_t) + b_decay)
    q_t = normalize(W_q x_t)                                          (q: a fixed projection)

Every memory ``M_s`` (s in k, v, lr, decay, and the main memory) then learns in context from
a value it generates itself, ``vhat_s,t = M_s,G(normalize(v_t))`` (the main memory's value is
``v_t``), with the level's objective ``L(M_s; k_t, vhat_s,t)`` and rule (DGD with decay and
momentum in HOPE), using the shared generated ``lr_t`` and ``decay_t``. Output
``y_t = M_main,t(q_t)``.

Two chunk sizes (the paper trains the main memory and "the rest" at different ones): the
generators update every ``gen_period`` tokens and generate a whole such chunk from its start
state; the main memory updates every ``period`` tokens (the level's period). With both equal
to 1 this is the token-by-token self-modifying recurrence.

The four generators are linear memories on the same keys with the same rates, and the l2 /
dot objectives and every rule act row by row on a weight, so they are stored and updated as
ONE linear memory whose output rows are ``[k | v | lr | decay]``: exactly the four separate
recurrences, in one executor call (tests/test_selfmod.py checks them against the separate
plain equations).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.compile.basic import CausalConv, Op
from nestlearn.compile.levels import Level
from nestlearn.loops import gen_triton, init_state, pick, run
from nestlearn.loops.chunks import segments
from nestlearn.loops.common import MemoryState
from nestlearn.memories import LinearMemory, MemoryArch, build_arch
from nestlearn.rules.base import Rule
from nestlearn.spec.schema import Gate, Learned, MemorySpec

GENERATORS = ("k", "v", "lr", "decay")


class SelfModOp(Op):
    def __init__(
        self, dim: int, heads: int, level: Level, mem: MemorySpec, conv: int,
        gen_period: int | None = None, gen_lr_max: float | None = None,
    ):
        super().__init__()
        self.dim, self.heads, self.dh = dim, heads, dim // heads
        self.level = level
        self.gen_period = gen_period
        self.gen_lr_max = gen_lr_max  # None: the generators learn at the main memory's rate
        dh = self.dh
        self.widths = {"k": dh, "v": dh, "lr": 1, "decay": 1}
        self.gen_arch = LinearMemory(dh, sum(self.widths.values()), heads)
        main = build_arch(mem, dh, dh, heads, unit_keys=True)  # its keys are L2-normalised
        # an nn.Module memory (TTT) owns outer parameters (its layer norm): register it
        self.main_arch: MemoryArch = main
        self.init = nn.ParameterDict()
        std = 1 / math.sqrt(dh)
        for name, width in self.widths.items():
            w = torch.randn(heads, width, dh) * std
            self.init[f"{name}__W"] = nn.Parameter(w)  # always learned: 'zeros' is refused (graph/checks.py)
        for pname, p in main.init_params().items():
            self.init[f"main__{pname}"] = nn.Parameter(p)
        self.q = nn.Linear(dim, dim, bias=False)
        self.conv_x = CausalConv(dim, conv) if conv else None
        self.conv_q = CausalConv(dim, conv) if conv else None
        hyp = level.rule.hypers
        self.max_lr, lr_bias = _gate_of(level, "lr", hyp.get("lr", 0.1))
        self.max_decay, decay_bias = _gate_of(level, "decay", hyp.get("decay", 0.0))
        self.max_proj = _proj_max(level, hyp)
        self.gen_bias = nn.ParameterDict({
            "lr": nn.Parameter(torch.full((heads,), lr_bias)),
            "decay": nn.Parameter(torch.full((heads,), decay_bias)),
        })
        beta = hyp.get("beta")
        self.beta = nn.Parameter(torch.tensor(float(beta.learned))) if isinstance(beta, Learned) else None
        self.out = nn.Linear(dim, dim, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.dh).transpose(1, 2)

    def rebuild_hypers(self, rule: Rule, like: Tensor) -> tuple[list[str], list[str]]:
        """A rule swap: the generated rates take the new rule's ``lr`` / ``decay`` maxima (their
        biases stay trained), a learned ``beta`` is kept, removed or added. ``(removed, added)``."""
        hyp = rule.hypers
        self.max_lr, _ = _gate_of(self.level, "lr", hyp.get("lr", 0.1))
        self.max_decay, _ = _gate_of(self.level, "decay", hyp.get("decay", 0.0))
        self.max_proj = _proj_max(self.level, hyp)
        beta = hyp.get("beta")
        if isinstance(beta, Learned) and self.beta is None:
            self.beta = nn.Parameter(torch.tensor(float(beta.learned), device=like.device, dtype=like.dtype))
            return [], ["beta"]
        if not isinstance(beta, Learned) and self.beta is not None:
            self.beta = None
            return ["beta"], []
        return [], []

    def _initial(self, batch: int, dtype: torch.dtype) -> dict[str, Any]:
        rule = self.level.rule
        gen_w = torch.cat([self.init[f"{n}__W"] for n in GENERATORS], dim=1).to(dtype)
        main = {k[6:]: p.to(dtype) for k, p in self.init.items() if k.startswith("main__")}
        return {"gen": init_state(self.gen_arch, rule, {"W": gen_w}, batch),
                "main": init_state(self.main_arch, rule, main, batch)}

    def forward(self, xs: list[Tensor], src: dict[str, Tensor], state: Any) -> tuple[Tensor, Any]:
        x = xs[0]
        b, t, d = x.shape
        state = state or {}
        rule, lv = self.level.rule, self.level
        period = int(lv.period)
        conv_state: dict[str, Tensor] = {}
        xc, qc = x, self.q(x)
        if self.conv_x is not None and self.conv_q is not None:
            xc, conv_state["x"] = self.conv_x(x, state.get("conv", {}).get("x"))
            qc, conv_state["q"] = self.conv_q(qc, state.get("conv", {}).get("q"))
        xh = self._heads(xc)
        qh = F.normalize(self._heads(qc), dim=-1)
        mems = dict(state.get("mems") or self._initial(b, x.dtype))
        beta: dict[str, Tensor | float] = {}
        if "beta" in rule.hypers:
            beta["beta"] = self.beta.to(x.dtype) if self.beta is not None else float(rule.hypers["beta"])  # type: ignore[arg-type]
        # the generators chunk by chunk (each chunk's k / v / lr / decay come from its start
        # state), then the main memory over the whole call in one executor run: it reads only
        # what the generators made, so its chunks need not wait for theirs (the same math as
        # interleaving them, with its per-call work -- coefficients, splits -- done once)
        k, v, lr_raw, decay_raw, mems["gen"] = self._generate(xh, mems["gen"], beta)
        hp_main: dict[str, Tensor | float] = dict(beta)
        hp_main["lr"] = self.max_lr * lr_raw
        if self.max_decay > 0:
            hp_main["decay"] = self.max_decay * decay_raw
        if self.max_proj is not None:  # DGD's projection rate: the same generated gate, its own max
            hp_main["proj"] = self.max_proj * lr_raw
        pb_main = lv.problem(self.main_arch, qh, k, v, hp_main, period, chunk=None)
        y, mems["main"] = run(pb_main, mems["main"], lv.executor)
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.out(y), {"mems": mems, "conv": conv_state}

    def _generate(self, xh: Tensor, g: MemoryState, beta: dict[str, Tensor | float]
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, MemoryState]:
        """The generators over the call: ``(k, v, lr_raw, decay_raw, state)``, the main memory's
        unit keys, values and raw gates (``sigmoid`` of the generated rates plus their biases) and
        the generators' new state. On the fused kernel where it computes exactly this
        (``loops/gen_triton.py``), else chunk by chunk."""
        lv = self.level
        bias = torch.stack([self.gen_bias["lr"], self.gen_bias["decay"]], -1).to(xh.dtype)  # [H, 2]
        gen_lr = self.gen_lr_max if self.gen_lr_max is not None else self.max_lr
        gen_period = self.gen_period or int(lv.period)
        fused = gen_triton.generate(lv, xh, g, bias, beta, gen_lr, self.max_decay, self.max_proj, gen_period)
        if fused is not None:
            done = fused[0].shape[2]
            if done == xh.shape[2]:
                return fused
            rest = self._generate_loop(xh[:, :, done:], fused[4], beta, bias, gen_lr, gen_period)  # a partial chunk
            k, v, lr_raw, decay_raw = (torch.cat([a, b], 2) for a, b in zip(fused[:4], rest[:4]))
            return k, v, lr_raw, decay_raw, rest[4]
        return self._generate_loop(xh, g, beta, bias, gen_lr, gen_period)

    def _generate_loop(self, xh: Tensor, g: MemoryState, beta: dict[str, Tensor | float], bias: Tensor,
                       gen_lr: float, gen_period: int) -> tuple[Tensor, Tensor, Tensor, Tensor, MemoryState]:
        """``_generate`` chunk by chunk: the reference of the kernel and the path of training."""
        lv, dh = self.level, self.dh
        spans = list(segments(g["offset"], gen_period, xh.shape[2]))
        x_segs = xh.split([t1 - t0 for t0, t1 in spans], 2) if len(spans) > 1 else (xh,)
        ks, vs, lrs, decays = [], [], [], []
        read_start: bool | None = None
        for xs_seg in x_segs:
            anchor = g["params"] if g["offset"] == 0 else g["anchor"]
            k_raw, v, rates = self.gen_arch.apply(anchor, xs_seg).split([dh, dh, 2], -1)
            k = F.normalize(k_raw, dim=-1)
            lr_raw, decay_raw = torch.sigmoid(rates + bias[:, None]).unbind(-1)
            hp: dict[str, Tensor | float] = dict(beta)
            hp["lr"] = gen_lr * lr_raw
            if self.max_proj is not None:  # the projection rate stays the main memory's
                hp["proj"] = self.max_proj * lr_raw
            if self.max_decay > 0:
                hp["decay"] = self.max_decay * decay_raw
            # the generators' self-generated values (bounded inputs keep the self-reference stable)
            vhat = self.gen_arch.apply(anchor, F.normalize(v, dim=-1))
            pb = lv.problem(self.gen_arch, xs_seg, k, vhat, hp, gen_period, read_start=bool(read_start),
                            chunk=None, remat=None)
            if read_start is None:  # decided once per call: every segment's problem is alike
                # the generators' read is never used: a plain one (read_start) where that keeps the
                # executor (DGD's closed form; not where it would move a delta rule off its fast path)
                plain = replace(pb, read_start=True)
                read_start = pick(plain, lv.executor) is pick(pb, lv.executor)
                pb = plain if read_start else pb
            _, g = run(pb, g, lv.executor)
            ks.append(k)
            vs.append(v)
            lrs.append(lr_raw)
            decays.append(decay_raw)
        return _cat(ks, 2), _cat(vs, 2), _cat(lrs, 2), _cat(decays, 2), g


def _cat(xs: list[Any], dim: int) -> Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim)


def _proj_max(level: Level, hyp: Any) -> float | None:
    """The maximum of DGD's projection rate where the rule has its own ``proj``: it is generated
    with ``lr``'s gate (``proj_t = proj_max * sigmoid(M_lr(x_t) + b_lr)``), so the generator decides
    once per token how strongly to write, and the two rates keep their own ranges."""
    return _gate_of(level, "proj", hyp["proj"])[0] if "proj" in hyp else None


def _gate_of(level: Level, name: str, h: Any) -> tuple[float, float]:
    """``(max, initial bias)`` of a generated rate; the generators make one value per token."""
    if isinstance(h, Gate):
        if h.gate != "token":
            raise ValueError(f"level {level.name!r}: the selfmod memory generates {name} per token "
                             f"(gate: token); gate: {h.gate} is not supported here")
        return h.max, h.bias
    if isinstance(h, Learned):
        return float(h.learned), 0.0
    return float(h), 0.0
