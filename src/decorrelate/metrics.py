"""Diagnostics that work with every learning rule.

* :func:`update_angles` — per layer, the angle between the update a rule wrote into ``.grad`` and
  the true backprop gradient on the same batch (0° = BP's direction, 90° = orthogonal).
* :func:`weight_feedback_alignment` — per layer, the angle between W and a feedback matrix B of
  the same shape, and the norm ratio ‖B‖/‖W‖ (feedback alignment's own diagnostic).
"""

from __future__ import annotations

import math
from contextlib import ExitStack

import torch
from torch import Tensor, nn


def angle(a: Tensor, b: Tensor) -> float:
    """Angle in degrees between two tensors seen as flat vectors (nan if either is zero)."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if na == 0 or nb == 0:
        return math.nan
    cos = torch.clamp(torch.dot(a, b) / (na * nb), -1.0, 1.0)
    return math.degrees(math.acos(float(cos)))


def weight_feedback_alignment(pairs: dict[str, tuple[Tensor, Tensor]]) -> dict[str, float]:
    """``{"wb_angle/<layer>": deg, "wb_norm_ratio/<layer>": ‖B‖/‖W‖}`` for (W, B) pairs."""
    out: dict[str, float] = {}
    for name, (w, b) in pairs.items():
        out[f"wb_angle/{name}"] = angle(w, b)
        out[f"wb_norm_ratio/{name}"] = float(
            torch.linalg.vector_norm(b.double()) / torch.linalg.vector_norm(w.double())
        )
    return out


def weight_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable weight matrices/kernels of ``model`` (parameters with ≥ 2 dimensions)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]


def update_angles(model: nn.Module, rule: object, x: Tensor, y: Tensor) -> dict[str, float]:
    """Angles between the rule's ``.grad`` (already filled for this batch) and BP's gradient.

    Computes the BP reference with one extra forward/backward on the same batch, with the rule's
    changes to the backward pass suspended and decorrelators not capturing, then puts the rule's
    gradients back, so training is unaffected. Keys: ``angle/<parameter name>``.
    """
    params = weight_parameters(model)
    saved = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    with ExitStack() as stack:
        stack.enter_context(rule.suspended())
        try:
            from .nn import capturing

            stack.enter_context(capturing(model, False))
        except ImportError:
            pass
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            rule.loss(model(x), y).backward()
        bp = {n: None if p.grad is None else p.grad.clone() for n, p in params}
    for n, p in model.named_parameters():
        p.grad = saved[n]
    return {
        f"angle/{n}": angle(saved[n], bp[n])
        for n, _ in params
        if saved[n] is not None and bp[n] is not None
    }
