"""Insert decorrelators before every Linear / Conv2d of any model, and drive them.

Five lines with your own model, optimizer and loop::

    decorrelate(model, "scaled")               # in place; outputs unchanged at init
    for x, y in batches:
        optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
        local_update(model)                    # each R learns from its stored subsample
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from ..errors import UserError
from .decorrelation import DecorConv2d, DecorLinear, Decorrelator
from .methods import DecorConfig

#: Layer types that get a decorrelator (exact types: subclasses may override ``forward``).
WRAPPED: dict[type[nn.Module], type[Decorrelator]] = {
    nn.Linear: DecorLinear,
    nn.Conv2d: DecorConv2d,
}


def decorrelate(
    model: nn.Module,
    method: str = "scaled",
    *,
    lr: float | None = None,
    kappa: float | None = None,
    sample_frac: float = 0.1,
    demean: bool = False,
    exclude: Iterable[str] = (),
    **method_options: Any,
) -> nn.Module:
    """Put a decorrelating matrix R (initially the identity) before every Linear and Conv2d.

    Works in place and returns ``model`` (a bare Linear/Conv2d cannot be changed in place: its
    wrapper is returned). Each layer is replaced by a :class:`DecorLinear` / :class:`DecorConv2d`
    that keeps the original layer as ``.layer``, so parameters keep their identity. The first
    layer and the classifier are included; ``exclude`` names modules (as in
    ``model.named_modules()``) to leave alone. Outputs are unchanged until the first
    :func:`local_update`.

    ``method`` is one of :data:`METHODS`; ``lr`` defaults per method (see
    :data:`~decorrelate.nn.methods.DEFAULT_LR`), ``kappa`` (dbp only) to 0.5. Further options
    (``max_samples``, ``max_norm``, ``var_floor``, ``momentum``, ``eps``, ``every``, ``blend``,
    ``iters``, ``fold``, ``block_size``, ``seed``) are described in :class:`DecorConfig`.
    Anything invalid raises :class:`~decorrelate.errors.UserError`.
    """
    config = DecorConfig.create(
        method, lr=lr, kappa=kappa, sample_frac=sample_frac, demean=demean, **method_options
    )
    if not isinstance(model, nn.Module):
        raise UserError(f"decorrelate() needs an nn.Module, got {type(model).__name__}")
    from ..layers.runtime import check_not_attached  # a rule's hooks would miss the wrappers

    check_not_attached(model)
    excluded = {exclude} if isinstance(exclude, str) else set(exclude)
    if decorrelators(model):
        raise UserError("the model is already decorrelated; convert a fresh model instead")
    candidates = {name: module for name, module in model.named_modules() if type(module) in WRAPPED}
    unknown = sorted(excluded - set(candidates))
    if unknown:
        listing = ", ".join(repr(n) for n in candidates) or "none"
        raise UserError(
            f"exclude names no Linear/Conv2d layer: {', '.join(map(repr, unknown))}; "
            f"the layers are: {listing}"
        )
    wrappers: dict[int, Decorrelator] = {}
    for name, module in candidates.items():
        if name not in excluded:
            wrappers[id(module)] = WRAPPED[type(module)](module, config, name)
    if not wrappers:
        raise UserError(
            "found no nn.Linear or nn.Conv2d layer to decorrelate"
            + (" (all excluded)" if candidates else "")
        )
    if id(model) in wrappers:
        return wrappers[id(model)]
    # Replace every reference (every path to it), so a shared layer gets one shared wrapper.
    paths = [
        name
        for name, module in model.named_modules(remove_duplicate=False)
        if id(module) in wrappers
    ]
    for path in paths:
        parent_path, _, child_name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, child_name, wrappers[id(getattr(parent, child_name))])
    return model


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
