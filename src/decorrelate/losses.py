"""Losses on class-index targets, with a per-sample mode for perturbation rules.

Node perturbation needs the loss of every sample separately (``reduction="none"``), so every
loss here supports it. ``mse-shifted`` is the Align paper's target: one-hot shifted by −0.1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import UserError

LOSSES = ("cross-entropy", "mse", "mse-shifted")


def reduce(per_sample: Tensor, reduction: str) -> Tensor:
    """Per-sample losses → their mean (``"mean"``), sum (``"sum"``) or themselves (``"none"``)."""
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.mean()


class Loss:
    """A loss ``L(output, y)`` on logits/outputs [B, K] and class indices [B].

    ``scale`` (1 unless training on several processes) multiplies every value: rank r of W
    holding n_r of a global batch's N samples uses n_r·W/N, so that averaging the ranks'
    gradients gives the global batch mean exactly (see :mod:`decorrelate.distributed`).
    """

    def __init__(self, name: str = "cross-entropy") -> None:
        if name not in LOSSES:
            raise UserError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
        self.name = name
        self.scale = 1.0

    def target(self, y: Tensor, num_classes: int) -> Tensor:
        """The regression target for the MSE losses (one-hot, optionally shifted by −0.1)."""
        t = F.one_hot(y, num_classes).to(torch.get_default_dtype())
        return t - 0.1 if self.name == "mse-shifted" else t

    def __call__(self, output: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        if self.name == "cross-entropy":
            value = F.cross_entropy(output, y, reduction=reduction)
        else:
            # Sum over outputs, mean over the batch: the per-sample loss is 0.5·‖f(x) − t‖².
            target = self.target(y, output.shape[-1]).to(output.dtype)
            value = reduce(0.5 * (output - target).pow(2).sum(-1), reduction)
        return value if self.scale == 1.0 else value * self.scale

    def __repr__(self) -> str:
        return f"Loss({self.name!r})"
