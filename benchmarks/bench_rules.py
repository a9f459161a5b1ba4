"""Time per training step of every (rule, decorrelation) pair, relative to plain BP, side by side.

All configurations are built in one process on the same data and timed round-robin (config 1,
config 2, ..., config 1, ...) so that machine noise hits them alike; each timed block is a few
steps of the real training loop (``Trainer.train_epoch``: batch indexing, the rule's backward,
the optimizer step and the decorrelators' update). We report the median ms/step over repeats
and the median of the per-repeat ratios to the first configuration (the reference, normally
``bp`` without decorrelation).

    python benchmarks/bench_rules.py --model mlp --widths 1000,1000,1000,1000 \
        --rules bp,fa,dfa --decors none,scaled --out benchmarks/results/rules_mlp.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from decorrelate import Trainer, make_config
from decorrelate.data import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--widths", default=None, help="comma-separated hidden widths")
    parser.add_argument("--channels", default=None, help="comma-separated conv channels")
    parser.add_argument("--rules", default="bp")
    parser.add_argument("--decors", default="none")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed block")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config option for every configuration (repeatable)",
    )
    parser.add_argument("--out", default="benchmarks/results/rules.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_dataset(args.dataset)
    base = {
        "dataset": args.dataset,
        "model": args.model,
        "batch_size": args.batch_size,
        "widths": args.widths,
        "channels": args.channels,
    }
    base.update(dict(item.split("=", 1) for item in args.set))
    configs = list(itertools.product(args.rules.split(","), args.decors.split(",")))
    trainers = {}
    for rule, decor in configs:
        cfg = make_config(
            {k: v for k, v in base.items() if v is not None}, {"rule": rule, "decor": decor}
        )
        trainers[(rule, decor)] = Trainer(cfg, data=data, log=None, progress=False)
    times: dict[tuple[str, str], list[float]] = {c: [] for c in configs}
    for r in range(args.repeats + 1):  # repeat 0 warms up and is discarded
        for c in configs:
            t = time.perf_counter()
            trainers[c].train_epoch(1 + r, max_steps=args.steps)
            if r:
                times[c].append((time.perf_counter() - t) / args.steps)
    ref = configs[0]
    rows = []
    for c in configs:
        ratios = [a / b for a, b in zip(times[c], times[ref], strict=True)]
        rows.append(
            {
                "rule": c[0],
                "decor": c[1],
                "ms_per_step": statistics.median(times[c]) * 1e3,
                "ratio_to_reference": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
        )
    cfg0 = trainers[ref].config
    result = {
        "benchmark": "rule_step_time",
        "dataset": args.dataset,
        "model": args.model,
        "widths": cfg0.widths,
        "channels": cfg0.channels,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "reference": {"rule": ref[0], "decor": ref[1]},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| rule | decor | ms/step | ÷ {ref[0]}/{ref[1]} (median [min, max]) |")
    print("|---|---|---:|---:|")
    for row in rows:
        print(
            f"| {row['rule']} | {row['decor']} | {row['ms_per_step']:.1f} | "
            f"{row['ratio_to_reference']:.3f} [{row['ratio_min']:.2f}, {row['ratio_max']:.2f}] |"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
