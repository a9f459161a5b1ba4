"""Time a training step with decorrelation against plain backprop, side by side.

Per model, two copies with identical weights are trained on the same random MNIST-shaped batch
(Adam, cross-entropy): plain BP, and BP with ``decorrelate(model, method)`` plus
``local_update`` after every optimizer step. Their steps are interleaved (a few steps of one,
then of the other, repeated) so that load from other processes hits both alike, and the ratio of
the medians is reported. Models follow the paper (Ahmad 2024): an MLP 784-1000-1000-1000-1000-10
and a conv net (conv 32, conv 32, pool, conv 64, conv 64, pool, fc 1000, classifier), LeakyReLU
0.01, batch 256. The conv net is timed with 3×3 'valid' convolutions (fc input 64·4·4 = 1024) and
with 'same' ones (fc input 64·7·7 = 3136, as in ``decorrelate.models.ConvNet``).

    python benchmarks/bench_decor_overhead.py [--method scaled] [--repeats 15] [--threads N] \
        [--variants exact,every=2,block_size=1024]

``--variants`` times the speed options of :class:`decorrelate.nn.DecorConfig` against the exact
default in the same interleaved rounds: each variant is ``exact`` or ``OPTION=VALUE[+...]``
(``every=2``, ``block_size=1024``, ``block_size=512+every=2``) passed to ``decorrelate()``, or
``exclude=fc`` to leave the first fully connected layer out. Writes
``benchmarks/results/decor_overhead.json``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from decorrelate.nn import decorrelate, local_update


def mlp() -> nn.Module:
    widths = [784, 1000, 1000, 1000, 1000]
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.LeakyReLU(0.01)]
    return nn.Sequential(*layers, nn.Linear(1000, 10))


def convnet(padding: int) -> nn.Module:
    side = 28
    layers: list[nn.Module] = []
    channels = [(1, 32), (32, 32), (32, 64), (64, 64)]
    for i, (c_in, c_out) in enumerate(channels):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=padding), nn.LeakyReLU(0.01)]
        side -= 2 - 2 * padding
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
            side //= 2
    fan_in = 64 * side * side
    layers += [nn.Flatten(), nn.Linear(fan_in, 1000), nn.LeakyReLU(0.01), nn.Linear(1000, 10)]
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": mlp,
    "convnet-valid": lambda: convnet(0),
    "convnet-same": lambda: convnet(1),
}


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, decor: bool) -> Callable:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if decor:
            local_update(model)

    return step


def time_steps(step: Callable, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        out.append(time.perf_counter() - start)
    return out


def variant_options(variant: str, model: nn.Module) -> dict:
    """``decorrelate()`` keyword arguments of a variant name (see the module docstring)."""
    if variant == "exact":
        return {}
    options: dict = {}
    for item in variant.split("+"):
        key, _, value = item.partition("=")
        if key == "exclude" and value == "fc":
            first_fc = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
            options["exclude"] = [first_fc]
        else:
            options[key] = int(value)
    return options


def bench(
    name: str, method: str, batch: int, repeats: int, per_round: int, variants: list[str]
) -> list[dict]:
    torch.manual_seed(0)
    base = MODELS[name]()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    steps = {"bp": make_step(base, x, y, False)}
    for variant in variants:
        model = copy.deepcopy(base)
        model = decorrelate(model, method, **variant_options(variant, model))
        steps[variant] = make_step(model, x, y, True)
    for step in steps.values():  # warm-up (allocations, oneDNN primitive caches)
        time_steps(step, 2)
    times: dict[str, list[float]] = {key: [] for key in steps}
    keys = list(steps)
    for r in range(repeats):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]  # rotate who goes first
        for key in order:
            times[key] += time_steps(steps[key], per_round)
    bp = statistics.median(times["bp"])
    rows = []
    for variant in variants:
        dec = statistics.median(times[variant])
        rows.append(
            {
                "model": name,
                "method": method,
                "variant": variant,
                "batch": batch,
                "steps_each": len(times["bp"]),
                "bp_ms": round(1e3 * bp, 2),
                "decor_ms": round(1e3 * dec, 2),
                "ratio": round(dec / bp, 3),
                "bp_ms_quartiles": [
                    round(1e3 * q, 2) for q in statistics.quantiles(times["bp"], n=4)
                ],
                "decor_ms_quartiles": [
                    round(1e3 * q, 2) for q in statistics.quantiles(times[variant], n=4)
                ],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="scaled")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--per-round", type=int, default=2, help="steps per model per round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", default="exact", help="comma-separated, see above")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "decor_overhead.json")
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    variants = args.variants.split(",")
    for name in args.models.split(","):
        for row in bench(name, args.method, args.batch, args.repeats, args.per_round, variants):
            print(
                f"{name:14s} {args.method} {row['variant']:22s}: BP {row['bp_ms']:8.1f} ms  "
                f"decorrelated {row['decor_ms']:8.1f} ms  ratio {row['ratio']:.2f}",
                flush=True,
            )
            results.append(row)
    report = {
        "benchmark": "decorrelated BP step time / BP step time",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average": list(os.getloadavg()),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
