"""The update directions of the fixed-point rules, as pure batched tensor functions.

Row convention: a batch is ``[B, N]``, ``W`` acts as ``r @ W.T``, ``g`` is the gain
f′(W r + X) per sample (the diagonal of G_b), and ``delta`` holds δ_b = ∂L/∂r_b *of the batch
loss* (so a batch-mean loss already carries its 1/B and every direction below is a plain sum over
the batch). With B_b = G_b⁻¹ − W and A_b = B_b⁻¹ (r = A X for a linear network):

* Euclidean:  ∇_W L = Σ_b G_b (I − WᵀG_b)⁻¹ δ_b r_bᵀ = Σ_b A_bᵀ δ_b r_bᵀ       (adjoint solves)
* linearized: Σ_b [(I − W G) G δ] [(I − G W)ᵀ (I − G W) r]ᵀ                    (no inverse)
  which for a linear network is B (∇_A L) B = (BBᵀ) ∇_W L (BᵀB), B = I − W.
* linearized-g: Σ_b [(I − W G) δ] [(I − W G)ᵀ (I − W G) r]ᵀ                   (= the above if G = I)
  (dW4: *both* factors carry I − W G, as in the paper and the authors' ``Set_Grad_dW4``; only
  dW3's right factor has I − G W.)
* reparam (linear only): A' = A − η ∇_A L with ∇_A L = Σ_b δ_b X_bᵀ, W' = I − A'⁻¹.

All of them are O(B·N²) matmuls except the Euclidean adjoint solve (see :func:`solve_adjoint`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .solver import SolverConfig, solve_adjoint


def euclidean_gradient(
    W: Tensor, r: Tensor, g: Tensor, delta: Tensor, activation: str, config: SolverConfig
) -> Tensor:
    """∂L/∂W by implicit differentiation: solve (I − WᵀG_b) u_b = δ_b; Σ_b (g_b ⊙ u_b) r_bᵀ."""
    u = solve_adjoint(W, g, delta, activation, config)
    return (g * u).T @ r


def _right_factor(W: Tensor, r: Tensor, g: Tensor) -> Tensor:
    """v = (I − G W)ᵀ (I − G W) r per sample, as q = r − g ⊙ (W r), v = q − Wᵀ (g ⊙ q)."""
    q = r - g * (r @ W.T)
    return q - (g * q) @ W


def _right_factor_wg(W: Tensor, r: Tensor, g: Tensor) -> Tensor:
    """v = (I − W G)ᵀ (I − W G) r per sample, as q = r − W (g ⊙ r), v = q − g ⊙ (Wᵀ q)."""
    q = r - (g * r) @ W.T
    return q - g * (q @ W)


def linearized_update(W: Tensor, r: Tensor, g: Tensor, delta: Tensor) -> Tensor:
    """dW3: Σ_b u_b v_bᵀ, u = (I − W G) G δ = g ⊙ δ − W (g² ⊙ δ), v = (I − G W)ᵀ(I − G W) r."""
    u = g * delta - (g * g * delta) @ W.T
    return u.T @ _right_factor(W, r, g)


def linearized_g_update(W: Tensor, r: Tensor, g: Tensor, delta: Tensor) -> Tensor:
    """dW4: Σ_b u_b v_bᵀ, u = (I − W G) δ = δ − W (g ⊙ δ), v = (I − W G)ᵀ(I − W G) r."""
    u = delta - (g * delta) @ W.T
    return u.T @ _right_factor_wg(W, r, g)


def gradient_wrt_A(X: Tensor, delta: Tensor) -> Tensor:
    """∇_A L = Σ_b δ_b X_bᵀ for a linear network r = A X."""
    return delta.T @ X


def response_matrix(W: Tensor) -> Tensor:
    """A = (I − W)⁻¹ of a linear network (one shared N×N inverse, by definition of the rule)."""
    eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    return torch.linalg.inv(eye - W)


def reparam_target(W: Tensor, X: Tensor, delta: Tensor, lr: float) -> Tensor:
    """W' = I − (A − η ∇_A L)⁻¹: the weights whose response matrix is one exact A-space step."""
    eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    A_new = response_matrix(W) - lr * gradient_wrt_A(X, delta)
    return eye - torch.linalg.inv(A_new)
