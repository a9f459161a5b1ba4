"""The options of one fixed-point run, with the task-dependent defaults filled in.

:class:`FixedPointConfig` is an option set of the one configuration machinery
(:mod:`decorrelate.schema`): every field is declared with :func:`~decorrelate.options.opt`, so
``decorrelate fixedpoint`` reads it from ``--config FILE`` and generated flags exactly as
``decorrelate train`` reads its own. The solver's options are flat fields (``solver`` is the
method); :attr:`FixedPointConfig.solver_config` is the :class:`SolverConfig` they describe.

Fields left ``None`` take the task's default in :meth:`FixedPointConfig.resolved` (the paper's
setting for each task); the resolved config is saved as ``config.json`` beside the metrics and
read back by :meth:`FixedPointConfig.from_dict` (also the earlier files, whose solver options
were a nested ``"solver"`` mapping).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import schema
from ..errors import UserError
from ..options import at_least, non_negative, opt, positive
from ..schema import Options
from .activations import ACTIVATIONS
from .rules import FIXEDPOINT_RULES
from .solver import ADJOINT_METHODS, METHODS, POLICIES, SolverConfig

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

#: The :class:`SolverConfig` field each solver option fills (option ``solver`` is its method).
SOLVER_FIELDS = {
    "solver": "method",
    "tol": "tol",
    "max_iter": "max_iter",
    "damping": "damping",
    "memory": "memory",
    "anderson_start": "anderson_start",
    "euler_steps": "euler_steps",
    "euler_dt": "euler_dt",
    "on_nonconvergence": "on_nonconvergence",
    "adjoint": "adjoint",
}

_SOLVER = SolverConfig()
_NET = "network and data"
_LOG = "logging"


def _unit_interval(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _momentum(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


@dataclass
class FixedPointConfig(Options):
    """Everything that determines a fixed-point run (see ``decorrelate fixedpoint --help``)."""

    task: str = opt("linear-teacher", "task", "str", choices=TASKS, group="run")
    rule: str = opt("euclidean", "fixed-point rule", "str", choices=FIXEDPOINT_RULES, group="run")
    lr: float = opt(
        0.1,
        "learning rate eta in the paper's convention (teacher loss mean ||r - target||^2 without "
        "1/2; mean cross-entropy)",
        "float",
        check=positive,
        group="run",
    )
    seed: int = opt(0, "run seed", "int", check=non_negative, group="run")
    out: str | None = opt(
        None,
        "output directory (default: runs/fixedpoint/...)",
        "str",
        optional=True,
        group="run",
    )
    threads: int | None = opt(
        None,
        "torch CPU threads (default: torch's choice)",
        "int",
        check=positive,
        optional=True,
        group="run",
    )
    # linear-teacher / landscape
    steps: int = opt(3500, "teacher-task iterations", "int", check=positive, group="run")
    samples: int = opt(100, "teacher samples m", "int", check=positive, group=_NET)
    # mnist
    epochs: int = opt(3, "MNIST epochs", "int", check=positive, group="run")
    batch_size: int = opt(512, "MNIST batch size", "int", check=positive, group=_NET)
    dataset: str = opt("mnist", "mnist, fashion-mnist or synthetic", "str", group=_NET)
    data_dir: str | None = opt(
        None, "where the dataset files are", "str", optional=True, group=_NET
    )
    train_size: int | None = opt(
        None,
        "use a fixed subset of the training set",
        "int",
        check=positive,
        optional=True,
        group=_NET,
    )
    #: Standardise inputs per pixel channel (the project's default). The authors feed MNIST pixels
    #: in [0, 1] (``normalize=False``), which gives drives ~3× smaller, larger gains and so a
    #: different gradient scale: their MNIST learning rates only carry over with ``False``.
    normalize: bool = opt(
        True,
        "mnist: standardise the inputs per channel (default); --no-normalize keeps pixels in "
        "[0, 1] as the authors do",
        "bool",
        group=_NET,
    )
    readout_scale: float = opt(1.0, "readout ~ scale·N(0,1/N)", "float", group=_NET)
    # network (None: task default)
    hidden: int | None = opt(
        None,
        "units N (default per task: teacher 200, mnist 300)",
        "int",
        check=positive,
        optional=True,
        group=_NET,
    )
    activation: str | None = opt(
        None,
        "activation f (default per task: teacher identity, mnist tanh)",
        "str",
        choices=ACTIVATIONS,
        optional=True,
        group=_NET,
    )
    w_scale: float | None = opt(
        None,
        "W₀ = scale·N(0,1)/√N (default per task: teacher 0.75, mnist 0.5)",
        "float",
        optional=True,
        group=_NET,
    )
    dtype: str | None = opt(
        None,
        "arithmetic (default per task: teacher float64, mnist float32)",
        "str",
        choices=tuple(DTYPES),
        optional=True,
        group=_NET,
    )
    # optimizer
    optimizer: str = opt(
        "sgd",
        "optimizer (default: sgd, as in the paper)",
        "str",
        choices=OPTIMIZERS,
        group="optimizer",
    )
    momentum: float = opt(0.0, "SGD momentum", "float", check=_momentum, group="optimizer")
    # logging / diagnostics (None: task default)
    log_every: int | None = opt(
        None,
        "steps between metrics rows (default per task: teacher 1, mnist 10)",
        "int",
        check=positive,
        optional=True,
        group=_LOG,
    )
    diag_every: int | None = opt(
        None,
        "steps between eigenvalue/angle diagnostics (default per task: teacher 25, mnist 20)",
        "int",
        check=positive,
        optional=True,
        group=_LOG,
    )
    eig_samples: int = opt(
        8, "samples whose max Re eig(G·W) is measured", "int", check=positive, group=_LOG
    )
    loss_threshold: float = opt(
        1e-4, "report steps to reach this loss", "float", check=positive, group=_LOG
    )
    # landscape
    lines: int = opt(3, "random lines", "int", check=positive, group="landscape")
    line_points: int = opt(801, "points per line", "int", check=at_least(3), group="landscape")
    grid: int = opt(61, "plane resolution", "int", check=at_least(3), group="landscape")
    span: float = opt(3.0, "t in [-span, span]", "float", check=positive, group="landscape")
    # solver (see SolverConfig; checked here alike, so a bad value is reported as an option)
    solver: str = opt(
        _SOLVER.method,
        "fixed-point method (default: auto = newton if linear, else anderson = damped warm-up "
        "+ Anderson)",
        "str",
        choices=METHODS,
        group="fixed-point solver",
    )
    tol: float = opt(
        _SOLVER.tol,
        "max |r − f(Wr+X)| per sample",
        "float",
        check=positive,
        group="fixed-point solver",
    )
    max_iter: int = opt(
        _SOLVER.max_iter, "solver iterations cap", "int", check=positive, group="fixed-point solver"
    )
    damping: float = opt(
        _SOLVER.damping,
        "α of the damped iteration",
        "float",
        check=_unit_interval,
        group="fixed-point solver",
    )
    memory: int = opt(
        _SOLVER.memory, "Anderson history", "int", check=positive, group="fixed-point solver"
    )
    anderson_start: float = opt(
        _SOLVER.anderson_start,
        "residual at which anderson starts accelerating",
        "float",
        check=positive,
        group="fixed-point solver",
    )
    euler_steps: int = opt(
        _SOLVER.euler_steps,
        "euler: number of steps",
        "int",
        check=positive,
        group="fixed-point solver",
    )
    euler_dt: float = opt(
        _SOLVER.euler_dt, "euler: dt/τ", "float", check=_unit_interval, group="fixed-point solver"
    )
    on_nonconvergence: str = opt(
        _SOLVER.on_nonconvergence,
        "a sample whose fixed point is not found: raise (stop) or skip it in the update",
        "str",
        choices=POLICIES,
        group="fixed-point solver",
    )
    adjoint: str = opt(
        _SOLVER.adjoint,
        "implicit-gradient solve",
        "str",
        choices=ADJOINT_METHODS,
        group="fixed-point solver",
    )

    # ------------------------------------------------------------------ helpers
    def check(self) -> None:
        if self.task == "landscape" and self.activation not in (None, "identity"):
            raise UserError(
                "the landscape task draws the linear network's loss (activation identity)"
            )

    def resolved(self) -> FixedPointConfig:
        """A copy with the task defaults filled in, coerced and validated (a UserError on bad
        values)."""
        schema.check_value(FixedPointConfig, "task", self.task)
        filled = {k: v for k, v in TASK_DEFAULTS[self.task].items() if getattr(self, k) is None}
        return schema.make(FixedPointConfig, self.to_dict(), filled)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FixedPointConfig:
        """The config a saved ``config.json`` holds, validated; also the earlier files, whose
        solver options were a nested ``"solver"`` mapping of :class:`SolverConfig` fields."""
        values = dict(values)
        nested = values.get("solver")
        if isinstance(nested, Mapping):
            del values["solver"]
            by_field = {field: name for name, field in SOLVER_FIELDS.items()}
            unknown = set(nested) - set(by_field)
            if unknown:
                raise UserError(f"unknown solver option(s) {', '.join(sorted(unknown))}")
            values = {**{by_field[k]: v for k, v in nested.items()}, **values}
        return schema.make(cls, values)

    @property
    def solver_config(self) -> SolverConfig:
        """The :class:`SolverConfig` the solver options describe."""
        return SolverConfig(**{field: getattr(self, name) for name, field in SOLVER_FIELDS.items()})

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype or "float32"]
