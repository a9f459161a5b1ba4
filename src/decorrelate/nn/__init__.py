"""What changes the forward pass: decorrelation before every layer (Ahmad 2024).

A layer's input x is decorrelated, z = R x (R square, a buffer starting at the identity, never
trained by the task loss), before the layer computes W z + b. Once per training step, after the
optimizer step, :func:`local_update` moves every R by its own local rule, computed on a
subsample of the batch captured during the forward pass. Under torch.distributed the loop wraps
each step in :func:`step_context`, which tells the decorrelators the rank's batch shard.

Methods (:data:`METHODS`): ``copi``, ``dbp``, ``scaled`` (the default; the paper's rule),
``zca`` and ``newton`` (exact whitening yardsticks). See :mod:`decorrelate.nn.methods`.
"""

from .convert import (
    capturing,
    decorrelate,
    decorrelators,
    fold,
    local_stats,
    local_update,
    step_context,
)
from .decorrelation import DecorConv, DecorConv2d, DecorLinear, Decorrelator
from .methods import DEFAULT_KAPPA, DEFAULT_LR, METHODS, DecorConfig

__all__ = [
    "DEFAULT_KAPPA",
    "DEFAULT_LR",
    "METHODS",
    "DecorConfig",
    "DecorConv",
    "DecorConv2d",
    "DecorLinear",
    "Decorrelator",
    "capturing",
    "decorrelate",
    "decorrelators",
    "fold",
    "local_stats",
    "local_update",
    "step_context",
]
