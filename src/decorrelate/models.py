"""Models: an MLP and the conv net of paper 1, for any input shape.

Both are plain ``nn.Sequential`` stacks of standard layers (``nn.Linear``, ``nn.Conv2d``,
activations, pooling), so every learning rule and every decorrelation method can find and wrap
their layers without knowing the model class — the same is true of a user's own model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from .errors import UserError

ACTIVATIONS = ("relu", "leaky-relu", "tanh", "identity")
MODELS = ("mlp", "convnet")

#: Default layer sizes, filled into the resolved config when the user gives none.
DEFAULT_WIDTHS = {"mlp": (1000, 1000, 1000), "convnet": (1000,)}
DEFAULT_CHANNELS = (32, 32, 64, 64)


def make_activation(name: str) -> nn.Module:
    """The activation module for ``name`` (leaky-relu uses slope 0.01, as in paper 1)."""
    if name == "relu":
        return nn.ReLU()
    if name == "leaky-relu":
        return nn.LeakyReLU(0.01)
    if name == "tanh":
        return nn.Tanh()
    if name == "identity":
        return nn.Identity()
    raise UserError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}")


class MLP(nn.Sequential):
    """Flatten → [Linear → activation] × len(widths) → Linear(num_classes)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int] = DEFAULT_WIDTHS["mlp"],
        activation: str = "leaky-relu",
    ) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(input_shape)
        for width in widths:
            layers += [nn.Linear(fan_in, width), make_activation(activation)]
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
        super().__init__(*layers)


class ConvNet(nn.Sequential):
    """Paper 1's conv net: conv 32, conv 32, pool, conv 64, conv 64, pool, fc 1000, classifier.

    ``channels`` lists the 3×3 'same' convolutions; a 2×2 max-pool follows every ``pool_every``
    of them. ``widths`` are the hidden fully connected layers before the classifier.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        widths: Sequence[int] = DEFAULT_WIDTHS["convnet"],
        activation: str = "leaky-relu",
        pool_every: int = 2,
    ) -> None:
        if len(input_shape) != 3:
            raise UserError(
                f"convnet needs image input [C, H, W], got shape {list(input_shape)}; "
                "use --model mlp"
            )
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for i, out_c in enumerate(channels, start=1):
            layers += [nn.Conv2d(c, out_c, kernel_size=3, padding=1), make_activation(activation)]
            c = out_c
            if pool_every and i % pool_every == 0:
                if h < 2 or w < 2:
                    raise UserError(
                        f"input {list(input_shape)} is too small for {len(channels)} convs"
                    )
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
        layers.append(nn.Flatten())
        fan_in = c * h * w
        for width in widths:
            layers += [nn.Linear(fan_in, width), make_activation(activation)]
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
        super().__init__(*layers)


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    widths: Sequence[int] | None = None,
    channels: Sequence[int] | None = None,
    activation: str = "leaky-relu",
) -> nn.Module:
    """Build a model by name with PyTorch's default initialisation (uses the global RNG)."""
    if activation not in ACTIVATIONS:
        raise UserError(
            f"unknown activation {activation!r}; choose one of: {', '.join(ACTIVATIONS)}"
        )
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    widths = tuple(DEFAULT_WIDTHS[name] if widths is None else widths)
    if any(int(w) < 1 for w in widths):
        raise UserError(f"layer widths must be positive integers, got {list(widths)}")
    if name == "mlp":
        return MLP(input_shape, num_classes, widths, activation)
    channels = tuple(DEFAULT_CHANNELS if channels is None else channels)
    if not channels or any(int(c) < 1 for c in channels):
        raise UserError(f"conv channels must be positive integers, got {list(channels)}")
    return ConvNet(input_shape, num_classes, channels, widths, activation)
