"""Diagnostics that work with every learning rule.

* :func:`update_angles` — per layer, the angle between the update a rule wrote into ``.grad`` and
  the true backprop gradient on the same batch (0° = BP's direction, 90° = orthogonal).
* :func:`weight_feedback_alignment` — per layer, the angle between W and a feedback matrix B of
  the same shape, and the norm ratio ‖B‖/‖W‖ (feedback alignment's own diagnostic).
* :func:`alignment_score` — the Align paper's score: cosine between the Gram matrices ΔWᵀΔW of
  two weight changes (exact, or estimated with random probes), a convolution scored as the linear
  operator on its flattened input (:class:`ConvGeometry`); :func:`kernel_alignment_score` scores
  flattened kernels instead; :func:`shuffled` gives the chance-level control and
  :func:`alignment_scores` all of them for a set of layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .context import SINGLE_PROCESS, StepContext
from .nn import capturing
from .nn.decorrelation import Decorrelator


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
    """The trainable weight matrices/kernels of ``model`` (parameters with ≥ 2 dimensions).

    The weight of a layer inside a decorrelated wrapper is named after the wrapper
    (``1.weight``, not ``1.layer.weight``), so that the angles of a model and of its decorrelated
    version carry the same names and can be compared and plotted together.
    """
    wrapped = {
        id(m.layer.weight): f"{n}.weight" for n, m in model.named_modules() if _is_wrapper(m)
    }
    return [
        (wrapped.get(id(p), n), p)
        for n, p in model.named_parameters()
        if p.requires_grad and p.ndim >= 2
    ]


def _is_wrapper(module: nn.Module) -> bool:
    return isinstance(module, Decorrelator) and isinstance(
        getattr(module, "layer", None), nn.Module
    )


def update_angles(
    model: nn.Module,
    rule: object,
    x: Tensor,
    y: Tensor,
    reduce: Callable[[list[Tensor]], object] | None = None,
    ctx: StepContext = SINGLE_PROCESS,
) -> dict[str, float]:
    """Angles between the rule's ``.grad`` (already filled for this batch) and BP's gradient.

    Computes the BP reference with one extra forward/backward on the same batch, with the rule's
    changes to the backward pass suspended and decorrelators not capturing, then puts the rule's
    gradients back, so training is unaffected. Keys: ``angle/<parameter name>``. ``reduce``
    (multi-process training: :func:`decorrelate.distributed.average_grads`) is applied to the
    reference gradients, of the loss weighted by ``ctx.loss_scale`` as the rule's, so that they
    are the global batch's like the rule's.
    """
    params = weight_parameters(model)
    saved = {id(p): None if p.grad is None else p.grad.clone() for p in model.parameters()}
    with ExitStack() as stack:
        stack.enter_context(rule.suspended())
        stack.enter_context(capturing(model, False))
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            ctx.scaled(rule.loss(rule.loss.select(model(x)), y)).backward()
        if reduce is not None:
            reduce([p for p in model.parameters() if p.grad is not None])
        bp = {id(p): None if p.grad is None else p.grad.clone() for _, p in params}
    for p in model.parameters():
        p.grad = saved[id(p)]
    return {
        f"angle/{n}": angle(saved[id(p)], bp[id(p)])
        for n, p in params
        if saved[id(p)] is not None and bp[id(p)] is not None
    }


# ----------------------------------------------------------------------------- alignment score


@dataclass(frozen=True)
class ConvGeometry:
    """What makes a conv kernel a linear operator: the input's spatial size and how it is swept.

    The Align paper scores a convolution as the linear map it applies to a layer's *flattened*
    input (C_in·H·W → C_out·H'·W'), not as its flattened kernel; this is the information that map
    needs besides the kernel. ``padding`` is (top, bottom, left, right), zeros only.
    """

    input_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @classmethod
    def of(cls, conv: nn.Conv2d, input_size: Sequence[int]) -> ConvGeometry:
        """The geometry of ``conv`` applied to inputs of spatial size ``input_size`` (H, W)."""
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"the operator score needs a zero-padded convolution, got {conv.padding_mode!r}"
            )
        if conv.padding == "valid":
            pad = (0, 0, 0, 0)
        elif conv.padding == "same":  # PyTorch puts the odd one at the bottom/right
            total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
            pad = (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
        else:
            pad = (conv.padding[0], conv.padding[0], conv.padding[1], conv.padding[1])
        h, w = (int(s) for s in input_size[-2:])
        return cls((h, w), tuple(conv.stride), pad, tuple(conv.dilation), conv.groups)

    def apply(self, x: Tensor, weight: Tensor) -> Tensor:
        """A x: the convolution (no bias) of a batch of inputs [N, C_in, H, W]."""
        top, bottom, left, right = self.padding
        x = nn.functional.pad(x, (left, right, top, bottom))
        return nn.functional.conv2d(x, weight, None, self.stride, 0, self.dilation, self.groups)

    def adjoint(self, y: Tensor, weight: Tensor) -> Tensor:
        """Aᵀ y: the transposed convolution back onto the (unpadded) input space."""
        top, bottom, left, right = self.padding
        h, w = self.input_size
        shape = (y.shape[0], weight.shape[1] * self.groups, h + top + bottom, w + left + right)
        x = torch.nn.grad.conv2d_input(shape, weight, y, self.stride, 0, self.dilation, self.groups)
        return x[..., top : top + h, left : left + w]


def _tap_maps(n_in: int, k: int, stride: int, dilation: int, lo: int, hi: int) -> Tensor:
    """Distinct tap correspondences along one axis between two output positions, with counts.

    For output positions i, i' and kernel tap u, ``key[u]`` is the tap u' at i' that reads the same
    (in-bounds) input pixel as tap u at i, or −1. Returns ``(keys [K, k], counts [K])`` over all
    ordered pairs (i, i') that share at least one pixel.
    """
    n_out = (n_in + lo + hi - dilation * (k - 1) - 1) // stride + 1
    pos = torch.arange(n_out)[:, None] * stride - lo + torch.arange(k)[None, :] * dilation
    valid = (pos >= 0) & (pos < n_in)
    same = (pos[:, None, :, None] == pos[None, :, None, :]) & valid[:, None, :, None]
    keys = torch.where(same.any(-1), same.to(torch.int64).argmax(-1), -1).reshape(-1, k)
    keys, counts = torch.unique(keys, dim=0, return_counts=True)
    shared = (keys >= 0).any(1)
    return keys[shared], counts[shared]


def _conv_gram_traces(a: Tensor, b: Tensor, geom: ConvGeometry) -> tuple[Tensor, Tensor, Tensor]:
    """Exact tr(G_a G_b), ‖G_a‖²_F, ‖G_b‖²_F for the Gram matrices G = AᵀA of two conv operators.

    A = Σ_p W U_p, with U_p selecting the input pixels that the kernel taps read at output
    position p, so AᵀA = Σ_p U_pᵀ (WᵀW) U_p and tr(G_a G_b) = Σ_{p,p'} Σ_{t,t'} (W_aᵀW_a)[t,t']
    (W_bᵀW_b)[π t, π t'], where π maps a tap at p to the tap at p' reading the same pixel (taps
    that share none drop out). π factorises into a row and a column map and repeats across the
    interior, so the sum runs over the few distinct (row map, column map) pairs, each weighted by
    how many position pairs have it: O(#maps · (C_in k²)²), without forming the operator.
    """
    (kh, kw), g = a.shape[-2:], geom.groups
    rows = _tap_maps(geom.input_size[0], kh, geom.stride[0], geom.dilation[0], *geom.padding[:2])
    cols = _tap_maps(geom.input_size[1], kw, geom.stride[1], geom.dilation[1], *geom.padding[2:])
    c = a.shape[1]
    grams = []
    for w in (a, b):
        groups = w.reshape(g, w.shape[0] // g, c * kh * kw)
        # per group: WᵀW over the taps (c, u, v)
        grams.append((groups.transpose(1, 2) @ groups).reshape(g, c, kh, kw, c, kh, kw))
    ga, gb = grams

    def taps(gram: Tensor, r: Tensor, c: Tensor) -> Tensor:
        """The block of a [g, C, kh, kw, C, kh, kw] Gram on row taps r and column taps c."""
        return gram.index_select(2, r).index_select(5, r).index_select(3, c).index_select(6, c)

    ab = aa = bb = a.new_zeros(())
    for rkey, rcount in zip(*rows, strict=True):
        r_self = (rkey >= 0).nonzero().flatten()
        r_pair = rkey[r_self]
        for ckey, ccount in zip(*cols, strict=True):
            c_self = (ckey >= 0).nonzero().flatten()
            c_pair = ckey[c_self]
            n = (rcount * ccount).to(a.dtype)
            a_self, a_pair = taps(ga, r_self, c_self), taps(ga, r_pair, c_pair)
            b_self, b_pair = taps(gb, r_self, c_self), taps(gb, r_pair, c_pair)
            ab = ab + n * (a_self * b_pair).sum()
            aa = aa + n * (a_self * a_pair).sum()
            bb = bb + n * (b_self * b_pair).sum()
    return ab, aa, bb


def _as_matrix(t: Tensor) -> Tensor:
    """A weight change as a double [out, fan_in] matrix (conv kernels flattened per output)."""
    return t.detach().reshape(t.shape[0], -1).double() if t.ndim > 1 else t.detach().double()[None]


def _cosine(cross: Tensor, na: Tensor, nb: Tensor) -> float:
    if na == 0 or nb == 0:
        return math.nan
    return float(cross / (na * nb))


def _matrix_score(a: Tensor, b: Tensor, probes: int | None, generator) -> float:
    """The score of two [out, in] matrices (exact, or from Hutchinson probes on the input side)."""
    if probes is not None:
        v = torch.randn(a.shape[1], probes, generator=generator, dtype=a.dtype, device=a.device)
        ga, gb = a.T @ (a @ v), b.T @ (b @ v)
        return _cosine((ga * gb).sum(), ga.pow(2).sum().sqrt(), gb.pow(2).sum().sqrt())
    if a.shape[0] <= a.shape[1]:  # out-side products are the smaller ones
        return _cosine(
            (a @ b.T).pow(2).sum(),
            torch.linalg.matrix_norm(a @ a.T),
            torch.linalg.matrix_norm(b @ b.T),
        )
    ga, gb = a.T @ a, b.T @ b
    return _cosine((ga * gb).sum(), torch.linalg.matrix_norm(ga), torch.linalg.matrix_norm(gb))


def _check_pair(dw: Tensor, dw_hat: Tensor, probes: int | None) -> None:
    if dw.shape != dw_hat.shape:
        raise ValueError(
            f"weight changes differ in shape: {tuple(dw.shape)} vs {tuple(dw_hat.shape)}"
        )
    if probes is not None and probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")


def alignment_score(
    dw: Tensor,
    dw_hat: Tensor,
    *,
    probes: int | None = None,
    generator: torch.Generator | None = None,
    geometry: ConvGeometry | None = None,
) -> float:
    """A = tr((ΔWᵀΔW)(ΔŴᵀΔŴ)) / (‖ΔWᵀΔW‖_F ‖ΔŴᵀΔŴ‖_F), in [0, 1] (Boopathy & Fiete 2022).

    The cosine between the input-side Gram matrices of two weight changes of one layer (e.g. BP's
    accumulated ΔW and the align-zero prediction ΔŴ): 1 when ΔW and ΔŴ weight the same input
    directions alike, whatever their output-side structure. Both Gram matrices are positive
    semi-definite, so A ≥ 0; its chance level (see :func:`shuffled`) depends on how concentrated
    ΔWᵀΔW is, and is near 0 only for low-rank, input-structured changes such as trained weights.

    A matrix [out, in] is scored as itself. A conv kernel [C_out, C_in, kh, kw] is scored, as in
    the paper and the authors' code, as the **linear operator** it applies to the flattened layer
    input (C_in·H·W → C_out·H'·W'), which needs ``geometry`` (:meth:`ConvGeometry.of`); this
    differs from scoring the flattened kernel (:func:`kernel_alignment_score`) because shifted
    copies of the kernel overlap. Exact by default (see :func:`_conv_gram_traces`; for a matrix
    via tr(AᵀA BᵀB) = ‖A Bᵀ‖²_F). With ``probes = k``: Hutchinson estimates from k Gaussian
    probes v of the input space, tr(G₁G₂) ≈ mean ⟨G₁v, G₂v⟩ and ‖G‖²_F ≈ mean ‖Gv‖² (each
    unbiased; their ratio A is consistent, with O(1/k) bias), for convolutions by applying the
    convolution and its transpose, as the authors' code does (it also rescales each probe batch
    by its mean |G v|, which we do not). Probes are drawn from ``generator``. nan if either
    change is zero.
    """
    _check_pair(dw, dw_hat, probes)
    if dw.ndim != 4:
        return _matrix_score(_as_matrix(dw), _as_matrix(dw_hat), probes, generator)
    if geometry is None:
        raise ValueError(
            "a conv kernel is scored as the operator on its input: pass "
            "geometry=ConvGeometry.of(conv, input_size) (or use kernel_alignment_score)"
        )
    a, b = dw.detach().double(), dw_hat.detach().double()
    if probes is None:
        cross, aa, bb = _conv_gram_traces(a, b, geometry)
        return _cosine(cross, aa.clamp_min(0).sqrt(), bb.clamp_min(0).sqrt())
    shape = (probes, a.shape[1] * geometry.groups, *geometry.input_size)
    v = torch.randn(shape, generator=generator, dtype=a.dtype, device=a.device)
    ga = geometry.adjoint(geometry.apply(v, a), a)
    gb = geometry.adjoint(geometry.apply(v, b), b)
    return _cosine((ga * gb).sum(), ga.pow(2).sum().sqrt(), gb.pow(2).sum().sqrt())


def kernel_alignment_score(
    dw: Tensor,
    dw_hat: Tensor,
    *,
    probes: int | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """The same cosine for conv kernels flattened to [C_out, C_in·kh·kw] (not the paper's score).

    Compares the kernels' Gram matrices over patch coordinates, ignoring how shifted copies of the
    kernel overlap on the image. Kept as a cheap, size-free diagnostic next to the operator score
    of :func:`alignment_score`; on a matrix the two are identical.
    """
    _check_pair(dw, dw_hat, probes)
    return _matrix_score(_as_matrix(dw), _as_matrix(dw_hat), probes, generator)


def shuffled(t: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``t`` with its entries randomly permuted: the chance-level control for alignment scores.

    Keeps the distribution of values and destroys which input each value belongs to.
    """
    flat = t.detach().flatten()
    order = torch.randperm(flat.numel(), generator=generator, device="cpu").to(flat.device)
    return flat[order].reshape(t.shape)


def alignment_scores(
    changes: dict[str, tuple[Tensor, Tensor]],
    *,
    probes: int | None = None,
    generator: torch.Generator | None = None,
    geometry: Mapping[str, ConvGeometry] | None = None,
) -> dict[str, float]:
    """``{"align_score/<layer>": A, "align_score_shuffled/<layer>": A_control}`` per layer.

    ``changes`` maps a layer name to (ΔW, ΔŴ); the control scores ΔW against a shuffled ΔŴ.
    Conv layers need their ``geometry`` (by layer name) and also get
    ``align_score_kernel/<layer>``, the flattened-kernel score (:func:`kernel_alignment_score`).
    """
    geometry = geometry or {}
    out: dict[str, float] = {}
    for name, (dw, dw_hat) in changes.items():
        geom = geometry.get(name)
        kw = {"probes": probes, "generator": generator}
        out[f"align_score/{name}"] = alignment_score(dw, dw_hat, geometry=geom, **kw)
        out[f"align_score_shuffled/{name}"] = alignment_score(
            dw, shuffled(dw_hat, generator), geometry=geom, **kw
        )
        if dw.ndim == 4:
            out[f"align_score_kernel/{name}"] = kernel_alignment_score(dw, dw_hat, **kw)
    return out
