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

Views (the first four over compare-style ``results.json`` files of
:mod:`decorrelate.experiments.compare`, whose groups hold ``[mean, sample std]`` pairs over
seeds, or a tuning ``grid.json``; the others over the JSON other benchmarks write):

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
``file``      the table rows of a markdown summary a benchmark wrote itself (``*.md``), verbatim;
              ``table=N`` takes its N-th table (from 1) where it holds several, ``rows="a;b"``
              picks and orders the rows by their first cell, from several files if given (the
              header is the first file's).
``alignment`` one suite ``results.json`` of ``bench_align_suites.py`` (its per-run records): the
              mean over seeds of each layer's alignment score of the ``rule`` (default bp) per
              width ``x``, with the shuffled-ΔŴ control in brackets and, where recorded, the
              flattened-kernel score in square brackets; ``layers="title|K;…"`` names the layers
              (K: the index in ``align_score/K``), ``column="{x} ch"`` the width columns.
``pivot``     records as in ``records`` (``at=runs``), one row per value of ``row=KEY``, one
              column per value of ``col=KEY`` (titled ``colname="η = {lr:g}"``), each cell the
              ``cell`` template over the record at that row and column (— where none is).
``fixedpoint`` the ``multi_seed`` part of ``bench_fixedpoint.py --part mnist``'s summary: per
              rule and η, the best train and test accuracy (mean ± std over the seeds that
              finished an epoch, — where none did), max Re λ(W) over training per seed (two
              decimals, three digits from 10) and the step where each seed stopped (— = ran to
              the end; one — where every seed did).
``solver``    ``bench_fixedpoint.py --part solver``'s cases: per network its max Re λ(W) and,
              per solver, iterations / milliseconds / fraction converged (left out where 1).
``cells``     a table laid out by hand whose every number is read from the summaries:
              ``cells="h1|h2;c1|c2;…"`` (rows split by ``;``, cells by ``|``, the first row the
              header), each cell a template as in ``records`` over the files: ``{0[key]}`` the
              first file (whose keys may also be written bare, ``{key}``), ``{1[key]}`` the
              second; ``{a/b}`` is the ratio of two fields, ``[0]`` on a mapping reads its key
              ``"0"``; ``{x:k:.2f}`` is ÷ 1000 (ms in s), ``{x:sp:,.0f}`` groups thousands with
              a space, and a null value is written —. ``align="lrrl"`` sets
              the columns' alignment (default: the first left, the others right).

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


def _markdown_table(root: Path, path: str, number: int) -> list[str]:
    """The lines of the ``number``-th markdown table (from 1) in ``path``."""
    try:
        text = (root / path).read_text()
    except OSError as err:
        raise TableError(f"cannot read table {path}: {err}") from None
    tables: list[list[str]] = []
    previous = False
    for line in text.splitlines():
        row = line.startswith("|")
        if row and not previous:
            tables.append([])
        if row:
            tables[-1].append(line)
        previous = row
    if not tables:
        raise TableError(f"{path} holds no markdown table")
    if not 1 <= number <= len(tables):
        raise TableError(f"{path} holds {len(tables)} tables, not a table {number}")
    return tables[number - 1]


def view_file(root: Path, paths: list[str], options: dict[str, str]) -> str:
    """See the module docstring (``file``)."""
    if len(paths) != 1 and "rows" not in options:
        raise TableError('the file view takes one markdown table, or several with rows="a;b"')
    number = int(options.get("table", "1"))
    tables = [_markdown_table(root, path, number) for path in paths]
    rows = tables[0]
    if "rows" in options:
        body: dict[str, str] = {}
        for table in tables:
            for line in table[2:]:
                body.setdefault(line.split("|")[1].strip(), line)
        rows = rows[:2] + [body[label] for label in _rows(list(body), options)]
    return "\n".join(rows)


class _Units(string.Formatter):
    """``str.format`` with a unit before the format spec: ``{x:pct:.2f}`` (× 100),
    ``{x:MiB:.2f}`` (bytes ÷ 2²⁰), ``{x:k:.2f}`` (÷ 1000: ms in s), ``{x:sp:,.0f}`` (thousands
    grouped by a space)."""

    SCALES: ClassVar[dict[str, float]] = {"pct": 100.0, "MiB": 1.0 / 2**20, "k": 1e-3}

    def format_field(self, value: Any, format_spec: str) -> str:
        if value is None:  # a summary's "not reached" / "not measured"
            return "—"
        unit, _, rest = format_spec.partition(":")
        if unit in self.SCALES:
            return super().format_field(value * self.SCALES[unit], rest)
        if unit == "sp":
            return super().format_field(value, rest).replace(",", " ")
        return super().format_field(value, format_spec)

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, str]:
        """``a/b``: the ratio of two fields; ``[k]`` reads a list's index or a mapping's string
        key (JSON's keys are strings, ``"0"`` too); a key holding a dot is read whole."""
        if field_name in kwargs:
            return kwargs[field_name], field_name
        depth = 0
        for at, char in enumerate(field_name):
            depth += {"[": 1, "]": -1}.get(char, 0)
            if char == "/" and depth == 0:
                value = self.get_field(field_name[:at], args, kwargs)[0]
                return value / self.get_field(field_name[at + 1 :], args, kwargs)[0], field_name
        match = re.fullmatch(r"([^.\[]*)((?:\[[^\]]*\])*)", field_name)
        if match is None:
            raise KeyError(f"{field_name}: only [keys] are read, no attributes")
        first = match.group(1)
        value = self.get_value(int(first) if first.isdigit() else first, args, kwargs)
        for key in re.findall(r"\[([^\]]*)\]", match.group(2)):
            value = value[int(key)] if isinstance(value, list) else value[key]
        return value, first


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


def view_alignment(root: Path, paths: list[str], options: dict[str, str]) -> str:
    """See the module docstring (``alignment``)."""
    if len(paths) != 1 or "layers" not in options:
        raise TableError('the alignment view takes one results.json and layers="title|K;…"')
    rule = options.get("rule", "bp")
    runs = [r for r in _load(root, paths[0])["runs"] if r["rule"] == rule and not r["diverged"]]
    widths = sorted({r["x"] for r in runs})
    layers = [layer.split("|", 1) for layer in options["layers"].split(";")]
    column = options.get("column", "{x}")
    lines = _header([options.get("first", "layer")] + [column.format(x=x) for x in widths])

    def mean(key: str, x: Any) -> float | None:
        values = [r[key] for r in runs if r["x"] == x and key in r]
        return statistics.fmean(values) if values else None

    for title, index in layers:
        cells = [title]
        for x in widths:
            score = mean(f"align_score/{index}", x)
            if score is None:
                raise TableError(f"{paths[0]}: no align_score/{index} of {rule} at {x}")
            text = f"{score:.2f}"
            for key, (left, right) in [("shuffled", "()"), ("kernel", "[]")]:
                other = mean(f"align_score_{key}/{index}", x)
                if other is not None:
                    text += f" {left}{other:.2f}{right}"
            cells.append(text)
        lines.append(_row(cells))
    return "\n".join(lines)


def view_pivot(root: Path, paths: list[str], options: dict[str, str]) -> str:
    """See the module docstring (``pivot``)."""
    if len(paths) != 1 or not {"row", "col", "cell"} <= set(options):
        raise TableError("the pivot view takes one JSON file and row=, col=, cell=")
    records: Any = _load(root, paths[0])
    for step in options.get("at", "").split("."):
        records = records[step] if step else records
    row, col = options["row"], options["col"]
    cells = {(str(r[row]), r[col]): r for r in records}
    labels = _rows(list(dict.fromkeys(str(r[row]) for r in records)), options)
    columns = list(dict.fromkeys(r[col] for r in records))
    formatter = _Units()
    title = options.get("colname", "{" + col + "}")
    lines = _header([options.get("first", row)] + [title.format(**{col: c}) for c in columns])
    for label in labels:
        line = [label]
        for column in columns:
            record = cells.get((label, column))
            try:
                line.append("—" if record is None else formatter.format(options["cell"], **record))
            except (KeyError, IndexError, ValueError, TypeError) as err:
                raise TableError(f"{paths[0]}: cannot fill {options['cell']!r}: {err!r}") from None
        lines.append(_row(line))
    return "\n".join(lines)


def view_fixedpoint(root: Path, paths: list[str], options: dict[str, str]) -> str:
    """See the module docstring (``fixedpoint``)."""
    if len(paths) != 1:
        raise TableError("the fixedpoint view takes one fixedpoint_mnist.json")
    runs: dict[str, Any] = _load(root, paths[0])["multi_seed"]
    seeds = {tuple(r["seeds"]) for r in runs.values()}
    if len(seeds) != 1:
        raise TableError(f"{paths[0]}: the rows ran different seeds {sorted(seeds)}")
    (order,) = seeds
    names = " / ".join(str(seed) for seed in order)
    lines = _header(
        [
            *["rule", "η", "best train acc (%)", "best test acc (%)"],
            *[f"max Re λ(W) (seeds {names})", "stopped at step"],
        ]
    )
    lines[1] = "|---|---:|---:|---:|---|---|"

    def accuracy(stats: dict[str, Any]) -> str:
        if not stats["n"]:
            return "—"
        text = f"{stats['mean'] * 100:.1f}"
        if stats["n"] > 1:
            text += f" ± {stats['std'] * 100:.1f}"
        if stats["n"] < len(order):
            text += f" (n = {stats['n']})"
        return text

    for label in _rows(list(runs), options):
        run = runs[label]
        rule, _, lr = label.partition(" lr ")
        stops = run["diverged_at"]
        stopped = (
            "—"
            if all(s is None for s in stops)
            else " / ".join("—" if s is None else str(s) for s in stops)
        )
        cells = [
            rule,
            lr,
            accuracy(run["best_train_acc_stats"]),
            accuracy(run["best_test_acc_stats"]),
            " / ".join(f"{v:.3g}" if v >= 10 else f"{v:.2f}" for v in run["max_re_eig_W_max"]),
            stopped,
        ]
        lines.append(_row(cells))
    return "\n".join(lines)


def view_solver(root: Path, paths: list[str], options: dict[str, str]) -> str:
    """See the module docstring (``solver``)."""
    if len(paths) != 1:
        raise TableError("the solver view takes one fixedpoint_solver.json")
    cases = {case["case"]: case for case in _load(root, paths[0])["cases"]}
    labels = _rows(list(cases), options)
    methods = [m["method"] for m in cases[labels[0]]["methods"]]
    lines = _header(["network", "max Re λ(W)", *methods])
    lines[1] = "|---|" + "---|" * (len(methods) + 1)
    for label in labels:
        case = cases[label]
        cells = [label.replace("|", "\\|"), f"{case['max_re_eig_W']:.2f}"]
        for method in case["methods"]:
            text = f"{method['iterations']} / {method['seconds'] * 1000:.0f}"
            if method["converged_fraction"] < 1:
                text += f" / {method['converged_fraction']:.2f}"
            cells.append(text)
        lines.append(_row(cells))
    return "\n".join(lines)


def view_cells(root: Path, paths: list[str], options: dict[str, str]) -> str:
    """See the module docstring (``cells``)."""
    if "cells" not in options:
        raise TableError('the cells view takes cells="h1|h2;c1|c2;…"')
    summaries = [_load(root, path) for path in paths]
    rows = [row.split("|") for row in options["cells"].split(";")]
    width = len(rows[0])
    if any(len(row) != width for row in rows):
        raise TableError(f"cells: every row needs {width} cells: {options['cells']!r}")
    align = options.get("align", "l" + "r" * (width - 1))
    if len(align) != width or set(align) - {"l", "r"}:
        raise TableError(f"align must be {width} letters l or r, got {align!r}")
    formatter = _Units()

    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    lines = [line(rows[0]), "|" + "".join("---|" if a == "l" else "---:|" for a in align)]
    for row in rows[1:]:
        try:
            lines.append(line([formatter.format(t, *summaries, **summaries[0]) for t in row]))
        except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError) as err:
            raise TableError(f"{paths[0]}: cannot fill {row!r}: {err!r}") from None
    return "\n".join(lines)


VIEWS: dict[str, Callable[[Path, list[str], dict[str, str]], str]] = {
    "datasets": view_datasets,
    "grid": view_grid,
    "tuning": view_tuning,
    "file": view_file,
    "epochs": view_epochs,
    "records": view_records,
    "cells": view_cells,
    "alignment": view_alignment,
    "pivot": view_pivot,
    "fixedpoint": view_fixedpoint,
    "solver": view_solver,
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
