"""The decorrelation methods: their configuration and the maths that updates R.

A decorrelator holds a square matrix R in front of a layer (z = R x). Once per training step it
updates R from a small subsample of the layer's inputs. Two families exist:

* **learned rules** (``copi``, ``dbp``, ``scaled``): one cheap multiplicative step
  R ← R − η·M·R per training step, where M is built from C = ⟨z zᵀ⟩ on the subsample. C is never
  formed: C·R = zᵀ(z R)/n costs 2·n·d² for n samples instead of d³.
* **exact reference methods** (``zca``, ``newton``): keep a running (EMA) second-moment matrix of
  the raw input x and set R to its inverse square root, by eigendecomposition (``zca``) or by a
  trace-normalised Newton–Schulz iteration (``newton``, as in IterNorm). They are the yardstick,
  not the fast path.

``C`` is the uncentred second moment unless ``demean=True``, in which case a running mean of x is
subtracted first (the forward pass itself always computes z = R x; the mean passes through R and
is absorbed by the next bias).

Everything here is a pure function of tensors so that it can be tested on its own; the module in
:mod:`decorrelate.nn.decorrelation` owns the buffers and calls these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..errors import UserError

METHODS: tuple[str, ...] = ("copi", "dbp", "scaled", "zca", "newton")
LEARNED: tuple[str, ...] = ("copi", "dbp", "scaled")
EXACT: tuple[str, ...] = ("zca", "newton")

#: Default η per method. The learned rules turn unstable once η·λ_max(C) nears 1–2 (C: second
#: moment of the layer input on the subsample; see :mod:`decorrelate.nn.decorrelation`). On
#: standardised MNIST, MLP 784-1000×4-10 trained by BP with Adam (lr 1e-3, batch 256):
#: λ_max ≈ 200–400 at the first layer. ``dbp`` whitens to unit variance and ``copi`` shrinks
#: the variances, so their λ_max stays put and 1e-3 kept η·λ_max ≤ 0.3 for 600 steps while
#: decorrelating each layer within a few hundred. ``scaled`` preserves the input power while
#: whitening, so its λ_max grows with the hidden activations and with the tail of rare samples
#: that whitening amplifies: at 1e-3 the classifier input collapsed after ≈ 350 steps, at
#: 3e-4 η·λ_max crept up to 0.24 by step 600; 1e-4, the low end of what the paper recommends
#: (1e-4 … 1e-6), keeps a wide margin. For ``zca``/``newton`` "lr" is the EMA rate of the
#: running covariance (1e-2: a memory of ~100 updates).
DEFAULT_LR: dict[str, float] = {
    "copi": 1e-3,
    "dbp": 1e-3,
    "scaled": 1e-4,
    "zca": 1e-2,
    "newton": 1e-2,
}
#: How often R is recomputed (zca/newton: from the running covariance) or stepped (learned rules).
DEFAULT_EVERY: dict[str, int] = {"copi": 1, "dbp": 1, "scaled": 1, "zca": 10, "newton": 10}
#: ``dbp``'s κ. 0.5 makes the rule R ← R − (η/2)(C − I)R, the symmetric whitening rule, which
#: reaches unit variance as fast as it decorrelates. Dalm et al. use κ ≈ 0.01 (mostly
#: decorrelation, very slow variance control): their code (artcogsys/decorbp) defaults to 1e-3
#: in its layer classes and command line and runs its experiments at 0.01 (with η 1e-4); pass
#: ``kappa=0.01`` to reproduce them.
DEFAULT_KAPPA = 0.5
#: Fan-in above which R is block-diagonal by default (``block_above``), and the largest block
#: it then uses. See :class:`DecorConfig`.
DEFAULT_BLOCK_ABOVE = 4096
AUTO_BLOCK = 1024


@dataclass(frozen=True)
class DecorConfig:
    """Everything that defines how one decorrelator learns. Build it with :meth:`create`.

    Options beyond the method, ``lr``, ``kappa``, ``sample_frac`` and ``demean``:

    * ``max_samples`` (256; None: no cap): cap on the samples per update where one batch element
      gives many (every spatial position of a conv input, every token of an N-d Linear input).
      The authors use every position of the sampled images (None). The cap keeps the R update
      of a conv layer O(256·d²) whatever the image size; BENCHMARKS.md §2.4 measures what it
      saves and what it costs in R's convergence on the paper's conv net.
    * ``max_norm`` (1e3): divergence bound. After an update, ‖R‖_F/√d (1 at the identity; the
      RMS gain R applies to an input direction) above this, or any non-finite entry, raises
      :class:`~decorrelate.errors.TrainingDiverged`. Exact whitening of inputs with variance v
      needs a gain ≈ 1/√v, so raise the bound for inputs far below unit scale.
    * ``var_floor`` (1e-2, learned rules): rows of R that belong to input coordinates whose
      running variance is at most ``var_floor`` × the mean running variance are frozen (never
      updated). Inputs that are always zero or always the same constant (MNIST's empty border
      pixels) are the extreme case, inputs active in a handful of images the common one;
      without the floor the rules inflate their rows without bound (see
      :func:`live_coordinates`).
    * ``momentum`` (0.01, learned rules): EMA rate of the running statistics of x: the
      per-coordinate variance used by the floor, and the mean when ``demean=True``
      (``zca``/``newton`` use ``lr`` for theirs).
    * ``eps`` (1e-3, zca/newton): ridge added to the running covariance, relative to its mean
      eigenvalue: R = (C + eps·tr(C)/d·I)^(−1/2). It caps the gain along dead or unseen directions
      at ≈ 1/√eps times the typical gain.
    * ``every`` (zca/newton 10, learned rules 1): zca/newton recompute R every this many updates
      (the covariance itself is accumulated at every update); R stays the identity until the
      running covariance has seen at least d samples (block size, with ``block_size``), so that
      early, rank-deficient estimates are never inverted. The learned rules take one step every
      this many updates and skip the others entirely (no subsample work, no pass over R): a
      speed option that trades how fast R follows the input for less overhead per step.
    * ``block_size`` (None): None keeps R a full d×d matrix (the paper's method) up to
      ``block_above`` (below). An integer makes
      R block-diagonal for layers whose fan-in d exceeds it: k equal blocks of size d/k, with k
      the smallest number of blocks ≥ d/block_size that divides d (see :func:`block_layout`).
      Each block is decorrelated as if it were a layer of its own (``scaled`` keeps one gain
      per block); correlations *between* blocks are left alone. z = R x then costs d·(d/k)
      instead of d² per sample — the option for very wide inputs such as a conv net's first
      fully connected layer. R is then stored as [k, d/k, d/k].
    * ``block_above`` (4096; None: never): with ``block_size`` None, layers whose fan-in d (per
      group, for a grouped convolution) exceeds this get a block-diagonal R anyway, with
      blocks of at most ``min(1024, block_above)`` (:data:`AUTO_BLOCK`). A full R costs d²
      numbers, d/out times the layer's own weight: 9× for a ResNet's 512-channel 3×3
      convolutions (d = 4608), so a ResNet-18's state would grow 10× (README, "what R costs in
      memory"). 4096 keeps a full R on every layer of the paper's networks (the MNIST MLP's 784
      and 1000, the conv net's 3136-wide first fully connected layer). Pass
      ``block_above=None`` for a full R everywhere (the paper's method).
    * ``blend`` (0.1, zca/newton): at each recompute R moves this fraction of the way to the
      exact whitening matrix (1 jumps there). Jumping from the identity to full whitening
      in the middle of training hands every layer an input it was not trained on (on an MNIST
      MLP the loss went from 0.3 to ~2000 in one step); blending spreads the change over
      ~1/blend recomputes so that the weights follow, and R still converges to the exact
      whitener of the running covariance.
    * ``iters`` (20, newton): Newton–Schulz iterations from the identity. Convergence takes about
      log₁.₅(√(d/eps)) + 3 iterations, i.e. ≈ 20 for d ≈ 1000.
    * ``fold`` (None): Linear layers only. None chooses the cheaper order of products per call;
      True always multiplies R into the weight (W R), False always into the input (x Rᵀ).
    * ``seed`` (0): seeds the choice of the subsample (together with the layer name and the
      update count, so a resumed run draws the same subsamples).
    """

    method: str
    lr: float
    kappa: float = DEFAULT_KAPPA
    sample_frac: float = 0.1
    demean: bool = False
    max_samples: int | None = 256
    max_norm: float = 1e3
    var_floor: float = 1e-2
    momentum: float = 0.01
    eps: float = 1e-3
    every: int = 1
    blend: float = 0.1
    iters: int = 20
    fold: bool | None = None
    block_size: int | None = None
    block_above: int | None = DEFAULT_BLOCK_ABOVE
    seed: int = 0

    @classmethod
    def create(
        cls,
        method: str,
        *,
        lr: float | None = None,
        kappa: float | None = None,
        sample_frac: float = 0.1,
        demean: bool = False,
        **options: Any,
    ) -> DecorConfig:
        """A validated configuration; any impossible request raises :class:`UserError`."""
        if not isinstance(method, str) or method not in METHODS:
            raise UserError(
                f"unknown decorrelation method {method!r}; choose one of: {', '.join(METHODS)}"
            )
        known = {f.name for f in fields(cls)} - {"method", "lr", "kappa", "sample_frac", "demean"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UserError(
                f"unknown decorrelation option(s) {', '.join(unknown)}; "
                f"valid options: lr, kappa, sample_frac, demean, {', '.join(sorted(known))}"
            )
        if options.get("every") is None:
            options["every"] = DEFAULT_EVERY[method]
        only = {
            "eps": EXACT,
            "blend": EXACT,
            "iters": ("newton",),
            "kappa": ("dbp",),
            "var_floor": LEARNED,
            "momentum": LEARNED,
        }
        given = dict(options, kappa=kappa)
        for name, methods in only.items():
            if given.get(name) is not None and method not in methods:
                raise UserError(
                    f"decorrelation option {name!r} applies to {', '.join(methods)} only, "
                    f"not to {method!r}"
                )
        cfg = cls(
            method=method,
            lr=DEFAULT_LR[method] if lr is None else lr,
            kappa=DEFAULT_KAPPA if kappa is None else kappa,
            sample_frac=sample_frac,
            demean=demean,
            **options,
        )
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        def number(name: str, ok: bool, want: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
                raise UserError(f"decorrelation {name}={value!r} is invalid: must be {want}")

        def finite(name: str) -> bool:
            value = getattr(self, name)
            return isinstance(value, (int, float)) and math.isfinite(value)

        if self.method in EXACT:
            number("lr", finite("lr") and 0 < self.lr <= 1, "in (0, 1] (the EMA rate)")
        else:
            number("lr", finite("lr") and self.lr > 0, "a positive finite number")
        number("kappa", finite("kappa") and 0 <= self.kappa <= 1, "in [0, 1]")
        number("sample_frac", finite("sample_frac") and 0 < self.sample_frac <= 1, "in (0, 1]")
        number("max_norm", finite("max_norm") and self.max_norm > 1, "a finite number > 1")
        number("var_floor", finite("var_floor") and 0 <= self.var_floor < 1, "in [0, 1)")
        number("momentum", finite("momentum") and 0 < self.momentum <= 1, "in (0, 1]")
        number("eps", finite("eps") and self.eps > 0, "a positive finite number")
        number("blend", finite("blend") and 0 < self.blend <= 1, "in (0, 1]")
        for name in ("max_samples", "every", "iters"):
            value = getattr(self, name)
            if name == "max_samples" and value is None:
                continue  # no cap
            number(name, isinstance(value, int) and value >= 1, "a positive integer")
        if not isinstance(self.demean, bool):
            raise UserError(f"decorrelation demean={self.demean!r} is invalid: must be a bool")
        if self.block_size is not None:
            number(
                "block_size",
                isinstance(self.block_size, int) and self.block_size >= 1,
                "a positive integer or None",
            )
        if self.block_above is not None:
            number(
                "block_above",
                isinstance(self.block_above, int) and self.block_above >= 1,
                "a positive integer or None",
            )
        if self.fold not in (None, True, False):
            raise UserError(f"decorrelation fold={self.fold!r} is invalid: None, True or False")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise UserError(f"decorrelation seed={self.seed!r} is invalid: must be an integer")


# ----------------------------------------------------------------------------- learned rules


def block_layout(d: int, block_size: int | None) -> tuple[int, int]:
    """(k, b): R is k diagonal blocks of size b = d/k (k = 1: a full d×d matrix).

    k is the smallest number of blocks ≥ d/block_size that divides d, so every block has the
    same size and no input is padded: d = 3136 with block_size 512 gives 7 blocks of 448,
    d = 1000 gives 2 of 500. A prime d larger than block_size falls back to d blocks of 1
    (per-coordinate scaling only).
    """
    if block_size is None or block_size >= d:
        return 1, d
    k = math.ceil(d / block_size)
    while d % k:
        k += 1
    return k, d // k


def r_layout(d: int, cfg: DecorConfig) -> tuple[int, int]:
    """(k, b) of R for a fan-in ``d`` under ``cfg``: ``block_size`` if given, else blocks of at
    most ``min(AUTO_BLOCK, block_above)`` once d exceeds ``block_above`` (see DecorConfig)."""
    if cfg.block_size is not None:
        return block_layout(d, cfg.block_size)
    if cfg.block_above is not None and d > cfg.block_above:
        return block_layout(d, min(AUTO_BLOCK, cfg.block_above))
    return 1, d


def split_blocks(samples: Tensor, k: int) -> Tensor:
    """[n, d] samples → [k, n, d/k] views, one per diagonal block of R (no copy)."""
    n, d = samples.shape
    return samples.reshape(n, k, d // k).transpose(0, 1)


def coordinate_variance(samples: Tensor) -> Tensor:
    """Variance of each coordinate of ``samples`` [..., n, d] across the n samples (centred)."""
    return (samples - samples.mean(-2, keepdim=True)).square().mean(-2)


def live_coordinates(running_var: Tensor, var_floor: float) -> Tensor:
    """True for the input coordinates whose running variance exceeds ``var_floor`` × the mean.

    Why a floor is needed. An input that is always zero, or always the same constant (MNIST's 67
    empty border pixels are zero raw and −0.42 after standardisation), carries no signal, and a
    group of m constants spans one direction only, so the input covariance is singular along
    m − 1 directions that no multiplicative rule can shrink: every rule's growth term (dbp's
    variance term, copi's diagonal, scaled's gain) would inflate R there forever although z
    never changes. Inputs active in only a few images (MNIST has many) are nearly as bad:
    between their rare events the subsample sees no variance and the growth terms inflate their
    rows; when an event comes, the amplified sample makes η·λ_max(C) spike, and with η ≈ 1e-3
    that destabilises R within a few thousand steps. So the rows of R that belong to such
    inputs are frozen. The test is on the *input's* running variance (an EMA over steps): it
    does not depend on R, so a row cannot talk itself over the floor by its own growth, and it
    is not fooled by one quiet or one busy subsample. Every other row is decorrelated and
    whitened as the rule says (and live rows still decorrelate from frozen ones, which learns
    their offset).
    """
    return running_var > var_floor * running_var.mean()


def top_eigenvalue(gram: Tensor, iters: int = 10) -> Tensor:
    """The largest eigenvalue of small PSD matrices ``gram`` [..., n, n] (exact up to n = 64).

    Applied to the n×n Gram matrix z zᵀ/n, whose non-zero eigenvalues are those of
    C = zᵀz/n, this costs nothing in d. Beyond n = 64 a few power iterations (O(n²) each, from
    the Gram column with the largest diagonal) give a Rayleigh quotient: a lower bound that is
    tight once the top eigenvalue stands out, which is the case that matters here.
    """
    if gram.shape[-1] <= 64:
        return torch.linalg.eigvalsh(gram)[..., -1]
    start = torch.diagonal(gram, dim1=-2, dim2=-1).argmax(-1, keepdim=True)  # [..., 1]
    v = torch.take_along_dim(gram, start.unsqueeze(-2), dim=-1)  # [..., n, 1]
    tiny = torch.finfo(gram.dtype).tiny
    for _ in range(iters):
        v = gram @ v
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(tiny)
    return (v * (gram @ v)).sum((-2, -1))


def scaled_gain(x: Tensor, z: Tensor, zc: Tensor, lr: float) -> Tensor:
    """The ``scaled`` rule's gain g per block: mean over samples of ‖x_i‖ / ‖z'_i‖.

    Shapes: ``x``, ``z``, ``zc`` [k, n, b]; returns [k]. z' = z − η·zc are the samples as the
    updated R will map them before the gain, with ``zc`` the rows of z times the C the update
    uses (frozen coordinates' columns zeroed, so they stay): live coordinates become (I − ηC) z.
    So after the update the decorrelated inputs keep the raw inputs' norm on average (the fixed
    point has ‖z‖ ≈ ‖x‖ up to the spread of the per-sample ratios). Zero-norm samples are skipped.
    """
    z_new = z - lr * zc
    x_norm = torch.linalg.vector_norm(x, dim=-1)
    z_norm = torch.linalg.vector_norm(z_new, dim=-1)
    ok = (x_norm > 0) & (z_norm > 0)
    ratio = torch.where(ok, x_norm / z_norm.clamp_min(torch.finfo(z.dtype).tiny), 0.0)
    count = ok.sum(-1)
    return torch.where(
        count > 0, ratio.sum(-1) / count.clamp_min(1), torch.ones_like(ratio[..., 0])
    )


class StepInfo(NamedTuple):
    """What one learned update saw: live coordinates and the estimated η·λ_max(C)."""

    live: Tensor
    lr_lambda: Tensor


def learned_update(
    R: Tensor, x: Tensor, z: Tensor, running_var: Tensor, step: int, cfg: DecorConfig
) -> StepInfo:
    """One step of ``copi``, ``dbp`` or ``scaled``, applied to R (and ``running_var``) in place.

    Shapes: ``R`` [k, b, b] (k diagonal blocks; k = 1 for a full R), ``x`` [k, n, b] the
    (centred, if demeaning) raw samples split by block, ``z`` = x Rᵀ likewise, ``running_var``
    [k, b] the running per-coordinate variance of x; ``step`` is the number of updates so far.
    Every block takes its own step. With C = zᵀz/n and c = diag(C) (per block):

    * copi:   R ← R − η·offdiag(C)·R             = diag(1 + ηc)·R − η·C·R
    * dbp:    R ← R − η·[(1−κ)·offdiag(C) + κ·diag(c − 1)]·R
    * scaled: R ← g·(I − ηC)·R,  g = :func:`scaled_gain`

    Two equivalent forms, whichever is cheaper. With few samples (n ≤ b, the usual subsample),
    C is never formed: C·R = zᵀ(z R)/n costs 2·n·b² per block and η·λ_max comes from the n×n
    Gram matrix z zᵀ/n (same non-zero spectrum). With many samples (every patch position of a
    conv input, or a whole large batch) the n×n Gram matrix would be huge, so C = zᵀz/n is
    formed (n·b²) and multiplied into R (b³). Rows of inputs below the variance floor (see
    :func:`live_coordinates`, which compares against the mean over all blocks) are left
    unchanged. Also returns η·λ_max(C), the largest over the blocks: above 2 the step amplifies
    the top direction.
    """
    n, b = z.shape[-2], z.shape[-1]
    lr = cfg.lr
    running_var.lerp_(coordinate_variance(x), ema_weight(cfg.momentum, step))
    live = live_coordinates(running_var, cfg.var_floor)
    all_live = bool(live.all())
    # zero columns of z ⇒ zero rows of zᵀ(zR): frozen rows stay
    z_live = z if all_live else z * live.unsqueeze(-2)
    if use_covariance(n, b):
        cov = (z.mT @ z) / n  # [k, b, b]
        info = StepInfo(live, lr * top_eigenvalue(cov).max())
        masked = cov if all_live else cov * live.unsqueeze(-1)  # (z_liveᵀ z)/n
        step_dir = masked @ R  # [k, b, b]: C R with the R before the update, frozen rows 0
        zc = None if cfg.method != "scaled" else z @ masked.mT
    else:
        gram = (z @ z.mT) / n  # [k, n, n]
        info = StepInfo(live, lr * top_eigenvalue(gram).max())
        zR = z @ R  # [k, n, b], with the R before the update
        step_dir = None
        zc = None if cfg.method != "scaled" else gram @ z_live

    def add_step(alpha: float | Tensor, beta: float = 1.0) -> None:
        """R ← beta·R + alpha·C·R (C·R of the R before the update; alpha a scalar or
        [k, 1, 1]); the Gram form does it in one pass over R."""
        if step_dir is not None:
            if beta != 1.0:
                R.mul_(beta)
            R.add_(step_dir * alpha)
        elif isinstance(alpha, Tensor):
            R.baddbmm_(z_live.mT * alpha, zR, beta=beta, alpha=1.0 / n)
        else:
            R.baddbmm_(z_live.mT, zR, beta=beta, alpha=alpha / n)

    if cfg.method == "scaled":
        assert zc is not None
        g = scaled_gain(x, z, zc, lr)
        kept = None if all_live else R[~live]  # a copy; usually few rows
        if R.shape[0] == 1:  # g·(R − η C R)
            gain = float(g[0])
            add_step(-gain * lr, beta=gain)
        else:
            g = g.view(-1, 1, 1)
            R.mul_(g)
            add_step(-lr * g)
        if kept is not None:
            R[~live] = kept
        return info
    c = z.square().mean(-2)
    if cfg.method == "copi":
        decor, row_scale = 1.0, 1.0 + lr * c
    elif cfg.method == "dbp":
        decor = 1.0 - cfg.kappa
        row_scale = 1.0 + lr * decor * c - lr * cfg.kappa * (c - 1.0)
    else:
        raise ValueError(f"not a learned decorrelation method: {cfg.method!r}")
    R.mul_(torch.where(live, row_scale, torch.ones_like(c)).unsqueeze(-1))
    add_step(-lr * decor)
    return info


def use_covariance(n: int, b: int) -> bool:
    """Whether :func:`learned_update` forms C (b×b) rather than the n×n Gram matrix.

    The Gram form costs ≈ n²·b + 2·n·b² per block, the covariance form n·b² + b³ (plus n·b² for
    ``scaled``'s gain in either): the covariance form wins once n exceeds b.
    """
    return n > b


# ----------------------------------------------------------------------------- exact methods


def ema_weight(lr: float, num_updates: int) -> float:
    """EMA rate that starts as a plain running average (1/(t+1)) and settles at ``lr``.

    Without the warm-up the first estimates would be dominated by the zero initial state.
    """
    return max(lr, 1.0 / (num_updates + 1))


def ridge(cov: Tensor, eps: float) -> float:
    """The absolute ridge eps·tr(C)/d for the relative ``eps`` (over all blocks of [k, b, b])."""
    return eps * float(torch.diagonal(cov, dim1=-2, dim2=-1).mean())


def zca_whitener(cov: Tensor, eps: float) -> Tensor:
    """(C + ridge·I)^(−1/2) by a symmetric eigendecomposition (float64), per [..., b, b] block."""
    c64 = cov.double()
    c64 = 0.5 * (c64 + c64.mT)
    evals, evecs = torch.linalg.eigh(c64)
    inv_sqrt = (evals.clamp_min(0.0) + ridge(cov, eps)).rsqrt()
    return ((evecs * inv_sqrt.unsqueeze(-2)) @ evecs.mT).to(cov.dtype)


def newton_whitener(cov: Tensor, eps: float, iters: int) -> Tensor:
    """(C + ridge·I)^(−1/2) by the trace-normalised, coupled Newton–Schulz iteration (per block).

    With Σ = C + ridge·I and A = Σ / tr(Σ) (eigenvalues in (0, 1]): Y₀ = A, Z₀ = I,
    T = (3I − Z Y)/2, Y ← Y T, Z ← T Z. Z converges to A^(−1/2) (and Y to A^(1/2)); then
    Σ^(−1/2) = Z / √tr(Σ). The coupled form is the numerically stable one (the uncoupled
    P ← (3P − P³A)/2 amplifies rounding errors once the condition number is large). Only matrix
    products: the form that suits accelerators, as in IterNorm. ``cov`` may be [..., b, b].
    """
    b = cov.shape[-1]
    eye = torch.eye(b, dtype=cov.dtype, device=cov.device)
    sigma = 0.5 * (cov + cov.mT) + ridge(cov, eps) * eye
    trace = torch.diagonal(sigma, dim1=-2, dim2=-1).sum(-1)[..., None, None]
    y = sigma / trace
    z = eye.expand_as(sigma)
    for _ in range(iters):
        t = 1.5 * eye - 0.5 * (z @ y)
        y, z = y @ t, t @ z
    return 0.5 * (z + z.mT) * trace.rsqrt()
