"""``python -m bench.wavefront_check [SPEC ...] [--segment 8] [--tokens 64]``: where does the CUDA
wavefront's stream path (``compile/wavefront.py``) depart from the block loop? One small model
per spec (dim 64, depth 4, fp32, no autocast), and for each way of running the streams the
largest difference from the loop in the forward's output and in the outer gradients (relative
to each gradient's largest entry):

- ``streams``: the stream path as it runs with ``NESTLEARN_WAVEFRONT_STREAMS=1``;
- ``no handoff``: without ``_Handoff`` (the gradients' record on the producer's stream);
- ``sync each``: a device synchronise after every block-segment (no overlap at all; if this
  still differs, the fault is not a race between the streams);
- ``one stream``: the default CUDA path (the diagonal order on the caller's stream).

Forward differences with a clean ``sync each`` point at the forward's ordering; clean forwards
with gradient differences point at the backward (the caching allocator across streams).

The same forward + backward is then captured in a CUDA graph and replayed three ways -- the
block loop, the one-stream order and the streams -- each against the eager loop. The graphed
streams differed by 6.6e-4 (H100, 2026-12-07) where the eager streams did not; if the graphed
block loop differs by as much, that is the kernels' numerics under capture (e.g. cuBLAS picking
other algorithms on other streams' workspaces), not a fault of the stream path. A table at the
end; CUDA only.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F

import nestlearn
from bench.run import environ, graphed, relative_error

SPECS = ("specs/titans-mal.yaml", "models/hope.yaml")
VARIANTS = {
    "streams": {"NESTLEARN_WAVEFRONT_STREAMS": "1"},
    "no handoff": {"NESTLEARN_WAVEFRONT_STREAMS": "1", "NESTLEARN_WAVEFRONT_HANDOFF": "0"},
    "sync each": {"NESTLEARN_WAVEFRONT_STREAMS": "1", "NESTLEARN_WAVEFRONT_SYNC": "1"},
    "one stream": {"NESTLEARN_WAVEFRONT_STREAMS": "0"},
}


def forward_backward(model: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits, _ = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    if logits.is_cuda:
        torch.cuda.synchronize()
    return logits.detach().clone(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def graphed_forward_backward(model: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``forward_backward`` captured once in a CUDA graph (``bench.run.graphed``, two eager calls
    first) and replayed once."""
    made: list[torch.Tensor] = []

    def step() -> None:
        for q in model.parameters():
            q.grad = None
        logits, _ = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        made.append(logits)  # the last one is the captured step's output

    graphed(lambda: step, warmup=2)()()
    torch.cuda.synchronize()
    return made[-1].detach().clone(), [q.grad.clone() for q in model.parameters() if q.grad is not None]


GRAPHED = {"loop, graphed": None, "one stream, graphed": {"NESTLEARN_WAVEFRONT_STREAMS": "0"},
           "streams, graphed": {"NESTLEARN_WAVEFRONT_STREAMS": "1"}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("specs", nargs="*", default=list(SPECS))
    p.add_argument("--segment", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (no streams there)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench.wavefront_check: needs CUDA (the stream path exists only there)", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for path in a.specs:
        spec = nestlearn.load_spec(path, profile=None, overrides=["model.dim=64", "model.heads=4",
                                                                   f"model.depth={a.depth}"])
        torch.manual_seed(0)
        model = nestlearn.compile(spec).to(dev)
        tokens = torch.randint(0, 256, (2, a.tokens + 1), generator=torch.Generator().manual_seed(3)).to(dev)
        model.set_wavefront(None)
        want_y, want_g = forward_backward(model, tokens)
        again_y, again_g = forward_backward(model, tokens)  # the loop against itself: the noise floor
        rows.append((spec.name, "loop again", relative_error([again_y], [want_y]), relative_error(again_g, want_g)))
        runs = [(name, env, a.segment, forward_backward) for name, env in VARIANTS.items()]
        if dev.type == "cuda":
            runs += [(name, env or {}, None if env is None else a.segment, graphed_forward_backward)
                     for name, env in GRAPHED.items()]
        for name, env, segment, run in runs:
            model.set_wavefront(segment)
            with environ(**env):
                try:
                    y, g = run(model, tokens)
                    rows.append((spec.name, name, relative_error([y], [want_y]), relative_error(g, want_g)))
                except Exception as e:  # noqa: BLE001 - a variant that fails says how
                    rows.append((spec.name, f"{name}: {type(e).__name__}", float("nan"), float("nan")))
        model.set_wavefront(None)
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"\n# wavefront against the block loop, fp32, {where}, torch {torch.__version__}, "
          f"segments of {a.segment} of {a.tokens} tokens, depth {a.depth}")
    print(f"{'spec':14s} {'variant':28s} {'forward diff':>13s} {'grad diff':>11s}")
    for spec_name, name, fy, fg in rows:
        print(f"{spec_name:14s} {name:28s} {fy:13.2e} {fg:11.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
