"""The rate network's nonlinearity f and its derivative f′ (the gain G = diag f′(W r + X))."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError

ACTIVATIONS = ("tanh", "relu", "identity")


@dataclass(frozen=True)
class Activation:
    """f and f′, both taking the pre-activation a = W r + X elementwise."""

    name: str
    f: Callable[[Tensor], Tensor]
    gain: Callable[[Tensor], Tensor]


def _tanh_gain(a: Tensor) -> Tensor:
    return 1.0 - torch.tanh(a).square()


def _relu_gain(a: Tensor) -> Tensor:
    return (a > 0).to(a.dtype)


_TABLE = {
    "tanh": Activation("tanh", torch.tanh, _tanh_gain),
    "relu": Activation("relu", torch.relu, _relu_gain),
    "identity": Activation("identity", lambda a: a, torch.ones_like),
}


def get_activation(name: str) -> Activation:
    """The activation called ``name``; a :class:`UserError` listing the choices otherwise."""
    try:
        return _TABLE[name]
    except KeyError:
        raise UserError(
            f"unknown activation {name!r} for the rate network; choose one of: "
            f"{', '.join(ACTIVATIONS)}"
        ) from None
