"""Where a data set's files are looked for, and the one-line message when they are not there.

Search order:

1. the ``data_dir`` argument (``--data-dir``), else ``$DECORRELATE_DATA``. A location given this
   way is authoritative: it is the only one searched, and when it is missing or incomplete the
   error names it and the missing files (never a silent fall-back to another copy or a download).
   Without one, the first directory that holds all required files wins:
2. ``./data`` and ``../shared/data`` relative to the working directory,
3. a ``shared/data`` folder beside an ancestor of this source file (:data:`SHARED_FALLBACK_ROOTS`),
   so a checkout finds the shared copy from any working directory,
4. for MNIST and Fashion-MNIST only: a download into ``./data/<name>/`` (md5-checked, see
   :mod:`.download`), unless ``download=False`` or ``$DECORRELATE_NO_DOWNLOAD`` is set.

In each root both ``<root>/<name>/`` and ``<root>/`` itself are tried, so ``--data-dir`` may point
at the folder holding the data set's files or at a folder of data sets. For CIFAR a root may hold
the tarball or the extracted folder (``cifar-10-batches-py/`` / ``cifar-100-python/``), or be that
extracted folder itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from decorrelate.errors import DataError

from .catalog import _CIFAR, _DISPLAY_NAMES, GENERATED, IDX_FILES, _canonical_name, _required_files
from .download import IDX_MIRRORS, _download_idx, _downloads_disabled
from .sources import _one_line


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
