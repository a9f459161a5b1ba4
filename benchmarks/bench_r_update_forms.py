"""Time the two forms of the learned R update: n×n Gram matrix vs b×b covariance.

``decorrelate.nn.methods.learned_update`` never forms C when the subsample is small (n ≤ b): it
uses the n×n Gram matrix z zᵀ/n. With many samples — every patch position of a conv input
(``max_samples=None``) or a whole large batch (``sample_frac=1``, as the node perturbation
authors) — it forms C = zᵀz/n instead (:func:`~decorrelate.nn.methods.use_covariance`). This
times one ``copi`` update in both forms, interleaved, for the shapes that occur at the authors'
settings: the MLP's first layer (b = 784, n = 1000), and the conv net's second and third conv
layers without the cap (b = 288, n = 26·784; b = 576, n = 26·196).

    python benchmarks/bench_r_update_forms.py --repeats 3 \
        --out benchmarks/results/r_update_forms.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from decorrelate.nn import methods

SHAPES = [(784, 1000), (288, 26 * 784), (576, 26 * 196)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/r_update_forms.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = methods.DecorConfig.create("copi", lr=1e-3, var_floor=0.0)
    chosen = methods.use_covariance
    rows = []
    try:
        for b, n in SHAPES:
            gen = torch.Generator().manual_seed(0)
            x = torch.rand(1, n, b, generator=gen)
            eye = torch.eye(b).unsqueeze(0)
            times: dict[str, list[float]] = {"gram": [], "covariance": []}
            for _ in range(args.repeats):
                for form in times:
                    methods.use_covariance = lambda n, b, f=form: f == "covariance"
                    R, var = eye.clone(), torch.zeros(1, b)
                    t0 = time.perf_counter()
                    methods.learned_update(R, x, x.clone(), var, 0, cfg)
                    times[form].append(time.perf_counter() - t0)
            row = {
                "b": b,
                "n": n,
                "gram_ms": 1e3 * statistics.median(times["gram"]),
                "covariance_ms": 1e3 * statistics.median(times["covariance"]),
                "chosen": "covariance" if chosen(n, b) else "gram",
            }
            rows.append(row)
            print(row, flush=True)
    finally:
        methods.use_covariance = chosen
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
