"""The options of one fixed-point run, with the task-dependent defaults filled in.

Fields left ``None`` take the task's default in :meth:`FixedPointConfig.resolved` (the paper's
setting for each task); the resolved config is saved as ``config.json`` beside the metrics.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UserError
from .activations import ACTIVATIONS
from .solver import SolverConfig

TASKS = ("linear-teacher", "mnist", "landscape")
OPTIMIZERS = ("sgd", "adam")
DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: Per-task defaults (the paper's settings).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear-teacher": {
        "activation": "identity",
        "hidden": 200,
        "w_scale": 0.75,
        "dtype": "float64",
        "log_every": 1,
        "diag_every": 25,
    },
    "mnist": {
        "activation": "tanh",
        "hidden": 300,
        "w_scale": 0.5,
        "dtype": "float32",
        "log_every": 10,
        "diag_every": 20,
    },
    "landscape": {
        "activation": "identity",
        "hidden": 200,
        "w_scale": 0.75,
        "dtype": "float64",
        "log_every": 1,
        "diag_every": 25,
    },
}


@dataclass
class FixedPointConfig:
    """Everything that determines a fixed-point run (see ``decorrelate fixedpoint --help``)."""

    task: str = "linear-teacher"
    rule: str = "euclidean"
    lr: float = 0.1
    seed: int = 0
    out: str | None = None
    # linear-teacher / landscape
    steps: int = 3500
    samples: int = 100
    # mnist
    epochs: int = 3
    batch_size: int = 512
    dataset: str = "mnist"
    data_dir: str | None = None
    train_size: int | None = None
    #: Standardise inputs per pixel channel (the project's default). The authors feed MNIST pixels
    #: in [0, 1] (``normalize=False``), which gives drives ~3× smaller, larger gains and so a
    #: different gradient scale: their MNIST learning rates only carry over with ``False``.
    normalize: bool = True
    readout_scale: float = 1.0
    # network (None: task default)
    hidden: int | None = None
    activation: str | None = None
    w_scale: float | None = None
    dtype: str | None = None
    # optimizer
    optimizer: str = "sgd"
    momentum: float = 0.0
    # logging / diagnostics
    log_every: int | None = None
    diag_every: int | None = None
    eig_samples: int = 8
    loss_threshold: float = 1e-4
    # landscape
    lines: int = 3
    line_points: int = 801
    grid: int = 61
    span: float = 3.0
    # solver
    solver: SolverConfig = field(default_factory=SolverConfig)
    threads: int | None = None

    def resolved(self) -> FixedPointConfig:
        """A copy with the task defaults filled in, validated (a UserError on bad values)."""
        if self.task not in TASKS:
            raise UserError(f"unknown task {self.task!r}; choose one of: {', '.join(TASKS)}")
        filled = {k: v for k, v in TASK_DEFAULTS[self.task].items() if getattr(self, k) is None}
        cfg = dataclasses.replace(self, **filled)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        positive_ints = (
            "steps",
            "samples",
            "epochs",
            "batch_size",
            "hidden",
            "log_every",
            "diag_every",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(
                    f"{name.replace('_', '-')} must be a positive integer, got {value!r}"
                )
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"lr must be a positive number, got {self.lr!r}")
        if self.activation not in ACTIVATIONS:
            raise UserError(
                f"unknown activation {self.activation!r}; choose one of: {', '.join(ACTIVATIONS)}"
            )
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        if not 0 <= self.momentum < 1:
            raise UserError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.task == "landscape" and self.activation != "identity":
            raise UserError(
                "the landscape task draws the linear network's loss (activation identity)"
            )
        if self.lines < 1 or self.line_points < 3 or self.grid < 3 or not self.span > 0:
            raise UserError("landscape needs lines >= 1, line-points >= 3, grid >= 3, span > 0")
        if self.train_size is not None and self.train_size < 1:
            raise UserError(f"train-size must be positive, got {self.train_size}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype or "float32"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
