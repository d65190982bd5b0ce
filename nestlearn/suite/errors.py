"""The one error type the suite raises for anything a user can cause (experiment file, flags,
an output directory made with other settings): ``str(err)`` is the whole message."""

from __future__ import annotations


class SuiteError(Exception):
    """A user-facing suite error: printed as one message, exit code 1, never a traceback."""
