"""``unroll(model)``: recurrent and attention modules rebuilt from ``nn.Linear`` layers.

Rules and decorrelation act on layers (a weight applied linearly to an input). ``nn.RNN`` /
``nn.LSTM`` / ``nn.GRU``, their cells and ``nn.MultiheadAttention`` hide their weights inside fused
kernels; :func:`unroll` replaces each by an equivalent module whose weights sit in ``nn.Linear``
children (:mod:`.recurrent`, :mod:`.attention`) holding the same Parameter objects. Rules'
``attach`` and ``decorrelate()`` call it; users may call it themselves (before building the
optimizer or after: the Parameters are the same).
"""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from .attention import UnrolledAttention, unroll_attention
from .recurrent import (
    UnrolledGRUCell,
    UnrolledLSTMCell,
    UnrolledRNN,
    UnrolledRNNCell,
    is_recurrent,
    unroll_recurrent,
)

#: The module types :func:`unroll` produces.
UNROLLED_TYPES: tuple[type[nn.Module], ...] = (
    UnrolledRNN,
    UnrolledRNNCell,
    UnrolledLSTMCell,
    UnrolledGRUCell,
    UnrolledAttention,
)


def needs_unroll(module: nn.Module) -> bool:
    """Whether :func:`unroll` would replace ``module`` itself."""
    return is_recurrent(module) or isinstance(module, nn.MultiheadAttention)


def _replacement(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.MultiheadAttention):
        return unroll_attention(module)
    return unroll_recurrent(module)


def unroll(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``, ``nn.RNNCell`` /
    ``nn.LSTMCell`` / ``nn.GRUCell`` and ``nn.MultiheadAttention`` in ``model`` by its unrolled
    equivalent, and return ``model``.

    * The replacement computes the same outputs (to float rounding) from ``nn.Linear`` children
      that hold the original Parameter objects: an optimizer built before keeps working.
    * A module reachable by several paths (a shared cell) gets one shared replacement.
    * Idempotent: unrolled modules are left alone. If ``model`` itself is one of these modules,
      its replacement is returned (a module cannot replace itself in place).
    * An enclosing ``nn.TransformerEncoder``'s nested-tensor fast path is turned off (it would
      bypass the projections in eval mode).
    * State-dict keys of the replaced modules change (see :mod:`.recurrent`,
      :mod:`.attention`); the original keys still load. Hooks registered on a replaced module
      are not carried over.
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"unroll needs an nn.Module, got {type(model).__name__}")
    memo: dict[int, nn.Module] = {}

    def replace(module: nn.Module) -> nn.Module:
        if id(module) not in memo:
            memo[id(module)] = _replacement(module)
        return memo[id(module)]

    if needs_unroll(model):
        return replace(model)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and needs_unroll(child):
                parent._modules[name] = replace(child)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(getattr(layer, "self_attn", None), UnrolledAttention)
            for layer in module.layers
        ):
            module.use_nested_tensor = False
    return model


def unrolled_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The unrolled modules in ``model`` (name, module), in module order: what :func:`unroll`
    made of it."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, UNROLLED_TYPES)]
