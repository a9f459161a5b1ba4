"""Models: an MLP and the conv net of paper 1, for any input shape, and a small vanilla RNN.

Both classifiers are plain ``nn.Sequential`` stacks of standard layers (``nn.Linear``,
``nn.Conv2d``, activations, pooling), so every learning rule and every decorrelation method can
find and wrap their layers without knowing the model class — the same is true of a user's own
model.

**NTK parameterisation** (the Align paper's setting, ``parameterization="ntk"`` or the model
names ``mlp-ntk`` / ``convnet-ntk``): every weight is drawn from N(0, 1), biases start at zero,
and the forward pass multiplies each layer's input by 1/√fan_in. The scaling is a parameter-free
:class:`NTKScale` module placed before each Linear/Conv2d, so the layers stay plain ``nn.Linear``
/ ``nn.Conv2d`` (rules find them; decorrelators wrap them) and a layer's recorded input — the
presynaptic activity of the learning rules — is the scaled activity, which makes ΔW = δ aᵀ the
NTK-parameterised gradient. ``convnet-ntk`` also puts a batch norm *without* affine parameters
after every convolution and a 2×2 max-pool after every convolution, as in the Align paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .errors import UserError

ACTIVATIONS = ("relu", "leaky-relu", "tanh", "identity")
MODELS = ("mlp", "convnet", "mlp-ntk", "convnet-ntk", "rnn", "rnn-ntk")
PARAMETERIZATIONS = ("standard", "ntk")
#: Negative-side slope of ``leaky-relu``: 0.01 as in paper 1 (and PyTorch's default); the node
#: perturbation authors' TensorFlow code uses ``tf.nn.leaky_relu``, whose default is 0.2.
DEFAULT_LEAKY_SLOPE = 0.01
#: How the weights of ``standard``-parameterised models are drawn: ``torch`` is PyTorch's
#: default (W ~ U(±1/√fan_in), i.e. std 1/√(3·fan_in), bias likewise); ``he-normal`` is Keras'
#: HeNormal (a normal truncated at 2 std with std √(2/fan_in) after truncation) with zero biases,
#: the initialisation of the node perturbation authors' TensorFlow code.
WEIGHT_INITS = ("torch", "he-normal")

#: Default layer sizes, filled into the resolved config when the user gives none.
DEFAULT_WIDTHS = {
    "mlp": (1000, 1000, 1000),
    "convnet": (1000,),
    "mlp-ntk": (1000, 1000, 1000),
    "convnet-ntk": (),
    "rnn": (64,),
    "rnn-ntk": (64,),
}
DEFAULT_CHANNELS = (32, 32, 64, 64)

#: What the ``-ntk`` model names switch on: (base model, batch norm, pool after every n convs).
NTK_VARIANTS = {
    "mlp-ntk": ("mlp", False, 2),
    "convnet-ntk": ("convnet", True, 1),
    "rnn-ntk": ("rnn", False, 0),
}


def make_activation(name: str, slope: float = DEFAULT_LEAKY_SLOPE) -> nn.Module:
    """The activation module for ``name``; ``slope`` is leaky-relu's negative-side slope."""
    if name == "relu":
        return nn.ReLU()
    if name == "leaky-relu":
        if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not 0 <= slope < 1:
            raise UserError(f"leaky-relu slope must be a number in [0, 1), got {slope!r}")
        return nn.LeakyReLU(float(slope))
    if name == "tanh":
        return nn.Tanh()
    if name == "identity":
        return nn.Identity()
    raise UserError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}")


class NTKScale(nn.Module):
    """Multiplies its input by 1/√fan_in: the forward scaling of the NTK parameterisation.

    Placed before a Linear/Conv2d whose weights are N(0, 1), the pair computes W x / √fan_in.
    Having no parameters, it is invisible to learning rules and decorrelation.
    """

    def __init__(self, fan_in: int) -> None:
        super().__init__()
        if fan_in < 1:
            raise UserError(f"NTK scaling needs a positive fan-in, got {fan_in}")
        self.fan_in = int(fan_in)
        self.factor = 1.0 / math.sqrt(fan_in)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"fan_in={self.fan_in}"


def _check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise UserError(
            f"unknown parameterization {parameterization!r}; choose one of: "
            f"{', '.join(PARAMETERIZATIONS)}"
        )


def ntk_init_(layer: nn.Module) -> nn.Module:
    """Weights ~ N(0, 1), bias 0 (in place; uses the global RNG like PyTorch's own init)."""
    with torch.no_grad():
        nn.init.normal_(layer.weight)
        if getattr(layer, "bias", None) is not None:
            layer.bias.zero_()
    return layer


def he_normal_init_(layer: nn.Module) -> nn.Module:
    """Keras' HeNormal in place: N(0, s²) truncated at ±2s, s = √(2/fan_in)/0.8796…; bias 0.

    The truncation shrinks the standard deviation by 0.87962566; Keras divides it out first, so
    the drawn weights have standard deviation √(2/fan_in). Uses the global RNG.
    """
    fan_in = layer.weight[0].numel()
    std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
    with torch.no_grad():
        nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
        if getattr(layer, "bias", None) is not None:
            layer.bias.zero_()
    return layer


def _check_init(weight_init: str, parameterization: str) -> None:
    if weight_init not in WEIGHT_INITS:
        raise UserError(
            f"unknown weight init {weight_init!r}; choose one of: {', '.join(WEIGHT_INITS)}"
        )
    if weight_init != "torch" and parameterization != "standard":
        raise UserError(
            f"weight init {weight_init!r} applies to the standard parameterisation only; "
            "the NTK parameterisation draws its own N(0, 1) weights"
        )


def init_weights_(model: nn.Module, weight_init: str) -> nn.Module:
    """Re-draw every Linear/Conv2d of ``model`` with ``weight_init`` (``torch``: leave as built)."""
    if weight_init == "he-normal":
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                he_normal_init_(module)
    return model


def parameterized(layer: nn.Module, parameterization: str) -> list[nn.Module]:
    """``[layer]`` (standard) or ``[NTKScale(fan_in), layer]`` with N(0, 1) weights (ntk)."""
    if parameterization == "standard":
        return [layer]
    _check_parameterization(parameterization)
    fan_in = layer.weight[0].numel()
    return [NTKScale(fan_in), ntk_init_(layer)]


class MLP(nn.Sequential):
    """Flatten → [Linear → activation] × len(widths) → Linear(num_classes).

    With ``parameterization="ntk"`` every Linear is preceded by an :class:`NTKScale`.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int] = DEFAULT_WIDTHS["mlp"],
        activation: str = "leaky-relu",
        parameterization: str = "standard",
        leaky_slope: float = DEFAULT_LEAKY_SLOPE,
    ) -> None:
        _check_parameterization(parameterization)
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(input_shape)
        for width in widths:
            layers += parameterized(nn.Linear(fan_in, width), parameterization)
            layers.append(make_activation(activation, leaky_slope))
            fan_in = width
        layers += parameterized(nn.Linear(fan_in, num_classes), parameterization)
        super().__init__(*layers)


class ConvNet(nn.Sequential):
    """Paper 1's conv net: conv 32, conv 32, pool, conv 64, conv 64, pool, fc 1000, classifier.

    ``channels`` lists the 3×3 'same' convolutions; a 2×2 max-pool follows every ``pool_every``
    of them. ``widths`` are the hidden fully connected layers before the classifier.
    ``batch_norm`` puts a ``BatchNorm2d(affine=False)`` after every convolution (no parameters,
    so every rule treats the net as its conv and linear layers only); ``parameterization="ntk"``
    precedes every layer with an :class:`NTKScale`.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        widths: Sequence[int] = DEFAULT_WIDTHS["convnet"],
        activation: str = "leaky-relu",
        pool_every: int = 2,
        batch_norm: bool = False,
        parameterization: str = "standard",
        leaky_slope: float = DEFAULT_LEAKY_SLOPE,
    ) -> None:
        _check_parameterization(parameterization)
        if len(input_shape) != 3:
            raise UserError(
                f"convnet needs image input [C, H, W], got shape {list(input_shape)}; "
                "use --model mlp"
            )
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for i, out_c in enumerate(channels, start=1):
            layers += parameterized(nn.Conv2d(c, out_c, kernel_size=3, padding=1), parameterization)
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_c, affine=False))
            layers.append(make_activation(activation, leaky_slope))
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
            layers += parameterized(nn.Linear(fan_in, width), parameterization)
            layers.append(make_activation(activation, leaky_slope))
            fan_in = width
        layers += parameterized(nn.Linear(fan_in, num_classes), parameterization)
        super().__init__(*layers)


class VanillaRNN(nn.Module):
    """A vanilla recurrent network over sequences: [B, T, inputs] → [B, T, outputs].

    h_t = f(W h_{t−1} + U x_t + b) with h_{−1} = 0, and y_t = V h_t + c. U (with b), W and V are
    the plain ``nn.Linear`` modules ``input``, ``recurrent`` (no bias) and ``readout``, so every
    learning rule finds them; backprop through time is ordinary autograd through the time loop.
    ``U x_t`` and the readout are applied to all time steps in one call each; W is called once
    per step after the first (h_{−1} = 0 contributes nothing).

    With ``parameterization="ntk"`` (the default here, as in the Align paper) all weights are
    N(0, 1) and each layer's input is scaled by 1/√fan_in in ``forward``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        activation: str = "relu",
        parameterization: str = "ntk",
    ) -> None:
        super().__init__()
        _check_parameterization(parameterization)
        if min(input_size, hidden_size, output_size) < 1:
            raise UserError(
                f"RNN sizes must be positive, got {input_size}, {hidden_size}, {output_size}"
            )
        self.input = nn.Linear(input_size, hidden_size)
        self.recurrent = nn.Linear(hidden_size, hidden_size, bias=False)
        self.readout = nn.Linear(hidden_size, output_size)
        self.activation = make_activation(activation)
        self.parameterization = parameterization
        ntk = parameterization == "ntk"
        if ntk:
            for layer in (self.input, self.recurrent, self.readout):
                ntk_init_(layer)
        self.input_scale = 1.0 / math.sqrt(input_size) if ntk else 1.0
        self.hidden_scale = 1.0 / math.sqrt(hidden_size) if ntk else 1.0

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 3:
            raise UserError(f"VanillaRNN needs input [batch, time, features], got {list(x.shape)}")
        drive = self.input(x * self.input_scale)  # U x_t + b for every t at once
        h = self.activation(drive[:, 0])
        states = [h]
        for t in range(1, x.shape[1]):
            h = self.activation(drive[:, t] + self.recurrent(h * self.hidden_scale))
            states.append(h)
        return self.readout(torch.stack(states, dim=1) * self.hidden_scale)


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    widths: Sequence[int] | None = None,
    channels: Sequence[int] | None = None,
    activation: str = "leaky-relu",
    parameterization: str | None = None,
    batch_norm: bool | None = None,
    pool_every: int | None = None,
    leaky_slope: float = DEFAULT_LEAKY_SLOPE,
    weight_init: str = "torch",
) -> nn.Module:
    """Build a model by name (uses the global RNG for initialisation).

    ``mlp`` / ``convnet`` use PyTorch's default initialisation (``weight_init="torch"``; or
    ``"he-normal"``, see :data:`WEIGHT_INITS`) unless ``parameterization="ntk"``;
    ``leaky_slope`` is the negative-side slope of ``leaky-relu`` activations;
    ``mlp-ntk`` / ``convnet-ntk`` are the NTK-parameterised models of the Align paper (the conv
    net with affine-free batch norm and a pool after every convolution). ``batch_norm`` and
    ``pool_every`` override a conv net's defaults. ``rnn`` / ``rnn-ntk`` are a
    :class:`VanillaRNN` (hidden size ``widths[0]``) over inputs of shape ``[T, features]``.
    """
    if activation not in ACTIVATIONS:
        raise UserError(
            f"unknown activation {activation!r}; choose one of: {', '.join(ACTIVATIONS)}"
        )
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    widths = tuple(DEFAULT_WIDTHS[name] if widths is None else widths)
    if any(int(w) < 1 for w in widths):
        raise UserError(f"layer widths must be positive integers, got {list(widths)}")
    family, default_bn, default_pool = NTK_VARIANTS.get(name, (name, False, 2))
    if parameterization is None:
        parameterization = "ntk" if name in NTK_VARIANTS else "standard"
    _check_parameterization(parameterization)
    _check_init(weight_init, parameterization)
    make_activation(activation, leaky_slope)  # reject a bad slope before building anything
    if family == "rnn":  # sequences [B, T, features] -> [B, T, num_classes outputs]
        if len(input_shape) != 2 or len(widths) != 1:
            raise UserError(
                f"model {name} maps sequences [time, features] through one hidden layer: needs "
                f"a sequence data set (e.g. add-task) and one width, got input shape "
                f"{list(input_shape)} and widths {list(widths)}"
            )
        rnn = VanillaRNN(
            int(input_shape[-1]), int(widths[0]), num_classes, activation, parameterization
        )
        return init_weights_(rnn, weight_init)
    if family == "mlp":
        model = MLP(input_shape, num_classes, widths, activation, parameterization, leaky_slope)
        return init_weights_(model, weight_init)
    channels = tuple(DEFAULT_CHANNELS if channels is None else channels)
    if not channels or any(int(c) < 1 for c in channels):
        raise UserError(f"conv channels must be positive integers, got {list(channels)}")
    pool_every = default_pool if pool_every is None else pool_every
    if pool_every < 0:
        raise UserError(f"pool_every must be >= 0, got {pool_every}")
    model = ConvNet(
        input_shape,
        num_classes,
        channels,
        widths,
        activation,
        pool_every=pool_every,
        batch_norm=default_bn if batch_norm is None else batch_norm,
        parameterization=parameterization,
        leaky_slope=leaky_slope,
    )
    return init_weights_(model, weight_init)
