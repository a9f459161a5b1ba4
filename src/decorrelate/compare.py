"""Run a grid of training runs (rules × decorrelation × sweeps × seeds) and summarise it.

Runs go into ``OUT/<label>-s<seed>/``, one after another or ``jobs`` at a time in worker
processes (each pinned to ``cpu_count // jobs`` threads unless ``--threads`` says otherwise). A
finished run found there is reused and an interrupted one resumed, so an interrupted comparison
continues where it stopped. The summary is a markdown table of mean ± std over seeds (best and
final test accuracy, training time, and the epochs and seconds each group needs to reach the
first group's best accuracy) written to ``results.md``, the same numbers in ``results.json``, and
PNG plots of the curves.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import queue
import re
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .config import TrainConfig, code_references
from .errors import TrainingDiverged, UserError
from .plotting import plot_angles, plot_curves
from .train import RESUME_OVERRIDES, Log, resume, train


@dataclass
class GridSummary:
    """The groups of a finished grid, the markdown table, and the files written."""

    groups: list[dict[str, Any]]
    table: str
    files: list[Path] = field(default_factory=list)
    histories: dict[str, list[list[dict[str, Any]]]] = field(default_factory=dict)


def run_label(rule: str, decor: str, combo: dict[str, str]) -> str:
    label = rule if decor == "none" else f"{rule}+{decor}"
    return label + "".join(f" {k.replace('_', '-')}={v}" for k, v in combo.items())


def _dir_name(label: str, seed: int) -> str:
    return re.sub(r"[^A-Za-z0-9.+=_-]+", "_", label) + f"-s{seed}"


def _same_run(saved: dict[str, Any], cfg: TrainConfig) -> bool:
    """Whether a saved run's config is ``cfg`` (up to what a resume may change).

    An option the saved config lacks (added to the library after the run) counts as its default.
    """
    want = cfg.to_dict()
    default = TrainConfig().to_dict()
    skip = set(RESUME_OVERRIDES) | {"widths", "channels"}
    return all(saved.get(k, default[k]) == v for k, v in want.items() if k not in skip)


def _run_one(cfg: TrainConfig, log: Log | None, progress: bool | None) -> list[dict[str, Any]]:
    """Train, resume or reuse the run in ``cfg.out``; return its history."""
    out = Path(cfg.out)
    if (out / ckpt.CHECKPOINT).exists():
        state = ckpt.load_checkpoint(out)
        if not _same_run(state["config"], cfg):
            raise UserError(f"{out} holds a different run; choose another --out for this grid")
        if state["epoch"] >= cfg.epochs:
            return state["history"][: cfg.epochs + 1]
        # the grid's own options (the user's): a sampler it names may be imported on resume
        given = {"epochs": cfg.epochs, **code_references(cfg)}
        return resume(out, given, log=log, progress=progress).history
    return train(cfg, log=log, progress=progress).history


#: In a worker process: where its per-epoch lines go (a queue the parent reads), or None.
_WORKER_LINES: Any = None


def _worker_init(lines: Any) -> None:
    global _WORKER_LINES
    _WORKER_LINES = lines


def _run_quietly(
    cfg: TrainConfig, keep_going: bool, label: str = "", token: int = 0
) -> list[dict[str, Any]] | str:
    """Worker-process entry point: one run, no progress bar; its per-epoch lines, prefixed
    with the run's label, go to the parent's log (when it has one) through a queue, followed by
    an end marker ``(END, token)``: the queue's feeder thread may still hold the last lines when
    the result is returned, so the parent waits for the marker before it reports the run."""
    lines = _WORKER_LINES
    log = None if lines is None else (lambda msg: lines.put(f"{label} seed {cfg.seed}: {msg}"))
    try:
        return _run_one(cfg, log, False)
    except TrainingDiverged as exc:
        if not keep_going:
            raise
        return str(exc)
    finally:
        if lines is not None:
            lines.put((_END, token))


#: First item of the marker a worker puts after a run's last line.
_END = "end-of-run"
#: How long the parent waits for a finished run's end marker (its lines) before going on.
_END_WAIT = 30.0


def check_jobs(jobs: int) -> None:
    """``--jobs`` must be at least 1 (checked before any output folder is made)."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")


def run_plan(
    plan: Sequence[tuple[str, TrainConfig]],
    *,
    jobs: int = 1,
    log: Log | None = print,
    progress: bool | None = None,
    keep_going: bool = False,
) -> list[list[dict[str, Any]] | None]:
    """Histories of the planned ``(label, config)`` runs, in plan order.

    Each run is trained, resumed or reused in its ``config.out``. ``jobs > 1`` trains them in
    that many worker processes. A run that diverges stops the plan, or with ``keep_going``
    gets ``None`` in place of its history (a learning-rate grid expects some to diverge).
    """
    check_jobs(jobs)
    results: list[list[dict[str, Any]] | None] = []

    def record(i: int, label: str, cfg: TrainConfig, outcome: list[dict[str, Any]] | str) -> None:
        if isinstance(outcome, str):
            if log:
                log(f"[{i}/{len(plan)}] {label} seed {cfg.seed} diverged: {outcome}")
            results.append(None)
            return
        if log and jobs > 1:
            acc = max(r["test_acc"] for r in outcome)
            log(f"[{i}/{len(plan)}] {label} seed {cfg.seed}: best test acc {acc:.4f}")
        results.append(outcome)

    if jobs <= 1:
        for i, (label, cfg) in enumerate(plan, start=1):
            if log:
                log(f"[{i}/{len(plan)}] {label} seed {cfg.seed} -> {cfg.out}")
            try:
                outcome: list[dict[str, Any]] | str = _run_one(cfg, log, progress)
            except TrainingDiverged as exc:
                if not keep_going:
                    raise
                outcome = str(exc)
            record(i, label, cfg, outcome)
        return results
    threads = max(1, (os.cpu_count() or 1) // jobs)
    plan = [(label, cfg if cfg.threads else cfg.replace(threads=threads)) for label, cfg in plan]
    # spawn, not fork: torch's thread pools do not survive a fork safely.
    ctx = multiprocessing.get_context("spawn")
    lines = ctx.Queue() if log else None  # the workers' per-epoch lines, logged here
    try:
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=ctx, initializer=_worker_init, initargs=(lines,)
        ) as pool:
            futures = [
                pool.submit(_run_quietly, cfg, keep_going, label, token)
                for token, (label, cfg) in enumerate(plan)
            ]
            ended: set[int] = set()
            for i, ((label, cfg), future) in enumerate(zip(plan, futures, strict=True), start=1):
                while not wait([future], timeout=None if lines is None else 0.2).done:
                    _drain(lines, log, ended)
                if future.exception() is None:  # its last lines may still be on their way
                    _drain(lines, log, ended, until=i - 1)
                record(i, label, cfg, future.result())
    finally:
        if lines is not None:
            lines.close()
    return results


def _drain(lines: Any, log: Log | None, ended: set[int], until: int | None = None) -> None:
    """Log the worker lines that have arrived (one line per epoch of every run), noting the
    runs whose end marker came; with ``until``, wait (at most :data:`_END_WAIT` s) until run
    ``until``'s marker, i.e. all of its lines, has arrived."""
    if lines is None:
        return
    deadline = time.monotonic() + _END_WAIT
    while True:
        waiting = until is not None and until not in ended
        try:
            item = (
                lines.get(timeout=max(0.0, deadline - time.monotonic()))
                if waiting
                else (lines.get_nowait())
            )
        except queue.Empty:
            return
        if isinstance(item, tuple) and item and item[0] == _END:
            ended.add(item[1])
        elif log is not None:
            log(item)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def time_to_accuracy(
    histories: list[list[dict[str, Any]]], target: float
) -> tuple[int | None, float | None]:
    """First epoch (and its training seconds) where the mean test accuracy reaches ``target``."""
    n = min(len(h) for h in histories)
    for i in range(n):
        if statistics.fmean(h[i]["test_acc"] for h in histories) >= target:
            return histories[0][i]["epoch"], statistics.fmean(h[i]["seconds"] for h in histories)
    return None, None


def summarise(
    label: str, histories: list[list[dict[str, Any]]], target: float | None = None
) -> dict[str, Any]:
    """Mean ± std over seeds; with ``target``, also epochs and seconds to reach it."""
    best = [max(r["test_acc"] for r in h) for h in histories]
    final = [h[-1]["test_acc"] for h in histories]
    secs = [h[-1]["seconds"] for h in histories]
    group = {
        "label": label,
        "seeds": len(histories),
        "best_test_acc": _mean_std(best),
        "final_test_acc": _mean_std(final),
        "train_seconds": _mean_std(secs),
        "epochs": histories[0][-1]["epoch"],
    }
    if target is not None:
        group["target_acc"] = target
        group["epochs_to_target"], group["seconds_to_target"] = time_to_accuracy(histories, target)
    return group


def reference_target(histories: list[list[dict[str, Any]]]) -> float:
    """The reference's best seed-mean test accuracy (what the others must reach)."""
    n = min(len(h) for h in histories)
    return max(statistics.fmean(h[i]["test_acc"] for h in histories) for i in range(n))


def markdown_table(groups: list[dict[str, Any]]) -> str:
    def pm(pair: tuple[float, float], scale: float = 100.0, digits: int = 2) -> str:
        return f"{pair[0] * scale:.{digits}f} ± {pair[1] * scale:.{digits}f}"

    def opt(value: float | None, fmt: str) -> str:
        return "not reached" if value is None else format(value, fmt)

    with_target = "target_acc" in groups[0]
    head = "| run | seeds | epochs | best test acc (%) | final test acc (%) | train time (s) |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if with_target:
        target = groups[0]["target_acc"] * 100
        head += f" epochs to {target:.2f} % | seconds to {target:.2f} % |"
        rule += "---:|---:|"
    lines = [head, rule]
    for g in groups:
        line = (
            f"| {g['label']} | {g['seeds']} | {g['epochs']} | {pm(g['best_test_acc'])} | "
            f"{pm(g['final_test_acc'])} | {pm(g['train_seconds'], 1.0, 1)} |"
        )
        if with_target:
            line += f" {opt(g['epochs_to_target'], 'd')} | {opt(g['seconds_to_target'], '.1f')} |"
        lines.append(line)
    return "\n".join(lines)


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
    sweeps = sweeps or {}
    check_jobs(jobs)
    if not rules or not decors or not seeds:
        raise UserError("compare needs at least one rule, one decorrelation method and one seed")
    grid = itertools.product(*sweeps.values())
    combos = [dict(zip(sweeps, values, strict=True)) for values in grid]
    plan = []
    for rule, decor, combo in itertools.product(rules, decors, combos):
        label = run_label(rule, decor, combo)
        for seed in seeds:
            # Validates every name and value before the first run starts.
            cfg = base.replace(
                rule=rule, decor=decor, seed=seed, out=str(out / _dir_name(label, seed)), **combo
            )
            plan.append((label, cfg))
    out = ckpt.prepare_out_dir(out)
    histories: dict[str, list[list[dict[str, Any]]]] = {}
    results = run_plan(plan, jobs=jobs, log=log, progress=progress)
    for (label, _), history in zip(plan, results, strict=True):
        assert history is not None  # keep_going=False: a diverged run raised
        histories.setdefault(label, []).append(history)
    return write_summary(histories, out, base_config=base.to_dict())


def write_summary(
    histories: dict[str, list[list[dict[str, Any]]]],
    out: Path,
    *,
    base_config: dict[str, Any] | None = None,
) -> GridSummary:
    """Summarise histories by group label into ``out``: results.md, results.json and plots.

    The first group (e.g. plain bp) is the reference the others are timed against.
    """
    target = reference_target(next(iter(histories.values())))
    groups = [summarise(label, hs, target) for label, hs in histories.items()]
    table = "\n".join([markdown_table(groups), "", *speedup_lines(groups)]).rstrip()
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(
        json.dumps({"base_config": base_config, "groups": groups, "histories": histories}, indent=1)
        + "\n"
    )
    files = [out / "results.md", out / "results.json", *plot_curves(histories, out)]
    files += plot_angles(histories, out)  # only when runs logged --alignment-every angles
    return GridSummary(groups, table, files, histories)


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
    from .config import make_config

    check_jobs(jobs)
    base = {"epochs": epochs, "data_dir": data_dir, "widths": [1000, 1000, 1000, 1000]}
    base.update(overrides or {})
    plan = []
    for label, group in DEMO_GROUPS.items():
        cfg = make_config(base, group)
        plan.append((label, cfg.replace(out=str(out / _dir_name(label, cfg.seed)))))
    out = ckpt.prepare_out_dir(out)
    results = run_plan(plan, jobs=jobs, progress=progress)
    histories = {label: [history] for (label, _), history in zip(plan, results, strict=True)}
    return write_summary(histories, out, base_config=make_config(base).to_dict())
