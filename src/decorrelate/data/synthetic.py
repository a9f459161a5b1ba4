"""A synthetic classification set with strongly correlated inputs, generated from a seed.

Needs no files, so tests, smoke runs and benchmarks can train without any download; its inputs
are correlated like natural images' (one factor shared by every feature), which is what
decorrelation is meant to undo.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from decorrelate.errors import UserError
from decorrelate.seeding import make_generator

from .dataset import Dataset

#: Typical distance between two class means, in units of the shared noise's std per factor.
_CLASS_DISTANCE = 4.0

#: Std of the independent per-feature noise added on top of the shared low-rank noise.
_ISOTROPIC_NOISE = 0.1


def make_synthetic(
    shape: Sequence[int], num_classes: int, n_train: int, n_test: int, seed: int
) -> tuple[Dataset, Dataset]:
    """Train and test sets of correlated Gaussian classes with inputs of shape ``shape``.

    With ``d`` features and ``k = min(d, 32)`` factors, ``x = F (m_y + ξ) + 0.1 ε``: ``F`` is a
    fixed ``d×k`` loading matrix whose first factor is shared by every feature (so the input
    covariance is strongly non-diagonal, as in natural images), ``m_y`` the class centre in factor
    space, and ``ξ``, ``ε`` standard normal. The classes differ only inside the noisy factor
    space, so a linear classifier does well but not perfectly. Labels are balanced (round-robin,
    then shuffled). Deterministic in ``seed``.
    """
    shape, d = _check_synthetic_args(shape, num_classes, n_train, n_test)
    gen = make_generator(seed, "synthetic")
    k = min(d, 32)
    loadings = _synthetic_loadings(d, k, gen)
    centres = torch.randn(num_classes, k, generator=gen) * (_CLASS_DISTANCE / math.sqrt(2 * k))
    splits = []
    for n in (n_train, n_test):
        y = _balanced_labels(n, num_classes, gen)
        factors = centres[y] + torch.randn(n, k, generator=gen)
        x = factors @ loadings.T
        x.add_(torch.randn(n, d, generator=gen), alpha=_ISOTROPIC_NOISE)
        splits.append(Dataset(x.reshape(n, *shape), y, num_classes, "synthetic"))
    return splits[0], splits[1]


def _check_synthetic_args(
    shape: Sequence[int], num_classes: int, n_train: int, n_test: int
) -> tuple[tuple[int, ...], int]:
    """Validate the synthetic parameters; return the shape as a tuple and its feature count."""
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as exc:
        raise UserError(f"synthetic shape must be a sequence of integers, got {shape!r}") from exc
    if not dims or min(dims) < 1:
        raise UserError(f"synthetic shape must be non-empty and positive, got {list(dims)}")
    if num_classes < 2:
        raise UserError(f"synthetic data needs at least 2 classes, got {num_classes}")
    if n_train < 1 or n_test < 1:
        raise UserError(f"synthetic split sizes must be positive, got {n_train} and {n_test}")
    return dims, math.prod(dims)


def _synthetic_loadings(d: int, k: int, gen: torch.Generator) -> Tensor:
    """A ``d×k`` loading matrix: one factor common to all features plus ``k-1`` random ones.

    Rows are rescaled by random factors in [0.5, 1.5] so feature variances differ, too. The
    common factor carries about half of each feature's variance, which makes the typical
    correlation between two features about 0.5.
    """
    common = torch.ones(d, 1)
    if k > 1:
        specific = torch.randn(d, k - 1, generator=gen) / math.sqrt(k - 1)
        loadings = torch.cat([common, specific], dim=1)
    else:
        loadings = common
    scale = 0.5 + torch.rand(d, 1, generator=gen)
    return loadings * scale


def _balanced_labels(n: int, num_classes: int, gen: torch.Generator) -> Tensor:
    """``n`` labels with class counts differing by at most one, in random order."""
    labels = torch.arange(n, dtype=torch.int64) % num_classes
    return labels[torch.randperm(n, generator=gen)]
