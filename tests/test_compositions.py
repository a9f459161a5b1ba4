"""Every learning rule × every decorrelation method trains through the public training loop.

The rules and methods are not listed here: they are every registered rule
(:func:`decorrelate.rules.available_rules`, those of ``decorrelate fixedpoint`` included), the
choices ``decorrelate train`` offers for ``rule`` (the shorthands dnp/dinp/danp too) and for
``decor`` (:data:`decorrelate.nn.METHODS`), so a rule or method registered later
is included automatically, and :func:`test_the_enumeration_is_complete` fails if the two ever
drift apart. Compositions that are not defined are listed, each with its reason, in the one table
:data:`UNDEFINED`; for those the test checks that the loop refuses them with a one-line
:class:`UserError`, so the table cannot hide a composition that works.

Every other pair trains a small MLP and a small conv net with batch norm for :data:`STEPS` steps
through :class:`decorrelate.train.Trainer` on the synthetic data set, with one batch holding the
whole training set (so every step's training loss is measured on the same examples and the
comparison with the first step is not batch noise). Checked:

* every step's loss is finite;
* every trainable parameter the rule trains got a finite ``.grad`` and moved; parameters the rule
  leaves alone (only rules in :data:`PARTIAL`) kept ``grad = None`` and did not move;
* every decorrelation matrix R moved when the run decorrelates (``dnp`` and friends decorrelate
  even with ``decor: none``, so this follows the built config, not the requested name);
* the training loss fell below 99 % of its start, except where :data:`NO_DESCENT` says why that
  is not robust.

Sizes, optimizers and learning rates were chosen so that the last point holds for seeds 0 to 3
on every pair (and 0 to 5 for the slowest rules): the smallest drop (fa, dfa and last-layer on the
conv net, seed 2) is about 3 %, against 13 % for the weakest rule on the MLP. Adam is too slow
on the NTK-parameterised conv net's N(0, 1) weights for FA/DFA to beat the threshold reliably in
20 steps, so that net trains with SGD.
"""

from __future__ import annotations

import math
from itertools import product

import pytest
import torch
from torch import nn

from decorrelate import UserError, make_config
from decorrelate.config import choices_of
from decorrelate.nn import METHODS, decorrelators
from decorrelate.rules import available_rules, rule_class, shorthands
from decorrelate.train import Trainer

#: The rules and decorrelation methods the training loop offers (what the CLI accepts).
#: Every registered rule (those of other commands included) and every shorthand.
RULES: tuple[str, ...] = tuple(dict.fromkeys((*available_rules(), *(choices_of("rule") or ()))))
DECORS: tuple[str, ...] = choices_of("decor") or ()

#: Training steps per composition. zca/newton first recompute R after 10 updates.
STEPS = 20

#: The two networks: an MLP, and a conv net with (affine-free) batch norm after every conv.
MODELS: dict[str, dict] = {
    "mlp": {"model": "mlp", "widths": [16]},
    "convnet-bn": {
        "model": "convnet-ntk",
        "channels": [4, 4],
        "widths": [16],
        "optimizer": "sgd",
        "lr": 0.1,
    },
}

#: One batch is the whole training set: every step's loss is on the same 128 examples.
BASE: dict = {
    "dataset": "synthetic",
    "synthetic_shape": [1, 8, 8],
    "synthetic_classes": 4,
    "synthetic_train": 128,
    "synthetic_test": 16,
    "batch_size": 128,
    "lr": 0.01,
    "epochs": 1,
    "threads": 1,
    "device": "cpu",
}

#: Compositions that are not defined, with the reason; each is checked to be refused.
UNDEFINED: dict[tuple[str, str], str] = {
    (rule, decor): (
        "a fixed-point rule trains a rate RNN solved to its fixed point (`decorrelate "
        "fixedpoint`); the feed-forward training loop has no such model"
    )
    for rule in available_rules()
    if rule_class(rule).command != "train"
    for decor in DECORS
}

#: Rules that train only some parameters by definition (the others keep ``grad = None``).
PARTIAL: dict[str, str] = {
    "last-layer": "trains the readout only; every other layer stays at its initial value",
}

#: (model, effective decor) pairs whose training loss need not fall within STEPS steps.
NO_DESCENT: dict[tuple[str, str], str] = {
    ("convnet-bn", method): (
        "exact whitening recomputes R every 10 steps and moves it a tenth of the way to the "
        "whitener at once; on the conv net's patches that jump raises the loss, and the slower "
        "rules (fa, dfa, np, last-layer) have not recovered within 20 steps"
    )
    for method in ("zca", "newton")
}

COMBOS = [
    (model, rule, decor)
    for model, rule, decor in product(MODELS, RULES, DECORS)
    if (rule, decor) not in UNDEFINED
]


def make_trainer(model: str, rule: str, decor: str, seed: int = 0) -> Trainer:
    """The public training path, as ``decorrelate train`` builds it, for one composition."""
    config = make_config(BASE, MODELS[model], {"rule": rule, "decor": decor, "seed": seed})
    return Trainer(config, log=None, progress=False)


def train_steps(trainer: Trainer, steps: int) -> list[float]:
    """Run ``steps`` single-step epochs; each step's training loss (before its update)."""
    return [trainer.train_epoch(epoch, max_steps=1)["train_loss"] for epoch in range(1, steps + 1)]


def readout_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the last module that owns any (the classifier)."""
    owners = [m for m in model.modules() if list(m.parameters(recurse=False))]
    return list(owners[-1].parameters(recurse=False))


def test_the_enumeration_is_complete():
    """Every registered rule, shorthand and method is enumerated, and the tables are not stale."""
    assert set(available_rules()) | set(shorthands()) <= set(RULES)
    assert set(choices_of("rule") or ()) <= set(RULES)
    assert ("none", *METHODS) == DECORS
    assert set(UNDEFINED) <= set(product(RULES, DECORS))
    assert {model for model, _ in NO_DESCENT} <= set(MODELS)
    assert {decor for _, decor in NO_DESCENT} <= set(DECORS)
    assert set(PARTIAL) <= set(RULES)
    trained = {(rule, decor) for _, rule, decor in COMBOS}
    assert trained | set(UNDEFINED) == set(product(RULES, DECORS))
    assert not trained & set(UNDEFINED)
    assert all(
        reason.strip() for table in (UNDEFINED, PARTIAL, NO_DESCENT) for reason in table.values()
    )


@pytest.mark.parametrize(("rule", "decor"), sorted(UNDEFINED), ids=map("-".join, sorted(UNDEFINED)))
def test_undefined_compositions_are_refused(rule, decor):
    for model in MODELS:
        with pytest.raises(UserError) as info:
            make_trainer(model, rule, decor)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(("model", "rule", "decor"), COMBOS, ids=map("-".join, COMBOS))
def test_composition_trains(model, rule, decor):
    trainer = make_trainer(model, rule, decor)
    net = trainer.model
    start = {name: p.detach().clone() for name, p in net.named_parameters() if p.requires_grad}
    r_start = {name: d.R.clone() for name, d in decorrelators(net)}
    assert bool(r_start) == (trainer.config.decor != "none")

    losses = train_steps(trainer, STEPS)

    assert all(math.isfinite(loss) for loss in losses), losses
    trainable = {name: p for name, p in net.named_parameters() if p.requires_grad}
    with_grad = {name for name, p in trainable.items() if p.grad is not None}
    if rule in PARTIAL:
        readout = {id(p) for p in readout_parameters(net)}
        assert with_grad == {name for name, p in trainable.items() if id(p) in readout}
    else:
        assert with_grad == set(trainable)
    for name, p in trainable.items():
        moved = not torch.equal(p.detach(), start[name])
        if name in with_grad:
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite grad"
            assert moved, f"{name} got a grad but did not move"
        else:
            assert not moved, f"{name} has no grad but moved"
    for name, d in decorrelators(net):
        assert torch.isfinite(d.R).all(), f"R of {name} is not finite"
        assert not torch.equal(d.R, r_start[name]), f"R of {name} did not move"
    if (model, trainer.config.decor) not in NO_DESCENT:
        assert losses[-1] < 0.99 * losses[0], f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
