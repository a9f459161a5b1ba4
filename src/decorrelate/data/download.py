"""The download fallback for MNIST and Fashion-MNIST: md5-checked fetches from public mirrors.

Used by :func:`.locate._find_or_download` only when no copy was found and no location was named.
Each file is written to a ``.part`` file and md5-checked before it gets its final name, so an
interrupted or tampered download never leaves a plausible-looking file behind. CIFAR is never
downloaded (its tarballs are large; the not-found message says where to get them).
"""

from __future__ import annotations

import logging
import os
import shutil
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from decorrelate.errors import DataError

from .catalog import IDX_FILES, IDX_MD5
from .sources import _md5, _verify_md5

log = logging.getLogger(__name__)

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


def _downloads_disabled() -> bool:
    """True when ``$DECORRELATE_NO_DOWNLOAD`` is set to anything but empty, 0, false or no."""
    value = os.environ.get("DECORRELATE_NO_DOWNLOAD", "").strip().lower()
    return value not in ("", "0", "false", "no")


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
