"""Tests for decorrelate.data: file formats, checks, root resolution, splits, batching, synthetic.

Real MNIST/Fashion-MNIST come from /work/shared/data (skipped when absent). Everything else uses
tiny files written here: fake IDX files and fake CIFAR pickles, with the module's md5/count tables
patched to match them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import pickle
import shutil
import tarfile
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from decorrelate import data
from decorrelate.errors import DataError, UserError
from decorrelate.seeding import make_generator

SHARED = Path("/work/shared/data")
needs_mnist = pytest.mark.skipif(
    not (SHARED / "mnist").is_dir(), reason="MNIST not in /work/shared/data"
)
needs_fashion = pytest.mark.skipif(
    not (SHARED / "fashion-mnist").is_dir(), reason="Fashion-MNIST not in /work/shared/data"
)


# ------------------------------------------------------------------------------------------
# helpers and fixtures
# ------------------------------------------------------------------------------------------


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def idx_bytes(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
    """An uncompressed IDX file: magic (0, 0, dtype, ndim), big-endian dims, payload."""
    header = bytes([0, 0, dtype_code, array.ndim])
    dims = np.asarray(array.shape, dtype=">u4").tobytes()
    return header + dims + array.tobytes()


def write_gz(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, mtime=0))


def write_fake_idx_set(directory: Path, n_train: int = 30, n_test: int = 10) -> dict[str, str]:
    """Four small valid IDX files (28×28 uint8 images, labels i % 10); returns their md5s."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for fname, array in arrays.items():
        write_gz(directory / fname, idx_bytes(array))
    return {fname: md5_of(directory / fname) for fname in arrays}


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No data anywhere: cwd is an empty tmp dir, no env root, no downloads, no shared fallback.

    Returns the cwd (``tmp_path/work/repo``, so ``../shared/data`` is ``tmp_path/work/shared``).
    """
    cwd = tmp_path / "work" / "repo"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("DECORRELATE_DATA", raising=False)
    monkeypatch.setenv("DECORRELATE_NO_DOWNLOAD", "1")
    monkeypatch.setattr(data.locate, "SHARED_FALLBACK_ROOTS", [])

    def no_network(*args, **kwargs):
        raise AssertionError("tests must not touch the network")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    return cwd


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A directory with tiny valid MNIST IDX files; IDX_MD5['mnist'] patched to match."""
    source = tmp_path / "fake-mnist-source"
    md5s = write_fake_idx_set(source)
    monkeypatch.setitem(data.IDX_MD5, "mnist", md5s)
    return source


def copy_idx_set(source: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for fname in data.IDX_FILES:
        shutil.copyfile(source / fname, dest / fname)
    return dest


# ------------------------------------------------------------------------------------------
# real MNIST / Fashion-MNIST
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_raw():
    return data.load_dataset("mnist", data_dir=SHARED, normalize=False)


@pytest.fixture(scope="module")
def mnist_normalized():
    return data.load_dataset("mnist", data_dir=SHARED)


@needs_mnist
def test_mnist_shapes_counts_and_pixel_range(mnist_raw):
    s = mnist_raw
    assert s.root == SHARED / "mnist"
    assert s.train.x.shape == (60000, 1, 28, 28) and s.test.x.shape == (10000, 1, 28, 28)
    assert s.train.x.dtype == torch.float32 and s.train.y.dtype == torch.int64
    assert s.val is None and s.train.num_classes == 10 and s.train.input_shape == (1, 28, 28)
    train_counts = torch.bincount(s.train.y, minlength=10).tolist()
    test_counts = torch.bincount(s.test.y, minlength=10).tolist()
    assert train_counts[1] == 6742 and train_counts[5] == 5421 and train_counts[0] == 5923
    assert test_counts[1] == 1135 and test_counts[0] == 980 and sum(test_counts) == 10000
    assert s.train.x.min() == 0.0 and s.train.x.max() == 1.0
    # pixels are k/255: scaling must be exactly a division by 255
    assert torch.allclose(s.train.x[:100] * 255, (s.train.x[:100] * 255).round(), atol=1e-4)
    assert s.mean == [0.0] and s.std == [1.0]


@needs_mnist
def test_mnist_normalized_with_train_statistics(mnist_raw, mnist_normalized):
    s = mnist_normalized
    assert s.mean[0] == pytest.approx(0.1307, abs=1e-4)
    assert s.std[0] == pytest.approx(0.3081, abs=1e-4)
    assert s.train.x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert s.train.x.std().item() == pytest.approx(1.0, abs=1e-3)
    expected_test = (mnist_raw.test.x[:500] - s.mean[0]) / s.std[0]
    torch.testing.assert_close(s.test.x[:500], expected_test)


@needs_fashion
def test_fashion_mnist_from_shared_dir():
    s = data.load_dataset("fashion-mnist", data_dir=SHARED)
    assert s.root == SHARED / "fashion-mnist"
    assert s.train.x.shape == (60000, 1, 28, 28) and s.test.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(s.train.y).tolist() == [6000] * 10
    assert torch.bincount(s.test.y).tolist() == [1000] * 10
    raw = s.train.x * s.std[0] + s.mean[0]
    assert raw.min().item() == pytest.approx(0.0, abs=1e-5)
    assert raw.max().item() == pytest.approx(1.0, abs=1e-5)
    assert s.train.x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert s.train.x.std().item() == pytest.approx(1.0, abs=1e-3)


@needs_mnist
@pytest.mark.parametrize(
    ("victim", "damage"),
    [("train-labels-idx1-ubyte.gz", "truncate"), ("t10k-labels-idx1-ubyte.gz", "flip")],
)
def test_corrupt_real_file_names_it_and_the_checksum(tmp_path, victim, damage):
    dest = tmp_path / "mnist"
    dest.mkdir()
    for fname in data.IDX_FILES:
        if fname != victim:
            (dest / fname).symlink_to(SHARED / "mnist" / fname)
    blob = bytearray((SHARED / "mnist" / victim).read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob[len(blob) // 2] ^= 0xFF
    (dest / victim).write_bytes(bytes(blob))
    with pytest.raises(DataError) as info:
        data.load_dataset("mnist", data_dir=tmp_path)
    message = str(info.value)
    assert victim in message and "checksum does not match" in message
    assert data.IDX_MD5["mnist"][victim] in message and md5_of(dest / victim) in message
    assert "\n" not in message


# ------------------------------------------------------------------------------------------
# IDX parsing with fake files
# ------------------------------------------------------------------------------------------


def test_fake_idx_files_are_parsed(isolated, fake_mnist):
    s = data.load_dataset("mnist", data_dir=fake_mnist, normalize=False)
    assert s.train.x.shape == (30, 1, 28, 28) and s.test.x.shape == (10, 1, 28, 28)
    assert s.train.y.tolist() == [i % 10 for i in range(30)]
    with gzip.open(fake_mnist / "train-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(30, 28, 28)
    torch.testing.assert_close(s.train.x[:, 0], torch.from_numpy(pixels.copy()).float() / 255)


@pytest.mark.parametrize(
    ("payload", "expected_text"),
    [
        (b"\x00\x00\x08\x01\x00\x00\x00\x1e" + bytes(29), "payload"),  # 30 declared, 29 given
        (b"\x12\x34\x08\x01\x00\x00\x00\x1e" + bytes(30), "magic"),
        (b"\x00\x00\x08", "magic"),
        (idx_bytes(np.zeros(30, dtype=">i4"), dtype_code=0x0C), "uint8"),
        (idx_bytes(np.full(30, 11, dtype=np.uint8)), "outside 0..9"),
    ],
)
def test_bad_idx_content_raises_data_error_naming_file(
    isolated, fake_mnist, monkeypatch, payload, expected_text
):
    victim = "train-labels-idx1-ubyte.gz"
    write_gz(fake_mnist / victim, payload)
    monkeypatch.setitem(data.IDX_MD5["mnist"], victim, md5_of(fake_mnist / victim))
    with pytest.raises(DataError, match=expected_text) as info:
        data.load_dataset("mnist", data_dir=fake_mnist)
    assert victim in str(info.value)


def test_truncated_gzip_with_matching_md5_is_a_data_error(isolated, fake_mnist, monkeypatch):
    victim = "t10k-images-idx3-ubyte.gz"
    blob = (fake_mnist / victim).read_bytes()
    (fake_mnist / victim).write_bytes(blob[: len(blob) // 2])
    monkeypatch.setitem(data.IDX_MD5["mnist"], victim, md5_of(fake_mnist / victim))
    with pytest.raises(DataError, match="cannot decompress") as info:
        data.load_dataset("mnist", data_dir=fake_mnist)
    assert victim in str(info.value)


# ------------------------------------------------------------------------------------------
# root resolution and the not-found message
# ------------------------------------------------------------------------------------------


def test_missing_data_message_lists_files_places_and_advice(isolated, tmp_path):
    with pytest.raises(DataError) as info:
        data.load_dataset("mnist")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("MNIST not found")
    for fname in data.IDX_FILES:
        assert fname in message
    assert "--data-dir" in message and "DECORRELATE_DATA" in message
    assert str(isolated / "data" / "mnist") in message
    assert str(tmp_path / "work" / "shared" / "data") in message  # ../shared/data, normalised
    assert "DECORRELATE_NO_DOWNLOAD" in message


def test_missing_data_reports_partial_copy(isolated, tmp_path, fake_mnist):
    partial = copy_idx_set(fake_mnist, tmp_path / "partial")
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"partial lacks t10k-labels-idx1-ubyte\.gz"):
        data.load_dataset("mnist", data_dir=partial)


def test_resolution_order(isolated, tmp_path, fake_mnist, monkeypatch):
    explicit = copy_idx_set(fake_mnist, tmp_path / "explicit" / "mnist").parent
    env_root = copy_idx_set(fake_mnist, tmp_path / "env" / "mnist").parent
    cwd_data = copy_idx_set(fake_mnist, isolated / "data" / "mnist")
    cwd_shared = copy_idx_set(fake_mnist, tmp_path / "work" / "shared" / "data" / "mnist")
    fallback = copy_idx_set(fake_mnist, tmp_path / "fallback" / "mnist")
    monkeypatch.setattr(data.locate, "SHARED_FALLBACK_ROOTS", [fallback.parent])
    monkeypatch.setenv("DECORRELATE_DATA", str(env_root))

    assert data.resolve_root("mnist", explicit) == explicit / "mnist"
    assert data.load_dataset("mnist", data_dir=explicit).root == explicit / "mnist"
    assert data.resolve_root("mnist") == env_root / "mnist"
    monkeypatch.delenv("DECORRELATE_DATA")
    assert data.resolve_root("mnist") == cwd_data
    shutil.rmtree(cwd_data)
    assert data.resolve_root("mnist") == cwd_shared
    shutil.rmtree(cwd_shared)
    assert data.resolve_root("mnist") == fallback
    shutil.rmtree(fallback)
    assert data.resolve_root("mnist") is None
    assert data.resolve_root("synthetic") is None


def test_data_dir_may_point_at_the_dataset_folder_itself(isolated, fake_mnist):
    assert data.resolve_root("mnist", fake_mnist) == fake_mnist
    assert data.resolve_root("mnist", str(fake_mnist)) == fake_mnist


def test_incomplete_data_dir_is_an_error_not_a_fall_back(isolated, tmp_path, fake_mnist):
    # an explicit location is authoritative: a complete copy elsewhere is not used instead
    partial = copy_idx_set(fake_mnist, tmp_path / "partial" / "mnist")
    (partial / "train-images-idx3-ubyte.gz").unlink()
    copy_idx_set(fake_mnist, isolated / "data" / "mnist")
    assert data.resolve_root("mnist", partial.parent) is None
    with pytest.raises(DataError, match=r"mnist lacks train-images-idx3-ubyte\.gz"):
        data.load_dataset("mnist", data_dir=partial.parent)


# ------------------------------------------------------------------------------------------
# download fallback (network faked)
# ------------------------------------------------------------------------------------------


def fake_urlopen(served: dict[str, bytes], calls: list[str]):
    def urlopen(url, timeout=None):
        calls.append(url)
        assert timeout is not None
        if url not in served:
            raise urllib.error.URLError("unreachable")
        return io.BytesIO(served[url])

    return urlopen


def test_download_into_cwd_data_with_mirror_fallback(isolated, fake_mnist, monkeypatch):
    monkeypatch.delenv("DECORRELATE_NO_DOWNLOAD")
    monkeypatch.setitem(data.IDX_MIRRORS, "mnist", ("http://dead/", "http://alive/"))
    served = {f"http://alive/{f}": (fake_mnist / f).read_bytes() for f in data.IDX_FILES}
    calls: list[str] = []
    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen(served, calls))
    s = data.load_dataset("mnist", normalize=False)
    assert s.root == isolated / "data" / "mnist"
    assert len(s.train) == 30
    assert sorted(p.name for p in s.root.iterdir()) == sorted(data.IDX_FILES)
    assert calls[:2] == [
        "http://dead/train-images-idx3-ubyte.gz",
        f"http://alive/{data.IDX_FILES[0]}",
    ]


def test_download_with_bad_checksum_fails_cleanly(isolated, fake_mnist, monkeypatch):
    monkeypatch.delenv("DECORRELATE_NO_DOWNLOAD")
    monkeypatch.setitem(data.IDX_MIRRORS, "mnist", ("http://evil/",))
    served = {f"http://evil/{f}": b"not the file" for f in data.IDX_FILES}
    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen(served, []))
    with pytest.raises(DataError) as info:
        data.load_dataset("mnist")
    message = str(info.value)
    assert "download failed" in message and "checksum does not match" in message
    assert "\n" not in message
    assert list((isolated / "data" / "mnist").iterdir()) == []  # no .part or bad file left


def test_no_download_when_disabled(isolated, monkeypatch):
    monkeypatch.delenv("DECORRELATE_NO_DOWNLOAD")  # network would raise AssertionError
    with pytest.raises(DataError, match=r"download=False"):
        data.load_dataset("fashion-mnist", download=False)


# ------------------------------------------------------------------------------------------
# CIFAR from fake pickles
# ------------------------------------------------------------------------------------------

CIFAR_N = 4  # examples per fake pickle file


def fake_cifar_batches(key: str) -> dict[str, dict[bytes, object]]:
    """Tiny CIFAR-like batches: distinct pixel data and labels per file."""
    spec = data.catalog._CIFAR[key]
    rng = np.random.default_rng(1)
    batches = {}
    for i, fname in enumerate(spec.files):
        labels = [(i * CIFAR_N + j) % spec.num_classes for j in range(CIFAR_N)]
        batch = {
            b"batch_label": fname.encode(),
            b"data": rng.integers(0, 256, (CIFAR_N, 3072), dtype=np.uint8),
            spec.label_key: labels,
        }
        if key == "cifar100":
            batch[b"coarse_labels"] = [label // 5 for label in labels]
        batches[fname] = batch
    return batches


def pickled(batch: dict, protocol: int, legacy_numpy: bool = False) -> bytes:
    blob = pickle.dumps(batch, protocol=protocol)
    if legacy_numpy:  # how pickles made with numpy 1.x (like the real CIFAR files) name it
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    return blob


def write_cifar_folder(directory: Path, batches: dict, protocol: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for fname, batch in batches.items():
        (directory / fname).write_bytes(pickled(batch, protocol, legacy_numpy=True))
    return directory


def write_cifar_tarball(path: Path, folder: str, batches: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for fname, batch in batches.items():
            blob = pickled(batch, protocol=2)
            info = tarfile.TarInfo(f"{folder}/{fname}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


@pytest.fixture
def cifar_counts(monkeypatch):
    """Expected counts patched to the fake files' sizes."""
    for key, spec in data.catalog._CIFAR.items():
        counts = (CIFAR_N * len(spec.train_files), CIFAR_N * len(spec.test_files))
        monkeypatch.setitem(data.CIFAR_COUNTS, key, counts)


def assert_matches_batches(splits: data.DataSplits, key: str, batches: dict) -> None:
    spec = data.catalog._CIFAR[key]
    train_raw = np.concatenate([batches[f][b"data"] for f in spec.train_files])
    train_labels = [label for f in spec.train_files for label in batches[f][spec.label_key]]
    assert splits.train.x.shape == (len(train_raw), 3, 32, 32)
    assert splits.test.x.shape == (CIFAR_N, 3, 32, 32)
    assert splits.train.x.dtype == torch.float32 and splits.train.y.dtype == torch.int64
    assert splits.train.num_classes == spec.num_classes
    assert splits.train.y.tolist() == train_labels
    assert splits.test.y.tolist() == batches[spec.test_files[0]][spec.label_key]
    # channel-major layout: the first 1024 bytes are the red plane
    expected = torch.from_numpy(train_raw.reshape(-1, 3, 32, 32).astype(np.float32)) / 255
    torch.testing.assert_close(splits.train.x, expected)


@pytest.mark.parametrize("key", ["cifar10", "cifar100"])
def test_cifar_from_tarball(isolated, tmp_path, monkeypatch, cifar_counts, key):
    spec = data.catalog._CIFAR[key]
    batches = fake_cifar_batches(key)
    tarball = write_cifar_tarball(tmp_path / "d" / key / spec.tarball, spec.folder, batches)
    monkeypatch.setitem(data.CIFAR_MD5, spec.tarball, md5_of(tarball))
    splits = data.load_dataset(key, data_dir=tmp_path / "d", normalize=False)
    assert splits.root == tarball.parent
    assert_matches_batches(splits, key, batches)


@pytest.mark.parametrize("key", ["cifar10", "cifar100"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_from_extracted_folder(isolated, tmp_path, cifar_counts, key, protocol):
    spec = data.catalog._CIFAR[key]
    batches = fake_cifar_batches(key)
    folder = write_cifar_folder(tmp_path / "d" / spec.folder, batches, protocol)
    splits = data.load_dataset(key, data_dir=tmp_path / "d", normalize=False)
    assert splits.root == folder
    assert_matches_batches(splits, key, batches)
    assert data.resolve_root(key, folder) == folder  # --data-dir at the folder itself


def test_cifar_tarball_checksum_mismatch(isolated, tmp_path, cifar_counts):
    spec = data.catalog._CIFAR["cifar10"]
    tarball = write_cifar_tarball(
        tmp_path / spec.tarball, spec.folder, fake_cifar_batches("cifar10")
    )
    with pytest.raises(DataError, match="checksum does not match") as info:
        data.load_dataset("cifar10", data_dir=tmp_path)
    assert str(tarball) in str(info.value) and data.CIFAR_MD5[spec.tarball] in str(info.value)


def test_cifar_tarball_missing_member(isolated, tmp_path, monkeypatch, cifar_counts):
    spec = data.catalog._CIFAR["cifar10"]
    batches = fake_cifar_batches("cifar10")
    del batches["data_batch_3"]
    tarball = write_cifar_tarball(tmp_path / spec.tarball, spec.folder, batches)
    monkeypatch.setitem(data.CIFAR_MD5, spec.tarball, md5_of(tarball))
    with pytest.raises(DataError, match="lacks cifar-10-batches-py/data_batch_3"):
        data.load_dataset("cifar10", data_dir=tmp_path)


def test_cifar_folder_count_check_is_on_by_default(isolated, tmp_path):
    write_cifar_folder(tmp_path / "cifar-100-python", fake_cifar_batches("cifar100"))
    with pytest.raises(DataError, match="expected 50000 and 10000"):
        data.load_dataset("cifar100", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("edit", "expected_text"),
    [
        (lambda b: b.pop(b"labels"), "expected a dict with keys"),
        (lambda b: b.update({b"labels": [10] * CIFAR_N}), "labels span"),
        (lambda b: b.update({b"labels": [0] * (CIFAR_N - 1)}), "labels for"),
        (lambda b: b.update({b"data": np.zeros((CIFAR_N, 3000), np.uint8)}), "3072"),
        (lambda b: b.update({b"data": np.zeros((CIFAR_N, 3072), np.float32)}), "uint8"),
    ],
)
def test_cifar_folder_structure_is_validated(isolated, tmp_path, cifar_counts, edit, expected_text):
    batches = fake_cifar_batches("cifar10")
    edit(batches["data_batch_2"])
    write_cifar_folder(tmp_path / "cifar-10-batches-py", batches)
    with pytest.raises(DataError, match=expected_text) as info:
        data.load_dataset("cifar10", data_dir=tmp_path)
    assert "data_batch_2" in str(info.value)


class _Sneaky:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_cifar_pickles_cannot_run_code(isolated, tmp_path, cifar_counts, capsys):
    batches = fake_cifar_batches("cifar10")
    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py", batches)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Sneaky()}))
    with pytest.raises(DataError, match=r"test_batch.*refusing to load builtins\.print"):
        data.load_dataset("cifar10", data_dir=tmp_path)
    assert "must never run" not in capsys.readouterr().out


def test_cifar_not_found_message(isolated, tmp_path):
    with pytest.raises(DataError) as info:
        data.load_dataset("cifar100", data_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert message.startswith("CIFAR-100 not found") and "\n" not in message
    assert "cifar-100-python.tar.gz" in message and "cifar-100-python/" in message
    assert "--data-dir" in message and str(tmp_path / "nowhere" / "cifar100") in message


# ------------------------------------------------------------------------------------------
# synthetic data
# ------------------------------------------------------------------------------------------


def offdiag_abs_corr(x: torch.Tensor) -> float:
    corr = torch.corrcoef(x.reshape(len(x), -1).T.double())
    mask = ~torch.eye(len(corr), dtype=torch.bool)
    return corr[mask].abs().mean().item()


def ridge_accuracy(train: data.Dataset, test: data.Dataset) -> tuple[float, float]:
    """Train/test accuracy of a least-squares linear classifier on one-hot targets."""

    def design(ds: data.Dataset) -> torch.Tensor:
        flat = ds.x.reshape(len(ds), -1).double()
        return torch.cat([flat, torch.ones(len(ds), 1, dtype=torch.double)], dim=1)

    a = design(train)
    targets = torch.nn.functional.one_hot(train.y, train.num_classes).double()
    w = torch.linalg.solve(
        a.T @ a + 1e-2 * torch.eye(a.shape[1], dtype=torch.double), a.T @ targets
    )
    train_acc = (a @ w).argmax(1).eq(train.y).double().mean().item()
    test_acc = (design(test) @ w).argmax(1).eq(test.y).double().mean().item()
    return train_acc, test_acc


def test_synthetic_is_deterministic_and_seed_dependent():
    a_train, a_test = data.make_synthetic((2, 4, 4), 5, 200, 50, seed=3)
    b_train, b_test = data.make_synthetic((2, 4, 4), 5, 200, 50, seed=3)
    c_train, _ = data.make_synthetic((2, 4, 4), 5, 200, 50, seed=4)
    assert torch.equal(a_train.x, b_train.x) and torch.equal(a_train.y, b_train.y)
    assert torch.equal(a_test.x, b_test.x) and torch.equal(a_test.y, b_test.y)
    assert not torch.equal(a_train.x, c_train.x)


def test_synthetic_shape_dtype_and_balance():
    s = data.load_dataset(
        "synthetic",
        synthetic_shape=(2, 5, 3),
        synthetic_classes=7,
        synthetic_train=1003,
        synthetic_test=250,
        normalize=False,
    )
    assert s.root is None and s.train.name == "synthetic" and s.train.num_classes == 7
    assert s.train.x.shape == (1003, 2, 5, 3) and s.test.x.shape == (250, 2, 5, 3)
    assert s.train.x.dtype == torch.float32 and s.train.y.dtype == torch.int64
    for ds in (s.train, s.test):
        counts = torch.bincount(ds.y, minlength=7)
        assert counts.max() - counts.min() <= 1
    assert not torch.equal(s.train.y[:14], torch.arange(14) % 7)  # shuffled, not round-robin


def test_synthetic_default_shape_is_fast_and_strongly_correlated():
    start = time.perf_counter()
    train, _ = data.make_synthetic((3, 32, 32), 10, 5000, 1000, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.5, f"synthetic generation took {elapsed:.2f}s"
    assert train.x.shape == (5000, 3, 32, 32)
    # a diagonal covariance would give ~0.01 here (sampling noise); measured value is ~0.5
    assert offdiag_abs_corr(train.x.reshape(5000, -1)[:, ::12]) > 0.3


@pytest.mark.parametrize("shape", [(3, 8, 8), (20,)])
def test_synthetic_is_learnable_but_not_trivial(shape):
    train, test = data.make_synthetic(shape, 10, 3000, 1000, seed=0)
    _, test_acc = ridge_accuracy(train, test)
    assert 0.5 < test_acc < 0.97  # chance is 0.1
    assert offdiag_abs_corr(train.x) > 0.3


# ------------------------------------------------------------------------------------------
# splits, subsets and normalisation
# ------------------------------------------------------------------------------------------

SYN = {"synthetic_shape": (2, 3, 3), "synthetic_train": 1000, "synthetic_test": 200}


def row_keys(x: torch.Tensor) -> list[float]:
    """One distinct float per example (continuous random data, so no collisions)."""
    return x.reshape(len(x), -1)[:, 0].tolist()


def test_val_split_sizes_disjoint_and_fixed():
    full = data.load_dataset("synthetic", normalize=False, **SYN)
    s = data.load_dataset("synthetic", val_split=0.2, normalize=False, **SYN)
    assert len(s.train) == 800 and len(s.val) == 200 and len(s.test) == 200
    train_keys, val_keys = set(row_keys(s.train.x)), set(row_keys(s.val.x))
    assert not train_keys & val_keys
    assert train_keys | val_keys == set(row_keys(full.train.x))
    assert set(row_keys(s.val.x)) != set(row_keys(full.train.x[:200]))  # shuffled, not a prefix
    again = data.load_dataset("synthetic", val_split=0.2, normalize=False, **SYN)
    assert torch.equal(again.val.x, s.val.x)
    torch.testing.assert_close(s.test.x, full.test.x)


def test_train_size_is_a_fixed_nested_subset():
    full = data.load_dataset("synthetic", val_split=0.1, normalize=False, **SYN)
    small = data.load_dataset("synthetic", val_split=0.1, train_size=100, normalize=False, **SYN)
    larger = data.load_dataset("synthetic", val_split=0.1, train_size=300, normalize=False, **SYN)
    assert len(small.train) == 100 and len(larger.train) == 300 and len(small.val) == 100
    small_keys = set(row_keys(small.train.x))
    assert small_keys <= set(row_keys(larger.train.x)) <= set(row_keys(full.train.x))
    assert not small_keys & set(row_keys(small.val.x))
    assert torch.equal(small.val.x, full.val.x)


def test_normalization_uses_final_training_split():
    raw = data.load_dataset("synthetic", val_split=0.1, train_size=300, normalize=False, **SYN)
    s = data.load_dataset("synthetic", val_split=0.1, train_size=300, **SYN)
    per_channel = raw.train.x.transpose(0, 1).reshape(2, -1)
    assert s.mean == pytest.approx(per_channel.mean(1).tolist(), abs=1e-5)
    assert s.std == pytest.approx(per_channel.std(1, correction=0).tolist(), abs=1e-5)
    normed = s.train.x.transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(normed.mean(1), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed.std(1, correction=0), torch.ones(2), atol=1e-5, rtol=0)
    mean = torch.tensor(s.mean).view(1, 2, 1, 1)
    std = torch.tensor(s.std).view(1, 2, 1, 1)
    torch.testing.assert_close(s.test.x, (raw.test.x - mean) / std)
    torch.testing.assert_close(s.val.x, (raw.val.x - mean) / std)


def test_flat_inputs_normalize_as_one_channel():
    s = data.load_dataset("synthetic", synthetic_shape=(12,), synthetic_train=300)
    assert len(s.mean) == 1 and len(s.std) == 1
    assert s.train.x.mean().item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"val_split": 1.0}, "val_split"),
        ({"val_split": -0.1}, "val_split"),
        ({"val_split": math.nan}, "val_split"),
        ({"train_size": 0}, "train_size"),
        ({"train_size": 5000}, "exceeds"),
    ],
)
def test_bad_split_arguments(kwargs, pattern):
    with pytest.raises(UserError, match=pattern):
        data.load_dataset("synthetic", **SYN, **kwargs)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UserError) as info:
        data.load_dataset("imagenet")
    assert not isinstance(info.value, DataError)
    for name in data.DATASETS:
        assert name in str(info.value)
    with pytest.raises(UserError):
        data.resolve_root("svhn")


def test_name_aliases():
    assert data.load_dataset("SYNTHETIC", **SYN).train.name == "synthetic"
    assert data.catalog._canonical_name("CIFAR-10") == "cifar10"
    assert data.catalog._canonical_name("fashion_mnist") == "fashion-mnist"


def test_package_reexports_the_submodules_objects():
    """``decorrelate.data`` re-exports each public name as the very object of its submodule.

    The lookup tables must be the same dicts, or a patched checksum would not reach the readers.
    """
    import importlib

    submodules = ["catalog", "dataset", "download", "loading", "locate", "synthetic", "transforms"]
    owners = {}
    for sub in submodules:
        module = importlib.import_module(f"decorrelate.data.{sub}")
        for name, value in vars(module).items():
            if not name.startswith("_") and getattr(value, "__module__", module.__name__) == (
                module.__name__
            ):
                owners.setdefault(name, value)
    for name in data.__all__:
        assert getattr(data, name) is owners[name], name
    assert data.IDX_MD5 is data.catalog.IDX_MD5 and data.CIFAR_MD5 is data.sources.CIFAR_MD5
    assert data.CIFAR_COUNTS is data.sources.CIFAR_COUNTS
    assert data.IDX_MIRRORS is data.locate.IDX_MIRRORS


# ------------------------------------------------------------------------------------------
# epoch order and batching
# ------------------------------------------------------------------------------------------


def test_epoch_order_is_a_reproducible_permutation():
    a = data.epoch_order(1000, seed=7, epoch=2)
    assert torch.equal(a, data.epoch_order(1000, seed=7, epoch=2))
    assert torch.equal(a.sort().values, torch.arange(1000))
    assert not torch.equal(a, data.epoch_order(1000, seed=7, epoch=3))
    assert not torch.equal(a, data.epoch_order(1000, seed=8, epoch=2))
    expected = torch.randperm(1000, generator=make_generator(7, "data-order", 2))
    assert torch.equal(a, expected)


def indexed_dataset(n: int) -> data.Dataset:
    """Rows carry their own index, so batches reveal exactly which examples they hold."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return data.Dataset(x=x, y=torch.arange(n), num_classes=n, name="indexed")


def test_batches_cover_every_example_once():
    ds = indexed_dataset(103)
    order = data.epoch_order(103, seed=0, epoch=0)
    batches = list(ds.batches(10, order=order))
    assert [len(y) for _, y in batches] == [10] * 10 + [3]
    assert len(batches) == ds.num_batches(10) == 11
    seen = torch.cat([y for _, y in batches])
    assert torch.equal(seen, order)  # follows the order, every example exactly once
    for x, y in batches:
        assert torch.equal(x[:, 0, 0, 0].long(), y)  # x and y stay paired


def test_batches_sequential_and_drop_last():
    ds = indexed_dataset(25)
    sequential = torch.cat([y for _, y in ds.batches(8)])
    assert torch.equal(sequential, torch.arange(25))
    dropped = list(ds.batches(8, order=data.epoch_order(25, 0, 1), drop_last=True))
    assert [len(y) for _, y in dropped] == [8, 8, 8]
    assert ds.num_batches(8, drop_last=True) == 3
    assert len(torch.cat([y for _, y in dropped]).unique()) == 24
    assert list(indexed_dataset(16).batches(8, drop_last=True))[-1][1].tolist() == list(
        range(8, 16)
    )


def test_batches_accept_a_shard_of_the_order():
    ds = indexed_dataset(20)
    order = data.epoch_order(20, seed=1, epoch=0)
    shards = [torch.cat([y for _, y in ds.batches(3, order=order[r::2])]) for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == list(range(20))


def test_batch_argument_errors():
    ds = indexed_dataset(5)
    with pytest.raises(UserError):
        ds.batches(0)
    with pytest.raises(UserError):
        ds.num_batches(-1)
    with pytest.raises(UserError):
        ds.batches(2, order=torch.rand(5))


def test_dataset_subset_to_and_shape():
    ds = indexed_dataset(10)
    sub = ds.subset(torch.tensor([7, 2]))
    assert sub.y.tolist() == [7, 2] and sub.x[:, 0, 0, 0].tolist() == [7.0, 2.0]
    assert len(sub) == 2 and sub.input_shape == (1, 2, 2) and sub.name == "indexed"
    moved = ds.to("cpu")
    assert moved.x.device.type == "cpu" and torch.equal(moved.y, ds.y)
    with pytest.raises(ValueError):
        data.Dataset(
            x=torch.zeros(3, 2), y=torch.zeros(4, dtype=torch.long), num_classes=2, name="bad"
        )
