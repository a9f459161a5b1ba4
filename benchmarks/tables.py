"""Rebuild the generated tables of BENCHMARKS.md from the committed summaries in benchmarks/results.

A generated table sits between two markers; the first names a *view* (how to lay the summary out),
the summary files, options, and the command that wrote the summaries::

    <!-- table: datasets benchmarks/results/fa_mlp/mnist/results.json
         benchmarks/results/fa_mlp/fashion-mnist/results.json diff=gap
         command="python benchmarks/bench_groups.py benchmarks/specs/fa_mlp.json --jobs 2" -->
    | ... the table, written by this script ... |
    <!-- /table -->

Everything between the markers is replaced by the view's table and a line naming its source
files and command, so every number there can be traced to the run that made it, and the file
cannot drift from the summaries: ``tests/test_benchmarks_md.py`` checks that regenerating changes
nothing. Text outside the markers (and tables without markers) is left alone.

Views (each over compare-style ``results.json`` files of :mod:`decorrelate.experiments.compare`,
whose groups hold ``[mean, sample std]`` pairs over seeds, or a tuning ``grid.json``):

``datasets``  one row per group of the first file, one column per file (dataset) with the
              ``key`` (default ``best_test_acc``) in %, mean ± std; ``diff=gap`` adds the first
              group's mean minus each row's after each column, ``diff=gain`` the opposite;
              ``seconds=D`` adds the first file's median seconds per epoch
              (``epoch_seconds.json`` beside it) with ``D`` decimals. Files of several
              experiments over one dataset share its column. ``rows="a;b"`` (every view over
              groups) picks and orders the rows.
``grid``      one file: best and final test accuracy, median seconds per epoch
              (``epoch_seconds.json`` beside it), epochs and seconds to the first group's best
              seed-mean accuracy with their ratio to the first group's.
``tuning``    a ``grid.json`` of ``bench_decor_accuracy.py``: each method's selected (lr, η), its
              best validation accuracy and the worst cell of its grid.
``epochs``    from the histories in ``results.json``: test accuracy at ``epochs=3,10,20`` (default
              the last), mean ± std over seeds, ``best`` adds the best over epochs, ``loss`` the
              training loss at the last epoch shown; ``run=0`` shows the first finished seed
              alone instead (histories are kept in seed order).
``records``   one row per record of a list in any JSON summary (``at=results``: where the list
              is), one column per ``cols="title|template;…"``: a ``str.format`` template over the
              record (``{single[samples_per_s]:.0f}``; ``{x:pct:.2f}`` × 100, ``{x:MiB:.2f}``
              bytes in MiB).
``file``      the table rows of a markdown summary a benchmark wrote itself (``*.md``), verbatim.

    python benchmarks/tables.py            # rewrite BENCHMARKS.md
    python benchmarks/tables.py --check    # exit 1 if BENCHMARKS.md is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import string
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = ROOT / "BENCHMARKS.md"

#: ``<!-- table: ARGS -->`` … ``<!-- /table -->``, each at the start of a line (ARGS may span
#: lines).
BLOCK = re.compile(
    r"^(<!-- table: (?P<args>.*?)-->\n)(?P<body>.*?)^(<!-- /table -->)$", re.DOTALL | re.MULTILINE
)

#: How dataset folders are named in a table header.
DATASET_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "synthetic": "synthetic"}

MINUS = "−"


class TableError(ValueError):
    """A marker that cannot be rendered (unknown view, missing file, bad option)."""


def _load(root: Path, path: str) -> dict[str, Any]:
    try:
        return json.loads((root / path).read_text())
    except (OSError, ValueError) as err:
        raise TableError(f"cannot read summary {path}: {err}") from None


def _dataset(path: str) -> str:
    name = Path(path).parent.name
    return DATASET_NAMES.get(name, name)


def _pct(pair: list[float], seeds: int, most: int, digits: int = 2) -> str:
    """``mean ± std`` in %, the mean alone for one seed; fewer seeds than the table's most
    means the others diverged (a spec report keeps only finished runs)."""
    mean, std = pair
    text = f"{mean * 100:.{digits}f}"
    if seeds > 1:
        text += f" ± {std * 100:.{digits}f}"
    if seeds < most:
        text += f" ({most - seeds} of {most} seeds diverged)"
    return text


def _signed(value: float, plus: bool) -> str:
    text = f"{abs(value):.2f}"
    if value < 0 and text != "0.00":
        return MINUS + text
    return ("+" if plus else "") + text


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(titles: list[str]) -> list[str]:
    return [_row(titles), "|---|" + "---:|" * (len(titles) - 1)]


def _rows(labels: list[str], options: dict[str, str]) -> list[str]:
    """The row labels: ``rows="a;b;c"`` picks and orders them (each must exist)."""
    if "rows" not in options:
        return labels
    wanted = [label.strip() for label in options["rows"].split(";") if label.strip()]
    missing = [label for label in wanted if label not in labels]
    if missing:
        raise TableError(f"rows {missing} are in none of the summaries (known: {labels})")
    return wanted


def view_datasets(root: Path, paths: list[str], options: dict[str, str]) -> str:
    """See the module docstring (``datasets``)."""
    key = options.get("key", "best_test_acc")
    diff = options.get("diff")
    if diff not in (None, "gap", "gain"):
        raise TableError(f"diff must be gap or gain, got {diff!r}")
    columns: dict[str, dict[str, Any]] = {}  # dataset -> label -> group (files merged)
    for path in paths:
        merged = columns.setdefault(_dataset(path), {})
        for group in _load(root, path)["groups"]:
            merged.setdefault(group["label"], group)
    labels = _rows(list(dict.fromkeys(label for c in columns.values() for label in c)), options)
    most = max(g["seeds"] for groups in columns.values() for g in groups.values())
    titles = [options.get("first", "run")]
    for dataset in columns:
        titles.append(f"{dataset} {options.get('unit', key.replace('_', ' ') + ' (%)')}")
        if diff:
            titles.append(diff)
    seconds = None
    if "seconds" in options:
        seconds = _load(root, str(Path(paths[0]).parent / "epoch_seconds.json"))
        titles.append(f"s/epoch ({_dataset(paths[0])})")
    lines = _header(titles)
    for label in labels:
        cells = [label]
        for groups in columns.values():
            group = groups.get(label)
            cells.append("diverged" if group is None else _pct(group[key], group["seeds"], most))
            if diff:
                first = groups.get(labels[0])
                if group is None or first is None:
                    cells.append("")
                elif group is first:
                    cells.append("—")
                else:
                    delta = (first[key][0] - group[key][0]) * 100
                    cells.append(_signed(delta if diff == "gap" else -delta, diff == "gain"))
        if seconds is not None:
            value = seconds.get(label)
            cells.append("" if value is None else f"{value:.{int(options['seconds'])}f}")
        lines.append(_row(cells))
    return "\n".join(lines)


def _mean_std(values: list[float], scale: float, digits: int) -> str:
    text = f"{statistics.fmean(values) * scale:.{digits}f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values) * scale:.{digits}f}"
    return text


def view_epochs(root: Path, paths: list[str], options: dict[str, str]) -> str:
    """See the module docstring (``epochs``)."""
    histories: dict[str, list[list[dict[str, Any]]]] = {}
    for path in paths:
        for label, runs in _load(root, path)["histories"].items():
            histories.setdefault(label, runs)
    labels = _rows(list(histories), options)
    epochs = [int(e) for e in options.get("epochs", "-1").split(",")]
    which = options.get("run")
    titles = [options.get("first", "run")]
    titles += [f"epoch {e} test acc (%)" if e >= 0 else "final test acc (%)" for e in epochs]
    if "best" in options:
        titles.append("best test acc (%)")
    if "loss" in options:
        titles.append("train loss" + (f", epoch {epochs[-1]}" if epochs[-1] >= 0 else ""))
    lines = _header(titles)
    for label in labels:
        runs = histories[label] if which is None else [histories[label][int(which)]]
        cells = [label]
        try:
            cells += [_mean_std([h[e]["test_acc"] for h in runs], 100.0, 2) for e in epochs]
        except IndexError:
            raise TableError(f"{label}: no epoch {epochs} in its history") from None
        if "best" in options:
            cells.append(_mean_std([max(r["test_acc"] for r in h) for h in runs], 100.0, 2))
        if "loss" in options:
            cells.append(_mean_std([h[epochs[-1]]["train_loss"] for h in runs], 1.0, 3))
        lines.append(_row(cells))
    return "\n".join(lines)


def _ratio(value: float, reference: float, digits: int) -> str:
    return f"{value / reference:.{digits}f}×"


def view_grid(root: Path, paths: list[str], options: dict[str, str]) -> str:
    """See the module docstring (``grid``)."""
    if len(paths) != 1:
        raise TableError("the grid view takes one results.json")
    summary = _load(root, paths[0])
    seconds = _load(root, str(Path(paths[0]).parent / "epoch_seconds.json"))
    groups = summary["groups"]
    ref = groups[0]
    most = max(g["seeds"] for g in groups)
    target = f"{ref['target_acc'] * 100:.2f} %"
    lines = _header(
        [
            options.get("first", _dataset(paths[0])),
            "best test acc (%)",
            "final (%)",
            "s/epoch",
            f"epochs to {ref['label']}'s best ({target})",
            "seconds to it",
        ]
    )
    for g in groups:
        epochs, secs = g["epochs_to_target"], g["seconds_to_target"]
        if epochs is None:
            reached = ["not reached", "—"]
        elif g is ref:
            reached = [str(epochs), f"{secs:.1f}"]
        else:
            reached = [
                f"{epochs} ({_ratio(epochs, ref['epochs_to_target'], 2)})",
                f"{secs:.1f} ({_ratio(secs, ref['seconds_to_target'], 2)})",
            ]
        cells = [
            g["label"],
            _pct(g["best_test_acc"], g["seeds"], most),
            _pct(g["final_test_acc"], g["seeds"], most),
            f"{seconds[g['label']]:.1f}",
            *reached,
        ]
        lines.append(_row(cells))
    return "\n".join(lines)


def _sci(value: float) -> str:
    """``1e-4`` / ``3e-4`` (no zero padding), as the tables write learning rates."""
    mantissa, exponent = f"{value:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def view_tuning(root: Path, paths: list[str], options: dict[str, str]) -> str:
    """See the module docstring (``tuning``)."""
    if len(paths) != 1:
        raise TableError("the tuning view takes one grid.json")
    grid = _load(root, paths[0])
    lines = _header(
        [
            "method",
            "selected Adam lr",
            "selected η",
            "best val acc (%)",
            "worst cell of its grid (%)",
        ]
    )
    for method, chosen in grid["selected"].items():
        rows = [r for r in grid["rows"] if r["method"] == method and not r["diverged"]]
        pick = next(
            r for r in rows if r["lr"] == chosen["lr"] and r["decor_lr"] == chosen["decor_lr"]
        )
        worst = min(rows, key=lambda r: r["val_acc"])
        where = (
            f"lr {_sci(worst['lr'])}"
            if worst["decor_lr"] is None
            else f"{_sci(worst['lr'])}, {_sci(worst['decor_lr'])}"
        )
        eta = "—" if chosen["decor_lr"] is None else _sci(chosen["decor_lr"])
        lines.append(
            _row(
                [
                    method,
                    _sci(chosen["lr"]),
                    eta,
                    f"{pick['val_acc'] * 100:.2f}",
                    f"{worst['val_acc'] * 100:.2f} ({where})",
                ]
            )
        )
    return "\n".join(lines)


def view_file(root: Path, paths: list[str], options: dict[str, str]) -> str:
    """See the module docstring (``file``)."""
    if len(paths) != 1:
        raise TableError("the file view takes one markdown table")
    try:
        text = (root / paths[0]).read_text()
    except OSError as err:
        raise TableError(f"cannot read table {paths[0]}: {err}") from None
    rows = [line for line in text.splitlines() if line.startswith("|")]
    if not rows:
        raise TableError(f"{paths[0]} holds no markdown table")
    return "\n".join(rows)


class _Units(string.Formatter):
    """``str.format`` with a unit before the format spec: ``{x:pct:.2f}`` (× 100),
    ``{x:MiB:.2f}`` (bytes ÷ 2²⁰)."""

    SCALES: ClassVar[dict[str, float]] = {"pct": 100.0, "MiB": 1.0 / 2**20}

    def format_field(self, value: Any, format_spec: str) -> str:
        unit, _, rest = format_spec.partition(":")
        if unit in self.SCALES:
            return super().format_field(value * self.SCALES[unit], rest)
        return super().format_field(value, format_spec)


def view_records(root: Path, paths: list[str], options: dict[str, str]) -> str:
    """See the module docstring (``records``)."""
    if len(paths) != 1 or "cols" not in options:
        raise TableError('the records view takes one JSON file and cols="title|template;…"')
    records: Any = _load(root, paths[0])
    for step in options.get("at", "").split("."):
        records = records[step] if step else records
    columns = [c.split("|", 1) for c in options["cols"].split(";")]
    if any(len(c) != 2 for c in columns):
        raise TableError('cols must be "title|template;title|template;…"')
    lines = _header([title for title, _ in columns])
    formatter = _Units()
    for record in records:
        try:
            lines.append(_row([formatter.format(t, **record) for _, t in columns]))
        except (KeyError, IndexError, ValueError, TypeError) as err:
            raise TableError(f"{paths[0]}: cannot fill {options['cols']!r}: {err!r}") from None
    return "\n".join(lines)


VIEWS: dict[str, Callable[[Path, list[str], dict[str, str]], str]] = {
    "datasets": view_datasets,
    "grid": view_grid,
    "tuning": view_tuning,
    "file": view_file,
    "epochs": view_epochs,
    "records": view_records,
}


def parse(args: str) -> tuple[str, list[str], dict[str, str]]:
    """A marker's arguments: the view, the summary paths, ``key=value`` options."""
    try:
        words = shlex.split(args)
    except ValueError as err:
        raise TableError(f"marker {args.strip()!r}: {err}") from None
    if not words or words[0] not in VIEWS:
        raise TableError(f"marker {args.strip()!r}: the first word must be one of {list(VIEWS)}")
    paths = [w for w in words[1:] if "=" not in w]
    options = dict(w.split("=", 1) for w in words[1:] if "=" in w)
    if not paths:
        raise TableError(f"marker {args.strip()!r} names no summary file")
    return words[0], paths, options


def render_block(args: str, root: Path = ROOT) -> str:
    """The body of one marker: the table, then its source files and command."""
    view, paths, options = parse(args)
    table = VIEWS[view](root, paths, options)
    source = ", ".join(f"`{p}`" for p in paths)
    line = f"Generated from {source}"
    if "command" in options:
        line += f" (written by `{options['command']}`)"
    return f"{table}\n\n{line}.\n"


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every generated table rebuilt from the summaries under ``root``."""

    def replace(match: re.Match[str]) -> str:
        return match.group(1) + render_block(match.group("args"), root) + match.group(4)

    return BLOCK.sub(replace, text)


def markers(text: str) -> list[tuple[str, list[str], dict[str, str]]]:
    """Every marker's parsed arguments, in document order."""
    return [parse(m.group("args")) for m in BLOCK.finditer(text)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether it is current")
    parser.add_argument("--file", default=str(DOCUMENT))
    args = parser.parse_args()
    path = Path(args.file)
    text = path.read_text()
    try:
        new = render(text)
    except TableError as err:
        sys.exit(f"error: {err}")
    if args.check:
        if new != text:
            sys.exit(f"{path} is out of date: run python benchmarks/tables.py")
        print(f"{path}: {len(markers(text))} generated tables, all current")
        return
    if new != text:
        path.write_text(new)
    print(f"{path}: {len(markers(new))} generated tables rebuilt")


if __name__ == "__main__":
    main()
