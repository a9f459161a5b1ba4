"""Run under torchrun by tests/test_distributed.py: train each case, then a resumed one.

python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py ROOT CASES DTYPE

DTYPE (``float64`` or ``float32``) is the default dtype the runs are built and trained in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from decorrelate import distributed, resume, train
from decorrelate.fixedpoint.config import FixedPointConfig
from decorrelate.fixedpoint.tasks import run_task


def main() -> None:
    root, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_default_dtype(getattr(torch, sys.argv[3] if len(sys.argv) > 3 else "float32"))
    torch.set_num_threads(1)
    for name, options in cases.items():
        if options.pop("fixedpoint", None):
            run_task(FixedPointConfig(**options), root / name)
        elif options.pop("resume_from_epoch", None):
            # one epoch, then continue to the configured number: resume under torchrun
            train({**options, "epochs": 1, "out": str(root / name)}, log=None, progress=False)
            resume(root / name, {"epochs": options["epochs"]}, log=None, progress=False)
        else:
            train({**options, "out": str(root / name)}, log=None, progress=False)
    distributed.teardown()


if __name__ == "__main__":
    main()
