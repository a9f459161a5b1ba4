"""The one runner: execute a :class:`~.plan.Plan`, reusing finished runs and resuming others.

For every run, in plan order (or ``jobs`` at a time in worker processes, each pinned to
``cpu_count // jobs`` threads unless its config fixes ``threads``):

1. **One reuse check.** If the run's directory holds a ``config.json``, its identity (the
   options that define the run, see :attr:`~.kinds.RunKind.identity`) must equal the planned
   run's, or the plan stops with one line naming the directory: it holds a different run.
2. A run that diverged before (``diverged.json``) is that result again; a finished run is read
   back (:attr:`~.kinds.RunKind.finished`); anything else is trained, or resumed from its
   checkpoint, by its kind.
3. A run that diverges stops the plan, or with ``keep_going`` is recorded as diverged (a
   learning-rate grid expects some to) and written to ``diverged.json``.

So an interrupted experiment continues where it stopped, and an extended one (more seeds, more
epochs) runs only what is missing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from .. import checkpoint as ckpt
from ..errors import TrainingDiverged, UserError
from .kinds import History, read_saved_config, run_kind
from .plan import Plan, Run

Log = Callable[[str], None]

#: Written into a run directory when the run diverged (the error message), so it is a result.
DIVERGED = "diverged.json"


@dataclass
class Result:
    """One finished run: its history, the scalars the report tabulates, or why it diverged."""

    run: Run
    history: History = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    diverged: str | None = None

    @property
    def ok(self) -> bool:
        return self.diverged is None


def check_jobs(jobs: int) -> None:
    """``--jobs`` must be at least 1 (checked before any output folder is made)."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")


def same_run(run: Run, saved: dict[str, Any]) -> bool:
    """The reuse check: whether a saved config is the planned run (see the module docstring)."""
    kind = run_kind(run.kind)
    return kind.identity(saved) == kind.identity(kind.to_dict(run.config))


def _check_directory(run: Run) -> None:
    saved = read_saved_config(run.out)
    if saved is not None and not same_run(run, saved):
        raise UserError(
            f"{run.out} holds a different run than {run.name!r}; choose another output "
            "directory for this experiment (or delete that one)"
        )


def _execute(
    run: Run, log: Log | None = None, progress: bool | None = None, keep_going: bool = False
) -> Result:
    """Reuse, resume or train one run (steps 2–3 of the module docstring; :func:`run_plan`
    made the reuse check for every run before the first one started)."""
    kind = run_kind(run.kind)
    marker = run.out / DIVERGED
    if marker.exists():
        message = json.loads(marker.read_text()).get("error", "diverged")
        if not keep_going:
            raise TrainingDiverged(message)
        return Result(run, diverged=message)
    history = kind.finished(run.out, run.config)
    if history is None:
        try:
            history = kind.execute(run.config, log, progress)
        except TrainingDiverged as exc:
            run.out.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"error": str(exc)}) + "\n"
            ckpt.atomic_write_bytes(marker, lambda f: f.write(text.encode()))
            if not keep_going:
                raise
            return Result(run, diverged=str(exc))
    return Result(run, history, kind.summarise(history))


def run_plan(
    plan: Plan | Sequence[Run],
    *,
    jobs: int = 1,
    log: Log | None = print,
    progress: bool | None = None,
    keep_going: bool = False,
) -> list[Result]:
    """The results of every run of ``plan``, in plan order (see the module docstring)."""
    check_jobs(jobs)
    runs = list(plan.runs if isinstance(plan, Plan) else plan)
    for run in runs:  # before anything is trained: a wrong directory stops the plan at once
        _check_directory(run)
    results: list[Result] = []

    def record(i: int, result: Result) -> None:
        if log and not result.ok:
            log(f"[{i}/{len(runs)}] {result.run.name} diverged: {result.diverged}")
        elif log and jobs > 1:
            log(f"[{i}/{len(runs)}] {result.run.name}: {_headline(result.summary)}")
        results.append(result)

    if jobs <= 1:
        for i, run in enumerate(runs, start=1):
            if log:
                log(f"[{i}/{len(runs)}] {run.name} -> {run.out}")
            record(i, _execute(run, log, progress, keep_going))
        return results
    threads = max(1, (os.cpu_count() or 1) // jobs)
    runs = [_with_threads(run, threads) for run in runs]
    # spawn, not fork: torch's thread pools do not survive a fork safely.
    ctx = multiprocessing.get_context("spawn")
    lines = ctx.Queue() if log else None  # the workers' per-epoch lines, logged here
    try:
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=ctx, initializer=_worker_init, initargs=(lines,)
        ) as pool:
            futures = [
                pool.submit(_run_in_worker, run, keep_going, token)
                for token, run in enumerate(runs)
            ]
            ended: set[int] = set()
            for i, future in enumerate(futures, start=1):
                while not wait([future], timeout=None if lines is None else 0.2).done:
                    _drain(lines, log, ended)
                if future.exception() is None:  # its last lines may still be on their way
                    _drain(lines, log, ended, until=i - 1)
                record(i, future.result())
    finally:
        if lines is not None:
            lines.close()
    return results


def _headline(summary: dict[str, Any]) -> str:
    for key in ("best_test_acc", "final_loss", "final_test_loss"):
        if key in summary and summary[key] == summary[key]:  # nan: no accuracy (regression)
            return f"{key.replace('_', ' ')} {summary[key]:.4f}"
    return "done"


def _with_threads(run: Run, threads: int) -> Run:
    config = run_kind(run.kind).with_threads(run.config, threads)
    return Run(run.kind, config, run.axes, run.out, run.group)


#: In a worker process: where its per-epoch lines go (a queue the parent reads), or None.
_WORKER_LINES: Any = None


def _worker_init(lines: Any) -> None:
    global _WORKER_LINES
    _WORKER_LINES = lines


#: First item of the marker a worker puts after a run's last line.
_END = "end-of-run"
#: How long the parent waits for a finished run's end marker (its lines) before going on.
_END_WAIT = 30.0


def _run_in_worker(run: Run, keep_going: bool, token: int = 0) -> Result:
    """Worker-process entry point: one run, no progress bar; its per-epoch lines, prefixed
    with the run's name, go to the parent's log (when it has one) through a queue, followed by
    an end marker ``(END, token)``: the queue's feeder thread may still hold the last lines when
    the result is returned, so the parent waits for the marker before it reports the run."""
    lines = _WORKER_LINES
    log = None if lines is None else (lambda msg: lines.put(f"{run.name}: {msg}"))
    try:
        return _execute(run, log, False, keep_going)
    finally:
        if lines is not None:
            lines.put((_END, token))


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
                else lines.get_nowait()
            )
        except queue.Empty:
            return
        if isinstance(item, tuple) and item and item[0] == _END:
            ended.add(item[1])
        elif log is not None:
            log(item)
