"""Decorrelated layers: z = R x in front of a layer, with R learned by a local rule.

Two wrappers cover every decorrelable :class:`~decorrelate.layers.LayerKind`:
:class:`DecorLinear` for features-last layers (Linear and its subclasses, Hugging Face
``Conv1D``, registered kinds) and :class:`DecorConv` for Conv1d/2d/3d (patches, any padding
mode, groups: one block of R per group).

The wrappers keep the original layer object (``.layer``, so its parameters keep their identity
and any optimizer built before or after conversion sees the same tensors) and add R as a buffer.
R never receives a gradient from the task loss; it changes only in :meth:`Decorrelator.update`,
which the training loop calls once per step after ``optimizer.step()``.

Forward cost. R is applied in whichever order of products is cheaper:

* Linear, large output (hidden layers): z = x Rᵀ, then W z — B·d² extra per call.
* Linear, small output (a 10-way classifier): W_eff = W R, then W_eff x — out·d² extra.
* Convolutions: always folded into the kernel, W_eff = W R (on the [C_out, C_in·kh·kw] view), so the
  forward is one ordinary convolution; the naive unfold → R → conv path would cost
  (1 + 9·C_in/C_out)× the plain convolution.

Autograd differentiates both orders correctly: W gets ∂L/∂W_eff · Rᵀ (or ∂L/∂a · zᵀ) and the
input gets the error passed back through Rᵀ.

For other learning rules. The wrapped ``.layer`` is *not called* in the forward (its weight is
used directly), so hooks belong on the wrapper, whose input is the raw x and whose output is the
pre-activation a. A rule that writes ``.grad`` itself can treat the wrapper as a plain layer with
weight :meth:`~Decorrelator.effective_weight` on input x and map its result back with
:meth:`~Decorrelator.weight_grad`; :meth:`~Decorrelator.fold` turns a feedback matrix B into B R,
which sends errors back through Rᵀ.

Capture. During a forward in training mode, a wrapper stores a *detached* subsample of its
input (rows of x, or conv patches) for the next :meth:`~Decorrelator.update`. By default it does
so only when autograd is recording (a training forward pass); rules that learn from forward passes
under ``torch.no_grad()`` set ``capture = True`` (or use :func:`decorrelate.nn.capturing`) around
the clean pass. The last captured forward before an update is the one used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..context import BatchShard
from ..errors import TrainingDiverged, UserError
from ..layers import ConvKind, LayerKind, LayerWrapper, LinearKind, kind_of
from ..layers.kinds import stack_rows
from ..seeding import derive_seed
from .methods import (
    EXACT,
    DecorConfig,
    coordinate_variance,
    ema_weight,
    learned_update,
    live_coordinates,
    newton_whitener,
    r_layout,
    split_blocks,
    zca_whitener,
)
from .sampling import choose, conv_patches, gather_rows, global_rows, subsample_size

#: Weight dtypes whose decorrelators compute (and keep R) in float32.
HALF = (torch.float16, torch.bfloat16)


def _kind_of(layer: nn.Module) -> LayerKind:
    kind = kind_of(layer)
    if kind is None or not kind.decorrelable:
        raise UserError(f"cannot decorrelate a {type(layer).__name__}: no decorrelable layer kind")
    return kind


#: How many recent sample rows a decorrelator keeps for :meth:`Decorrelator.stats`.
STATS_ROWS = 512
#: ``scaled`` stops with TrainingDiverged once COLLAPSE_PATIENCE consecutive steps have had
#: η·λ_max(C) above COLLAPSE_LIMIT (see _check). A single spike (one sample far out in the
#: tail) is survivable; a step size that is too large for the input keeps it above every step.
COLLAPSE_LIMIT = 2.0
COLLAPSE_PATIENCE = 3
#: Relative variance under which :meth:`Decorrelator.stats` treats a coordinate as constant.
CONSTANT_TOL = 1e-6


class Decorrelator(LayerWrapper):
    """Base of the decorrelated layers: R, its statistics, capture, update and diagnostics.

    Buffers (all in ``state_dict()``, so a checkpoint resumes exactly): ``R`` [d, d], or
    [k, d/k, d/k] diagonal blocks with the ``block_size`` option; ``num_updates``;
    ``running_var`` [d] of x for the learned rules' variance floor; ``running_mean`` [d] when
    demeaning; ``running_cov`` (shaped like R) and ``samples_seen`` for ``zca``/``newton``.
    Use :meth:`transform`, :meth:`fold` and :meth:`weight_grad` rather than R itself: they
    work for both layouts.
    """

    layer: nn.Module
    R: Tensor
    num_updates: Tensor

    def __init__(
        self,
        layer: nn.Module,
        in_features: int,
        config: DecorConfig,
        name: str,
        *,
        groups: int = 1,
        kind: LayerKind | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.config = config
        self.name = name or type(layer).__name__
        #: The wrapped layer's :class:`~decorrelate.layers.LayerKind` (how to apply its weight).
        self.kind = kind if kind is not None else _kind_of(layer)
        #: None: capture in training mode when autograd records; True/False: force on/off.
        self.capture: bool | None = None
        #: Where the batch of the current step lies in the global batch (torch.distributed);
        #: set for one step by :func:`decorrelate.nn.step_context`, None otherwise.
        self.shard: BatchShard | None = None
        self._seed = derive_seed(config.seed, "decorrelation", self.name)
        self._sample: tuple[Tensor, Tensor | None] | None = None
        self._warned_few = False
        weight = layer.weight
        # R and its statistics stay in float32 (or float64) when the layer is bf16/fp16: the
        # updates and eigensolvers need the precision (see _apply).
        dtype = torch.float32 if weight.dtype in HALF else weight.dtype
        factory = {"dtype": dtype, "device": weight.device}
        d = in_features
        self.in_features = d
        if d % groups:
            raise UserError(f"layer '{self.name}': fan-in {d} does not split into {groups} groups")
        #: A grouped convolution mixes inputs within its groups only: R is block-diagonal with
        #: (at least) one block per group, so the blocks of group g act on the g-th chunk of x.
        self.groups = groups
        per_group, self.block = r_layout(d // groups, config)
        self.blocks = groups * per_group
        eye = torch.eye(self.block, **factory)
        self.register_buffer("R", eye if self.blocks == 1 else eye.repeat(self.blocks, 1, 1))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long, device=weight.device))
        # Diagnostics state, kept in buffers too so that a resumed run logs the same numbers:
        # the last STATS_ROWS sample rows (a ring buffer), how many rows were ever stored, the
        # last learned update's lr·λ_max (−1 before the first) and the unstable-step streak.
        self.register_buffer("stats_rows", torch.zeros(STATS_ROWS, d, **factory))
        self.register_buffer("stats_count", torch.zeros((), dtype=torch.long, device=weight.device))
        self.register_buffer("lr_lambda", torch.full((), -1.0, **factory))
        self.register_buffer(
            "unstable_steps", torch.zeros((), dtype=torch.long, device=weight.device)
        )
        if config.demean:
            self.register_buffer("running_mean", torch.zeros(d, **factory))
        if config.method not in EXACT:
            self.register_buffer("running_var", torch.zeros(d, **factory))
        if config.method in EXACT:
            self.register_buffer("running_cov", torch.zeros_like(self.R))
            self.register_buffer(
                "samples_seen", torch.zeros((), dtype=torch.long, device=weight.device)
            )

    # ------------------------------------------------------------------ helpers for rules

    def _apply(self, fn: Any, recurse: bool = True) -> Decorrelator:
        """``.to()``/``.half()``/``.bfloat16()`` move R and its statistics with the layer but keep
        them in float32 (their values untouched) when they would become half precision."""
        before = {k: b for k, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for key, old in before.items():
            new = self._buffers[key]
            if new is not None and new.dtype in HALF and old.dtype not in HALF:
                self._buffers[key] = old.to(device=new.device)
        return self

    @property
    def weight(self) -> Tensor:
        """The trainable weight W of the wrapped layer (not W R)."""
        return self.layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The trainable bias of the wrapped layer."""
        return self.layer.bias

    def _times(self, rows: Tensor, transpose: bool) -> Tensor:
        """``rows`` [..., d] times R (or Rᵀ), R full or block-diagonal, in ``rows``' dtype."""
        R = self.R.to(rows.dtype)
        if self.blocks == 1:
            return F.linear(rows, R) if transpose else rows @ R
        split = rows.reshape(*rows.shape[:-1], self.blocks, self.block)
        pattern = "...kb,kcb->...kc" if transpose else "...kb,kbc->...kc"
        return torch.einsum(pattern, split, R).reshape(rows.shape)

    def transform(self, x: Tensor) -> Tensor:
        """z = R x for raw inputs ``x`` [..., d] (rows: x Rᵀ); differentiable in x."""
        return self._times(x, transpose=True)

    def pull_back(self, grad: Tensor) -> Tensor:
        """An error ``grad`` [..., d] at z = R x sent back to x: Rᵀ·grad (rows: grad R)."""
        return self._times(grad, transpose=False)

    def _times_matrix(self, matrix: Tensor, transpose: bool) -> Tensor:
        """A weight-shaped ``matrix`` times R (or Rᵀ), on the kind's [out, in/groups] view.

        With groups, output rows of group g see only the g-th chunk of the input, so they meet
        only the blocks of R that belong to group g.
        """
        kind, layer = self.kind, self.layer
        if matrix.shape == kind.weight(layer).shape:
            m = kind.as_matrix(layer, matrix)
            back = lambda t: kind.from_matrix(layer, t)  # noqa: E731
        else:  # already a [out, in/groups] matrix (or any [out, ...] view of one)
            m = matrix.reshape(matrix.shape[0], -1)
            back = lambda t: t.reshape(matrix.shape)  # noqa: E731
        if self.groups == 1:
            return back(self._times(m, transpose))
        g, k = self.groups, self.blocks // self.groups
        split = m.reshape(g, m.shape[0] // g, k, self.block)
        R = self.R.to(m.dtype).reshape(g, k, self.block, self.block)
        pattern = "gokb,gkcb->gokc" if transpose else "gokb,gkbc->gokc"
        return back(torch.einsum(pattern, split, R).reshape(m.shape))

    def fold(self, matrix: Tensor) -> Tensor:
        """``matrix`` (shaped like the weight) times R: what the layer applies to its raw input.

        ``fold(weight)`` is the effective weight; ``fold(B)`` turns a feedback matrix B into the
        one that sends errors back through Rᵀ.
        """
        return self._times_matrix(matrix, transpose=False)

    def effective_weight(self) -> Tensor:
        """W R (differentiable in W): the layer is a plain layer with this weight on raw x."""
        return self.fold(self.layer.weight)

    def weight_grad(self, effective_grad: Tensor) -> Tensor:
        """∂L/∂W from ∂L/∂W_eff: multiply by Rᵀ (for rules that write ``.grad`` themselves)."""
        return self._times_matrix(effective_grad, transpose=True)

    def local_weight_grad(
        self, kind: Any, inputs: Sequence[Tensor], errors: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor | None]:
        """Σ ⟨e xᵀ⟩ Rᵀ for W (and Σ e for the bias) from raw inputs x: the wrapped layer's
        :class:`~decorrelate.layers.LayerKind` forms the gradient for the effective weight W R,
        which :meth:`weight_grad` maps to W (used by :func:`decorrelate.layers.weight_grad`)."""
        gw, gb = kind.weight_grad(self.layer, inputs, errors)
        return self.weight_grad(gw), gb

    def local_input_grad(self, kind: Any, delta: Tensor, x: Tensor, weight: Tensor) -> Tensor:
        """``delta`` sent back to the raw input through ``weight`` R (``weight`` shaped like W)."""
        return kind.input_grad(self.layer, delta, x, self.fold(weight))

    def dense_R(self) -> Tensor:
        """R as a full d×d matrix (block-diagonal layouts expanded; for tests and analysis)."""
        return self.R if self.blocks == 1 else torch.block_diag(*self.R)

    # ------------------------------------------------------------------ capture

    def _capturing(self) -> bool:
        if not self.training or self.capture is False:
            return False
        return self.capture is True or torch.is_grad_enabled()

    def _store(self, x_rows: Tensor, z_rows: Tensor | None) -> None:
        self._sample = (x_rows.detach(), None if z_rows is None else z_rows.detach())

    def observe(self, x: Tensor) -> None:
        """Store a subsample of ``x`` (this layer's raw input) for the next :meth:`update`.

        For rules that run one batched forward over clean and noisy copies (node perturbation):
        they show the decorrelator the clean rows only, whatever the capture setting.
        """
        self._capture(x.detach(), None)

    def _capture(self, x: Tensor, z: Tensor | None) -> None:
        raise NotImplementedError

    def clear_sample(self) -> None:
        """Forget the stored subsample (the next :meth:`update` is then a no-op)."""
        self._sample = None

    # ------------------------------------------------------------------ learning

    def _warn_few(self, n: int) -> None:
        """Say once that a learned rule's subsample is too small for R to move."""
        if self._warned_few:
            return
        self._warned_few = True
        cfg = self.config
        warnings.warn(
            f"decorrelation of layer '{self.name}' learns R from {n} sample per step "
            f"(sample_frac={cfg.sample_frac:g} of the batch, max_samples={cfg.max_samples}): "
            f"{cfg.method} needs at least 2 to see any variance, so R will not move; raise "
            "sample_frac (e.g. sample_frac=1.0, --decor-sample-frac 1) or max_samples, or train "
            f"with batches of at least {math.ceil(1 / cfg.sample_frac)}",
            stacklevel=3,
        )

    def update(self) -> None:
        """Update R from the stored subsample (see :meth:`_update`); outside autocast, as R's
        statistics and eigensolvers need their own precision."""
        device = self.R.device.type
        with torch.no_grad(), torch.autocast(device, enabled=False):
            self._update()

    def _update(self) -> None:
        """Update R from the stored subsample with the configured method; no-op without one.

        Raises :class:`TrainingDiverged` if R becomes non-finite, if its RMS gain ‖R‖_F/√d
        exceeds ``config.max_norm``, or if a ``scaled`` step is unstable (see :meth:`_check`).
        With ``every`` = n > 1 the learned rules step on every n-th call only; the calls in
        between just count.
        """
        if self._sample is None:
            return
        x, z = self._sample
        self._sample = None
        cfg = self.config
        R = self.R
        step = int(self.num_updates)
        if cfg.method not in EXACT and (step + 1) % cfg.every:
            self.num_updates += 1
            return
        if x.shape[0] < 2 and cfg.method not in EXACT:
            self._warn_few(x.shape[0])
        gathered = gather_rows(x.to(R.dtype))
        if gathered.shape[0] != x.shape[0] or z is None or z.dtype != R.dtype:
            z = None  # recompute from the (gathered) raw samples
        x = gathered
        self._remember(x)
        if cfg.demean:
            rate = cfg.lr if cfg.method in EXACT else cfg.momentum
            self.running_mean.lerp_(x.mean(0), ema_weight(rate, step))
            x = x - self.running_mean
            if z is not None:
                z = z - self.transform(self.running_mean)
        if cfg.method in EXACT:
            self._update_exact(x, step)
        else:
            z = self.transform(x) if z is None else z
            k = self.blocks
            blocks = R if k > 1 else R.unsqueeze(0)
            running_var = self.running_var.view(k, self.block)
            info = learned_update(
                blocks, split_blocks(x, k), split_blocks(z, k), running_var, step, cfg
            )
            self.lr_lambda.fill_(float(info.lr_lambda))
        self.num_updates += 1
        self._check(step + 1)

    def _update_exact(self, x: Tensor, step: int) -> None:
        cfg = self.config
        n = x.shape[0]
        parts = split_blocks(x, self.blocks)
        cov = (parts.mT @ parts / n).reshape(self.running_cov.shape)
        self.running_cov.lerp_(cov, ema_weight(cfg.lr, step))
        self.samples_seen += n
        due = (step + 1) % cfg.every == 0
        if not due or int(self.samples_seen) < self.block:
            return
        if float(torch.diagonal(self.running_cov).sum()) <= 0:
            return  # nothing but zeros seen: nothing to whiten
        if cfg.method == "zca":
            target = zca_whitener(self.running_cov, cfg.eps)
        else:
            target = newton_whitener(self.running_cov, cfg.eps, cfg.iters)
        self.R.lerp_(target, cfg.blend)

    def _check(self, updates: int) -> None:
        """Raise :class:`TrainingDiverged` if R exploded, turned non-finite or (scaled) collapsed.

        ``scaled`` renormalises R every step, so an unstable step size does not blow R up: it
        collapses all outputs onto the top input direction instead (each step multiplies that
        direction by g·|1 − ηλ_max| > g once ηλ_max > 2, and the gain then shrinks the rest).
        That is caught from the η·λ_max(C) of the steps, estimated on the subsample, once it has
        stayed above 2 for COLLAPSE_PATIENCE updates in a row.
        """
        cfg = self.config
        gain = float(torch.linalg.vector_norm(self.R)) / math.sqrt(self.in_features)
        lr_lambda = max(float(self.lr_lambda), 0.0)
        unstable = cfg.method == "scaled" and not lr_lambda <= COLLAPSE_LIMIT
        if unstable:
            self.unstable_steps += 1
        else:
            self.unstable_steps.zero_()
        collapsed = int(self.unstable_steps) >= COLLAPSE_PATIENCE
        if math.isfinite(gain) and gain <= cfg.max_norm and not collapsed:
            return
        if not math.isfinite(gain):
            what = "R has non-finite entries"
        elif gain > cfg.max_norm:
            what = f"R's RMS gain ‖R‖_F/√d = {gain:.3g} exceeds max_norm = {cfg.max_norm:g}"
        else:
            what = (
                f"lr·λ_max(C) = {lr_lambda:.3g} > {COLLAPSE_LIMIT:g} for "
                f"{int(self.unstable_steps)} steps in a row, so each update amplifies the "
                "dominant input direction and the outputs collapse onto it"
            )
        if cfg.method in EXACT:
            advice = f"raise the ridge eps (now {cfg.eps:g}) or max_norm, or standardise the input"
        else:
            advice = (
                f"lower the decorrelation learning rate (--decor-lr, now {cfg.lr:g}); "
                "these rules need lr · λ_max(input covariance) well below 1"
            )
        raise TrainingDiverged(
            f"decorrelation of layer '{self.name}' ({cfg.method}) diverged after "
            f"{updates} updates: {what}; {advice}"
        )

    # ------------------------------------------------------------------ diagnostics

    def _remember(self, x: Tensor) -> None:
        """Keep the last STATS_ROWS raw sample rows (a ring buffer) for :meth:`stats`.

        A subsample larger than the buffer (every patch position of a conv input, which comes in
        image order) is thinned evenly rather than cut, so the rows kept span all its images.
        """
        if x.shape[0] > STATS_ROWS:
            x = x[torch.arange(STATS_ROWS, device=x.device) * x.shape[0] // STATS_ROWS]
        rows = x
        n = rows.shape[0]
        pos = int(self.stats_count) % STATS_ROWS
        idx = (pos + torch.arange(n, device=x.device)) % STATS_ROWS
        self.stats_rows[idx] = rows.to(self.stats_rows.dtype)
        self.stats_count += n

    @torch.no_grad()
    def stats(self, cond: bool = True) -> dict[str, float]:
        """Diagnostics of R and of its output on the recently seen samples.

        * ``R_norm``: ‖R‖_F/√d (1 at the identity).
        * ``cond``: σ_max(R)/σ_min(R) (an O(d³) SVD; skipped with ``cond=False``).
        * ``offdiag`` / ``offdiag_input``: mean |C_ij|/√(C_ii C_jj) over i ≠ j of z = R x and of
          x, on up to 512 recent samples, with C the statistic the method decorrelates (centred
          if demeaning, uncentred otherwise); constant coordinates are left out. Sampling noise puts
          a floor of ≈ 0.8/√(samples) under it.
        * ``power_ratio``: Σ‖z‖² / Σ‖x‖² on the same samples (1 = input power preserved).
        * ``lr_lambda``: η·λ_max(C) of the last learned update (stability needs it well below 1–2).
        """
        R = self.R.float()
        out = {"R_norm": float(torch.linalg.vector_norm(R)) / math.sqrt(self.in_features)}
        if cond:
            sv = torch.linalg.svdvals(R)
            top, bottom = sv.max(), sv.min()
            out["cond"] = float(top / bottom) if bottom > 0 else math.inf
        filled = min(int(self.stats_count), STATS_ROWS)
        if filled >= 2:
            x = self.stats_rows[:filled].to(device=R.device, dtype=R.dtype)
            if self.config.demean:
                x = x - x.mean(0)
            z = self.transform(x)
            out["offdiag"] = _mean_abs_offdiag(z)
            out["offdiag_input"] = _mean_abs_offdiag(x)
            power = float(x.square().sum())
            out["power_ratio"] = float(z.square().sum()) / power if power > 0 else math.nan
        if float(self.lr_lambda) >= 0:
            out["lr_lambda"] = float(self.lr_lambda)
        return out

    def extra_repr(self) -> str:
        cfg = self.config
        blocks = f", blocks={self.blocks}x{self.block}" if self.blocks > 1 else ""
        return f"method={cfg.method}, lr={cfg.lr:g}, d={self.in_features}{blocks}"


def _mean_abs_offdiag(samples: Tensor) -> float:
    """Mean |C_ij|/√(C_ii C_jj), i ≠ j, over the non-constant coordinates of ``samples`` [n, d]."""
    c = samples.T @ samples / samples.shape[0]
    var = torch.diagonal(c)
    alive = live_coordinates(coordinate_variance(samples), CONSTANT_TOL) & (var > 0)
    k = int(alive.sum())
    if k < 2:
        return 0.0
    scale = var[alive].rsqrt()
    corr = c[alive][:, alive] * scale[:, None] * scale[None, :]
    total = corr.abs().sum() - torch.diagonal(corr).abs().sum()
    return float(total) / (k * (k - 1))


class DecorLinear(Decorrelator):
    """``a = W (R x) + b`` around a features-last layer (``.layer``): ``nn.Linear`` or any
    subclass with Linear's forward, Hugging Face's ``Conv1D`` (W stored [in, out]), or a
    registered decorrelable kind whose input is [..., d]; the layer's kind applies the weight.

    Inputs of any shape [..., d] work; every row of the flattened input is a sample, a 2-D batch
    gives ⌊sample_frac·B⌋ + 1 of them (more dimensions: capped at ``max_samples``).

    ``fold`` (None = automatic) picks the order of products: folding (W R) costs out·d² per call
    and another out·d² for W's gradient; applying R to the input costs rows·d² and another rows·d²
    for the input's gradient. Each call takes the cheaper one.
    """

    def __init__(
        self, layer: nn.Module, config: DecorConfig, name: str = "", kind: LayerKind | None = None
    ) -> None:
        kind = kind if kind is not None else _kind_of(layer)
        out_features, in_features = kind.as_matrix(layer, kind.weight(layer)).shape
        super().__init__(layer, in_features, config, name, kind=kind)
        self.out_features = out_features
        #: nn.Linear itself: one fused F.linear with the bias (the path the benchmarks measure).
        self._fused = isinstance(kind, LinearKind)
        self.fold_weight: bool | None = config.fold

    def _fold_is_cheaper(self, x: Tensor) -> bool:
        if self.fold_weight is not None:
            return self.fold_weight
        grad = torch.is_grad_enabled()
        rows = x.numel() // max(1, x.shape[-1])
        fold_cost = self.out_features * (1 + int(grad and self.layer.weight.requires_grad))
        direct_cost = rows * (1 + int(grad and x.requires_grad))
        return fold_cost < direct_cost

    def _linear(self, x: Tensor, weight: Tensor) -> Tensor:
        bias = self.kind.bias(self.layer)
        if self._fused:
            return F.linear(x, weight, bias)
        out = self.kind.apply(self.layer, x, weight)
        return out if bias is None else out + bias

    def forward(self, x: Tensor) -> Tensor:
        capture = self._capturing()
        if self._fold_is_cheaper(x):
            if capture:
                self._capture(x, None)
            return self._linear(x, self.fold(self.layer.weight))
        z = self.transform(x)
        if capture:
            self._capture(x, z)
        return self._linear(z, self.layer.weight)

    def local_weight_grad(self, kind, inputs, errors):
        """The cheaper order: decorrelate the inputs (rows·d²) when there are fewer rows than
        outputs, otherwise map the d-wide result through Rᵀ (out·d²)."""
        e = stack_rows(errors)
        a = stack_rows(inputs).to(e.dtype)
        gw = e.T @ self.transform(a) if e.shape[1] >= a.shape[0] else self.transform(e.T @ a)
        return kind.from_matrix(self.layer, gw), kind._bias_grad(self.layer, errors)

    def local_input_grad(self, kind, delta, x, weight):
        # (δ B) R rather than δ (B R): rows·out·d + rows·d² instead of out·d² per step.
        return self.pull_back(delta @ kind.as_matrix(self.layer, weight.to(delta.dtype)))

    def _capture(self, x: Tensor, z: Tensor | None) -> None:
        d = self.in_features
        rows = x.reshape(-1, d)
        # Under torch.distributed the choice is made on the global batch and each rank keeps
        # the chosen rows it holds, so the gathered union is the single-process subsample.
        batch = x.shape[0] if x.dim() > 1 else 1
        offset, total = global_rows(self.shard, batch, rows.shape[0], rows.shape[0] // batch)
        count = subsample_size(total, self.config.sample_frac)
        if x.dim() > 2 and self.config.max_samples is not None:
            count = min(count, self.config.max_samples)
        idx = choose(total, count, x.device, self._seed, int(self.num_updates), "rows")
        if total != rows.shape[0]:
            idx = idx[(idx >= offset) & (idx < offset + rows.shape[0])] - offset
        self._store(rows[idx], None if z is None else z.reshape(-1, d)[idx])


class DecorConv(Decorrelator):
    """An ``nn.Conv1d``/``Conv2d``/``Conv3d`` whose input patches are decorrelated by R, folded
    into the kernel: any stride, dilation, padding mode and groups (depthwise included).

    The patch one output channel sees is C_in/groups · k₁·…·kₙ inputs of its group; R acts on
    the whole C_in·k₁·…·kₙ patch and is block-diagonal with (at least) one block per group, as
    the layer only mixes inputs within a group. The forward is one convolution with the
    effective kernel W R and the layer's own stride, padding and dilation. The subsample is
    ⌊sample_frac·B⌋ + 1 images, from which at most ``max_samples`` random patches (positions)
    are gathered (``max_samples=None``: every position of those images, as the authors' code).
    ``DecorConv2d`` is this class.
    """

    def __init__(
        self, layer: nn.Module, config: DecorConfig, name: str = "", kind: LayerKind | None = None
    ) -> None:
        kind = kind if kind is not None else _kind_of(layer)
        patch = layer.in_channels * math.prod(layer.kernel_size)
        super().__init__(layer, patch, config, name, groups=layer.groups, kind=kind)

    def forward(self, x: Tensor) -> Tensor:
        if self._capturing():
            self._capture(x, None)
        return self.kind.convolve(self.layer, x, self.effective_weight(), self.layer.bias)

    def _capture(self, x: Tensor, z: Tensor | None = None) -> None:
        spatial = len(self.layer.kernel_size)
        batch = x.detach() if x.dim() == spatial + 2 else x.detach().unsqueeze(0)
        step = int(self.num_updates)
        offset, total = global_rows(self.shard, batch.shape[0], batch.shape[0], 1)  # images
        count = subsample_size(total, self.config.sample_frac)
        images = choose(total, count, x.device, self._seed, step, "images")
        patches = conv_patches(
            batch,
            self.layer,
            self.config.max_samples,
            self._seed,
            step,
            images=images,
            image_offset=None if total == batch.shape[0] else offset,
        )
        self._store(patches, None)


#: The name this wrapper had when it took Conv2d only.
DecorConv2d = DecorConv

#: Which wrapper a decorrelable layer kind gets: convolutions decorrelate their patches, every
#: other kind (Linear, HF Conv1D, a registered kind) its last input dim.
WRAPPER_OF_KIND: list[tuple[type[LayerKind], type[Decorrelator]]] = [(ConvKind, DecorConv)]


def wrapper_for(kind: LayerKind) -> type[Decorrelator]:
    """The wrapper class for a decorrelable ``kind``."""
    for kind_type, wrapper in WRAPPER_OF_KIND:
        if isinstance(kind, kind_type):
            return wrapper
    return DecorLinear
