"""Datasets held in memory as tensors: MNIST, Fashion-MNIST, CIFAR-10/100 and a synthetic one.

Every dataset here is small enough to live in memory as one float32 tensor, so batches are cut by
indexing with a permutation instead of going through a ``DataLoader`` (which would spend most of
its time in per-sample Python code). Files are read in their original formats — IDX ``.gz`` files
for (Fashion-)MNIST, the python-pickle tarball or its extracted folder for CIFAR — and checked
before use, so a missing, truncated or corrupt file ends in one :class:`DataError` line that names
the file, never in a numpy or gzip traceback.

Where files are looked for:

1. the ``data_dir`` argument (``--data-dir``), else ``$DECORRELATE_DATA``. A location given this
   way is authoritative: it is the only one searched, and when it is missing or incomplete the
   error names it and the missing files (never a silent fall-back to another copy or a download).
   Without one, the first directory that holds all required files wins:
2. ``./data`` and ``../shared/data`` relative to the working directory,
3. a ``shared/data`` folder beside an ancestor of this source file (:data:`SHARED_FALLBACK_ROOTS`),
   so a checkout finds the shared copy from any working directory,
4. for MNIST and Fashion-MNIST only: a download into ``./data/<name>/`` (md5-checked), unless
   ``download=False`` or ``$DECORRELATE_NO_DOWNLOAD`` is set.

In each root both ``<root>/<name>/`` and ``<root>/`` itself are tried, so ``--data-dir`` may point
at the folder holding the data set's files or at a folder of data sets. For CIFAR a root may hold
the tarball or the extracted folder (``cifar-10-batches-py/`` / ``cifar-100-python/``), or be that
extracted folder itself.

Integrity checks: IDX files are always md5-verified against :data:`IDX_MD5`. A CIFAR tarball is
md5-verified when its file name has an entry in :data:`CIFAR_MD5` (the official names do), and the
number of examples read is compared with :data:`CIFAR_COUNTS` (an entry of ``None`` skips that
check). Tests that build tiny fake files patch these module-level dicts; nothing else does.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import math
import os
import pickle
import shutil
import tarfile
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from decorrelate.errors import DataError, UserError
from decorrelate.seeding import make_generator

__all__ = [
    "CIFAR_COUNTS",
    "CIFAR_MD5",
    "DATASETS",
    "IDX_FILES",
    "IDX_MD5",
    "SHARED_FALLBACK_ROOTS",
    "DataSplits",
    "Dataset",
    "epoch_order",
    "load_dataset",
    "make_synthetic",
    "resolve_root",
]

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = (
    "mnist",
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "synthetic",
    "add-task",
)
#: Data sets generated from the ``synthetic_*`` options (no files). ``add-task``
#: (:mod:`decorrelate.addtask`) is a regression set of sequences, never normalised.
GENERATED: tuple[str, ...] = ("synthetic", "add-task")
#: How inputs are scaled (see :func:`load_dataset`): standardised per channel, pixels/255, raw.
NORMALIZATIONS: tuple[str, ...] = ("standard", "unit", "none")

_DISPLAY_NAMES = {
    "mnist": "MNIST",
    "fashion-mnist": "Fashion-MNIST",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "synthetic": "synthetic",
    "add-task": "Add task",
}
_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
}

# --------------------------------------------------------------------------------------------
# File constants
# --------------------------------------------------------------------------------------------

#: The four original IDX files of MNIST and Fashion-MNIST (same names for both).
IDX_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

#: md5 of the original ``.gz`` files (the published checksums; also in shared/data/*/MD5SUMS).
IDX_MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

#: Public mirrors tried in order by the download fallback (file name is appended).
IDX_MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
}

#: Seconds to wait for a mirror before giving up on it.
DOWNLOAD_TIMEOUT = 30.0

#: md5 of the official CIFAR python tarballs, keyed by file name.
CIFAR_MD5: dict[str, str] = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
}

#: Expected (train, test) example counts; ``None`` skips the check.
CIFAR_COUNTS: dict[str, tuple[int, int] | None] = {
    "cifar10": (50000, 10000),
    "cifar100": (50000, 10000),
}


@dataclass(frozen=True)
class _CifarSpec:
    """Where a CIFAR variant keeps its pickles and which key holds the labels."""

    tarball: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int

    @property
    def files(self) -> tuple[str, ...]:
        return self.train_files + self.test_files


_CIFAR: dict[str, _CifarSpec] = {
    "cifar10": _CifarSpec(
        tarball="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key=b"labels",
        num_classes=10,
    ),
    "cifar100": _CifarSpec(
        tarball="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key=b"fine_labels",
        num_classes=100,
    ),
}

# --------------------------------------------------------------------------------------------
# In-memory datasets
# --------------------------------------------------------------------------------------------


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
# Public entry point
# --------------------------------------------------------------------------------------------


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
        train, test = _make_add_task(
            synthetic_shape, synthetic_train, synthetic_test, synthetic_seed
        )
    else:
        root = _find_or_download(key, data_dir, download)
        train, test = _load_files(key, root)
    train, val = _split_validation(train, val_split, key)
    train = _take_train_subset(train, train_size, key)
    if key == "add-task":  # the task's own bits: no scaling (not a normalisable image)
        mean, std = [0.0], [1.0]
    else:
        mean, std = _normalize_splits(train, val, test, normalize, pixels=key != "synthetic")
    return DataSplits(train=train, test=test, val=val, root=root, mean=mean, std=std)


def resolve_root(name: str, data_dir: str | Path | None = None) -> Path | None:
    """The directory holding ``name``'s files, or None (synthetic data, or nothing found).

    Searches the places listed in the module docstring but never downloads. For CIFAR the answer
    is the folder holding the tarball, or the extracted folder itself.
    """
    key = _canonical_name(name)
    if key in GENERATED:
        return None
    for directory in _search_dirs(key, data_dir):
        if _has_required_files(key, directory):
            return directory
    return None


def _canonical_name(name: str) -> str:
    """Map a user-given data set name (any case, a few aliases) to one of :data:`DATASETS`."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return key


def _check_split_args(val_split: float, train_size: int | None) -> None:
    """Reject a validation fraction outside [0, 1) and a non-positive training size."""
    if not isinstance(val_split, int | float) or not 0.0 <= float(val_split) < 1.0:
        raise UserError(f"val_split must be a fraction in [0, 1), got {val_split!r}")
    if train_size is not None and (
        isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1
    ):
        raise UserError(f"train_size must be a positive integer, got {train_size!r}")


# --------------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------------


def _find_shared_roots() -> list[Path]:
    """``<ancestor>/shared/data`` for the nearest ancestor of this file that has one (or none).

    A checkout lives at ``<work>/<repo>`` with the shared data at ``<work>/shared/data``; walking
    up instead of counting levels also covers worktrees nested deeper.
    """
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data"
        if candidate.is_dir():
            return [candidate]
    return []


#: Source-relative fallback roots (step 3 of the search); tests set this to ``[]``.
SHARED_FALLBACK_ROOTS: list[Path] = _find_shared_roots()


def _explicit_root(data_dir: str | Path | None) -> tuple[Path, str] | None:
    """The location the user named (``--data-dir``, else ``$DECORRELATE_DATA``) and how."""
    if data_dir is not None and str(data_dir) != "":
        return Path(os.path.abspath(Path(data_dir).expanduser())), "--data-dir"
    env_dir = os.environ.get("DECORRELATE_DATA", "")
    if env_dir:
        return Path(os.path.abspath(Path(env_dir).expanduser())), "DECORRELATE_DATA"
    return None


def _candidate_roots(data_dir: str | Path | None) -> list[Path]:
    """The roots to search, in priority order, absolute and without duplicates.

    An explicit location (:func:`_explicit_root`) is the only root: it is authoritative.
    """
    explicit = _explicit_root(data_dir)
    if explicit is not None:
        return [explicit[0]]
    roots = [Path("data"), Path("..") / "shared" / "data", *SHARED_FALLBACK_ROOTS]
    return _unique_absolute(roots)


def _looked_dirs(key: str, data_dir: str | Path | None) -> list[Path]:
    """Per candidate root, ``<root>/<name>`` then ``<root>`` (what error messages list)."""
    dirs: list[Path] = []
    for root in _candidate_roots(data_dir):
        dirs += [root / key, root]
    return _unique_absolute(dirs)


def _search_dirs(key: str, data_dir: str | Path | None) -> list[Path]:
    """Every directory that may hold the files, in priority order.

    CIFAR adds the extracted folder inside each looked-at directory, since a directory holding
    only that folder should work as well as one holding the tarball.
    """
    dirs: list[Path] = []
    for base in _looked_dirs(key, data_dir):
        dirs.append(base)
        if key in _CIFAR:
            dirs.append(base / _CIFAR[key].folder)
    return _unique_absolute(dirs)


def _unique_absolute(paths: list[Path]) -> list[Path]:
    """Absolute, ``..``-free versions of ``paths``, dropping any that resolve to an earlier one.

    ``..`` is folded lexically (``os.path.abspath``) rather than by resolving symlinks, so messages
    show the paths as the user would type them.
    """
    seen: set[Path] = set()
    unique: list[Path] = []
    for path in paths:
        path = Path(os.path.abspath(path))
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(path)
    return unique


def _required_files(key: str) -> tuple[str, ...]:
    """File names that must all be present (for CIFAR: those of the extracted folder)."""
    return _CIFAR[key].files if key in _CIFAR else IDX_FILES


def _has_required_files(key: str, directory: Path) -> bool:
    """Whether ``directory`` holds a complete copy (for CIFAR: the tarball or all pickles)."""
    if key in _CIFAR and (directory / _CIFAR[key].tarball).is_file():
        return True
    return all((directory / f).is_file() for f in _required_files(key))


def _find_or_download(key: str, data_dir: str | Path | None, download: bool) -> Path:
    """The directory with ``key``'s files; downloads (MNIST family) or raises DataError."""
    dirs = _search_dirs(key, data_dir)
    for directory in dirs:
        if _has_required_files(key, directory):
            return directory
    explicit = _explicit_root(data_dir)
    if explicit is not None:
        raise DataError(_one_line(_explicit_missing_message(key, *explicit, dirs)))
    note = ""
    if key in IDX_MIRRORS:
        if not download:
            note = " (download=False)"
        elif _downloads_disabled():
            note = " (download disabled by DECORRELATE_NO_DOWNLOAD)"
        else:
            try:
                return _download_idx(key)
            except (OSError, ValueError, DataError) as exc:
                note = f" (download failed: {exc})"
    message = _not_found_message(key, _looked_dirs(key, data_dir), dirs)
    raise DataError(_one_line(message + note))


def _downloads_disabled() -> bool:
    """True when ``$DECORRELATE_NO_DOWNLOAD`` is set to anything but empty, 0, false or no."""
    value = os.environ.get("DECORRELATE_NO_DOWNLOAD", "").strip().lower()
    return value not in ("", "0", "false", "no")


def _not_found_message(key: str, looked: list[Path], searched: list[Path]) -> str:
    """One line: which files are needed, where we looked, and where to put them."""
    display = _DISPLAY_NAMES[key]
    if key in _CIFAR:
        spec = _CIFAR[key]
        need = f"{spec.tarball} or the extracted folder {spec.folder}/ ({', '.join(spec.files)})"
        advice = (
            f"get the python version from https://www.cs.toronto.edu/~kriz/cifar.html and put "
            f"{spec.tarball} in ./data/{key}/"
        )
    else:
        need = ", ".join(IDX_FILES)
        advice = f"put the original .gz files in ./data/{key}/"
    partial = _partial_copies(key, searched)
    return (
        f"{display} not found: need {need} in one of: {', '.join(map(str, looked))}{partial}; "
        f"{advice} or pass --data-dir / set DECORRELATE_DATA"
    )


def _explicit_missing_message(key: str, root: Path, source: str, searched: list[Path]) -> str:
    """One line: the named location lacks the data set; which files, and what exists there."""
    display = _DISPLAY_NAMES[key]
    if key in _CIFAR:
        spec = _CIFAR[key]
        need = f"{spec.tarball} or the extracted folder {spec.folder}/ ({', '.join(spec.files)})"
    else:
        need = ", ".join(IDX_FILES)
    if not root.exists():
        found = f"{root} does not exist"
    elif not root.is_dir():
        found = f"{root} is not a directory"
    else:
        found = _partial_copies(key, searched).strip(" ()") or "none of these files is there"
    looked = ", ".join(map(str, _looked_dirs(key, root)))
    return (
        f"{display} not found in {source} {root}: {found}; need {need} in one of: {looked}. "
        f"A location given by --data-dir or DECORRELATE_DATA is the only one searched: fix it, "
        "or leave it unset to search ./data and ../shared/data"
    )


def _partial_copies(key: str, dirs: list[Path]) -> str:
    """A note on directories holding some but not all required files (often a failed copy)."""
    notes = []
    for directory in dirs:
        present = [f for f in _required_files(key) if (directory / f).is_file()]
        if present:
            missing = [f for f in _required_files(key) if f not in present]
            notes.append(f"{directory} lacks {', '.join(missing)}")
    return f" (incomplete: {'; '.join(notes)})" if notes else ""


def _one_line(text: str) -> str:
    """Join line breaks with spaces, so exception texts embedded in messages stay on one line."""
    return " ".join(line.strip() for line in text.splitlines())


# --------------------------------------------------------------------------------------------
# Download (MNIST family only)
# --------------------------------------------------------------------------------------------


def _download_idx(key: str) -> Path:
    """Fetch the four IDX files into ``./data/<key>/`` from the first working mirror.

    Files already there with the right md5 are kept. Each file is md5-checked before it gets its
    final name, so an interrupted download never leaves a plausible-looking file behind.
    """
    dest = Path("data").absolute() / key
    dest.mkdir(parents=True, exist_ok=True)
    for fname in IDX_FILES:
        target = dest / fname
        expected = IDX_MD5[key][fname]
        if target.is_file() and _md5(target) == expected:
            continue
        _fetch_from_mirrors(IDX_MIRRORS[key], fname, target, expected)
    return dest


def _fetch_from_mirrors(mirrors: Sequence[str], fname: str, target: Path, md5: str) -> None:
    """Download ``fname`` from the first mirror that delivers it with the right md5."""
    errors = []
    for base in mirrors:
        url = base + fname
        log.info("downloading %s", url)
        try:
            _fetch(url, target, md5)
            return
        except (OSError, ValueError, DataError) as exc:
            errors.append(f"{url}: {exc}")
    raise DataError(f"could not download {fname}: {'; '.join(errors)}")


def _fetch(url: str, target: Path, md5: str) -> None:
    """Download ``url`` to ``target`` via a ``.part`` file, verifying its md5."""
    part = target.with_name(target.name + ".part")
    try:
        with (
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response,
            part.open("wb") as out,
        ):
            shutil.copyfileobj(response, out)
        _verify_md5(part, md5, shown=target)
        part.replace(target)
    finally:
        part.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _md5(path: Path) -> str:
    """Hex md5 of a file, read in chunks."""
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_md5(path: Path, expected: str, *, shown: Path | None = None) -> None:
    """Raise DataError naming the file when its md5 differs from ``expected``."""
    try:
        got = _md5(path)
    except OSError as exc:
        raise DataError(_one_line(f"cannot read {shown or path}: {exc}")) from exc
    if got != expected:
        raise DataError(
            f"{shown or path}: checksum does not match (expected md5 {expected}, got {got}); "
            "the file is corrupt or truncated — delete it and fetch the original again"
        )


def _load_files(key: str, root: Path) -> tuple[Dataset, Dataset]:
    """Read the train and test sets of ``key`` from the directory ``root``."""
    if key in _CIFAR:
        return _load_cifar(key, root)
    return _load_idx_dataset(key, root)


_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file into an array, checking the header against the payload size.

    Layout: two zero bytes, a dtype code, the number of dimensions, one big-endian uint32 per
    dimension, then the values in C order.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = bytearray(f.read())
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(_one_line(f"{path}: cannot decompress ({exc})")) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {bytes(raw[:4]).hex()})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: IDX header is truncated or declares {ndim} dimensions")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header declares shape {dims} ({expected} bytes) but the payload "
            f"has {len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=header).reshape(dims)


def _load_idx_dataset(key: str, root: Path) -> tuple[Dataset, Dataset]:
    """MNIST or Fashion-MNIST train/test sets from the md5-verified IDX files in ``root``."""
    for fname in IDX_FILES:
        _verify_md5(root / fname, IDX_MD5[key][fname])
    train = _idx_pair(key, root / IDX_FILES[0], root / IDX_FILES[1])
    test = _idx_pair(key, root / IDX_FILES[2], root / IDX_FILES[3])
    return train, test


def _idx_pair(key: str, images_path: Path, labels_path: Path) -> Dataset:
    """One split: 28×28 uint8 images scaled to [0, 1] as ``[N, 1, 28, 28]``, labels 0..9."""
    images = _read_idx(images_path)
    labels = _read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(
            f"{images_path}: expected uint8 images of shape [N, 28, 28], "
            f"got {images.dtype} {list(images.shape)}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{labels_path}: expected {images.shape[0]} uint8 labels (one per image in "
            f"{images_path.name}), got {labels.dtype} {list(labels.shape)}"
        )
    if labels.size and int(labels.max()) >= 10:
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    x = torch.from_numpy(images).to(torch.float32).div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels).to(torch.int64)
    return Dataset(x=x, y=y, num_classes=10, name=key)


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that only builds numpy arrays and plain containers.

    CIFAR pickles hold dicts of bytes, lists and uint8 arrays; refusing every other global means a
    stray or tampered file in a data directory cannot run code when loaded.
    """

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle_batch(blob: bytes, spec: _CifarSpec, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 3072]`` and labels ``int64 [N]`` from one CIFAR pickle, validated."""
    try:
        batch = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as exc:  # a damaged pickle can fail in many ways; all mean "corrupt file"
        raise DataError(_one_line(f"{where}: not a readable CIFAR pickle ({exc})")) from exc
    if not isinstance(batch, dict) or b"data" not in batch or spec.label_key not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(
            f"{where}: expected a dict with keys b'data' and {spec.label_key!r}, found {found}"
        )
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{where}: b'data' is not a uint8 array of shape [N, 3072]")
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: b'data' has shape {list(data.shape)}, expected [N, 3072]")
    try:
        labels = np.asarray(batch[spec.label_key], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(_one_line(f"{where}: labels are not integers ({exc})")) from exc
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"{where}: {labels.size} labels for {data.shape[0]} images under {spec.label_key!r}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(
            f"{where}: labels span {labels.min()}..{labels.max()}, "
            f"expected 0..{spec.num_classes - 1}"
        )
    return data, labels


def _load_cifar(key: str, root: Path) -> tuple[Dataset, Dataset]:
    """CIFAR train/test sets from the tarball in ``root`` or the pickles in ``root``."""
    spec = _CIFAR[key]
    tarball = root / spec.tarball
    if tarball.is_file():
        if spec.tarball in CIFAR_MD5:
            _verify_md5(tarball, CIFAR_MD5[spec.tarball])
        blobs = _read_tar_members(tarball, spec)
        source = str(tarball)
    else:
        blobs = {f: _read_bytes(root / f) for f in spec.files}
        source = str(root)
    parts = {f: _unpickle_batch(blobs[f], spec, f"{source}:{f}") for f in spec.files}
    train = _cifar_split(key, [parts[f] for f in spec.train_files])
    test = _cifar_split(key, [parts[f] for f in spec.test_files])
    _check_cifar_counts(key, source, len(train), len(test))
    return train, test


def _read_bytes(path: Path) -> bytes:
    """A file's bytes, with read errors turned into DataError."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(_one_line(f"cannot read {path}: {exc}")) from exc


def _read_tar_members(tarball: Path, spec: _CifarSpec) -> dict[str, bytes]:
    """The pickles of ``spec`` read straight out of the tarball (one sequential pass, no disk)."""
    wanted = {f"{spec.folder}/{f}": f for f in spec.files}
    blobs: dict[str, bytes] = {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                fname = wanted.get(member.name.removeprefix("./"))
                if fname is not None and member.isfile():
                    handle = tar.extractfile(member)
                    if handle is not None:
                        blobs[fname] = handle.read()
    except (OSError, EOFError, zlib.error, tarfile.TarError) as exc:
        raise DataError(_one_line(f"{tarball}: cannot read the archive ({exc})")) from exc
    missing = [name for name, f in wanted.items() if f not in blobs]
    if missing:
        raise DataError(f"{tarball}: archive lacks {', '.join(missing)}")
    return blobs


def _cifar_split(key: str, parts: list[tuple[np.ndarray, np.ndarray]]) -> Dataset:
    """Concatenate batches into a Dataset: float32 ``[N, 3, 32, 32]`` in [0, 1]."""
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    x = torch.from_numpy(data).reshape(-1, 3, 32, 32).to(torch.float32).div_(255.0)
    y = torch.from_numpy(labels)
    return Dataset(x=x, y=y, num_classes=_CIFAR[key].num_classes, name=key)


def _check_cifar_counts(key: str, source: str, n_train: int, n_test: int) -> None:
    """Raise DataError when the example counts differ from :data:`CIFAR_COUNTS`."""
    expected = CIFAR_COUNTS.get(key)
    if expected is not None and (n_train, n_test) != tuple(expected):
        raise DataError(
            f"{source}: found {n_train} training and {n_test} test examples, expected "
            f"{expected[0]} and {expected[1]}; the copy is incomplete or not the original"
        )


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------

#: Typical distance between two class means, in units of the shared noise's std per factor.
_CLASS_DISTANCE = 4.0
#: Std of the independent per-feature noise added on top of the shared low-rank noise.
_ISOTROPIC_NOISE = 0.1


def make_synthetic(
    shape: Sequence[int], num_classes: int, n_train: int, n_test: int, seed: int
) -> tuple[Dataset, Dataset]:
    """Train and test sets of correlated Gaussian classes with inputs of shape ``shape``.

    With ``d`` features and ``k = min(d, 32)`` factors, ``x = F (m_y + ξ) + 0.1 ε``: ``F`` is a
    fixed ``d×k`` loading matrix whose first factor is shared by every feature (so the input
    covariance is strongly non-diagonal, as in natural images), ``m_y`` the class centre in factor
    space, and ``ξ``, ``ε`` standard normal. The classes differ only inside the noisy factor
    space, so a linear classifier does well but not perfectly. Labels are balanced (round-robin,
    then shuffled). Deterministic in ``seed``.
    """
    shape, d = _check_synthetic_args(shape, num_classes, n_train, n_test)
    gen = make_generator(seed, "synthetic")
    k = min(d, 32)
    loadings = _synthetic_loadings(d, k, gen)
    centres = torch.randn(num_classes, k, generator=gen) * (_CLASS_DISTANCE / math.sqrt(2 * k))
    splits = []
    for n in (n_train, n_test):
        y = _balanced_labels(n, num_classes, gen)
        factors = centres[y] + torch.randn(n, k, generator=gen)
        x = factors @ loadings.T
        x.add_(torch.randn(n, d, generator=gen), alpha=_ISOTROPIC_NOISE)
        splits.append(Dataset(x.reshape(n, *shape), y, num_classes, "synthetic"))
    return splits[0], splits[1]


def _make_add_task(
    shape: Sequence[int], n_train: int, n_test: int, seed: int
) -> tuple[Dataset, Dataset]:
    """The Add task (:mod:`decorrelate.addtask`) as regression data sets, ``shape`` = [T, 1]."""
    from decorrelate.addtask import make_add_task, sequence_length

    (x, y), (xt, yt) = make_add_task(n_train, n_test, sequence_length(shape), seed)
    return Dataset(x, y, 1, "add-task"), Dataset(xt, yt, 1, "add-task")


def _check_synthetic_args(
    shape: Sequence[int], num_classes: int, n_train: int, n_test: int
) -> tuple[tuple[int, ...], int]:
    """Validate the synthetic parameters; return the shape as a tuple and its feature count."""
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as exc:
        raise UserError(f"synthetic shape must be a sequence of integers, got {shape!r}") from exc
    if not dims or min(dims) < 1:
        raise UserError(f"synthetic shape must be non-empty and positive, got {list(dims)}")
    if num_classes < 2:
        raise UserError(f"synthetic data needs at least 2 classes, got {num_classes}")
    if n_train < 1 or n_test < 1:
        raise UserError(f"synthetic split sizes must be positive, got {n_train} and {n_test}")
    return dims, math.prod(dims)


def _synthetic_loadings(d: int, k: int, gen: torch.Generator) -> Tensor:
    """A ``d×k`` loading matrix: one factor common to all features plus ``k-1`` random ones.

    Rows are rescaled by random factors in [0.5, 1.5] so feature variances differ, too. The
    common factor carries about half of each feature's variance, which makes the typical
    correlation between two features about 0.5.
    """
    common = torch.ones(d, 1)
    if k > 1:
        specific = torch.randn(d, k - 1, generator=gen) / math.sqrt(k - 1)
        loadings = torch.cat([common, specific], dim=1)
    else:
        loadings = common
    scale = 0.5 + torch.rand(d, 1, generator=gen)
    return loadings * scale


def _balanced_labels(n: int, num_classes: int, gen: torch.Generator) -> Tensor:
    """``n`` labels with class counts differing by at most one, in random order."""
    labels = torch.arange(n, dtype=torch.int64) % num_classes
    return labels[torch.randperm(n, generator=gen)]


# --------------------------------------------------------------------------------------------
# Splitting and normalisation
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


def _channel_layout(x: Tensor) -> tuple[int, list[int]]:
    """Number of channels and the broadcast shape of per-channel statistics for ``x``.

    ``[N, C, ...]`` inputs (ndim ≥ 3) have ``C`` channels; flat ``[N, D]`` inputs count as one.
    """
    if x.ndim >= 3:
        return int(x.shape[1]), [1, int(x.shape[1])] + [1] * (x.ndim - 2)
    return 1, [1] * x.ndim


def normalize_mode(normalize: str | bool) -> str:
    """The name in :data:`NORMALIZATIONS` for ``normalize`` (booleans: the earlier option)."""
    if isinstance(normalize, bool):
        return "standard" if normalize else "unit"
    if normalize not in NORMALIZATIONS:
        raise UserError(
            f"unknown normalize {normalize!r}; choose one of: {', '.join(NORMALIZATIONS)}"
        )
    return normalize


def _normalize_splits(
    train: Dataset,
    val: Dataset | None,
    test: Dataset,
    normalize: str | bool,
    pixels: bool = True,
) -> tuple[list[float], list[float]]:
    """Scale every split in place as ``normalize`` says (see :func:`load_dataset`).

    The loaders give pixels/255; ``"none"`` multiplies back by 255 and rounds, which restores
    the stored integers exactly (the float32 error of x/255·255 is far below ½).
    """
    mode = normalize_mode(normalize)
    channels, view = _channel_layout(train.x)
    if mode == "unit" or (mode == "none" and not pixels):
        return [0.0] * channels, [1.0] * channels
    if mode == "none":
        for ds in (train, val, test):
            if ds is not None:
                ds.x.mul_(255.0).round_()
        return [0.0] * channels, [1.0 / 255.0] * channels
    flat = train.x.reshape(len(train), channels, -1)
    var, mean = torch.var_mean(flat, dim=(0, 2), correction=0)
    std = var.sqrt().clamp_min(1e-8)
    for ds in (train, val, test):
        if ds is not None:
            ds.x.sub_(mean.view(view)).div_(std.view(view))
    return mean.tolist(), std.tolist()
