"""Run kinds: what the runner needs to know about one sort of run, and nothing more.

A kind names a config class and the loop that executes it. The runner (:mod:`.runner`) is the
same for all kinds; a kind only says how to build a validated config from options
(:attr:`RunKind.make`), which of its options identify the run (:attr:`RunKind.identity`, for the
one reuse check), whether a run directory already holds the finished run, how to run or resume
it, and which scalars summarise its history for the report. Adding a new sort of run (a new task
family) is one :func:`register_run_kind` call here.

Built in: ``train`` (a :class:`~decorrelate.config.TrainConfig` through
:func:`decorrelate.train.train` / :func:`~decorrelate.train.resume`) and ``fixedpoint`` (a
:class:`~decorrelate.fixedpoint.config.FixedPointConfig` through
:func:`decorrelate.fixedpoint.tasks.run_task`, or the landscape).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from ..errors import UserError

Log = Callable[[str], None]
History = list[dict[str, Any]]


@dataclass(frozen=True)
class RunKind:
    """The hooks of one sort of run (see the module docstring).

    ``make(base, changes)`` returns a validated config; ``to_dict(config)`` its JSON form;
    ``identity(saved_dict)`` the part that must agree for a saved run to count as this one
    (options a resume may change left out, options added later filled with their defaults);
    ``finished(out, config)`` the history of a finished run in ``out`` or None; ``execute(config,
    log, progress)`` trains (or resumes) into ``config.out`` and returns the history;
    ``summarise(history)`` the scalars the report tabulates; ``with_threads(config, n)`` the config
    with ``n`` CPU threads unless it fixes its own.
    """

    name: str
    make: Callable[[Any, Mapping[str, Any]], Any]
    to_dict: Callable[[Any], dict[str, Any]]
    identity: Callable[[dict[str, Any]], dict[str, Any]]
    finished: Callable[[Path, Any], History | None]
    execute: Callable[[Any, Log | None, bool | None], History]
    summarise: Callable[[History], dict[str, Any]]
    with_threads: Callable[[Any, int], Any]


_KINDS: dict[str, RunKind] = {}
_BUILTIN: dict[str, Callable[[], RunKind]] = {}


def register_run_kind(kind: RunKind) -> RunKind:
    """Make ``kind`` available to plans by its name (replacing one of the same name)."""
    _KINDS[kind.name] = kind
    return kind


def run_kind(name: str) -> RunKind:
    """The kind called ``name``: a built-in one (created on first use), one registered with
    :func:`register_run_kind`, or ``module:factory`` — imported and called, which is how worker
    processes (``jobs > 1``) find a kind defined outside this module."""
    if name not in _KINDS and name in _BUILTIN:
        register_run_kind(_BUILTIN[name]())
    if name not in _KINDS and ":" in name:
        module, _, factory = name.partition(":")
        try:
            kind = getattr(importlib.import_module(module), factory)()
        except (ImportError, AttributeError) as err:
            raise UserError(f"cannot load run kind {name!r}: {err}") from None
        _KINDS[name] = kind
    if name not in _KINDS:
        known = sorted({*_KINDS, *_BUILTIN})
        raise UserError(f"unknown run kind {name!r}; choose one of: {', '.join(known)}")
    return _KINDS[name]


def read_saved_config(out: Path) -> dict[str, Any] | None:
    """The ``config.json`` a run directory holds, or None (missing or unreadable)."""
    try:
        saved = json.loads((out / ckpt.CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


# ----------------------------------------------------------------------------- train


def _train_kind() -> RunKind:
    from ..config import TrainConfig, code_references, make_config
    from ..train import RESUME_OVERRIDES, resume, train

    defaults = TrainConfig().to_dict()
    # Resolved on save (model-specific defaults), so a saved run and its plan entry may differ.
    skip = {*RESUME_OVERRIDES, "widths", "channels"}

    def make(base: Any, changes: Mapping[str, Any]) -> TrainConfig:
        base = base.to_dict() if isinstance(base, TrainConfig) else dict(base or {})
        return make_config(base, changes)

    def identity(saved: dict[str, Any]) -> dict[str, Any]:
        return {k: saved.get(k, defaults[k]) for k in defaults if k not in skip}

    def finished(out: Path, cfg: TrainConfig) -> History | None:
        if not (out / ckpt.CHECKPOINT).exists():
            return None
        state = ckpt.load_checkpoint(out)
        if state["epoch"] < cfg.epochs:
            return None
        return state["history"][: cfg.epochs + 1]

    def execute(cfg: TrainConfig, log: Log | None, progress: bool | None) -> History:
        out = Path(cfg.out)
        if (out / ckpt.CHECKPOINT).exists():  # interrupted (or shorter): continue it
            # the plan's own options (the user's): a sampler it names may be imported on resume
            given = {"epochs": cfg.epochs, **code_references(cfg)}
            return resume(out, given, log=log, progress=progress).history
        return train(cfg, log=log, progress=progress).history

    def summarise(history: History) -> dict[str, Any]:
        last = history[-1]
        row = {
            "best_test_acc": max(r["test_acc"] for r in history),
            "final_test_acc": last["test_acc"],
            "final_train_loss": last["train_loss"],
            "best_test_loss": min(r["test_loss"] for r in history),
            "final_test_loss": last["test_loss"],
            "train_seconds": last["seconds"],
            "epochs": last["epoch"],
        }
        if "val_acc" in last:
            row["best_val_acc"] = max(r["val_acc"] for r in history if "val_acc" in r)
            row["final_val_acc"] = last["val_acc"]
        row.update({k: v for k, v in last.items() if k.startswith("align_score")})
        return row

    def with_threads(cfg: TrainConfig, threads: int) -> TrainConfig:
        return cfg if cfg.threads else cfg.replace(threads=threads)

    return RunKind(
        "train",
        make=make,
        to_dict=lambda cfg: cfg.to_dict(),
        identity=identity,
        finished=finished,
        execute=execute,
        summarise=summarise,
        with_threads=with_threads,
    )


_BUILTIN["train"] = _train_kind


# ----------------------------------------------------------------------------- fixedpoint

#: The file a finished fixed-point run (or landscape) leaves in its directory.
FIXEDPOINT_SUMMARY = "summary.json"


def _number(value: Any) -> Any:
    """``"inf"``/``"nan"`` (how summary.json writes non-finite floats) back to floats."""
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    return value


def _fixedpoint_kind() -> RunKind:
    """Fixed-point runs (``decorrelate fixedpoint``'s tasks) as plan runs.

    The history is the run's metrics rows followed by one row ``{"summary": ...}``: the run's
    ``summary.json``, which holds what no metrics row does (the stability of the final W, the
    step where it diverged). A run that diverges is a *result* here (its summary says
    ``diverged``/``diverged_at`` and its final loss is ``inf``), as it is for the tasks: a
    learning-rate sweep expects some. The reuse check is strict: every option of the resolved
    config but ``out`` and ``threads`` must agree.
    """
    import torch

    from ..fixedpoint.config import FixedPointConfig
    from ..fixedpoint.landscape import run_landscape
    from ..fixedpoint.tasks import describe, json_safe, run_task, stability_warning

    skip = {"out", "threads"}

    def plain(cfg: FixedPointConfig) -> dict[str, Any]:
        return json.loads(json.dumps(json_safe(cfg.to_dict())))

    defaults = plain(FixedPointConfig())

    def make(base: Any, changes: Mapping[str, Any]) -> FixedPointConfig:
        try:
            if not isinstance(base, FixedPointConfig):
                base = FixedPointConfig(**dict(base or {}))
            cfg = dataclasses.replace(base, **dict(changes))
        except TypeError as err:  # an option FixedPointConfig does not have
            raise UserError(f"not a fixed-point option: {err}") from None
        return cfg.resolved()

    def identity(saved: dict[str, Any]) -> dict[str, Any]:
        # earlier layouts too (the solver's options were a nested mapping); an unreadable one is
        # compared as it is (so it differs)
        with contextlib.suppress(UserError, TypeError, ValueError):
            saved = plain(FixedPointConfig.from_dict(saved))
        return {k: v for k, v in {**defaults, **saved}.items() if k not in skip}

    def read(out: Path) -> History | None:
        try:
            summary = json.loads((out / FIXEDPOINT_SUMMARY).read_text())
        except (OSError, ValueError):
            return None
        return [*ckpt.read_metrics(out), {"summary": summary}]

    def finished(out: Path, cfg: FixedPointConfig) -> History | None:
        return read(out)

    def execute(cfg: FixedPointConfig, log: Log | None, progress: bool | None) -> History:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        assert cfg.out is not None, "a planned run has its directory"
        out = Path(cfg.out)
        if cfg.task == "landscape":
            run_landscape(cfg, out)
        else:
            summary = run_task(cfg, out).summary
            if log is not None:
                log(describe(summary))
                warning = stability_warning(summary)
                if warning:
                    log(warning)
        history = read(out)  # as a reused run reads it (non-finite floats as summary.json has them)
        assert history is not None, f"{out} holds no {FIXEDPOINT_SUMMARY} after the run"
        return history

    def summarise(history: History) -> dict[str, Any]:
        summary = {k: _number(v) for k, v in history[-1]["summary"].items()}
        threshold = [k for k in summary if k.startswith("steps_to_loss_")]
        if threshold:
            summary["steps_to_threshold"] = summary[threshold[0]]
        epochs = [r for r in history[:-1] if "test_acc" in r]
        if epochs:
            summary["final_test_acc"] = epochs[-1]["test_acc"]
        return summary

    def with_threads(cfg: FixedPointConfig, threads: int) -> FixedPointConfig:
        return cfg if cfg.threads else dataclasses.replace(cfg, threads=threads)

    return RunKind(
        "fixedpoint",
        make=make,
        to_dict=plain,
        identity=identity,
        finished=finished,
        execute=execute,
        summarise=summarise,
        with_threads=with_threads,
    )


_BUILTIN["fixedpoint"] = _fixedpoint_kind
