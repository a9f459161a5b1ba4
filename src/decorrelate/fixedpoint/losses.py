"""The regression loss of the teacher task: ½‖r − r̂‖² per sample, averaged over the batch.

It has the call signature of :class:`decorrelate.losses.Loss` (``loss(output, target,
reduction)``), so the rules and the loop use either without knowing which.
"""

from __future__ import annotations

from torch import Tensor

from ..errors import UserError
from ..losses import reduce


class TargetLoss:
    """``0.5 · Σ_units (output − target)²`` per sample; mean (default), sum or none over samples.

    Summing over units and averaging over samples is the convention of the project's ``mse`` loss
    and makes the learning rates of the paper's teacher experiment (0.03 … 3) meaningful.
    """

    name = "half-squared-error"

    def __call__(self, output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        if output.shape != target.shape:
            raise UserError(
                f"target shape {list(target.shape)} does not match output {list(output.shape)}"
            )
        return reduce(0.5 * (output - target).square().sum(-1), reduction)

    def __repr__(self) -> str:
        return "TargetLoss()"
