"""``nestlearn.units``: sizes and counts to three significant digits, every boundary."""

from __future__ import annotations

import pytest

from nestlearn.units import bytes_text, count_text


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.00 KB"), (160.5 * 1024, "160 KB"), (9.99 * 2**20, "9.99 MB"),
    (9.996 * 2**20, "10.0 MB"), (99.94 * 2**10, "99.9 KB"), (99.96 * 2**10, "100 KB"), (2**20, "1.00 MB"),
    (64 * 2**30, "64.0 GB"), (1500 * 2**30, "1500 GB"),
])
def test_bytes_text(n: float, text: str) -> None:
    assert bytes_text(n) == text


@pytest.mark.parametrize(("n", "text"), [(999, "999"), (1000, "1.00K"), (528_384, "528K"), (4_194_304, "4.19M"),
                                         (21_797_452, "21.8M"), (99_950_000, "100M"), (2 * 10**9, "2.00G")])
def test_count_text(n: int, text: str) -> None:
    assert count_text(n) == text
