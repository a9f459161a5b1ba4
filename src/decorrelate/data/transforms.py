"""Input scaling applied to every split: standardised per channel, pixels/255, or raw pixels.

The readers deliver pixels/255; :func:`_normalize_splits` rescales train, validation and test
in place with statistics of the final training set only, so nothing about the held-out data
leaks into the inputs. The chosen ``mean``/``std`` are returned for :class:`.DataSplits`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from decorrelate.errors import UserError

from .dataset import Dataset

#: How inputs are scaled (see :func:`load_dataset`): standardised per channel, pixels/255, raw.
NORMALIZATIONS: tuple[str, ...] = ("standard", "unit", "none")


def _channel_layout(x: Tensor) -> tuple[int, list[int]]:
    """Number of channels and the broadcast shape of per-channel statistics for ``x``.

    ``[N, C, ...]`` inputs (ndim ≥ 3) have ``C`` channels; flat ``[N, D]`` inputs count as one.
    """
    if x.ndim >= 3:
        return int(x.shape[1]), [1, int(x.shape[1])] + [1] * (x.ndim - 2)
    return 1, [1] * x.ndim


def normalize_mode(normalize: str | bool) -> str:
    """The name in :data:`NORMALIZATIONS` for ``normalize`` (booleans: the earlier option)."""
    if isinstance(normalize, bool):
        return "standard" if normalize else "unit"
    if normalize not in NORMALIZATIONS:
        raise UserError(
            f"unknown normalize {normalize!r}; choose one of: {', '.join(NORMALIZATIONS)}"
        )
    return normalize


def _normalize_splits(
    train: Dataset,
    val: Dataset | None,
    test: Dataset,
    normalize: str | bool,
    pixels: bool = True,
) -> tuple[list[float], list[float]]:
    """Scale every split in place as ``normalize`` says (see :func:`load_dataset`).

    The loaders give pixels/255; ``"none"`` multiplies back by 255 and rounds, which restores
    the stored integers exactly (the float32 error of x/255·255 is far below ½).
    """
    mode = normalize_mode(normalize)
    channels, view = _channel_layout(train.x)
    if mode == "unit" or (mode == "none" and not pixels):
        return [0.0] * channels, [1.0] * channels
    if mode == "none":
        for ds in (train, val, test):
            if ds is not None:
                ds.x.mul_(255.0).round_()
        return [0.0] * channels, [1.0 / 255.0] * channels
    flat = train.x.reshape(len(train), channels, -1)
    var, mean = torch.var_mean(flat, dim=(0, 2), correction=0)
    std = var.sqrt().clamp_min(1e-8)
    for ds in (train, val, test):
        if ds is not None:
            ds.x.sub_(mean.view(view)).div_(std.view(view))
    return mean.tolist(), std.tolist()
