"""What the paper modules share: plans of named groups × seeds, their report, claim judges.

A paper's experiment is usually a handful of named settings (``"bp"``, ``"fa+dbp"``, …) over
one base config, each run with several seeds: :func:`groups_plan` makes that plan (run
directories ``OUT/<plan>/<group>-s<seed>``, so the report folders and the runs sit together).
:func:`grid_reports` writes each plan's compare report (:func:`..compare.write_summary`:
``results.md``/``.csv``/``.json`` and the curve plots) into its own subfolder and returns the
tables for the paper's ``results.md``.

Claim judges turn ``{plan name: groups}`` into a :class:`~..report.Finding` — our figure with its
seed spread and the verdict of :func:`~..report.verdict` over **per-seed differences** (seed s
of one group against seed s of the other, so a setting shared by both, such as the data order
and the initial weights, cancels):

- :func:`beats` — group A's ``summary[key]`` exceeds group B's;
- :func:`rescues` — a treatment lifts a rule towards a reference (our figure: the share of the
  gap to the reference it closes);
- :func:`faster` — a group reaches the reference's best seed-mean test accuracy in fewer epochs
  (or seconds) than the reference's own seeds do (the target of :mod:`..compare`);
- :func:`learns` — a group ends above chance.

A group label that is not in the results (a plan not run, say with ``only=``) raises
``KeyError``, which the claims table reports as *not measured*.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ...config import load_config_file
from ...errors import UserError
from ..compare import grid_table, reference_target, time_to_accuracy, write_summary
from ..plan import Plan, grid
from ..report import Finding, Groups, Table, cell, group_results, mean_std, verdict
from ..runner import Result

Judge = Callable[[Mapping[str, Groups]], Finding]


def groups_plan(
    name: str,
    base: Mapping[str, Any],
    groups: Mapping[str, Mapping[str, Any]],
    seeds: Sequence[int],
    out: Path,
    description: str = "",
) -> Plan:
    """Every (group, seed): ``base`` with the group's options and the seed, under ``out/name``.

    The first group is the reference of the plan's report (the others are timed against it).
    """
    return grid(
        name,
        dict(base),
        {"group": list(groups), "seed": list(seeds)},
        Path(out) / name,
        options=lambda p: {**groups[p["group"]], "seed": p["seed"]},
        label=lambda p: p["group"],
        description=description,
    )


def grid_reports(
    results: Mapping[str, list[Result]], out: Path, titles: Mapping[str, str] | None = None
) -> tuple[list[Table], list[Path]]:
    """Each plan's compare report in ``out/<plan>/``; its table (titled) and the files written.

    A plan whose every run diverged gets no report (its claims say *not measured*)."""
    tables: list[Table] = []
    files: list[Path] = []
    for name, rs in results.items():
        groups = group_results(rs)
        try:
            summary = write_summary(groups, Path(out) / name)
        except UserError:  # every run diverged
            continue
        table = grid_table({g["label"]: groups[g["label"]] for g in summary.groups}, summary.groups)
        title = (titles or {}).get(name, "")
        table.title = f"**{name}**" + (f": {title}" if title else "")
        tables.append(table)
        files += summary.files
    return tables, files


def np_protocol() -> dict[str, Any]:
    """The NP authors' protocol (the shipped ``--config np-authors``: BENCHMARKS.md §5.1) without
    its rule, dataset and length, which the plans choose."""
    base = load_config_file("np-authors")
    return {k: v for k, v in base.items() if k not in ("rule", "epochs", "dataset")}


# ----------------------------------------------------------------------------- per-seed values


def _by_seed(results: Sequence[Result]) -> dict[Any, Result]:
    return {r.run.seed: r for r in results}


def _value(result: Result, key: str) -> float:
    return float(result.summary.get(key, math.nan)) if result.ok else math.nan


def paired(groups: Groups, a: str, b: str, key: str) -> tuple[list[float], list[float]]:
    """``summary[key]`` of groups ``a`` and ``b`` for each seed both ran (nan for a diverged
    run), in seed order."""
    ra, rb = _by_seed(groups[a]), _by_seed(groups[b])
    seeds = [s for s in ra if s in rb]
    if not seeds:
        raise ValueError(f"{a!r} and {b!r} share no seed")
    return [_value(ra[s], key) for s in seeds], [_value(rb[s], key) for s in seeds]


def differences(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    """``x - y`` per seed (nan where either is nan: a diverged run decides nothing)."""
    return [x - y for x, y in zip(xs, ys, strict=True)]


def _pm(values: Sequence[float], scale: float, digits: int, signed: bool = False) -> str:
    mean, std, n = mean_std(values)
    if n == 0:
        return "diverged"
    text = f"{mean * scale:+.{digits}f}" if signed else f"{mean * scale:.{digits}f}"
    if n > 1:
        text += f" ± {std * scale:.{digits}f}"
    return text


def _diverged_note(*groups: Sequence[float]) -> str:
    lost = sum(1 for values in groups for v in values if not math.isfinite(v))
    return f" ({lost} run(s) diverged, left out)" if lost else ""


# ----------------------------------------------------------------------------- judges


def beats(
    plan: str,
    better: str,
    worse: str,
    key: str = "best_test_acc",
    *,
    scale: float = 100.0,
    unit: str = " points",
    digits: int = 2,
) -> Judge:
    """Claim "``better`` > ``worse`` in ``summary[key]``" (accuracy in points by default)."""

    def judge(groups: Mapping[str, Groups]) -> Finding:
        xs, ys = paired(groups[plan], better, worse, key)
        diff = differences(xs, ys)
        ours = (
            f"{better} {_pm(xs, scale, digits)} vs {worse} {_pm(ys, scale, digits)}: "
            f"{_pm(diff, scale, digits, signed=True)}{unit}{_diverged_note(xs, ys)}"
        )
        return Finding(ours, verdict(diff))

    return judge


def rescues(
    plan: str,
    reference: str,
    base: str,
    treated: str,
    key: str = "best_test_acc",
    *,
    scale: float = 100.0,
) -> Judge:
    """Claim "``treated`` closes (part of) ``base``'s gap to ``reference``": the verdict is on
    ``treated - base`` per seed; our figure gives both gaps and the share of it closed."""

    def judge(groups: Mapping[str, Groups]) -> Finding:
        t, b = paired(groups[plan], treated, base, key)
        r = [_value(x, key) for x in groups[plan][reference]]
        diff = differences(t, b)
        ref, _, _ = mean_std(r)
        (mt, _, _), (mb, _, _) = mean_std(t), mean_std(b)
        gap, left = (ref - mb) * scale, (ref - mt) * scale
        share = f", {100 * (gap - left) / gap:.0f} % of it closed" if gap > 0 else ""
        ours = (
            f"gap to {reference}: {base} {gap:.2f} → {treated} {left:.2f} points{share} "
            f"({treated} − {base}: {_pm(diff, scale, 2, signed=True)}){_diverged_note(t, b)}"
        )
        return Finding(ours, verdict(diff))

    return judge


def _time_to(result: Result, target: float, measure: str) -> tuple[float, bool]:
    """Epochs (or seconds) for one run to reach ``target``; a run that never does counts as
    reaching it one epoch after its last (a lower bound), flagged False."""
    if not result.ok:
        return math.nan, True
    epoch, seconds = time_to_accuracy([result.history], target)
    if epoch is not None:
        return (float(epoch) if measure == "epochs" else float(seconds)), True
    last = result.history[-1]
    if measure == "epochs":
        return float(last["epoch"] + 1), False
    return float(last["seconds"]) * (1 + 1 / max(last["epoch"], 1)), False


def faster(plan: str, reference: str, treated: str, measure: str = "epochs") -> Judge:
    """Claim "``treated`` reaches ``reference``'s best seed-mean test accuracy sooner than the
    reference's own seeds": per seed, reference time − treated time (``measure``: ``epochs`` or
    ``seconds``); our figure is each group's mean ± std and the ratio of the means."""
    if measure not in ("epochs", "seconds"):
        raise ValueError(f"measure must be epochs or seconds, not {measure!r}")

    def judge(groups: Mapping[str, Groups]) -> Finding:
        g = groups[plan]
        ref_ok = [r.history for r in g[reference] if r.ok]
        if not ref_ok:
            raise ValueError(f"every run of {reference!r} diverged")
        target = reference_target(ref_ok)
        ra, rb = _by_seed(g[reference]), _by_seed(g[treated])
        seeds = [s for s in ra if s in rb]
        if not seeds:
            raise ValueError(f"{reference!r} and {treated!r} share no seed")
        ref = [_time_to(ra[s], target, measure) for s in seeds]
        new = [_time_to(rb[s], target, measure) for s in seeds]
        xs, ys = [v for v, _ in ref], [v for v, _ in new]
        diff = differences(xs, ys)
        unreached = sum(not ok for _, ok in [*ref, *new])
        digits = 1 if measure == "seconds" else 2
        (mx, _, _), (my, _, _) = mean_std(xs), mean_std(ys)
        ratio = f" ({my / mx:.2f}×)" if mx > 0 and math.isfinite(my) else ""
        ours = (
            f"{measure} to {target * 100:.2f} %: {treated} {_pm(ys, 1, digits)} vs "
            f"{reference} {_pm(xs, 1, digits)}{ratio}"
        )
        if unreached:
            ours += f"; {unreached} run(s) never reached it (counted as one epoch more)"
        return Finding(ours + _diverged_note(xs, ys), verdict(diff))

    return judge


def learns(
    plan: str, group: str, chance: float, key: str = "best_test_acc", versus: str | None = None
) -> Judge:
    """Claim "``group`` learns": ``summary[key]`` above ``chance`` per seed; with ``versus``,
    our figure also gives the difference to that group."""

    def judge(groups: Mapping[str, Groups]) -> Finding:
        values = [_value(r, key) for r in groups[plan][group]]
        ours = f"{group} {cell(values, 100.0)} % (chance {chance * 100:.0f} %)"
        if versus is not None:
            xs, ys = paired(groups[plan], group, versus, key)
            ours += f"; vs {versus} {_pm(differences(xs, ys), 100.0, 2, signed=True)} points"
        return Finding(ours, verdict([v - chance for v in values]))

    return judge
