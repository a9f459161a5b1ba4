"""Cost of ``decorrelate.layers.unroll``: forward + backward time of the unrolled module ÷ the
torch module it replaces (same Parameters, same batch), on CPU.

The two run interleaved in one process (torch, unrolled, torch, ...) so machine noise hits both
alike; we report the median time of each over repeats and the median per-repeat ratio.

    python benchmarks/bench_unroll.py [--repeats 15] [--threads 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from decorrelate.layers import unroll


def cases() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple]]]:
    """name -> (module builder, input builder): a small LSTM / GRU language model's recurrent
    layer and a transformer encoder layer."""
    return {
        "LSTM 2x128, T=35, B=32": (
            lambda: nn.LSTM(64, 128, num_layers=2, batch_first=True),
            lambda: (torch.randn(32, 35, 64),),
        ),
        "GRU 1x128, T=35, B=32": (
            lambda: nn.GRU(64, 128, batch_first=True),
            lambda: (torch.randn(32, 35, 64),),
        ),
        "TransformerEncoderLayer E=128 H=4, T=64, B=32": (
            lambda: nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True),
            lambda: (torch.randn(32, 64, 128),),
        ),
    }


def _loss(out) -> torch.Tensor:
    return (out[0] if isinstance(out, tuple) else out).square().mean()


def time_step(module: nn.Module, inputs: tuple) -> float:
    t = time.perf_counter()
    module.zero_grad(set_to_none=True)
    _loss(module(*inputs)).backward()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {}
    for name, (make, data) in cases().items():
        original = make()
        unrolled = unroll(copy.deepcopy(original))
        inputs = data()
        for _ in range(2):  # warm-up
            time_step(original, inputs), time_step(unrolled, inputs)
        t_orig, t_new = [], []
        for _ in range(args.repeats):
            t_orig.append(time_step(original, inputs))
            t_new.append(time_step(unrolled, inputs))
        ratio = statistics.median(b / a for a, b in zip(t_orig, t_new, strict=True))
        results[name] = {
            "torch_ms": 1e3 * statistics.median(t_orig),
            "unrolled_ms": 1e3 * statistics.median(t_new),
            "ratio": ratio,
        }
        print(
            f"{name:48s} torch {results[name]['torch_ms']:7.2f} ms  "
            f"unrolled {results[name]['unrolled_ms']:7.2f} ms  ratio {ratio:5.2f}"
        )
    meta = {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine()}
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
