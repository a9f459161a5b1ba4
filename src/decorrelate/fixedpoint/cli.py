"""``decorrelate fixedpoint``: train rate networks at their fixed points, sweep, draw landscapes.

    decorrelate fixedpoint --task linear-teacher --rule reparam --lr 1 --steps 3500 --out runs/t
    decorrelate fixedpoint --task linear-teacher --rule all --lr 0.03,0.1,0.3,1,3 --out runs/sweep
    decorrelate fixedpoint --task mnist --rule linearized --lr 1 --epochs 3 --out runs/m
    decorrelate fixedpoint --task landscape --out runs/landscape

``--rule`` and ``--lr`` take comma-separated lists; more than one combination is a learning-rate
sweep (one run directory per combination plus ``sweep.json``, ``sweep.md`` and ``sweep.png``),
in which a diverged run is a recorded result. A single run that diverges ends with one line and
exit code 3 (raised as :class:`~decorrelate.errors.TrainingDiverged` for the main CLI to report).

:func:`add_parser` registers the subcommand on the main parser's subparsers object and
:func:`run` executes it.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainingDiverged, UserError
from .activations import ACTIVATIONS
from .config import DTYPES, OPTIMIZERS, TASKS, FixedPointConfig
from .rules import FIXEDPOINT_RULES
from .solver import ADJOINT_METHODS, METHODS, POLICIES, SolverConfig

#: Flags whose values go into :class:`SolverConfig` (flag dest → field).
SOLVER_FLAGS = {
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


def add_parser(subparsers: Any) -> None:
    """Register ``fixedpoint`` on ``subparsers`` (an ``add_subparsers()`` result)."""
    p = subparsers.add_parser(
        "fixedpoint",
        help="fixed-point rate networks: teacher task, MNIST, loss landscape, lr sweeps",
        description="Train a rate RNN at its fixed point r = f(W r + W_x x) with the Euclidean "
        "gradient or the reparameterised rules (Zhu & Rosenbaum 2024). Comma-separated --rule/--lr "
        "values run a learning-rate sweep and draw all rules side by side. Learning rates follow "
        "the paper's convention: the linear-teacher loss is J = mean over samples of "
        "sum_i (r_i - target_i)^2 (no factor 1/2) and the mnist loss the mean cross-entropy, as in "
        "the paper and the authors' code, so their eta gives the same plain-SGD step here (for "
        "mnist with --no-normalize: the authors feed pixels in [0, 1], the default here "
        "standardises them, which changes the gradient's scale). "
        "At the end of a run the stability of the final W is checked (max Re eig of W, or of G·W "
        "at the last batch's fixed points) and an unstable W is flagged with a warning line and "
        "final_unstable in summary.json.",
    )
    d = FixedPointConfig()
    s = SolverConfig()
    p.add_argument("--task", choices=TASKS, default=d.task, help=f"(default: {d.task})")
    p.add_argument(
        "--rule",
        default=d.rule,
        help=f"rule(s), comma-separated, or 'all': {', '.join(FIXEDPOINT_RULES)} "
        f"(default: {d.rule})",
    )
    p.add_argument(
        "--lr",
        default=str(d.lr),
        help="learning rate(s) eta, comma-separated, in the paper's convention (teacher loss "
        f"mean ||r - target||^2 without 1/2; mean cross-entropy) (default: {d.lr})",
    )
    p.add_argument(
        "--steps", type=int, default=d.steps, help="teacher-task iterations (default: %(default)s)"
    )
    p.add_argument(
        "--epochs", type=int, default=d.epochs, help="MNIST epochs (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="run seed (default: %(default)s)")
    p.add_argument("--out", default=None, help="output directory (default: runs/fixedpoint/...)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--jobs", type=int, default=1, help="sweep: runs at a time (default: %(default)s)"
    )

    g = p.add_argument_group("network and data")
    g.add_argument("--hidden", type=int, default=None, help="units N (teacher 200, mnist 300)")
    g.add_argument(
        "--activation", choices=ACTIVATIONS, default=None, help="(teacher identity, mnist tanh)"
    )
    g.add_argument(
        "--w-scale", type=float, default=None, help="W₀ = scale·N(0,1)/√N (teacher 0.75, mnist 0.5)"
    )
    g.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="(teacher float64, mnist float32)"
    )
    g.add_argument(
        "--samples", type=int, default=d.samples, help="teacher samples m (default: %(default)s)"
    )
    g.add_argument(
        "--dataset",
        default=d.dataset,
        help="mnist, fashion-mnist or synthetic (default: %(default)s)",
    )
    g.add_argument("--data-dir", default=None, help="where the dataset files are")
    g.add_argument(
        "--train-size", type=int, default=None, help="use a fixed subset of the training set"
    )
    g.add_argument(
        "--no-normalize",
        dest="normalize",
        action="store_false",
        help="mnist: keep pixels in [0, 1] as the authors do (default: standardise per channel)",
    )
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    g.add_argument(
        "--readout-scale", type=float, default=d.readout_scale, help="readout ~ scale·N(0,1/N)"
    )

    g = p.add_argument_group("optimizer")
    g.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=d.optimizer,
        help="(default: sgd, as in the paper)",
    )
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (default: 0)")

    g = p.add_argument_group("fixed-point solver")
    g.add_argument(
        "--solver",
        choices=METHODS,
        default=s.method,
        help="(default: auto = newton if linear, else anderson = damped warm-up + Anderson)",
    )
    g.add_argument(
        "--tol",
        type=float,
        default=s.tol,
        help="max |r − f(Wr+X)| per sample (default: %(default)g)",
    )
    g.add_argument("--max-iter", type=int, default=s.max_iter, help="(default: %(default)s)")
    g.add_argument(
        "--damping",
        type=float,
        default=s.damping,
        help="α of the damped iteration (default: %(default)s)",
    )
    g.add_argument(
        "--memory", type=int, default=s.memory, help="Anderson history (default: %(default)s)"
    )
    g.add_argument(
        "--anderson-start",
        type=float,
        default=s.anderson_start,
        help="residual at which anderson starts accelerating (default: %(default)g)",
    )
    g.add_argument(
        "--euler-steps",
        type=int,
        default=s.euler_steps,
        help="euler: number of steps (default: %(default)s)",
    )
    g.add_argument(
        "--euler-dt", type=float, default=s.euler_dt, help="euler: dt/τ (default: %(default)s)"
    )
    g.add_argument(
        "--on-nonconvergence",
        choices=POLICIES,
        default=s.on_nonconvergence,
        help="(default: raise)",
    )
    g.add_argument(
        "--adjoint",
        choices=ADJOINT_METHODS,
        default=s.adjoint,
        help="implicit-gradient solve (default: auto)",
    )

    g = p.add_argument_group("logging")
    g.add_argument(
        "--log-every",
        type=int,
        default=None,
        help="steps between metrics rows (teacher 1, mnist 10)",
    )
    g.add_argument(
        "--diag-every", type=int, default=None, help="steps between eigenvalue/angle diagnostics"
    )
    g.add_argument(
        "--loss-threshold",
        type=float,
        default=d.loss_threshold,
        help="report steps to reach this loss",
    )

    g = p.add_argument_group("landscape")
    g.add_argument("--lines", type=int, default=d.lines, help="random lines (default: %(default)s)")
    g.add_argument("--line-points", type=int, default=d.line_points, help="(default: %(default)s)")
    g.add_argument(
        "--grid", type=int, default=d.grid, help="plane resolution (default: %(default)s)"
    )
    g.add_argument(
        "--span", type=float, default=d.span, help="t in [-span, span] (default: %(default)s)"
    )


def _split(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def parse_lrs(text: str) -> list[float]:
    """``"0.1,1"`` → ``[0.1, 1.0]``; a UserError for anything that is not a positive number."""
    values = []
    for item in _split(text):
        try:
            value = float(item)
        except ValueError:
            raise UserError(f"--lr takes numbers, got {item!r}") from None
        if not value > 0 or value == float("inf"):
            raise UserError(f"--lr must be positive and finite, got {item!r}")
        values.append(value)
    if not values:
        raise UserError("--lr needs at least one value")
    return values


def config_from_args(args: argparse.Namespace) -> FixedPointConfig:
    """The run config the parsed flags describe (rule/lr: the first of each list)."""
    solver = SolverConfig(**{field: getattr(args, flag) for flag, field in SOLVER_FLAGS.items()})
    names = {f.name for f in dataclasses.fields(FixedPointConfig)} - {"solver", "rule", "lr"}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    rules = _split(args.rule) or ["euclidean"]
    return FixedPointConfig(
        **values, rule=rules[0], lr=parse_lrs(args.lr)[0], solver=solver
    ).resolved()


def run(args: argparse.Namespace) -> int:
    """Execute ``decorrelate fixedpoint`` for parsed ``args``; returns the exit code (0)."""
    from ..experiments.fixedpoint_sweep import run_sweep, stability_warnings
    from .landscape import run_landscape
    from .rules import applicable_rules
    from .tasks import describe, run_task, stability_warning

    cfg = config_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    log = None if args.quiet else print
    if cfg.task == "landscape":
        out = Path(args.out or "runs/fixedpoint/landscape")
        result = run_landscape(cfg, out)
        poles = sum(len(p) for p in result.poles)
        print(
            f"done: landscape of the linear teacher (N={cfg.hidden}, m={cfg.samples}): "
            f"{cfg.lines} lines with {poles} pole{'' if poles == 1 else 's'} in "
            f"[-{cfg.span:g}, {cfg.span:g}], "
            f"loss at the minimiser {result.min_loss:.2e}"
        )
        for path in result.files:
            print(f"wrote {path}")
        return 0
    assert cfg.activation is not None
    rules = applicable_rules(_split(args.rule), cfg)
    lrs = parse_lrs(args.lr)
    if len(rules) * len(lrs) > 1:
        out = Path(args.out or f"runs/fixedpoint/{cfg.task}-sweep")
        sweep = run_sweep(cfg, rules, lrs, out, jobs=args.jobs, log=log)
        print(sweep.table.markdown())
        for line in stability_warnings(sweep.results):
            print(line)
        for path in sweep.files:
            print(f"wrote {path}")
        return 0
    cfg = dataclasses.replace(cfg, rule=rules[0])
    out = Path(args.out or f"runs/fixedpoint/{cfg.task}-{cfg.rule}-lr{cfg.lr:g}")
    outcome = run_task(cfg, out)
    if outcome.diverged:
        raise TrainingDiverged(f"{outcome.diverged}; metrics so far are in {out}")
    print("done: " + describe(outcome.summary).strip() + f"  -> {out}")
    warning = stability_warning(outcome.summary)
    if warning:
        print(warning)
    return 0
