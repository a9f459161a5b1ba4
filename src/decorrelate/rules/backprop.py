"""Backpropagation: the reference every other rule is compared against."""

from __future__ import annotations

from torch import Tensor, nn

from .base import LearningRule, StepOutput, register_rule


@register_rule("bp")
class Backprop(LearningRule):
    """Ordinary backprop: one forward pass, ``loss.backward()`` fills ``.grad``."""

    ddp_autograd = True
    exact_gradient = True

    def backward(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        output = self.loss.select(model(x))
        loss = self.loss(output, y)
        loss.backward()
        return StepOutput(loss.detach(), output.detach())
