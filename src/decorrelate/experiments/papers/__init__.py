"""``decorrelate reproduce PAPER``: each paper's central experiments, ending in a claims table.

A paper is one module here defining a :class:`Paper`: the plans it runs at a given scale, the
tables and plots it draws from their results, and its claims. :func:`reproduce` runs every plan
through the one runner (finished runs reused, so an interrupted reproduction continues), lets
the paper write its tables and plots, and writes ``claims.md``/``claims.csv`` and
``results.md`` (every table, claims last) into the output directory.

Scales: ``quick`` — synthetic data and tiny sizes, a smoke test of the whole path (seconds;
CI runs it); ``cpu`` (the default) — what this machine runs in minutes to an hour, with the
seeds the verdicts need; ``paper`` — the paper's own sizes, for a GPU or a cluster.
Adding a paper is one module here plus one line in :data:`PAPERS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError
from ..plan import Plan
from ..report import Claim, Groups, Table, claims_table, group_results, write_table, write_text
from ..runner import Log, Result, check_jobs, run_plan

SCALES = ("quick", "cpu", "paper")


@dataclass(frozen=True)
class Paper:
    """One paper's reproduction (see the module docstring).

    ``plans(scale, out)`` returns the plans (their runs under ``out``); ``report(results, out)``
    writes the paper's tables and plots from ``{plan name: results}`` and returns the tables (to
    be shown in ``results.md``) and the files written; ``claims`` decide the claims table from
    ``{plan name: groups}``.
    """

    name: str
    title: str
    plans: Callable[[str, Path], list[Plan]]
    report: Callable[[dict[str, list[Result]], Path], tuple[list[Table], list[Path]]]
    claims: Sequence[Claim]


#: Paper name → the module (under this package) whose ``PAPER`` it is.
PAPERS = {
    "ahmad2024": "ahmad2024",
    "dalm2024": "dalm2024",
    "boopathy2022": "boopathy2022",
    "zhu2024": "zhu2024",
}


#: Names of single experiments that ``reproduce`` also accepts: name → (paper, plan name).
#: (The Align suites were run by these names before the papers were.)
ALIASES: dict[str, tuple[str, str]] = {
    name: ("boopathy2022", name)
    for name in ("align-width", "align-width-conv", "align-lowdata", "align-rnn")
}


def paper_names() -> tuple[str, ...]:
    return tuple(PAPERS)


def get_paper(name: str) -> Paper:
    """The paper called ``name`` (one line naming the choices otherwise)."""
    if name not in PAPERS:
        raise UserError(f"unknown paper {name!r}; choose one of: {', '.join(PAPERS)} (see --list)")
    return importlib.import_module(f"{__name__}.{PAPERS[name]}").PAPER


def reproduce(
    name: str,
    out: str | Path,
    *,
    scale: str = "cpu",
    jobs: int = 1,
    log: Log | None = print,
    progress: bool | None = None,
    only: str | None = None,
) -> tuple[Table, list[Path]]:
    """Run paper ``name`` at ``scale`` into ``out``; its claims table and the files written.

    ``only`` names one of the paper's plans to run alone (its claims then judge what they can);
    ``name`` may also be one of :data:`ALIASES`, which names a paper and its plan.
    """
    from ... import checkpoint as ckpt

    if name in ALIASES:
        name, plan = ALIASES[name]
        if only not in (None, plan):
            raise UserError(f"{plan} is one experiment of {name}; it has no experiment {only!r}")
        only = plan

    if scale not in SCALES:
        raise UserError(f"unknown scale {scale!r}; choose one of: {', '.join(SCALES)}")
    check_jobs(jobs)
    paper = get_paper(name)
    root = Path(out)
    plans = paper.plans(scale, root)  # built (and validated) before anything runs
    if only is not None:
        names = [plan.name for plan in plans]
        if only not in names:
            raise UserError(f"{paper.name} has no experiment {only!r}; it has: {', '.join(names)}")
        plans = [plan for plan in plans if plan.name == only]
    root = ckpt.prepare_out_dir(root)
    results: dict[str, list[Result]] = {}
    for plan in plans:
        if log:
            log(f"{paper.name}: {plan.name} ({len(plan.runs)} runs) {plan.description}".rstrip())
        results[plan.name] = run_plan(plan, jobs=jobs, log=log, progress=progress, keep_going=True)
    tables, files = paper.report(results, root)
    groups: dict[str, Groups] = {k: group_results(v) for k, v in results.items()}
    claims = claims_table(paper.claims, groups, title=f"Claims of {paper.title} ({scale} scale)")
    files += write_table(claims, root / "claims")
    text = f"# {paper.title}\n\n`decorrelate reproduce {paper.name} --scale {scale}`\n\n"
    text += "\n\n".join(t.markdown() for t in [*tables, claims]) + "\n"
    files.append(write_text(root / "results.md", text))
    return claims, files
