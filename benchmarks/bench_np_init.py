"""Why the initialisation decides node perturbation's speed at the authors' protocol.

At the authors' setting (``--config np-authors``: MNIST pixels/255, MLP 784-1024×3-10,
leaky-relu 0.2, σ 1e-3), one batch of 1000 training images, for the He-normal initialisation
of the authors' code and for PyTorch's default: the standard deviation of every layer's
pre-activation, the norm of every layer's BP weight gradient, and the cosine between ANP's
weight update and the BP gradient per layer — the mean over ``--draws`` single-noise estimates,
and the cosine of their average.

    python benchmarks/bench_np_init.py --out benchmarks/results/np_init.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from decorrelate import Loss, get_rule, make_config
from decorrelate.config import load_config_file
from decorrelate.train import build_network, load_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/np_init.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_config_file("np-authors")
    splits = load_data(make_config(base))
    x, y = splits.train.x[:1000], splits.train.y[:1000]
    loss = Loss()
    result = {}
    for init in ("he-normal", "torch"):
        cfg = make_config(base, {"rule": "anp", "weight_init": init})
        model = build_network(cfg, splits.train.input_shape, splits.train.num_classes)
        model.zero_grad()
        loss(model(x), y).backward()
        weights = [p for p in model.parameters() if p.dim() == 2]
        bp = [p.grad.clone() for p in weights]
        stds, h = [], x
        with torch.no_grad():
            for module in model:
                h = module(h)
                if isinstance(module, torch.nn.Linear):
                    stds.append(float(h.std()))
        rule = get_rule("anp", sigma=cfg.np_sigma)
        rule.attach(model, loss, torch.Generator().manual_seed(0))
        single = [0.0] * len(bp)
        total = [torch.zeros_like(b) for b in bp]
        for _ in range(args.draws):
            model.zero_grad()
            rule.backward(model, x, y)
            for i, (p, b) in enumerate(zip(weights, bp, strict=True)):
                single[i] += float(F.cosine_similarity(p.grad.flatten(), b.flatten(), dim=0))
                total[i] += p.grad
        result[init] = {
            "preactivation_std": stds,
            "bp_grad_norm": [float(b.norm()) for b in bp],
            "cos_single_anp_bp": [c / args.draws for c in single],
            "cos_mean_anp_bp": [
                float(F.cosine_similarity(t.flatten(), b.flatten(), dim=0))
                for t, b in zip(total, bp, strict=True)
            ],
        }
        print(init, json.dumps(result[init]))
    Path(args.out).write_text(json.dumps({"args": vars(args), "result": result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
