"""Align-zero, Align-ada and Align-prop (Boopathy & Fiete 2022), and a last-layer-only baseline.

In the wide (lazy, NTK) limit a layer's weight change under backprop is a sum of fixed backward
projections at initialisation × the output error × input activity. The Align rules reproduce that
without propagating errors through the *current* weights:

* ``align-zero``: ΔW_l = −η δ_{l,0} a_{l−1,0}ᵀ with δ_{l,0} = (∂f_0/∂h_l)ᵀ e — the real network's
  output error e = ∂L/∂f_t(x) back-propagated through a frozen **twin** of the network at
  initialisation, times the twin's own presynaptic activity. This is exactly gradient descent on
  the network linearised at initialisation, driven by the true network's error:
  ΔW = J_0ᵀ e with J_0 the Jacobian of the twin's output w.r.t. its weights.
* ``align-ada``: the same δ_{l,0} times the *current* network's presynaptic activity a_{l−1,t}.
  For the readout this is e ⊗ current features, i.e. the exact readout gradient.
* ``align-prop``: feedback alignment whose feedback matrices are the initial forward weights W_0
  (the error is carried layer by layer with the current f′); a subclass of
  :class:`~decorrelate.rules.feedback.FeedbackAlignment` that only changes B.
* ``last-layer``: train the readout only (plain gradient); every other layer stays at its
  initial value. The paper's "training the last layer only" baseline.

Batch norm. Where a layer's output goes straight into batch norm, align-ada by default takes
the twin's δ at the norm's output and carries it to the layer through the *real* network's
batch norm (its current batch statistics), as the authors' code does; ``bn_mixing="twin"``
(``--align-bn-mixing twin``) takes δ at the layer's output instead, through the twin's norm.
See :class:`AlignAda`. align-zero uses the twin throughout (no choice to make). Other norms
(LayerNorm, GroupNorm, RMSNorm) are not mixed: δ is taken at the layer's output, through the
twin's norm.

Which layers. Every layer :func:`decorrelate.layers.find_layers` lists (Linear and subclasses,
Conv1d/2d/3d with any stride, dilation, padding mode and groups, Hugging Face ``Conv1D``,
``nn.Embedding``, decorrelated wrappers, registered kinds) and the affine parameters of
normalisation layers, which are a layer a = γ ⊙ x̂ + β whose presynaptic activity is the
normalised input x̂: ΔW = Σ δ_{l,0} ⊙ x̂ with x̂ from the twin (zero) or the network (ada), each
with its own batch statistics. An embedding's presynaptic activity is its (one-hot) index,
the same in the twin and the network: both rules scatter δ_{l,0} into the rows it looked up.
A trainable parameter outside every layer (a positional embedding held by a container) is
refused with one error.

How the twin rules work (one vectorised pass each, no per-sample loops):

1. the real network runs forward without an autograd graph; forward hooks on every layer
   record its input when ``ada`` needs it; e = ∂L/∂output is taken on the detached output;
2. the twin runs forward *with* a graph; the same hooks record each layer's input a_{l−1,0} and
   output h_{l,0} (made a graph leaf where nothing upstream requires grad);
3. one ``torch.autograd.grad(twin_output, [h_l...], grad_outputs=e)`` gives every δ_{l,0}
   (for align-ada's default batch-norm mixing, at the norm's output, then through the real
   network's norm by :func:`norm_vjp`);
4. ΔW_l = δ_{l,0} aᵀ (the layer kind's :meth:`~decorrelate.layers.LayerKind.weight_grad`:
   a matmul, ``conv*d_weight`` for convolutions, an index-add for embeddings), Δb_l = Σ δ_{l,0};
   these are written into the real network's ``.grad``.

A layer called several times per forward — the recurrent weights of an RNN unrolled in time —
is recorded at every call, and the sum over calls is back-propagation through time through the
twin along *its own* trajectory. The twin is a deep copy of the model taken in :meth:`attach`:
its parameters do not require grad, its batch-norm running statistics are frozen (momentum 0),
its decorrelators never update, and its weights are part of :meth:`state_dict` so a checkpoint
resumes exactly. (The paper's batch norm has no affine parameters; with them, γ and β are
trained as layers, above.)

Cost: one forward of the real network without a graph, one forward and one activation-only
backward of the twin, plus one weight-gradient product per layer — about BP plus a forward pass.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import layers as L
from ..context import SINGLE_PROCESS, StepContext
from ..errors import UserError
from ..layers.runtime import call_order, layer_input, mark_attached, release
from ..nn import capturing
from ..options import opt
from ..schema import Options
from .base import LearningRule, StepOutput, accumulate_grad, register_options, register_rule
from .feedback import FeedbackAlignment

# ----------------------------------------------------------------------------- recording


class _Recorder:
    """Forward hooks on a list of layers that record (input, output) of every call while on.

    With ``norms`` (batch-norm modules), a norm that consumes the output of a recorded layer call
    directly is noted in ``mixed[(layer index, call index)] = (norm, its input, its output)``:
    where align-ada may inject the twin's backward signal after the norm instead of before it.
    """

    def __init__(
        self, modules: list[nn.Module], leaf_outputs: bool, norms: Sequence[nn.Module] = ()
    ) -> None:
        self.modules = modules
        self.leaf_outputs = leaf_outputs
        self.keep_outputs = leaf_outputs or bool(norms)
        self.inputs: list[list[Tensor]] = [[] for _ in modules]
        self.outputs: list[list[Tensor]] = [[] for _ in modules]
        self.mixed: dict[tuple[int, int], tuple[nn.Module, Tensor, Tensor]] = {}
        self._by_id: dict[int, tuple[int, int]] = {}
        self.on = False
        self._handles = [m.register_forward_hook(self._hook_for(i)) for i, m in enumerate(modules)]
        self._handles += [m.register_forward_hook(self._norm_hook) for m in norms]

    def _hook_for(self, index: int):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
            if not self.on:
                return None
            self.inputs[index].append(args[0].detach())
            if not self.keep_outputs:
                return None
            replaced = self.leaf_outputs and not out.requires_grad
            if replaced:  # first layer of a frozen net: make δ reachable here
                out = out.detach().requires_grad_(True)
            self._by_id[id(out)] = (index, len(self.outputs[index]))
            self.outputs[index].append(out)  # kept alive, so its id stays unique
            return out if replaced else None

        return hook

    def _norm_hook(self, module: nn.Module, args: tuple, out: Tensor) -> None:
        key = self._by_id.get(id(args[0])) if self.on else None
        if key is not None:
            self.mixed[key] = (module, args[0], out)

    @contextmanager
    def recording(self) -> Iterator[None]:
        self.clear()
        self.on = True
        try:
            yield
        finally:
            self.on = False

    def clear(self) -> None:
        self.inputs = [[] for _ in self.modules]
        self.outputs = [[] for _ in self.modules]
        self.mixed, self._by_id = {}, {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _batch_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def norm_vjp(norm: nn.Module, x: Tensor, grad: Tensor) -> Tensor:
    """``grad`` (at the norm's output) carried back through batch norm ``norm`` as it ran on ``x``.

    Recomputes the normalisation with the statistics the module used — the batch's own in
    training mode, the running ones in eval mode — without touching its running statistics.
    """
    batch_stats = norm.training or norm.running_mean is None
    mean = None if batch_stats else norm.running_mean
    var = None if batch_stats else norm.running_var
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = F.batch_norm(x, mean, var, norm.weight, norm.bias, batch_stats, 0.0, norm.eps)
        (out,) = torch.autograd.grad(y, x, grad.to(y.dtype))
    return out


def check_align_model(model: nn.Module) -> None:
    """Every trainable parameter must sit in a rule layer (a layer kind or a norm's affine):
    :func:`~decorrelate.layers.loose_parameters` must be empty."""
    extra = L.loose_parameters(model)
    if extra:
        raise UserError(
            f"align rules train only layers (decorrelate.layers.find_layers, normalisation "
            f"affine parameters included); {extra[0][0]} is a parameter outside every layer "
            "(freeze it, or train the model with rule bp)"
        )


# ----------------------------------------------------------------------------- the twin rules


class _TwinAlign(LearningRule):
    """Shared machinery of align-zero / align-ada: the frozen twin and the δ_{l,0} pass."""

    #: Where the presynaptic activity comes from: ``twin`` (zero) or ``current`` (ada).
    presynaptic: ClassVar[str] = "twin"
    #: Where δ_{l,0} is taken for a layer whose output goes straight into batch norm: ``twin``
    #: (at the layer's output, i.e. through the twin's batch norm) or ``real`` (at the norm's
    #: output in the twin, then through the real network's batch norm). See :class:`AlignAda`.
    bn_mixing: str = "twin"

    def __init__(self) -> None:
        super().__init__()
        self.twin: nn.Module | None = None
        self.points: list[tuple[str, nn.Module]] = []
        self.twin_points: list[nn.Module] = []
        self._real: _Recorder | None = None
        self._twin: _Recorder | None = None

    def attach(
        self,
        model: nn.Module,
        loss: Any,
        generator: torch.Generator | None = None,
        example: Tensor | None = None,
    ) -> None:
        """Take the twin: a frozen deep copy of ``model`` as it is now (its initialisation)."""
        super().attach(model, loss, generator)
        self.points = L.find_layers(model, norms=True)
        check_align_model(model)
        mark_attached(self.name, [m for _, m in self.points])
        self.twin = make_twin(model)
        twin_modules = dict(self.twin.named_modules())
        self.twin_points = [twin_modules[name] for name, _ in self.points]
        real_norms = _batch_norms(model) if self.bn_mixing == "real" else []
        self._twin = _Recorder(
            self.twin_points, leaf_outputs=True, norms=[twin_modules[n] for n, _ in real_norms]
        )
        if self.presynaptic == "current":
            self._real = _Recorder(
                [m for _, m in self.points], leaf_outputs=False, norms=[m for _, m in real_norms]
            )

    def detach(self) -> None:
        release([m for _, m in self.points])
        for recorder in (self._real, self._twin):
            if recorder is not None:
                recorder.remove()
        self._real = self._twin = None
        self.twin, self.points, self.twin_points = None, [], []
        super().detach()

    def output_error(
        self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext = SINGLE_PROCESS
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Forward the real network (no graph): its output, the mean loss and e = ∂L/∂output
        (of the loss weighted by ``ctx.loss_scale``)."""
        real = self._real.recording() if self._real is not None else nullcontext()
        with real, torch.no_grad(), capturing(model, True):
            output = self.loss.select(model(x))
        out = output.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss(out, y)
            (error,) = torch.autograd.grad(ctx.scaled(loss), out)
        return output.detach(), loss.detach(), error

    def twin_deltas(self, x: Tensor, error: Tensor) -> list[list[Tensor]]:
        """δ_{l,0} at every call of every layer: ``error`` back-propagated through the twin.

        Taken at the layer's output, or — with ``bn_mixing = "real"`` where a batch norm consumes
        that output — at the norm's output (then :meth:`layer_updates` carries it on through the
        real network's norm).
        """
        twin, recorder = self.twin, self._twin
        twin.train(self.model.training)
        with recorder.recording(), torch.enable_grad(), capturing(twin, False):
            out0 = self.loss.select(twin(x))
        if out0.shape != error.shape:
            raise UserError(
                f"the twin's output {tuple(out0.shape)} does not match the network's "
                f"{tuple(error.shape)}; attach the rule to the model it trains"
            )
        flat = [
            recorder.mixed[i, j][2] if (i, j) in recorder.mixed else h
            for i, calls in enumerate(recorder.outputs)
            for j, h in enumerate(calls)
        ]
        grads = torch.autograd.grad(
            out0, flat, grad_outputs=error.to(out0.dtype), allow_unused=True
        )
        grads = [torch.zeros_like(h) if g is None else g for h, g in zip(flat, grads, strict=True)]
        deltas, start = [], 0
        for calls in recorder.outputs:
            deltas.append(grads[start : start + len(calls)])
            start += len(calls)
        return deltas

    def layer_updates(self, deltas: list[list[Tensor]]) -> list[tuple[nn.Module, Tensor, Tensor]]:
        """(real layer, ΔW, Δb) per layer: ΔW = Σ δ_{l,0} aᵀ with a from the twin or the network.

        ΔW is shaped like the layer's weight and is the direction to *descend*, like a gradient.
        """
        source = self._real if self.presynaptic == "current" else self._twin
        updates = []
        for i, (name, module) in enumerate(self.points):
            inputs, ds = source.inputs[i], deltas[i]
            if len(inputs) != len(ds):
                raise RuntimeError(
                    f"{name} ran {len(inputs)} times in the network but {len(ds)} times in the "
                    "twin; align rules need the same computation graph in both"
                )
            if not ds:
                continue
            if self._real is not None and self.bn_mixing == "real":
                ds = self._through_real_norms(name, i, ds)
            owner = module if self.presynaptic == "current" else self.twin_points[i]
            gw, gb = L.weight_grad(owner, inputs, ds)  # decorrelated: through R's owner
            updates.append((L.inner_layer(module), gw, gb))
        return updates

    def _through_real_norms(self, name: str, index: int, deltas: list[Tensor]) -> list[Tensor]:
        """δ at a twin norm's output → δ at the real layer's output, through the real norm."""
        out = []
        for call, delta in enumerate(deltas):
            key = (index, call)
            real, twin = self._real.mixed.get(key), self._twin.mixed.get(key)
            if (real is None) != (twin is None):
                raise RuntimeError(
                    f"{name}'s output went into batch norm in only one of the network and its "
                    "twin; align rules need the same computation graph in both"
                )
            out.append(delta if real is None else norm_vjp(real[0], real[1], delta))
        return out

    def updates_for_error(self, x: Tensor, error: Tensor) -> list[tuple[nn.Module, Tensor, Tensor]]:
        """The rule's per-layer updates for an output ``error`` given from outside.

        The alignment-score probe drives align-zero with the error of a network trained by BP.
        Only for ``align-zero`` (align-ada would also need that network's activity).
        """
        if self.presynaptic != "twin":
            raise UserError("updates_for_error needs align-zero (presynaptic activity of the twin)")
        try:
            return self.layer_updates(self.twin_deltas(x, error))
        finally:
            self._twin.clear()

    def backward(
        self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext = SINGLE_PROCESS
    ) -> StepOutput:
        if model is not self.model:
            raise UserError("this align rule was attached to a different model")
        output, loss, error = self.output_error(model, x, y, ctx)
        try:
            for layer, gw, gb in self.layer_updates(self.twin_deltas(x, error)):
                accumulate_grad(L.weight_of(layer), gw)
                if gb is not None:
                    accumulate_grad(L.bias_of(layer), gb)
        finally:
            for recorder in (self._real, self._twin):
                if recorder is not None:
                    recorder.clear()
        return StepOutput(loss, output)

    def diagnostics(self) -> dict[str, float]:
        """``weight_change/<layer>``: ‖W_t − W_0‖ / ‖W_0‖ (how far from the lazy regime)."""
        out = {}
        for (name, module), twin_module in zip(self.points, self.twin_points, strict=True):
            w, w0 = L.weight_of(module).detach(), L.weight_of(twin_module).detach()
            out[f"weight_change/{name}"] = float(
                torch.linalg.vector_norm((w - w0).double())
                / torch.linalg.vector_norm(w0.double()).clamp_min(1e-30)
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["twin"] = self.twin.state_dict() if self.twin is not None else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("twin") is not None and self.twin is not None:
            self.twin.load_state_dict(state["twin"])


def make_twin(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model``: no parameter requires grad, batch-norm statistics fixed.

    Take it before registering hooks on ``model`` (hooks are copied along with the modules).
    """
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    for m in twin.modules():
        if isinstance(m, _BatchNorm):
            m.momentum = 0.0  # running statistics stay those of initialisation
    return twin


@register_rule("align-zero")
class AlignZero(_TwinAlign):
    """ΔW_l = δ_{l,0} a_{l−1,0}ᵀ: backward signal and presynaptic activity from the frozen twin."""

    presynaptic = "twin"


#: Where align-ada injects the twin's backward signal into a layer followed by batch norm.
BN_MIXING = ("real", "twin")


@register_options
@dataclass
class AlignOptions(Options):
    """The option of ``align-ada`` (a field of :class:`~decorrelate.config.TrainConfig`)."""

    align_bn_mixing: str = opt(
        "real",
        "align-ada: where the twin's backward signal enters a layer followed by batch norm: "
        "real (after the norm, then through the network's own batch statistics, as the authors' "
        "code) or twin (at the layer output, through the twin's batch norm)",
        "str",
        choices=("real", "twin"),
        group="rule",
    )


@register_rule("align-ada")
class AlignAda(_TwinAlign):
    """ΔW_l = δ_{l,0} a_{l−1,t}ᵀ: the twin's backward signal, the current presynaptic activity.

    ``bn_mixing`` says where the twin's backward signal meets the real network when a layer's
    output goes straight into batch norm (conv → BN → f, as in the paper's conv nets):

    * ``"real"`` (default, the authors' code): δ is taken in the twin at the norm's *output* and
      carried back to the layer's output through the **real** network's batch norm — its batch
      statistics on the current activity — so ΔW_l = BN_t′ᵀ(δ_{l,0}^{post}) a_{l−1,t}ᵀ. The
      correction then adapts to the current network like the presynaptic activity does; this is
      what the authors' stop-gradient construction x_lin + x − sg(x) placed after each norm
      computes.
    * ``"twin"``: δ is taken at the layer's output in the twin, i.e. through the twin's batch
      norm and its statistics at initialisation (the literal δ_{l,0} = (∂f_0/∂h_l)ᵀ e).

    Both give BP's update at initialisation and differ once the network moves away from it: on
    the ``align-width-conv`` net (16 channels) by 33 % per conv layer after one step and by
    50–200 % over 60 steps (``benchmarks/results/align_fidelity.json``). Layers not
    followed by batch norm are unaffected. With ``"real"`` the updates equal the authors'
    construction to rounding (``benchmarks/bench_align_fidelity.py``), except for one point we
    do not copy: their code mixes the *last* conv layer at the readout's input, after the real
    network's activation and pooling, so that layer alone would get the current f′ instead of
    the twin's — at odds with the rule and with how they treat every other layer.
    """

    presynaptic = "current"

    def __init__(self, bn_mixing: str = "real") -> None:
        super().__init__()
        if bn_mixing not in BN_MIXING:
            raise UserError(
                f"unknown align batch-norm mixing {bn_mixing!r}; choose one of: "
                f"{', '.join(BN_MIXING)}"
            )
        self.bn_mixing = bn_mixing

    @classmethod
    def from_config(cls, config: Any) -> AlignAda:
        return cls(bn_mixing=config.align_bn_mixing)


# ----------------------------------------------------------------------------- align-prop


@register_rule("align-prop")
class AlignProp(FeedbackAlignment):
    """Feedback alignment with B = W_0, the initial forward weights (kept as ``fa_feedback``).

    Everything else — routing, decorrelated layers, straight-through option, W–B diagnostics
    (here the angle between W_t and W_0) — is :class:`FeedbackAlignment`'s.
    """

    def __init__(self, straight_through: bool = False) -> None:
        # "weight" makes FeedbackAlignment draw nothing; attach then stores W_0 as B.
        super().__init__(feedback_init="weight", straight_through=straight_through)

    @classmethod
    def from_config(cls, config: Any) -> AlignProp:
        return cls(straight_through=getattr(config, "feedback_straight_through", False))

    def attach(
        self,
        model: nn.Module,
        loss: Any,
        generator: torch.Generator | None = None,
        example: Tensor | None = None,
    ) -> None:
        super().attach(model, loss, generator, example)
        for _, module in self.points:
            w0 = L.weight_of(module).detach().clone()
            module.register_buffer(self.buffer_name, w0)

    def feedback(self, module: nn.Module) -> Tensor:
        return getattr(module, self.buffer_name)


# ----------------------------------------------------------------------------- last layer only


@register_options
@dataclass
class LastLayerOptions(Options):
    """The option of ``last-layer`` (a field of :class:`~decorrelate.config.TrainConfig`)."""

    readout: str = opt(
        "",
        "last-layer: the layer to train, a name from model.named_modules() (default: the layer "
        "called last in the forward pass)",
        "str",
        group="rule",
    )


@register_rule("last-layer")
class LastLayer(LearningRule):
    """Train only the readout with its true gradient; every other layer stays at its initial value.

    The readout is the layer called last in a forward pass (found with the example batch at
    attach, or on the first step), whatever the order of definition in ``__init__``; or the
    layer named by ``readout`` (a name from ``model.named_modules()``). A forward pre-hook hands
    the readout a detached input and only the readout's parameters get a ``.grad`` (one
    ``autograd.grad`` for them); every other parameter — layers, embeddings, norms — keeps
    ``grad = None`` and the optimizer skips it. A readout tied to an embedding (GPT-2's
    ``lm_head``) gets the gradient of its use as the readout only.
    """

    def __init__(self, readout: str | None = None) -> None:
        super().__init__()
        self.readout_name = readout or None
        self.readout: nn.Module | None = None
        self.points: list[tuple[str, nn.Module]] = []
        self._handle: Any = None
        self.active = True

    @classmethod
    def from_config(cls, config: Any) -> LastLayer:
        return cls(readout=getattr(config, "readout", "") or None)

    def attach(
        self,
        model: nn.Module,
        loss: Any,
        generator: torch.Generator | None = None,
        example: Tensor | None = None,
    ) -> None:
        super().attach(model, loss, generator)
        self.points = L.find_layers(model)
        mark_attached(self.name, [m for _, m in self.points])
        if self.readout_name is not None:
            named = dict(self.points)
            if self.readout_name not in named:
                raise UserError(
                    f"readout {self.readout_name!r} is not a layer of the model; the layers are: "
                    f"{', '.join(repr(n) for n in named)}"
                )
            self._set_readout(named[self.readout_name])
        elif example is not None:
            self._find_readout(model, example)

    def _find_readout(self, model: nn.Module, example: Tensor) -> None:
        calls = call_order(model, [m for _, m in self.points], example)
        if not calls:
            raise UserError("no layer of the model ran in a forward pass; cannot find the readout")
        self._set_readout(calls[-1][0])

    def _set_readout(self, module: nn.Module) -> None:
        self.readout = module
        self._handle = module.register_forward_pre_hook(self._cut, with_kwargs=True)

    def _cut(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        x, rebuild = layer_input(args, kwargs)
        if not self.active or not isinstance(x, Tensor):
            return None
        return rebuild(x.detach())

    @contextmanager
    def suspended(self) -> Iterator[None]:
        previous, self.active = self.active, False
        try:
            yield
        finally:
            self.active = previous

    def detach(self) -> None:
        release([m for _, m in self.points])
        if self._handle is not None:
            self._handle.remove()
        self._handle, self.readout, self.points = None, None, []
        super().detach()

    def backward(
        self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext = SINGLE_PROCESS
    ) -> StepOutput:
        if self.readout is None:
            self._find_readout(model, x)
        output = self.loss.select(model(x))
        loss = self.loss(output, y)
        params = [p for p in (L.weight_of(self.readout), L.bias_of(self.readout)) if p is not None]
        params = [p for p in params if p.requires_grad]
        for p, g in zip(params, torch.autograd.grad(ctx.scaled(loss), params), strict=True):
            accumulate_grad(p, g)
        return StepOutput(loss.detach(), output.detach())
