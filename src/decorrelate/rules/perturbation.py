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

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from .base import LearningRule, StepOutput, register_rule
from .layers import accumulate_grad, conv_padding, inner_layer, trainable_layers

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


def noise_source(noise: str | Sampler) -> Sampler:
    """A sampler by name (:data:`NOISES`), or a user callable ``(shape, gen, device, dtype)``."""
    if callable(noise):
        return noise
    try:
        return SOURCES[noise]
    except KeyError:
        raise UserError(f"unknown noise {noise!r}; choose one of: {', '.join(NOISES)}") from None


# ----------------------------------------------------------------------------- the forward pass


class _Injector:
    """Adds σ·noise to chosen copies of a layer's output during the batched forward.

    ``plan[layer_index]`` lists the copies whose rows get noise at that layer. When ``keep`` is
    false (inaccessible noise) the values are added and forgotten.
    """

    def __init__(self, sampler: Sampler, sigma: float, generator: torch.Generator | None) -> None:
        self.sampler, self.sigma, self.generator = sampler, sigma, generator
        self.keep = True
        self.kept: dict[int, Tensor] = {}

    def add(self, index: int, out: Tensor, copies: list[int], batch: int) -> Tensor:
        if not copies:
            return out
        out = out.contiguous()  # a no-op for layer outputs; guarantees `view` aliases `out`
        view = out.view(-1, batch, *out.shape[1:])
        shape = (len(copies), batch, *out.shape[1:])
        eps = self.sigma * self.sampler(shape, self.generator, out.device, out.dtype)
        view[copies] += eps
        if self.keep:
            self.kept[index] = eps
        return out


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
        self.layers: list[tuple[str, nn.Module]] = []

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
        record_inputs: list[int],
        record_outputs: bool,
    ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        """Run all copies at once. Returns per-copy losses [copies, B], the output rows of copy 0
        (or of the first recorded copy), the recorded layer inputs [len(record_inputs), B, ...]
        and, if asked, the layer outputs of every copy [copies, B, ...]."""
        batch = x.shape[0]
        inputs: list[Tensor] = []
        outputs: list[Tensor] = []
        handles = []

        def make_hooks(index: int, module: nn.Module) -> None:
            def pre(mod: nn.Module, args: tuple) -> None:
                rows = args[0].reshape(copies, batch, *args[0].shape[1:])
                inputs.append(rows[record_inputs])
                if _is_decorrelator(mod):
                    mod.observe(rows[0])  # R learns from the clean (or first) pass only

            def post(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
                out = injector.add(index, out, noisy[index], batch)
                if record_outputs:
                    outputs.append(out.reshape(copies, batch, *out.shape[1:]))
                return out

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))

        for i, (_, module) in enumerate(self.layers):
            make_hooks(i, module)
        try:
            with torch.no_grad():
                big_x = x.repeat(copies, *([1] * (x.dim() - 1)))
                out = model(big_x)
                losses = self.loss(out, y.repeat(copies), reduction="none").reshape(copies, batch)
        finally:
            for h in handles:
                h.remove()
        return losses, out.reshape(copies, batch, *out.shape[1:]), inputs, outputs

    # -------------------------------------------------------------- the rule
    def errors(self, losses: Tensor, injector: _Injector, outputs: list[Tensor]) -> list[Tensor]:
        """Per-sample error of every layer, averaged over the K resamples: [B, *layer output]."""
        delta = losses[1:] - losses[0]  # [K, B]
        out = []
        for i in range(len(self.layers)):
            eps = injector.kept[i]  # [K, B, ...]
            scale = (delta / self.sigma**2).reshape(*delta.shape, *[1] * (eps.dim() - 2))
            out.append((scale * eps).mean(0))
        return out

    def backward(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        copies, noisy = self.plan()
        injector = _Injector(self.sampler, self.sigma, self.generator)
        injector.keep = not self.inaccessible
        record = [0] if not self.inaccessible else list(range(0, copies, 2))
        losses, out, inputs, outputs = self._forward(
            model, x, y, copies, noisy, injector, record, record_outputs=self.needs_outputs
        )
        errors = self.errors(losses, injector, outputs)
        batch = x.shape[0]
        for (_, module), e, x_in in zip(self.layers, errors, inputs, strict=True):
            write_grads(module, e, x_in, batch)
        return StepOutput(losses[0].mean(), out[0])

    needs_outputs = False


def _is_decorrelator(module: nn.Module) -> bool:
    """A decorrelated wrapper that can be shown the clean input to learn R from."""
    return hasattr(module, "observe") and hasattr(module, "fold")


def write_grads(module: nn.Module, e: Tensor, x_in: Tensor, batch: int) -> None:
    """``W.grad = ⟨e xᵀ⟩`` (conv: with the input patches) and ``b.grad = ⟨e⟩`` for one layer.

    ``e`` is [B, ...] (one error per sample) or [P, B, ...] with ``x_in`` [P, B, ...] (one per
    pass, inaccessible mode); either way the result is the mean over samples (and passes).
    """
    layer = inner_layer(module)
    if e.dim() == x_in.dim() - 1:  # shared clean input: x_in is [1, B, ...]
        e = e.unsqueeze(0)
    passes = x_in.shape[0]
    e = e.reshape(passes * batch, *e.shape[2:]) / (passes * batch)
    x_flat = x_in.reshape(passes * batch, *x_in.shape[2:])
    if isinstance(layer, nn.Conv2d):
        grad_eff = torch.nn.grad.conv2d_weight(
            x_flat,
            layer.weight.shape,
            e,
            stride=layer.stride,
            padding=conv_padding(layer),
            dilation=layer.dilation,
            groups=layer.groups,
        )
        grad_b = e.sum(dim=(0, 2, 3))
        grad_w = module.weight_grad(grad_eff) if hasattr(module, "weight_grad") else grad_eff
    else:
        e2, x2 = e.reshape(-1, e.shape[-1]), x_flat.reshape(-1, x_flat.shape[-1])
        if hasattr(module, "weight_grad"):
            # ⟨e zᵀ⟩ with z = R x: rows·d² to decorrelate the inputs instead of out·d² to map
            # ⟨e xᵀ⟩ through Rᵀ (the classifier, out ≪ rows, takes the other order)
            r = module.R.to(x2.dtype)
            small_out = e2.shape[1] < x2.shape[0]
            grad_w = module.weight_grad(e2.T @ x2) if small_out else e2.T @ (x2 @ r.T)
        else:
            grad_w = e2.T @ x2
        grad_b = e2.sum(0)
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

    def errors(self, losses: Tensor, injector: _Injector, outputs: list[Tensor]) -> list[Tensor]:
        k = self.samples
        out = []
        for i in range(len(self.layers)):
            eps = injector.kept[i]  # [K, B, ...]
            delta = losses[1 + i * k : 1 + (i + 1) * k] - losses[0]  # [K, B]
            flat = eps.reshape(*eps.shape[:2], -1)
            units = flat.shape[-1]
            scale = units * delta / flat.pow(2).sum(-1)
            out.append((scale.reshape(*delta.shape, *[1] * (eps.dim() - 2)) * eps).mean(0))
        return out


@register_rule("anp")
class ActivityNP(NodePerturbation):
    """Activity-based NP: the measured change of every layer's pre-activation, normalised jointly.

    With ``inaccessible=True`` it learns from pairs of noisy passes without reading the noise.
    """

    inaccessible_ok = True
    needs_outputs = True

    def plan(self) -> tuple[int, list[list[int]]]:
        k = self.samples
        if self.inaccessible:  # K pairs of noisy passes, no clean pass
            return 2 * k, [list(range(2 * k)) for _ in self.layers]
        return 1 + k, [list(range(1, 1 + k)) for _ in self.layers]

    def errors(self, losses: Tensor, injector: _Injector, outputs: list[Tensor]) -> list[Tensor]:
        if self.inaccessible:
            delta_l = losses[0::2] - losses[1::2]  # [K, B]
            delta_a = [o[0::2] - o[1::2] for o in outputs]  # [K, B, ...]
        else:
            delta_l = losses[1:] - losses[0]
            delta_a = [o[1:] - o[:1] for o in outputs]
        sq = sum(d.reshape(*d.shape[:2], -1).pow(2).sum(-1) for d in delta_a)  # [K, B]
        units = sum(d[0, 0].numel() for d in delta_a)
        scale = units * delta_l / sq
        errors = []
        for d in delta_a:
            e = scale.reshape(*scale.shape, *[1] * (d.dim() - 2)) * d  # [K, B, ...]
            errors.append(e if self.inaccessible else e.mean(0))
        return errors
