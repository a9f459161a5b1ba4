"""Node perturbation: learning from forward passes only (Dalm, van Gerven & Ahmad).

Noise ε = σ·ξ is added to the output of every layer (every node of the graph a rule trains); the
change of each sample's loss δL tells how well the noise direction agreed with the gradient. Each
rule turns this into a per-sample error e at every layer output and writes
``W.grad = ⟨e aᵀ⟩`` and ``b.grad = ⟨e⟩`` (the mean over the batch; conv: with the layer's
own input patches, through :func:`decorrelate.layers.weight_grad`), always with the input ``a``
the layer had in the *clean* pass:

=====  ==================================  ===========================================
rule   noisy passes per clean pass         e
=====  ==================================  ===========================================
np     K (every node at once)              (δL / σ²) · ε
inp    K per layer (one layer at a time)   N_l · (δL_l / ‖ε_l‖²) · ε_l
anp    K (every node at once)              N · (δL / ‖δa‖²) · δa,  δa = measured change
=====  ==================================  ===========================================

averaged over the K passes that perturbed the node (N: perturbed units per sample).

**What is perturbed.** Every layer :func:`decorrelate.layers.find_layers` (with ``norms=True``)
lists: Linear (and subclasses), convolutions, Hugging Face ``Conv1D``, embeddings (their output
rows; the update scatters into the rows that were looked up) and the affine part of
normalisation layers — a LayerNorm/BatchNorm/GroupNorm/RMSNorm output γ ⊙ x̂ + β is a node like
any other, and its update is ⟨e ⊙ x̂⟩ for γ and ⟨e⟩ for β (so a ResNet whose last BN γ of a block
starts at zero learns). Layers are found at run time by forward hooks, in forward-call order
whatever the module order; a layer called k times in one forward (a shared or unrolled
recurrent cell) gets k independent perturbations, and its update is the sum over its calls.
Every layer output must hold the samples in dim 0.

**Loose parameters** (:func:`decorrelate.layers.loose_parameters`: a positional embedding or
class token held by a container) get the same estimator applied to the parameter itself —
weight perturbation in the same noisy passes: θ + σ·ξ (same σ, the same draw for every sample of
the batch), the parameter treated as one node shared by every sample, so its update is the batch
mean of the per-sample error, e.g. (mean δL / σ²) · ε for ``np``. ``anp`` counts it in N and in
‖δa‖² (its measured change θ̃ − θ); ``inp`` gives each one its own K passes. Its variance grows
with the parameter's size (all samples share one draw), unlike a node's.

**Passes.** The clean pass and every noisy pass are separate forward calls with the same batch,
under ``torch.no_grad()`` (no autograd graph is ever built): nothing is stacked along dim 0, so
no pass mixes with another in batch statistics, attention or any op across rows. Before every
pass the global random state (CPU, and each CUDA device the model uses) is set back to where it
was before the first, so **dropout and any other random op draw the same values in every pass**;
afterwards it is left where one forward pass would leave it. The noise comes from the rule's own
seeded generator and is not stored: the built-in sources are replayed from the generator state
saved before each draw (user samplers and traces are kept).

**BatchNorm in training mode**: each pass normalises with its own batch statistics, so a noisy
pass's statistics include the noise — the honest forward pass of a perturbed network. Running
statistics (any buffer the forward changes) are updated once per step, from the first pass:
what the noisy passes wrote into them is put back. A per-sample loss difference cannot see how
one sample's noise moves the other samples' losses through the batch mean and variance, so in
training mode NP estimates BP's gradient with the batch statistics held constant (in eval mode,
or with per-sample normalisation such as LayerNorm, it is unbiased for BP's gradient itself).

**Cost.** 1 + K forward passes per step (inp: 1 + K·(layers + loose parameters); inaccessible
anp: 2K), plus one local ⟨e aᵀ⟩ per layer (as BP's weight gradient); memory: the clean inputs of
every layer (anp: also its clean outputs). Under bf16 autocast the noise is drawn in float32 and
rounded to the output's dtype and every update is formed in float32. A ``torch.compile``'d model
is refused with one clear error (pass the uncompiled module).

**Inaccessible noise** (``anp`` only): hardware noise cannot be read out. Then every pass is
noisy and the rule learns from pairs of noisy passes, δa = ã⁽²⁾ − ã⁽¹⁾ and δL = L⁽²⁾ − L⁽¹⁾, with
the layer input of the first pass of the pair. This is enforced structurally: the noise is drawn
by an :class:`_Injector` that keeps nothing, and the rule reads only recorded activities, losses
and (for loose parameters) the perturbed values.

Decorrelated layers (a = W R x) are trained through their effective weight W R: the update
⟨e xᵀ⟩ for W R becomes ⟨e xᵀ⟩ Rᵀ = ⟨e zᵀ⟩ for W, i.e. the decorrelated input z = R x is used, as
in the paper. Their R learns from the first pass's input only.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..context import SINGLE_PROCESS, BatchShard, StepContext
from ..errors import UserError
from ..layers import bias_of, find_layers, is_wrapper, loose_parameters, weight_grad, weight_of
from ..layers.runtime import eval_mode
from ..options import opt, positive
from ..schema import Options
from .base import (
    LearningRule,
    StepOutput,
    accumulate_grad,
    register_options,
    register_rule,
    register_shorthand,
)

NOISES = ("gaussian", "bernoulli", "centred-bernoulli")

Sampler = Callable[[tuple[int, ...], torch.Generator | None, torch.device, torch.dtype], Tensor]


# ----------------------------------------------------------------------------- noise sources


def gaussian(shape, generator, device, dtype) -> Tensor:
    """N(0, 1): zero mean, unit variance."""
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def bernoulli(shape, generator, device, dtype) -> Tensor:
    """{0, 1} with p = ½ (not zero-mean: the estimate is biased; offered for hardware studies)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return (u < 0.5).to(dtype)


def centred_bernoulli(shape, generator, device, dtype) -> Tensor:
    """{−1, +1} with p = ½: zero mean, unit variance, like the Gaussian."""
    return 2 * bernoulli(shape, generator, device, dtype) - 1


class RecordedNoise:
    """Noise replayed from a recorded trace (e.g. measured on hardware), in order, cycling.

    ``trace`` is any tensor; its values are read flat, scaled by σ like the other sources.
    """

    def __init__(self, trace: Tensor) -> None:
        self.trace = trace.detach().flatten()
        if self.trace.numel() == 0:
            raise UserError("a recorded noise trace must not be empty")
        self.position = 0

    def __call__(self, shape, generator, device, dtype) -> Tensor:
        n = int(torch.Size(shape).numel())
        idx = (torch.arange(n) + self.position) % self.trace.numel()
        self.position = (self.position + n) % self.trace.numel()
        return self.trace[idx].to(device=device, dtype=dtype).reshape(shape)


SOURCES: dict[str, Sampler] = {
    "gaussian": gaussian,
    "bernoulli": bernoulli,
    "centred-bernoulli": centred_bernoulli,
}


TRACE_SUFFIXES = (".pt", ".npy", ".txt", ".csv")


def load_trace(path: Path) -> Tensor:
    """The values of a recorded noise trace file (.pt: a tensor; .npy; .txt/.csv: numbers)."""
    try:
        if path.suffix == ".pt":
            trace = torch.load(path, map_location="cpu", weights_only=True)
        else:
            import numpy as np

            array = (
                np.load(path)
                if path.suffix == ".npy"
                else np.loadtxt(path, delimiter=None if path.suffix == ".txt" else ",")
            )
            trace = torch.from_numpy(np.asarray(array, dtype=np.float64))
    except Exception as exc:  # any unreadable file is the user's to fix
        from ..checkpoint import describe_load_error

        raise UserError(f"cannot read the noise trace {path}: {describe_load_error(exc)}") from None
    if not isinstance(trace, Tensor):
        raise UserError(f"the noise trace {path} must hold one tensor, got {type(trace).__name__}")
    return trace


_IMPORT_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_import_spec(spec: Any) -> bool:
    """Whether ``spec`` has the form ``module:function`` (a user sampler to import)."""
    return isinstance(spec, str) and bool(_IMPORT_SPEC.match(spec)) and spec not in SOURCES


def resolve_noise_spec(spec: str | Sampler, load: bool = False) -> Sampler | None:
    """Check (and with ``load``, build) a noise source given by name, file or import path.

    ``spec`` is a name from :data:`NOISES`, a recorded trace file (:data:`TRACE_SUFFIXES`,
    replayed by :class:`RecordedNoise`), ``module:function`` naming a sampler
    ``(shape, generator, device, dtype) -> Tensor``, or already a callable. Without ``load``
    only the form is checked: nothing is imported or read, so validating a config (one read
    from a checkpoint included) never runs code. With ``load`` a sampler is imported and its
    signature checked (what it returns is checked at every draw).
    """
    if callable(spec):
        return _checked_signature(spec, getattr(spec, "__name__", repr(spec))) if load else spec
    if spec in SOURCES:
        return SOURCES[spec]
    path = Path(spec)
    if path.suffix in TRACE_SUFFIXES:
        if not path.is_file():
            raise UserError(f"noise trace file {spec} not found")
        return RecordedNoise(load_trace(path)) if load else None
    if ":" in spec:
        if not is_import_spec(spec):
            raise UserError(f"the noise sampler {spec!r} must be written module:function")
        if not load:
            return None
        module_name, _, attr = spec.partition(":")
        try:
            sampler = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"cannot import the noise sampler {spec}: {exc}") from None
        except Exception as exc:  # the module itself failed while importing
            raise UserError(
                f"importing the noise sampler {spec} failed: {type(exc).__name__}: {exc}"
            ) from None
        if not callable(sampler):
            raise UserError(f"the noise sampler {spec} is not callable")
        return _checked_signature(sampler, spec)
    raise UserError(f"unknown noise {spec!r}")


def _checked_signature(sampler: Sampler, name: str) -> Sampler:
    """``sampler``, if it can be called as ``sampler(shape, generator, device, dtype)``."""
    if sampler in SOURCES.values() or isinstance(sampler, RecordedNoise):
        return sampler
    try:
        signature = inspect.signature(sampler)
    except (TypeError, ValueError):  # builtins without a signature: checked at each draw
        return sampler
    try:
        signature.bind(None, None, None, None)
    except TypeError as exc:
        raise UserError(
            f"the noise sampler {name} must take (shape, generator, device, dtype); "
            f"its signature is {name.split(':')[-1]}{signature} ({exc})"
        ) from None
    return sampler


def _check_draw(eps: Any, shape: tuple[int, ...], name: str) -> None:
    if not isinstance(eps, Tensor):
        raise UserError(
            f"the noise sampler {name} must return a torch.Tensor, got {type(eps).__name__}"
        )
    if tuple(eps.shape) != tuple(shape):
        raise UserError(
            f"the noise sampler {name} returned shape {tuple(eps.shape)} when asked for {shape}"
        )


def noise_source(noise: str | Sampler) -> Sampler:
    """A sampler by name (:data:`NOISES`), trace file, ``module:function``, or a callable."""
    try:
        sampler = resolve_noise_spec(noise, load=True)
    except UserError as exc:
        if isinstance(noise, str) and str(exc).startswith("unknown noise"):
            raise UserError(f"{exc}; choose one of: {', '.join(NOISES)}") from None
        raise
    assert sampler is not None
    return sampler


# ----------------------------------------------------------------------------- the passes


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype updates are formed in: float32 for half/bfloat16 outputs, else the dtype."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


class _Injector:
    """Draws the σ·noise added to one layer output or one loose parameter.

    :meth:`draw` returns the noise and a token to read it back with :meth:`noise`. When ``keep``
    is false (inaccessible noise) the token is None: the values are added and forgotten.
    Otherwise the built-in sources are replayed from the generator state saved before the draw
    (a few bytes instead of a tensor the size of the layer's output per pass, which would make
    node perturbation hold more memory than backprop's saved activations); user samplers and
    recorded traces, which may not be replayable, are kept. Noise is drawn in float32 (or the
    output's dtype, if wider) and rounded to the output's dtype: the same values under bf16
    autocast as without it. ``shard`` (the step context's, under torch.distributed): a layer
    output that is this rank's part of the global batch gets its rows of the noise drawn for
    the whole global batch.
    """

    def __init__(
        self,
        sampler: Sampler,
        sigma: float,
        generator: torch.Generator | None,
        name: str = "",
        keep: bool = True,
        shard: BatchShard | None = None,
    ) -> None:
        self.sampler, self.sigma, self.generator = sampler, sigma, generator
        self.name = name
        self.builtin = sampler in SOURCES.values()
        self.keep = keep
        self.replay = generator is not None and self.builtin
        self.shard = shard

    def _draw(
        self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, batch: bool
    ) -> Tensor:
        shard = self.shard
        if not batch or shard is None or shard.rows(shape[0]) is None:
            return self.sigma * self._sample(shape, device, dtype)
        # One rank of several: draw for the global batch, as a single process would, and keep
        # this rank's rows, so every sample gets its own noise and the run equals the 1-process one.
        full = self._sample((shard.total, *shape[1:]), device, dtype)
        return self.sigma * full[shard.offset : shard.offset + shard.size]

    def _sample(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        if self.builtin:
            return self.sampler(shape, self.generator, device, dtype)
        # A user's sampler: its signature was checked at set-up; what it returns is checked at
        # every draw (no trial call at set-up: a sampler may keep state or wait on something).
        try:
            eps = self.sampler(shape, self.generator, device, dtype)
        except Exception as exc:
            raise UserError(
                f"the noise sampler {self.name} failed when called as (shape={shape}, "
                f"generator, device={device}, dtype={dtype}): {type(exc).__name__}: {exc}"
            ) from None
        _check_draw(eps, shape, self.name)
        return eps

    def draw(self, like: Tensor, batch: bool = True) -> tuple[Tensor, Any]:
        """σ·noise shaped like ``like`` in its dtype, and the token to read it back (or None).

        ``batch``: dim 0 of ``like`` holds the samples (a layer output; with a shard drawn for
        the global batch), not a parameter."""
        shape, device, dtype = tuple(like.shape), like.device, like.dtype
        token: Any = None
        if self.keep and self.replay:
            assert self.generator is not None
            token = (self.generator.get_state(), shape, device, dtype, batch)
        eps = self._draw(shape, device, _acc_dtype(dtype), batch).to(dtype)
        if self.keep and not self.replay:
            token = eps
        return eps, token

    def noise(self, token: Any) -> Tensor:
        """The noise a :meth:`draw` returned, from its token."""
        if isinstance(token, Tensor):
            return token
        state, shape, device, dtype, batch = token
        assert self.generator is not None
        now = self.generator.get_state()
        self.generator.set_state(state)
        try:
            return self._draw(shape, device, _acc_dtype(dtype), batch).to(dtype)
        finally:
            self.generator.set_state(now)


class _GlobalRNG:
    """The global random state that dropout and other random modules draw from: the CPU
    generator, and the generator of every CUDA device the model or the batch lives on."""

    def __init__(self, devices: set[torch.device]) -> None:
        self.cuda = sorted(
            {d.index if d.index is not None else torch.cuda.current_device()
             for d in devices if d.type == "cuda"}
        )  # fmt: skip

    def get(self) -> tuple[Tensor, list[Tensor]]:
        return torch.get_rng_state(), [torch.cuda.get_rng_state(i) for i in self.cuda]

    def set(self, state: tuple[Tensor, list[Tensor]]) -> None:
        torch.set_rng_state(state[0])
        for i, s in zip(self.cuda, state[1], strict=True):
            torch.cuda.set_rng_state(s, i)


@dataclass
class _Pass:
    """What one forward pass does at the layers (indices into the rule's layers / loose
    parameters)."""

    #: layers whose outputs get noise, and loose parameters that do
    noisy: frozenset[int] = frozenset()
    loose: frozenset[int] = frozenset()
    #: record every call's input (the clean pass; the first pass of an inaccessible pair)
    inputs: bool = False
    #: keep a copy of every call's output and of the perturbed loose parameters (the
    #: reference a later pass measures its change δa against)
    outputs: bool = False
    #: a former pass whose outputs this one measures δa = out − reference against
    against: _Record | None = None
    #: δa may overwrite the reference (its last use)
    consume: bool = False
    #: accumulate the per-sample squared norm of the "noise" or of the "delta"
    norms: str | None = None


@dataclass
class _Record:
    """What one forward pass left: per-sample losses [B] (in the update dtype), the raw model
    output, and per layer index one entry per call of that layer."""

    spec: _Pass
    losses: Tensor | None = None
    raw: Any = None
    order: list[int] = field(default_factory=list)
    inputs: dict[int, list[Tensor]] = field(default_factory=dict)
    versions: dict[int, list[int]] = field(default_factory=dict)
    outputs: dict[int, list[Tensor]] = field(default_factory=dict)
    deltas: dict[int, list[Tensor]] = field(default_factory=dict)
    tokens: dict[int, list[Any]] = field(default_factory=dict)
    loose_tokens: dict[int, Any] = field(default_factory=dict)
    loose_values: dict[int, Tensor] = field(default_factory=dict)
    loose_deltas: dict[int, Tensor] = field(default_factory=dict)
    #: per-sample Σ‖·‖² of what ``spec.norms`` names, and the perturbed units per sample
    sq: Tensor | float = 0.0
    units: int = 0

    def add_norm(self, t: Tensor, per_sample: bool = True) -> None:
        t = t.to(_acc_dtype(t.dtype))
        self.sq = self.sq + (
            t.reshape(t.shape[0], -1).pow(2).sum(1) if per_sample else t.pow(2).sum()
        )


class _Passes:
    """Runs the forward passes of one step with the same batch, under ``torch.no_grad()``.

    A forward hook on every layer (:func:`~decorrelate.layers.find_layers` with norms) sees
    each call in forward-call order, whatever the module order, and a layer called k times
    (a shared cell) has k calls, each perturbed independently. Every pass starts from the same
    global random state, so dropout draws the same mask in every pass. Buffers that the first
    pass changed (BatchNorm's running statistics) are put back to their values after it once the
    later passes are done: they are updated once per step, from the first pass. Loose
    parameters are perturbed in place and restored exactly after each pass.
    """

    def __init__(
        self,
        model: nn.Module,
        x: Any,
        y: Tensor,
        loss: Any,
        layers: list[tuple[str, nn.Module]],
        loose: list[tuple[str, Tensor]],
        injector: _Injector,
        ctx: StepContext = SINGLE_PROCESS,
    ) -> None:
        self.model, self.x, self.y, self.loss = model, x, y, loss
        self.layers, self.loose, self.injector = layers, loose, injector
        self.ctx = ctx
        self.batch = _batch_size(x)
        self.record: _Record | None = None
        self.sequence: list[int] | None = None
        self.observe: dict[int, Tensor] = {}
        devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
        if isinstance(x, Tensor):
            devices.add(x.device)
        self.rng = _GlobalRNG(devices)
        self.start = self.rng.get()
        self.after: tuple[Tensor, list[Tensor]] | None = None
        self.buffers = {n: (id(b), b._version) for n, b in model.named_buffers()}
        self.changed: dict[str, Tensor] = {}
        self.clean_loose = [p.detach().clone() for _, p in loose]
        self.handles = [
            module.register_forward_hook(self._hook(i), with_kwargs=True)
            for i, (_, module) in enumerate(layers)
        ]

    # -------------------------------------------------------------- one pass
    def run(self, spec: _Pass) -> _Record:
        rec = self.record = _Record(spec)
        if self.after is not None:
            self.rng.set(self.start)
        try:
            for j in sorted(spec.loose):
                self._perturb_loose(rec, j)
            raw = self.model(self.x)
            losses = self.ctx.scaled(self.loss(raw, self.y, reduction="none"))
        finally:
            for j in spec.loose:
                self.loose[j][1].copy_(self.clean_loose[j])
            self.record = None
        if not isinstance(losses, Tensor) or tuple(losses.shape) != (self.batch,):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise UserError(
                f"node perturbation needs one loss per sample: the loss with reduction='none' "
                f"gave {shape} for a batch of {self.batch}"
            )
        rec.losses, rec.raw = losses.to(_acc_dtype(losses.dtype)), raw
        if self.sequence is None:
            self.sequence = rec.order
            self.after = self.rng.get()
            # normalisation layers update their running statistics inside the kernel (the
            # version counter does not see it); other modules' in-place updates it does
            norms = {
                f"{m_name}.{b_name}" if m_name else b_name
                for m_name, m in self.model.named_modules()
                if isinstance(m, nn.modules.batchnorm._NormBase) and m.training
                for b_name, _ in m.named_buffers(recurse=False)
            }
            for name, b in self.model.named_buffers():
                if name in norms or self.buffers.get(name) != (id(b), b._version):
                    self.changed[name] = b.clone()
        elif rec.order != self.sequence:
            raise UserError(
                "the model called its layers in another order or number in a noisy pass than "
                "in the first pass; node perturbation needs the same computation in every pass "
                "(no control flow that depends on the values)"
            )
        return rec

    def _perturb_loose(self, rec: _Record, j: int) -> None:
        p = self.loose[j][1]
        eps, token = self.injector.draw(p.detach(), batch=False)
        p.add_(eps)
        rec.units += p.numel()
        if token is not None:
            rec.loose_tokens[j] = token
        if rec.spec.norms == "noise":
            rec.add_norm(eps, per_sample=False)
        if rec.spec.outputs:
            rec.loose_values[j] = p.detach().clone()
        if rec.spec.against is not None:
            ref = rec.spec.against.loose_values.get(j, self.clean_loose[j])
            rec.loose_deltas[j] = delta = p.detach() - ref  # the measured change
            if rec.spec.norms == "delta":
                rec.add_norm(delta, per_sample=False)

    def _hook(self, index: int) -> Callable[..., Tensor | None]:
        name, module = self.layers[index]
        wrapper = is_wrapper(module)

        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Tensor | None:
            rec = self.record
            if rec is None:  # the model called outside our passes (should not happen)
                return None
            spec = rec.spec
            rec.order.append(index)
            if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != self.batch:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise _NotPerSample(
                    name,
                    f"layer {name} returned {shape}, whose dim 0 is not the batch "
                    f"({self.batch}); node perturbation needs every layer's output to hold the "
                    "samples in dim 0 (e.g. batch_first=True)",
                )
            if spec.inputs:
                a = args[0] if args else next(iter(kwargs.values()))
                rec.inputs.setdefault(index, []).append(a)
                rec.versions.setdefault(index, []).append(a._version)
                if wrapper and self.after is None and index not in self.observe:
                    self.observe[index] = a
            changed = None
            if index in spec.noisy:
                eps, token = self.injector.draw(out)
                if token is not None:
                    rec.tokens.setdefault(index, []).append(token)
                if spec.norms == "noise":
                    rec.add_norm(eps)
                rec.units += out[0].numel()
                out = changed = out + eps
            if spec.outputs:
                rec.outputs.setdefault(index, []).append(out.clone())
            if spec.against is not None:
                refs = spec.against.outputs.get(index, [])
                deltas = rec.deltas.setdefault(index, [])
                if len(deltas) >= len(refs) or refs[len(deltas)].shape != out.shape:
                    raise UserError(
                        f"layer {name} was called differently in two passes; node perturbation "
                        "needs the same computation in every pass"
                    )
                ref = refs[len(deltas)]
                delta = torch.sub(out, ref, out=ref) if spec.consume else out - ref
                deltas.append(delta)
                if spec.norms == "delta":
                    rec.add_norm(delta)
            return changed

        return hook

    # -------------------------------------------------------------- after the passes
    def finish(self) -> None:
        """The passes are done: show each decorrelator its input from the first pass."""
        for index, a in self.observe.items():
            self.layers[index][1].observe(a)
        self.observe.clear()

    def close(self) -> None:
        """Remove the hooks; put back the buffers the first pass left and the global random
        state after it (as if the model had run one forward pass)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        with torch.no_grad():
            for name, value in self.changed.items():
                self.model.get_buffer(name).copy_(value)
        self.changed = {}
        if self.after is not None:
            self.rng.set(self.after)

    def inputs_of(self, rec: _Record, index: int) -> list[Tensor]:
        """The recorded inputs of layer ``index``, released from ``rec``; refused if one was
        changed in place after the layer read it."""
        inputs = rec.inputs.pop(index, [])
        versions = rec.versions.pop(index, [])
        for a, v in zip(inputs, versions, strict=True):
            if a._version != v:
                raise UserError(
                    f"the input of layer {self.layers[index][0]} was changed in place after the "
                    "layer read it (an in-place op such as x += ... or ReLU(inplace=True) on "
                    "it); node perturbation needs it unchanged: make that op out-of-place"
                )
        return inputs

    def write(self, index: int, inputs: list[Tensor], errors: list[Tensor]) -> None:
        """``.grad`` += Σ over calls of ⟨e aᵀ⟩ (weight) and Σ e (bias) of layer ``index``;
        ``errors`` already carry the 1/B of the batch mean."""
        if not errors:
            return
        module = self.layers[index][1]
        with _no_autocast():
            gw, gb = weight_grad(module, inputs, errors)
        accumulate_grad(weight_of(module), gw)
        if gb is not None:
            accumulate_grad(bias_of(module), gb)

    def write_loose(self, j: int, grad: Tensor) -> None:
        accumulate_grad(self.loose[j][1], grad)


def _batch_size(x: Any) -> int:
    """Samples in the batch: dim 0 of the input (of its first tensor, for a dict or tuple)."""
    if isinstance(x, Tensor):
        return int(x.shape[0])
    values = x.values() if isinstance(x, dict) else x if isinstance(x, list | tuple) else ()
    for v in values:
        if isinstance(v, Tensor):
            return int(v.shape[0])
    raise UserError(f"node perturbation needs a tensor batch, got {type(x).__name__}")


@contextmanager
def _no_autocast() -> Iterator[None]:
    """Updates are formed outside autocast: in float32 (or wider), never in bf16."""
    with torch.autocast("cpu", enabled=False):
        if torch.cuda.is_available():
            with torch.autocast("cuda", enabled=False):
                yield
        else:
            yield


def _per_sample(s: Tensor, like: Tensor) -> Tensor:
    """The per-sample factor [B] shaped to broadcast over ``like`` [B, ...]."""
    return s.reshape(-1, *[1] * (like.dim() - 1))


def refuse_compiled(model: nn.Module) -> None:
    """One clear error for a ``torch.compile``'d model (or submodule). (Compiling the rule's
    ``backward`` itself works: dynamo runs the hook-driven passes eagerly, through graph
    breaks.)"""
    for name, module in model.named_modules():
        if "_orig_mod" in module._modules:
            raise UserError(
                f"node perturbation cannot train a torch.compile'd module "
                f"({name or 'the model'}): it runs its own forward passes with hooks on every "
                "layer and replays the random state between them, which compiled code does not "
                "follow; pass the module itself (the compiled one's ._orig_mod, whose layers "
                "and parameters are the same)"
            )


class _NotPerSample(Exception):
    """A layer's output did not hold the batch in dim 0 (raised from inside a pass)."""

    def __init__(self, layer: str, message: str) -> None:
        super().__init__(message)
        self.layer, self.message = layer, message


def _shared_layers(
    model: nn.Module, layers: list[tuple[str, nn.Module]], x: Tensor
) -> list[tuple[str, tuple[int, ...]]]:
    """The layers (name, output shape) whose output does not depend on the batch size, found
    from forwards of the first 1 and 2 samples of ``x`` (which holds at least 2: the caller
    checks), in eval mode, without a graph; the global random state and every module's mode are
    put back."""
    seen: dict[str, list[tuple[int, ...]]] = {}
    handles = []
    for name, module in layers:

        def hook(mod, args, out, name=name):
            if isinstance(out, Tensor):
                seen.setdefault(name, []).append(tuple(out.shape))

        handles.append(module.register_forward_hook(hook))
    cpu_rng = torch.get_rng_state()
    try:
        with eval_mode(model), torch.no_grad():
            for n in (1, 2):
                model(x[:n])
    finally:
        for h in handles:
            h.remove()
        torch.set_rng_state(cpu_rng)
    shared = []
    for name, shapes in seen.items():
        half = len(shapes) // 2
        pairs = zip(shapes[:half], shapes[half:], strict=True)
        if half and all(a == b for a, b in pairs):  # the same with 1 and 2 samples
            shared.append((name, shapes[-1]))
    return shared


def _check_noise(value: Any) -> str | None:
    """Checks the form of a noise source; never imports (see
    :func:`decorrelate.config.code_references`)."""
    try:
        resolve_noise_spec(value)
    except UserError as exc:
        return f"{exc}; or one of: {', '.join(NOISES)}"
    return None


@register_options
@dataclass
class PerturbationOptions(Options):
    """The options of ``np``, ``inp`` and ``anp`` (fields of
    :class:`~decorrelate.config.TrainConfig`)."""

    np_sigma: float = opt(
        1e-3, "np/inp/anp: noise scale sigma", "float", check=positive, group="rule"
    )
    np_samples: int = opt(
        1,
        "np/inp/anp: noisy passes K per clean pass (per layer for inp)",
        "int",
        check=positive,
        group="rule",
    )
    np_noise: str = opt(
        "gaussian",
        "np/inp/anp: noise source: gaussian, bernoulli, centred-bernoulli, a recorded trace "
        "(FILE.pt/.npy/.txt, replayed in order, scaled by sigma) or a sampler "
        "module:function(shape, generator, device, dtype)",
        "str",
        check=_check_noise,
        group="rule",
        code=is_import_spec,
    )
    np_inaccessible: bool = opt(
        False,
        "anp: the noise cannot be read; learn from pairs of noisy passes, no clean pass",
        "bool",
        group="rule",
    )


#: Paper 2's decorrelated NP variants, as the authors' code runs them: the copi rule at
#: decorrelation learning rate 1e-3, with R learned from the whole batch (``decor_sample_frac``
#: 1.0; the default elsewhere is ⌊0.1·B⌋ + 1 samples, paper 1's choice). Each can be overridden.
DECORRELATED_VARIANTS = {"dnp": "np", "dinp": "inp", "danp": "anp"}
for _name, _rule in DECORRELATED_VARIANTS.items():
    register_shorthand(_name, _rule, {"decor": "copi", "decor_lr": 1e-3, "decor_sample_frac": 1.0})


class NodePerturbation(LearningRule):
    """Classic node perturbation (``np``); :class:`IterativeNP`, :class:`ActivityNP` refine it."""

    forward_only = True
    inaccessible_ok = False

    def __init__(
        self,
        sigma: float = 1e-3,
        samples: int = 1,
        noise: str | Sampler = "gaussian",
        inaccessible: bool = False,
    ) -> None:
        super().__init__()
        if not sigma > 0:
            raise UserError(f"node perturbation needs sigma > 0, got {sigma}")
        if int(samples) < 1:
            raise UserError(f"node perturbation needs at least 1 noisy sample, got {samples}")
        if inaccessible and not self.inaccessible_ok:
            raise UserError(
                f"{self.name or type(self).__name__} needs to read the injected noise; only anp "
                "can learn with inaccessible noise"
            )
        self.sigma, self.samples, self.inaccessible = float(sigma), int(samples), inaccessible
        self.sampler = noise_source(noise)
        self.noise_name = noise if isinstance(noise, str) else getattr(noise, "__name__", "noise")
        self.layers: list[tuple[str, nn.Module]] = []
        self.loose: list[tuple[str, Tensor]] = []
        self._found: tuple[int, ...] | None = None
        self._shared: set[str] = set()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if isinstance(self.sampler, RecordedNoise):  # where the replay of the trace stands
            state["trace_position"] = self.sampler.position
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if isinstance(self.sampler, RecordedNoise) and "trace_position" in state:
            self.sampler.position = int(state["trace_position"])

    @classmethod
    def from_config(cls, config: Any) -> NodePerturbation:
        return cls(
            sigma=config.np_sigma,
            samples=config.np_samples,
            noise=config.np_noise,
            inaccessible=config.np_inaccessible,
        )

    def attach(
        self,
        model: nn.Module,
        loss: Any,
        generator: torch.Generator | None = None,
        example: Tensor | None = None,
    ) -> None:
        super().attach(model, loss, generator)
        self._find(model)  # find_layers unrolls recurrent/attention modules

    def _find(self, model: nn.Module) -> None:
        """The layers and loose parameters, found again whenever the model's modules change
        (a compiled wrapper or submodule among them is refused then).

        Layers in ``_shared`` (outputs that do not depend on the batch, see
        :meth:`_learn_shared`) are trained like loose parameters (weight perturbation)."""
        key = tuple(map(id, model.modules()))
        if key == self._found:
            return
        refuse_compiled(model)
        layers = find_layers(model, norms=True)
        shared = self._shared
        self.layers = [(n, m) for n, m in layers if n not in shared]
        extra = [
            (f"{n}.{pn}", p)
            for n, m in layers
            if n in shared
            for pn, p in m.named_parameters()
            if p.requires_grad
        ]
        self.loose = loose_parameters(model) + extra
        self._found = key

    def _learn_shared(self, model: nn.Module, x: Any, name: str) -> bool:
        """Whether layer ``name``, whose output's dim 0 was not the batch, has an output that
        does not depend on the batch at all (a positional table looked up with [T] positions
        and broadcast over the samples): the same shape in forwards of 1 and 2 samples of
        ``x``. If so it has no per-sample node and is trained by weight perturbation from now
        on, with a warning. A layer whose output holds the batch elsewhere (sequence first)
        is not, and gets the error. Known gap: a table looked up with T positions where T equals
        the batch size passes the dim-0 check and is taken for per-sample rows."""
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] < 2:
            return False
        shared = dict(_shared_layers(model, find_layers(model, norms=True), x))
        if name not in shared:
            return False
        warnings.warn(
            "node perturbation: the output of "
            + ", ".join(f"{n} {shape}" for n, shape in shared.items())
            + " does not depend on the batch; its parameters are trained by weight "
            "perturbation, like parameters outside every layer",
            stacklevel=3,
        )
        self._shared |= set(shared)
        self._found = None
        self._find(model)
        return True

    def passes(self) -> int:
        """Forward passes per step: one clean and K noisy ones."""
        return 1 + self.samples

    # -------------------------------------------------------------- the step
    def backward(
        self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext = SINGLE_PROCESS
    ) -> StepOutput:
        self._find(model)  # cheap, and follows a model changed after attach
        if self.generator is None:  # the noise must not come from the replayed global state
            seed = int(torch.randint(0, 2**62, (1,)))
            device = x.device if isinstance(x, Tensor) else "cpu"
            self.generator = torch.Generator(device=device).manual_seed(seed)
        injector = _Injector(
            self.sampler,
            self.sigma,
            self.generator,
            self.noise_name,
            keep=not self.inaccessible,
            shard=ctx.shard,
        )
        for attempt in range(2):
            run = _Passes(model, x, y, self.loss, self.layers, self.loose, injector, ctx)
            try:
                with torch.no_grad():
                    losses, raw = self.learn(run)
                    run.finish()
                break
            except _NotPerSample as err:
                if attempt or not self._learn_shared(model, x, err.layer):
                    raise UserError(err.message) from None
                run.rng.set(run.start)  # the clean pass stopped at that layer: start again
            finally:
                run.close()
        return StepOutput(ctx.unscaled(losses.mean()).detach(), self.loss.select(raw).detach())

    def learn(self, run: _Passes) -> tuple[Tensor, Any]:
        """Run the passes and write ``.grad``; returns the first pass's losses and output."""
        clean = run.run(_Pass(inputs=True))
        every = frozenset(range(len(run.layers)))
        loose = frozenset(range(len(run.loose)))
        noisy = []
        for _ in range(self.samples):
            rec = run.run(_Pass(noisy=every, loose=loose))
            assert rec.losses is not None and clean.losses is not None
            noisy.append(((rec.losses - clean.losses) / self.sigma**2, rec))
        self.write_from_noise(run, clean, noisy)
        return clean.losses, clean.raw

    def write_from_noise(
        self, run: _Passes, clean: _Record, noisy: list[tuple[Tensor, _Record]]
    ) -> None:
        """Per-sample error e = s ⊙ ε of every perturbed call (ε replayed), averaged over the
        passes that perturbed it; then ⟨e aᵀ⟩ with the clean inputs, one layer at a time.
        A loose parameter (shared by every sample) gets the batch mean of s times its noise."""
        batch = run.batch
        for i in range(len(run.layers)):
            inputs = run.inputs_of(clean, i)
            mine = [(s, rec.tokens.pop(i, [])) for s, rec in noisy if i in rec.spec.noisy]
            errors: list[Tensor] = []
            for c in range(len(inputs)):
                total = None
                for s, tokens in mine:
                    eps = run.injector.noise(tokens[c])
                    e = eps.to(_acc_dtype(eps.dtype)) * _per_sample(s, eps)
                    total = e if total is None else total.add_(e)
                if total is not None:
                    errors.append(total.div_(len(mine) * batch))
            run.write(i, inputs, errors)
        for j in range(len(run.loose)):
            mine_l = [(s, rec.loose_tokens[j]) for s, rec in noisy if j in rec.spec.loose]
            if mine_l:
                g = sum(s.mean() * run.injector.noise(t).to(s.dtype) for s, t in mine_l)
                run.write_loose(j, g / len(mine_l))


register_rule("np")(NodePerturbation)


@register_rule("inp")
class IterativeNP(NodePerturbation):
    """Iterative NP: K noisy passes per layer (all its calls), each perturbing that layer
    alone, then K per loose parameter; e = N_l · δL_l / ‖ε_l‖² · ε_l."""

    def passes(self) -> int:
        return 1 + self.samples * (len(self.layers) + len(self.loose))

    def learn(self, run: _Passes) -> tuple[Tensor, Any]:
        clean = run.run(_Pass(inputs=True))
        assert run.sequence is not None and clean.losses is not None
        groups = [_Pass(noisy=frozenset([i]), norms="noise") for i in dict.fromkeys(run.sequence)]
        groups += [_Pass(loose=frozenset([j]), norms="noise") for j in range(len(run.loose))]
        noisy = []
        for spec in groups:
            for _ in range(self.samples):
                rec = run.run(spec)
                assert rec.losses is not None
                noisy.append((rec.units * (rec.losses - clean.losses) / rec.sq, rec))
        self.write_from_noise(run, clean, noisy)
        return clean.losses, clean.raw


@register_rule("anp")
class ActivityNP(NodePerturbation):
    """Activity-based NP: the measured change δa of every perturbed output, normalised jointly:
    e = N · δL / ‖δa‖² · δa (N: perturbed units per sample, loose parameters included).

    With ``inaccessible=True`` it learns from pairs of noisy passes without reading the noise.
    """

    inaccessible_ok = True

    def passes(self) -> int:
        return 2 * self.samples if self.inaccessible else 1 + self.samples

    def learn(self, run: _Passes) -> tuple[Tensor, Any]:
        every = frozenset(range(len(run.layers)))
        loose = frozenset(range(len(run.loose)))
        k, batch = self.samples, run.batch
        if self.inaccessible:  # K pairs of noisy passes, no clean pass
            first: tuple[Tensor, Any] | None = None
            grads: dict[int, Tensor] = {}
            for _ in range(k):
                a = run.run(_Pass(noisy=every, loose=loose, inputs=True, outputs=True))
                if first is None:
                    first = (a.losses, a.raw)
                b = run.run(_Pass(every, loose, against=a, consume=True, norms="delta"))
                s = b.units * (b.losses - a.losses) / b.sq / (k * batch)
                for i in range(len(run.layers)):
                    d = b.deltas.pop(i, [])
                    run.write(
                        i, run.inputs_of(a, i), [x.to(s.dtype).mul_(_per_sample(s, x)) for x in d]
                    )
                for j, d in b.loose_deltas.items():
                    g = s.sum() * d.to(s.dtype)
                    grads[j] = g if j not in grads else grads[j] + g
                a.outputs.clear()
            for j, g in grads.items():
                run.write_loose(j, g)
            assert first is not None
            return first
        clean = run.run(_Pass(inputs=True, outputs=True))
        errors: dict[int, list[Tensor]] = {}
        grads = {}
        for n in range(k):
            rec = run.run(_Pass(every, loose, against=clean, consume=n == k - 1, norms="delta"))
            s = rec.units * (rec.losses - clean.losses) / rec.sq / (k * batch)
            for i, ds in rec.deltas.items():
                es = [d.to(s.dtype).mul_(_per_sample(s, d)) for d in ds]
                old = errors.get(i)
                errors[i] = es if old is None else [o.add_(e) for o, e in zip(old, es, strict=True)]
            for j, d in rec.loose_deltas.items():
                g = s.sum() * d.to(s.dtype)
                grads[j] = g if j not in grads else grads[j] + g
        clean.outputs.clear()
        for i in range(len(run.layers)):
            run.write(i, run.inputs_of(clean, i), errors.pop(i, []))
        for j, g in grads.items():
            run.write_loose(j, g)
        return clean.losses, clean.raw
