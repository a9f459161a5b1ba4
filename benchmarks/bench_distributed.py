"""Throughput and time-to-accuracy of 1 vs N processes (torchrun, gloo), and bytes all-reduced.

For each rule the same run (MNIST, the paper's MLP 784-1000×4-10 unless ``--widths``, Adam,
global batch ``--batch-size``) is trained once in one process with ``--threads-single`` threads
and once under ``torchrun --nproc-per-node N`` with one thread per process, so both use the
same cores. Reported per run: training seconds (evaluation excluded), samples/s, final test
accuracy (identical up to float rounding: the multi-process run computes the same updates), and
the communication per training step and rank, counted, not estimated: every collective the
library issues from Python is wrapped to add up its bytes, and DDP's own gradient all-reduce
(which runs inside its C++ reducer) is counted as the bytes of the gradients it reduces.

    python benchmarks/bench_distributed.py --nproc 2 --epochs 1 --train-size 20000

Writes ``benchmarks/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RULES = {
    "bp": {"rule": "bp"},
    "bp+scaled": {"rule": "bp", "decor": "scaled", "decor_lr": 1e-5, "lr": 1e-4},
    "fa": {"rule": "fa"},
    "anp": {"rule": "anp", "lr": 1e-4},
    "anp+copi": {"rule": "anp", "decor": "copi", "decor_lr": 1e-3, "lr": 1e-4},
}


def worker(config_path: str, report_path: str) -> None:
    """Inside one process of a run: count collective bytes, train, write a report (rank 0)."""
    import torch
    import torch.distributed as tdist

    from decorrelate import distributed, make_config
    from decorrelate.train import Trainer, _resolved, evaluate

    counted = {"bytes": 0}
    for name in ("all_reduce", "all_gather", "broadcast"):
        original = getattr(tdist, name)

        def counting(tensor_or_list, *args, _original=original, **kwargs):
            items = tensor_or_list if isinstance(tensor_or_list, list) else [tensor_or_list]
            counted["bytes"] += sum(t.numel() * t.element_size() for t in items)
            if args and isinstance(args[0], torch.Tensor):  # all_gather(list, tensor)
                counted["bytes"] += args[0].numel() * args[0].element_size()
            return _original(tensor_or_list, *args, **kwargs)

        setattr(tdist, name, counting)
    cfg = make_config(json.loads(Path(config_path).read_text()))
    distributed.setup(cfg.device, cfg.dist_timeout, cfg.dist_backend)
    trainer = Trainer(cfg, log=None, progress=False)
    trainer.config = _resolved(cfg, trainer)
    before = counted["bytes"]
    trainer.epoch = 0
    steps, seconds = 0, 0.0
    for epoch in range(1, cfg.epochs + 1):
        stats = trainer.train_epoch(epoch)
        steps += stats["steps"]
        seconds += stats["epoch_seconds"]
    python_bytes = counted["bytes"] - before
    ddp_bytes = 0
    if trainer.world > 1 and trainer.rule.ddp_autograd:
        ddp_bytes = steps * sum(p.numel() * p.element_size() for p in trainer.params)
    _, test_acc = evaluate(trainer.model, trainer.test_data, trainer.loss, cfg.eval_batch_size)
    if distributed.is_main():
        Path(report_path).write_text(
            json.dumps(
                {
                    "world": trainer.world,
                    "steps": steps,
                    "train_seconds": seconds,
                    "samples_per_s": steps * cfg.batch_size / seconds,
                    "test_acc": test_acc,
                    "bytes_per_step": (python_bytes + ddp_bytes) / max(1, steps),
                    "ddp_grad_bytes_per_step": ddp_bytes / max(1, steps),
                }
            )
        )
    distributed.teardown()


def run(options: dict, nproc: int, threads_single: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg, report = Path(tmp) / "config.json", Path(tmp) / "report.json"
        threads = threads_single if nproc == 1 else 1
        cfg.write_text(json.dumps({**options, "threads": threads, "out": str(Path(tmp) / "run")}))
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        me = [str(Path(__file__).resolve()), "--worker", str(cfg), str(report)]
        if nproc == 1:
            command = [sys.executable, *me]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            command += [f"--nproc-per-node={nproc}", *me]
        subprocess.run(command, env=env, check=True, capture_output=True)
        return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "REPORT"), help=argparse.SUPPRESS)
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads-single", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--widths", default="1000,1000,1000,1000")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "distributed.json")
    )
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    base = {
        "dataset": "mnist",
        "model": "mlp",
        "widths": [int(w) for w in args.widths.split(",")],
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "train_size": args.train_size,
        "lr": 3e-4,
    }
    rows = []
    for name in args.rules.split(","):
        options = {**base, **RULES[name]}
        one = run(options, 1, args.threads_single)
        many = run(options, args.nproc, args.threads_single)
        row = {
            "rule": name,
            "single": one,
            "multi": many,
            "speedup": one["train_seconds"] / many["train_seconds"],
        }
        rows.append(row)
        print(
            f"{name:10s} 1 proc {one['samples_per_s']:7.0f} samples/s  {args.nproc} procs "
            f"{many['samples_per_s']:7.0f} samples/s  ({row['speedup']:.2f}x)  test acc "
            f"{one['test_acc']:.4f} / {many['test_acc']:.4f}  "
            f"{many['bytes_per_step'] / 2**20:.2f} MiB per step and rank",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "1 vs N processes",
                "nproc": args.nproc,
                "threads_single": args.threads_single,
                "cpu_count": os.cpu_count(),
                "config": base,
                "results": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
