"""Feedback alignment (``fa``) and direct feedback alignment (``dfa``).

Both keep the forward pass and the weight-gradient formula of backprop (ΔW = δ zᵀ) and change
only how the error reaches earlier layers. They prepare the model once, with public mechanisms
only — a forward pre-hook and a forward hook on every layer :func:`decorrelate.layers.find_layers`
lists (any :class:`~decorrelate.layers.LayerKind`: Linear and subclasses, Conv1d/2d/3d with any
stride, dilation, padding mode and groups, Hugging Face ``Conv1D``, a decorrelated wrapper of
one, a registered kind) and a custom ``autograd.Function`` — and then ``backward`` is a single
ordinary autograd call:

* the pre-hook hands the layer a *detached* copy of its input, so autograd computes the layer's
  own weight gradient exactly as in BP but sends nothing to the input through Wᵀ;
* ``fa``: the forward hook wraps the output in :class:`_RouteError`, an identity whose backward
  sends the error δ to the (undetached) input through the fixed feedback matrix B instead:
  δ_in = Bᵀ δ, i.e. the layer kind's :meth:`~decorrelate.layers.LayerKind.input_grad` with B in
  place of W (the transposed convolution with kernel B for a convolution). B is shaped like the
  weight Parameter (for ``Conv1D``, stored [in, out]). In a decorrelated layer (a = W R x) the
  error goes back through Rᵀ as well: B is folded with R, as in paper 1.
* ``dfa``: nothing flows between layers; the output error e = ∂L/∂y is projected straight to the
  input of every layer whose input carries a gradient, through its own fixed matrix (B_l e), and
  autograd carries it from there through whatever sits in between (activation, pooling, flatten,
  normalisation) to the previous layer's weights: δ_l = f′(a_l) ⊙ B_l e. See
  :class:`DirectFeedbackAlignment` for sequences.

Layers without an error to pass on. An ``nn.Embedding``'s input is an index: it sends nothing
back, and both rules train it with its local gradient δ at its output scattered into the rows
it looked up (what BP does given that δ). Normalisation layers (BatchNorm, LayerNorm, GroupNorm,
RMSNorm) and any other parameter-free module between layers keep their own Jacobian in the
backward pass, and their affine parameters their local gradient from the error that reaches
them. A layer called several times in one forward (a shared cell unrolled in time) routes every
call: each call's input is kept on a per-layer stack between its pre-hook and its hook.

Feedback matrices are buffers of the layer modules (``fa_feedback`` / ``dfa_feedback``): saved in
checkpoints, never optimised, drawn from the rule's seeded generator.

Paper 1's "DFA" is not the above but FA with straight-through activations (f′ := 1 in the backward
pass): ``FeedbackAlignment(straight_through=True)``, CLI ``--feedback-straight-through``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import layers as L
from ..context import SINGLE_PROCESS, StepContext
from ..errors import UserError
from ..layers.runtime import call_order, layer_input, mark_attached, release
from ..options import opt, positive
from ..schema import Options
from .base import LearningRule, StepOutput, register_options, register_rule

FEEDBACK_INITS = ("uniform", "gaussian", "sign-symmetric", "weight")
"""How B is drawn. ``uniform``: U(−s, s) with s = scale/√fan_in, like PyTorch's default forward
init; ``gaussian``: N(0, scale²/fan_in); ``sign-symmetric``: sign(W)·|B₀| with B₀ uniform (the
sign follows the current W, the magnitude is fixed); ``weight``: B = W, the current forward
weights — FA then *is* BP (a sanity check and a test oracle)."""

#: Elementwise activations whose derivative the straight-through option replaces by 1. Every
#: other module (pooling, reshaping, dropout, normalisation, softmax, a user's own) keeps its
#: derivative, as do activations applied functionally in a ``forward`` (``F.relu``).
ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Softplus,
    nn.Hardtanh,
    nn.ReLU6,
    nn.Mish,
    nn.SELU,
    nn.CELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LogSigmoid,
    nn.Softsign,
    nn.Tanhshrink,
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


@register_options
@dataclass
class FeedbackOptions(Options):
    """The options of ``fa`` and ``dfa`` (fields of :class:`~decorrelate.config.TrainConfig`)."""

    feedback_init: str = opt(
        "uniform",
        "fa/dfa: how feedback matrices are drawn (weight: B = W, FA then equals BP)",
        "str",
        choices=FEEDBACK_INITS,
        group="rule",
    )
    feedback_scale: float = opt(
        1.0,
        "fa/dfa: feedback scale relative to the forward init",
        "float",
        check=positive,
        group="rule",
    )
    feedback_straight_through: bool = opt(
        False,
        "fa: straight-through activations in the backward pass (f' := 1; paper 1's 'DFA')",
        "bool",
        group="rule",
    )


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

    def _find_points(self, model: nn.Module) -> None:
        """Every layer that passes an error to its input (embeddings keep their local grad)."""
        self.points = [(n, m) for n, m in L.find_layers(model) if L.kind_of(m).has_input_grad]
        mark_attached(self.name, [m for _, m in self.points])

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
        release([m for _, m in self.points])
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
        self._find_points(model)
        for _, module in self.points:
            if self.feedback_init != "weight":
                w = L.weight_of(module).detach()
                fan_in = L.kind_of(module).fan_in(L.inner_layer(module))
                b = _draw(
                    tuple(w.shape), fan_in, self.feedback_init, self.feedback_scale, generator, w
                )
                module.register_buffer(self.buffer_name, b)
            self._handles.append(
                module.register_forward_pre_hook(self._cut_input, with_kwargs=True)
            )
            self._handles.append(module.register_forward_hook(self._route))
        if self.straight_through:
            for module in model.modules():
                if isinstance(module, ELEMENTWISE):
                    self._handles.append(module.register_forward_hook(self._straight_through))

    def _cut_input(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Pre-hook: give the layer a detached input and remember the original."""
        x, rebuild = layer_input(args, kwargs)
        if not self.active or not isinstance(x, Tensor) or not x.requires_grad:
            self._inputs.setdefault(id(module), []).append(None)
            return None
        self._inputs.setdefault(id(module), []).append(x)
        return rebuild(x.detach())

    def _pop_input(self, module: nn.Module) -> Tensor | None:
        stack = self._inputs.get(id(module))
        return stack.pop() if stack else None

    def feedback(self, module: nn.Module) -> Tensor:
        """The current B of a feedback point, shaped like its weight (before folding with R)."""
        w = L.weight_of(module).detach()
        if self.feedback_init == "weight":
            return w
        b = getattr(module, self.buffer_name)
        return torch.sign(w) * b.abs() if self.feedback_init == "sign-symmetric" else b

    def _route(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
        x = self._pop_input(module)
        if x is None:
            return None
        b, x_in = self.feedback(module), x.detach()

        def send(delta: Tensor) -> Tensor:
            return L.input_grad(module, delta, x_in, b)  # Bᵀ δ (through Rᵀ when decorrelated)

        return _RouteError.apply(out, x, send)

    def _straight_through(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
        """f′ := 1: the activation's value, the input's gradient passed through unchanged."""
        if not self.active or not isinstance(args[0], Tensor) or not args[0].requires_grad:
            return None
        x = args[0]
        return out.detach() + (x - x.detach())

    def backward(
        self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext = SINGLE_PROCESS
    ) -> StepOutput:
        self._inputs.clear()  # nothing left over from a forward that raised
        output = self.loss.select(model(x))
        loss = self.loss(output, y)
        ctx.scaled(loss).backward()
        return StepOutput(loss.detach(), output.detach())

    def feedback_pairs(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {name: (L.weight_of(m).detach(), self.feedback(m)) for name, m in self.points}


def _positions(hidden: tuple[int, ...], output: tuple[int, ...]) -> int:
    """How many leading dims a hidden activity shares with the output (the batch at least): all
    but the last dim of each, compared from the front."""
    k = 0
    for a, b in zip(hidden[:-1], output[:-1], strict=False):
        if a != b:
            break
        k += 1
    if k == 0 and hidden[:1] == output[:1]:  # [B, F] against a flat [B] output
        k = 1
    if k == 0:
        raise UserError(
            f"DFA needs the batch in dim 0 of every layer input and of the output; a layer got "
            f"{tuple(hidden)} for the output {tuple(output)}"
        )
    return k


@register_rule("dfa")
class DirectFeedbackAlignment(_FeedbackRule):
    """DFA (Nøkland 2016): every layer whose input carries a gradient receives B_l e there.

    Which layers: every layer call whose input requires grad — so not a first layer fed with
    data, nor an embedding (its input is an index) — whatever the module order; the readout
    (the last layer called) gets B_L e at its input like every hidden layer and trains on e
    itself. Nothing depends on where a layer is defined in ``__init__``.

    Per-position feedback. The output error e and a hidden activity h may share leading dims
    beyond the batch — token-level outputs [B, T, V] and a Linear's input [B, T, F]. Then B_l
    acts per position, [F, V]: the error at position t goes to position t,
    δh[b, t] = B_l e[b, t]. Otherwise (a classifier's [B, V], a conv's [B, C, H, W], one step
    of an unrolled cell [B, F]) B_l maps the whole flattened error of a sample to the whole
    flattened activity, [numel(h[0]), numel(e[0])]. The shared dims are those equal from the
    front in both shapes, the last dim of each aside. A layer called several times uses its one
    B at every call.
    """

    buffer_name = "dfa_feedback"

    def attach(
        self,
        model: nn.Module,
        loss: Any,
        generator: torch.Generator | None = None,
        example: Tensor | None = None,
    ) -> None:
        """Hook every layer; with ``example`` (one input batch) draw every B now.

        Without an example the B's are drawn on the first training step, when their shapes are
        known; the training loop always passes one, so checkpoints hold them from the start.
        """
        super().attach(model, loss, generator)
        if self.feedback_init in ("sign-symmetric", "weight"):
            raise UserError(
                f"feedback init {self.feedback_init!r} needs B shaped like W; DFA's B maps the "
                "output error to a hidden layer (use uniform or gaussian)"
            )
        self._find_points(model)
        self._hidden: list[tuple[nn.Module, Tensor]] = []
        if example is not None:
            out: list[Tensor] = []
            seen = call_order(  # with a graph: which inputs carry a gradient
                model, [m for _, m in self.points], example,
                grad=True, output=lambda o: out.append(self.loss.select(o)),
            )  # fmt: skip
            for module, h in seen:
                if isinstance(h, Tensor) and h.requires_grad:
                    self._feedback_for(module, h.shape, out[0].shape)
        for _, module in self.points:
            self._handles.append(
                module.register_forward_pre_hook(self._cut_hidden, with_kwargs=True)
            )

    def _cut_hidden(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Pre-hook: record the layer's input (where B e is injected) and detach it."""
        x, rebuild = layer_input(args, kwargs)
        if not self.active or not isinstance(x, Tensor) or not x.requires_grad:
            return None
        self._hidden.append((module, x))
        return rebuild(x.detach())

    def _feedback_for(
        self, module: nn.Module, hidden: torch.Size, output: torch.Size
    ) -> tuple[Tensor, int]:
        """(B_l [width, classes], positions), B_l drawn on first use (see the class doc)."""
        k = _positions(tuple(hidden), tuple(output))
        width, classes = math.prod(hidden[k:]), math.prod(output[k:])
        b = getattr(module, self.buffer_name, None)
        if b is None:
            like = L.weight_of(module).detach()
            b = _draw(
                (width, classes), classes, self.feedback_init, self.feedback_scale,
                self.generator, like,
            )  # fmt: skip
            module.register_buffer(self.buffer_name, b)
        elif b.shape != (width, classes):
            raise UserError(
                f"DFA feedback of a layer is {tuple(b.shape)} but the layer now gets {width} "
                f"inputs for {classes} outputs per position (input {tuple(hidden)}, output "
                f"{tuple(output)}); DFA needs the same shapes (sequence length) every step"
            )
        return b, k

    def backward(
        self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext = SINGLE_PROCESS
    ) -> StepOutput:
        self._hidden = []
        output = self.loss.select(model(x))
        loss = self.loss(output, y)
        scaled = ctx.scaled(loss)
        hidden, self._hidden = self._hidden, []
        if not hidden:  # suspended, or a single-layer model: plain BP
            scaled.backward()
            return StepOutput(loss.detach(), output.detach())
        (e,) = torch.autograd.grad(scaled, output, retain_graph=True)
        tensors, grads = [scaled], [None]
        for module, h in hidden:
            b, k = self._feedback_for(module, h.shape, e.shape)
            per = e.reshape(*e.shape[:k], -1)
            tensors.append(h)
            grads.append((per @ b.T.to(e.dtype)).reshape(h.shape).to(h.dtype))
        torch.autograd.backward(tensors, grads)
        return StepOutput(loss.detach(), output.detach())
