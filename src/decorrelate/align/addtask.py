"""The recurrent "Add" task of the Align paper, and a vanilla-RNN training loop for it.

Input: a scalar Bernoulli(0.5) sequence x_t, t = 0 … T−1. Target:
y_t = 0.5 + 0.5·x_{t−2} − 0.25·x_{t−5}, where x before the sequence start is 0 (a *shift* with
zero fill, never a ``torch.roll``: the last inputs must not wrap around to the front). The net
must remember its inputs for five steps. The defaults are the paper's: T = 100, 300 training and
100 test sequences.

The classifiers use :func:`decorrelate.train.train`; this regression task on sequences has its
own small loop (:func:`train_add_task`) but the same learning-rule protocol: any rule whose
``backward`` works on a :class:`~decorrelate.models.VanillaRNN` (``bp`` = BPTT, ``align-zero``,
``align-ada``, ``last-layer`` = readout only, ``fa``) fills ``.grad`` and ``torch.optim.SGD``
applies it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import TrainingDiverged, UserError
from ..models import VanillaRNN
from ..rules import LearningRule, rule_class
from ..seeding import derive_seed, make_generator

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


@dataclass
class AddTask:
    """Training and test sequences, [N, T, 1] inputs and targets."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def to(self, device: str | torch.device) -> AddTask:
        return AddTask(
            *(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test))
        )


def make_add_task(
    n_train: int = 300, n_test: int = 100, steps: int = 100, seed: int = 0
) -> AddTask:
    """Draw the Add task's sequences from a generator seeded by ``seed`` (same seed, same data)."""
    if min(n_train, n_test, steps) < 1:
        raise UserError(f"the Add task needs positive sizes, got {n_train}, {n_test}, {steps}")
    gen = make_generator(seed, "add-task")
    x = torch.bernoulli(torch.full((n_train + n_test, steps, 1), 0.5), generator=gen)
    y = add_targets(x)
    return AddTask(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


class SequenceMSE:
    """0.5·(output − target)², averaged over batch, time and outputs (the rules' loss interface).

    Averaging over time keeps the gradient's scale independent of T. ``reduction="none"`` gives
    one value per sequence (for perturbation rules).
    """

    name = "sequence-mse"

    def __call__(self, output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        per_sequence = 0.5 * (output - target.to(output.dtype)).pow(2).flatten(1).mean(1)
        if reduction == "none":
            return per_sequence
        if reduction == "sum":
            return per_sequence.sum()
        return per_sequence.mean()


@torch.no_grad()
def mse(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Mean squared error per time step (the number the tables report)."""
    return float((model(x) - y).pow(2).mean())


def build_rnn(width: int, seed: int, *, activation: str = "relu") -> VanillaRNN:
    """The NTK-parameterised ReLU RNN of the Add task, initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "model"))
        return VanillaRNN(1, width, 1, activation=activation, parameterization="ntk")


def train_add_task(
    rule: str | LearningRule,
    width: int,
    *,
    task: AddTask | None = None,
    epochs: int = 100,
    lr: float = 0.5,
    batch_size: int = 30,
    seed: int = 0,
    log: Any = None,
) -> dict[str, Any]:
    """Train a width-``width`` RNN on the Add task with ``rule``; return its history and timing.

    Plain SGD (no momentum, constant ``lr``) as in the paper; data order per epoch from
    ``(seed, epoch)``. History rows: ``epoch, train_mse, test_mse, seconds`` (epoch 0 = untrained).
    """
    task = task or make_add_task(seed=0)
    model = build_rnn(width, seed)
    learner = rule_class(rule)() if isinstance(rule, str) else rule
    learner.attach(model, SequenceMSE(), make_generator(seed, "rule"), example=task.x_train[:1])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    n = task.x_train.shape[0]
    history = [
        {
            "epoch": 0,
            "train_mse": mse(model, task.x_train, task.y_train),
            "test_mse": mse(model, task.x_test, task.y_test),
            "seconds": 0.0,
        }
    ]
    seconds = 0.0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=make_generator(seed, "data-order", epoch))
        start = time.perf_counter()
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            optimizer.zero_grad(set_to_none=True)
            out = learner.backward(model, task.x_train[idx], task.y_train[idx])
            if not torch.isfinite(out.loss):
                raise TrainingDiverged(
                    f"Add task: loss became {out.loss.item()} (rule {learner.name}, width {width}, "
                    f"lr {lr:g}); lower the learning rate"
                )
            optimizer.step()
        seconds += time.perf_counter() - start
        history.append(
            {
                "epoch": epoch,
                "train_mse": mse(model, task.x_train, task.y_train),
                "test_mse": mse(model, task.x_test, task.y_test),
                "seconds": seconds,
            }
        )
        if log is not None:
            log(
                f"add {learner.name} width {width} epoch {epoch}: "
                f"test mse {history[-1]['test_mse']:.4f}"
            )
    return {"rule": learner.name, "width": width, "seed": seed, "lr": lr, "history": history}
