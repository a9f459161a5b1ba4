"""Atomic checkpoints, run-directory files and the run-directory lock.

A checkpoint is written to a temporary file in the run directory and renamed over the old one, so a
crash (or a diverged step) never leaves a half-written file: the last good checkpoint survives.
Checkpoints are read with ``weights_only=True``: tensors, numbers, strings and containers only, so
opening one never runs code. A run holds an exclusive lock on its directory (:class:`RunLock`) so
that two runs never write into the same folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import signal
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
ALIGNMENT = "alignment.jsonl"
FORMAT_VERSION = 1


#: Signals held back while a file is written (delivered as soon as it is in place).
_DEFERRED = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT/SIGHUP back in the block (main thread), so that an interrupt raised
    by a Python signal handler never lands inside a library's writer (``torch.save``'s zip
    writer turns it into an error of its own, with a traceback): a signal that comes meanwhile
    is recorded and raised again, to the original handler, once the block has ended. (Blocking
    the signal with ``pthread_sigmask`` is not enough: another thread would take it.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for sig in _DEFERRED:
        handler = signal.getsignal(sig)
        if callable(handler):  # Python-level handlers only; SIG_DFL/SIG_IGN stay as they are
            previous[sig] = handler
            signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(file_object)`` on a temp file beside ``path``, then rename it into place.

    Interrupt signals are held back meanwhile: the file is either the old one or the new one,
    and the interrupt then unwinds the run as usual."""
    with _signals_deferred():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    state = {"format": FORMAT_VERSION, **state}
    atomic_write_bytes(path, lambda f: torch.save(state, f))


#: What a training checkpoint holds (``--resume`` and ``eval`` need all of it).
TRAINING_KEYS = ("config", "model", "epoch", "history")


def load_checkpoint(path: str | Path, require: tuple[str, ...] = TRAINING_KEYS) -> dict[str, Any]:
    """Load a checkpoint file or the ``checkpoint.pt`` inside a run directory.

    ``require`` names the keys it must hold: a training checkpoint's by default; the fixed-point
    runs' ``model.pt`` holds only ``("config", "model")``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise UserError(f"cannot read checkpoint {path}: the file is empty")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path}: {describe_load_error(err)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise UserError(f"{path} is not a decorrelate checkpoint (format {FORMAT_VERSION})")
    missing = [key for key in require if key not in state]
    if missing or ("config" in require and not isinstance(state["config"], dict)):
        what = ", ".join(missing) if missing else "a config mapping"
        raise UserError(f"{path} is not a complete decorrelate checkpoint: it lacks {what}")
    return state


def describe_load_error(err: BaseException) -> str:
    """One line for an exception of ``torch.load(..., weights_only=True)``.

    PyTorch's own message spans many lines and advises retrying with ``weights_only=False``,
    which would run whatever code the file names; we name the refused object instead.
    """
    text = str(err).strip()
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return (
            f"it holds a Python object ({refused.group(1)}) that is not a tensor, number or "
            "string; such files are refused because loading them could run code"
        )
    if "weights_only" in text or "Weights only load failed" in text:
        return "it holds Python objects that are not tensors, numbers or strings (refused)"
    if not text:
        return {"EOFError": "the file ends early (empty or truncated)"}.get(
            type(err).__name__, type(err).__name__
        )
    return text.splitlines()[0]


def load_weights(module: torch.nn.Module, weights: Any, path: str | Path) -> None:
    """``module.load_state_dict(weights)``, or one UserError line when they do not fit."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [
            str(err).strip() or type(err).__name__
        ]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(
            f"the weights in {path} do not match the model its config describes: "
            f"{problems[0].rstrip('.')}{more}"
        ) from None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` (one JSON object per line; non-finite numbers become null)."""
    text = "".join(json.dumps({k: _json_safe(v) for k, v in row.items()}) + "\n" for row in rows)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` in a run directory."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise UserError(f"no {METRICS} in {run_dir}: not a run directory")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{i} is not valid JSON") from None
    return rows


def prepare_out_dir(path: str | Path) -> Path:
    """Create ``path`` and check that files can be written there; a UserError otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"  # per process: ranks probe at once
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to output directory {path}: {err.strerror or err}") from None
    return path


class RunLock:
    """An exclusive lock on a run directory, held by the one run that writes there.

    ``flock`` on the directory itself: no lock file is left behind, and the operating system
    drops the lock when the process ends in any way (``kill -9`` included), so a lock is never
    stale. A second run on the same directory fails at once with one line. Under
    torch.distributed only rank 0 takes it (rank 0 alone writes). Where ``fcntl`` does not
    exist (Windows) runs are not locked.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                # the filesystem cannot lock (some network mounts): run, but say so
                warnings.warn(
                    f"cannot lock {self.path} ({err.strerror}); a second run on it would not "
                    "be stopped",
                    stacklevel=2,
                )
                return self
            raise UserError(
                f"{self.path} is in use by another decorrelate run; wait for it to finish or "
                "choose another --out"
            ) from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
