"""Diagnostics that work with every learning rule.

* :func:`update_angles` — per layer, the angle between the update a rule wrote into ``.grad`` and
  the true backprop gradient on the same batch (0° = BP's direction, 90° = orthogonal).
* :func:`weight_feedback_alignment` — per layer, the angle between W and a feedback matrix B of
  the same shape, and the norm ratio ‖B‖/‖W‖ (feedback alignment's own diagnostic).
* :func:`alignment_score` — the Align paper's score: cosine between the Gram matrices ΔWᵀΔW of
  two weight changes (exact, or estimated with random probes); :func:`shuffled` gives the
  chance-level control and :func:`alignment_scores` both for a set of layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack

import torch
from torch import Tensor, nn

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
) -> dict[str, float]:
    """Angles between the rule's ``.grad`` (already filled for this batch) and BP's gradient.

    Computes the BP reference with one extra forward/backward on the same batch, with the rule's
    changes to the backward pass suspended and decorrelators not capturing, then puts the rule's
    gradients back, so training is unaffected. Keys: ``angle/<parameter name>``. ``reduce``
    (multi-process training: :func:`decorrelate.distributed.average_grads`) is applied to the
    reference gradients, so that they are the global batch's like the rule's.
    """
    params = weight_parameters(model)
    saved = {id(p): None if p.grad is None else p.grad.clone() for p in model.parameters()}
    with ExitStack() as stack:
        stack.enter_context(rule.suspended())
        stack.enter_context(capturing(model, False))
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            rule.loss(model(x), y).backward()
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


def _as_matrix(t: Tensor) -> Tensor:
    """A weight change as a double [out, fan_in] matrix (conv kernels flattened per output)."""
    return t.detach().reshape(t.shape[0], -1).double() if t.ndim > 1 else t.detach().double()[None]


def alignment_score(
    dw: Tensor,
    dw_hat: Tensor,
    *,
    probes: int | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """A = tr((ΔWᵀΔW)(ΔŴᵀΔŴ)) / (‖ΔWᵀΔW‖_F ‖ΔŴᵀΔŴ‖_F), in [0, 1] (Boopathy & Fiete 2022).

    The cosine between the input-side Gram matrices of two weight changes of one layer (e.g. BP's
    accumulated ΔW and the align-zero prediction ΔŴ): 1 when ΔW and ΔŴ weight the same input
    directions alike, whatever their output-side structure. Both Gram matrices are positive
    semi-definite, so A ≥ 0; its chance level (see :func:`shuffled`) depends on how concentrated
    ΔWᵀΔW is, and is near 0 only for low-rank, input-structured changes such as trained weights.

    Exact by default, in O(min(out, in)·out·in) via tr(AᵀA BᵀB) = ‖A Bᵀ‖²_F. With ``probes = k``
    a Hutchinson estimate from k Gaussian probes v (tr(G₁G₂) ≈ ⟨G₁v, G₂v⟩, ‖G‖²_F ≈ ‖Gv‖²), in
    O(k·out·in), drawn from ``generator``. nan if either change is zero.
    """
    a, b = _as_matrix(dw), _as_matrix(dw_hat)
    if a.shape != b.shape:
        raise ValueError(f"weight changes differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if probes is not None:
        if probes < 1:
            raise ValueError(f"probes must be >= 1, got {probes}")
        v = torch.randn(a.shape[1], probes, generator=generator, dtype=a.dtype, device=a.device)
        ga, gb = a.T @ (a @ v), b.T @ (b @ v)
        cross, na, nb = (ga * gb).sum(), ga.pow(2).sum().sqrt(), gb.pow(2).sum().sqrt()
    elif a.shape[0] <= a.shape[1]:  # out-side products are the smaller ones
        cross = (a @ b.T).pow(2).sum()
        na = torch.linalg.matrix_norm(a @ a.T)
        nb = torch.linalg.matrix_norm(b @ b.T)
    else:
        ga, gb = a.T @ a, b.T @ b
        cross, na, nb = (ga * gb).sum(), torch.linalg.matrix_norm(ga), torch.linalg.matrix_norm(gb)
    if na == 0 or nb == 0:
        return math.nan
    return float(cross / (na * nb))


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
) -> dict[str, float]:
    """``{"align_score/<layer>": A, "align_score_shuffled/<layer>": A_control}`` per layer.

    ``changes`` maps a layer name to (ΔW, ΔŴ); the control scores ΔW against a shuffled ΔŴ.
    """
    out: dict[str, float] = {}
    for name, (dw, dw_hat) in changes.items():
        out[f"align_score/{name}"] = alignment_score(dw, dw_hat, probes=probes, generator=generator)
        out[f"align_score_shuffled/{name}"] = alignment_score(
            dw, shuffled(dw_hat, generator), probes=probes, generator=generator
        )
    return out
