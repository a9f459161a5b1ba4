"""Run the Align paper's experiments (width, conv width, low data, RNN) at the cpu scale.

A thin wrapper over ``decorrelate reproduce boopathy2022`` (:mod:`decorrelate.experiments.
papers.boopathy2022`): each experiment's tables (markdown + CSV), PNG plots and ``runs/*/`` go
into ``benchmarks/results/<experiment>/``, the claims table into ``benchmarks/results/``.
Finished runs are reused, so an interrupted invocation continues. One thread per run.

    python benchmarks/bench_align_suites.py                 # all four; or name some of them
"""

from __future__ import annotations

import argparse
import time

import torch

from decorrelate.experiments.papers import reproduce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", default=None, help="experiment names (default: all)")
    parser.add_argument("--out", default="benchmarks/results", help="parent directory")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scale = "quick" if args.quick else "cpu"
    for name in args.suites or [None]:
        start = time.perf_counter()
        _, files = reproduce("boopathy2022", args.out, scale=scale, only=name, log=print)
        print(f"{name or 'boopathy2022'}: {time.perf_counter() - start:.0f} s")
        for path in files:
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
