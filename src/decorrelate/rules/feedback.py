"""Feedback alignment (``fa``) and direct feedback alignment (``dfa``).

Both keep the forward pass and the weight-gradient formula of backprop (ΔW = δ zᵀ) and change
only how the error reaches earlier layers. They prepare the model once, with public mechanisms
only — a forward pre-hook and a forward hook on every feedback point (``nn.Linear``, ``nn.Conv2d``
or a decorrelated wrapper of one) and a custom ``autograd.Function`` — and then ``backward`` is a
single ordinary autograd call:

* the pre-hook hands the layer a *detached* copy of its input, so autograd computes the layer's
  own weight gradient exactly as in BP but sends nothing to the input through Wᵀ;
* ``fa``: the forward hook wraps the output in :class:`_RouteError`, an identity whose backward
  sends the error δ to the (undetached) input through the fixed feedback matrix B instead:
  δ_in = Bᵀ δ for Linear, the transposed convolution with kernel B for Conv2d. In a decorrelated
  layer (a = W R x) the error goes back through Rᵀ as well: B is folded with R, as in paper 1.
* ``dfa``: nothing flows between layers; the output error e = ∂L/∂y is projected straight to the
  input of every layer after the first through its own fixed matrix (B_l e), and autograd carries
  it from there through whatever sits in between (activation, pooling, flatten) to the previous
  layer's weights: δ_l = f′(a_l) ⊙ B_l e.

Feedback matrices are buffers of the layer modules (``fa_feedback`` / ``dfa_feedback``): saved in
checkpoints, never optimised, drawn from the rule's seeded generator.

Paper 1's "DFA" is not the above but FA with straight-through activations (f′ := 1 in the backward
pass): ``FeedbackAlignment(straight_through=True)``, CLI ``--feedback-straight-through``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..nn import Decorrelator
from .base import LearningRule, StepOutput, register_rule
from .layers import conv_padding, fold_r, inner_layer, trainable_layers

FEEDBACK_INITS = ("uniform", "gaussian", "sign-symmetric", "weight")
"""How B is drawn. ``uniform``: U(−s, s) with s = scale/√fan_in, like PyTorch's default forward
init; ``gaussian``: N(0, scale²/fan_in); ``sign-symmetric``: sign(W)·|B₀| with B₀ uniform (the
sign follows the current W, the magnitude is fixed); ``weight``: B = W, the current forward
weights — FA then *is* BP (a sanity check and a test oracle)."""

#: Elementwise activations whose derivative the straight-through option replaces by 1.
ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Softplus,
    nn.Identity,
    nn.Hardtanh,
    nn.ReLU6,
)


class _RouteError(torch.autograd.Function):
    """Identity on the layer output; its backward returns ``send(δ)`` as the input's gradient."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, x: Tensor, send: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.send = send
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor | None, None]:
        grad_x = ctx.send(grad_out) if ctx.needs_input_grad[1] else None
        return grad_out, grad_x, None


def _draw(
    shape: tuple[int, ...],
    fan_in: int,
    init: str,
    scale: float,
    generator: torch.Generator | None,
    like: Tensor,
) -> Tensor:
    bound = scale / math.sqrt(fan_in)
    if init == "gaussian":
        b = torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)
        return b * bound
    b = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
    return (2 * b - 1) * bound


class _FeedbackRule(LearningRule):
    """Shared machinery: feedback points, input detaching hooks, feedback buffers."""

    buffer_name = ""
    ddp_autograd = True  # one backward() through the (wrapped) model, routed by hooks

    def __init__(self, feedback_init: str = "uniform", feedback_scale: float = 1.0) -> None:
        super().__init__()
        if feedback_init not in FEEDBACK_INITS:
            raise UserError(
                f"unknown feedback init {feedback_init!r}; choose one of: "
                f"{', '.join(FEEDBACK_INITS)}"
            )
        if not feedback_scale > 0:
            raise UserError(f"feedback scale must be > 0, got {feedback_scale}")
        self.feedback_init = feedback_init
        self.feedback_scale = feedback_scale
        self.points: list[tuple[str, nn.Module]] = []
        self._handles: list[Any] = []
        self.active = True

    @classmethod
    def from_config(cls, config: Any) -> _FeedbackRule:
        return cls(feedback_init=config.feedback_init, feedback_scale=config.feedback_scale)

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Within the block the model computes plain BP gradients (hooks pass through)."""
        previous, self.active = self.active, False
        try:
            yield
        finally:
            self.active = previous

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for _, module in self.points:
            if self.buffer_name in module._buffers:
                delattr(module, self.buffer_name)
        self._handles, self.points = [], []
        super().detach()

    def feedback_pairs(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer: (W, B)}`` for the W–B alignment diagnostics (B shaped like W for FA)."""
        return {}

    def diagnostics(self) -> dict[str, float]:
        from ..metrics import weight_feedback_alignment

        return weight_feedback_alignment(self.feedback_pairs())


@register_rule("fa")
class FeedbackAlignment(_FeedbackRule):
    """FA (Lillicrap et al. 2016): δ_in = Bᵀ δ with a fixed random B per layer instead of Wᵀ."""

    buffer_name = "fa_feedback"

    def __init__(
        self,
        feedback_init: str = "uniform",
        feedback_scale: float = 1.0,
        straight_through: bool = False,
    ) -> None:
        super().__init__(feedback_init, feedback_scale)
        self.straight_through = straight_through
        self._inputs: dict[int, list[Tensor | None]] = {}  # per layer, a stack of inputs

    @classmethod
    def from_config(cls, config: Any) -> FeedbackAlignment:
        return cls(
            feedback_init=config.feedback_init,
            feedback_scale=config.feedback_scale,
            straight_through=config.feedback_straight_through,
        )

    def attach(
        self,
        model: nn.Module,
        loss: Any,
        generator: torch.Generator | None = None,
        example: Tensor | None = None,
    ) -> None:
        super().attach(model, loss, generator)
        self.points = trainable_layers(model)
        for _, module in self.points:
            layer = inner_layer(module)
            if self.feedback_init != "weight":
                w = layer.weight
                fan_in = w[0].numel()
                module.register_buffer(
                    self.buffer_name,
                    _draw(
                        tuple(w.shape),
                        fan_in,
                        self.feedback_init,
                        self.feedback_scale,
                        generator,
                        w.detach(),
                    ),
                )
            self._handles.append(module.register_forward_pre_hook(self._cut_input))
            self._handles.append(module.register_forward_hook(self._route))
        if self.straight_through:
            for name, module in model.named_modules():
                if isinstance(module, ELEMENTWISE) and not isinstance(module, nn.Identity):
                    self._handles.append(module.register_forward_hook(self._straight_through))
                elif isinstance(module, nn.Module) and name and _is_unknown_nonlinearity(module):
                    raise UserError(
                        f"straight-through FA cannot handle {name} ({type(module).__name__})"
                    )

    def _cut_input(self, module: nn.Module, args: tuple) -> tuple | None:
        """Pre-hook: give the layer a detached input and remember the original."""
        x = args[0]
        if not self.active or not isinstance(x, Tensor) or not x.requires_grad:
            self._inputs.setdefault(id(module), []).append(None)
            return None
        self._inputs.setdefault(id(module), []).append(x)
        return (x.detach(), *args[1:])

    def _pop_input(self, module: nn.Module) -> Tensor | None:
        stack = self._inputs.get(id(module))
        return stack.pop() if stack else None

    def feedback(self, module: nn.Module) -> Tensor:
        """The current B of a feedback point, shaped like its weight (before folding with R)."""
        w = inner_layer(module).weight
        if self.feedback_init == "weight":
            return w.detach()
        b = getattr(module, self.buffer_name)
        return torch.sign(w.detach()) * b.abs() if self.feedback_init == "sign-symmetric" else b

    def _route(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
        x = self._pop_input(module)
        if x is None:
            return None
        layer = inner_layer(module)
        if isinstance(layer, nn.Conv2d):
            b = fold_r(module, self.feedback(module))  # a small kernel-sized product
            shape = x.shape

            def send(delta: Tensor) -> Tensor:
                return torch.nn.grad.conv2d_input(
                    shape,
                    b.to(delta.dtype),
                    delta,
                    stride=layer.stride,
                    padding=conv_padding(layer),
                    dilation=layer.dilation,
                    groups=layer.groups,
                )
        else:
            b = self.feedback(module)
            decorrelated = hasattr(module, "pull_back")

            def send(delta: Tensor) -> Tensor:
                # (δ B) R rather than δ (B R): rows·out·d + rows·d² instead of out·d² per step.
                back = delta @ b.to(delta.dtype)
                return module.pull_back(back) if decorrelated else back

        return _RouteError.apply(out, x, send)

    def _straight_through(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
        """f′ := 1: the activation's value, the input's gradient passed through unchanged."""
        if not self.active or not isinstance(args[0], Tensor) or not args[0].requires_grad:
            return None
        x = args[0]
        return out.detach() + (x - x.detach())

    def backward(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        output = self.loss.select(model(x))
        loss = self.loss(output, y)
        loss.backward()
        return StepOutput(loss.detach(), output.detach())

    def feedback_pairs(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {name: (inner_layer(m).weight.detach(), self.feedback(m)) for name, m in self.points}


def _is_unknown_nonlinearity(module: nn.Module) -> bool:
    """Parameter-free modules that are neither elementwise activations nor shape/pool ops."""
    known = (
        nn.Sequential,
        nn.Flatten,
        nn.Unflatten,
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool2d,
        nn.Dropout,
        nn.Linear,
        nn.Conv2d,
        nn.modules.batchnorm._BatchNorm,
        nn.LayerNorm,
        nn.GroupNorm,
        *ELEMENTWISE,
    )
    if isinstance(module, Decorrelator):
        return False
    return not isinstance(module, known) and not list(module.children())


@register_rule("dfa")
class DirectFeedbackAlignment(_FeedbackRule):
    """DFA (Nøkland 2016): every layer after the first receives B_l e at its input."""

    buffer_name = "dfa_feedback"

    def attach(
        self,
        model: nn.Module,
        loss: Any,
        generator: torch.Generator | None = None,
        example: Tensor | None = None,
    ) -> None:
        """Hook every layer after the first; with ``example`` (one input batch) draw every B now.

        Without an example the B's are drawn on the first training step, when their shapes are
        known; the training loop always passes one, so checkpoints hold them from the start.
        """
        super().attach(model, loss, generator)
        if self.feedback_init in ("sign-symmetric", "weight"):
            raise UserError(
                f"feedback init {self.feedback_init!r} needs B shaped like W; DFA's B maps the "
                "output error to a hidden layer (use uniform or gaussian)"
            )
        self.points = trainable_layers(model)
        self._hidden: list[tuple[nn.Module, Tensor]] = []
        for _, module in self.points[1:]:
            self._handles.append(module.register_forward_pre_hook(self._cut_hidden))
        if example is not None:
            with torch.no_grad(), self.suspended():
                seen: list[tuple[nn.Module, Tensor]] = []
                handles = [
                    m.register_forward_pre_hook(lambda mod, a: seen.append((mod, a[0])))
                    for _, m in self.points[1:]
                ]
                try:
                    classes = self.loss.select(model(example[:1]))[0].numel()
                finally:
                    for h in handles:
                        h.remove()
            for module, h in seen:
                self._feedback_for(module, h, classes)

    def _cut_hidden(self, module: nn.Module, args: tuple) -> tuple | None:
        """Pre-hook: record the layer's input (where B e is injected) and detach it."""
        x = args[0]
        if not self.active or not isinstance(x, Tensor) or not x.requires_grad:
            return None
        self._hidden.append((module, x))
        return (x.detach(), *args[1:])

    def _feedback_for(self, module: nn.Module, hidden: Tensor, classes: int) -> Tensor:
        """B_l [numel of one hidden input, classes], drawn on first use."""
        b = getattr(module, self.buffer_name, None)
        width = hidden[0].numel()
        if b is None:
            b = _draw(
                (width, classes),
                classes,
                self.feedback_init,
                self.feedback_scale,
                self.generator,
                hidden.detach(),
            )
            module.register_buffer(self.buffer_name, b)
        elif b.shape != (width, classes):
            raise UserError(
                f"DFA feedback of a layer is {tuple(b.shape)} but the layer now gets {width} "
                f"inputs for {classes} outputs"
            )
        return b

    def backward(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        self._hidden = []
        output = self.loss.select(model(x))
        loss = self.loss(output, y)
        hidden, self._hidden = self._hidden, []
        if not hidden:  # suspended, or a single-layer model: plain BP
            loss.backward()
            return StepOutput(loss.detach(), output.detach())
        (e,) = torch.autograd.grad(loss, output, retain_graph=True)
        flat_e = e.reshape(e.shape[0], -1)
        tensors, grads = [loss], [None]
        for module, h in hidden:
            b = self._feedback_for(module, h, flat_e.shape[1])
            tensors.append(h)
            grads.append((flat_e @ b.T.to(flat_e.dtype)).reshape(h.shape))
        torch.autograd.backward(tensors, grads)
        return StepOutput(loss.detach(), output.detach())
