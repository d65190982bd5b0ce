"""Spec profiles: named override sets under ``profiles:``, checked at load time, applied by
``load_spec(path, profile=NAME)`` and by ``nestlearn run`` (``cpu`` by itself on a CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import nestlearn
from nestlearn.spec import profile_overrides, spec_json_schema
from nestlearn.train import TrainConfig, train
from nestlearn.train.checkpoint import spec_hash, spec_json
from tests.cli_run import nl

DATA = Path(__file__).parent / "data"
SPEC = DATA / "profiles_tiny.yaml"
BAD = DATA / "profiles_bad.yaml"
PLAIN = DATA / "tiny_run.yaml"
FAST = ["--steps", "2", "--batch", "2", "--seq-len", "16", "--threads", "1", "--eval-batches", "1"]




# ----------------------------------------------------------------------------- the Python API


def test_a_profile_is_applied_on_request_and_resolved_away() -> None:
    as_written = nestlearn.load_spec(SPEC)
    assert as_written.model.dim == 32 and set(as_written.profiles) == {"cpu", "wide"}
    cpu = nestlearn.load_spec(SPEC, profile="cpu")
    assert cpu.model.dim == 16 and cpu.levels["memory"].period == 4 and cpu.block[4].memory.expand == 1
    assert cpu.profiles == {}  # resolved: a run directory records sizes, not choices
    wide = nestlearn.load_spec(SPEC, profile="wide")
    assert wide.model.dim == 48 and wide.levels["memory"].rule.name == "sgd"
    none = nestlearn.load_spec(SPEC, profile="none")
    assert none.model.dim == 32 and none.profiles == {}
    # explicit overrides win over the profile
    assert nestlearn.load_spec(SPEC, ["model.dim=8"], profile="cpu").model.dim == 8
    assert profile_overrides(as_written, "wide") == ["model.dim=48", "levels.memory.rule={name: sgd, lr: 0.01}"]


def test_profiles_do_not_change_the_hash_of_a_spec_without_them() -> None:
    plain = nestlearn.load_spec(PLAIN)
    assert plain.profiles == {} and '"profiles"' not in spec_json(plain)
    # the same model resolved from a spec with profiles hashes the same as written without them
    resolved = nestlearn.load_spec(SPEC, ["name=tiny-run"], profile="none")
    assert spec_hash(resolved) == spec_hash(plain)
    assert "profiles" in spec_json_schema()["properties"]


def test_every_bad_profile_is_reported_at_its_own_position() -> None:
    with pytest.raises(nestlearn.SpecError) as info:
        nestlearn.load_spec(BAD)
    lines = str(info.value).splitlines()
    f = str(BAD)
    assert lines == [
        f"{f}:17:11: profiles.cpu.model.dimm: not a valid override path: unknown field 'dimm' (did you mean 'dim'?)",
        f"{f}:18:18: profiles.cpu.model.depth: expected an integer > 0, got -2",
        f"{f}:19:12: profiles.cpu.levels.memroy.period: not a valid override path: unknown level 'memroy' "
        "(did you mean 'memory'?) (at levels.memroy)",
        f"{f}:20:37: profiles.cpu.levels.memory.rule.lrr: unknown field 'lrr' (did you mean 'lr'?)",
        f"{f}:21:11: profiles.cpu.block.nope.window: not a valid override path: no node with id 'nope' (at block.nope)",
        f"{f}:23:3: profiles.none: the name 'none' is reserved (it means: apply no profile)",
        f"{f}:24:8: profiles.gpu: expected a mapping of overrides {{path.to.key: value}}, got the scalar 5",
    ]


def test_a_bad_profile_fails_even_when_another_is_chosen_and_names_are_checked() -> None:
    with pytest.raises(nestlearn.SpecError, match="profiles.cpu.model.dimm"):
        nestlearn.load_spec(BAD, profile="fine")
    with pytest.raises(nestlearn.SpecError, match=r"profiles: no profile named 'cpuu' \(did you mean 'cpu'\?\); "
                                                  r"the spec defines: cpu, wide"):
        nestlearn.load_spec(SPEC, profile="cpuu")
    with pytest.raises(nestlearn.SpecError, match="no profile named 'cpu': the spec defines no profiles"):
        nestlearn.load_spec(PLAIN, profile="cpu")


def test_a_profile_that_breaks_a_whole_spec_rule_says_so(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC.read_text().replace("cpu: {model.dim: 16,", "cpu: {model.dim: 15,"))
    with pytest.raises(nestlearn.SpecError) as info:
        nestlearn.load_spec(spec)
    assert "model.heads" in str(info.value) and "(with profile 'cpu' applied)" in str(info.value)
    assert "profiles.wide" not in str(info.value)  # the other profile is fine


def test_training_through_the_api_records_the_profile(tmp_path: Path) -> None:
    spec = nestlearn.load_spec(SPEC, profile="cpu")
    train(spec, TrainConfig(steps=1, batch=2, seq_len=16, threads=1, eval_batches=1, profile="cpu"), tmp_path / "r")
    text = (tmp_path / "r" / "spec.yaml").read_text()
    assert text.startswith("# resolved by nestlearn (profile 'cpu' and overrides applied)")
    assert "profiles" not in yaml.safe_load(text) and nestlearn.load_spec(tmp_path / "r" / "spec.yaml") == spec


# ----------------------------------------------------------------------------- nestlearn run


def test_run_applies_the_cpu_profile_by_itself_on_a_cpu(tmp_path: Path) -> None:
    run = tmp_path / "auto"
    code, out = nl("run", SPEC, *FAST, "--device", "cpu", "--out", run)
    assert code == 0, out
    line = ("profile 'cpu' applied because training runs on the CPU: model.dim=16 levels.memory.period=4 "
            "block.mem.memory.expand=1; --profile none trains the spec as written")
    assert [x for x in out.splitlines() if x.startswith("profile ")] == [line]
    resolved = yaml.safe_load((run / "spec.yaml").read_text())
    assert resolved["model"]["dim"] == 16 and "profiles" not in resolved
    assert json.loads((run / "config.json").read_text())["profile"] == "cpu"
    # resume, eval and generate rebuild the profile's sizes from the run directory
    code, out = nl("run", run, "--resume", "--steps", "3", "-q")
    assert code == 0, out
    assert json.loads((run / "summary.json").read_text())["step"] == 3
    code, out = nl("eval", run, "--batches", "1", "--json")
    assert code == 0 and json.loads(out)["step"] == 3, out
    code, out = nl("generate", run, "--prompt", "def ", "--tokens", "4")
    assert code == 0 and out.startswith("def "), out


def test_resuming_from_the_spec_file_keeps_the_run_s_profile(tmp_path: Path) -> None:
    run = tmp_path / "r"
    code, out = nl("run", SPEC, *FAST, "--profile", "wide", "--stop-at", "1", "-q", "--out", run)
    assert code == 0, out
    code, out = nl("run", SPEC, "--out", run, "--resume")  # no --profile: the run's own
    assert code == 0 and "profile 'wide' applied as when the run started" in out, out
    code, out = nl("run", SPEC, "--out", run, "--resume", "--profile", "none", "--steps", "4", "-q")
    assert code == 1 and "another spec" in out and "levels.memory.rule.lr: 0.01 -> '(absent)'" in out, out


def test_profile_none_and_a_named_profile(tmp_path: Path) -> None:
    code, out = nl("run", SPEC, *FAST, "--profile", "none", "--out", tmp_path / "n")
    assert code == 0 and "profile '" not in out, out
    assert yaml.safe_load((tmp_path / "n" / "spec.yaml").read_text())["model"]["dim"] == 32
    assert json.loads((tmp_path / "n" / "config.json").read_text())["profile"] is None
    code, out = nl("run", SPEC, *FAST, "--profile", "wide", "--out", tmp_path / "w")
    assert code == 0 and "profile 'wide' applied (--profile): model.dim=48" in out, out
    assert yaml.safe_load((tmp_path / "w" / "spec.yaml").read_text())["model"]["dim"] == 48


def test_no_cpu_profile_off_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import nestlearn.train.build as build
    from nestlearn.cli.run_cmds import choose_profile

    assert choose_profile(SPEC, None, "auto") == ("cpu", "because training runs on the CPU")
    assert choose_profile(PLAIN, None, "cpu") == ("none", "")
    monkeypatch.setattr(build, "resolve_device", lambda name: torch.device("cuda", 0))
    assert choose_profile(SPEC, None, "auto") == ("none", "")
    assert choose_profile(SPEC, "cpu", "auto") == ("cpu", "(--profile)")


@pytest.mark.parametrize("args, expect", [
    (["--profile", "gpu"], "profiles: no profile named 'gpu'"),
    (["--profile", ""], "--profile: the name is empty"),
])
def test_bad_profile_flags_exit_1(tmp_path: Path, args: list[str], expect: str) -> None:
    code, out = nl("run", SPEC, *FAST, *args, "--out", tmp_path / "x")
    assert code == 1 and expect in out, out
    assert not (tmp_path / "x").exists()


def test_a_bad_profile_in_the_spec_exits_1_before_training(tmp_path: Path) -> None:
    code, out = nl("run", BAD, *FAST, "--out", tmp_path / "x")
    assert code == 1 and f"{BAD}:17:11: profiles.cpu.model.dimm:" in out, out
    assert not (tmp_path / "x").exists()


def test_profile_with_a_run_directory_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert nl("run", SPEC, *FAST, "-q", "--out", run)[0] == 0
    code, out = nl("run", run, "--resume", "--profile", "cpu")
    assert code == 1 and "--profile: " in out and "is a run directory" in out, out


def test_compare_applies_profiles_too(tmp_path: Path) -> None:
    code, out = nl("compare", SPEC, PLAIN, "--steps", "1", "--batch", "2", "--seq-len", "16", "--device", "cpu",
                   "--out", tmp_path / "c")
    assert code == 0, out
    assert f"{SPEC}: profile 'cpu' applied because training runs on the CPU" in out
    rows = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert [r["params"] < 20_000 for r in rows] == [True, False]  # only the first was shrunk
