"""The learning-rule protocol: **a learning rule is a way to fill ``.grad``.**

Every rule — backprop, feedback alignment, node perturbation, Align, the fixed-point rules — is
asked once per training step to run whatever forward (and backward) passes it needs on a batch and
to leave an update direction in ``param.grad`` of the trainable parameters. The training loop then
calls an ordinary ``torch.optim`` optimizer, and afterwards lets local learners in the model (the
decorrelation matrices R) update themselves. So every rule composes with every optimizer and every
decorrelation method, and one loop serves them all::

    rule.attach(model, loss, generator)        # once: prepare the model (hooks, buffers, twins)
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        out = rule.backward(model, x, y)       # forward pass(es); fills .grad; returns loss/output
        optimizer.step()
        local_update(model)                    # decorrelators learn from their stored subsample

How the other rule families fit this protocol (each prepares the model once, in :meth:`attach`,
through public PyTorch mechanisms — never by patching private APIs or swapping ``nn.Parameter``
objects inside ``forward``):

* **Feedback alignment (fa)**: ``attach`` registers a fixed random feedback matrix B per layer as a
  buffer and routes each layer (any layer kind) through a custom ``autograd.Function`` whose
  backward uses B instead of Wᵀ for the input gradient; ``backward`` is then plain autograd.
* **Direct feedback alignment (dfa)**: ``attach`` adds per-layer feedback buffers and hooks that
  inject Bₗ·e (e = output error) as the gradient of each hidden block's output; the error comes
  from a hook on the model output, so any block type may sit between feedback points.
* **Node perturbation (np/inp/anp)**: forward-only. ``backward`` runs under ``torch.no_grad()``
  a clean and K noisy forward calls on the same batch (noise added by forward hooks on every
  layer's output, drawn from the rule's own generator; the global random state replayed so
  dropout masks agree), forms per-sample loss differences and writes ⟨e zᵀ⟩ into
  ``weight.grad`` itself. No autograd graph is kept.
* **Align (align-zero/ada/prop)**: ``attach`` keeps a frozen deep copy of the model at
  initialisation (the twin; its weights are in the rule's ``state_dict``), ``backward`` takes the
  real network's output error and back-propagates it through the twin, writing the results into
  the real network's ``.grad``.
* **Fixed-point rules (euclidean/reparam/linearized)**: the model is a rate RNN whose forward
  solves for a fixed point; ``backward`` computes the implicit gradient or its reparameterised
  variant in closed form and writes it into ``W.grad``.

Rules that hold state (feedback matrices, twins, noise generators) return it from
:meth:`LearningRule.state_dict` so checkpoints resume exactly. State stored as model buffers is
saved with the model and needs nothing extra.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..losses import Loss, as_loss


class StepOutput(NamedTuple):
    """What a rule reports for one batch: the mean loss and the (clean) network output.

    Both are detached. The loop uses them for the running training loss and accuracy.
    """

    loss: Tensor
    output: Tensor


class LearningRule:
    """Base class of all learning rules. Subclasses set ``name`` and implement :meth:`backward`.

    Construct with keyword options (or from a run config with :meth:`from_config`), then call
    :meth:`attach` once before training. A rule instance belongs to one model.
    """

    name: ClassVar[str] = ""
    #: True if the rule only runs forward passes (no autograd graph is built).
    forward_only: ClassVar[bool] = False
    #: True if ``.grad`` comes from one ``backward()`` through the model's forward, which
    #: DistributedDataParallel all-reduces as it runs; False: the rule writes ``.grad`` itself
    #: and the training loop all-reduces it explicitly (see :mod:`decorrelate.distributed`).
    ddp_autograd: ClassVar[bool] = False
    #: The ``decorrelate`` command that trains with this rule: ``train`` (and ``compare``) for a
    #: rule that trains any network; a rule that needs a model only another command builds (the
    #: fixed-point rules' rate networks: ``fixedpoint``) names that command, and ``train`` does
    #: not offer it.
    command: ClassVar[str] = "train"
    #: True when ``.grad`` is the exact gradient of the loss (backprop; the fixed-point
    #: ``euclidean`` rule): the reference other rules are measured against, and what the
    #: diagnostics that assume the true gradient (``--alignment-score``) need.
    exact_gradient: ClassVar[bool] = False

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.loss: Loss = Loss()
        self.generator: torch.Generator | None = None

    @classmethod
    def from_config(cls, config: Any) -> LearningRule:
        """Build the rule from a run config (subclasses read their own options from it)."""
        return cls()

    def attach(
        self,
        model: nn.Module,
        loss: Loss | str | Callable[..., Tensor],
        generator: torch.Generator | None = None,
        example: Tensor | None = None,
    ) -> None:
        """Prepare ``model`` for this rule.

        ``loss`` is a :class:`~decorrelate.losses.Loss` (which also says how to pick the output
        tensor from a dict/tuple/``ModelOutput``), a built-in loss name or a callable
        ``fn(output, target)``.

        ``generator`` is the rule's own seeded RNG (feedback matrices, noise). ``example`` is an
        input batch for rules whose buffers depend on activation shapes (DFA): with it they are
        created now, so a checkpoint can be loaded right after ``attach``.
        """
        self.model = model
        self.loss = as_loss(loss)
        self.generator = generator

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Within the block, plain autograd on the model gives true BP gradients.

        Rules that change the backward pass (FA's hooks) switch that off here; the alignment
        metrics use it to get the BP reference on the same batch. Default: nothing to switch.
        """
        yield

    def detach(self) -> None:
        """Undo what :meth:`attach` changed in the model (hooks, wrappers). Default: nothing."""
        self.model = None

    def backward(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        """Run the rule on one batch and fill ``.grad`` of the trainable parameters."""
        raise NotImplementedError

    def diagnostics(self) -> dict[str, float]:
        """Rule-specific numbers to log once per epoch (default: none)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Rule state that is not in the model's buffers (the generator state, twins, ...)."""
        return {"generator": self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        gen_state = state.get("generator")
        if gen_state is not None and self.generator is not None:
            self.generator.set_state(gen_state)


_REGISTRY: dict[str, type[LearningRule]] = {}


def register_rule(name: str) -> Callable[[type[LearningRule]], type[LearningRule]]:
    """Class decorator: make a rule available by ``name`` (CLI, configs, :func:`get_rule`)."""

    def decorate(cls: type[LearningRule]) -> type[LearningRule]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"learning rule {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


#: The order in which rules are listed (help texts, error messages); others follow.
_LISTING_ORDER = (
    "bp",
    "fa",
    "dfa",
    "np",
    "inp",
    "anp",
    "align-zero",
    "align-ada",
    "align-prop",
    "last-layer",
)


def available_rules(command: str | None = None) -> tuple[str, ...]:
    """Names of the registered rules: the families in a fixed order, then any others.

    With ``command`` only the rules that command trains (:attr:`LearningRule.command`).
    """
    known = [n for n in _LISTING_ORDER if n in _REGISTRY]
    names = (*known, *(n for n in _REGISTRY if n not in _LISTING_ORDER))
    return tuple(n for n in names if command is None or _REGISTRY[n].command == command)


def rule_class(name: str) -> type[LearningRule]:
    """The rule class registered as ``name``; a :class:`UserError` listing the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(
            f"unknown rule {name!r}; choose one of: {', '.join(available_rules())}"
        ) from None


def get_rule(name: str, **options: Any) -> LearningRule:
    """Instantiate the rule registered as ``name`` with keyword options."""
    return rule_class(name)(**options)


_OPTIONS: list[type] = []


def register_options(cls: type) -> type:
    """Class decorator: a rule family's options, an option dataclass (:mod:`decorrelate.schema`).

    Its fields become fields of :class:`decorrelate.config.TrainConfig` (same flat names, flags
    and config-file keys), so the options are declared beside the rules that read them (in
    :meth:`LearningRule.from_config`). Families register when :mod:`decorrelate.rules` is
    imported, before the config is assembled.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass of opt() fields")
    if cls not in _OPTIONS:
        _OPTIONS.append(cls)
    return cls


def rule_options() -> tuple[type, ...]:
    """The option dataclasses registered by the rule families, in registration order."""
    return tuple(_OPTIONS)


#: Shorthand rule name → (rule, options the shorthand implies): see :func:`register_shorthand`.
_SHORTHANDS: dict[str, tuple[str, dict[str, Any]]] = {}


def register_shorthand(name: str, rule: str, decorrelation: dict[str, Any]) -> None:
    """Make ``name`` a shorthand for ``rule`` with decorrelation.

    ``decorrelation`` holds the ``decor`` method and the decor_* options it implies; they apply
    when the run asks for no decorrelation method of its own, each option unless given
    (:func:`decorrelate.config.expand_shorthands`).
    """
    if "decor" not in decorrelation:
        raise ValueError(f"shorthand {name!r} needs a decor method")
    _SHORTHANDS[name] = (rule, dict(decorrelation))


def shorthands() -> dict[str, tuple[str, dict[str, Any]]]:
    """The registered shorthand rule names: name → (rule, implied decorrelation options)."""
    return dict(_SHORTHANDS)


def accumulate_grad(param: Tensor | None, grad: Tensor) -> None:
    """Add a hand-computed update into ``param.grad`` (rules that write ``.grad`` themselves).

    Skips missing and frozen parameters; casts and reshapes to the parameter.
    """
    if param is None or not param.requires_grad:
        return
    grad = grad.to(param.dtype).reshape(param.shape)
    param.grad = grad if param.grad is None else param.grad + grad
