"""``python -m bench.trainer_profile``: the trainer's phases appear, with the model's work in
``forward_backward`` and the trainer's own (data, clipping, the host sync, the optimizer)
beside it."""

from __future__ import annotations

import pytest

from bench import trainer_profile


def test_profile_names_every_phase_of_a_step(capsys: pytest.CaptureFixture[str]) -> None:
    trainer_profile.main(["specs/transformer.yaml", "model.dim=32", "model.depth=1", "--device", "cpu",
                          "--batch", "1", "--seq-len", "32", "--steps", "3", "--skip", "1"])
    out = capsys.readouterr().out
    assert "3 profiled steps" in out
    for name in ("forward_backward", "data", "clip", "host_sync", "optimizer", "record"):
        assert f"nestlearn.{name}" in out, out
