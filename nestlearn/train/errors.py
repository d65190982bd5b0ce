"""The one error type a training run can cause (bad flags, run directories, checkpoints, divergence).

``str(err)`` is the whole user-facing message; the CLI prints it and exits with code 1.
"""

from __future__ import annotations


class TrainError(Exception):
    """A user-facing error of the training machinery: one clear message, never a traceback."""


class CheckpointError(TrainError):
    """A checkpoint that is missing, corrupt, or written by another spec."""


class DivergedError(TrainError):
    """The loss or the gradients became non-finite; the last good checkpoint is kept."""

    def __init__(self, message: str, step: int, level: str | None):
        super().__init__(message)
        self.step = step
        self.level = level

