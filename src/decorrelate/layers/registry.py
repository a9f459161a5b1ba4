"""Which modules are layers, in one registry, and the helpers rules use on them.

:func:`kind_of` answers "what kind of layer is this module" for every rule and for
decorrelation; :func:`find_layers` lists a model's layers; :func:`weight_grad` /
:func:`input_grad` handle a decorrelated wrapper (a = W R x) as one layer whose effective weight
is W R, so rules never look inside it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..errors import UserError
from .kinds import ConvKind, EmbeddingKind, HFConv1DKind, LayerKind, LinearKind, NormKind
from .wrapper import LayerWrapper

_BUILTIN: tuple[LayerKind, ...] = (
    LinearKind(),
    HFConv1DKind(),
    ConvKind(),
    EmbeddingKind(),
    NormKind(),
)
_USER: list[LayerKind] = []


def register_layer_kind(kind: LayerKind) -> LayerKind:
    """Make every rule (and decorrelation, if ``kind.decorrelable``) handle a new kind of layer.

    User kinds are asked before the built-in ones, so a kind may also take over a built-in type
    (e.g. a Linear subclass whose forward differs). Registering the same kind twice is a no-op;
    returns ``kind``.
    """
    if not isinstance(kind, LayerKind):
        raise UserError(
            f"register_layer_kind needs a LayerKind instance, got {type(kind).__name__}"
        )
    if type(kind).matches is LayerKind.matches or type(kind).apply is LayerKind.apply:
        raise UserError(f"the layer kind {type(kind).__name__} must define matches() and apply()")
    if kind not in _USER:
        _USER.insert(0, kind)
    return kind


def unregister_layer_kind(kind: LayerKind) -> None:
    """Undo :func:`register_layer_kind` (tests, notebooks)."""
    if kind in _USER:
        _USER.remove(kind)


def layer_kinds() -> tuple[LayerKind, ...]:
    """Every kind, in the order they are asked: user kinds (newest first), then the built-in."""
    return (*_USER, *_BUILTIN)


def is_wrapper(module: nn.Module) -> bool:
    """A :class:`~decorrelate.layers.wrapper.LayerWrapper`, such as a decorrelated layer
    (:class:`decorrelate.nn.Decorrelator`: R before ``.layer``)."""
    return isinstance(module, LayerWrapper)


def inner_layer(module: nn.Module) -> nn.Module:
    """The layer itself: inside a decorrelated wrapper its ``.layer``, else ``module``."""
    return module.layer if is_wrapper(module) else module


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind of ``module`` (of the layer inside a decorrelated wrapper), or None."""
    module = inner_layer(module)
    for kind in layer_kinds():
        if kind.matches(module):
            return kind
    return None


def _own_parameters(module: nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters(recurse=False) if p is not None]


def find_layers(model: nn.Module, *, norms: bool = False) -> list[tuple[str, nn.Module]]:
    """The layers of ``model`` a rule acts on, in module order (rules that need forward order
    find it at run time), with their qualified names.

    A decorrelated wrapper is one layer (its ``.layer`` is not listed again). Normalisation
    layers are included only with ``norms=True`` (rules that form their update themselves);
    otherwise they sit between layers with their ordinary local gradients. Parameters of a
    module that also has children (a positional embedding, a class token) are not a layer:
    see :func:`loose_parameters`. A module without children that holds parameters and that no
    kind covers raises one :class:`UserError` naming it. A model with no layer is refused.
    Recurrent and attention modules are first unrolled in place (:func:`~decorrelate.layers.unroll`:
    the same Parameters, now held by Linear layers called once per step), so that every rule
    that asks for the layers sees them; ``model`` itself must not be such a module.
    """
    from .unroll import unroll

    if unroll(model) is not model:
        raise UserError(
            f"the model is a bare {type(model).__name__}; call model = "
            "decorrelate.layers.unroll(model) first, or put it inside a module"
        )
    found: list[tuple[str, nn.Module]] = []
    inside: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        kind = kind_of(module)
        if kind is not None:
            if isinstance(kind, NormKind) and not norms:
                continue
            found.append((name, module))
            inside.update(id(m) for m in module.modules())
            continue
        if _own_parameters(module) and not list(module.children()):
            raise UserError(
                f"{name or 'the model'} is a {type(module).__name__} with parameters "
                f"({', '.join(_own_parameters(module))}) of a kind this rule does not know; "
                "register it with decorrelate.layers.register_layer_kind (see its docstring) "
                "or train it with rule bp"
            )
    if not any(not isinstance(kind_of(m), NormKind) for _, m in found):
        raise UserError(
            "the model has no layer this rule can train (Linear, convolution, Conv1D, Embedding "
            "or a registered kind)"
        )
    return found


def loose_parameters(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Trainable parameters that belong to no layer (nor normalisation layer): e.g. a learned
    positional embedding or class token held by a container module."""
    owned: set[int] = set()
    for _, module in model.named_modules():
        if kind_of(module) is not None:
            owned.update(id(p) for p in inner_layer(module).parameters())
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]


def weight_of(module: nn.Module) -> Tensor:
    """The trainable weight Parameter of a layer (the wrapped W for a decorrelated one)."""
    kind = _kind(module)
    return kind.weight(inner_layer(module))


def bias_of(module: nn.Module) -> Tensor | None:
    """The bias Parameter of a layer, or None."""
    return _kind(module).bias(inner_layer(module))


def effective_weight(module: nn.Module) -> Tensor:
    """The weight the layer applies to its raw input: W, or W R for a decorrelated layer."""
    if is_wrapper(module):
        return module.effective_weight()
    return weight_of(module)


def _kind(module: nn.Module) -> LayerKind:
    kind = kind_of(module)
    if kind is None:
        raise UserError(f"{type(inner_layer(module)).__name__} is not a layer of a known kind")
    return kind


def weight_grad(
    module: nn.Module, inputs: Sequence[Tensor], errors: Sequence[Tensor]
) -> tuple[Tensor, Tensor | None]:
    """Σ over calls of ⟨e aᵀ⟩ for the layer's trainable weight, and Σ e for its bias.

    ``inputs`` are the raw inputs of each call of ``module`` and ``errors`` per-sample errors at
    its outputs. For a decorrelated wrapper the result is the gradient for the wrapped W through
    the effective weight W R: ⟨e xᵀ⟩ Rᵀ = ⟨e (R x)ᵀ⟩; the wrapper's
    :meth:`~decorrelate.nn.Decorrelator.weight_grad` chooses the cheaper order.
    """
    kind = _kind(module)
    layer = inner_layer(module)
    if is_wrapper(module):
        return module.local_weight_grad(kind, inputs, errors)
    return kind.weight_grad(layer, inputs, errors)


def input_grad(module: nn.Module, delta: Tensor, x: Tensor, weight: Tensor) -> Tensor | None:
    """The error ``delta`` at the layer's output sent to its raw input ``x`` through ``weight``
    (shaped like the weight) in place of W; for a decorrelated layer through ``weight`` R, i.e.
    on to x through Rᵀ as well. None when the layer's input takes no error (an index)."""
    kind = _kind(module)
    layer = inner_layer(module)
    if is_wrapper(module):
        return module.local_input_grad(kind, delta, x, weight)
    return kind.input_grad(layer, delta, x, weight)
