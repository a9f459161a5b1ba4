"""The fixed-point learning rules: each fills ``W.grad`` of a :class:`RateRNN`.

Registered names (importing :mod:`decorrelate.fixedpoint` registers them):

=================  ==========================================================================
``euclidean``      ∇_W L by implicit differentiation at the solved fixed point (dW1)
``bptt``           backprop through the unrolled solver iterations (baseline)
``reparam``        exact gradient step in A = (G⁻¹ − W)⁻¹ mapped back; linear networks only (dW2)
``linearized``     (BBᵀ) ∇_W L (BᵀB) in its O(B·N²) per-sample form, no inverse (dW3)
``linearized-g``   [(I − W G) δ][(I − W G)ᵀ(I − W G) r]ᵀ, the later variant (dW4)
=================  ==========================================================================

Every rule solves the batch's fixed points first, and a non-converged point is never used
silently: the solver raises (policy ``raise``), or the rule drops those samples from the loss and
the update (policy ``skip``; the count is in :meth:`FixedPointRule.diagnostics`).

``reparam`` is not a gradient: it moves W to W' = I − (A − η∇_A L)⁻¹. Its ``.grad`` is defined as
(W − W')/η, so one step of *plain SGD with the same learning rate η* lands exactly on W'. Any other
optimizer (momentum, Adam, weight decay, another lr) would not; :meth:`Reparam.bind_optimizer`
refuses those, and the fixed-point loop always calls it. (The authors' notebook ``LinearNDdW123``
evaluates ∇_A L for its dW2 step at the *already updated* A, a slip of order η²; this follows the
paper, with ∇_A L at the current A.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..context import SINGLE_PROCESS, StepContext
from ..errors import UserError
from ..losses import Loss
from ..rules.base import LearningRule, StepOutput, accumulate_grad, register_rule, rule_class
from .gradients import (
    euclidean_gradient,
    linearized_g_update,
    linearized_update,
    reparam_target,
)
from .model import RateRNN
from .solver import FixedPoint, attainable_tol, enforce, within_tol

FIXEDPOINT_RULES = ("euclidean", "bptt", "reparam", "linearized", "linearized-g")


@dataclass
class StepState:
    """What the last :meth:`FixedPointRule.backward` saw, for diagnostics without re-solving.

    ``fp`` covers the whole batch; ``used`` the samples that entered the update, with ``delta``
    their ∂L/∂r. ``exact`` is false when ``fp`` is not the solver's fixed point (bptt's unrolled
    iterate), in which case ``delta`` is None.
    """

    fp: FixedPoint
    used: FixedPoint
    y: Tensor
    delta: Tensor | None
    exact: bool = True


def loss_and_delta(
    model: RateRNN, r: Tensor, y: Tensor, loss: Any, ctx: StepContext = SINGLE_PROCESS
) -> tuple[Tensor, Tensor]:
    """The batch loss at the points ``r`` and δ = ∂L/∂r (autograd through the readout only),
    of the loss weighted by ``ctx.loss_scale`` (the returned loss is unweighted)."""
    with torch.enable_grad():
        r = r.detach().requires_grad_(True)
        value = loss(model.read(r), y)
        (delta,) = torch.autograd.grad(ctx.scaled(value), r)
    return value.detach(), delta


class FixedPointRule(LearningRule):
    """Base of the fixed-point rules: solve, drop non-converged samples, fill ``W.grad``."""

    forward_only: ClassVar[bool] = True
    #: They train a :class:`RateRNN`, which ``decorrelate fixedpoint`` builds (not ``train``).
    command: ClassVar[str] = "fixedpoint"
    #: True for rules defined only for the identity activation.
    requires_linear: ClassVar[bool] = False
    #: True for rules whose ``.grad`` only plain SGD (no momentum) applies exactly.
    requires_plain_sgd: ClassVar[bool] = False

    @classmethod
    def unfit(cls, config: Any) -> str | None:
        """Why this rule cannot train the network ``config`` describes with its optimizer (a
        resolved :class:`~decorrelate.fixedpoint.config.FixedPointConfig`), or None if it can."""
        if cls.requires_linear and config.activation != "identity":
            return f"needs a linear network (activation identity), not {config.activation}"
        if cls.requires_plain_sgd and (config.optimizer != "sgd" or config.momentum):
            return (
                "sets .grad = (W − W')/lr, which only plain SGD applies exactly; "
                "use --optimizer sgd --momentum 0"
            )
        return None

    def __init__(self) -> None:
        super().__init__()
        self.last_state: StepState | None = None

    def attach(
        self,
        model: nn.Module,
        loss: Loss,
        generator: torch.Generator | None = None,
        example: Tensor | None = None,
    ) -> None:
        if not isinstance(model, RateRNN):
            raise UserError(
                f"rule {self.name!r} trains a fixed-point rate network (decorrelate.fixedpoint."
                f"RateRNN) via `decorrelate fixedpoint` (got {type(model).__name__})"
            )
        if self.requires_linear and not model.is_linear:
            raise UserError(
                f"rule {self.name!r} needs a linear network (activation identity), got "
                f"{model.activation}; use linearized or linearized-g for nonlinear networks"
            )
        super().attach(model, loss, generator, example)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Check the optimizer suits the rule (all rules but ``reparam`` accept any)."""

    def backward(
        self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext = SINGLE_PROCESS
    ) -> StepOutput:
        assert isinstance(model, RateRNN), "attach() the rule first"
        fp = model.fixed_point(x)  # raises on non-convergence under policy "raise"
        used, y_used = fp, y
        if not bool(fp.usable.all()):  # policy "skip": leave the unsettled samples out
            used, y_used = fp.select(fp.usable), y[fp.usable]
        loss, delta = loss_and_delta(model, used.r, y_used, self.loss, ctx)
        with torch.no_grad():
            accumulate_grad(model.W, self.direction(model, used, delta))
            output = model.read(fp.r)
        self.last_state = StepState(fp, used, y_used, delta)
        return StepOutput(loss, output)

    def direction(self, model: RateRNN, fp: FixedPoint, delta: Tensor) -> Tensor:
        """The update direction written into ``W.grad`` (SGD subtracts lr times it)."""
        raise NotImplementedError

    def diagnostics(self) -> dict[str, float]:
        """Solver numbers of the last step: max residual, the tolerance it was held to (the
        configured one or the arithmetic's rounding floor), iterations, non-converged samples."""
        if self.last_state is None:
            return {}
        fp = self.last_state.fp
        return {
            "residual": fp.max_residual,
            "tolerance": fp.tolerance,
            "solver_iterations": fp.iterations,
            "nonconverged": fp.num_failed,
        }


@register_rule("euclidean")
class Euclidean(FixedPointRule):
    """Gradient descent in W: ∂L/∂W by implicit differentiation (batched adjoint solves)."""

    #: The update is ∇_W L itself, the loop's angle reference (its angle is 0, not measured).
    exact_gradient: ClassVar[bool] = True

    def direction(self, model: RateRNN, fp: FixedPoint, delta: Tensor) -> Tensor:
        W = model.W.detach()
        return euclidean_gradient(W, fp.r, fp.gain, delta, model.activation, model.solver)


@register_rule("linearized")
class Linearized(FixedPointRule):
    """(BBᵀ) ∇_W L (BᵀB): the first-order reparameterised step, O(B·N²), no inverse."""

    def direction(self, model: RateRNN, fp: FixedPoint, delta: Tensor) -> Tensor:
        return linearized_update(model.W.detach(), fp.r, fp.gain, delta)


@register_rule("linearized-g")
class LinearizedG(FixedPointRule):
    """dW4: (I − W G) δ on the left, (I − W G)ᵀ(I − W G) r on the right (dW3 has G δ and
    I − G W there); equals ``linearized`` when G = I."""

    def direction(self, model: RateRNN, fp: FixedPoint, delta: Tensor) -> Tensor:
        return linearized_g_update(model.W.detach(), fp.r, fp.gain, delta)


@register_rule("reparam")
class Reparam(FixedPointRule):
    """Exact gradient step on A = (I − W)⁻¹, mapped back to W (linear networks only).

    ``.grad`` is (W − W')/η with W' = I − (A − η ∇_A L)⁻¹, so only plain SGD with learning rate
    ``lr`` = η applies it exactly. ``lr=None`` takes η from the optimizer in :meth:`bind_optimizer`.
    """

    requires_linear: ClassVar[bool] = True
    requires_plain_sgd: ClassVar[bool] = True

    def __init__(self, lr: float | None = None) -> None:
        super().__init__()
        if lr is not None and not lr > 0:
            raise UserError(f"reparam: lr must be > 0, got {lr}")
        self.lr = lr

    @classmethod
    def from_config(cls, config: Any) -> LearningRule:
        return cls(lr=getattr(config, "lr", None))

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse anything but plain SGD with lr = η (the only case where the step is exact)."""
        groups = optimizer.param_groups
        plain = isinstance(optimizer, torch.optim.SGD) and all(
            not g.get("momentum") and not g.get("weight_decay") and not g.get("maximize")
            for g in groups
        )
        if not plain:
            raise UserError(
                "rule 'reparam' sets .grad = (W − W')/lr, which only plain SGD (no momentum, no "
                "weight decay) applies exactly; use --optimizer sgd --momentum 0"
            )
        lrs = {float(g["lr"]) for g in groups}
        if len(lrs) != 1:
            raise UserError("rule 'reparam' needs one learning rate for all parameter groups")
        lr = lrs.pop()
        if self.lr is None:
            self.lr = lr
        elif abs(self.lr - lr) > 1e-12 * max(lr, self.lr):
            raise UserError(
                f"rule 'reparam' was built for lr {self.lr:g} but the optimizer uses lr {lr:g}"
            )

    def direction(self, model: RateRNN, fp: FixedPoint, delta: Tensor) -> Tensor:
        if self.lr is None:
            raise UserError(
                "rule 'reparam' needs the SGD learning rate: get_rule('reparam', lr=...) or "
                "rule.bind_optimizer(optimizer)"
            )
        W = model.W.detach()
        return (W - reparam_target(W, fp.drive, delta, self.lr)) / self.lr


@register_rule("bptt")
class BPTT(FixedPointRule):
    """Backprop through the unrolled solver iterations (the baseline).

    Unrolls r ← (1 − α) r + α f(W r + X) from r = 0 with autograd: with the model's ``euler``
    solver exactly its fixed number of steps (α = dt/τ, the authors' setting), otherwise damped
    steps (α = the solver's damping) until the residual is below the tolerance (at most
    ``max_iter``). The loss and the gradient are those of the unrolled iterate; its residual is
    reported like any solver's, and non-convergence follows the same policy.
    """

    def backward(
        self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext = SINGLE_PROCESS
    ) -> StepOutput:
        assert isinstance(model, RateRNN), "attach() the rule first"
        cfg, act = model.solver, model.act
        euler = cfg.method == "euler"
        alpha = cfg.euler_dt if euler else cfg.damping
        steps = cfg.euler_steps if euler else cfg.max_iter
        X = model.drive(x).detach()
        W = model.W
        tol = attainable_tol(cfg.tol, W.detach(), X)
        with torch.enable_grad():
            r = torch.zeros_like(X)
            iterations = steps
            for k in range(steps):
                step = act.f(r @ W.T + X) - r
                res = step.detach().abs().amax(-1)
                settled = within_tol(res, r.detach(), tol) | ~torch.isfinite(res)
                if not euler and bool(settled.all()):
                    iterations = k
                    break
                r = r + alpha * step
            with torch.no_grad():
                a = r @ W.T + X
                residual = (r - act.f(a)).abs().amax(-1)
            fp = FixedPoint(
                r=r.detach(),
                gain=act.gain(a),
                drive=X,
                residual=residual,
                converged=within_tol(residual, r.detach(), tol),
                iterations=iterations,
                method="bptt-euler" if euler else "bptt-damped",
                tolerance=tol,
            )
            if not euler:
                enforce(fp, cfg, model.context)
            keep = fp.converged if (fp.num_failed and not euler) else None
            output = model.read(r)
            loss = self.loss(output, y) if keep is None else self.loss(output[keep], y[keep])
            ctx.scaled(loss).backward()
        used = fp if keep is None else fp.select(keep)
        model.last_solve = fp
        self.last_state = StepState(fp, used, y if keep is None else y[keep], None, exact=False)
        return StepOutput(loss.detach(), output.detach())


def applicable_rules(names: Sequence[str], config: Any) -> list[str]:
    """The fixed-point rules ``names`` asks for on the network and optimizer of ``config`` (a
    resolved :class:`~decorrelate.fixedpoint.config.FixedPointConfig`).

    ``all`` expands to every rule that fits (:meth:`FixedPointRule.unfit`: ``reparam`` needs a
    linear network and plain SGD); a rule named explicitly that does not fit, or that is not a
    fixed-point rule, is a UserError. Duplicates are dropped, the order kept.
    """
    chosen: list[str] = []
    for name in names:
        if name == "all":
            chosen += [r for r in FIXEDPOINT_RULES if rule_class(r).unfit(config) is None]
            continue
        if name not in FIXEDPOINT_RULES:
            raise UserError(
                f"rule {name!r} does not train a fixed-point network; choose from: "
                f"{', '.join(FIXEDPOINT_RULES)} or all"
            )
        cls = rule_class(name)
        assert issubclass(cls, FixedPointRule)
        reason = cls.unfit(config)
        if reason is not None:
            raise UserError(f"rule {name!r} {reason}")
        chosen.append(name)
    return list(dict.fromkeys(chosen))
