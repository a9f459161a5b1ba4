"""Atomic checkpoints and run-directory files.

A checkpoint is written to a temporary file in the run directory and renamed over the old one, so a
crash (or a diverged step) never leaves a half-written file: the last good checkpoint survives.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
ALIGNMENT = "alignment.jsonl"
FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(file_object)`` on a temp file beside ``path``, then rename it into place."""
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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file or the ``checkpoint.pt`` inside a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise UserError(f"{path} is not a decorrelate checkpoint (format {FORMAT_VERSION})")
    return state


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
