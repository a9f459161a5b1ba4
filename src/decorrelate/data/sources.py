"""Readers for the original file formats, with integrity checks that end in one DataError line.

(Fashion-)MNIST come as four IDX ``.gz`` files, CIFAR as the python-pickle tarball or its
extracted folder. Every file is checked before use, so a missing, truncated or corrupt file ends in
one :class:`DataError` line that names the file, never in a numpy, gzip or pickle traceback.

Integrity checks: IDX files are always md5-verified against :data:`.catalog.IDX_MD5`. A CIFAR
tarball is md5-verified when its file name has an entry in :data:`.catalog.CIFAR_MD5` (the official
names do), and the number of examples read is compared with :data:`.catalog.CIFAR_COUNTS` (an
entry of ``None`` skips that check). CIFAR pickles are loaded by an unpickler that only builds
numpy arrays, so a tampered file cannot run code. Nothing here downloads or searches for files:
:mod:`.locate` finds the directory, these functions read it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from decorrelate.errors import DataError

from .catalog import _CIFAR, CIFAR_COUNTS, CIFAR_MD5, IDX_FILES, IDX_MD5, _CifarSpec
from .dataset import Dataset


def _one_line(text: str) -> str:
    """Join line breaks with spaces, so exception texts embedded in messages stay on one line."""
    return " ".join(line.strip() for line in text.splitlines())


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
