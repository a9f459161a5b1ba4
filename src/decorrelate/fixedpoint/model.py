"""The rate network τ dr/dt = −r + f(W r + X), X = W_x x, whose response is its fixed point.

:class:`RateRNN` holds the recurrent weights ``W`` (the only ``nn.Parameter``), a fixed random
input matrix ``W_x`` and an optional fixed random readout ``R`` (both buffers drawn from a seeded
generator). Its output for an input batch ``x`` is ``R r*`` (or ``r*`` without a readout), with
r* = f(W r* + X) found by the batched solver of :mod:`.solver`.

``model(x)`` is differentiable in ``W`` by implicit differentiation (a custom autograd function
whose backward solves (I − WᵀG) u = ∂L/∂r), so plain ``loss.backward()`` gives the Euclidean
gradient and any PyTorch code can train the network. The learning rules of :mod:`.rules` do the
same maths by hand under ``torch.no_grad()`` and also offer the reparameterised updates.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from .activations import get_activation
from .solver import FixedPoint, SolverConfig, solve_adjoint, solve_fixed_point


class RateRNN(nn.Module):
    """A batched rate RNN evaluated at its fixed point.

    Args:
        hidden: number of recurrent units N.
        inputs: input dimension; ``None`` means the input *is* the drive X (``W_x = I``), as in the
            linear teacher task. Otherwise ``W_x ~ N(0, input_scale²/inputs)`` is ``[N, inputs]``.
        outputs: size of a fixed random readout ``R ~ N(0, readout_scale²/N)``; ``None``: none.
        activation: ``tanh``, ``relu`` or ``identity``.
        w_scale: W starts as ``w_scale · N(0, 1)/√N`` (spectral radius ≈ ``w_scale``).
        solver: how fixed points and adjoint systems are solved (:class:`SolverConfig`).
        generator: the seeded generator all random matrices are drawn from (in a fixed order).
        dtype: parameter/buffer dtype (default: torch's default dtype).
    """

    def __init__(
        self,
        hidden: int,
        inputs: int | None = None,
        outputs: int | None = None,
        *,
        activation: str = "tanh",
        w_scale: float = 0.5,
        input_scale: float = 1.0,
        readout_scale: float = 1.0,
        solver: SolverConfig | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if (
            hidden < 1
            or (inputs is not None and inputs < 1)
            or (outputs is not None and outputs < 1)
        ):
            raise UserError(
                f"rate network sizes must be positive, got hidden={hidden}, inputs={inputs}, "
                f"outputs={outputs}"
            )
        self.act = get_activation(activation)
        self.solver = solver or SolverConfig()
        self.hidden = hidden
        dtype = dtype or torch.get_default_dtype()

        def draw(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=generator, dtype=dtype)

        self.W = nn.Parameter(draw(hidden, hidden) * (w_scale / math.sqrt(hidden)))
        self.register_buffer(
            "input_weights",
            draw(hidden, inputs) * (input_scale / math.sqrt(inputs)) if inputs else None,
        )
        self.register_buffer(
            "readout",
            draw(outputs, hidden) * (readout_scale / math.sqrt(hidden)) if outputs else None,
        )
        #: The verdict of the most recent solve (residual, iterations, converged mask).
        self.last_solve: FixedPoint | None = None
        #: Added to non-convergence messages (the loop sets e.g. "rule euclidean, lr 0.1").
        self.context = ""

    @property
    def activation(self) -> str:
        return self.act.name

    @property
    def is_linear(self) -> bool:
        return self.act.name == "identity"

    def extra_repr(self) -> str:
        inputs = None if self.input_weights is None else self.input_weights.shape[1]
        outputs = None if self.readout is None else self.readout.shape[0]
        return (
            f"hidden={self.hidden}, inputs={inputs}, outputs={outputs}, "
            f"activation={self.activation}, solver={self.solver.resolved_method(self.activation)}"
        )

    # ------------------------------------------------------------------ pieces of the forward
    def drive(self, x: Tensor) -> Tensor:
        """X = W_x x for a batch ``x`` (flattened to ``[B, inputs]``); ``[B, N]``."""
        flat = x.reshape(x.shape[0], -1).to(self.W.dtype)
        if self.input_weights is None:
            if flat.shape[1] != self.hidden:
                raise UserError(
                    f"this rate network takes the drive X directly ({self.hidden} values per "
                    f"sample), got inputs of size {flat.shape[1]}"
                )
            return flat
        if flat.shape[1] != self.input_weights.shape[1]:
            raise UserError(
                f"rate network expects inputs of size {self.input_weights.shape[1]}, "
                f"got {flat.shape[1]}"
            )
        return flat @ self.input_weights.T

    def read(self, r: Tensor) -> Tensor:
        """The output R r (or r itself without a readout)."""
        return r if self.readout is None else r @ self.readout.T

    @torch.no_grad()
    def fixed_point(self, x: Tensor, W: Tensor | None = None) -> FixedPoint:
        """Solve for the fixed points of the batch ``x`` (with ``W`` or the model's own)."""
        return self.solve(self.drive(x), W)

    @torch.no_grad()
    def solve(self, X: Tensor, W: Tensor | None = None) -> FixedPoint:
        """Solve r = f(W r + X) for a drive ``X`` [B, N]; recorded in :attr:`last_solve`."""
        weights = self.W.detach() if W is None else W.detach()
        fp = solve_fixed_point(weights, X, self.act, self.solver, context=self.context)
        self.last_solve = fp
        return fp

    def forward(self, x: Tensor) -> Tensor:
        """The network's output at its fixed point; differentiable in ``W`` (implicitly)."""
        X = self.drive(x)
        if torch.is_grad_enabled() and self.W.requires_grad:
            r = _ImplicitFixedPoint.apply(self.W, X, self)
        else:
            r = self.solve(X).r
        return self.read(r)


class _ImplicitFixedPoint(torch.autograd.Function):
    """r* = fixed point of f(W r + X); backward by the implicit function theorem.

    For δ = ∂L/∂r*, solve (I − WᵀG) u = δ per sample; then ∂L/∂W = Σ_b (G u_b) r_bᵀ and
    ∂L/∂X = G u. Only the fixed point and its gain are saved, never the solver's iterations.
    """

    @staticmethod
    def forward(ctx: Any, W: Tensor, X: Tensor, model: RateRNN) -> Tensor:
        fp = model.solve(X, W)
        ctx.save_for_backward(W, fp.r, fp.gain)
        ctx.model = model
        return fp.r

    @staticmethod
    def backward(ctx: Any, grad_r: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        W, r, gain = ctx.saved_tensors
        model: RateRNN = ctx.model
        u = solve_adjoint(W, gain, grad_r, model.activation, model.solver)
        gu = gain * u
        grad_W = gu.T @ r if ctx.needs_input_grad[0] else None
        grad_X = gu if ctx.needs_input_grad[1] else None
        return grad_W, grad_X, None
