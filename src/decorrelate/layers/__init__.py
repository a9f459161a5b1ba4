"""One notion of "a layer a rule acts on", shared by every learning rule and by decorrelation.

:class:`LayerKind` adapters say how to apply a layer's weight, form its local gradient and send an
error back through a replacement matrix; :func:`find_layers` lists a model's layers;
:func:`register_layer_kind` adds a user's own kind. See :mod:`decorrelate.layers.kinds`.
:func:`unroll` turns recurrent and attention modules into such layers (one Linear called per
time step, attention projections as Linear layers), keeping their Parameters.
"""

from .kinds import (
    ConvKind,
    EmbeddingKind,
    HFConv1DKind,
    LayerKind,
    LinearKind,
    NormKind,
    conv_explicit_pad,
    conv_padding,
)
from .registry import (
    bias_of,
    effective_weight,
    find_layers,
    inner_layer,
    input_grad,
    is_wrapper,
    kind_of,
    layer_kinds,
    loose_parameters,
    register_layer_kind,
    unregister_layer_kind,
    weight_grad,
    weight_of,
)
from .unroll import unroll
from .wrapper import LayerWrapper

__all__ = [
    "ConvKind",
    "EmbeddingKind",
    "HFConv1DKind",
    "LayerKind",
    "LayerWrapper",
    "LinearKind",
    "NormKind",
    "bias_of",
    "conv_explicit_pad",
    "conv_padding",
    "effective_weight",
    "find_layers",
    "inner_layer",
    "input_grad",
    "is_wrapper",
    "kind_of",
    "layer_kinds",
    "loose_parameters",
    "register_layer_kind",
    "unregister_layer_kind",
    "unroll",
    "weight_grad",
    "weight_of",
]
