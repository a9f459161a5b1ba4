"""Time per training step of our loop vs a minimal hand-written PyTorch loop doing the same work.

BP on MNIST, MLP 784-1000-1000-1000-10 (LeakyReLU 0.01), Adam, batch 256. Both loops train their
own copy of the same initial model on the same batches. They run interleaved in one process
(ours, bare, ours, bare, ...) so machine noise hits both alike; we report medians over repeats and
the median of the per-repeat ratios. The same run measures this machine's float32 matmul peak,
so the achieved GFLOP/s of a training step can be put against it.

    python benchmarks/bench_step.py [--repeats 15] [--steps 20] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from decorrelate import Trainer, make_config
from decorrelate.data import load_dataset

WIDTHS = [1000, 1000, 1000]
BATCH = 256


def step_flops(dims: list[int], batch: int) -> float:
    """FLOPs of forward + backward of the Linear layers (multiply-add = 2 FLOPs).

    Forward 2·B·in·out per layer, weight gradient 2·B·in·out per layer, input gradient
    2·B·in·out for every layer but the first (the data needs no gradient).
    """
    layers = list(itertools.pairwise(dims))
    per_layer = [2.0 * batch * i * o for i, o in layers]
    return 2 * sum(per_layer) + sum(per_layer[1:])


def matmul_gflops(m: int, k: int, n: int, repeats: int = 20) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2.0 * m * k * n / statistics.median(times) / 1e9


def bare_loop(model, opt, x_all, y_all, order, steps: int) -> None:
    """The minimal loop: index a batch, forward, cross-entropy, backward, Adam step."""
    for i in range(steps):
        idx = order[i * BATCH : (i + 1) * BATCH]
        x, y = x_all[idx], y_all[idx]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed block")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/bench_step.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_dataset("mnist", data_dir=args.data_dir)
    cfg = make_config(
        {
            "dataset": "mnist",
            "widths": WIDTHS,
            "batch_size": BATCH,
            "optimizer": "adam",
            "lr": 1e-3,
            "data_dir": args.data_dir,
        }
    )
    ours = Trainer(cfg, data=data, log=None, progress=False)
    model = copy.deepcopy(ours.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all, y_all = data.train.x, data.train.y
    steps_per_epoch = ours.steps_per_epoch

    ours_times, bare_times = [], []
    for r in range(args.repeats + 1):  # the first repeat is a warm-up and is discarded
        epoch = 1 + (r * args.steps) // steps_per_epoch
        order = torch.randperm(len(y_all))
        t = time.perf_counter()
        ours.train_epoch(epoch, max_steps=args.steps)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        bare_loop(model, opt, x_all, y_all, order, args.steps)
        t_bare = time.perf_counter() - t
        if r:
            ours_times.append(t_ours / args.steps)
            bare_times.append(t_bare / args.steps)

    dims = [784, *WIDTHS, 10]
    flops = step_flops(dims, BATCH)
    peak_square = matmul_gflops(2048, 2048, 2048)
    peak_layer = matmul_gflops(BATCH, 1000, 1000)
    med_ours, med_bare = statistics.median(ours_times), statistics.median(bare_times)
    ratios = [o / b for o, b in zip(ours_times, bare_times, strict=True)]
    result = {
        "benchmark": "bp_step_mnist_mlp",
        "model": "MLP " + "-".join(map(str, dims)) + " leaky-relu",
        "batch_size": BATCH,
        "optimizer": "adam",
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "ours_ms_per_step": med_ours * 1e3,
        "bare_ms_per_step": med_bare * 1e3,
        "ratio_of_medians": med_ours / med_bare,
        "median_ratio": statistics.median(ratios),
        "ours_samples_per_s": BATCH / med_ours,
        "bare_samples_per_s": BATCH / med_bare,
        "gflop_per_step": flops / 1e9,
        "ours_gflops": flops / med_ours / 1e9,
        "bare_gflops": flops / med_bare / 1e9,
        "matmul_peak_gflops_2048": peak_square,
        "matmul_gflops_256x1000x1000": peak_layer,
        "fraction_of_peak": flops / med_ours / 1e9 / peak_square,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"ours {med_ours * 1e3:.2f} ms/step ({BATCH / med_ours:.0f} samples/s), "
        f"bare {med_bare * 1e3:.2f} ms/step; ratio {med_ours / med_bare:.3f} "
        f"(median of per-repeat ratios {statistics.median(ratios):.3f})"
    )
    print(
        f"{flops / 1e9:.2f} GFLOP/step -> {flops / med_ours / 1e9:.1f} GFLOP/s; matmul peak "
        f"{peak_square:.1f} GFLOP/s (2048^3), {peak_layer:.1f} GFLOP/s (256x1000x1000)"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
