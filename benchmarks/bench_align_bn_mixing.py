"""align-ada on the ``align-width-conv`` sweep with both batch-norm mixing points, side by side.

``real`` (the default, the authors' code) reuses the paper plan's own align-ada runs in
``benchmarks/results/align-width-conv/runs/`` (run them first with ``bench_align_suites.py``, or
they are trained here); ``twin`` (``--align-bn-mixing twin``) runs the same configurations into
``benchmarks/results/align_bn_mixing/runs/``. Same data, seeds and sizes as the cpu-scale plan.

    python benchmarks/bench_align_bn_mixing.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from decorrelate.experiments.papers.boopathy2022 import plan_for
from decorrelate.experiments.plan import Plan, Run
from decorrelate.experiments.report import pivot_table, write_table
from decorrelate.experiments.runner import run_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/align_bn_mixing")
    parser.add_argument("--results", default="benchmarks/results", help="the paper's directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    conv = plan_for("align-width-conv", "cpu", Path(args.results))
    runs = []
    for run in conv.runs:
        if run.axes["rule"] != "align-ada":
            continue
        runs.append(Run(run.kind, run.config, {**run.axes, "mixing": "real"}, run.out, run.group))
        out = Path(args.out) / "runs" / run.out.name
        cfg = run.config.replace(align_bn_mixing="twin", out=str(out))
        runs.append(Run(run.kind, cfg, {**run.axes, "mixing": "twin"}, out, f"{run.group} twin"))
    plan = Plan("align-bn-mixing", runs, [*conv.axes, "mixing"]).check()
    table = pivot_table(
        run_plan(plan, keep_going=True),
        "mixing",
        "channels",
        "final_test_acc",
        scale=100.0,
        digits=1,
        title="align-ada, final test accuracy (%) by batch-norm mixing point:",
    )
    write_table(table, Path(args.out) / "results")
    print(table.markdown())


if __name__ == "__main__":
    main()
