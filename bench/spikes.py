"""Where do a spec's outer-gradient spikes come from?

    python -m bench.spikes specs/titans-lmm.yaml --device cuda --steps 1000 --seconds 230

Trains the spec eagerly (no CUDA graph: these hooks must run every step) through the ordinary
``Trainer`` and prints a line every ``--every`` steps and on every step whose gradient norm
exceeds ``--factor`` times the median of the last 50: the gradient norm, the smallest spread
(std over features) of any TTT memory read before its layer norm in that step's forward (the
norm divides by it, and amplifies up to ``1/sqrt(eps)`` where it is small), and the parameters
with the largest gradient norms. ``--seconds`` stops the run at a wall-clock limit (a device
lease), keeping the learning-rate schedule of ``--steps``. docs/training-health.md shows what it
found for the Titans specs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import torch

from bench.run import positive_int


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.spikes", description=__doc__.split("\n\n")[0])
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*", help="spec overrides, e.g. levels.memory.rule.decay.max=0.01")
    p.add_argument("--steps", type=positive_int, default=1000, help="the schedule's length")
    p.add_argument("--seconds", type=float, default=float("inf"), help="stop after this much wall clock")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=2048)
    p.add_argument("--factor", type=float, default=20.0, help="a spike: this many times the running median")
    p.add_argument("--every", type=positive_int, default=25, help="also print every N steps")
    p.add_argument("--top", type=positive_int, default=5, help="parameters listed per line")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    from nestlearn import load_spec
    from nestlearn.memories import ttt
    from nestlearn.train import TrainConfig, Trainer

    spreads: list[torch.Tensor] = []
    plain_apply = ttt.TTTMemory.apply

    def recording_apply(self: Any, params: Any, x: torch.Tensor, lin: Any = ttt.plain_lin) -> torch.Tensor:
        h = x
        for i, layer in enumerate(self.layers):
            h = lin(layer.weight, params[layer.weight], h, params.get(layer.bias or ""))
            if i < len(self.layers) - 1:
                h = ttt.ACTS[self.act](h)
        spreads.append(h.detach().float().std(-1).amin())
        return plain_apply(self, params, x, lin)

    history: list[float] = []
    started: list[float] = []  # the first step's wall clock (setup does not count)
    plain_clip = torch.nn.utils.clip_grad_norm_
    trainer: Any = None

    def watching_clip(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                      error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
        """``clip_grad_norm_`` (same signature), printing the step's line."""
        if not started:
            started.append(time.time())
        given = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        with_grad = [(p, g) for p in given if (g := p.grad) is not None]
        params = [p for p, _ in with_grad]
        norms = torch.stack([g.detach().float().norm() for _, g in with_grad])
        total = plain_clip(params, max_norm, norm_type, error_if_nonfinite, foreach)
        g = float(total)
        smallest = float(torch.stack(spreads).min()) if spreads else float("nan")
        spreads.clear()
        median = statistics.median(history[-50:]) if history else g
        history.append(g)
        step = len(history)
        spike = g > args.factor * median
        if spike or step % args.every == 0:
            names = {id(p): n for n, p in trainer.model.named_parameters()}
            top = sorted(zip(norms.tolist(), (names.get(id(p), "?") for p in params)), reverse=True)[: args.top]
            print(f"{'SPIKE' if spike else 'step '} {step:5d} grad norm {g:9.3e} (median {median:.2f}) "
                  f"smallest pre-norm read spread {smallest:.2e}  " + " ".join(f"{n}={v:.1e}" for v, n in top),
                  flush=True)
        if time.time() - started[0] > args.seconds:
            raise KeyboardInterrupt  # the trainer stops cleanly, as on Ctrl-C
        return total

    spec = load_spec(args.spec, args.overrides, profile=None)
    cfg = TrainConfig(steps=args.steps, batch=args.batch, seq_len=args.seq_len, device=args.device,
                      eval_every=args.steps, log_every=args.steps, ckpt_every=args.steps)
    trainer = Trainer(spec, cfg, tempfile.mkdtemp(prefix="spikes-"))
    ttt.TTTMemory.apply = recording_apply  # type: ignore[method-assign]
    torch.nn.utils.clip_grad_norm_ = watching_clip
    try:
        summary = trainer.fit()
        if summary.get("status") == "interrupted":
            print(f"stopped after {len(history)} steps (time limit or Ctrl-C)", flush=True)
    except KeyboardInterrupt:
        print(f"stopped after {len(history)} steps (time limit or Ctrl-C)", flush=True)
    finally:
        ttt.TTTMemory.apply = plain_apply  # type: ignore[method-assign]
        torch.nn.utils.clip_grad_norm_ = plain_clip


if __name__ == "__main__":
    main()
