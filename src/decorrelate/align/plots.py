"""Sweep plots of the Align suites: one line per rule (mean over seeds, ±1 std band) vs a size.

Widths and training-set sizes span orders of magnitude, so the x axis is logarithmic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..plotting import _pyplot


def plot_sweep(
    series: Mapping[str, Mapping[float, Sequence[float]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = False,
    reference: float | None = None,
    reference_label: str = "",
) -> Path:
    """Write one PNG: for every series (a rule, a layer) its values per x, mean ± std over seeds.

    ``series[label][x]`` lists the values of the seeds at ``x`` (nan for a diverged run is
    skipped); a label ending in "shuffled" (a chance-level control) is drawn dashed.
    ``reference`` draws a grey dashed horizontal line (e.g. chance level).
    """
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, points in series.items():
        xs = sorted(points)
        stats = [_mean_std(points[x]) for x in xs]
        keep = [i for i, (m, _) in enumerate(stats) if np.isfinite(m)]
        if not keep:
            continue
        x = np.array([xs[i] for i in keep], dtype=float)
        mean = np.array([stats[i][0] for i in keep])
        std = np.array([stats[i][1] for i in keep])
        control = label.endswith("shuffled")  # chance-level controls are drawn dashed
        ax.plot(x, mean, marker="o", markersize=3, label=label, linestyle="--" if control else "-")
        if np.any(std > 0):
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label=reference_label)
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return float("nan"), 0.0
    return float(np.mean(finite)), float(np.std(finite))
