"""Batched fixed-point solvers for r = f(W r + X), with a tolerance, a cap and a verdict.

All samples of a batch are solved together (rows of ``[B, N]`` tensors; ``W`` acts as
``r @ W.T``). Every method ends the same way: the returned point ``r`` is evaluated once more,
``residual = ‖r − f(W r + X)‖_∞`` is measured per sample on that very point, and ``converged``
says which samples are within tolerance: residual ≤ tol · max(1, ‖r‖_∞), i.e. absolute for
bounded responses (always for tanh) and relative for large ones, where rounding alone would make
an absolute tolerance unreachable. So what is reported is what the caller gets, whatever the
method did internally.

Methods (:class:`SolverConfig.method`):

* ``damped`` — r ← (1 − α) r + α f(W r + X) from r = 0. This is the Euler discretisation of
  τ dr/dt = −r + f(W r + X) with dt/τ = α; it converges wherever the dynamics are stable
  (all eigenvalues of G·W with real part < 1) and α is small enough.
* ``anderson`` — the damped iteration until a sample's residual is below ``anderson_start``
  (1e-3), then Anderson mixing (Walker–Ni difference form, a short history per sample) for the
  samples that got there. Why the warm-up: Anderson is a secant method; started far away it can
  stall at a local minimum of the residual or converge to an unstable fixed point the dynamics
  never reach (measured: it did both). Near the attracting point the map is almost linear and
  Anderson removes the slow modes (eigenvalues of G·W near 1) that make the damped iteration
  crawl. A sample whose accelerated step does not lower its residual takes the plain damped step
  and restarts its history; samples Anderson still leaves above tolerance are re-solved by the
  damped iteration from rest, so the answer is the fixed point the dynamics reach. One batched
  matmul per iteration plus O(B·m·N) bookkeeping; the iterations reported count all phases.

In both, each sample leaves the iteration as soon as it is within tolerance (an active set), so
a sample that never settles costs only its own row, not the whole batch.
* ``newton`` — Newton's method with batched ``torch.linalg.solve`` on J = I − G·W and a per-sample
  backtracking line search. Quadratic convergence and it also finds unstable fixed points, but
  each iteration factorises B matrices of size N×N. For a linear network J = I − W is shared by
  all samples, so one LU factorisation serves the whole batch and one step is exact.
* ``euler`` — the authors' setting: a fixed number of Euler steps (default 500 of dt/τ = 0.01,
  i.e. T = 5τ) from r = 0, no tolerance. Its residual is measured and reported like the others,
  but it never raises: the approximate point is the explicit choice of this method.
* ``auto`` — ``newton`` for the identity activation (exact in one shared solve), else ``anderson``.

Tolerances below what the arithmetic can resolve are not measurable: each solve holds the
residual to max(tol, :data:`ROUNDING_MARGIN` · :func:`rounding_floor`) (:func:`attainable_tol`)
and reports that value; weights so large that even 1e-3 is out of reach
(:data:`MAX_ROUNDING_FLOOR`) count as exploded and are refused.

Non-convergence is never silent: with ``on_nonconvergence="raise"`` (default) a tolerance-based
method that leaves any sample above tolerance raises :class:`FixedPointNotConverged`; with
``"skip"`` the caller receives the ``converged`` mask and the learning rules drop those samples
from the loss and the update (and count them in the metrics).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import TrainingDiverged, UserError
from .activations import Activation

METHODS = ("auto", "damped", "anderson", "newton", "euler")
ADJOINT_METHODS = ("auto", "direct", "iterative")
POLICIES = ("raise", "skip")


class FixedPointNotConverged(TrainingDiverged):
    """A solver stopped with samples above tolerance (or non-finite). The message says how many."""


@dataclass(frozen=True)
class SolverConfig:
    """How fixed points (and the adjoint systems of the implicit gradient) are solved.

    ``tol`` bounds the per-sample ∞-norm residual ‖r − f(Wr + X)‖_∞ (the largest error of any
    unit, independent of N): residual ≤ tol · max(1, ‖r‖_∞). ``damping`` is α of the damped
    iteration (and Anderson's mixing β); ``anderson_start`` is the residual at which ``anderson``
    switches from following the dynamics to acceleration.

    ``adjoint`` chooses how (I − WᵀG) u = δ is solved for the implicit gradient: ``direct`` =
    batched LU over ``[B, N, N]`` (one shared LU when the network is linear); ``iterative`` =
    Anderson on u = δ + WᵀG u, O(B·N²) per iteration, to ``tol`` relative to the largest |δ|;
    ``auto`` = direct if linear, else iterative.
    """

    method: str = "auto"
    tol: float = 1e-6
    max_iter: int = 2000
    damping: float = 0.5
    memory: int = 5
    anderson_start: float = 1e-3
    euler_steps: int = 500
    euler_dt: float = 0.01
    on_nonconvergence: str = "raise"
    adjoint: str = "auto"

    def __post_init__(self) -> None:
        requirements = {
            "method": (self.method in METHODS, f"one of {', '.join(METHODS)}"),
            "adjoint": (self.adjoint in ADJOINT_METHODS, f"one of {', '.join(ADJOINT_METHODS)}"),
            "on_nonconvergence": (
                self.on_nonconvergence in POLICIES,
                f"one of {', '.join(POLICIES)}",
            ),
            "tol": (self.tol > 0, "> 0"),
            "max_iter": (self.max_iter >= 1, ">= 1"),
            "damping": (0 < self.damping <= 1, "in (0, 1]"),
            "memory": (self.memory >= 1, ">= 1"),
            "anderson_start": (self.anderson_start > 0, "> 0"),
            "euler_steps": (self.euler_steps >= 1, ">= 1"),
            "euler_dt": (0 < self.euler_dt <= 1, "in (0, 1]"),
        }
        for name, (ok, requirement) in requirements.items():
            if not ok:
                value = getattr(self, name)
                raise UserError(f"solver option {name} must be {requirement}, got {value!r}")

    def resolved_method(self, activation: str) -> str:
        """The concrete method ``auto`` stands for with this activation."""
        if self.method != "auto":
            return self.method
        return "newton" if activation == "identity" else "anderson"

    def resolved_adjoint(self, activation: str) -> str:
        if self.adjoint != "auto":
            return self.adjoint
        return "direct" if activation == "identity" else "iterative"


class FixedPoint(NamedTuple):
    """A solved batch: the point, its gain, the drive, and the solver's verdict.

    ``r``, ``gain`` (= f′(W r + X), the diagonal of G) and ``drive`` (X) are ``[B, N]``;
    ``residual`` is the per-sample ∞-norm ‖r − f(W r + X)‖_∞ measured on ``r``; ``converged`` is
    ``residual <= tolerance · max(1, ‖r‖_∞)`` per sample; ``iterations`` is what the batch took;
    ``tolerance`` is the one used: the configured ``tol``, or a margin above the rounding floor of
    the arithmetic (:func:`attainable_tol`) where that is larger.
    """

    r: Tensor
    gain: Tensor
    drive: Tensor
    residual: Tensor
    converged: Tensor
    iterations: int
    method: str
    tolerance: float = 0.0

    @property
    def max_residual(self) -> float:
        return float(self.residual.max()) if self.residual.numel() else 0.0

    @property
    def num_failed(self) -> int:
        return int((~self.converged).sum())

    @property
    def usable(self) -> Tensor:
        """The samples a caller may use: the converged ones, or all of them for the Euler
        setting, whose fixed-step approximate point is the explicit choice (its residual is
        still reported)."""
        if self.method.endswith("euler"):
            return torch.ones_like(self.converged)
        return self.converged

    def select(self, mask: Tensor) -> FixedPoint:
        """The samples where ``mask`` is true (used to drop non-converged samples)."""
        return self._replace(
            r=self.r[mask],
            gain=self.gain[mask],
            drive=self.drive[mask],
            residual=self.residual[mask],
            converged=self.converged[mask],
        )


# ----------------------------------------------------------------------------- generic iterations

#: A fixed-point map z ↦ fn(z, rows): ``rows`` (an index tensor or None for all) says which
#: samples of the batch the rows of z belong to, so a map can be evaluated on a subset.
Map = Callable[[Tensor, "Tensor | None"], Tensor]


def _inf_norm(v: Tensor) -> Tensor:
    return v.abs().amax(dim=-1)


def within_tol(res: Tensor, z: Tensor, tol: float) -> Tensor:
    """Per sample: ‖residual‖_∞ ≤ tol · max(1, ‖z‖_∞) (absolute for |z| ≤ 1, e.g. always for tanh).

    The relative part matters only for unbounded (linear, ReLU) networks with large responses,
    where rounding alone makes an absolute tolerance unreachable.
    """
    return res <= tol * _inf_norm(z).clamp_min(1.0)


#: Weights whose rounding floor exceeds this count as exploded (the solve refuses them).
MAX_ROUNDING_FLOOR = 1e-3


def rounding_floor(W: Tensor, X: Tensor) -> float:
    """The residual floating point can certify for r = f(W r + X): eps · (‖W‖_∞ + max_b ‖X_b‖_∞).

    Evaluating W r + X (|r| ≤ 1) is only accurate to about this much, so a smaller tolerance
    is not measurable: in float32 with trained weights it is around 1e-6; in float64 ~1e-14.
    """
    if X.numel() == 0:
        return 0.0
    drive = torch.where(torch.isfinite(X), X.abs(), 0.0).max()  # a bad sample fails on its own
    return torch.finfo(W.dtype).eps * float(W.detach().abs().sum(1).max() + drive)


#: The tolerance a solve holds is at least this many rounding floors. The floor is a typical
#: size, not a bound: in float32 at N = 300 (a trained MNIST network) the residual of the correctly
#: rounded fixed point reaches 0.9 floors, and the same point measured in a sub-batch (as the
#: active-set iterations do) and in the whole batch (the verdict) differs by up to 0.8 floors. At
#: one floor, samples that had settled failed the verdict at 1.1–1.2× tolerance and stopped MNIST
#: runs with a false "lost stability"; 4 floors covers both effects with room to spare.
ROUNDING_MARGIN = 4.0


def attainable_tol(tol: float, W: Tensor, X: Tensor) -> float:
    """max(tol, :data:`ROUNDING_MARGIN` · :func:`rounding_floor`): the tolerance a solve holds."""
    return max(tol, ROUNDING_MARGIN * rounding_floor(W, X))


def _settled(res: Tensor, z: Tensor, tol: float) -> bool:
    """True when every sample is within tolerance or non-finite (which no iteration can fix)."""
    return bool((within_tol(res, z, tol) | ~torch.isfinite(res)).all())


#: Rows leave an iteration at this fraction of the tolerance: the final verdict re-measures the
#: residual on the whole batch, whose matmul rounds differently (in float32) from a subset's.
EXIT_MARGIN = 0.5


def on_rows(fn: Map, rows: Tensor) -> Map:
    """``fn`` restricted to the samples ``rows`` of the batch (to iterate a subset of rows)."""

    def subset(z: Tensor, sub: Tensor | None) -> Tensor:
        return fn(z, rows if sub is None else rows[sub])

    return subset


def damped_iteration(
    fn: Map, z: Tensor, *, alpha: float, tol: float, max_iter: int, stop_early: bool = True
) -> tuple[Tensor, int]:
    """Iterate z ← (1 − α) z + α fn(z) until ‖fn(z) − z‖_∞ is within ``tol`` for every row.

    Each row stops at the first iterate within tolerance (an active set), so a sample that
    never settles costs only its own row. Returns the points (each the last iterate whose
    residual was measured) and the iterations taken (at most ``max_iter``). With
    ``stop_early=False`` every row takes exactly ``max_iter`` steps (the Euler setting).
    """
    if not stop_early:
        for _ in range(max_iter):
            z = z + alpha * (fn(z, None) - z)
        return z, max_iter
    z = z.clone()
    active: Tensor | None = None  # None: every row is still moving
    for k in range(max_iter):
        za = z if active is None else z[active]
        step = fn(za, active) - za
        res = _inf_norm(step)
        moving = ~(within_tol(res, za, EXIT_MARGIN * tol) | ~torch.isfinite(res))
        if not bool(moving.any()):
            return z, k
        if active is None and bool(moving.all()):
            z = za + alpha * step
            continue
        rows = moving.nonzero().squeeze(-1) if active is None else active[moving]
        z[rows] = za[moving] + alpha * step[moving]
        active = rows
    return z, max_iter


def anderson(
    fn: Map,
    z: Tensor,
    *,
    tol: float,
    max_iter: int,
    memory: int = 5,
    beta: float = 1.0,
    reg: float = 1e-10,
) -> tuple[Tensor, int]:
    """Batched Anderson acceleration of z = fn(z), each row (sample) with its own mixing weights.

    Walker–Ni difference form: with f_k = fn(z_k) − z_k and the last ``memory`` differences
    ΔZ, ΔF, γ = argmin ‖f_k − ΔF γ‖ (a ridge-regularised ``memory``×``memory`` solve per sample
    in float64), then z_{k+1} = z_k + β f_k − (ΔZ + β ΔF) γ. The differences live in a ring
    buffer ``[B, memory, N]`` and their Gram matrix is updated one column per iteration with
    elementwise products (much faster than many tiny batched matmuls).

    Safeguard: a sample whose accelerated step does not lower its residual takes the plain
    damped step z + β f instead (evaluated for those rows only) and restarts its history.
    Rows within tolerance (or non-finite) leave the iteration (their state is compacted away),
    so a stalled sample costs only its own row.
    """
    out = z.clone()
    active = torch.arange(z.shape[0], device=z.device)
    full = True  # all rows still active: call fn without an index (no gathers)

    def rows(sub: Tensor | None) -> Tensor | None:
        if sub is None:
            return None if full else active
        return sub if full else active[sub]

    batch, n = z.shape
    DF = z.new_zeros(batch, memory, n)
    step_dirs = z.new_zeros(batch, memory, n)  # ΔZ + β ΔF, kept ready for the update
    gram = torch.zeros(batch, memory, memory, dtype=torch.float64, device=z.device)
    f = fn(z, rows(None)) - z
    res = _inf_norm(f)
    for k in range(max_iter):
        finished = within_tol(res, z, EXIT_MARGIN * tol) | ~torch.isfinite(res)
        if bool(finished.any()):
            out[active[finished]] = z[finished]
            if bool(finished.all()):
                return out, k
            keep = (~finished).nonzero().squeeze(-1)
            z, f, res, active = z[keep], f[keep], res[keep], active[keep]
            DF, step_dirs, gram = DF[keep], step_dirs[keep], gram[keep]
            full = False
        z_new = z + beta * f
        if k:
            rhs = (DF * f.unsqueeze(1)).sum(-1).double()  # [B, m]
            diag = gram.diagonal(dim1=1, dim2=2)
            # Ridge relative to the history's scale; an empty slot gets 1 on its diagonal, so its
            # γ is exactly 0 (and no denormal numbers reach LAPACK, which makes it crawl).
            scale = diag.mean(-1, keepdim=True).clamp_min(1e-200)
            ridge = torch.diag_embed(reg * scale + (diag == 0).to(diag.dtype))
            gamma = torch.linalg.solve(gram + ridge, rhs.unsqueeze(-1)).to(z.dtype)  # [B, m, 1]
            z_new -= (step_dirs * gamma).sum(1)
        f_new = fn(z_new, rows(None)) - z_new
        res_new = _inf_norm(f_new)
        # Safeguard: a sample whose accelerated step does not lower its residual (or is not
        # finite) takes the plain damped step instead and restarts its history. This keeps the
        # iteration on the path of the dynamics instead of a secant step towards another point.
        rejected = (~(res_new < res)).nonzero().squeeze(-1) if k else None
        if rejected is not None and rejected.numel():
            plain = z[rejected] + beta * f[rejected]
            z_new[rejected] = plain
            f_new[rejected] = fn(plain, rows(rejected)) - plain
            res_new[rejected] = _inf_norm(f_new[rejected])
            for buffer in (DF, step_dirs, gram):
                buffer.index_fill_(0, rejected, 0)
        slot = k % memory
        df_new = f_new - f
        DF[:, slot] = df_new
        step_dirs[:, slot] = (z_new - z) + beta * df_new
        column = (DF * df_new.unsqueeze(1)).sum(-1).double()  # [B, m]
        gram[:, slot, :] = column
        gram[:, :, slot] = column
        z, f, res = z_new, f_new, res_new
    out[active] = z
    return out, max_iter


# ----------------------------------------------------------------------------- the forward solve


def _newton(
    W: Tensor, X: Tensor, act: Activation, *, tol: float, max_iter: int
) -> tuple[Tensor, int]:
    """Newton on F(r) = r − f(W r + X) with J = I − G W, batched, with backtracking."""
    n = W.shape[0]
    eye = torch.eye(n, dtype=W.dtype, device=W.device)
    shared = act.name == "identity"
    lu = torch.linalg.lu_factor(eye - W) if shared else None
    r = torch.zeros_like(X)
    for k in range(max_iter):
        a = r @ W.T + X
        F = r - act.f(a)
        res = _inf_norm(F)
        if _settled(res, r, tol):
            return r, k
        if lu is not None:
            step = torch.linalg.lu_solve(lu[0], lu[1], F.T).T
        else:
            J = eye - act.gain(a).unsqueeze(-1) * W  # rows of W scaled by g: I − G W
            step = torch.linalg.solve(J, F.unsqueeze(-1)).squeeze(-1)
        r = _backtrack(r, step, res, W, X, act)
    return r, max_iter


def _backtrack(
    r: Tensor, step: Tensor, res: Tensor, W: Tensor, X: Tensor, act: Activation, halvings: int = 8
) -> Tensor:
    """Per sample, the longest step t ∈ {1, ½, ¼, ...} that reduces the residual."""
    t = torch.ones_like(res)
    accepted = torch.zeros_like(res, dtype=torch.bool)
    out = r - step
    for _ in range(halvings):
        trial = r - t.unsqueeze(-1) * step
        trial_res = _inf_norm(trial - act.f(trial @ W.T + X))
        good = (trial_res < res) & ~accepted
        out = torch.where(good.unsqueeze(-1), trial, out)
        accepted |= good
        if bool(accepted.all()):
            break
        t = torch.where(accepted, t, 0.5 * t)
    return out


def _anderson_solve(fn: Map, zeros: Tensor, config: SolverConfig) -> tuple[Tensor, int]:
    """The ``anderson`` method: follow the dynamics into the basin, then accelerate.

    1. Damped iteration from rest until each row's residual is within ``anderson_start``.
    2. Anderson on the rows that got there and are not yet within ``tol``.
    3. Rows Anderson leaves above tolerance (a stalled secant step in a multistable network)
       are re-solved by the damped iteration from rest, so the answer is the fixed point the
       dynamics reach. Rows that never reach ``anderson_start`` are reported as not converged:
       they do not settle (or not within ``max_iter``). Returns the points and the iterations of
       all phases.
    """
    r, iterations = damped_iteration(
        fn,
        zeros,
        alpha=config.damping,
        tol=max(config.anderson_start, config.tol),
        max_iter=config.max_iter,
    )
    # Only rows that reached the basin: Anderson started elsewhere can "converge" to an unstable
    # fixed point the dynamics never reach. (2×: the warm-up measured on a subset of rows.)
    res = _inf_norm(fn(r, None) - r)
    basin = within_tol(res, r, 2 * config.anderson_start) & ~within_tol(res, r, config.tol)
    rows = basin.nonzero().squeeze(-1)
    if rows.numel() == 0:
        return r, iterations
    r = r.clone()
    accelerated, steps = anderson(
        on_rows(fn, rows),
        r[rows],
        tol=config.tol,
        max_iter=config.max_iter,
        memory=config.memory,
        beta=config.damping,
    )
    r[rows] = accelerated
    iterations += steps
    res = _inf_norm(fn(accelerated, rows) - accelerated)
    stuck = rows[~within_tol(res, accelerated, config.tol) & torch.isfinite(res)]
    if stuck.numel():
        redone, extra = damped_iteration(
            on_rows(fn, stuck),
            zeros[stuck],
            alpha=config.damping,
            tol=config.tol,
            max_iter=config.max_iter,
        )
        r[stuck] = redone
        iterations += extra
    return r, iterations


def solve_fixed_point(
    W: Tensor, X: Tensor, act: Activation, config: SolverConfig, *, context: str = ""
) -> FixedPoint:
    """Solve r = f(W r + X) for a batch ``X`` [B, N]; measure and (per policy) enforce the result.

    ``context`` (e.g. "rule euclidean, lr 0.1") is added to the non-convergence message.
    """
    method = config.resolved_method(act.name)
    floor = rounding_floor(W, X)
    if not floor <= MAX_ROUNDING_FLOOR:  # also catches non-finite weights
        where = f" ({context})" if context else ""
        raise FixedPointNotConverged(
            f"the weights have exploded{where}: max row sum of |W| = "
            f"{float(W.abs().sum(1).max()):.3g}, so {W.dtype} arithmetic cannot resolve the "
            f"fixed point even to {MAX_ROUNDING_FLOOR:g}; lower the learning rate"
        )
    tol = attainable_tol(config.tol, W, X)
    config = replace(config, tol=tol)

    def forward_map(r: Tensor, rows: Tensor | None) -> Tensor:
        return act.f(r @ W.T + (X if rows is None else X[rows]))

    zeros = torch.zeros_like(X)
    if method == "damped":
        r, iters = damped_iteration(
            forward_map, zeros, alpha=config.damping, tol=config.tol, max_iter=config.max_iter
        )
    elif method == "anderson":
        r, iters = _anderson_solve(forward_map, zeros, config)
    elif method == "newton":
        r, iters = _newton(W, X, act, tol=config.tol, max_iter=config.max_iter)
    else:  # euler: the authors' fixed number of steps, no tolerance
        r, iters = damped_iteration(
            forward_map,
            zeros,
            alpha=config.euler_dt,
            tol=0.0,
            max_iter=config.euler_steps,
            stop_early=False,
        )
    a = r @ W.T + X
    residual = _inf_norm(r - act.f(a))
    converged = within_tol(residual, r, config.tol)  # false for NaN as well
    fp = FixedPoint(
        r=r,
        gain=act.gain(a),
        drive=X,
        residual=residual,
        converged=converged,
        iterations=iters,
        method=method,
        tolerance=tol,
    )
    if method != "euler":
        enforce(fp, config, context)
    return fp


def enforce(fp: FixedPoint, config: SolverConfig, context: str = "") -> None:
    """Raise :class:`FixedPointNotConverged` if the policy says so (always if none converged)."""
    failed = fp.num_failed
    if failed == 0:
        return
    total = int(fp.converged.numel())
    if config.on_nonconvergence == "skip" and failed < total:
        return
    where = f" ({context})" if context else ""
    hint = (
        "every sample failed; " if config.on_nonconvergence == "skip" else ""
    ) + "the network may have lost stability: lower the learning rate, raise max_iter, "
    hint += "or use on_nonconvergence=skip to drop such samples"
    raise FixedPointNotConverged(
        f"fixed-point solver '{fp.method}' did not converge for {failed}/{total} samples{where}: "
        f"max residual {fp.max_residual:.3g} > tol {max(config.tol, fp.tolerance):.3g} after "
        f"{fp.iterations} "
        f"iterations; {hint}"
    )


# ----------------------------------------------------------------------------- the adjoint solve


def _direct_adjoint(W: Tensor, gain: Tensor, delta: Tensor, linear: bool) -> Tensor:
    """Solve (I − Wᵀ G_b) u_b = δ_b exactly: one shared LU if linear, else batched LU."""
    eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    if linear:
        return torch.linalg.solve(eye - W.T, delta.T).T
    M = eye - W.T * gain.unsqueeze(1)  # (Wᵀ G_b)_{ij} = W_ji g_bj
    return torch.linalg.solve(M, delta.unsqueeze(-1)).squeeze(-1)


def solve_adjoint(
    W: Tensor, gain: Tensor, delta: Tensor, act_name: str, config: SolverConfig
) -> Tensor:
    """Solve (I − Wᵀ G_b) u_b = δ_b for every sample b (rows of ``delta``); return u [B, N].

    ``direct``: one LU of I − Wᵀ shared by the batch for a linear network, otherwise a batched
    ``torch.linalg.solve`` over the ``[B, N, N]`` matrices I − Wᵀ G_b (no explicit inverse).
    ``iterative``: Anderson on u = δ + Wᵀ(g ⊙ u), which in row form is one batched matmul per
    iteration. Near a critical fixed point (an eigenvalue of G_b W close to 1, where the
    Euclidean gradient blows up) this system is ill-conditioned and the iteration can stall
    just above the tolerance, notably in float32; the samples it leaves there are solved
    directly (batched LU on those rows only), so the gradient is always the implicit one.
    """
    method = config.resolved_adjoint(act_name)
    linear = act_name == "identity"
    if method == "direct":
        return _direct_adjoint(W, gain, delta, linear)
    scale = float(_inf_norm(delta).max()) if delta.numel() else 0.0
    if scale == 0.0:
        return torch.zeros_like(delta)
    tol = config.tol * scale
    u, _ = anderson(
        lambda v, rows: (
            delta + (gain * v) @ W if rows is None else delta[rows] + (gain[rows] * v) @ W
        ),
        delta.clone(),
        tol=tol,
        max_iter=config.max_iter,
        memory=config.memory,
        beta=1.0,
    )
    res = _inf_norm(delta + (gain * u) @ W - u)
    stalled = (~within_tol(res, u, tol)).nonzero().squeeze(-1)
    if stalled.numel():
        u = u.clone()
        u[stalled] = _direct_adjoint(W, gain[stalled], delta[stalled], linear)
        if not bool(torch.isfinite(u[stalled]).all()):
            raise FixedPointNotConverged(
                f"adjoint solve (I − WᵀG)u = δ is singular for {stalled.numel()}/"
                f"{res.numel()} samples: their fixed point sits on a pole of the loss "
                f"(G·W has an eigenvalue 1); lower the learning rate"
            )
    return u
