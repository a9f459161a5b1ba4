"""Tuning on a validation split: each setting's best hyper-parameters, the test set unseen.

A fair comparison gives every method (decorrelation rule, optimizer, …) its own best
hyper-parameters. The protocol: a *tuning plan* runs every candidate (method × lr × η, say) on
one seed with a validation split held out of the training set (``val_split``); :func:`select_best`
keeps, for every value of the ``by`` axes (one per method), the run with the best *validation*
score; :func:`chosen` reads the tuned axis values off the selected runs, and the *final plan*
runs those settings over seeds on the full training set. The test set plays no part in the
choice: :func:`select_best` refuses a key that names it.

Used by ``benchmarks/bench_decor_accuracy.py`` (each decorrelation method at its own Adam lr
and η) and meant for tuned optimizer baselines (Adam / AdamW / SGD / Muon) alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import UserError
from .plan import SEED
from .runner import Result

#: The default selection score: best validation accuracy over epochs (``train`` kind summary).
VAL_KEY = "best_val_acc"


def select_best(
    results: Iterable[Result],
    by: Sequence[str],
    key: str = VAL_KEY,
    *,
    maximise: bool = True,
) -> dict[tuple[Any, ...], Result]:
    """For every combination of the ``by`` axes' values, the run with the best ``summary[key]``.

    Diverged runs and non-finite scores are never selected (a combination whose every run
    diverged is absent from the answer); on a tie the run planned first wins. Keys are tuples of
    the ``by`` values in ``by`` order, in the order the combinations first appear. ``key`` must be
    a validation score: a key naming the test set is refused (choosing on it would report a tuned
    test accuracy), and so is a finished run without the key (no validation split).
    """
    if "test" in key:
        raise UserError(
            f"select_best chooses on the validation split; {key!r} names the test set "
            "(use best_val_acc or another validation score)"
        )
    best: dict[tuple[Any, ...], Result] = {}
    order: list[tuple[Any, ...]] = []
    for result in results:
        point = tuple(result.run.axes.get(axis) for axis in by)
        if point not in order:
            order.append(point)
        if not result.ok:
            continue
        if key not in result.summary:
            raise UserError(
                f"run {result.run.name!r} has no {key!r} in its summary: tune with a validation "
                "split (val_split > 0)"
            )
        score = float(result.summary[key])
        if not math.isfinite(score):
            continue
        held = best.get(point)
        if held is None or (score > held.summary[key] if maximise else score < held.summary[key]):
            best[point] = result
    return {point: best[point] for point in order if point in best}


def chosen(
    best: dict[tuple[Any, ...], Result], axes: Sequence[str], default: Any = None
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The tuned values of ``axes`` of every selected run (``default`` for an axis a run's
    plan did not sweep, e.g. no η for plain BP). The seed is never a tuned value."""
    if SEED in axes:
        raise UserError("the seed is not a hyper-parameter to carry into the final plan")
    return {
        point: {axis: result.run.axes.get(axis, default) for axis in axes}
        for point, result in best.items()
    }
