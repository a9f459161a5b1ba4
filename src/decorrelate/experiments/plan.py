"""A plan: the list of runs an experiment needs, each a config with its named axis values.

An experiment — ``decorrelate compare``, an Align suite, a fixed-point learning-rate sweep, a
benchmark spec, a paper's reproduction — is a :class:`Plan`: a list of :class:`Run` s. Each run
has a *kind* (which config class and which loop execute it, see :mod:`.kinds`), its config, the
values of the plan's named axes (``rule``, ``decor``, ``lr``, ``seed``, ``width``, …) and its
output directory. Runs that differ only in ``seed`` form a *group*: the report averages over
them. The runner (:mod:`.runner`) executes any plan and the report (:mod:`.report`) summarises
any plan's results, so an experiment is written once, as the function that builds its plan.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

#: The axis that tells repeats of one setting apart (averaged over by the report).
SEED = "seed"


def slug(text: str) -> str:
    """``text`` as a directory name (letters, digits and ``.+=_-``; anything else ``_``)."""
    return re.sub(r"[^A-Za-z0-9.+=_-]+", "_", text)


def axis_label(axes: Mapping[str, Any], skip: Iterable[str] = (SEED,)) -> str:
    """The default group label: ``rule+decor key=value …`` from the axis values.

    ``rule`` and ``decor`` (when present) lead as ``rule`` or ``rule+decor`` (``none`` left out),
    the other axes follow as ``key=value`` in plan order; ``skip`` names axes left out.
    """
    skip = set(skip)
    parts: list[str] = []
    rule, decor = axes.get("rule"), axes.get("decor")
    if "rule" in axes and "rule" not in skip:
        parts.append(str(rule) if decor in (None, "none") or "decor" in skip else f"{rule}+{decor}")
    elif "decor" in axes and "decor" not in skip:
        parts.append(str(decor))
    for key, value in axes.items():
        if key in ("rule", "decor") or key in skip:
            continue
        parts.append(f"{key.replace('_', '-')}={_show(value)}")
    return " ".join(parts)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class Run:
    """One run of a plan.

    ``group`` is the label shared by the seeds of one setting (the report's row);
    ``axes`` holds every named axis value, the seed included.
    """

    kind: str
    config: Any
    axes: Mapping[str, Any]
    out: Path
    group: str

    @property
    def seed(self) -> Any:
        return self.axes.get(SEED, getattr(self.config, SEED, None))

    @property
    def name(self) -> str:
        """``group seed N``: how the runner's log lines name the run."""
        return f"{self.group} seed {self.seed}" if self.seed is not None else self.group


@dataclass
class Plan:
    """A named list of runs over named axes (see the module docstring)."""

    name: str
    runs: list[Run] = field(default_factory=list)
    axes: list[str] = field(default_factory=list)
    description: str = ""

    def __add__(self, other: Plan) -> Plan:
        axes = list(dict.fromkeys([*self.axes, *other.axes]))
        return Plan(self.name, [*self.runs, *other.runs], axes, self.description)

    def groups(self) -> list[str]:
        """Group labels in the order their first run appears."""
        return list(dict.fromkeys(run.group for run in self.runs))

    def check(self) -> Plan:
        """Refuse two runs sharing one directory (they would overwrite each other)."""
        seen: dict[Path, Run] = {}
        for run in self.runs:
            if run.out in seen:
                raise UserError(
                    f"plan {self.name}: runs {seen[run.out].name!r} and {run.name!r} would share "
                    f"{run.out}; give them different axis values or labels"
                )
            seen[run.out] = run
        return self


def _option(base: Any, name: str, default: Any) -> Any:
    """Option ``name`` of a base config given as a config object or a mapping."""
    if isinstance(base, Mapping):
        return base.get(name, default)
    return getattr(base, name, default)


def points(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axis values, the first axis varying slowest."""
    for name, values in axes.items():
        if not values:
            raise UserError(f"axis {name!r} has no values")
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def grid(
    name: str,
    base: Any,
    axes: Mapping[str, Sequence[Any]],
    out: str | Path,
    *,
    kind: str = "train",
    options: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    label: Callable[[dict[str, Any]], str] = axis_label,
    directory: Callable[[str, dict[str, Any]], str] | None = None,
    description: str = "",
) -> Plan:
    """The plan of every combination of ``axes`` over the ``base`` config.

    Each point's axis values are applied to ``base`` as config options (validated now, before
    any run starts), unless ``options(point)`` says which options a point means — for an axis
    that is not an option itself (``width`` → ``widths=[w, w]``) or that sets several. The group
    label is ``label(point)``; the run directory ``out/<directory(group, point)>``, by default
    ``<slug(group)>-s<seed>``.
    """
    from .kinds import run_kind

    make = run_kind(kind).make
    root = Path(out)
    runs = []
    for point in points(axes):
        changes = dict(options(point)) if options is not None else dict(point)
        group = label(point)
        if directory is not None:
            where = directory(group, point)
        else:
            seed = point.get(SEED, changes.get(SEED, _option(base, SEED, 0)))
            where = f"{slug(group) or 'run'}-s{seed}"
        changes["out"] = str(root / where)
        runs.append(Run(kind, make(base, changes), point, root / where, group))
    return Plan(name, runs, list(axes), description).check()
