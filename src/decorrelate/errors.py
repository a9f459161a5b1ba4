"""Exceptions that mean "the user asked for something impossible".

The CLI turns a :class:`UserError` into one line on stderr and exit code 2 — never a traceback.
Library users get an ordinary exception with the same one-line message.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's request: unknown name, bad number, missing file, ..."""


class DataError(UserError):
    """A dataset is missing, truncated or corrupt. The message names the files."""


class TrainingDiverged(RuntimeError):
    """Training produced non-finite numbers or an exploding state; the run was stopped.

    Not a :class:`UserError` (the request was valid), but the CLI still reports it in one
    line and exits non-zero. The message names what diverged and the hyperparameter to lower.
    """
