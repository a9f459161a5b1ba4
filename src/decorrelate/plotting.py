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
