"""A spec's ``objective: package.module:function`` is checked by ``validate`` and ``compile``
without importing it (a spec from someone else runs no code there); ``run`` imports it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.cli_run import nl

TINY = Path(__file__).parent / "data" / "tiny_run.yaml"


@pytest.fixture()
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A package whose import leaves a mark (a unique name: sys.modules may not hold it)."""
    name = f"nl_user_obj_{tmp_path.name.replace('-', '_')}"
    pkg = tmp_path / "site" / name
    pkg.mkdir(parents=True)
    mark = tmp_path / "imported"
    (pkg / "__init__.py").write_text(f"import pathlib\npathlib.Path({str(mark)!r}).write_text('imported')\n")
    (pkg / "obj.py").write_text("def loss(pred, target):\n    return ((pred - target) ** 2).sum(-1)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield name, mark
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def spec_with(tmp_path: Path, objective: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(TINY.read_text().replace("objective: l2", f"objective: {objective}"))
    return path


def test_validate_and_compile_do_not_import_the_objective(tmp_path: Path, package: tuple[str, Path]) -> None:
    name, mark = package
    spec = spec_with(tmp_path, f"{name}.obj:loss")
    for args in (["validate", spec], ["compile", spec, "--format", "json"], ["compile", spec],
                 ["compile", spec, "levels.memory.grad=first_order", "--graph", tmp_path / "g.dot"]):
        code, out = nl(*args)
        assert code == 0, out
        assert not mark.exists() and name not in sys.modules, args
    assert f"objective {name}.obj:loss" in (tmp_path / "g.dot").read_text()  # the real name, not a stand-in
    code, out = nl("run", spec, "--steps", "1", "--batch", "2", "--seq-len", "16", "--threads", "1", "-q",
                   "--out", tmp_path / "r")
    assert code == 0, out
    assert mark.exists()  # run imports it


@pytest.mark.parametrize(("objective", "message"), [
    ("no_such_pkg_zz.obj:loss", "no installed package 'no_such_pkg_zz' for the objective"),
    ("pkg.obj:not-a-name", "unknown objective"),
])
def test_a_bad_objective_name_is_reported_without_importing(tmp_path: Path, objective: str, message: str) -> None:
    for cmd in ("validate", "compile"):
        code, out = nl(cmd, spec_with(tmp_path, objective))
        assert code == 1 and message in out and "levels.memory.objective" in out, out


def test_objective_check_names_its_position(tmp_path: Path) -> None:
    code, out = nl("validate", spec_with(tmp_path, "no_such_pkg_zz.obj:loss"))
    assert code == 1 and out.startswith(f"{tmp_path / 'spec.yaml'}:7:")


def test_a_missing_function_is_found_when_the_run_imports_it(tmp_path: Path) -> None:
    spec = spec_with(tmp_path, "nestlearn.objectives:l3")  # a valid name: validate cannot know without importing
    assert nl("validate", spec)[0] == 0
    code, out = nl("run", spec, "--steps", "1", "--batch", "2", "--seq-len", "16", "-q", "--out", tmp_path / "r")
    assert code == 1 and "levels.memory.objective" in out and "has no attribute 'l3' (did you mean 'l2'?)" in out, out
