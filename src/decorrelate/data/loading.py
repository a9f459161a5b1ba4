"""The public entry point :func:`load_dataset`: find or make a data set, split and scale it.

Composes the other modules in a fixed order — read the files (or generate the synthetic set),
hold out the validation split, take the training subset, then normalise with statistics of what
is left for training — and is the only place that order is written down.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from decorrelate.errors import UserError

from .addtask import make_add_task_sets
from .catalog import UNSCALED, _canonical_name
from .dataset import DataSplits, _split_validation, _take_train_subset
from .locate import _find_or_download
from .sources import _load_files
from .synthetic import make_synthetic
from .transforms import _normalize_splits


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    val_split: float = 0.0,
    train_size: int | None = None,
    normalize: str | bool = "standard",
    download: bool = True,
    synthetic_shape: Sequence[int] = (3, 32, 32),
    synthetic_classes: int = 10,
    synthetic_train: int = 5000,
    synthetic_test: int = 1000,
    synthetic_seed: int = 0,
) -> DataSplits:
    """Load ``name`` (one of :data:`DATASETS`) into memory, split and normalise it.

    ``val_split`` holds out that fraction of the training set with a fixed permutation (the same
    in every run, whatever the run seed), ``train_size`` then keeps a fixed random subset of that
    many training examples, and ``normalize`` (one of :data:`NORMALIZATIONS`) scales the inputs:
    ``"standard"`` standardises each channel with statistics of the final training set,
    ``"unit"`` keeps pixels/255 in [0, 1] (the node perturbation authors' scaling), ``"none"``
    gives the raw pixel values 0…255. The synthetic data set has no pixels: ``"unit"`` and
    ``"none"`` both leave it as generated. ``True``/``False`` mean ``"standard"``/``"unit"``
    (the earlier boolean option). Raises :class:`UserError` for bad arguments and
    :class:`DataError` when the files are missing or damaged.
    """
    key = _canonical_name(name)
    _check_split_args(val_split, train_size)
    root: Path | None = None
    if key == "synthetic":
        train, test = make_synthetic(
            synthetic_shape, synthetic_classes, synthetic_train, synthetic_test, synthetic_seed
        )
    elif key == "add-task":
        train, test = make_add_task_sets(
            synthetic_shape, synthetic_train, synthetic_test, synthetic_seed
        )
    else:
        root = _find_or_download(key, data_dir, download)
        train, test = _load_files(key, root)
    train, val = _split_validation(train, val_split, key)
    train = _take_train_subset(train, train_size, key)
    if key in UNSCALED:
        mean, std = [0.0], [1.0]
    else:
        mean, std = _normalize_splits(train, val, test, normalize, pixels=key != "synthetic")
    return DataSplits(train=train, test=test, val=val, root=root, mean=mean, std=std)


def _check_split_args(val_split: float, train_size: int | None) -> None:
    """Reject a validation fraction outside [0, 1) and a non-positive training size."""
    if not isinstance(val_split, int | float) or not 0.0 <= float(val_split) < 1.0:
        raise UserError(f"val_split must be a fraction in [0, 1), got {val_split!r}")
    if train_size is not None and (
        isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1
    ):
        raise UserError(f"train_size must be a positive integer, got {train_size!r}")
