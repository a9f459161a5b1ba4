"""Shared fixtures: tiny synthetic runs that train in well under a second."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def cli_flags(options: dict) -> list[str]:
    """Command-line flags for a dict of options (``batch_size`` → ``--batch-size``; lists joined
    with commas), so a test can run the CLI on the same options as the Python API."""
    out = []
    for key, value in options.items():
        if isinstance(value, list):
            value = ",".join(map(str, value))
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


@pytest.fixture
def tiny(tmp_path: Path) -> dict:
    """Options for a tiny synthetic run (8×8 inputs, 512 examples, one hidden layer)."""
    return {
        "dataset": "synthetic",
        "synthetic_shape": [1, 8, 8],
        "synthetic_train": 512,
        "synthetic_test": 256,
        "widths": [32],
        "batch_size": 64,
        "lr": 0.01,
        "epochs": 2,
        "threads": 1,
        "out": str(tmp_path / "run"),
    }


@pytest.fixture
def mnist_dir() -> Path:
    if not (SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("MNIST not found beside the repo (../shared/data/mnist)")
    return SHARED_DATA
