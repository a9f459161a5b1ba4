"""What the conv patch cap (``max_samples``) buys and costs: step time and R's convergence.

The paper's conv net (``decorrelate.models.ConvNet``: conv 32, conv 32, pool, conv 64, conv 64,
pool, fc 1000, 'same' padding) on MNIST, decorrelated with ``copi`` at η 1e-3 (the node
perturbation authors' rule and rate), in two copies with identical weights: R's update capped at
``max_samples`` = 256 random patch positions per conv layer (our default), or every position of
the sampled images (``max_samples=None``, the authors' choice: 26·784 = 20 384 patches at the
first two layers, 26·196 = 5 096 at the last two, for batch 256).

1. Time: full BP training steps (Adam, batch 256, R learned from ⌊0.1·B⌋ + 1 = 26 images),
   the two copies alternating in blocks so that load from other processes hits both alike;
   medians of the whole step and of the R update (``local_update``) alone.
2. Convergence: W frozen at its initial values, R updated once per step from 26 fresh training
   images, capped or not. Every ``--every`` updates a fixed probe (the first 64 test images)
   goes through each net, every patch of every conv layer's input is decorrelated by that
   layer's current R, and the mean |correlation| between distinct coordinates of z = R x is
   recorded (``local_stats``' ``offdiag``, on all the probe's patches).

    python benchmarks/bench_conv_cap.py --threads 1 --out benchmarks/results/conv_cap.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from decorrelate.data import load_dataset
from decorrelate.losses import Loss
from decorrelate.models import build_model
from decorrelate.nn import DecorConv2d, decorrelate, decorrelators, local_update
from decorrelate.nn.decorrelation import _mean_abs_offdiag
from decorrelate.seeding import make_generator


def probe_offdiag(model: nn.Module, probe: torch.Tensor) -> dict[str, float]:
    """Mean |corr| of z = R x over every patch of the probe, per decorrelated conv layer."""
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
        for name, m in decorrelators(model)
        if isinstance(m, DecorConv2d)
    ]
    model.eval()
    with torch.no_grad():
        model(probe)
        out = {}
        for name, m in decorrelators(model):
            if name not in inputs:
                continue
            conv = m.layer
            patches = F.unfold(
                inputs[name], conv.kernel_size, conv.dilation, conv.padding, conv.stride
            )
            rows = patches.transpose(1, 2).reshape(-1, m.in_features)
            out[name] = _mean_abs_offdiag(m.transform(rows))
    model.train()
    for h in handles:
        h.remove()
    return out


def nets_for(base: nn.Module, caps: dict, args: argparse.Namespace, frac: float) -> dict:
    """One decorrelated copy of ``base`` per cap, identical weights."""
    return {
        label: decorrelate(
            copy.deepcopy(base),
            args.method,
            lr=args.decor_lr,
            max_samples=cap,
            sample_frac=frac,
            seed=args.seed,
        )
        for label, cap in caps.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-steps", type=int, default=24, help="timed training steps per net")
    parser.add_argument("--steps", type=int, default=300, help="R updates in the convergence run")
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--block", type=int, default=2, help="steps of one net before the other")
    parser.add_argument("--method", default="copi")
    parser.add_argument("--decor-lr", type=float, default=1e-3)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/conv_cap.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    splits = load_dataset("mnist")
    train, probe = splits.train, splits.test.x[:64]
    torch.manual_seed(args.seed)
    base = build_model("convnet", train.input_shape, train.num_classes)
    caps = {"cap 256": 256, "no cap": None}
    labels = list(caps)
    order = torch.randperm(len(train), generator=make_generator(args.seed, "order"))

    def batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = order[(step * size) % (len(train) - size) :][:size]
        return train.x[idx], train.y[idx]

    # 1. time: full BP training steps (batch 256, R from ⌊0.1·B⌋ + 1 images), interleaved
    nets = nets_for(base, caps, args, 0.1)
    opts = {k: torch.optim.Adam(n.parameters(), lr=args.lr) for k, n in nets.items()}
    loss_fn = Loss()
    times: dict[str, list[float]] = {k: [] for k in caps}
    update_times: dict[str, list[float]] = {k: [] for k in caps}
    warm = 2
    total = args.time_steps + warm
    for start in range(0, total, args.block):
        for label in labels if (start // args.block) % 2 == 0 else labels[::-1]:
            net, opt = nets[label], opts[label]
            for step in range(start, min(start + args.block, total)):
                x, y = batch(step, args.batch_size)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss_fn(net(x), y).backward()
                opt.step()
                t1 = time.perf_counter()
                local_update(net)
                t2 = time.perf_counter()
                if step >= warm:
                    times[label].append(t2 - t0)
                    update_times[label].append(t2 - t1)
    summary = {
        label: {
            "step_ms_median": 1e3 * statistics.median(times[label]),
            "update_ms_median": 1e3 * statistics.median(update_times[label]),
            "steps_timed": len(times[label]),
        }
        for label in caps
    }

    # 2. R's convergence: W frozen at init, R updated every step from the ⌊0.1·B⌋ + 1 images a
    # training step would sample (here the whole forward batch), capped or not
    sampled = int(0.1 * args.batch_size) + 1
    nets = nets_for(base, caps, args, 1.0)
    curves: dict[str, list[dict]] = {}
    for label, net in nets.items():
        curves[label] = [{"step": 0, **probe_offdiag(net, probe)}]
        for m in (m for _, m in decorrelators(net)):
            m.capture = True
        for step in range(args.steps):
            x, _ = batch(step, sampled)
            with torch.no_grad():
                net(x)
            local_update(net)
            if (step + 1) % args.every == 0:
                curves[label].append({"step": step + 1, **probe_offdiag(net, probe)})
    ratio = summary["no cap"]["step_ms_median"] / summary["cap 256"]["step_ms_median"]
    result = {
        "args": vars(args),
        "machine": f"{platform.machine()}, torch {torch.__version__}, threads {args.threads}",
        "summary": summary,
        "step_time_ratio_nocap_over_cap": ratio,
        "update_time_ratio_nocap_over_cap": summary["no cap"]["update_ms_median"]
        / summary["cap 256"]["update_ms_median"],
        "offdiag_curves": curves,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"step time no cap / cap 256: {ratio:.3f}")
    for label in caps:
        print(label)
        for row in curves[label]:
            print("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})


if __name__ == "__main__":
    main()
