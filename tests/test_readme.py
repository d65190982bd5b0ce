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


def test_readme_says_how_to_train_on_several_gpus(tmp_path: Path) -> None:
    """The torchrun command, how --batch is split, and the run directory's files as a run writes them."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Several GPUs", 1)[1].split("\n## ", 1)[0]
    assert "torchrun --standalone --nproc_per_node 2 -m nestlearn run" in section
    assert "`--batch` is the *global* batch" in section and "`--batch / N`" in section
    listed = set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))
    from tests.cli_run import nl

    code, out = nl("run", ROOT / "tests" / "data" / "tiny_run.yaml", "--steps", "1", "--batch", "2", "--seq-len", "16",
                   "--threads", "1", "-q", "--out", tmp_path / "r")
    assert code == 0, out
    written = {str(p.relative_to(tmp_path / "r")) for p in (tmp_path / "r").rglob("*") if p.is_file()}
    assert listed == written
