"""Datasets held in memory as tensors: MNIST, Fashion-MNIST, CIFAR-10/100 and a synthetic one.

Every data set here is small enough to live in memory as one float32 tensor, so batches are cut
by indexing with a permutation instead of going through a ``DataLoader``. Files are read in their
original formats and checked before use, so a missing, truncated or corrupt file ends in one
:class:`~decorrelate.errors.DataError` line that names the file.

The package is split by concern; this module re-exports the public names, so
``from decorrelate.data import load_dataset`` (or any name below) is the stable way to use it:

- :mod:`.catalog` — data set names, file names, checksums and expected sizes;
- :mod:`.sources` — readers of the IDX ``.gz`` and CIFAR pickle files, with integrity checks;
- :mod:`.locate` — where files are looked for (:func:`resolve_root`) and the not-found message;
- :mod:`.download` — the md5-checked download fallback for MNIST and Fashion-MNIST;
- :mod:`.dataset` — :class:`Dataset`, :class:`DataSplits`, batching, :func:`epoch_order`, the
  fixed validation split and training subset;
- :mod:`.transforms` — input normalisation (:data:`NORMALIZATIONS`);
- :mod:`.synthetic` — the generated data set (:func:`make_synthetic`);
- :mod:`.loading` — :func:`load_dataset`, which composes the above.

The lookup tables (``IDX_MD5``, ``CIFAR_MD5``, ``CIFAR_COUNTS``, ``IDX_MIRRORS``) are re-exported
as the same dict objects, so patching an entry here is seen everywhere. Rebinding a module-level
name is not: to change the fallback roots, set ``decorrelate.data.locate.SHARED_FALLBACK_ROOTS``.
"""

from __future__ import annotations

from .catalog import CIFAR_COUNTS, CIFAR_MD5, DATASETS, IDX_FILES, IDX_MD5
from .dataset import Dataset, DataSplits, epoch_order
from .download import DOWNLOAD_TIMEOUT, IDX_MIRRORS
from .loading import load_dataset
from .locate import SHARED_FALLBACK_ROOTS, resolve_root
from .synthetic import make_synthetic
from .transforms import NORMALIZATIONS, normalize_mode

__all__ = [
    "CIFAR_COUNTS",
    "CIFAR_MD5",
    "DATASETS",
    "DOWNLOAD_TIMEOUT",
    "IDX_FILES",
    "IDX_MD5",
    "IDX_MIRRORS",
    "NORMALIZATIONS",
    "SHARED_FALLBACK_ROOTS",
    "DataSplits",
    "Dataset",
    "epoch_order",
    "load_dataset",
    "make_synthetic",
    "normalize_mode",
    "resolve_root",
]
