"""Shared fixtures: tiny synthetic runs that train in well under a second."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

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


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every ``.grad`` the model's parameters hold, by name (parameters without one,
    e.g. those a last-layer rule leaves alone, are left out)."""
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def bp_grads(model: nn.Module, x, y, loss=None) -> dict[str, torch.Tensor]:
    """Backprop's gradients of ``loss`` (default cross-entropy) on one batch; ``.grad`` is
    cleared before and after."""
    from decorrelate import Loss

    loss = loss or Loss()
    model.zero_grad(set_to_none=True)
    loss(model(x), y).backward()
    out = grads(model)
    model.zero_grad(set_to_none=True)
    return out


def rule_grads(rule, model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """The gradients one ``rule.backward`` leaves, from cleared ``.grad``."""
    model.zero_grad(set_to_none=True)
    rule.backward(model, x, y)
    return grads(model)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors (faster, and immune to busy machines);
    use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
