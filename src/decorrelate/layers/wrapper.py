"""The wrapper protocol: a module that stands for the one layer it wraps (``.layer``).

Rules act on a wrapper as on its layer, through the effective weight the wrapper applies to its
raw input (:func:`~decorrelate.layers.effective_weight`, :func:`~decorrelate.layers.weight_grad`,
:func:`~decorrelate.layers.input_grad`). The decorrelated layers of :mod:`decorrelate.nn`
(:class:`~decorrelate.nn.Decorrelator`: R in front of the layer) implement it. The protocol is
defined here, below :mod:`decorrelate.nn`, so that this package recognises wrappers without
importing the package that makes them (no import cycle between ``layers`` and ``nn``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn


class LayerWrapper(nn.Module):
    """Base of modules that wrap one layer (``.layer``) and apply it with another weight."""

    layer: nn.Module

    def fold(self, matrix: Tensor) -> Tensor:
        """``matrix`` (shaped like the layer's weight) as the wrapper applies it to raw inputs."""
        raise NotImplementedError

    def effective_weight(self) -> Tensor:
        """The weight applied to the raw input (differentiable in the layer's weight)."""
        raise NotImplementedError

    def local_weight_grad(
        self, kind: Any, inputs: Sequence[Tensor], errors: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor | None]:
        """Σ ⟨e aᵀ⟩ for the wrapped weight (and Σ e for its bias) from the raw inputs ``a``."""
        raise NotImplementedError

    def local_input_grad(self, kind: Any, delta: Tensor, x: Tensor, weight: Tensor) -> Tensor:
        """``delta`` at the output sent back to the raw input ``x`` through ``weight``."""
        raise NotImplementedError
