"""Run a benchmark spec (named groups of runs over datasets and seeds) and write its report.

The spec format and the report are :mod:`decorrelate.experiments.specs`; this script only
parses the command line::

    python benchmarks/bench_groups.py benchmarks/specs/fa_mlp.json --jobs 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from decorrelate.experiments.specs import load_spec, run_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="JSON spec (see decorrelate.experiments.specs)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work-dir", default=None, help="default: runs/<spec name>")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/<spec name>")
    parser.add_argument("--datasets", default=None, help="comma-separated subset of the spec's")
    args = parser.parse_args()
    spec_path = Path(args.spec)
    run_spec(
        load_spec(spec_path),
        Path(args.work_dir or f"runs/{spec_path.stem}"),
        Path(args.out or f"benchmarks/results/{spec_path.stem}"),
        jobs=args.jobs,
        datasets=args.datasets.split(",") if args.datasets else None,
    )


if __name__ == "__main__":
    main()
