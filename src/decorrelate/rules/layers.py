"""The layers a learning rule acts on: Linear, Conv2d, or a decorrelated wrapper of one.

Feedback alignment replaces the error each such layer sends back; node perturbation perturbs
their outputs and writes their weight gradients itself. Both find the layers here, and both treat
a decorrelated wrapper (a = W R x) as one layer whose effective weight is W R.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..nn import Decorrelator

#: Parameterised modules allowed between the layers (their own, local gradients are used).
ALLOWED_PARAMETRISED = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def trainable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers a rule trains (FA reroutes their error, NP perturbs them), in forward order.

    Plain ``nn.Linear`` / ``nn.Conv2d`` modules and decorrelated wrappers of them (the layer
    inside a wrapper is not listed separately). Other modules with parameters are refused unless
    they are normalisation layers, whose local gradients are kept as in BP.
    """
    points: list[tuple[str, nn.Module]] = []
    inside: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        if isinstance(module, Decorrelator):
            points.append((name, module))
            inside.update(id(m) for m in module.modules())
        elif type(module) in (nn.Linear, nn.Conv2d):
            points.append((name, module))
        elif any(True for _ in module.parameters(recurse=False)) and not isinstance(
            module, ALLOWED_PARAMETRISED
        ):
            raise UserError(
                f"this rule supports nn.Linear and nn.Conv2d layers; {name or 'the model'} is a "
                f"{type(module).__name__} with its own parameters"
            )
    for name, module in points:
        conv = inner_layer(module)
        if isinstance(conv, nn.Conv2d) and conv.groups != 1:
            raise UserError(
                f"this rule needs groups=1 convolutions; {name} has groups={conv.groups}"
            )
    if not points:
        raise UserError("the model has no nn.Linear or nn.Conv2d layer for this rule")
    return points


def inner_layer(module: nn.Module) -> nn.Module:
    """The Linear/Conv2d itself (inside a decorrelated wrapper, its ``.layer``)."""
    return module.layer if hasattr(module, "fold") and hasattr(module, "layer") else module


def fold_r(module: nn.Module, matrix: Tensor) -> Tensor:
    """``matrix`` times R for a decorrelated layer (the error then goes back through Rᵀ)."""
    return module.fold(matrix) if hasattr(module, "fold") else matrix


def accumulate_grad(param: Tensor | None, grad: Tensor) -> None:
    """Add a hand-computed update into ``param.grad`` (rules that write ``.grad`` themselves).

    Skips missing and frozen parameters; casts and reshapes to the parameter.
    """
    if param is None or not param.requires_grad:
        return
    grad = grad.to(param.dtype).reshape(param.shape)
    param.grad = grad if param.grad is None else param.grad + grad


def conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Numeric padding of a zero-padded convolution (``'same'``/``'valid'`` resolved).

    ``torch.nn.grad.conv2d_weight``/``conv2d_input`` take numbers only; rules that form conv
    gradients themselves (FA, NP, Align) resolve the layer's padding here.
    """
    if conv.padding_mode != "zeros":
        raise UserError(
            f"this rule needs zero-padded convolutions, got padding_mode={conv.padding_mode!r}"
        )
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            raise UserError("this rule needs symmetric 'same' padding (odd kernels)")
        return (total[0] // 2, total[1] // 2)
    return tuple(conv.padding)


def local_weight_grad(
    module: nn.Module, inputs: Sequence[Tensor], errors: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """Σ over (input, error) pairs of ⟨e aᵀ⟩ for the module's weight, and Σ e for its bias.

    The local update of rules that form weight gradients from a layer's input activity ``a`` and
    a per-sample error ``e`` at its output (node perturbation, the Align rules). Sums, no means:
    callers scale ``e``. For a Conv2d the input patches are used (``e`` is [B, C_out, H, W]); a
    list holds one pair per call of the layer (a recurrent layer is called once per time step).

    For a decorrelated wrapper, ``inputs`` are its inputs x and the result is the gradient for the
    wrapped W through the effective weight W R: ⟨e xᵀ⟩ Rᵀ = ⟨e (R x)ᵀ⟩. A Linear takes the cheaper
    order: decorrelate the inputs (rows·d²) when there are fewer rows than outputs, otherwise map
    the d-wide result through Rᵀ (out·d²); the classifier, with few outputs, takes the latter.
    """
    layer = inner_layer(module)
    wrapped = hasattr(module, "weight_grad")
    if isinstance(layer, nn.Conv2d):
        padding = conv_padding(layer)
        gw = sum(
            torch.nn.grad.conv2d_weight(
                a, layer.weight.shape, e, layer.stride, padding, layer.dilation, layer.groups
            )
            for a, e in zip(inputs, errors, strict=True)
        )
        gb = sum(e.sum((0, 2, 3)) for e in errors)
        return (module.weight_grad(gw) if wrapped else gw), gb
    a = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])
    e = torch.cat([t.reshape(-1, t.shape[-1]) for t in errors])
    if wrapped and e.shape[1] >= a.shape[0]:
        gw = e.T @ module.transform(a)
    else:
        gw = e.T @ a
        if wrapped:
            gw = module.weight_grad(gw)
    return gw, e.sum(0)
