"""What a training loop tells a learning rule about the step it asks for: :class:`StepContext`.

A rule's :meth:`~decorrelate.rules.LearningRule.backward` gets the context as an argument
(``rule.backward(model, x, y, ctx=ctx)``), and the decorrelators of the model get it from
:func:`decorrelate.nn.step_context`, which the loop wraps around the step. Nothing travels
through module globals or by changing the loss: a rule called without a context (a user's own
loop, one process) gets :data:`SINGLE_PROCESS`, which changes nothing.

Under torch.distributed (see :mod:`decorrelate.distributed`) the context says which rows of the
global batch this rank holds (:class:`BatchShard`: decorrelators choose their subsample and node
perturbation draws its noise for the global batch) and by how much this rank's loss is weighted
(:attr:`StepContext.loss_scale`), so that averaging the ranks' gradients gives the global batch
mean exactly even when the shards differ in size.

This module imports nothing of the package, so every layer (nn, rules, the loops) may use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class BatchShard:
    """This rank's rows ``[offset, offset + size)`` of a global batch of ``total`` rows."""

    offset: int
    size: int
    total: int

    def rows(self, batch: int, per_sample: int = 1) -> tuple[int, int] | None:
        """(offset, total) of this rank's rows within the global batch's rows, when a tensor
        with ``batch`` samples of ``per_sample`` rows each is this shard; None when it is not
        (another batch size: the rows are all there is) or when the shard is the whole batch."""
        if batch != self.size or self.size == self.total:
            return None
        return self.offset * per_sample, self.total * per_sample


@dataclass(frozen=True)
class StepContext:
    """One training step as the loop sees it.

    ``step``: the loop's step index (0 when unknown). ``shard``: where this process's batch lies
    in the global batch (None: one process, the batch is all there is). ``loss_scale``: the
    factor of this process's loss in the gradient, n_r·W/N for rank r of W holding n_r of the
    N samples (1 alone). Rules multiply the loss they differentiate by it
    (:meth:`scaled`) and report the unscaled loss in their
    :class:`~decorrelate.rules.StepOutput`.
    """

    step: int = 0
    shard: BatchShard | None = None
    loss_scale: float = 1.0

    @classmethod
    def of(cls, step: int, shard: BatchShard | None, world: int) -> StepContext:
        """The context of rank ``shard`` of ``world`` processes: its loss weighted by n_r·W/N,
        so that the mean over the ranks' gradients is the global batch mean."""
        if shard is None:
            return cls(step)
        return cls(step, shard, shard.size * world / shard.total)

    def scaled(self, loss: Tensor) -> Tensor:
        """``loss`` times :attr:`loss_scale` (the tensor itself when the scale is 1)."""
        return loss if self.loss_scale == 1.0 else loss * self.loss_scale

    def unscaled(self, loss: Tensor) -> Tensor:
        """A value computed from :meth:`scaled` losses, back on the loss's own scale."""
        return loss if self.loss_scale == 1.0 else loss / self.loss_scale


#: The context of a step outside any loop that says otherwise: one process, no scaling.
SINGLE_PROCESS = StepContext()
