"""Run the Align suites (width, conv width, low data, RNN) and keep their tables and plots.

Each suite writes ``results.md``, ``results.json``, PNG plots and ``runs/*/`` (config and
metrics of every run, no checkpoints) into ``benchmarks/results/<suite>/``. Finished runs are
reused, so an interrupted invocation continues. The sizes are the CPU-feasible ones of the suite
files in ``src/decorrelate/experiments/`` (see BENCHMARKS.md); one thread per run.

    python benchmarks/bench_align_suites.py align-width align-width-conv align-lowdata align-rnn
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from decorrelate.align import run_suite, suite_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", default=None, help="suite names (default: all)")
    parser.add_argument("--out", default="benchmarks/results", help="parent directory")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.suites or suite_names():
        start = time.perf_counter()
        files = run_suite(name, Path(args.out) / name, quick=args.quick, log=print)
        print(f"{name}: {time.perf_counter() - start:.0f} s")
        for path in files:
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
