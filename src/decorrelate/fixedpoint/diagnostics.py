"""Per-step diagnostics: stability (largest real eigenvalue parts) and update angles.

The fixed point r* is stable under τ dr/dt = −r + f(W r + X) iff every eigenvalue of G·W has real
part < 1 (the Jacobian is −I + G W). The paper tracks max Re λ(W): Euclidean descent drives it
past 1, where the network loses its stable fixed point. G differs per sample, so λ(G_b W) is
computed for a few samples of the batch (the first ``samples``) and the largest is reported.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def max_real_eig(M: Tensor) -> float:
    """Largest real part of the eigenvalues of the square matrix (or batch of matrices) ``M``."""
    return float(torch.linalg.eigvals(M.detach()).real.max())


def max_real_eig_gain(W: Tensor, gain: Tensor, samples: int = 8) -> float:
    """max over the first ``samples`` rows b of ``gain`` of max Re λ(G_b W)."""
    g = gain[:samples].detach()
    if g.numel() == 0:
        return math.nan
    if bool((g == 1).all()):  # linear network: G = I
        return max_real_eig(W)
    return max_real_eig(g.unsqueeze(-1) * W.detach())


def angle_degrees(a: Tensor, b: Tensor) -> float:
    """The angle between two tensors seen as vectors, in degrees (nan if either is zero)."""
    a64, b64 = a.detach().double().flatten(), b.detach().double().flatten()
    denom = float(a64.norm() * b64.norm())
    if denom == 0.0 or not math.isfinite(denom):
        return math.nan
    cos = float(a64 @ b64) / denom
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))
