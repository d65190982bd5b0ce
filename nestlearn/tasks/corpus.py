"""Byte corpora with a train/validation split that never overlaps.

Sources: the Python standard library's own ``.py`` files (the embedded default: it exists wherever
Python does), a text file or folder (``--data PATH``), or a Hugging Face dataset (``hf:NAME``).
Folders and the stdlib are split by FILE (every 20th file goes to validation); a single file is
split by bytes (the last 5%).
"""

from __future__ import annotations

import codecs
import functools
import os
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .base import TaskError

DEFAULT_BUDGET = 8 * 1024 * 1024
VAL_EVERY = 20  # file i goes to validation when i % VAL_EVERY == VAL_EVERY - 1
VAL_FRACTION = 0.05  # single file: the last 5% of its bytes
SEPARATOR = b"\n\n"
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                       "pydoc_data", "node_modules"})
_SNIFF = 64 * 1024


@dataclass(frozen=True)
class Span:
    """``source[start:stop]`` (bytes of one file or record) sits at ``offset`` in its split."""

    source: str
    start: int
    stop: int
    offset: int


@dataclass
class Corpus:
    name: str
    train: Tensor  # uint8 [N]
    val: Tensor  # uint8 [M]
    train_spans: list[Span] = field(default_factory=list)
    val_spans: list[Span] = field(default_factory=list)

    def describe(self) -> str:
        nt, nv = len({s.source for s in self.train_spans}), len({s.source for s in self.val_spans})
        return (f"{self.name}: train {self.train.numel() / 1e6:.2f} MB ({nt} sources), "
                f"validation {self.val.numel() / 1e6:.2f} MB ({nv} sources)")


def _to_tensor(chunks: list[bytes]) -> Tensor:
    data = SEPARATOR.join(chunks)
    if not data:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _spans(items: list[tuple[str, bytes]]) -> list[Span]:
    out, off = [], 0
    for name, data in items:
        out.append(Span(name, 0, len(data), off))
        off += len(data) + len(SEPARATOR)
    return out


def split_items(name: str, items: list[tuple[str, bytes]]) -> Corpus:
    """Split named documents by document: every 20th to validation (the last one if fewer than 20)."""
    items = [(n, d) for n, d in items if d]
    if len(items) < 2:
        raise TaskError(f"{name}: need at least two non-empty documents to split by document")
    val_idx = {i for i in range(len(items)) if i % VAL_EVERY == VAL_EVERY - 1} or {len(items) - 1}
    train = [it for i, it in enumerate(items) if i not in val_idx]
    val = [it for i, it in enumerate(items) if i in val_idx]
    return Corpus(name, _to_tensor([d for _, d in train]), _to_tensor([d for _, d in val]),
                  _spans(train), _spans(val))


def split_bytes(name: str, source: str, data: bytes) -> Corpus:
    """Split one document by bytes: the last 5% (at least one byte) is validation."""
    if len(data) < 2:
        raise TaskError(f"{source}: too small to split into train and validation ({len(data)} bytes)")
    cut = len(data) - max(1, int(len(data) * VAL_FRACTION))
    return Corpus(name, _to_tensor([data[:cut]]), _to_tensor([data[cut:]]),
                  [Span(source, 0, cut, 0)], [Span(source, cut, len(data), 0)])


def _walk(root: Path, suffixes: tuple[str, ...] | None, skip: frozenset[str]) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=None):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        for f in filenames:
            if f.startswith(".") or (suffixes is not None and not f.endswith(suffixes)):
                continue
            found.append(Path(dirpath) / f)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_budget(paths: Iterable[Path], root: Path, budget: int | None,
                 text_only: bool) -> list[tuple[str, bytes]]:
    items: list[tuple[str, bytes]] = []
    total = 0
    for p in paths:
        if budget is not None and total >= budget:
            break
        try:
            data = p.read_bytes()
        except OSError:
            continue
        if not data or (text_only and not is_text(data)):
            continue
        items.append((p.relative_to(root).as_posix(), data))
        total += len(data)
    return items


def is_text(data: bytes) -> bool:
    """Text-like: no NUL byte and valid UTF-8 in the first 64 KB."""
    head = data[:_SNIFF]
    if b"\x00" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(data) <= _SNIFF)
    except UnicodeDecodeError:
        return False
    return True


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted by relative path, test folders skipped."""
    return _walk(stdlib_root(), (".py",), SKIP_DIRS)


@functools.lru_cache(maxsize=4)
def stdlib_corpus(budget: int = DEFAULT_BUDGET) -> Corpus:
    """The embedded default corpus: the stdlib's sorted ``.py`` files up to ``budget`` bytes."""
    root = stdlib_root()
    items = _read_budget(stdlib_files(), root, budget, text_only=False)
    if len(items) < 2:
        raise TaskError(f"no Python standard library sources found under {root}; "
                        "pass a corpus with --data PATH")
    return split_items("python-stdlib", items)


def path_corpus(path: str | Path, max_bytes: int | None = None) -> Corpus:
    """A text file (split by bytes) or a folder of text-like files (split by file, recursively)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TaskError(f"data path '{path}' does not exist")
    if p.is_file():
        try:
            data = p.read_bytes()
        except OSError as e:
            raise TaskError(f"cannot read data file '{path}': {e.strerror or e}") from None
        if not data:
            raise TaskError(f"data file '{path}' is empty")
        if not is_text(data):
            raise TaskError(f"data file '{path}' does not look like text (binary or not UTF-8)")
        return split_bytes(p.name, p.name, data[:max_bytes] if max_bytes else data)
    if not p.is_dir():
        raise TaskError(f"data path '{path}' is neither a file nor a folder")
    files = _walk(p, None, frozenset({"__pycache__", "node_modules"}))
    if not files:
        raise TaskError(f"data folder '{path}' is empty")
    items = _read_budget(files, p, max_bytes, text_only=True)
    if not items:
        raise TaskError(f"data folder '{path}' has no readable text files ({len(files)} files, all empty, "
                        "binary or not UTF-8)")
    if len(items) == 1:
        return split_bytes(p.name, items[0][0], items[0][1])
    return split_items(p.name, items)


def hf_corpus(spec: str, max_bytes: int | None = 64 * 1024 * 1024) -> Corpus:
    """``NAME`` or ``NAME:CONFIG`` of a Hugging Face dataset with a text column (needs ``datasets``)."""
    name, _, config = spec.partition(":")
    if not name:
        raise TaskError("hf: needs a dataset name, e.g. hf:wikitext:wikitext-2-raw-v1")
    try:
        import datasets  # optional extra
    except ImportError:
        raise TaskError(f"hf:{spec} needs the optional 'datasets' package: "
                        "pip install 'nestlearn[hub]'") from None
    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as e:  # network, unknown name, missing config ...
        raise TaskError(f"could not load Hugging Face dataset '{spec}' ({type(e).__name__}: {e}); "
                        "check the name and that you are online") from None
    splits = list(ds.keys()) if hasattr(ds, "keys") else []
    if "train" not in splits:
        raise TaskError(f"Hugging Face dataset '{spec}' has no 'train' split (splits: {', '.join(splits)})")
    train_ds = ds["train"]
    column = "text" if "text" in train_ds.column_names else next(
        (c for c, f in train_ds.features.items() if getattr(f, "dtype", None) == "string"), None)
    if column is None:
        raise TaskError(f"Hugging Face dataset '{spec}' has no text column "
                        f"(columns: {train_ds.column_names})")

    def records(split: Any, budget: int | None) -> list[tuple[str, bytes]]:
        out, total = [], 0
        for i, row in enumerate(split):
            if budget is not None and total >= budget:
                break
            data = str(row[column]).encode("utf-8")
            out.append((f"{i}", data))
            total += len(data)
        return out

    held = next((s for s in ("validation", "valid", "test") if s in splits), None)
    if held is None:
        return split_items(f"hf:{spec}", records(train_ds, max_bytes))
    train, val = records(train_ds, max_bytes), records(ds[held], max_bytes)
    train, val = [(f"train/{n}", d) for n, d in train if d], [(f"{held}/{n}", d) for n, d in val if d]
    if not train or not val:
        raise TaskError(f"Hugging Face dataset '{spec}' has an empty train or {held} split")
    return Corpus(f"hf:{spec}", _to_tensor([d for _, d in train]), _to_tensor([d for _, d in val]),
                  _spans(train), _spans(val))


def load_corpus(data: str | Path | None = None, max_bytes: int | None = None) -> Corpus:
    """Dispatch: ``None`` -> stdlib default, ``hf:NAME[:CONFIG]`` -> hub, anything else -> a path."""
    if data is None or str(data) == "":
        return stdlib_corpus(max_bytes or DEFAULT_BUDGET)
    if str(data).startswith("hf:"):
        return hf_corpus(str(data)[3:], max_bytes) if max_bytes else hf_corpus(str(data)[3:])
    return path_corpus(data, max_bytes)
