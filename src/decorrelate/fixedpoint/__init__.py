"""Fixed points of recurrent rate networks: solver, implicit gradient, reparameterised rules.

Zhu & Rosenbaum (2024), "Learning fixed points of recurrent networks by reparameterising the
model". A rate network τ dr/dt = −r + f(W r + X) responds to an input with its fixed point
r* = f(W r* + X). Importing this package registers the rules ``euclidean``, ``bptt``, ``reparam``,
``linearized`` and ``linearized-g`` with :mod:`decorrelate.rules`; each fills ``W.grad`` of a
:class:`RateRNN`, so any ``torch.optim`` optimizer applies it (plain SGD, as in the paper, is the
default of the tasks)::

    from decorrelate import Loss, get_rule
    from decorrelate.fixedpoint import RateRNN
    gen = torch.Generator().manual_seed(0)
    model = RateRNN(300, inputs=784, outputs=10, activation="tanh", generator=gen)
    rule = get_rule("linearized"); rule.attach(model, Loss("cross-entropy"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches:
        opt.zero_grad(); rule.backward(model, x, y); opt.step()

``model(x)`` is itself differentiable in W (its backward is the implicit gradient), so plain
``loss.backward()`` works as well. The tasks (linear teacher, MNIST, loss landscape) are in
:mod:`.tasks` and :mod:`.landscape`, driven by the one step loop of :mod:`.loop`; the command line
is :mod:`.cli`. A learning-rate sweep is a plan of the experiment layer (run kind ``fixedpoint``,
:mod:`decorrelate.experiments.fixedpoint_sweep`); the paper's experiments are
``decorrelate reproduce zhu2024``.
"""

from .activations import ACTIVATIONS, get_activation
from .diagnostics import angle_degrees, max_real_eig, max_real_eig_gain
from .gradients import (
    euclidean_gradient,
    gradient_wrt_A,
    linearized_g_update,
    linearized_update,
    reparam_target,
    response_matrix,
)
from .losses import TargetLoss
from .model import RateRNN
from .rules import (
    BPTT,
    FIXEDPOINT_RULES,
    Euclidean,
    FixedPointRule,
    Linearized,
    LinearizedG,
    Reparam,
)
from .solver import (
    FixedPoint,
    FixedPointNotConverged,
    SolverConfig,
    solve_adjoint,
    solve_fixed_point,
)

__all__ = [
    "ACTIVATIONS",
    "BPTT",
    "FIXEDPOINT_RULES",
    "Euclidean",
    "FixedPoint",
    "FixedPointNotConverged",
    "FixedPointRule",
    "Linearized",
    "LinearizedG",
    "RateRNN",
    "Reparam",
    "SolverConfig",
    "TargetLoss",
    "angle_degrees",
    "euclidean_gradient",
    "get_activation",
    "gradient_wrt_A",
    "linearized_g_update",
    "linearized_update",
    "max_real_eig",
    "max_real_eig_gain",
    "reparam_target",
    "response_matrix",
    "solve_adjoint",
    "solve_fixed_point",
]
