"""``decorrelate compare`` and the demo: a classification grid as a plan, and its report.

The grid is rules × decorrelation methods × swept options × seeds over one base config
(:func:`compare_plan`). Its report (:func:`write_summary`) is a markdown table of mean ± std over
seeds (best and final test accuracy, training time, and the epochs and seconds each group needs
to reach the first group's best seed-mean accuracy) in ``results.md``/``results.csv``, the same
numbers and every history in ``results.json``, and PNG plots of the curves (and of the angles to
BP when the runs logged them). Benchmark specs (:mod:`.specs`) and the demo use the same report.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from ..config import TrainConfig, make_config
from ..errors import UserError
from ..plotting import plot_angles, plot_curves
from ..stats import mean_std
from .plan import Plan, axis_label, grid
from .report import ACCURACY_COLUMNS, Groups, Table, group_results, summary_table, write_text
from .runner import Log, check_jobs, run_plan

History = list[dict[str, Any]]


@dataclass
class GridSummary:
    """The groups of a finished grid, the markdown table, and the files written."""

    groups: list[dict[str, Any]]
    table: str
    files: list[Path] = field(default_factory=list)
    histories: dict[str, list[History]] = field(default_factory=dict)


def compare_plan(
    base: TrainConfig,
    *,
    rules: Sequence[str],
    decors: Sequence[str],
    seeds: Sequence[int],
    sweeps: dict[str, list[str]] | None = None,
    out: Path,
) -> Plan:
    """Every (rule, decor, swept values, seed) over ``base``, validated before anything runs."""
    if not rules or not decors or not seeds:
        raise UserError("compare needs at least one rule, one decorrelation method and one seed")
    axes: dict[str, Sequence[Any]] = {"rule": rules, "decor": decors, **(sweeps or {})}
    axes["seed"] = seeds
    return grid("compare", base, axes, out)


def run_grid(
    base: TrainConfig,
    *,
    rules: Sequence[str],
    decors: Sequence[str],
    seeds: Sequence[int],
    sweeps: dict[str, list[str]] | None = None,
    out: Path,
    log: Log | None = print,
    progress: bool | None = None,
    jobs: int = 1,
) -> GridSummary:
    """Run every combination (``jobs`` at a time) and write the summary files into ``out``."""
    check_jobs(jobs)
    plan = compare_plan(base, rules=rules, decors=decors, seeds=seeds, sweeps=sweeps, out=out)
    out = ckpt.prepare_out_dir(out)
    results = run_plan(plan, jobs=jobs, log=log, progress=progress)
    return write_summary(group_results(results), out, base_config=base.to_dict())


# ----------------------------------------------------------------------------- time to target


def time_to_accuracy(histories: list[History], target: float) -> tuple[int | None, float | None]:
    """First epoch (and its training seconds) where the mean test accuracy reaches ``target``."""
    n = min(len(h) for h in histories)
    for i in range(n):
        if statistics.fmean(h[i]["test_acc"] for h in histories) >= target:
            return histories[0][i]["epoch"], statistics.fmean(h[i]["seconds"] for h in histories)
    return None, None


def reference_target(histories: list[History]) -> float:
    """The reference's best seed-mean test accuracy (what the others must reach)."""
    n = min(len(h) for h in histories)
    return max(statistics.fmean(h[i]["test_acc"] for h in histories) for i in range(n))


def _pair(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std, the one statistic of every table (:func:`decorrelate.stats.mean_std`;
    a finished run's accuracies and times are finite, so nothing is left out)."""
    mean, std, _ = mean_std(values)
    return mean, std


def summarise(label: str, histories: list[History], target: float | None = None) -> dict[str, Any]:
    """Mean ± std over seeds (``results.json``'s group); with ``target``, also epochs and seconds
    to reach it."""
    group = {
        "label": label,
        "seeds": len(histories),
        "best_test_acc": _pair([max(r["test_acc"] for r in h) for h in histories]),
        "final_test_acc": _pair([h[-1]["test_acc"] for h in histories]),
        "train_seconds": _pair([h[-1]["seconds"] for h in histories]),
        "epochs": histories[0][-1]["epoch"],
    }
    if target is not None:
        group["target_acc"] = target
        group["epochs_to_target"], group["seconds_to_target"] = time_to_accuracy(histories, target)
    return group


def speedup_lines(groups: list[dict[str, Any]]) -> list[str]:
    """One sentence per group: epochs and seconds to the reference's best, relative to it."""
    ref = groups[0]
    if "target_acc" not in ref or ref["epochs_to_target"] is None:
        return []
    lines = []
    for g in groups[1:]:
        if g["epochs_to_target"] is None:
            lines.append(
                f"{g['label']} did not reach {ref['label']}'s best test accuracy "
                f"({ref['target_acc'] * 100:.2f} %) in {g['epochs']} epochs"
            )
            continue
        e = g["epochs_to_target"] / max(ref["epochs_to_target"], 1)
        t = g["seconds_to_target"] / max(ref["seconds_to_target"], 1e-9)
        lines.append(
            f"{g['label']} reached {ref['label']}'s best test accuracy "
            f"({ref['target_acc'] * 100:.2f} %) in {g['epochs_to_target']} epochs / "
            f"{g['seconds_to_target']:.1f} s vs {ref['epochs_to_target']} / "
            f"{ref['seconds_to_target']:.1f} s: {e:.2f}x the epochs, {t:.2f}x the wall-clock"
        )
    return lines


def grid_table(groups: Groups, summaries: list[dict[str, Any]]) -> Table:
    """The compare table: accuracy columns, then epochs and seconds to the reference's best."""
    table = summary_table(groups, ACCURACY_COLUMNS)
    if summaries and "target_acc" in summaries[0]:
        target = summaries[0]["target_acc"] * 100
        table.header += [f"epochs to {target:.2f} %", f"seconds to {target:.2f} %"]
        for row, raw, g in zip(table.rows, table.raw, summaries, strict=True):
            epochs, seconds = g["epochs_to_target"], g["seconds_to_target"]
            row += [
                "not reached" if epochs is None else str(epochs),
                "not reached" if seconds is None else f"{seconds:.1f}",
            ]
            raw.update({"epochs_to_target": epochs, "seconds_to_target": seconds})
    return table


def write_summary(
    groups: Groups,
    out: Path,
    *,
    base_config: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> GridSummary:
    """Summarise grouped results into ``out``: results.md/.csv/.json and plots.

    The first group (e.g. plain bp) is the reference the others are timed against; groups whose
    every run diverged are listed in the table but not timed. ``notes`` are appended lines.
    """
    histories = {label: [r.history for r in rs if r.ok] for label, rs in groups.items()}
    finished = {label: hs for label, hs in histories.items() if hs}
    if not finished:
        raise UserError(f"every run of the grid in {out} diverged; nothing to summarise")
    target = reference_target(next(iter(finished.values())))
    summaries = [summarise(label, hs, target) for label, hs in finished.items()]
    by_label = {g["label"]: g for g in summaries}
    table = grid_table({k: groups[k] for k in finished}, [by_label[k] for k in finished])
    diverged = [
        f"{label}: {sum(not r.ok for r in rs)} of {len(rs)} seeds diverged"
        for label, rs in groups.items()
        if any(not r.ok for r in rs)
    ]
    text = "\n".join([table.markdown(), "", *speedup_lines(summaries), *diverged, *notes])
    text = text.rstrip()
    files = [
        write_text(out / "results.md", text + "\n"),
        write_text(out / "results.csv", table.csv()),
        write_text(
            out / "results.json",
            json.dumps(
                {"base_config": base_config, "groups": summaries, "histories": finished}, indent=1
            )
            + "\n",
        ),
    ]
    files += plot_curves(finished, out)
    files += plot_angles(finished, out)  # only when runs logged --alignment-every angles
    return GridSummary(summaries, text, files, finished)


#: The demo's two groups, each at its own best (Adam lr, η) from the one-seed validation grid in
#: benchmarks/results/decor_accuracy_mlp/grid.json (MNIST, this MLP, 3 epochs): comparing both at
#: one shared learning rate would favour whichever it happens to suit.
DEMO_GROUPS: dict[str, dict[str, Any]] = {
    "bp lr=3e-4": {"rule": "bp", "decor": "none", "lr": 3e-4},
    "bp+scaled lr=1e-4 decor-lr=1e-5": {
        "rule": "bp",
        "decor": "scaled",
        "lr": 1e-4,
        "decor_lr": 1e-5,
    },
}


def demo_plan(base: dict[str, Any], out: Path) -> Plan:
    """The demo's runs: one per :data:`DEMO_GROUPS` entry over ``base``."""
    return grid(
        "demo",
        base,
        {"group": list(DEMO_GROUPS)},
        out,
        options=lambda point: DEMO_GROUPS[point["group"]],
        label=lambda point: point["group"],
    )


def run_demo(
    *,
    epochs: int | str = 3,
    out: Path = Path("runs/demo"),
    data_dir: str | None = None,
    progress: bool | None = None,
    jobs: int = 1,
    overrides: dict[str, Any] | None = None,
) -> GridSummary:
    """The README demo: paper 1's MNIST MLP (784-1000×4-10) with Adam, BP vs BP + ``scaled``.

    Each group runs at its own tuned learning rates (:data:`DEMO_GROUPS`); ``jobs=2`` trains both
    at once, one thread each, so their wall-clock times are taken under the same conditions.
    ``overrides`` change the shared settings (the tests use a tiny synthetic dataset).
    """
    check_jobs(jobs)
    base = {"epochs": epochs, "data_dir": data_dir, "widths": [1000, 1000, 1000, 1000]}
    base.update(overrides or {})
    plan = demo_plan(base, out)
    out = ckpt.prepare_out_dir(out)
    results = run_plan(plan, jobs=jobs, progress=progress)
    return write_summary(group_results(results), out, base_config=make_config(base).to_dict())


__all__ = ["DEMO_GROUPS", "GridSummary", "axis_label", "compare_plan", "run_demo", "run_grid"]
