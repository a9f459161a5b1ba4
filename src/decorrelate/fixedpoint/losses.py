"""The regression loss of the teacher task, in the paper's convention: J = ⟨‖r − r̂‖²⟩.

Zhu & Rosenbaum (and the authors' notebook ``LinearNDdW123``) define the teacher loss as
J(W) = (1/m) Σ_b ‖r_b − r̂_b‖², *without* a factor ½, so ∂J/∂r_b = (2/m)(r_b − r̂_b). Using the same J
here means a learning rate η taken from the paper gives the paper's step unchanged (with a ½ the
step would be half as long). It has the call signature of :class:`decorrelate.losses.Loss`
(``loss(output, target, reduction)``), so the rules and the loop use either without knowing which.
"""

from __future__ import annotations

from torch import Tensor

from ..errors import UserError
from ..losses import reduce


class TargetLoss:
    """``Σ_units (output − target)²`` per sample; mean (default), sum or none over samples.

    This is the paper's J (no ½, unlike the project's ``mse`` loss): the learning rates of the
    paper's teacher experiment (η ∈ {0.03, 0.1, 0.3, 1, 3}) carry over unchanged.
    """

    name = "squared-error"

    def __call__(self, output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        if output.shape != target.shape:
            raise UserError(
                f"target shape {list(target.shape)} does not match output {list(output.shape)}"
            )
        return reduce((output - target).square().sum(-1), reduction)

    def __repr__(self) -> str:
        return "TargetLoss()"
