"""Importing nestlearn's spec side does not import torch (``nestlearn validate`` should not pay
for it): checked in a fresh interpreter, where nothing else has imported torch yet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _torch_free(code: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    check = f"{code}\nimport sys\nloaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n" \
            "assert not loaded, loaded[:5]\n"
    proc = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_spec_loading_does_not_import_torch() -> None:
    _torch_free(
        "import nestlearn, nestlearn.spec\n"
        "from pathlib import Path\n"
        "for path in [*sorted(Path('specs').glob('*.yaml')), Path('models/hope.yaml')]:\n"
        "    nestlearn.load_spec(path, ['model.dim=64'], profile='none')\n"
        "nestlearn.spec.spec_json_schema()\n"
    )


def test_cli_import_does_not_import_torch() -> None:
    _torch_free("import nestlearn.cli")


def test_rules_and_compile_are_still_there() -> None:
    import nestlearn
    import nestlearn.compile.model  # the subpackage's import does not replace nestlearn.compile

    assert callable(nestlearn.compile) and nestlearn.compile.__module__ == "nestlearn"
    assert callable(nestlearn.rules.adam)
