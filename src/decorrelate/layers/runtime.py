"""What rules learn about a model at run time: the order its layers are called in, and which
modules a rule has prepared (so that :func:`decorrelate.nn.decorrelate` refuses to rebuild
them underneath it).

Module order (``named_modules``) is the order of ``__init__``, not of ``forward``: a head
defined first and called last is common. Rules that need "the readout" (the last layer called)
find it here with one forward of an example batch.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError

#: Layer module → name of the rule attached to it (weak: a dropped model leaves no trace).
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def layer_input(args: tuple, kwargs: dict) -> tuple[Any, Callable[[Tensor], tuple]]:
    """A layer call's input (the first positional argument, or ``input=``) and a function
    that rebuilds ``(args, kwargs)`` with a replacement for it (forward pre-hooks)."""
    if args:
        return args[0], lambda t: ((t, *args[1:]), kwargs)
    if "input" in kwargs:
        return kwargs["input"], lambda t: (args, {**kwargs, "input": t})
    return None, lambda t: (args, kwargs)


def call_order(
    model: nn.Module,
    layers: Sequence[nn.Module],
    example: Tensor,
    *,
    grad: bool = False,
    output: Callable[[Any], None] | None = None,
) -> list[tuple[nn.Module, Tensor | None]]:
    """``(layer, its input)`` for every call of one of ``layers`` in one forward of ``example``,
    in call order (a layer called k times appears k times).

    The forward runs on the first sample, in eval mode (restored after), so that batch-norm
    statistics, dropout masks and decorrelators are untouched; without a graph, or with
    ``grad`` with one (even inside ``torch.no_grad()``), so that an input's ``requires_grad``
    says whether it carries a gradient. ``output`` is called with the model's output.
    """
    seen: list[tuple[nn.Module, Tensor | None]] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((module, layer_input(args, kwargs)[0]))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in layers]
    try:
        with eval_mode(model), torch.set_grad_enabled(grad):
            out = model(example[:1])
        if output is not None:
            output(out)
    finally:
        for h in handles:
            h.remove()
    return seen


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` in eval mode within the block, and afterwards each one back in
    its own mode (``model.train(was)`` would also switch a submodule kept in eval mode):
    for probe forwards that must leave batch-norm statistics and dropout alone."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def mark_attached(rule_name: str, modules: Sequence[nn.Module]) -> None:
    """Record that rule ``rule_name`` has hooked ``modules`` (see :func:`check_not_attached`)."""
    for m in modules:
        _ATTACHED[m] = rule_name


def release(modules: Sequence[nn.Module]) -> None:
    """Undo :func:`mark_attached` (a rule's ``detach``)."""
    for m in modules:
        _ATTACHED.pop(m, None)


def check_not_attached(model: nn.Module) -> None:
    """Refuse to decorrelate a model a rule is attached to.

    Rules hook the layers they find at attach; ``decorrelate()`` would put new wrapper modules
    around them that the hooks never see, and fa/dfa/last-layer would silently compute BP.
    """
    for name, module in model.named_modules():
        rule = _ATTACHED.get(module)
        if rule is not None:
            raise UserError(
                f"rule {rule!r} is already attached to this model (layer {name or 'model'}); "
                "attach the rule after decorrelate(...)"
            )
