"""HOPE's training step through its kernels *and* the wavefront, against the closed forms in the
block loop (CPU: the kernels interpreted).

The wavefront calls each block once per segment and hands each level's state from one call to
the next, so the kernels' autograd nodes then chain across calls: the CMS kernel's
rebuilt-weights node starts its backward walk from end weights that the next segment's node took
as its start weights, and the DGD kernel's node likewise. Each kernel's tests check one call
against its closed form; this one checks the chain, which a full-size GPU run had used when it
diverged (docs/training-health.md, section 7)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from nestlearn.loops import cms_triton, dgd_triton
from tests.triton_interpret import import_kernels, kernel_for_test, rel_err

_KERNEL, _WHY = import_kernels("nestlearn.loops.triton.dgd_mlp", "nestlearn.loops.triton.dgd_mlp_bwd",
                               "nestlearn.loops.triton.sgd_mlp", "nestlearn.loops.triton.sgd_mlp_bwd",
                               "nestlearn.loops.triton.sgd_mlp_rev")
ROOT = Path(__file__).resolve().parents[1]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4  # relative to each gradient's largest entry; fp32 rounding gives ~1e-6


@pytest.fixture
def kernels(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return kernel_for_test(_KERNEL, _WHY, monkeypatch)


def test_kernels_chained_over_wavefront_segments_equal_the_closed_forms(
        kernels: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """models/hope.yaml at width 32, depth 2, 64 tokens: one training step with the DGD and CMS
    kernels (device checks lifted) over wavefront segments of 32 tokens -- two chunks of the fast
    CMS level per call, so its rebuilt-weights node chains; one chunk of ``cms_mid``; a partial
    chunk of ``cms_slow`` -- has the loss and every parameter gradient of the closed forms run
    over the whole sequence in the block loop."""
    import nestlearn

    torch.manual_seed(0)
    monkeypatch.setenv("NESTLEARN_CMS_TRITON", "1")
    monkeypatch.setenv("NESTLEARN_TRITON", "1")
    monkeypatch.setattr(cms_triton, "_said", True)
    monkeypatch.setattr(dgd_triton, "_said", True)
    overrides = ["model.dim=32", "model.depth=2", "model.heads=2", "levels.cms_mid.period=32",
                 "levels.cms_slow.period=128"]
    model = nestlearn.compile(ROOT / "models" / "hope.yaml", overrides).to(DEV)
    tokens = torch.randint(0, 256, (2, 65), device=DEV)
    calls = {"cms": 0, "rev": 0, "dgd": 0}
    import nestlearn.loops.triton.sgd_mlp_rev as rev

    real_cms, real_dgd, real_rev = cms_triton._run_kernel, dgd_triton._run_kernel, rev.sgd_mlp_chunks

    def count(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a: Any, **kw: Any) -> Any:
            calls[name] += 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(cms_triton, "_run_kernel", count("cms", real_cms))
    monkeypatch.setattr(dgd_triton, "_run_kernel", count("dgd", real_dgd))
    monkeypatch.setattr(rev, "sgd_mlp_chunks", count("rev", real_rev))

    def step(kernel: bool, segment: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        monkeypatch.setattr(cms_triton, "supports", lambda pb: kernel and cms_triton.shape_ok(pb)
                            and cms_triton._tensors_ok(pb) and cms_triton._grad_ok(pb, cms_triton._tensors(pb)))
        monkeypatch.setattr(dgd_triton, "supports", lambda pb: kernel and dgd_triton._shape_ok(pb)
                            and dgd_triton._tensors_ok(pb) and dgd_triton._grad_ok(pb, dgd_triton._tensors(pb)))
        model.set_wavefront(segment)
        model.zero_grad()
        out, _ = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step(True, 32)
    assert calls["dgd"] >= 4 and calls["cms"] >= 4 and calls["rev"] >= 4  # each block, each segment
    loss_ref, grads_ref = step(False, None)
    assert rel_err(loss, loss_ref) < TOL and grads.keys() == grads_ref.keys()
    errs = {n: rel_err(grads[n], g) for n, g in grads_ref.items() if g.abs().max() > 0}
    assert max(errs.values()) < TOL, sorted(errs.items(), key=lambda e: -e[1])[:5]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("streams", ["1", "0"])
def test_gpu_streams_with_the_kernels_equal_the_block_loop(
        kernels: ModuleType, streams: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU, HOPE at width 64 (heads of 16, so the DGD and CMS kernels serve it as they
    would at full size) over 4 blocks and wavefront segments of 64 tokens, each block on its own
    stream (``streams=1``) or all on one: a training step's loss and every gradient equal the
    block loop's, kernels in both, fp32."""
    import nestlearn

    monkeypatch.setenv("NESTLEARN_WAVEFRONT_STREAMS", streams)
    assert torch.get_float32_matmul_precision() == "highest"  # fp32 products, kernels included
    torch.manual_seed(0)
    model = nestlearn.compile(ROOT / "models" / "hope.yaml", ["model.dim=64", "model.heads=4", "model.depth=4"]).cuda()
    tokens = torch.randint(0, 256, (4, 513), device="cuda")

    def step(segment: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.set_wavefront(segment)
        model.zero_grad()
        out, _ = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want = step(None)
    for _ in range(3):  # a race would not strike every time
        loss, got = step(64)
        assert rel_err(loss, want_loss) < TOL
        errs = {n: rel_err(got[n], g) for n, g in want.items() if g.abs().max() > 0}
        assert max(errs.values()) < TOL, sorted(errs.items(), key=lambda e: -e[1])[:5]
