"""The one statistic over seeds: the mean and *sample* standard deviation of the finite values.

Every table (:mod:`decorrelate.experiments.report`) and every plot (:mod:`decorrelate.plotting`)
uses :func:`mean_std`, so a figure and its table never disagree on the spread. A diverged run's
value (nan, inf) is left out and shows in the count.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any


def finite(values: Iterable[Any]) -> list[float]:
    """The finite values, as floats (None, nan and ±inf left out)."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_std(values: Iterable[Any]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count of the finite ``values``."""
    kept = finite(values)
    if not kept:
        return math.nan, math.nan, 0
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0, len(kept)
