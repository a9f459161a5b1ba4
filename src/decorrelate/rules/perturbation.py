"""Node perturbation: learning from forward passes only (Dalm, van Gerven & Ahmad).

Noise ε_l is added to the pre-activation (the output) of every trained layer; the change of each
sample's loss δL tells how well the noise direction agreed with the gradient. Each rule turns this
into a per-sample error e_l at every layer and writes ``W.grad = ⟨e_l x_{l−1}ᵀ⟩`` (conv: the same
with the layer's own input patches) and ``b.grad = ⟨e_l⟩``, always with the *clean* layer input:

=====  ==================================  ===========================================
rule   noisy passes per clean pass         e_l
=====  ==================================  ===========================================
np     K (all layers at once)              (δL / σ²) · ε_l
inp    K per layer (one layer at a time)   N_l · (δL_l / ‖ε_l‖²) · ε_l
anp    K (all layers at once)              N · (δL / ‖δa‖²) · δa_l,  δa = measured change
=====  ==================================  ===========================================

averaged over the K resamples. Everything runs under ``torch.no_grad()``: the clean and all noisy
copies of the batch go through **one** batched forward call (rows ``[copy, sample]``), hooks on
the layers add the noise to the noisy rows and record what the rule needs, and no autograd graph
is ever built.

**Inaccessible noise** (``anp`` only): hardware noise cannot be read out. Then every pass is
noisy and the rule learns from pairs of noisy passes, δa = ã⁽¹⁾ − ã⁽²⁾ and δL = L⁽¹⁾ − L⁽²⁾, with
the layer input of the first pass. This is enforced structurally: the noise is added by an
:class:`_Injector` that keeps nothing, and the rule reads only recorded activities and losses.

Decorrelated layers (a = W R x) are trained through their effective weight W R: the update
⟨e xᵀ⟩ for W R becomes ⟨e xᵀ⟩ Rᵀ = ⟨e zᵀ⟩ for W, i.e. the decorrelated input z = R x is used, as
in the paper. Their R learns from the clean rows only.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import current_shard
from ..errors import UserError
from .base import LearningRule, StepOutput, register_rule
from .layers import accumulate_grad, inner_layer, local_weight_grad, trainable_layers

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


# ----------------------------------------------------------------------------- the forward pass


class _Injector:
    """Adds σ·noise to chosen copies of a layer's output during the batched forward.

    ``plan[layer_index]`` lists the copies whose rows get noise at that layer. When ``keep`` is
    false (inaccessible noise) the values are added and forgotten. Otherwise the rule reads them
    back with :meth:`noise`: the built-in sources are replayed from the generator state saved
    before the draw (a few bytes instead of a [K, B, ...] tensor per layer, which would make
    node perturbation hold more memory than backprop's saved activations); user samplers and
    recorded traces, which may not be replayable, are kept.
    """

    def __init__(
        self, sampler: Sampler, sigma: float, generator: torch.Generator | None, name: str = ""
    ) -> None:
        self.sampler, self.sigma, self.generator = sampler, sigma, generator
        self.name = name
        self.builtin = sampler in SOURCES.values()
        self.keep = True
        self.replay = generator is not None and self.builtin
        self.kept: dict[int, Tensor] = {}
        self.draws: dict[int, tuple[Tensor, tuple[int, ...], torch.device, torch.dtype]] = {}

    def _draw(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        shard = current_shard()
        if shard is None or shape[1] != shard.size or shard.total == shard.size:
            return self.sigma * self._sample(shape, device, dtype)
        # One rank of several: draw for the global batch, as a single process would, and keep
        # this rank's rows, so every sample gets its own noise and the run equals the 1-process one.
        full = self._sample((shape[0], shard.total, *shape[2:]), device, dtype)
        return self.sigma * full[:, shard.offset : shard.offset + shard.size]

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

    def add(self, index: int, out: Tensor, copies: list[int], batch: int) -> Tensor:
        if not copies:
            return out
        out = out.contiguous()  # a no-op for layer outputs; guarantees `view` aliases `out`
        view = out.view(-1, batch, *out.shape[1:])
        shape = (len(copies), batch, *out.shape[1:])
        if self.keep and self.replay:
            assert self.generator is not None
            self.draws[index] = (self.generator.get_state(), shape, out.device, out.dtype)
        eps = self._draw(shape, out.device, out.dtype)
        view[copies] += eps
        if self.keep and not self.replay:
            self.kept[index] = eps
        return out

    def noise(self, index: int) -> Tensor:
        """The σ·noise added at layer ``index`` (released: each layer's is read once)."""
        if index in self.kept:
            return self.kept.pop(index)
        state, shape, device, dtype = self.draws.pop(index)
        assert self.generator is not None
        now = self.generator.get_state()
        self.generator.set_state(state)
        try:
            return self._draw(shape, device, dtype)
        finally:
            self.generator.set_state(now)


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
        self.layers = trainable_layers(model)

    # -------------------------------------------------------------- schedule of copies
    def plan(self) -> tuple[int, list[list[int]]]:
        """Number of copies, and for every layer the copies whose output gets noise.

        Copy 0 is the clean pass; copies 1..K are noisy everywhere.
        """
        k = self.samples
        return 1 + k, [list(range(1, 1 + k)) for _ in self.layers]

    # -------------------------------------------------------------- one batched forward
    def _forward(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        copies: int,
        noisy: list[list[int]],
        injector: _Injector,
        record_inputs: slice,
    ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        """Run all copies at once. Returns per-copy losses [copies, B], the output rows of copy 0,
        the layer inputs of the copies ``record_inputs`` ([P, B, ...], or [1, B, ...] where
        every copy still shares it) and what :meth:`activity_delta` keeps of every layer's
        outputs.

        Copies only differ from the first noise injection on, so the batch enters the model
        once (B rows) and is expanded into the ``copies`` row blocks at the first trained
        layer's output, where the noise first goes in. That saves the first layer's repeated
        work and memory, and its input is the batch itself (recorded without a copy).
        """
        batch = x.shape[0]
        inputs: list[Tensor] = []
        deltas: list[Tensor] = []
        handles = []

        def make_hooks(index: int, module: nn.Module) -> None:
            def pre(mod: nn.Module, args: tuple) -> None:
                inp = args[0]
                rows = inp.reshape(inp.shape[0] // batch, batch, *inp.shape[1:])
                # still shared by every copy: keep it as one block, or the chosen copies' rows
                # (a slice and a copy: faster than gathering rows by index)
                inputs.append(rows if rows.shape[0] == 1 else rows[record_inputs].clone())
                if _is_decorrelator(mod):
                    mod.observe(rows[0])  # R learns from the clean (or first) pass only

            def post(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
                if out.shape[0] == batch and copies > 1:  # where the copies part ways
                    out = out.repeat(copies, *([1] * (out.dim() - 1)))
                out = injector.add(index, out, noisy[index], batch)
                delta = self.activity_delta(out.reshape(copies, batch, *out.shape[1:]))
                if delta is not None:
                    deltas.append(delta)
                return out

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))

        for i, (_, module) in enumerate(self.layers):
            make_hooks(i, module)
        try:
            with torch.no_grad():
                out = self.loss.select(model(x))
                ys = y.repeat(copies, *[1] * (y.dim() - 1))
                losses = self.loss(out, ys, reduction="none").reshape(copies, batch)
        finally:
            for h in handles:
                h.remove()
        return losses, out.reshape(copies, batch, *out.shape[1:]), inputs, deltas

    def activity_delta(self, outputs: Tensor) -> Tensor | None:
        """What the rule keeps of a layer's outputs [copies, B, ...] (nothing: NP reads noise)."""
        return None

    # -------------------------------------------------------------- the rule
    def errors(self, losses: Tensor, injector: _Injector, deltas: list[Tensor]) -> Iterator[Tensor]:
        """Per-sample error of every layer in turn, averaged over the K resamples: [B, ...].

        A generator that releases each layer's noise once its error is formed, so that only
        one layer's error exists at a time."""
        delta = losses[1:] - losses[0]  # [K, B]
        for i in range(len(self.layers)):
            eps = injector.noise(i)  # [K, B, ...], ours to overwrite
            scale = (delta / self.sigma**2).reshape(*delta.shape, *[1] * (eps.dim() - 2))
            yield _mean_over_samples(eps.mul_(scale))

    def backward(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        copies, noisy = self.plan()
        injector = _Injector(self.sampler, self.sigma, self.generator, self.noise_name)
        injector.keep = not self.inaccessible
        record = slice(0, 1) if not self.inaccessible else slice(0, copies, 2)
        losses, out, inputs, deltas = self._forward(model, x, y, copies, noisy, injector, record)
        batch = x.shape[0]
        errors = self.errors(losses, injector, deltas)
        for i, ((_, module), e) in enumerate(zip(self.layers, errors, strict=True)):
            write_grads(module, e, inputs[i], batch)
            inputs[i] = None  # type: ignore[call-overload]  # free it before the next layer
        return StepOutput(losses[0].mean(), out[0])


def _mean_over_samples(e: Tensor) -> Tensor:
    """Mean over the K resamples of [K, B, ...]; a view, not a copy, when K = 1."""
    return e[0] if e.shape[0] == 1 else e.mean(0)


def _is_decorrelator(module: nn.Module) -> bool:
    """A decorrelated wrapper that can be shown the clean input to learn R from."""
    return hasattr(module, "observe") and hasattr(module, "fold")


def write_grads(module: nn.Module, e: Tensor, x_in: Tensor, batch: int) -> None:
    """``W.grad = ⟨e xᵀ⟩`` (conv: with the input patches) and ``b.grad = ⟨e⟩`` for one layer.

    ``e`` is [B, ...] (one error per sample) or [P, B, ...] (one per pass, inaccessible mode)
    with ``x_in`` [P, B, ...] or [1, B, ...] (an input every pass shares); either way the result
    is the mean over samples (and passes).
    """
    layer = inner_layer(module)
    if e.dim() == x_in.dim() - 1:  # one error per sample: x_in is [1, B, ...]
        e = e.unsqueeze(0)
    elif x_in.shape[0] == 1 < e.shape[0]:  # one shared input for P passes: average e first
        e = e.mean(0, keepdim=True)
    passes = x_in.shape[0]
    e = e.reshape(passes * batch, *e.shape[2:]) / (passes * batch)
    x_flat = x_in.reshape(passes * batch, *x_in.shape[2:])
    grad_w, grad_b = local_weight_grad(module, [x_flat], [e])
    accumulate_grad(layer.weight, grad_w)
    if layer.bias is not None:
        accumulate_grad(layer.bias, grad_b)


register_rule("np")(NodePerturbation)


@register_rule("inp")
class IterativeNP(NodePerturbation):
    """Iterative NP: K noisy passes per layer, each perturbing that layer alone."""

    def plan(self) -> tuple[int, list[list[int]]]:
        k, n = self.samples, len(self.layers)
        return 1 + n * k, [list(range(1 + i * k, 1 + (i + 1) * k)) for i in range(n)]

    def errors(self, losses: Tensor, injector: _Injector, deltas: list[Tensor]) -> Iterator[Tensor]:
        k = self.samples
        for i in range(len(self.layers)):
            eps = injector.noise(i)  # [K, B, ...]
            delta = losses[1 + i * k : 1 + (i + 1) * k] - losses[0]  # [K, B]
            flat = eps.reshape(*eps.shape[:2], -1)
            units = flat.shape[-1]
            scale = units * delta / flat.pow(2).sum(-1)
            yield _mean_over_samples(eps.mul_(scale.reshape(*delta.shape, *[1] * (eps.dim() - 2))))


@register_rule("anp")
class ActivityNP(NodePerturbation):
    """Activity-based NP: the measured change of every layer's pre-activation, normalised jointly.

    With ``inaccessible=True`` it learns from pairs of noisy passes without reading the noise.
    """

    inaccessible_ok = True

    def plan(self) -> tuple[int, list[list[int]]]:
        k = self.samples
        if self.inaccessible:  # K pairs of noisy passes, no clean pass
            return 2 * k, [list(range(2 * k)) for _ in self.layers]
        return 1 + k, [list(range(1, 1 + k)) for _ in self.layers]

    def activity_delta(self, outputs: Tensor) -> Tensor:
        """The measured change δa of a layer's outputs [copies, B, ...]: noisy − clean, or the
        difference within each pair of noisy passes (inaccessible noise). Only δa is kept, not
        the outputs themselves."""
        if self.inaccessible:
            return outputs[0::2] - outputs[1::2]  # [K, B, ...]
        return outputs[1:] - outputs[:1]

    def errors(self, losses: Tensor, injector: _Injector, deltas: list[Tensor]) -> Iterator[Tensor]:
        delta_l = losses[0::2] - losses[1::2] if self.inaccessible else losses[1:] - losses[0]
        sq = sum(d.reshape(*d.shape[:2], -1).pow(2).sum(-1) for d in deltas)  # [K, B]
        units = sum(d[0, 0].numel() for d in deltas)
        scale = units * delta_l / sq
        for i in range(len(deltas)):
            d, deltas[i] = deltas[i], None  # type: ignore[call-overload]
            e = d.mul_(scale.reshape(*scale.shape, *[1] * (d.dim() - 2)))  # [K, B, ...]
            yield e if self.inaccessible else _mean_over_samples(e)
