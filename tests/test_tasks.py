"""The data layer: determinism, resume, disjoint splits, clear errors, correct labels and masks."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nestlearn.tasks import (
    LANGUAGES,
    Batch,
    ContinualTask,
    NIAHTask,
    TaskError,
    accuracy_by_length,
    get_task,
    load_corpus,
    loss_increase,
    stdlib_corpus,
    task_names,
    task_options,
)
from nestlearn.tasks.corpus import SKIP_DIRS, VAL_EVERY
from nestlearn.tasks.prose import generated_prose

SMALL = {"continual": {"phases": "code,prose,anbn,mqar", "phase_steps": 2}}


def task(name: str, **kw):
    return get_task(name, **{**SMALL.get(name, {}), **kw})


def row_bytes(b: Batch, i: int) -> bytes:
    return bytes(b.inputs[i].tolist() + [int(b.targets[i, -1])])


# ---------------------------------------------------------------- contract: shapes, determinism, resume


@pytest.mark.parametrize("name", task_names())
def test_shapes_dtypes_and_shift(name):
    b = task(name).batch_at(0, 3, 160, seed=1)
    assert b.inputs.shape == b.targets.shape == b.mask.shape == (3, 160)
    assert b.inputs.dtype == b.targets.dtype == torch.long and b.mask.dtype == torch.float32
    assert int(b.inputs.min()) >= 0 and int(b.inputs.max()) < 256
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])
    assert set(b.mask.unique().tolist()) <= {0.0, 1.0} and b.mask.sum() > 0
    for e in task(name).eval_batches(2, 160, 2):
        assert e.shape == (2, 160) and e.mask.sum() > 0


@pytest.mark.parametrize("name", task_names())
def test_deterministic_from_seed_and_global_rng_untouched(name):
    before = torch.get_rng_state()
    a, b = task(name).batch_at(5, 4, 128, seed=7), task(name).batch_at(5, 4, 128, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.inputs, task(name).batch_at(5, 4, 128, seed=8).inputs)
    assert not torch.equal(a.inputs, task(name).batch_at(6, 4, 128, seed=7).inputs)
    e1, e2 = task(name).eval_batches(2, 128, 2), task(name).eval_batches(2, 128, 2)
    assert all(torch.equal(x.inputs, y.inputs) for x, y in zip(e1, e2, strict=True))


@pytest.mark.parametrize("name", ["lm", "mqar", "niah", "anbn", "continual"])
def test_resume_gives_exactly_the_same_batches(name):
    t = task(name)
    stream = t.train_batches(2, 128, seed=3)
    full = [next(stream) for _ in range(6)]
    s2 = t.train_batches(2, 128, seed=3)
    next(s2), next(s2)
    state = s2.state_dict()
    resumed = task(name).train_batches(2, 128, seed=3)
    resumed.load_state_dict(state)
    for k, b in zip(range(2, 6), resumed, strict=False):
        assert torch.equal(b.inputs, full[k].inputs) and torch.equal(b.mask, full[k].mask)
        assert torch.equal(t.batch_at(k, 2, 128, 3).inputs, full[k].inputs)
    assert torch.equal(next(t.train_batches(2, 128, seed=3, start=4)).inputs, full[4].inputs)
    other = t.train_batches(2, 64, seed=3)
    with pytest.raises(TaskError, match="seq_len=128.*64"):
        other.load_state_dict(state)


def test_batch_split_and_shard():
    b = task("mqar").batch_at(0, 4, 32)
    parts = b.split(2)
    assert torch.equal(torch.cat([p.inputs for p in parts]), b.inputs)
    assert torch.equal(b.shard(1, 2).inputs, b.inputs[2:])
    with pytest.raises(TaskError, match="3 equal"):
        b.split(3)


# ---------------------------------------------------------------- corpora and splits


def test_stdlib_corpus_split_by_file_and_disjoint():
    c = stdlib_corpus()
    train = {s.source for s in c.train_spans}
    val = {s.source for s in c.val_spans}
    assert train and val and not train & val
    ordered = sorted(train | val)
    assert {p for i, p in enumerate(ordered) if i % VAL_EVERY == VAL_EVERY - 1} == val
    assert all(p.endswith(".py") and not set(p.split("/")[:-1]) & SKIP_DIRS for p in ordered)
    assert 4e6 < c.train.numel() + c.val.numel() < 10e6
    s = c.val_spans[1]
    assert bytes(c.val[s.offset:s.offset + 200].tolist()) == (
        Path(__import__("sysconfig").get_paths()["stdlib"]) / s.source).read_bytes()[:200]


def _contains(hay: bytes, needle: bytes) -> bool:
    return hay.find(needle) >= 0


def test_folder_split_every_20th_file_and_windows_come_from_their_split(tmp_path):
    for i in range(25):
        (tmp_path / f"d{i % 3}").mkdir(exist_ok=True)
        (tmp_path / f"d{i % 3}" / f"f{i:02d}.txt").write_text(" ".join(f"w{i}.{j}" for j in range(40)) + "\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("hidden")
    c = load_corpus(str(tmp_path))
    names = sorted(s.source for s in c.train_spans + c.val_spans)
    assert "blob.bin" not in names and not any("hidden" in n for n in names) and len(names) == 25
    assert [s.source for s in c.val_spans] == [names[19]]
    t = get_task("lm", data=str(tmp_path))
    val = bytes(c.val.tolist())
    train = bytes(c.train.tolist())
    for b in t.eval_batches(4, 32, 2):
        for i in range(4):
            assert _contains(val, row_bytes(b, i))
    b = t.batch_at(0, 8, 32)
    for i in range(8):
        assert _contains(train, row_bytes(b, i)) and not _contains(val, row_bytes(b, i)[:20])


def test_small_folder_puts_last_file_in_validation(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.md").write_text(f"doc {i} " * 50)
    c = load_corpus(tmp_path)
    assert [s.source for s in c.val_spans] == ["2.md"]
    assert {s.source for s in c.train_spans} == {"0.md", "1.md"}


def test_single_file_last_5_percent_bytes(tmp_path):
    data = bytes(range(32, 127)) * 100
    f = tmp_path / "corpus.txt"
    f.write_bytes(data)
    c = load_corpus(str(f))
    (tr,), (va,) = c.train_spans, c.val_spans
    assert tr.stop == va.start and tr.start == 0 and va.stop == len(data)
    assert va.stop - va.start == len(data) // 20
    assert bytes(c.train.tolist()) + bytes(c.val.tolist()) == data


# ---------------------------------------------------------------- clear errors


def test_bad_data_inputs(tmp_path, monkeypatch):
    with pytest.raises(TaskError, match="does not exist"):
        get_task("lm", data=str(tmp_path / "missing"))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(TaskError, match="is empty"):
        get_task("lm", data=str(tmp_path / "empty.txt"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(TaskError, match="folder .* is empty"):
        get_task("lm", data=str(tmp_path / "emptydir"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.dat").write_bytes(b"\x00\xff" * 50)
    (tmp_path / "bin" / "b.txt").write_bytes(b"")
    with pytest.raises(TaskError, match="no readable text files"):
        get_task("lm", data=str(tmp_path / "bin"))
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(TaskError, match="does not look like text"):
        get_task("lm", data=str(tmp_path / "x.bin"))
    (tmp_path / "tiny.txt").write_text("hello world, " * 10)
    with pytest.raises(TaskError, match="validation split has .* fewer than seq_len"):
        get_task("lm", data=str(tmp_path / "tiny.txt")).eval_batches(2, 64, 1)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(TaskError, match="needs the optional 'datasets' package"):
        get_task("lm", data="hf:wikitext")


def test_bad_task_names_and_options():
    with pytest.raises(TaskError, match=r"unknown task 'mqr' \(did you mean 'mqar'.*choices: lm, mqar"):
        get_task("mqr")
    with pytest.raises(TaskError, match=r"no option 'n_pair' \(did you mean 'n_pairs'\?\); options: n_pairs"):
        get_task("mqar", n_pair=3)
    with pytest.raises(TaskError, match="option 'n_pairs' expects int"):
        get_task("mqar", n_pairs="many")
    assert get_task("mqar", n_pairs="8").options["n_pairs"] == 8
    assert get_task("niah", depth="0.5", length="none").options["depth"] == 0.5
    assert get_task("anbn", pack="false").options["pack"] is False
    c = get_task("continual", phases="code,anbn", phase_steps="3,4")
    assert c.phases == ["code", "anbn"] and c.phase_steps == [3, 4]
    assert "n_keys" in task_options("niah")
    cases = [
        (lambda: get_task("mqar", n_pairs=200), "n_pairs must be in"),
        (lambda: get_task("mqar", n_pairs=40).batch_at(0, 1, 64), "need seq_len >= 159"),
        (lambda: get_task("mqar", n_pairs=4, n_queries=5).batch_at(0, 1, 64), "cannot exceed"),
        (lambda: get_task("niah").batch_at(0, 1, 40), "seq_len must be at least"),
        (lambda: get_task("niah", length=10), "length must be at least"),
        (lambda: get_task("niah", depth=2.0), "depth must be in"),
        (lambda: get_task("anbn", min_len=5, max_len=2), "min_len <= max_len"),
        (lambda: get_task("anbncn", min_len=4, max_len=5), "no positive strings"),
        (lambda: get_task("anbn", max_len=40).batch_at(0, 1, 2), "seq_len must be at least 3"),
        (lambda: get_task("parity").batch_at(0, 0, 8), "batch size must be at least 1"),
        (lambda: get_task("continual", phases="code,prse"), r"unknown domain 'prse' \(did you mean 'prose'"),
        (lambda: get_task("continual", phases="code,prose", phase_steps=[1]), "2 phases but 1"),
        (lambda: get_task("continual", phase_steps=0), "at least one step"),
        (lambda: loss_increase([[1.0, 2.0]], ["code", "prose"]), "expected a 2 x 2 matrix"),
    ]
    for fn, msg in cases:
        with pytest.raises(TaskError, match=msg):
            fn()


# ---------------------------------------------------------------- formal languages: labels and masks


def recognise(lang: str, s: str) -> bool:
    """Plain recognisers, independent of the library's."""
    if lang == "parity":
        ones = 0
        for ch in s:
            assert ch in "01"
            ones += ch == "1"
        return ones % 2 == 1
    if lang == "aa_star":
        return all(ch == "a" for ch in s) and len(s) % 2 == 0
    if lang == "abab_star":
        return len(s) % 4 == 0 and all(ch == "ab"[i % 2] for i, ch in enumerate(s))
    k = len(s) // (2 if lang == "anbn" else 3)
    symbols = "ab" if lang == "anbn" else "abc"
    return len(s) == k * len(symbols) and s == "".join(c * k for c in symbols)


def examples(b: Batch, i: int) -> list[tuple[str, str, int]]:
    """(string, label, input position of '=') of every complete example in row i."""
    row = row_bytes(b, i).decode("latin1")
    out, pos = [], 0
    for m in re.finditer(r"([a-c01]*)=([01])", row):
        assert m.start() == pos, f"unexpected bytes in {row!r}"
        out.append((m.group(1), m.group(2), m.end(1)))
        pos = m.end() + 1
    assert row[pos - 1:].strip("\n\x00") == "", row
    return out


@pytest.mark.parametrize("lang", list(LANGUAGES))
def test_formal_labels_masks_and_balance(lang):
    t = get_task(lang, min_len=1, max_len=24)
    labels, neg_lengths = [], []
    for step in range(8):
        b = t.batch_at(step, 8, 200, seed=step)
        for i in range(8):
            ex = examples(b, i)
            assert ex
            expected_mask = torch.zeros(200)
            for s, label, eq in ex:
                assert 1 <= len(s) <= 24
                assert (label == "1") == recognise(lang, s), (lang, s, label)
                expected_mask[eq] = 1.0
                labels.append(label == "1")
                if label == "0":
                    neg_lengths.append(len(s))
            assert torch.equal(b.mask[i], expected_mask)
            assert set(b.targets[i][b.mask[i] > 0].tolist()) <= {ord("0"), ord("1")}
    frac = sum(labels) / len(labels)
    assert 0.4 < frac < 0.6, frac
    if lang == "anbn":
        assert all(n % 2 == 0 for n in neg_lengths)
    if lang == "anbncn":
        assert all(n % 3 == 0 for n in neg_lengths)


@settings(max_examples=25, deadline=None)
@given(lang=st.sampled_from(list(LANGUAGES)), seed=st.integers(0, 2**40), max_len=st.integers(4, 60))
def test_formal_labels_property(lang, seed, max_len):
    b = get_task(lang, max_len=max_len, pack=False).batch_at(seed % 97, 4, max_len + 3, seed=seed)
    for i in range(4):
        ((s, label, eq),) = examples(b, i)
        assert (label == "1") == recognise(lang, s) and b.mask[i].sum() == 1 and b.mask[i, eq] == 1


# ---------------------------------------------------------------- MQAR and NIAH


def test_mqar_mask_selects_exactly_the_answers():
    b = get_task("mqar", n_pairs=10, n_queries=6).batch_at(3, 4, 50)
    for i in range(4):
        x = b.inputs[i].tolist()
        pairs = dict(zip(x[0:20:2], x[1:20:2], strict=True))
        assert len(pairs) == 10 and all(k >= 128 for k in pairs) and all(1 <= v < 128 for v in pairs.values())
        idx = b.mask[i].nonzero().flatten().tolist()
        assert idx == list(range(20, 32, 2))
        for p in idx:
            assert int(b.targets[i, p]) == pairs[x[p]]
        assert b.inputs[i, 33:].eq(0).all()


def test_niah_passkey_mask_and_multikey():
    t = get_task("niah", n_keys=4, digits=6)
    b = t.batch_at(0, 3, 700)
    for i in range(3):
        text = row_bytes(b, i).decode()
        m = re.search(r"What is the pass key for (\w+)\? The pass key for \1 is (\d{6})$", text)
        assert m, text[-120:]
        needles = dict(re.findall(r"The pass key for (\w+) is (\d{6})\. Remember it\.", text))
        assert len(needles) == 4 and needles[m.group(1)] == m.group(2)
        idx = b.mask[i].nonzero().flatten().tolist()
        assert idx == list(range(694, 700))
        assert bytes(b.targets[i, idx].tolist()).decode() == m.group(2)
    fixed = get_task("niah", length=300, depth=0.0).batch_at(0, 2, 64)
    assert fixed.shape == (2, 300)
    assert row_bytes(fixed, 0).decode().startswith(" The pass key is")
    end = get_task("niah", length=300, depth=1.0).batch_at(0, 1, 64)
    assert re.search(r"the pass key\.\n\nWhat is", row_bytes(end, 0).decode())


def _passkey_oracle(inputs: torch.Tensor) -> torch.Tensor:
    logits = torch.zeros(*inputs.shape, 256)
    for i in range(inputs.shape[0]):
        key = re.search(rb"The pass key is (\d+)\.", bytes(inputs[i].tolist())).group(1)
        for j, d in enumerate(key):
            logits[i, inputs.shape[1] - len(key) + j, d] = 10.0
    return logits


def test_niah_accuracy_by_length():
    assert accuracy_by_length(_passkey_oracle, [128, 512], batch=2) == {128: 1.0, 512: 1.0}
    zero = NIAHTask().accuracy_by_length(lambda x: torch.zeros(*x.shape, 256), [256], batch=2,
                                         metric="accuracy")
    assert zero == {256: 0.0}


# ---------------------------------------------------------------- metrics


def test_metrics_lm_and_synthetic():
    lm = get_task("lm")
    b = lm.batch_at(0, 2, 32)
    m = lm.metrics(torch.zeros(2, 32, 256), b)
    assert m["loss"] == pytest.approx(math.log(256), rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(8.0, rel=1e-5)
    assert m["perplexity"] == pytest.approx(256, rel=1e-3)
    syn = get_task("mqar", n_pairs=4)
    b = syn.batch_at(0, 2, 32)
    perfect = torch.nn.functional.one_hot(b.targets, 256).float() * 20
    noisy = perfect.clone()
    noisy[b.mask == 0] = torch.randn(int((b.mask == 0).sum()), 256)
    for logits in (perfect, noisy):
        m = syn.metrics(logits, b)
        assert m["accuracy"] == 1.0 and m["sequence_accuracy"] == 1.0 and m["loss"] < 1e-6
    assert torch.allclose(syn.loss(perfect, b), syn.loss(noisy, b))
    wrong = perfect.clone()
    wrong[0, b.mask[0].nonzero()[0, 0]] = 0.0  # first answer of row 0 now uniform -> argmax 0
    m = syn.metrics(wrong, b)
    assert m["accuracy"] == pytest.approx(7 / 8) and m["sequence_accuracy"] == 0.5
    pooled = syn.evaluate(lambda x: torch.zeros(*x.shape, 256), syn.eval_batches(2, 32, 3))
    assert pooled["loss"] == pytest.approx(math.log(256), rel=1e-5)


# ---------------------------------------------------------------- continual


def test_continual_phases_domains_and_forgetting():
    c = get_task("continual", phases="code,prose,anbn", phase_steps=[2, 3, 1])
    assert isinstance(c, ContinualTask) and c.phase_ends() == [2, 5, 6] and c.total_steps == 6
    assert [c.domain_of_step(s) for s in range(8)] == ["code"] * 2 + ["prose"] * 3 + ["anbn"] * 3
    assert torch.equal(c.batch_at(3, 2, 64).inputs, c.task("prose").batch_at(3, 2, 64).inputs)
    assert c.batch_at(0, 2, 64).mask.all() and not c.batch_at(5, 2, 64).mask.all()
    code, prose = c.task("code").corpus, c.task("prose").corpus  # type: ignore[attr-defined]
    assert not {s.source for s in code.train_spans} & {s.source for s in prose.train_spans}
    ev = c.eval_batches(2, 64, 2, domain="anbn")
    assert len(ev) == 2 and len(c.eval_batches(2, 64, 1)) == 3
    res = c.evaluate_domains(lambda x: torch.zeros(*x.shape, 256), 2, 64, 1)
    assert set(res) == {"code", "prose", "anbn"}
    assert "accuracy" in res["anbn"] and "bits_per_byte" in res["code"]
    losses = [[1.0, 5.0, 5.0], [1.5, 2.0, 5.0], [2.0, 2.5, 0.5]]
    assert c.loss_increase(losses) == {"code": 1.0, "prose": 0.5, "mean": 0.75}
    assert loss_increase(torch.tensor([[1.0, 3.0], [2.0, 1.0], [4.0, 0.0]]), ["a", "b", "a"]) == {"b": -1.0,
                                                                                          "mean": -1.0}
    with pytest.raises(TaskError, match="not one of this run's phases"):
        c.eval_batches(2, 64, 1, domain="mqar")


def test_generated_prose_is_deterministic_and_digit_free():
    a, b = generated_prose(5000, 1), generated_prose(5000, 1)
    assert a == b and a != generated_prose(5000, 2) and len(a) >= 5000
    assert not re.search(rb"\d", a)
    c = get_task("continual", phases="prose,code", prose="generated")
    tr, va = (bytes(x[:400].tolist()) for x in (c.task("prose").corpus.train, c.task("prose").corpus.val))
    assert tr != va
