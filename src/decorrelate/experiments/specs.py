"""Benchmark specs: a JSON file of named groups over datasets and seeds, as a plan.

The spec is::

    {"base": {...config options shared by every run...},
     "datasets": ["mnist", "fashion-mnist"],
     "seeds": [0, 1, 2],
     "groups": {"bp": {"rule": "bp"}, "danp (inaccessible)": {"rule": "danp", ...}, ...}}

Every (dataset, group, seed) is one run of the plan (:func:`spec_plan`), run by the one runner
(``jobs`` in parallel, finished runs reused, interrupted ones resumed, diverged ones kept as
results), and each dataset gets the compare report (:func:`.compare.write_summary`):
``results.md``/``.csv``/``.json``, accuracy-vs-epoch/seconds plots and, when the runs logged
``alignment_every`` angles, per-layer angle plots, plus ``epoch_seconds.json`` (median seconds
per epoch of each group). The first group is the reference whose best test accuracy the others
are timed against. Run directories are ``WORK/<dataset>/<group>-s<seed>``, so two specs sharing a
work directory share identical runs.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ..errors import UserError
from .compare import GridSummary, write_summary
from .plan import Plan, grid, slug
from .report import group_results, write_text
from .runner import Log, run_plan

SPEC_KEYS = ("about", "base", "datasets", "seeds", "groups")


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and check a spec file (one line naming what is wrong otherwise)."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read spec {path}: {err}") from None
    if not isinstance(spec, dict):
        raise UserError(f"spec {path} must be a JSON object with keys {', '.join(SPEC_KEYS)}")
    unknown = set(spec) - set(SPEC_KEYS)
    missing = {"base", "datasets", "seeds", "groups"} - set(spec)
    if unknown or missing:
        what = f"unknown keys {sorted(unknown)}" if unknown else f"missing keys {sorted(missing)}"
        raise UserError(f"spec {path}: {what}; a spec has {', '.join(SPEC_KEYS)}")
    return spec


def spec_plan(spec: dict[str, Any], work: Path, datasets: list[str] | None = None) -> Plan:
    """The runs of ``spec`` (optionally a subset of its datasets) under ``work``."""
    datasets = datasets or list(spec["datasets"])
    groups = spec["groups"]
    return grid(
        "spec",
        spec["base"],
        {"dataset": datasets, "group": list(groups), "seed": list(spec["seeds"])},
        work,
        options=lambda p: {**groups[p["group"]], "dataset": p["dataset"], "seed": p["seed"]},
        label=lambda p: p["group"],
        directory=lambda group, p: f"{p['dataset']}/{slug(group)}-s{p['seed']}",
        description=spec.get("about", ""),
    )


def run_spec(
    spec: dict[str, Any],
    work: Path,
    out: Path,
    jobs: int = 2,
    datasets: list[str] | None = None,
    log: Log | None = print,
) -> dict[str, GridSummary]:
    """Run (or reuse) every run of ``spec``; write and return one summary per dataset."""
    plan = spec_plan(spec, Path(work), datasets)
    results = run_plan(plan, jobs=jobs, log=log, keep_going=True)
    summaries = {}
    for dataset in dict.fromkeys(r.run.axes["dataset"] for r in results):
        mine = [r for r in results if r.run.axes["dataset"] == dataset]
        groups = group_results(mine)
        target = Path(out) / dataset
        summary = write_summary(groups, target, base_config=spec["base"])
        medians = {
            label: statistics.median(
                row["epoch_seconds"] for r in rs if r.ok for row in r.history[1:]
            )
            for label, rs in groups.items()
            if any(r.ok and len(r.history) > 1 for r in rs)
        }
        write_text(target / "epoch_seconds.json", json.dumps(medians, indent=1) + "\n")
        if log:
            log(f"\n## {dataset}\n{summary.table}")
        summaries[dataset] = summary
    return summaries
