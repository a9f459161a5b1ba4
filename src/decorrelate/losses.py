"""Losses on class-index targets — per sample or per token — with a per-sample mode for NP.

A :class:`Loss` does two things for the rules:

* :meth:`Loss.select` picks the output tensor from whatever the model returns: the tensor itself,
  a dict's or Hugging Face ``ModelOutput``'s ``"logits"``, a tuple's first element, or what the
  ``output=`` selector (a key, an attribute name, an index or a callable) says.
* ``loss(output, y, reduction)`` computes the loss on logits ``[B, K]`` with targets ``[B]``, or
  on token-level logits ``[B, ..., V]`` with targets ``[B, ...]`` (e.g. ``[B, T, V]`` and
  ``[B, T]`` for a language model), skipping targets equal to ``ignore_index`` (padding).

Reductions, for token-level targets (a ``[B]`` target is one token per sample, so all three are
the usual ones there):

* ``"mean"``: the mean over every non-ignored token of the batch — what
  ``F.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=...)`` gives.
* ``"sum"``: the sum over those tokens, so that ``sum / count(y) == mean`` and evaluation can
  add batches up exactly (:meth:`Loss.count`).
* ``"none"``: ONE loss per SAMPLE, ``[B]``: the mean over that sequence's non-ignored tokens (0
  for a sequence that has none, which then weighs nothing in a rule's update). Node perturbation
  needs it: its update correlates each sample's noise with that sample's loss change, so it
  needs a loss per sample, not per token and not per batch. The mean of these per-sample losses
  is the token mean only when every sequence has the same number of valid tokens; with padding
  of different lengths NP follows the gradient of the mean of per-sequence means, which weights
  every sequence equally rather than every token. ``mse-shifted`` is the Align paper's target:
  one-hot shifted by −0.1.

Regression: ``mse`` also takes float targets of the output's own shape (``[B, outputs]`` or a
sequence ``[B, T, outputs]``, the Add task of :mod:`decorrelate.data.addtask`): 0.5·‖f − y‖² per
position, averaged over a sample's positions, one loss per sample (see :meth:`Loss.regression`).
There is no accuracy then (:meth:`Loss.classifies`); the loop reports the loss.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError

LOSSES = ("cross-entropy", "mse", "mse-shifted")
REDUCTIONS = ("mean", "sum", "none")

#: What ``output=`` may be: a callable (raw output → tensor), a dict key or attribute name, a
#: tuple/list index, or None (the default choice, see :meth:`Loss.select`).
OutputSelector = Callable[[Any], Tensor] | str | int | None


def reduce(per_sample: Tensor, reduction: str) -> Tensor:
    """Per-sample losses → their mean (``"mean"``), sum (``"sum"``) or themselves (``"none"``)."""
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.mean()


class Loss:
    """A loss ``L(output, y)``: a built-in one by name, or any callable ``fn(output, y)``.

    ``name_or_callable``: ``"cross-entropy"``, ``"mse"``, ``"mse-shifted"`` (see
    :data:`LOSSES`), or a callable ``fn(output, target) -> Tensor`` returning the batch's mean
    loss. Node perturbation needs one loss per sample: a callable gives it if it accepts a
    ``reduction`` keyword (``fn(output, target, reduction="none")`` returning ``[B]``, or one
    value per target element, which is then averaged per sample over the non-ignored ones) or is
    a ``torch.nn`` loss module (its ``reduction`` is switched to ``"none"``); otherwise asking for
    ``reduction="none"`` is a :class:`UserError`. For a callable, ``"sum"`` is its mean times
    :meth:`count` (so evaluation adds batches up with token weights).

    ``output`` selects the tensor from what the model returns (see :meth:`select`);
    ``ignore_index`` is the target value to skip (padding tokens), as in ``F.cross_entropy``.

    A Loss holds no per-step state: under torch.distributed the rule weights the loss it
    differentiates by the step context's ``loss_scale``
    (:class:`decorrelate.context.StepContext`).
    """

    def __init__(
        self,
        name_or_callable: str | Callable[..., Tensor] = "cross-entropy",
        output: OutputSelector = None,
        ignore_index: int = -100,
    ) -> None:
        self.fn: Callable[..., Tensor] | None = None
        if isinstance(name_or_callable, str):
            if name_or_callable not in LOSSES:
                raise UserError(
                    f"unknown loss {name_or_callable!r}; choose one of: {', '.join(LOSSES)}, "
                    "or pass a callable fn(output, target)"
                )
            self.name = name_or_callable
        elif isinstance(name_or_callable, Loss):
            raise UserError("Loss(...) got a Loss; use it directly (or as_loss(loss))")
        elif callable(name_or_callable):
            self.fn = name_or_callable
            self.name = _callable_name(name_or_callable)
        else:
            raise UserError(
                f"a loss is a name ({', '.join(LOSSES)}) or a callable fn(output, target), "
                f"got {type(name_or_callable).__name__}"
            )
        if not (output is None or callable(output) or _is_index(output)):
            raise UserError(
                f"output= selects the model's output tensor: a dict key or attribute name (str), "
                f"a tuple index (int) or a callable, got {type(output).__name__}"
            )
        if not _is_int(ignore_index):
            raise UserError(f"ignore_index must be an int, got {ignore_index!r}")
        self.output = output
        self.ignore_index = int(ignore_index)
        self._per_sample_fn = self._make_per_sample_fn()

    # -------------------------------------------------------------- output selection
    def select(self, raw: Any) -> Tensor:
        """The output tensor in ``raw``, what the model returned.

        With a callable ``output`` selector: ``output(raw)``. Otherwise a tensor is returned as
        it is (so selecting twice is harmless), and from a container ``output`` picks the
        entry: a key of a dict (or Hugging Face ``ModelOutput``, a dict with attributes), an
        attribute of another object, an index of a tuple/list. Without a selector a dict or
        object with ``"logits"`` gives its logits and a tuple/list its first element; anything
        else is a :class:`UserError` saying to pass ``output=``.
        """
        sel = self.output
        if sel is not None and not _is_index(sel):  # a callable
            value = sel(raw)
            if not isinstance(value, Tensor):
                raise UserError(
                    f"the output selector {_callable_name(sel)} returned a "
                    f"{type(value).__name__}, not a tensor"
                )
            return value
        if isinstance(raw, Tensor):
            return raw
        if sel is None:
            value = _default_output(raw)
        elif isinstance(sel, str):
            value = _by_key(raw, sel)
        else:
            value = _by_index(raw, sel)
        if not isinstance(value, Tensor):
            got = "None" if value is None else f"a {type(value).__name__}"
            raise UserError(
                f"the model output's {_describe(sel)} is {got}, not a tensor; pass output= (a "
                "key, attribute name, index or callable) to Loss to say which tensor is the output"
            )
        return value

    # -------------------------------------------------------------- the loss
    @property
    def per_sample(self) -> bool:
        """Whether ``reduction="none"`` can give one loss per sample (node perturbation)."""
        return self.fn is None or self._per_sample_fn is not None

    def __call__(self, output: Any, y: Tensor, reduction: str = "mean") -> Tensor:
        """The loss of ``output`` (a tensor, taken as already selected, or a raw model output,
        which is selected first) against targets ``y``; see the module docstring for the
        reductions."""
        if reduction not in REDUCTIONS:
            raise UserError(f"unknown reduction {reduction!r}; choose one of: mean, sum, none")
        if not isinstance(output, Tensor):
            output = self.select(output)
        if self.fn is not None:
            return self._call_fn(output, y, reduction)
        if self.regression(output, y):
            return self._regression(output, y, reduction)
        self._check_shapes(output, y)
        return self._builtin(output, y, reduction)

    def _builtin(self, output: Tensor, y: Tensor, reduction: str) -> Tensor:
        if self.name == "cross-entropy" and output.dim() <= 2:  # [B, K]: torch's own reductions
            return F.cross_entropy(output, y, reduction=reduction, ignore_index=self.ignore_index)
        mask = y != self.ignore_index
        if self.name == "cross-entropy":
            flat = F.cross_entropy(
                output.reshape(-1, output.shape[-1]),
                y.reshape(-1),
                reduction="none",
                ignore_index=self.ignore_index,
            )
            per_token = flat.reshape(y.shape)  # 0 where ignored
        else:
            # Sum over outputs: the per-token loss is 0.5·‖f(x) − t‖².
            target = self.target(torch.where(mask, y, 0), output.shape[-1]).to(output.dtype)
            per_token = 0.5 * (output - target).pow(2).sum(-1) * mask
        return self._reduce_tokens(per_token, mask, reduction)

    def regression(self, output: Tensor, y: Tensor) -> bool:
        """Whether ``y`` is a regression target of ``output``: ``mse`` with float targets of the
        output's own shape (e.g. a sequence ``[B, T, outputs]``, the Add task)."""
        return (
            self.fn is None
            and self.name == "mse"
            and y.dtype.is_floating_point
            and tuple(y.shape) == tuple(output.shape)
        )

    def _regression(self, output: Tensor, y: Tensor, reduction: str) -> Tensor:
        """0.5·‖f(x) − y‖² per position (summed over the last dim, the outputs), averaged over
        the positions of a sample (time steps): one loss per sample, then ``reduction`` over
        them. So ``"sum"`` / :meth:`count` (one per sample) is the mean, and the gradient's
        scale does not grow with the sequence length."""
        per_position = 0.5 * (output - y.to(output.dtype)).pow(2)
        if output.dim() > 1:
            per_position = per_position.sum(-1)
        per_sample = per_position.reshape(output.shape[0], -1).mean(1)
        return reduce(per_sample, reduction)

    def _reduce_tokens(self, per_token: Tensor, mask: Tensor, reduction: str) -> Tensor:
        """Per-token losses (0 where ignored) → token mean, token sum, or per-sample means."""
        if reduction == "sum":
            return per_token.sum()
        if reduction == "mean":
            return per_token.sum() / mask.sum().clamp(min=1)
        if per_token.dim() == 1:
            return per_token
        valid = mask.reshape(mask.shape[0], -1).sum(1).clamp(min=1)
        return per_token.reshape(per_token.shape[0], -1).sum(1) / valid

    def _check_shapes(self, output: Tensor, y: Tensor) -> None:
        if self.name == "mse" and y.dtype.is_floating_point:
            raise UserError(
                f"the regression targets {tuple(y.shape)} do not fit the output "
                f"{tuple(output.shape)}: loss 'mse' on float targets needs both of one shape"
            )
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise UserError(
                f"loss {self.name!r} needs class-index targets (integers), got {y.dtype}; for "
                "regression targets of the output's shape use loss 'mse', or pass a loss callable"
            )
        if output.dim() != y.dim() + 1 or output.shape[:-1] != y.shape:
            raise UserError(
                f"the output {tuple(output.shape)} does not fit the targets {tuple(y.shape)}: "
                f"loss {self.name!r} expects logits [B, ..., classes] for targets [B, ...]"
            )

    def _make_per_sample_fn(self) -> Callable[[Tensor, Tensor], Tensor] | None:
        """``fn`` with ``reduction="none"``, or None if the callable cannot give that."""
        fn = self.fn
        if fn is None:
            return None
        if isinstance(fn, nn.modules.loss._Loss):
            unreduced = copy.copy(fn)
            unreduced.reduction = "none"
            return unreduced
        if _accepts_reduction(fn):
            return functools.partial(fn, reduction="none")
        return None

    def _call_fn(self, output: Tensor, y: Tensor, reduction: str) -> Tensor:
        assert self.fn is not None
        if reduction != "none":
            value = self.fn(output, y)
            if not isinstance(value, Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise UserError(
                    f"the loss {self.name} returned {shape}, not one number (the batch's mean)"
                )
            value = value.reshape(())
            return value * self.count(y) if reduction == "sum" else value
        if self._per_sample_fn is None:
            raise UserError(
                f"the loss {self.name} cannot give one loss per sample, which this rule needs: "
                "pass a loss that accepts reduction='none' (fn(output, target, reduction='none') "
                "returning [B] or one value per target), a torch.nn loss module, or a built-in "
                f"loss ({', '.join(LOSSES)})"
            )
        value = self._per_sample_fn(output, y)
        batch = y.shape[0]
        if isinstance(value, Tensor) and value.shape == (batch,):  # one per sample already
            return value
        if not isinstance(value, Tensor) or value.numel() != y.numel():
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise UserError(
                f"the loss {self.name} with reduction='none' returned {shape}; expected one "
                f"loss per sample [{batch}] or one per target {tuple(y.shape)}"
            )
        mask = y != self.ignore_index
        return self._reduce_tokens(value.reshape(y.shape) * mask, mask, "none")

    # -------------------------------------------------------------- helpers for the loop
    def target(self, y: Tensor, num_classes: int) -> Tensor:
        """The regression target for the MSE losses (one-hot, optionally shifted by −0.1)."""
        t = F.one_hot(y, num_classes).to(torch.get_default_dtype())
        return t - 0.1 if self.name == "mse-shifted" else t

    def count(self, y: Tensor) -> Tensor:
        """How many targets ``"mean"`` averages over: the non-ignored entries of ``y`` (for
        targets ``[B]``, the batch size); floating-point targets count one per sample."""
        if y.dtype.is_floating_point:
            return torch.tensor(y.shape[0], device=y.device)
        return (y != self.ignore_index).sum()

    def classifies(self, y: Tensor) -> bool:
        """Whether an accuracy means anything for targets ``y`` (class indices, not regression
        values); the training loop reports accuracy nan otherwise."""
        return not y.dtype.is_floating_point

    def correct(self, output: Tensor, y: Tensor) -> Tensor:
        """How many non-ignored targets the argmax of ``output`` gets right (token accuracy for
        ``[B, T, V]``); 0 for targets that are not class indices of ``output``."""
        if y.dtype.is_floating_point or output.shape[:-1] != y.shape:
            return torch.zeros((), dtype=torch.int64, device=y.device)
        return ((output.argmax(-1) == y) & (y != self.ignore_index)).sum()

    def __repr__(self) -> str:
        parts = [repr(self.name) if self.fn is None else self.name]
        if self.output is not None:
            sel = self.output
            parts.append(f"output={sel!r}" if _is_index(sel) else f"output={_callable_name(sel)}")
        if self.ignore_index != -100:
            parts.append(f"ignore_index={self.ignore_index}")
        return f"Loss({', '.join(parts)})"


def as_loss(
    loss: Loss | str | Callable[..., Tensor] | None,
    output: OutputSelector = None,
    ignore_index: int | None = None,
) -> Loss:
    """A :class:`Loss` from a Loss, a built-in name or a callable (None: cross-entropy).

    ``output`` / ``ignore_index`` given here apply to a name or callable; a Loss keeps its own
    (giving them for a Loss as well is a :class:`UserError`, rather than silently choosing one).
    """
    if isinstance(loss, Loss):
        if output is not None or ignore_index is not None:
            raise UserError(
                f"{loss!r} already has its output selector and ignore_index; pass output= and "
                "ignore_index= to Loss(...) instead"
            )
        return loss
    return Loss(
        "cross-entropy" if loss is None else loss,
        output=output,
        ignore_index=-100 if ignore_index is None else ignore_index,
    )


# ----------------------------------------------------------------------------- helpers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_index(sel: Any) -> bool:
    """A key/attribute name or a tuple index (as opposed to a callable selector)."""
    return isinstance(sel, str) or _is_int(sel)


def _callable_name(fn: Any) -> str:
    if isinstance(fn, functools.partial):
        return f"partial({_callable_name(fn.func)})"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if not isinstance(name, str) or isinstance(fn, nn.Module):
        name = type(fn).__name__
    return name


def _accepts_reduction(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(
        (p.name == "reduction" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        or p.kind == p.VAR_KEYWORD
        for p in params
    )


def _describe(sel: str | int | None) -> str:
    return "default output" if sel is None else f"entry {sel!r}"


def _default_output(raw: Any) -> Any:
    """``raw["logits"]`` / ``raw.logits`` / ``raw[0]``, or a UserError naming the type."""
    if isinstance(raw, Mapping):
        if "logits" in raw:
            return raw["logits"]
        keys = ", ".join(repr(k) for k in raw)
        raise UserError(
            f"the model returned a {type(raw).__name__} with keys {keys or '(none)'} and no "
            "'logits'; pass output='<key>' (or a callable) to Loss to say which is the output"
        )
    if isinstance(raw, Sequence) and not isinstance(raw, str) and len(raw) > 0:
        return raw[0]
    if getattr(raw, "logits", None) is not None:
        return raw.logits
    raise UserError(
        f"the model returned a {type(raw).__name__}, not a tensor, dict, tuple or object with "
        "logits; pass output= (a key, attribute name, index or callable) to Loss to say which "
        "tensor is the output"
    )


def _by_key(raw: Any, key: str) -> Any:
    if isinstance(raw, Mapping) and key in raw:
        return raw[key]
    if hasattr(raw, key):
        return getattr(raw, key)
    keys = f" (keys: {', '.join(repr(k) for k in raw)})" if isinstance(raw, Mapping) else ""
    raise UserError(
        f"the model returned a {type(raw).__name__} without {key!r}{keys}; pass the right "
        "output= key or attribute name to Loss"
    )


def _by_index(raw: Any, index: int) -> Any:
    if isinstance(raw, Sequence) and not isinstance(raw, str) and -len(raw) <= index < len(raw):
        return raw[index]
    what = f"of length {len(raw)}" if isinstance(raw, Sequence) else "that cannot be indexed"
    raise UserError(
        f"output={index} picks a tuple entry, but the model returned a {type(raw).__name__} "
        f"{what}; pass the right output= to Loss"
    )
