"""The alignment-score probe: train with backprop, and predict the weight change with align-zero.

The Align paper's measurement: train a network with ordinary BP (ΔW = W_T − W_0), and alongside
accumulate ΔŴ = Σ_t u_t, where u_t is the align-zero update driven by the *BP network's* output
error on the same batch (back-propagated through the frozen initial twin, times the twin's input
activity). The score per layer is the cosine between ΔWᵀΔW and ΔŴᵀΔŴ
(:func:`decorrelate.metrics.alignment_score`); a shuffled ΔŴ gives the chance-level control.
A convolution is scored as the linear operator it applies to its flattened input, as in the
paper, so the probe records each conv layer's input size; the flattened-kernel score is logged
too, as ``align_score_kernel/<layer>``. In wide networks the score should approach 1.

:class:`AlignmentProbe` is a learning rule (it fills ``.grad`` exactly like ``bp``) whose
:meth:`~AlignmentProbe.diagnostics` report the scores, so the ordinary training loop logs them in
``metrics.jsonl`` every epoch. Plain SGD with a constant learning rate is assumed: then ΔW_BP is
−η Σ g_t and the score (scale invariant) compares like with like.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..context import SINGLE_PROCESS, StepContext
from ..layers import inner_layer, kind_of, weight_of
from ..metrics import ConvGeometry, alignment_scores
from .align import AlignZero
from .base import LearningRule, StepOutput


class AlignmentProbe(LearningRule):
    """Backprop that also accumulates the align-zero prediction of its weight change.

    ``probes``: None for exact scores, or the number of random probes for the estimate.
    """

    name = "bp-probe"

    def __init__(self, probes: int | None = None) -> None:
        super().__init__()
        self.probes = probes
        self.zero = AlignZero()
        self.initial: dict[str, Tensor] = {}
        self.predicted: dict[str, Tensor] = {}
        self.input_sizes: dict[str, tuple[int, int]] = {}  # conv layers: (H, W) of their input
        self._layers: dict[str, nn.Module] = {}
        self._handles: list[Any] = []

    def attach(
        self,
        model: nn.Module,
        loss: Any,
        generator: torch.Generator | None = None,
        example: Tensor | None = None,
    ) -> None:
        super().attach(model, loss, generator)
        self.zero.attach(model, self.loss, None)
        self._layers = {name: inner_layer(m) for name, m in self.zero.points}
        self.initial = {n: weight_of(layer).detach().clone() for n, layer in self._layers.items()}
        self.predicted = {n: torch.zeros_like(w) for n, w in self.initial.items()}
        self._handles = [
            module.register_forward_pre_hook(self._size_hook(name))
            for name, module in self.zero.points
            if isinstance(inner_layer(module), nn.Conv2d)
        ]

    def _size_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self.input_sizes[name] = tuple(int(s) for s in args[0].shape[-2:])

        return hook

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.zero.detach()
        super().detach()

    def geometry(self) -> dict[str, ConvGeometry]:
        """The operator geometry of every conv layer that has run (its input size and sweep)."""
        return {
            name: ConvGeometry.of(self._layers[name], size)
            for name, size in self.input_sizes.items()
        }

    def backward(
        self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext = SINGLE_PROCESS
    ) -> StepOutput:
        output = self.loss.select(model(x))
        loss = self.loss(output, y)
        scaled = ctx.scaled(loss)
        (error,) = torch.autograd.grad(scaled, output, retain_graph=True)
        scaled.backward()
        by_layer = {id(layer): name for name, layer in self._layers.items()}
        with torch.no_grad():
            for layer, gw, _ in self.zero.updates_for_error(x, error.detach()):
                self.predicted[by_layer[id(layer)]].add_(gw)
        return StepOutput(loss.detach(), output.detach())

    def changes(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer: (ΔW of BP so far, ΔŴ predicted by align-zero)}`` (both as descent steps).

        Conv2d kernels as they are (scored as operators); every other layer as its [out, in]
        matrix (:meth:`~decorrelate.layers.LayerKind.as_matrix`: Conv1d/3d kernels flattened).
        """
        out = {}
        for name, layer in self._layers.items():
            dw, dw_hat = weight_of(layer).detach() - self.initial[name], -self.predicted[name]
            if not isinstance(layer, nn.Conv2d):  # as [out, in]: HF Conv1D's is stored [in, out]
                kind = kind_of(layer)
                dw, dw_hat = kind.as_matrix(layer, dw), kind.as_matrix(layer, dw_hat)
            out[name] = (dw, dw_hat)
        return out

    def diagnostics(self) -> dict[str, float]:
        """``align_score/``, ``align_score_shuffled/`` and, for convs, ``align_score_kernel/``."""
        changes = self.changes()
        if all(float(dw.abs().max()) == 0 for dw, _ in changes.values()):
            return {}
        gen = torch.Generator().manual_seed(0)  # the control's shuffle is the same every epoch
        return alignment_scores(
            changes, probes=self.probes, generator=gen, geometry=self.geometry()
        )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            twin=self.zero.state_dict()["twin"],
            initial=self.initial,
            predicted=self.predicted,
            input_sizes=dict(self.input_sizes),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.zero.load_state_dict({"twin": state.get("twin")})
        for key in ("initial", "predicted"):
            for name, value in state.get(key, {}).items():
                getattr(self, key)[name].copy_(value)
        self.input_sizes.update({n: tuple(v) for n, v in state.get("input_sizes", {}).items()})
