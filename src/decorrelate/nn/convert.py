"""Insert decorrelators before every decorrelable layer of any model, drive them, fold them.

Five lines with your own model, optimizer and loop::

    decorrelate(model, "scaled")               # in place; outputs unchanged at init
    for x, y in batches:
        optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
        local_update(model)                    # each R learns from its stored subsample
    plain = fold(model)                        # a plain model with each R folded into its W
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..context import StepContext
from ..errors import UserError
from ..layers import LayerKind, NormKind, kind_of, unroll
from ..layers.runtime import check_not_attached
from .decorrelation import Decorrelator, wrapper_for
from .methods import DecorConfig


def _overrides_forward(module: nn.Module, kind: LayerKind) -> bool:
    """Whether ``module`` subclasses a torch layer class (Linear, Conv2d, ...) but computes
    something else: a built-in kind's ``apply`` is that class's forward, so R could not be folded
    into what the module does. A registered kind is trusted with its own modules."""
    if not type(kind).__module__.startswith("decorrelate.layers"):
        return False
    for cls in type(module).__mro__:
        if cls is nn.Module:
            break
        if cls.__module__.startswith("torch.nn"):  # the nearest torch class (maybe itself)
            return type(module).forward is not cls.forward
    return False


def _plan(
    model: nn.Module, excluded: set[str]
) -> tuple[dict[str, tuple[nn.Module, LayerKind]], list[str]]:
    """The layers to decorrelate (name → (module, kind)) and, for each layer left out that is
    not excluded, one "'name' (Type: reason)" line. Normalisation layers are not layers to
    decorrelate (their input is normalised per unit; the next layer gets the R) and are not
    listed; neither are modules without parameters of their own."""
    chosen: dict[str, tuple[nn.Module, LayerKind]] = {}
    left_out: list[str] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in seen:
            continue
        kind = kind_of(module)
        if name in excluded or kind is not None:
            seen.update(id(m) for m in module.modules())
        if name in excluded:
            continue
        label = f"{name or 'the model'!r} ({type(module).__name__}: "
        if kind is not None:
            if isinstance(kind, NormKind):
                continue
            if not kind.decorrelable:
                left_out.append(label + f"{kind.why_not})")
            elif _overrides_forward(module, kind):
                left_out.append(
                    label + "it overrides its base class's forward, so R cannot be folded into "
                    "what it computes; register a LayerKind for it)"
                )
            else:
                chosen[name] = (module, kind)
            continue
        own = [n for n, p in module.named_parameters(recurse=False) if p is not None]
        if own:
            left_out.append(
                label + f"no layer kind covers its parameters {', '.join(own)}; register one "
                "with decorrelate.layers.register_layer_kind)"
            )
    return chosen, left_out


def decorrelate(
    model: nn.Module,
    method: str = "scaled",
    *,
    lr: float | None = None,
    kappa: float | None = None,
    sample_frac: float = 0.1,
    demean: bool = False,
    exclude: Iterable[str] = (),
    strict: bool = False,
    **method_options: Any,
) -> nn.Module:
    """Put a decorrelating matrix R (initially the identity) before every decorrelable layer.

    The layers are those whose :func:`~decorrelate.layers.kind_of` is ``decorrelable``:
    ``nn.Linear`` and its subclasses that keep Linear's forward, ``nn.Conv1d``/``Conv2d``/
    ``Conv3d`` with any stride, dilation, padding mode and groups (a grouped or depthwise
    convolution gets a block-diagonal R, one block per group), Hugging Face's ``Conv1D``, and
    registered decorrelable kinds. Recurrent and attention modules are first turned into Linear
    layers by :func:`decorrelate.layers.unroll`, so their projections get an
    R each.

    Works in place and returns ``model`` (a bare layer cannot be changed in place: its wrapper
    is returned). Each layer is replaced by a :class:`DecorLinear` / :class:`DecorConv` that
    keeps the original layer as ``.layer``, so parameters keep their identity. The first layer
    and the classifier are included; ``exclude`` names modules (as in ``model.named_modules()``)
    to leave alone, with everything inside them. Outputs are unchanged until the first
    :func:`local_update`.

    Every other layer left out gets named, with the reason, in ONE warning (or, with
    ``strict=True``, a :class:`~decorrelate.errors.UserError`): an ``nn.Embedding`` (its input is
    an index), a Linear/conv subclass whose forward differs, a module holding parameters that no
    layer kind covers. Normalisation layers are not warned about: they are not layers to
    decorrelate (the layer after them gets its R).

    ``method`` is one of :data:`METHODS`; ``lr`` defaults per method (see
    :data:`~decorrelate.nn.methods.DEFAULT_LR`), ``kappa`` (dbp only) to 0.5. Further options
    (``max_samples``, ``max_norm``, ``var_floor``, ``momentum``, ``eps``, ``every``, ``blend``,
    ``iters``, ``fold``, ``block_size``, ``block_above``, ``seed``) are described in
    :class:`DecorConfig`; by default R is block-diagonal on layers wider than 4096 inputs
    (``block_above=None``: full R everywhere, the paper's method). Anything invalid raises
    :class:`~decorrelate.errors.UserError`.
    """
    config = DecorConfig.create(
        method, lr=lr, kappa=kappa, sample_frac=sample_frac, demean=demean, **method_options
    )
    if not isinstance(model, nn.Module):
        raise UserError(f"decorrelate() needs an nn.Module, got {type(model).__name__}")
    check_not_attached(model)  # a rule's hooks would miss the wrappers
    excluded = {exclude} if isinstance(exclude, str) else set(exclude)
    if decorrelators(model):
        raise UserError("the model is already decorrelated; convert a fresh model instead")
    model = unroll(model)  # recurrent and attention modules → Linear layers
    candidates, left_out = _plan(model, excluded)
    unknown = sorted(excluded - {name for name, _ in model.named_modules()})
    if unknown:
        listing = ", ".join(repr(n) for n in candidates) or "none"
        raise UserError(
            f"exclude names no module of the model: {', '.join(map(repr, unknown))}; "
            f"the layers are: {listing}"
        )
    if left_out:
        message = f"decorrelate() left out {len(left_out)} layer(s): {'; '.join(left_out)}" + (
            ""
            if strict
            else ". Pass exclude=[...] to leave them out knowingly, or strict=True to make "
            "this an error"
        )
        if strict:
            raise UserError(message)
        warnings.warn(message, stacklevel=2)
    hooked = [name or "the model" for name, (m, _) in candidates.items() if _has_hooks(m)]
    if hooked:
        raise UserError(
            f"layer(s) {', '.join(map(repr, hooked))} carry forward/backward hooks (a learning "
            "rule attached already?); a decorrelated layer computes W R x itself, so they would "
            "never run again: call decorrelate() before attaching the rule"
        )
    wrappers: dict[int, Decorrelator] = {}
    for name, (module, kind) in candidates.items():
        wrappers[id(module)] = wrapper_for(kind)(module, config, name, kind=kind)
    if not wrappers:
        raise UserError(
            "found no layer to decorrelate (Linear, Conv1d/2d/3d, Hugging Face Conv1D or a "
            "registered decorrelable kind)" + (" (all excluded)" if excluded else "")
        )
    if id(model) in wrappers:
        return wrappers[id(model)]
    _replace(model, wrappers)
    return model


def _has_hooks(module: nn.Module) -> bool:
    """Whether hooks are registered on ``module`` itself (a wrapper would bypass them)."""
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(module, n, None) for n in names)


def _replace(model: nn.Module, new: dict[int, nn.Module]) -> None:
    """Replace every reference (every path) to the modules keyed by id in ``new``, so a shared
    module gets one shared replacement."""
    paths = [
        name for name, module in model.named_modules(remove_duplicate=False) if id(module) in new
    ]
    for path in paths:
        parent_path, _, child_name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, child_name, new[id(getattr(parent, child_name))])


def fold(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` with each R folded into its layer's weight: every wrapper is
    replaced by (a copy of) the layer it wraps, whose weight becomes the effective W R.

    For a convolution W R is the kernel on the patch view (block-diagonal per group), for
    Hugging Face's ``Conv1D`` the transposed weight. Its outputs equal the decorrelated model's
    (up to rounding: 1e-5 in float32) in training and in eval mode. With ``demean`` the forward
    never subtracts the running mean (it only enters R's statistics), so the bias needs no
    change. R is computed into W in R's precision (float32 for bf16/fp16 layers), then cast to
    the weight's dtype. The result holds no class of this library (when ``model``'s own classes
    are torch's, it unpickles without ``decorrelate`` installed); ``model`` is left unchanged.
    Hooks or attributes that learning rules attached are copied with the model as they are.
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"fold() needs an nn.Module, got {type(model).__name__}")
    plain = copy.deepcopy(model)
    layers: dict[int, nn.Module] = {}
    for _, wrapper in decorrelators(plain):
        layer = wrapper.layer
        weight = wrapper.kind.weight(layer)
        with torch.no_grad():
            weight.copy_(wrapper.fold(weight.to(wrapper.R.dtype)).to(weight.dtype))
        layers[id(wrapper)] = layer
    if not layers:
        raise UserError("fold() found no decorrelated layer in the model")
    if id(plain) in layers:
        return layers[id(plain)]
    _replace(plain, layers)
    return plain


def decorrelators(model: nn.Module) -> list[tuple[str, Decorrelator]]:
    """The decorrelated layers of ``model`` with their qualified names, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Decorrelator)]


def local_update(model: nn.Module) -> None:
    """Update every decorrelator's R from the subsample stored by the last training forward.

    Call once per step, after ``optimizer.step()``. Layers with nothing stored are skipped.
    Raises :class:`~decorrelate.errors.TrainingDiverged` naming the layer if an R explodes.
    """
    for _, module in decorrelators(model):
        module.update()


def local_stats(model: nn.Module, *, cond: bool = True) -> dict[str, float]:
    """Per-layer diagnostics, flattened: ``{"decor/<layer>/<stat>": value}``.

    Stats: ``R_norm``, ``cond`` (skip the O(d³) SVD with ``cond=False``), ``offdiag``,
    ``offdiag_input``, ``power_ratio``; see :meth:`Decorrelator.stats`.
    """
    out: dict[str, float] = {}
    for _, module in decorrelators(model):
        for key, value in module.stats(cond=cond).items():
            out[f"decor/{module.name}/{key}"] = value
    return out


@contextmanager
def capturing(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, training-mode forwards store (``enabled``) or skip storing subsamples.

    By default a decorrelator stores its subsample only when autograd is recording. A rule that
    trains with forward passes under ``torch.no_grad()`` wraps its clean pass in
    ``with capturing(model):`` (and leaves noisy passes outside) so that R learns from clean
    inputs. The previous setting is restored on exit.
    """
    modules = [m for _, m in decorrelators(model)]
    previous = [m.capture for m in modules]
    for m in modules:
        m.capture = enabled
    try:
        yield
    finally:
        for m, value in zip(modules, previous, strict=True):
            m.capture = value


@contextmanager
def step_context(model: nn.Module, ctx: StepContext | None) -> Iterator[None]:
    """Within the block, the decorrelators of ``model`` know the step's batch shard.

    The training loop wraps each step in it (``ctx`` is the one it passes to the rule), so that
    under torch.distributed every decorrelator chooses its subsample on the global batch and
    keeps the rows this rank holds (:func:`decorrelate.nn.sampling.global_rows`); the gathered
    union is then the single-process subsample. None, or a context without a shard (one
    process), changes nothing. The previous shards are restored on exit.
    """
    modules = [m for _, m in decorrelators(model)]
    previous = [m.shard for m in modules]
    shard = None if ctx is None else ctx.shard
    for m in modules:
        m.shard = shard
    try:
        yield
    finally:
        for m, value in zip(modules, previous, strict=True):
            m.shard = value
