"""Importing nestlearn's spec side does not import torch (``nestlearn validate`` should not pay
for it): checked in a fresh interpreter, where nothing else has imported torch yet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STAGES = """
import sys
from pathlib import Path

def torch_loaded(stage):
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    assert not loaded, f"{stage} imported torch ({', '.join(loaded[:3])}, ...)"

import nestlearn, nestlearn.spec
for path in [*sorted(Path("specs").glob("*.yaml")), Path("models/hope.yaml")]:
    nestlearn.load_spec(path, ["model.dim=64"], profile="none")
nestlearn.spec.spec_json_schema()
torch_loaded("loading every shipped spec")
import nestlearn.cli
torch_loaded("import nestlearn.cli")
"""


def test_spec_loading_and_the_cli_do_not_import_torch() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", STAGES], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_rules_and_compile_are_still_there() -> None:
    import nestlearn
    import nestlearn.compile.model  # the subpackage's import does not replace nestlearn.compile

    assert callable(nestlearn.compile) and nestlearn.compile.__module__ == "nestlearn"
    assert callable(nestlearn.rules.adam)


BUILD_AND_RUN = """
import sys
import torch
import nestlearn

model = nestlearn.compile("models/hope.yaml", ["model.dim=32", "model.depth=2", "model.heads=2"])
model.set_wavefront(8)
model(torch.randint(0, 256, (1, 24)))[0].sum().backward()
loaded = sorted(m for m in sys.modules if m in ("triton", "torch._dynamo", "torch._inductor"))
assert not loaded, f"building and running a model on the CPU imported {loaded}"
"""


def test_building_and_running_a_model_imports_neither_triton_nor_dynamo() -> None:
    """Not on the CPU path: triton imported before ``tests/test_triton_dgd.py`` sets
    ``TRITON_INTERPRET`` would skip every kernel test, and dynamo costs seconds of import."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", BUILD_AND_RUN], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
