"""PNG plots of training curves: test accuracy vs epoch and vs wall-clock seconds.

Runs are grouped (e.g. one group per rule × decorrelation, several seeds each); a group is drawn
as its mean curve with a ±1 std band over seeds, so a comparison shows its spread at a glance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .stats import mean_std

History = list[dict[str, Any]]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'decorrelate[plot]'") from None
    return plt


def mean_curve(histories: Sequence[History], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over runs of ``key`` per epoch, truncated to the shortest run."""
    n = min(len(h) for h in histories)
    values = np.array(
        [[np.nan if row.get(key) is None else row[key] for row in h[:n]] for h in histories],
        dtype=float,
    )
    return values.mean(axis=0), values.std(axis=0)


def plot_curves(
    groups: Mapping[str, Sequence[History]],
    directory: str | Path,
    prefix: str = "",
    metric: str = "test_acc",
) -> list[Path]:
    """Write ``{prefix}acc_vs_epoch.png`` and ``{prefix}acc_vs_seconds.png``; return their paths."""
    plt = _pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    label = metric.replace("_", " ")
    for xkey, xlabel, name in (
        ("epoch", "epoch", "acc_vs_epoch"),
        ("seconds", "training wall-clock (s)", "acc_vs_seconds"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        for group, histories in groups.items():
            # Epoch 0 is the untrained network at chance level; drawing it squashes the range
            # where runs differ, so it is left out whenever there are trained epochs.
            histories = [h[1:] if len(h) > 1 else h for h in histories if h]
            if not histories:
                continue
            x, _ = mean_curve(histories, xkey)
            mean, std = mean_curve(histories, metric)
            ax.plot(x, mean, marker="o", markersize=3, label=f"{group} (n={len(histories)})")
            if len(histories) > 1:
                ax.fill_between(x, mean - std, mean + std, alpha=0.2)
        if xkey == "epoch":
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{label} vs {xlabel}")
        fig.tight_layout()
        path = directory / f"{prefix}{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def angle_keys(groups: Mapping[str, Sequence[History]]) -> list[str]:
    """Every ``angle/<layer>`` key logged by any run, in first-seen order."""
    keys: dict[str, None] = {}
    for histories in groups.values():
        for history in histories:
            for row in history:
                keys.update((k, None) for k in row if k.startswith("angle/"))
    return list(keys)


def plot_angles(
    groups: Mapping[str, Sequence[History]], directory: str | Path, prefix: str = ""
) -> list[Path]:
    """``{prefix}angles_vs_epoch.png``: per layer, the epoch-mean angle (degrees) between each
    group's weight update and the BP gradient (``--alignment-every``), mean ± std over seeds.
    Groups that logged no angles are left out; nothing is written if none did."""
    keys = angle_keys(groups)
    if not keys:
        return []
    plt = _pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cols = min(len(keys), 3)
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), dpi=110, squeeze=False)
    top = max(
        (r[k] for hs in groups.values() for h in hs for r in h for k in keys if k in r),
        default=90.0,
    )
    for ax, key in zip(axes.flat, keys, strict=False):
        for group, histories in groups.items():
            histories = [[r for r in h if key in r] for h in histories]
            histories = [h for h in histories if h]
            if not histories:
                continue
            x, _ = mean_curve(histories, "epoch")
            mean, std = mean_curve(histories, key)
            ax.plot(x, mean, marker="o", markersize=3, label=group)
            if len(histories) > 1:
                ax.fill_between(x, mean - std, mean + std, alpha=0.2)
        ax.set_title(key.removeprefix("angle/"), fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylim(0, max(90.0, top * 1.05))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("angle to BP gradient (°)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat[1 : len(keys)]:  # groups missing from the first panel still get listed
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    axes.flat[0].legend(handles, labels, fontsize=7)
    fig.tight_layout()
    path = directory / f"{prefix}angles_vs_epoch.png"
    fig.savefig(path)
    plt.close(fig)
    return [path]


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
    """One PNG of a sweep: per line (a rule, a layer) its values per x, mean ± sample std.

    ``series[label][x]`` lists the values of the seeds at ``x`` (what
    :func:`decorrelate.experiments.report.series` gives; nan, a diverged run, is skipped). Sizes
    (widths, training-set sizes) span orders of magnitude, so the x axis is logarithmic (base 2).
    A label ending in "shuffled" (a chance-level control) is drawn dashed; ``reference`` draws a
    grey dashed horizontal line (chance level, predicting the mean).
    """
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, points in series.items():
        stats = [(float(x), *mean_std(points[x])[:2]) for x in sorted(points)]
        stats = [s for s in stats if np.isfinite(s[1])]
        if not stats:
            continue
        x, mean, std = (np.array(column, dtype=float) for column in zip(*stats, strict=True))
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
