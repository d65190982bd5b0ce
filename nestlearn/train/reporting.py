"""What a training run shows while it runs: the ``Reporter`` hooks (the CLI's rich bar
implements them) and ``SilentReporter``, the default that shows nothing."""

from __future__ import annotations

from typing import Any, Protocol


class Reporter(Protocol):
    """Hooks for progress display (the CLI's rich bar)."""

    def start(self, info: dict[str, Any]) -> None: ...

    def step(self, record: dict[str, Any]) -> None: ...

    def eval(self, record: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...

    def end(self, summary: dict[str, Any]) -> None: ...


class SilentReporter:
    """Shows nothing (the default)."""

    def start(self, info: dict[str, Any]) -> None:
        pass

    def step(self, record: dict[str, Any]) -> None:
        pass

    def eval(self, record: dict[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def end(self, summary: dict[str, Any]) -> None:
        pass
