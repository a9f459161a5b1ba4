"""Named groups of runs (any rule / decorrelation / options each), over datasets and seeds.

The spec is a JSON file::

    {"base": {...config options shared by every run...},
     "datasets": ["mnist", "fashion-mnist"],
     "seeds": [0, 1, 2],
     "groups": {"bp": {"rule": "bp"}, "danp (inaccessible)": {"rule": "danp", ...}, ...}}

Every (dataset, group, seed) run goes through :func:`decorrelate.compare.run_plan` (``--jobs``
in parallel, finished runs reused, interrupted ones resumed, diverged ones reported), and each
dataset gets ``results.md``/``results.json``, accuracy-vs-epoch/seconds plots and, when the runs
logged ``alignment_every`` angles, per-layer angle plots, via
:func:`decorrelate.compare.write_summary`. The first group is the reference whose best test
accuracy the others are timed against. Run directories are ``WORK/<dataset>/<group>-s<seed>``,
so two specs sharing a work directory share identical runs.

    python benchmarks/bench_groups.py benchmarks/specs/fa_mlp.json --jobs 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from decorrelate import make_config
from decorrelate.compare import GridSummary, _dir_name, run_plan, write_summary


def run_spec(
    spec: dict[str, Any], work: Path, out: Path, jobs: int = 2, datasets: list[str] | None = None
) -> dict[str, GridSummary]:
    """Run (or reuse) every run of ``spec``; write and return one summary per dataset."""
    datasets = datasets or spec["datasets"]
    plan, keys = [], []
    for dataset in datasets:
        for label, overrides in spec["groups"].items():
            for seed in spec["seeds"]:
                where = work / dataset / _dir_name(label, seed)
                cfg = make_config(
                    spec["base"], overrides, {"dataset": dataset, "seed": seed, "out": str(where)}
                )
                plan.append((f"{dataset}: {label}", cfg))
                keys.append((dataset, label))
    histories = run_plan(plan, jobs=jobs, keep_going=True)
    summaries = {}
    for dataset in datasets:
        grouped: dict[str, list] = {}
        failed: dict[str, int] = {}
        for (ds, label), history in zip(keys, histories, strict=True):
            if ds != dataset:
                continue
            if history is None:
                failed[label] = failed.get(label, 0) + 1
            else:
                grouped.setdefault(label, []).append(history)
        target = out / dataset
        target.mkdir(parents=True, exist_ok=True)
        summary = write_summary(grouped, target, base_config=spec["base"])
        seeds = len(spec["seeds"])
        notes = [f"{label}: {n} of {seeds} seeds diverged" for label, n in failed.items()]
        if notes:
            with open(target / "results.md", "a") as fh:
                fh.write("\n" + "\n".join(notes) + "\n")
        medians = {
            label: statistics.median(r["epoch_seconds"] for h in hs for r in h[1:])
            for label, hs in grouped.items()
        }
        (target / "epoch_seconds.json").write_text(json.dumps(medians, indent=1) + "\n")
        print(f"\n## {dataset}\n{summary.table}")
        for line in notes:
            print(line)
        summaries[dataset] = summary
    return summaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="JSON spec (see the module docstring)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work-dir", default=None, help="default: runs/<spec name>")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/<spec name>")
    parser.add_argument("--datasets", default=None, help="comma-separated subset of the spec's")
    args = parser.parse_args()
    spec_path = Path(args.spec)
    run_spec(
        json.loads(spec_path.read_text()),
        Path(args.work_dir or f"runs/{spec_path.stem}"),
        Path(args.out or f"benchmarks/results/{spec_path.stem}"),
        jobs=args.jobs,
        datasets=args.datasets.split(",") if args.datasets else None,
    )


if __name__ == "__main__":
    main()
