"""What each data set consists of: its names, files, checksums and expected sizes.

The tables here are the single description of the on-disk data that the readers
(:mod:`.sources`), the file search (:mod:`.locate`) and the download (:mod:`.download`) share, so
a data set's file names and checksums are written down once. Tests that build tiny fake files
patch :data:`IDX_MD5`, :data:`CIFAR_MD5` and :data:`CIFAR_COUNTS` (module-level dicts, so a patch
is seen by every module); nothing else does.
"""

from __future__ import annotations

from dataclasses import dataclass

from decorrelate.errors import UserError

DATASETS: tuple[str, ...] = (
    "mnist",
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "synthetic",
    "add-task",
)
#: Data sets generated from the ``synthetic_*`` options (no files to find).
GENERATED: tuple[str, ...] = ("synthetic", "add-task")
#: Data sets whose inputs are never scaled: the Add task's bits are not pixels or features with
#: channel statistics (standardising would treat its time steps as channels).
UNSCALED: tuple[str, ...] = ("add-task",)

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


def _canonical_name(name: str) -> str:
    """Map a user-given data set name (any case, a few aliases) to one of :data:`DATASETS`."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return key


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


def _required_files(key: str) -> tuple[str, ...]:
    """File names that must all be present (for CIFAR: those of the extracted folder)."""
    return _CIFAR[key].files if key in _CIFAR else IDX_FILES
