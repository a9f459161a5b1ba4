"""align-ada on the ``align-width-conv`` sweep with both batch-norm mixing points, side by side.

``real`` (the default, the authors' code) reuses the suite's own align-ada runs in
``benchmarks/results/align-width-conv/runs/`` (run them first with ``bench_align_suites.py``);
``twin`` (``--align-bn-mixing twin``) runs the same configurations into
``benchmarks/results/align_bn_mixing/runs/``. Same data, seeds and sizes as the suite.

    python benchmarks/bench_align_bn_mixing.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from decorrelate.align.suites import (
    _seeds_for,
    _test_subset,
    _width_config,
    load_suite,
    make_config,
    sweep_table,
    train_classifier,
)
from decorrelate.train import load_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/align_bn_mixing")
    parser.add_argument("--suite-out", default="benchmarks/results/align-width-conv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = load_suite("align-width-conv")
    data = _test_subset(load_data(make_config(spec["base"], {"rule": "bp"})), spec["test_size"])
    grouped: dict[str, dict[int, list[float]]] = {}
    for mixing, out in (("real", Path(args.suite_out)), ("twin", Path(args.out))):
        for width in spec["widths"]:
            for seed in _seeds_for(spec, width):
                _, cfg = _width_config(spec, "align-ada", width, seed, out, data.num_classes)
                cfg = dataclasses.replace(cfg, align_bn_mixing=mixing)
                print(mixing, cfg.out, flush=True)
                history = train_classifier(cfg, data)
                acc = history[-1]["test_acc"] if history else float("nan")
                grouped.setdefault(f"align-ada ({mixing})", {}).setdefault(width, []).append(acc)
    table = sweep_table(grouped, "channels")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.md").write_text(table + "\n")
    (Path(args.out) / "results.json").write_text(json.dumps(grouped, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
