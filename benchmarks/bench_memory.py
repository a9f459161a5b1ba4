"""Peak memory of one training step per (rule, decorrelation) pair, on CPU or CUDA.

On CUDA this is ``torch.cuda.max_memory_allocated`` around one step. On CPU there is no such
counter, so each configuration runs in a fresh child process with glibc told to serve every
allocation above 64 KiB by ``mmap`` and to unmap it on free (``MALLOC_MMAP_THRESHOLD_=65536``,
which also switches off glibc's adaptive threshold). Then the resident set follows the live
tensors, and the kernel's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
after one step, minus the resident set before it, is the step's peak *extra* memory: activations,
saved tensors, gradients, noise — everything but the weights, optimizer state and data that exist
before and after the step. Two warm-up steps first, so that optimizer state and lazily built
buffers exist already.

    python benchmarks/bench_memory.py --model mlp --widths 1024,1024,1024 --batch-size 1000 \
        --rules bp,np,inp,anp --decors none,copi --out benchmarks/results/memory_np.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(options: dict) -> dict:
    """Child process: build the trainer, warm up, then measure one step."""
    from decorrelate import Trainer, make_config

    device = options.pop("device")
    cfg = make_config(options, {"device": device, "threads": 1})
    trainer = Trainer(cfg, log=None, progress=False)
    trainer.train_epoch(1, max_steps=2)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        trainer.train_epoch(1, max_steps=1)
        torch.cuda.synchronize()
        return {"peak_extra_bytes": torch.cuda.max_memory_allocated() - before, "how": "cuda"}
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    trainer.train_epoch(1, max_steps=1)
    return {"peak_extra_bytes": _status("VmHWM") - before, "how": "cpu VmHWM"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--widths", default="1024,1024,1024")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--rules", default="bp,np,inp,anp")
    parser.add_argument("--decors", default="none,copi")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return

    base = {
        "dataset": args.dataset,
        "model": args.model,
        "batch_size": args.batch_size,
        "widths": [int(w) for w in args.widths.split(",")],
        "device": args.device,
    }
    base.update(dict(item.split("=", 1) for item in args.set))
    rows = []
    for rule, decor in itertools.product(args.rules.split(","), args.decors.split(",")):
        options = {**base, "rule": rule, "decor": decor}
        peaks = []
        for _ in range(args.repeats):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(options)],
                env={**os.environ, **MMAP_ENV},
                capture_output=True,
                text=True,
                check=True,
            )
            peaks.append(json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"])
        rows.append(
            {
                "rule": rule,
                "decor": decor,
                "peak_extra_mib": sorted(peaks)[len(peaks) // 2] / 2**20,
                "all_mib": [p / 2**20 for p in peaks],
            }
        )
    ref = rows[0]["peak_extra_mib"]
    print(f"| rule | decor | peak extra memory of one step (MiB) | ÷ {rows[0]['rule']} |")
    print("|---|---|---:|---:|")
    for row in rows:
        row["ratio_to_reference"] = row["peak_extra_mib"] / ref
        print(
            f"| {row['rule']} | {row['decor']} | {row['peak_extra_mib']:.1f} | "
            f"{row['ratio_to_reference']:.2f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "peak_step_memory",
                **{k: v for k, v in base.items()},
                "repeats": args.repeats,
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
