"""bench/report.py on synthetic rows: best-of selection, ratios, crossover and its extrapolation."""

from __future__ import annotations

import pytest

from bench.report import best, crossover, report


def row(name: str, impl: str, seq: int, tps: float, batch: int = 1, status: str = "ok") -> dict:
    return {"name": name, "impl": impl, "batch": batch, "seq": seq, "status": status, "tokens_per_s": tps}


def test_crossover_measured_is_first_length_where_hope_catches_up() -> None:
    hope = {2048: 50e3, 8192: 60e3, 16384: 70e3, 32768: 70e3}
    gpt = {2048: 300e3, 8192: 100e3, 16384: 70e3, 32768: 40e3}
    assert crossover(hope, gpt) == (16384, None)


def test_crossover_extrapolates_gpt_as_linear_seconds_per_token() -> None:
    # GPT s/token 1/100e3 at 32768, 1/60e3 at 65536: slope 1/(150e3 * 32768), intercept 1/300e3;
    # HOPE flat at 40K (s/token 1/40e3): T = (1/40e3 - 1/300e3) * 150e3 * 32768 = 3.25 * 32768.
    hope = {16384: 40e3, 32768: 40e3, 65536: 40e3}
    gpt = {16384: 200e3, 32768: 100e3, 65536: 60e3}
    measured, extrapolated = crossover(hope, gpt)
    assert measured is None
    assert extrapolated == pytest.approx(106496.0)  # = 32768 * 3.25


def test_crossover_extrapolates_past_hopes_longest_measured_length() -> None:
    """HOPE measured only at short lengths: held flat at its longest one, GPT's longest two fit."""
    hope = {2048: 40e3, 8192: 40e3}
    gpt = {2048: 900e3, 8192: 800e3, 32768: 100e3, 65536: 60e3}
    assert crossover(hope, gpt) == (None, pytest.approx(106496.0))


def test_crossover_none_without_two_common_lengths_or_slowdown() -> None:
    assert crossover({2048: 1.0}, {2048: 2.0}) == (None, None)
    assert crossover({2048: 1.0, 4096: 1.0}, {2048: 2.0, 4096: 3.0}) == (None, None)
    assert crossover({}, {2048: 2.0}) == (None, None)


def test_best_takes_fastest_ok_batch1_row_per_length() -> None:
    rows = [
        row("hope", "nestlearn", 2048, 10e3),
        row("hope", "nestlearn+graph", 2048, 30e3),
        row("hope-c64", "nestlearn", 2048, 20e3),
        row("hope-c16", "nestlearn", 2048, 99e3, status="OOM"),
        row("hope", "nestlearn", 2048, 99e3, batch=8),
        row("hope", "kmccleary-hope", 2048, 99e3),
    ]
    assert best(rows, ("hope", "hope-c16", "hope-c64"), "nestlearn") == {2048: (30e3, "hope nestlearn+graph")}
    assert best(rows, ("hope",), "kmccleary-hope") == {2048: (99e3, "hope kmccleary-hope")}


def test_report_ratios_targets_and_extrapolation() -> None:
    rows = [
        row("hope", "nestlearn", 32768, 400e3), row("hope", "nestlearn+graph", 65536, 400e3),
        row("gpt", "nestlearn", 32768, 1000e3), row("gpt", "nestlearn", 65536, 600e3),
        row("gpt", "nestlearn", 2048, 5000e3, batch=8),
        row("hope", "kmccleary-hope", 65536, 30e3), row("hope", "kmccleary-hope-3cms", 65536, 35e3),
    ]
    text = report(rows)
    assert "at 65536: HOPE/kmccleary 11.43x (target >= 10x: met)" in text
    assert "at 65536: HOPE/GPT 0.67x (target >= 3x: not met)" in text
    assert "none up to 65536; extrapolation: ~106,496 tokens" in text


def test_report_measured_crossover_and_missing_rows() -> None:
    rows = [row("hope-c16", "nestlearn", 16384, 90e3), row("gpt", "nestlearn+graph", 16384, 80e3)]
    text = report(rows)
    assert "crossover (HOPE >= GPT): 16384 tokens (first measured length" in text
    assert "at 65536: no HOPE row" in text
    assert "no HOPE (ours) rows" in report([row("gpt", "nestlearn", 2048, 1.0)])
