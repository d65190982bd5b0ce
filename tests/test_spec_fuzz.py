"""Random mutations of a valid spec either load, build their graph and compile, or raise SpecError.

Nothing else may escape: no KeyError, TypeError, RecursionError or YAML exception, and every
issue must format as one ``file:line:col: path: message`` line.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nestlearn.graph import build_graph
from nestlearn.spec.errors import SpecError
from nestlearn.spec.loader import parse_spec

DATA = Path(__file__).parent / "data"
TINY = (DATA / "tiny.yaml").read_text()
TINY_BLOCK = (DATA / "tiny_block.yaml").read_text()
DOC = yaml.safe_load(TINY)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = ["x", "n1", "att", "r1", "n2", "mem", "out", "outer", "memory", "proj", "input", "zeros", "adam",
         "sgd", "momentum", "torchopt", "token", "chunk", "l2", "dot", "unroll", "stop", "truncate:2",
         "mlp", "linear", "attention", "memory", "selfmod", "add", "mul", "rmsnorm", "in", "level", "period"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(NAMES),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(NAMES), st.text(max_size=5)), inner, max_size=3),
    ),
    max_leaves=6,
)


def check(text: str, overrides: tuple[str, ...] = ()) -> None:
    """The property: a graph, or a SpecError whose issues are all well formed."""
    try:
        spec = parse_spec(text, "fuzz.yaml", overrides)
        graph = build_graph(spec)
    except SpecError as err:
        assert err.issues, "a SpecError without issues"
        for issue in err.issues:
            line = issue.format()
            assert "\n" not in line and line.startswith(issue.file)
            assert issue.line is None or (isinstance(issue.line, int) and issue.line >= 1)
            assert issue.col is None or (isinstance(issue.col, int) and issue.col >= 1)
        return
    assert graph.order and graph.level_order[-1] == spec.outer_level
    graph.schedule(graph.default_tokens())
    graph.to_dot()
    graph.to_mermaid()
    if compile_spec is not None:  # a spec that passes the checks must compile (weights on 'meta': no memory)
        with torch.device("meta"):
            model = compile_spec(spec)
        assert model.num_parameters() > 0


try:
    from nestlearn.compile import compile_spec
except ImportError:  # pragma: no cover - while the compiler is being written
    compile_spec = None


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def _delete(doc: Any, path: tuple[Any, ...]) -> Any:
    if not path:
        return doc
    parent = _get(doc, path[:-1])
    del parent[path[-1]]
    return doc


@st.composite
def mutated_documents(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(DOC)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["delete", "replace", "swap", "rename", "insert", "retype"]))
        try:
            target = _get(doc, path)
        except (KeyError, IndexError, TypeError):
            continue
        if kind == "delete":
            doc = _delete(doc, path)
        elif kind == "replace":
            doc = _set(doc, path, draw(values))
        elif kind == "swap":
            other = draw(st.sampled_from(paths))
            if other[: len(path)] == path or path[: len(other)] == other:
                continue
            a, b = copy.deepcopy(target), copy.deepcopy(_get(doc, other))
            doc = _set(doc, path, b)
            doc = _set(doc, other, a)
        elif kind == "rename" and isinstance(target, str):
            doc = _set(doc, path, draw(st.sampled_from(NAMES)))
        elif kind == "insert" and isinstance(target, dict):
            target[draw(st.sampled_from(NAMES))] = draw(values)
        elif kind == "insert" and isinstance(target, list):
            target.insert(draw(st.integers(0, len(target))), draw(values))
        elif kind == "retype":
            if isinstance(target, (int, float)) and not isinstance(target, bool):
                doc = _set(doc, path, str(target))
            elif isinstance(target, str):
                doc = _set(doc, path, [target])
            elif isinstance(target, list) and target:
                doc = _set(doc, path, target[0])
            elif isinstance(target, dict):
                doc = _set(doc, path, list(target.values()))
    return doc


@SETTINGS
@given(mutated_documents(), st.booleans())
def test_mutated_documents(doc: Any, flow: bool) -> None:
    check(yaml.safe_dump(doc, default_flow_style=flow, sort_keys=False, allow_unicode=True))


YAML_CHARS = st.sampled_from(list(":{}[],-#&*!|>'\"%@`?~ \n\t") + ["  ", ": ", "- ", "\n  "])


@st.composite
def mutated_texts(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from([TINY, TINY_BLOCK]))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        n = len(text)
        i = draw(st.integers(0, n))
        j = draw(st.integers(i, min(n, i + 12)))
        kind = draw(st.sampled_from(["delete", "insert", "replace", "dup-line", "swap-lines"]))
        if kind == "delete":
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + draw(st.one_of(YAML_CHARS, st.text(max_size=4), st.sampled_from(NAMES))) + text[i:]
        elif kind == "replace":
            text = text[:i] + draw(st.one_of(YAML_CHARS, st.sampled_from(NAMES))) + text[j:]
        else:
            lines = text.split("\n")
            a = draw(st.integers(0, len(lines) - 1))
            b = draw(st.integers(0, len(lines) - 1))
            if kind == "dup-line":
                lines.insert(b, lines[a])
            else:
                lines[a], lines[b] = lines[b], lines[a]
            text = "\n".join(lines)
    return text


@SETTINGS
@given(mutated_texts())
def test_mutated_texts(text: str) -> None:
    check(text)


override_paths = st.lists(
    st.one_of(st.sampled_from(["model", "dim", "levels", "memory", "outer", "rule", "lr", "block", "att", "mem",
                               "window", "in", "0", "3", "9", "-1", "gate", "max", "name", "period"]),
              st.text(max_size=4)),
    min_size=0, max_size=5,
).map(".".join)
override_values = st.one_of(
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()),
    st.text(max_size=6),
)


@SETTINGS
@given(st.lists(st.tuples(override_paths, st.sampled_from(["=", "", "=="]), override_values), max_size=3))
def test_random_overrides(parts: list[tuple[str, str, str]]) -> None:
    check(TINY, tuple(p + eq + v for p, eq, v in parts))
