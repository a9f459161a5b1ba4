"""The in-memory data set: two tensors, batches cut by indexing, fixed subsets and splits.

Every data set here is small enough to live in memory as one tensor, so batches are cut by
indexing with a permutation instead of going through a ``DataLoader`` (which would spend most of
its time in per-sample Python code). Shuffling (:func:`epoch_order`), the validation hold-out and
the training subset are all derived from fixed seeds, so a resumed run, every process of a sharded
run and every run of a sweep see the same examples in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from decorrelate.errors import UserError
from decorrelate.seeding import make_generator


@dataclass
class Dataset:
    """A labelled data set held as two tensors; batches are cut by indexing, not by a DataLoader.

    ``x`` is float32 ``[N, *input_shape]`` (token ids: int64) and ``y`` int64 ``[N]``, or
    ``[N, ...]`` for one label per position (next-token targets ``[N, T]``, see
    :mod:`decorrelate.text`).
    """

    x: Tensor
    y: Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.y.ndim < 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"Dataset {self.name!r}: x has {self.x.shape[0]} rows, y has shape "
                f"{tuple(self.y.shape)}; expected labels for each row"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example (``x.shape[1:]``)."""
        return tuple(self.x.shape[1:])

    def to(self, device: str | torch.device) -> Dataset:
        """The same data on ``device`` (both tensors moved; tensors already there are shared)."""
        return Dataset(self.x.to(device), self.y.to(device), self.num_classes, self.name)

    def subset(self, index: Tensor) -> Dataset:
        """The examples selected by ``index`` (index tensor or boolean mask) as a new Dataset."""
        index = index.to(self.x.device)
        return Dataset(self.x[index], self.y[index], self.num_classes, self.name)

    def batches(
        self, batch_size: int, *, order: Tensor | None = None, drop_last: bool = False
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)`` batches following ``order`` (None: sequential).

        ``order`` is normally a permutation of ``range(len(self))`` (see :func:`epoch_order`) but
        any 1-D index tensor works, e.g. one rank's shard of a permutation. The last, smaller
        batch is yielded unless ``drop_last``. Without ``order`` the batches are views.
        """
        _check_batch_size(batch_size)
        if order is not None:
            if order.ndim != 1 or order.dtype.is_floating_point or order.dtype == torch.bool:
                raise UserError(f"batch order must be a 1-D integer tensor, got {order.dtype}")
            order = order.to(device=self.x.device, dtype=torch.long)
        return self._iter_batches(batch_size, order, drop_last)

    def _iter_batches(
        self, batch_size: int, order: Tensor | None, drop_last: bool
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The generator behind :meth:`batches` (split off so argument errors raise at once)."""
        total = len(self) if order is None else int(order.numel())
        stop = total - total % batch_size if drop_last else total
        for start in range(0, stop, batch_size):
            if order is None:
                yield self.x[start : start + batch_size], self.y[start : start + batch_size]
            else:
                idx = order[start : start + batch_size]
                yield self.x[idx], self.y[idx]

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """How many batches :meth:`batches` yields for the whole set."""
        _check_batch_size(batch_size)
        n = len(self)
        return n // batch_size if drop_last else math.ceil(n / batch_size)


def _check_batch_size(batch_size: int) -> None:
    """Reject a batch size that is not a positive integer."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffling permutation of ``range(n)`` for epoch ``epoch`` of a run seeded ``seed``.

    Depends only on ``(n, seed, epoch)``, so a resumed run and every process of a sharded run
    recreate exactly the same order.
    """
    return torch.randperm(n, generator=make_generator(seed, "data-order", epoch))


@dataclass
class DataSplits:
    """Train/test (and optional validation) sets plus what was done to them.

    ``mean``/``std`` are what was subtracted from / divided into the [0, 1]-scaled inputs, per
    channel: the training statistics with ``normalize="standard"``, zeros and ones with
    ``"unit"``, zeros and 1/255 with ``"none"`` (raw pixel values). ``root`` is where the files
    were found.
    """

    train: Dataset
    test: Dataset
    val: Dataset | None
    root: Path | None
    mean: list[float]
    std: list[float]

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.train.input_shape


# --------------------------------------------------------------------------------------------
# Fixed subsets
# --------------------------------------------------------------------------------------------


def _split_validation(train: Dataset, val_split: float, key: str) -> tuple[Dataset, Dataset | None]:
    """Hold out ``val_split`` of ``train`` by a fixed permutation (independent of the run seed)."""
    if val_split == 0:
        return train, None
    n = len(train)
    n_val = max(1, round(val_split * n))
    if n_val >= n:
        raise UserError(f"val_split={val_split} leaves no training examples out of {n}")
    perm = torch.randperm(n, generator=make_generator(0, "val-split", key))
    val_idx = perm[:n_val].sort().values
    train_idx = perm[n_val:].sort().values
    return train.subset(train_idx), train.subset(val_idx)


def _take_train_subset(train: Dataset, train_size: int | None, key: str) -> Dataset:
    """The first ``train_size`` examples after a fixed shuffle (nested across sizes)."""
    if train_size is None:
        return train
    if train_size > len(train):
        raise UserError(
            f"train_size={train_size} exceeds the {len(train)} training examples of {key}"
        )
    perm = torch.randperm(len(train), generator=make_generator(0, "train-subset", key))
    return train.subset(perm[:train_size])
