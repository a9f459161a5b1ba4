"""Layer kinds: what every learning rule and decorrelation need to know about a layer.

A *layer* is a module that applies a weight linearly to its input, a = W x (+ b): Linear, a
convolution, Hugging Face's ``Conv1D``, an embedding (W applied to a one-hot index), a
normalisation layer's affine γ (applied elementwise to the normalised input x̂). Rules act on
layers: feedback alignment replaces the error a layer sends back, node perturbation perturbs its
output and forms its weight gradient from the local ⟨e aᵀ⟩, Align forms the same local product
with another error, decorrelation puts an R before it. A :class:`LayerKind` says, for one kind of
module, how to do each of these; nothing else in the library lists module types.

Add your own with :func:`register_layer_kind`; a kind needs :meth:`LayerKind.matches` and
:meth:`LayerKind.apply` (the linear map with a given weight), and gets exact gradients from
autograd through ``apply``. Override :meth:`~LayerKind.weight_grad` / :meth:`~LayerKind.input_grad`
with closed forms where they are cheaper (the built-in kinds do)::

    class Scale(nn.Module):                       # y = x * w, one weight per feature
        def __init__(self, d): super().__init__(); self.weight = nn.Parameter(torch.ones(d))
        def forward(self, x): return x * self.weight

    class ScaleKind(dc.layers.LayerKind):
        name = "scale"
        decorrelable, why_not = False, "its weight is diagonal"
        def matches(self, module): return isinstance(module, Scale)
        def apply(self, module, x, weight): return x * weight

    dc.layers.register_layer_kind(ScaleKind())

The input of every layer call is taken to hold the batch in dim 0 (``unroll`` makes attention and
recurrent modules satisfy this); a per-sample error ``e`` has the shape of the layer's output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def stack_rows(tensors: Sequence[Tensor]) -> Tensor:
    """Features-last tensors [..., d] of several calls as one [N, d] matrix: every position of
    every call is a row (the local ⟨e aᵀ⟩ of a features-last layer is then one product)."""
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors])


class LayerKind:
    """How rules read, apply and form local gradients for one kind of layer (see module doc)."""

    #: Short name, shown in tables and error messages.
    name: str = ""
    #: Whether ``decorrelate()`` can put an R before layers of this kind; if not, ``why_not``.
    decorrelable: bool = False
    why_not: str = "no decorrelator is defined for this kind of layer"
    #: Whether the layer passes an error to its input (an embedding's input is an index: no).
    has_input_grad: bool = True

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is of this kind."""
        raise NotImplementedError

    def weight(self, module: nn.Module) -> Tensor:
        """The weight Parameter."""
        return module.weight

    def bias(self, module: nn.Module) -> Tensor | None:
        """The bias Parameter, or None."""
        return getattr(module, "bias", None)

    def apply(self, module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
        """The layer's linear map on input ``x`` with ``weight`` (shaped like the weight
        Parameter) in place of its own, without the bias."""
        raise NotImplementedError

    def as_matrix(self, module: nn.Module, weight: Tensor) -> Tensor:
        """``weight`` (shaped like the Parameter) as the [out, in] matrix a rule reasons about:
        rows are output units (channels), columns what one output unit sees."""
        return weight.reshape(weight.shape[0], -1)

    def from_matrix(self, module: nn.Module, matrix: Tensor) -> Tensor:
        """Inverse of :meth:`as_matrix`: an [out, in] matrix shaped like the weight Parameter."""
        return matrix.reshape(self.weight(module).shape)

    def fan_in(self, module: nn.Module) -> int:
        """Inputs one output unit sees (for initialising feedback matrices)."""
        return int(self.as_matrix(module, self.weight(module)).shape[1])

    def weight_grad(
        self, module: nn.Module, inputs: Sequence[Tensor], errors: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor | None]:
        """Σ over calls of the local ⟨e aᵀ⟩ for the weight, and Σ e for the bias (None without).

        ``inputs[i]`` is the input of call i, ``errors[i]`` a per-sample error shaped like that
        call's output. Sums, not means: callers scale ``e``. The default is exact for any linear
        ``apply``: the vector–Jacobian product of ``apply`` in the weight.
        """
        w = self.weight(module).detach()
        with torch.enable_grad():
            w_var = w.clone().requires_grad_(True)
            out = [self.apply(module, a.detach(), w_var) for a in inputs]
            (gw,) = torch.autograd.grad(
                out, [w_var], [e.to(o.dtype) for e, o in zip(errors, out, strict=True)]
            )
        return gw, self._bias_grad(module, errors)

    def input_grad(
        self, module: nn.Module, delta: Tensor, x: Tensor, weight: Tensor
    ) -> Tensor | None:
        """The error ``delta`` at the output sent to the input ``x`` through ``weight`` (shaped
        like the weight Parameter) instead of the layer's own: Wᵀ δ with W replaced. None when
        the input takes no error (:attr:`has_input_grad`). Default: autograd through ``apply``.
        """
        if not self.has_input_grad:
            return None
        with torch.enable_grad():
            x_var = x.detach().requires_grad_(True)
            out = self.apply(module, x_var, weight.detach().to(delta.dtype))
            (g,) = torch.autograd.grad(out, [x_var], [delta])
        return g

    def _bias_grad(self, module: nn.Module, errors: Sequence[Tensor]) -> Tensor | None:
        """Σ e over every dim but the bias's own (the feature dim given by :meth:`bias_dim`)."""
        b = self.bias(module)
        if b is None:
            return None
        dim = self.bias_dim(module)
        total = None
        for e in errors:
            moved = e.movedim(dim, -1).reshape(-1, b.numel()).sum(0)
            total = moved if total is None else total + moved
        return total

    def bias_dim(self, module: nn.Module) -> int:
        """The dim of the output that indexes the bias (−1 for features last, 1 for channels)."""
        return -1


class LinearKind(LayerKind):
    """``nn.Linear`` and any subclass of it (timm heads, attention's out_proj, ...):
    a = x Wᵀ + b on the last dim."""

    name = "linear"
    decorrelable = True
    why_not = ""

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def apply(self, module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight)

    def weight_grad(self, module, inputs, errors):
        a, e = stack_rows(inputs), stack_rows(errors)
        return e.T @ a.to(e.dtype), self._bias_grad(module, errors)

    def input_grad(self, module, delta, x, weight):
        return delta @ weight.to(delta.dtype)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2), found without importing
    transformers: a Linear with the weight stored [in, out] and ``nf`` output features."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


class HFConv1DKind(LayerKind):
    """Hugging Face ``Conv1D``: a = x W + b with W stored transposed, [in, out]."""

    name = "hf-conv1d"
    decorrelable = True
    why_not = ""

    def matches(self, module: nn.Module) -> bool:
        return _is_hf_conv1d(module)

    def apply(self, module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
        return x @ weight

    def as_matrix(self, module, weight):
        return weight.T

    def from_matrix(self, module, matrix):
        return matrix.T

    def weight_grad(self, module, inputs, errors):
        a, e = stack_rows(inputs), stack_rows(errors)
        return a.to(e.dtype).T @ e, self._bias_grad(module, errors)

    def input_grad(self, module, delta, x, weight):
        return delta @ weight.to(delta.dtype).T


_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                3: torch.nn.grad.conv3d_weight}  # fmt: skip
_CONV_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,
               3: torch.nn.grad.conv3d_input}  # fmt: skip
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_padding(conv: nn.modules.conv._ConvNd) -> tuple[int, ...] | None:
    """Symmetric numeric zero padding of ``conv`` per spatial dim, or None when it cannot be
    written so (another padding mode, or 'same' with an even total: those pad explicitly)."""
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            return None
        return tuple(t // 2 for t in total)
    return tuple(conv.padding)


def conv_explicit_pad(conv: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """``x`` padded as ``conv`` pads it (any padding mode, asymmetric 'same'), for a
    convolution then run with zero padding 0."""
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    if conv.padding == "same":
        pads: list[int] = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)
    return F.pad(x, [p for p in reversed(conv.padding) for _ in range(2)])


class ConvKind(LayerKind):
    """``nn.Conv1d``/``Conv2d``/``Conv3d``: any stride, dilation, padding mode and groups
    (depthwise included). The matrix a rule sees is [C_out, C_in/groups · kernel]: what one
    output channel applies to one input patch of its group."""

    name = "conv"
    decorrelable = True
    why_not = ""

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed

    def bias_dim(self, module):
        return 1

    def _dims(self, module) -> int:
        return len(module.kernel_size)

    def padded(self, module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """(input, padding) for a plain convolution that equals the layer's."""
        pad = conv_padding(module)
        if pad is not None:
            return x, pad
        return conv_explicit_pad(module, x), (0,) * self._dims(module)

    def apply(self, module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
        return self.convolve(module, x, weight)

    def convolve(
        self, module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None = None
    ) -> Tensor:
        """The layer's convolution of ``x`` (its stride, padding, dilation and groups) with
        ``weight`` and ``bias`` in place of its own (a decorrelated conv's forward)."""
        x, pad = self.padded(module, x)
        conv = _CONV[self._dims(module)]
        return conv(x, weight, bias, module.stride, pad, module.dilation, module.groups)

    def weight_grad(self, module, inputs, errors):
        pad = conv_padding(module)
        if pad is None:  # other padding modes: autograd through apply
            return super().weight_grad(module, inputs, errors)
        n = self._dims(module)
        shape = self.weight(module).shape
        gw = None
        for a, e in zip(inputs, errors, strict=True):
            g = _CONV_WEIGHT[n](
                a.to(e.dtype), shape, e, module.stride, pad, module.dilation, module.groups
            )
            gw = g if gw is None else gw + g
        return gw, self._bias_grad(module, errors)

    def input_grad(self, module, delta, x, weight):
        pad = conv_padding(module)
        if pad is None:
            return super().input_grad(module, delta, x, weight)
        return _CONV_INPUT[self._dims(module)](
            x.shape, weight.to(delta.dtype), delta, module.stride, pad, module.dilation,
            module.groups,
        )  # fmt: skip


class EmbeddingKind(LayerKind):
    """``nn.Embedding``: row ``i`` of W for index ``i`` (W applied to a one-hot input).

    Its input is an index: nothing flows back from it, and there is nothing to decorrelate.
    ``padding_idx`` rows get no update, as in PyTorch.
    """

    name = "embedding"
    decorrelable = False
    why_not = "its input is an index, not a vector of features"
    has_input_grad = False

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def bias(self, module):
        return None

    def apply(self, module, x, weight):
        return F.embedding(x, weight, module.padding_idx)

    def as_matrix(self, module, weight):
        return weight.T  # [dim, num]: output units × (one-hot) inputs

    def from_matrix(self, module, matrix):
        return matrix.T

    def weight_grad(self, module, inputs, errors):
        w = self.weight(module)
        gw = torch.zeros(w.shape, dtype=errors[0].dtype, device=w.device)
        for idx, e in zip(inputs, errors, strict=True):
            gw.index_add_(0, idx.reshape(-1), e.reshape(-1, w.shape[1]))
        if module.padding_idx is not None:
            gw[module.padding_idx] = 0
        return gw, None


class NormKind(LayerKind):
    """The affine part of a normalisation layer (BatchNorm, LayerNorm, GroupNorm, RMSNorm):
    a = γ ⊙ x̂ + β, with x̂ the normalised input. Its "input" for the local gradient is x̂,
    recomputed from the layer input with the statistics the layer used (batch statistics in
    training mode). Only layers with affine parameters are layers."""

    name = "norm"
    why_not = "it is a normalisation layer (decorrelate the layer after it)"

    def matches(self, module: nn.Module) -> bool:
        kinds = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
        rms = getattr(nn, "RMSNorm", None)
        if rms is not None:
            kinds = (*kinds, rms)
        return isinstance(module, kinds) and getattr(module, "weight", None) is not None

    def bias_dim(self, module):
        return -1 if self._features_last(module) else 1

    def _features_last(self, module) -> bool:
        return not isinstance(module, nn.modules.batchnorm._BatchNorm | nn.GroupNorm)

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        """x̂: the layer's output without its affine part."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            use_batch = module.training or module.running_mean is None
            return F.batch_norm(
                x,
                None if use_batch else module.running_mean,
                None if use_batch else module.running_var,
                training=use_batch,
                eps=module.eps,
            )
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x, module.num_groups, eps=module.eps)
        if isinstance(module, nn.LayerNorm):
            return F.layer_norm(x, module.normalized_shape, eps=module.eps)
        return F.rms_norm(x, module.normalized_shape, eps=module.eps)

    def _shape(self, module, weight: Tensor, x: Tensor) -> Tensor:
        if self._features_last(module):
            return weight
        return weight.reshape(-1, *([1] * (x.dim() - 2)))

    def apply(self, module, x, weight):
        return self.normalized(module, x) * self._shape(module, weight, x)

    def weight_grad(self, module, inputs, errors):
        w = self.weight(module)
        gw = None
        for a, e in zip(inputs, errors, strict=True):
            prod = self.normalized(module, a.to(e.dtype)) * e
            if self._features_last(module):
                g = prod.reshape(-1, *w.shape).sum(0)
            else:
                g = prod.movedim(1, -1).reshape(-1, w.numel()).sum(0)
            gw = g if gw is None else gw + g
        return gw, self._bias_grad(module, errors)

    def input_grad(self, module, delta, x, weight):
        # through the normalisation's own Jacobian (it has no weight to replace there)
        return super().input_grad(module, delta, x, weight)
