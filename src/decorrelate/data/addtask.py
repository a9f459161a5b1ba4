"""The recurrent "Add" task of the Align paper, as a data set (``--dataset add-task``).

Input: a scalar Bernoulli(0.5) sequence x_t, t = 0 … T−1. Target:
y_t = 0.5 + 0.5·x_{t−2} − 0.25·x_{t−5}, where x before the sequence start is 0 (a *shift* with
zero fill, never a ``torch.roll``: the last inputs must not wrap around to the front). The net
must remember its inputs for five steps. The paper's sizes are T = 100, 300 training and 100 test
sequences (``synthetic_shape [100, 1]``, ``synthetic_train 300``, ``synthetic_test 100``).

It is a regression data set: inputs and targets are float ``[N, T, 1]``, and its ``num_classes``
is the number of outputs per time step (1). It trains through the one training loop
(:class:`decorrelate.train.Trainer`) with ``--model rnn-ntk --loss mse``: the built-in ``mse`` on
float targets is 0.5·(output − target)² per time step, averaged over time and batch (see
:mod:`decorrelate.losses`), so a run's ``test_loss`` is half the test MSE per time step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import UserError
from ..seeding import make_generator
from .dataset import Dataset

#: The Add task's lags and coefficients: y_t = 0.5 + Σ c·x_{t−lag}.
ADD_TERMS = ((2, 0.5), (5, -0.25))


def shift(x: Tensor, lag: int) -> Tensor:
    """x_{t−lag} along dim 1 (time), with zeros for t < lag (no wrap-around)."""
    if lag < 0:
        raise ValueError(f"lag must be >= 0, got {lag}")
    if lag == 0:
        return x.clone()
    out = torch.zeros_like(x)
    if lag < x.shape[1]:
        out[:, lag:] = x[:, :-lag]
    return out


def add_targets(x: Tensor) -> Tensor:
    """y_t = 0.5 + 0.5·x_{t−2} − 0.25·x_{t−5} for inputs [B, T, 1]."""
    y = torch.full_like(x, 0.5)
    for lag, coef in ADD_TERMS:
        y = y + coef * shift(x, lag)
    return y


def sequence_length(shape: Sequence[int]) -> int:
    """T from a ``synthetic_shape`` of ``[T, 1]`` (one scalar input per time step)."""
    dims = [int(s) for s in shape]
    if len(dims) != 2 or dims[1] != 1 or dims[0] < 1:
        raise UserError(
            f"the add-task data set needs synthetic_shape [T, 1] (T time steps of one input, "
            f"e.g. 100,1), got {dims}"
        )
    return dims[0]


def make_add_task(
    n_train: int = 300, n_test: int = 100, steps: int = 100, seed: int = 0
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((x_train, y_train), (x_test, y_test))``, each ``[N, steps, 1]``, drawn from a generator
    seeded by ``seed`` (same seed, same data; the test sequences follow the training ones)."""
    if min(n_train, n_test, steps) < 1:
        raise UserError(f"the Add task needs positive sizes, got {n_train}, {n_test}, {steps}")
    gen = make_generator(seed, "add-task")
    x = torch.bernoulli(torch.full((n_train + n_test, steps, 1), 0.5), generator=gen)
    y = add_targets(x)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def make_add_task_sets(
    shape: Sequence[int], n_train: int, n_test: int, seed: int
) -> tuple[Dataset, Dataset]:
    """The Add task as regression data sets (``shape`` = ``synthetic_shape`` = [T, 1])."""
    (x, y), (xt, yt) = make_add_task(n_train, n_test, sequence_length(shape), seed)
    return Dataset(x, y, 1, "add-task"), Dataset(xt, yt, 1, "add-task")
