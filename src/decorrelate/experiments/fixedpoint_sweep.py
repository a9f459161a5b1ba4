"""Fixed-point learning-rate sweeps as plans: every rule at every learning rate (and seed).

:func:`sweep_plan` is the plan (rule × lr [× seed] over a base
:class:`~decorrelate.fixedpoint.config.FixedPointConfig`, run kind ``fixedpoint``); the one runner
executes it (finished runs reused, diverged runs recorded as results: final loss ``inf``, "diverged
at step k"). :func:`write_sweep` is its report, as ``decorrelate fixedpoint`` has always written
it: ``sweep.md`` (and now ``sweep.csv``), one row per run; ``sweep.json``, every run's summary;
``sweep.png``, one column per learning rate, the training loss of every rule on a log scale on top
and max Re λ(W) (the stability diagnostic; the dashed line is 1) below. :func:`run_sweep` is the
three in a row (the command line's sweep).

One seed: runs go into ``OUT/<rule>-lr<lr>/`` (the layout of earlier sweeps, so they are reused);
several: ``OUT/<rule>-lr<lr>-s<seed>/``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from ..errors import UserError
from ..plotting import _pyplot
from .plan import SEED, Plan, grid
from .report import Table, write_table, write_text
from .runner import Log, Result, check_jobs, run_plan

LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))


def run_dir_name(rule: str, lr: float, seed: int | None = None) -> str:
    """``<rule>-lr<lr>`` (``-s<seed>`` appended when the sweep has several seeds)."""
    return f"{rule}-lr{lr:g}" + ("" if seed is None else f"-s{seed}")


def sweep_plan(
    base: Any,
    rules: Sequence[str],
    lrs: Sequence[float],
    out: str | Path,
    *,
    seeds: Sequence[int] | None = None,
    name: str = "lr-sweep",
    description: str = "",
) -> Plan:
    """Every (rule, lr[, seed]) over ``base`` (a FixedPointConfig), validated before any run.

    ``rules`` may hold ``all`` (every rule that fits the network and optimizer, see
    :func:`~decorrelate.fixedpoint.rules.applicable_rules`); a named rule that does not fit is a
    UserError, as is an empty list of learning rates.
    """
    from ..fixedpoint.rules import applicable_rules

    resolved = base.resolved()
    names = applicable_rules(rules, resolved)
    if not names:
        raise UserError("a sweep needs at least one rule")
    if not lrs:
        raise UserError("a sweep needs at least one learning rate")
    axes: dict[str, Sequence[Any]] = {"rule": names, "lr": [float(lr) for lr in lrs]}
    several = seeds is not None and len(seeds) > 1
    if seeds is not None:
        axes[SEED] = list(seeds)

    def directory(group: str, point: dict[str, Any]) -> str:
        return run_dir_name(point["rule"], point["lr"], point[SEED] if several else None)

    return grid(
        name,
        resolved,
        axes,
        out,
        kind="fixedpoint",
        directory=directory,
        description=description,
    )


# ----------------------------------------------------------------------------- report


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def result_line(result: Result) -> str:
    """The sweep table's "result" cell: ok, diverged at step k, or an unstable final W."""
    s = result.summary
    if not result.ok:
        return f"diverged ({result.diverged})"
    if s.get("diverged"):
        return f"diverged at step {s.get('diverged_at')}"
    if s.get("final_unstable"):
        return f"final W unstable ({s.get('final_stability')})"
    return "ok"


def sweep_table(results: Sequence[Result], task: str, threshold: float) -> Table:
    """One row per run: rule, lr (and seed when there are several), final loss (``inf`` when it
    diverged), steps to ``threshold`` (MNIST: best train / test accuracy), max Re λ(W) over
    training and at the end, and how the run ended."""
    seeds = len({r.run.axes.get(SEED) for r in results}) > 1
    mnist = task == "mnist"
    header = ["rule", "lr", *(["seed"] if seeds else [])]
    if mnist:
        header += ["final train loss", "best train acc", "best test acc"]
    else:
        header += ["final loss", f"steps to loss < {threshold:g}"]
    header += ["max Re λ(W) (max / final)", "result"]
    table = Table(header)
    for r in results:
        s = r.summary
        diverged = not r.ok or bool(s.get("diverged"))
        loss = "inf" if diverged else _fmt(s.get("final_loss"), ".3e")
        eig = f"{_fmt(s.get('max_re_eig_W_max'), '.3f')} / "
        eig += _fmt(s.get("max_re_eig_W_final"), ".3f")
        cells = [str(r.run.axes["rule"]), f"{r.run.axes['lr']:g}"]
        cells += [str(r.run.axes.get(SEED))] if seeds else []
        if mnist:
            cells += [
                loss,
                _fmt(s.get("best_train_acc"), ".4f"),
                _fmt(s.get("best_test_acc"), ".4f"),
            ]
        else:
            cells += [loss, _fmt(s.get("steps_to_threshold"), "d")]
        cells += [eig, result_line(r)]
        table.rows.append(cells)
        raw = {"rule": r.run.axes["rule"], "lr": r.run.axes["lr"]}
        if seeds:
            raw["seed"] = r.run.axes.get(SEED)
        raw.update(
            {
                "final_loss": math.inf if diverged else s.get("final_loss"),
                "diverged_at": s.get("diverged_at"),
                "steps_to_threshold": s.get("steps_to_threshold"),
                "best_train_acc": s.get("best_train_acc"),
                "best_test_acc": s.get("best_test_acc"),
                "max_re_eig_W_max": s.get("max_re_eig_W_max"),
                "max_re_eig_W_final": s.get("max_re_eig_W_final"),
                "result": result_line(r),
            }
        )
        table.raw.append(raw)
    return table


def stability_warnings(results: Sequence[Result]) -> list[str]:
    """The warning line of every run that ends with an unstable W."""
    from ..fixedpoint.tasks import stability_warning

    return [w for r in results if r.ok and (w := stability_warning(r.summary))]


def write_sweep(
    results: Sequence[Result], out: str | Path, *, stem: str = "sweep", title: str = ""
) -> tuple[Table, list[Path]]:
    """``STEM.md``/``STEM.csv`` (the table), ``STEM.json`` (every run's summary, plan order) and
    ``STEM.png`` (the curves) in ``out``; the table and the files."""
    from ..fixedpoint.tasks import json_safe

    if not results:
        raise UserError("a sweep report needs at least one run")
    out = Path(out)
    first = results[0].run.config
    table = sweep_table(results, first.task, first.loss_threshold)
    files = write_table(table, out / stem)
    summaries = [json_safe(r.summary) if r.ok else json_safe(_failed(r)) for r in results]
    files.append(write_text(out / f"{stem}.json", json.dumps(summaries, indent=2) + "\n"))
    title = title or f"{first.task}: loss per rule and learning rate"
    files.append(plot_sweep(results, out / f"{stem}.png", title=title))
    return table, files


def _failed(result: Result) -> dict[str, Any]:
    """The sweep.json entry of a run the runner recorded as diverged (no summary of its own)."""
    return {
        "rule": result.run.axes["rule"],
        "lr": result.run.axes["lr"],
        "final_loss": math.inf,
        "diverged": result.diverged,
    }


@dataclass
class SweepResult:
    """A finished sweep: its results (plan order), the table and the files written."""

    results: list[Result]
    table: Table
    files: list[Path] = field(default_factory=list)


def run_sweep(
    base: Any,
    rules: Sequence[str],
    lrs: Sequence[float],
    out: str | Path,
    *,
    seeds: Sequence[int] | None = None,
    jobs: int = 1,
    log: Log | None = print,
) -> SweepResult:
    """Plan, run (finished runs reused, ``jobs`` at a time) and report the sweep into ``out``."""
    check_jobs(jobs)  # before any folder is made
    plan = sweep_plan(base, rules, lrs, out, seeds=seeds)
    root = ckpt.prepare_out_dir(out)
    results = run_plan(plan, jobs=jobs, log=log, keep_going=True)
    table, files = write_sweep(results, root)
    return SweepResult(results, table, files)


# ----------------------------------------------------------------------------- plot


def plot_sweep(results: Sequence[Result], path: str | Path, title: str = "") -> Path:
    """Loss (log scale) and max Re λ(W) vs step, one column per learning rate, all rules (every
    seed drawn, in the rule's colour)."""
    plt = _pyplot()
    lrs = sorted({r.run.axes["lr"] for r in results})
    rules = list(dict.fromkeys(r.run.axes["rule"] for r in results))
    colors = {rule: f"C{i}" for i, rule in enumerate(rules)}
    # Rules can coincide (all reparameterised rules agree on a linear network): dashes keep
    # every curve visible.
    styles = {rule: LINESTYLES[i % len(LINESTYLES)] for i, rule in enumerate(rules)}
    fig, axes = plt.subplots(
        2, len(lrs), figsize=(3.2 * len(lrs), 5.6), dpi=120, squeeze=False, sharex="col"
    )
    for col, lr in enumerate(lrs):
        top, bottom = axes[0][col], axes[1][col]
        labelled: set[str] = set()
        for r in (r for r in results if r.run.axes["lr"] == lr):
            rule = r.run.axes["rule"]
            rows = [row for row in r.history if "loss" in row]
            steps = [row["step"] for row in rows]
            losses = [row["loss"] for row in rows]
            color, style = colors[rule], styles[rule]
            marker = "o" if len(steps) < 5 else None  # a run that stopped at once stays visible
            label = None if rule in labelled else rule
            labelled.add(rule)
            top.plot(steps, losses, color=color, ls=style, lw=1.2, marker=marker, ms=3, label=label)
            if (not r.ok or r.summary.get("diverged")) and steps:
                top.plot(steps[-1], losses[-1], "x", color=color, ms=8, mew=2)
            eig = [(row["step"], row["max_re_eig_W"]) for row in rows if "max_re_eig_W" in row]
            if eig:
                bottom.plot(
                    *zip(*eig, strict=True),
                    color=color,
                    ls=style,
                    lw=1.2,
                    marker="o" if len(eig) < 5 else None,
                    ms=3,
                )
        top.set_yscale("log")
        top.set_title(f"lr = {lr:g}")
        bottom.axhline(1.0, color="k", ls="--", lw=0.8)
        bottom.set_xlabel("iteration")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        if col == 0:
            top.set_ylabel("training loss")
            bottom.set_ylabel("max Re λ(W)")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title + "  (× = diverged)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
