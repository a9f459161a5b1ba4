"""The one report: finished runs → tables (markdown + CSV), plots (PNG) and claims tables.

Every statistic over seeds is :func:`mean_std` (the mean and the *sample* standard deviation of
the finite values; a diverged run counts in ``n`` and is named in the cell). Tables are
:class:`Table` s, written side by side as ``NAME.md`` and ``NAME.csv`` (:func:`write_table`):
the markdown for reading, the CSV (mean, std and n as their own columns) for other tools.

A *claims table* (:func:`claims_table`) states a paper's claim in one line, the paper's figure,
ours with its seed spread, and a verdict from :func:`verdict`: *confirmed* when the 95 %
confidence interval of the mean per-seed difference (Student's t with n − 1 degrees of freedom)
lies on the claimed side of zero, *refuted* when it lies on the other side, else *inconclusive
at this scale*. With the 3 seeds of most plans that asks for a mean beyond 2.48 standard
deviations of the differences (t = 4.30 times the standard error): two standard errors would
call a third of noise-only 3-seed comparisons decided.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from ..stats import mean_std
from .runner import Result

Groups = dict[str, list[Result]]


def group_results(results: Iterable[Result]) -> Groups:
    """Results by group label, groups in the order their first run appears."""
    groups: Groups = {}
    for result in results:
        groups.setdefault(result.run.group, []).append(result)
    return groups


def values_of(results: Sequence[Result], key: str) -> list[float]:
    """``summary[key]`` of every run (nan for a diverged run or a missing key)."""
    return [r.summary.get(key, math.nan) if r.ok else math.nan for r in results]


def cell(values: Sequence[Any], scale: float = 1.0, digits: int = 2, spread: bool = True) -> str:
    """``mean ± std`` of the finite values (``diverged`` if none; failed runs counted);
    without ``spread`` the mean alone (a count that is the same in every seed)."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "diverged" if values else ""
    text = f"{mean * scale:.{digits}f}"
    if n > 1 and spread:
        text += f" ± {std * scale:.{digits}f}"
    if n < len(values):
        text += f" ({len(values) - n} diverged)"
    return text


@dataclass
class Table:
    """A table: markdown cells for reading, and per-cell raw numbers for the CSV."""

    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)
    title: str = ""

    def markdown(self) -> str:
        lines = [f"{self.title}\n" if self.title else ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|---|" + "---:|" * (len(self.header) - 1))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines).lstrip("\n")

    def csv(self) -> str:
        rows = self.raw or [dict(zip(self.header, row, strict=True)) for row in self.rows]
        keys = list(dict.fromkeys(k for row in rows for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` atomically (a crash never leaves half a table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_bytes(path, lambda f: f.write(text.encode()))
    return path


def write_table(table: Table, stem: str | Path) -> list[Path]:
    """``STEM.md`` and ``STEM.csv``; their paths."""
    stem = Path(stem)
    return [
        write_text(stem.with_suffix(".md"), table.markdown() + "\n"),
        write_text(stem.with_suffix(".csv"), table.csv()),
    ]


@dataclass(frozen=True)
class Column:
    """A summary scalar shown as a column: ``summary[key] * scale`` with ``digits`` decimals,
    mean ± std over seeds (the mean alone without ``spread``)."""

    key: str
    title: str
    scale: float = 1.0
    digits: int = 2
    spread: bool = True


#: The columns of a classification grid (accuracy in %).
ACCURACY_COLUMNS = (
    Column("epochs", "epochs", 1.0, 0, spread=False),
    Column("best_test_acc", "best test acc (%)", 100.0, 2),
    Column("final_test_acc", "final test acc (%)", 100.0, 2),
    Column("train_seconds", "train time (s)", 1.0, 1),
)


def summary_table(groups: Groups, columns: Sequence[Column], first: str = "run") -> Table:
    """One row per group, one column per summary scalar, cells mean ± std over its seeds."""
    table = Table([first, "seeds", *(c.title for c in columns)])
    for label, results in groups.items():
        row = [label, str(len(results))]
        raw: dict[str, Any] = {first: label, "seeds": len(results)}
        for c in columns:
            values = values_of(results, c.key)
            row.append(cell(values, c.scale, c.digits, c.spread))
            mean, std, n = mean_std(values)
            raw.update({c.key: mean, f"{c.key}_std": std, f"{c.key}_n": n})
        table.rows.append(row)
        table.raw.append(raw)
    return table


def pivot_table(
    results: Sequence[Result],
    rows: str,
    cols: str,
    key: str,
    *,
    scale: float = 1.0,
    digits: int = 2,
    title: str = "",
) -> Table:
    """Axis ``rows`` down, axis ``cols`` across (sorted), cells ``summary[key]`` mean ± std."""
    cells: dict[Any, dict[Any, list[Result]]] = {}
    for r in results:
        cells.setdefault(r.run.axes[rows], {}).setdefault(r.run.axes[cols], []).append(r)
    xs = sorted({x for line in cells.values() for x in line})
    n = {x: max(len(line.get(x, [])) for line in cells.values()) for x in xs}
    table = Table([rows, *(f"{cols}={x} (n={n[x]})" for x in xs)], title=title)
    for y, line in cells.items():
        table.rows.append(
            [
                str(y),
                *(cell(values_of(line[x], key), scale, digits) if x in line else "" for x in xs),
            ]
        )
        raw: dict[str, Any] = {rows: y}
        for x in xs:
            mean, std, count = mean_std(values_of(line.get(x, []), key))
            raw.update({f"{cols}={x}": mean, f"{cols}={x}_std": std, f"{cols}={x}_n": count})
        table.raw.append(raw)
    return table


def series(
    results: Sequence[Result], line: str, x: str, key: str
) -> dict[str, dict[Any, list[float]]]:
    """``{line value: {x value: [summary[key] per seed]}}``, for a sweep plot."""
    out: dict[str, dict[Any, list[float]]] = {}
    for r in results:
        value = r.summary.get(key, math.nan) if r.ok else math.nan
        out.setdefault(str(r.run.axes[line]), {}).setdefault(r.run.axes[x], []).append(value)
    return out


def histories(groups: Groups) -> dict[str, list[list[dict[str, Any]]]]:
    """The finished runs' histories by group (for the curve plots)."""
    return {label: [r.history for r in rs if r.ok] for label, rs in groups.items()}


# ----------------------------------------------------------------------------- claims


CONFIRMED, REFUTED, INCONCLUSIVE = "confirmed", "refuted", "inconclusive at this scale"


#: Two-sided 95 % quantiles of Student's t by degrees of freedom (1–30); above, the normal 1.96.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile(dof: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``dof`` degrees of freedom."""
    return _T975[dof - 1] if dof <= len(_T975) else 1.96


def verdict(differences: Sequence[float]) -> str:
    """The verdict on "the difference is > 0" from one difference per seed (see the module
    docstring): confirmed, refuted, or inconclusive (also with fewer than two seeds)."""
    mean, std, n = mean_std(differences)
    if n < 2:
        return INCONCLUSIVE
    margin = t_quantile(n - 1) * std / math.sqrt(n)
    if mean > margin:
        return CONFIRMED
    if mean < -margin:
        return REFUTED
    return INCONCLUSIVE


@dataclass(frozen=True)
class Finding:
    """What an experiment measured for a claim: our figure (with spread) and the verdict."""

    ours: str
    verdict: str


@dataclass(frozen=True)
class Claim:
    """A paper's claim: one line, the paper's figure, and how our results decide it."""

    text: str
    paper: str
    judge: Callable[[Mapping[str, Groups]], Finding]


def claims_table(claims: Sequence[Claim], groups: Mapping[str, Groups], title: str = "") -> Table:
    """claim | paper | ours | verdict, one row per claim (``groups``: per plan name)."""
    table = Table(["claim", "paper", "ours (mean ± std over seeds)", "verdict"], title=title)
    for claim in claims:
        try:
            found = claim.judge(groups)
        except (KeyError, ValueError, ZeroDivisionError) as err:  # a run missing or diverged
            found = Finding(f"not measured ({type(err).__name__}: {err})", INCONCLUSIVE)
        table.rows.append([claim.text, claim.paper, found.ours, found.verdict])
        table.raw.append(
            {
                "claim": claim.text,
                "paper": claim.paper,
                "ours": found.ours,
                "verdict": found.verdict,
            }
        )
    return table
