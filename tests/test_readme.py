"""The README's Python example runs as written (a newcomer copies it first)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_blocks_run(monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _python_blocks((ROOT / "README.md").read_text())
    assert blocks, "the README lost its Python example"
    monkeypatch.chdir(ROOT)  # the example opens specs/ by relative path
    for code in blocks:
        namespace: dict[str, object] = {"__name__": "readme"}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
        if "model" in namespace:  # the swapped rule and the oracle executor still run a forward
            import torch

            model = namespace["model"]
            logits, _ = model(torch.randint(0, 256, (1, 16)))  # type: ignore[operator]
            assert torch.isfinite(logits).all()


def test_readme_inspects_a_level() -> None:
    """The README shows the documented way to read a level's fast weights and initial memory."""
    text = (ROOT / "README.md").read_text()
    code = "\n".join(_python_blocks(text))
    assert ".params(state)" in code and ".init" in code and "state[" not in code
