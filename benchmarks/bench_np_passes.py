"""Node perturbation's step: separate clean and noisy forward passes (now) vs the former
implementation that stacked the clean and noisy copies of the batch along dim 0 in one call.

The former implementation is read from git (``--batched-from``, the commit before the change)
and loaded under other rule names, so both run in one process on copies of the same model and
the same batch, timed round-robin (former, now, former, ...) so machine noise hits them alike.
Only ``rule.backward`` is timed (the passes and the ⟨e aᵀ⟩ updates: what changed); we report
the median ms per step over repeats and the median of the per-repeat ratios now ÷ former.

    python benchmarks/bench_np_passes.py --threads 1 --out benchmarks/results/np_passes.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from decorrelate import Loss, get_rule, make_config
from decorrelate.train import build_network

ROOT = Path(__file__).resolve().parents[1]


def load_batched(commit: str) -> None:
    """Register the former rules as np-batched, inp-batched, anp-batched."""
    import decorrelate.rules as rules

    def source(path: str) -> str:
        return subprocess.run(
            ["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True,
            text=True,
        ).stdout  # fmt: skip

    for name, path, text in (
        ("_batched_layers", "src/decorrelate/rules/layers.py", None),
        ("_batched_np", "src/decorrelate/rules/perturbation.py", None),
    ):
        text = source(path).replace("from .layers import", "from ._batched_layers import")
        text = re.sub(r'register_rule\("(\w+)"\)', r'register_rule("\1-batched")', text)
        module_name = f"decorrelate.rules.{name}"
        spec = importlib.util.spec_from_loader(module_name, loader=None)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = "decorrelate.rules"
        sys.modules[module_name] = module
        exec(compile(text, f"{commit}:{path}", "exec"), module.__dict__)
        setattr(rules, name, module)


CASES = {
    # the authors' MLP (BENCHMARKS §3, NP at the authors' setting): 784-1024×3-10, batch 1000
    "mlp": ({"model": "mlp", "widths": [1024, 1024, 1024], "leaky_slope": 0.2}, (1, 28, 28), 1000),
    # the default conv net (two 3×3 convs per pool, then 1000 units), batch 256
    "convnet": ({"model": "convnet"}, (1, 28, 28), 256),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batched-from", default="4ede3cc", help="commit of the former code")
    parser.add_argument("--cases", default="mlp,convnet")
    parser.add_argument("--rules", default="np,anp,inp")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/np_passes.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_batched(args.batched_from)
    results = {}
    for case in args.cases.split(","):
        options, shape, batch = CASES[case]
        torch.manual_seed(0)
        model = build_network(make_config(options), shape, 10)
        gen = torch.Generator().manual_seed(1)
        x = torch.rand(batch, *shape, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        for rule_name in args.rules.split(","):
            pair = {}
            for label, name in (("former", f"{rule_name}-batched"), ("now", rule_name)):
                m = copy.deepcopy(model)
                rule = get_rule(name, sigma=1e-3, samples=1)
                rule.attach(m, Loss(), torch.Generator().manual_seed(2))
                rule.backward(m, x, y)  # warm-up
                pair[label] = (rule, m)
            times: dict[str, list[float]] = {"former": [], "now": []}
            for _ in range(args.repeats):
                for label, (rule, m) in pair.items():
                    t = time.perf_counter()
                    for _ in range(args.steps):
                        m.zero_grad(set_to_none=True)
                        rule.backward(m, x, y)
                    times[label].append((time.perf_counter() - t) / args.steps * 1e3)
            ratios = [n / f for n, f in zip(times["now"], times["former"], strict=True)]
            row = {
                "former_ms": statistics.median(times["former"]),
                "now_ms": statistics.median(times["now"]),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
            results[f"{case}/{rule_name}"] = row
            print(case, rule_name, {k: round(v, 3) for k, v in row.items()}, flush=True)
    meta = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        **vars(args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
