"""``decorrelate fixedpoint``: train rate networks at their fixed points, sweep, draw landscapes.

    decorrelate fixedpoint --task linear-teacher --rule reparam --lr 1 --steps 3500 --out runs/t
    decorrelate fixedpoint --task linear-teacher --rule all --lr 0.03,0.1,0.3,1,3 --out runs/sweep
    decorrelate fixedpoint --task mnist --rule linearized --lr 1 --epochs 3 --out runs/m
    decorrelate fixedpoint --task landscape --out runs/landscape

``--rule`` and ``--lr`` take comma-separated lists; more than one combination is a learning-rate
sweep (one run directory per combination plus ``sweep.json``, ``sweep.md``, ``sweep.csv`` and
``sweep.png``; ``--jobs N`` runs N at a time),
in which a diverged run is a recorded result. A single run that diverges ends with one line and
exit code 3 (raised as :class:`~decorrelate.errors.TrainingDiverged` for the main CLI to report).

The options are those of :class:`~decorrelate.fixedpoint.config.FixedPointConfig`: read from
``--config FILE.yaml|json`` and from flags generated from its fields (flags win), with the
conventions of ``decorrelate train`` (``--x/--no-x`` for booleans, a mistake is one line and exit
code 2). In a file, ``rule`` and ``lr`` may be lists too. :func:`add_parser` registers the
subcommand on the main parser's subparsers object and :func:`run` executes it.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import schema
from .errors import TrainingDiverged, UserError
from .fixedpoint.config import FixedPointConfig

#: Options that may hold several values, the axes of a learning-rate sweep.
SWEEP_AXES = ("rule", "lr")

DESCRIPTION = (
    "Train a rate RNN at its fixed point r = f(W r + W_x x) with the Euclidean "
    "gradient or the reparameterised rules (Zhu & Rosenbaum 2024). Comma-separated --rule/--lr "
    "values run a learning-rate sweep and draw all rules side by side. Learning rates follow "
    "the paper's convention: the linear-teacher loss is J = mean over samples of "
    "sum_i (r_i - target_i)^2 (no factor 1/2) and the mnist loss the mean cross-entropy, as in "
    "the paper and the authors' code, so their eta gives the same plain-SGD step here (for "
    "mnist with --no-normalize: the authors feed pixels in [0, 1], the default here "
    "standardises them, which changes the gradient's scale). "
    "At the end of a run the stability of the final W is checked (max Re eig of W, or of G·W "
    "at the last batch's fixed points) and an unstable W is flagged with a warning line and "
    "final_unstable in summary.json."
)


def add_parser(subparsers: Any) -> None:
    """Register ``fixedpoint`` on ``subparsers`` (an ``add_subparsers()`` result)."""
    p = subparsers.add_parser(
        "fixedpoint",
        help="fixed-point rate networks: teacher task, MNIST, loss landscape, lr sweeps",
        description=DESCRIPTION,
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file of options (flags win; rule and lr may be lists)",
    )
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument(
        "--jobs", type=int, default=1, help="sweep: runs at a time (default: %(default)s)"
    )
    schema.add_flags(
        p,
        FixedPointConfig,
        help_extra={
            "rule": "; comma-separated rules or 'all' run a sweep",
            "lr": "; comma-separated values run a sweep",
        },
    )


def _split(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _items(value: Any) -> list[Any]:
    """A sweep axis's values: a list, comma-separated text, or one value."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return _split(value)
    return [value]


def parse_lrs(values: Any) -> list[float]:
    """``"0.1,1"`` (or ``[0.1, 1]``) → ``[0.1, 1.0]``; a one-line UserError for anything that is
    not a positive, finite number."""
    lrs = []
    for item in _items(values):
        lr = schema.coerce(FixedPointConfig, "lr", item)
        schema.check_value(FixedPointConfig, "lr", lr)
        lrs.append(lr)
    if not lrs:
        raise UserError("lr needs at least one value")
    return lrs


@dataclass
class Request:
    """What a ``decorrelate fixedpoint`` command asks for: the resolved config of its first run
    (its ``rule`` and ``lr`` the first of each axis) and the sweep axes."""

    config: FixedPointConfig
    rules: list[str]
    lrs: list[float]

    @property
    def is_sweep(self) -> bool:
        return len(self.rules) * len(self.lrs) > 1


def request_from(*layers: Mapping[str, Any] | None) -> Request:
    """Merge ``layers`` (later ones win) like :func:`decorrelate.schema.make`, with ``rule`` and
    ``lr`` taken as lists (``all`` for every rule that fits the network)."""
    from .fixedpoint.rules import applicable_rules

    axes: dict[str, list[Any]] = {}
    rest = []
    for layer in layers:
        schema.check_no_repeats((layer or {}).keys(), "one set of options")
        kept = {}
        for key, value in (layer or {}).items():
            name = schema.normalise_key(key)
            if name in SWEEP_AXES:
                axes[name] = _items(value)
            else:
                kept[key] = value
        rest.append(kept)
    default = FixedPointConfig()
    lrs = parse_lrs(axes.get("lr", [default.lr]))
    cfg = FixedPointConfig.make(*rest, {"lr": lrs[0]}).resolved()
    assert cfg.activation is not None
    rules = applicable_rules(axes.get("rule") or [default.rule], cfg)
    return Request(dataclasses.replace(cfg, rule=rules[0]), rules, lrs)


def request_from_args(args: argparse.Namespace) -> Request:
    """The request of parsed flags: defaults < ``--config`` file < flags."""
    config = getattr(args, "config", None)
    file_values = schema.load_config_file(config) if config else {}
    return request_from(file_values, schema.given_flags(args, FixedPointConfig))


def config_from_args(args: argparse.Namespace) -> FixedPointConfig:
    """The run config the parsed flags describe (rule/lr: the first of each list)."""
    return request_from_args(args).config


def run(args: argparse.Namespace) -> int:
    """Execute ``decorrelate fixedpoint`` for parsed ``args``; returns the exit code (0)."""
    from .experiments.fixedpoint_sweep import run_sweep, stability_warnings
    from .fixedpoint.landscape import run_landscape
    from .fixedpoint.tasks import describe, run_task, stability_warning

    request = request_from_args(args)
    cfg = request.config
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    log = None if args.quiet else print
    if cfg.task == "landscape":
        out = Path(cfg.out or "runs/fixedpoint/landscape")
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
    if request.is_sweep:
        out = Path(cfg.out or f"runs/fixedpoint/{cfg.task}-sweep")
        sweep = run_sweep(cfg, request.rules, request.lrs, out, jobs=args.jobs, log=log)
        print(sweep.table.markdown())
        for line in stability_warnings(sweep.results):
            print(line)
        for path in sweep.files:
            print(f"wrote {path}")
        return 0
    out = Path(cfg.out or f"runs/fixedpoint/{cfg.task}-{cfg.rule}-lr{cfg.lr:g}")
    outcome = run_task(cfg, out)
    if outcome.diverged:
        raise TrainingDiverged(f"{outcome.diverged}; metrics so far are in {out}")
    print("done: " + describe(outcome.summary).strip() + f"  -> {out}")
    warning = stability_warning(outcome.summary)
    if warning:
        print(warning)
    return 0
