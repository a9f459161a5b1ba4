"""Time per training step of the Align rules and their baselines, relative to BP.

The twin rules (align-zero, align-ada) run the real network forward without a graph and the
frozen twin forward and backward, so they should cost about BP plus one forward pass; the issue's
target is ≤ 2.0× BP. Configurations are timed round-robin (rule 1, rule 2, ..., rule 1, ...) so
that machine noise hits them alike. Each timed block is a few steps of the real training loop
(``Trainer.train_epoch``: batch indexing, the rule, the optimizer step) for the classifiers, and
of ``rule.backward`` + ``optimizer.step`` for the RNN. We report the median ms/step over repeats
and the median of the per-repeat ratios to ``bp``.

    python benchmarks/bench_align_step.py --threads 1 --out benchmarks/results/align_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import decorrelate.rules.align  # noqa: F401  (registers the align rules)
from decorrelate import Loss, Trainer, build_model, get_rule, make_config
from decorrelate.data import load_dataset
from decorrelate.data.addtask import make_add_task
from decorrelate.seeding import derive_seed

RULES = ["bp", "fa", "dfa", "last-layer", "align-prop", "align-zero", "align-ada"]
RNN_RULES = ["bp", "last-layer", "align-zero", "align-ada"]


def classifier_steps(
    model: str,
    dataset: str,
    extra: dict,
    rules: list[str],
    steps: int,
    variants: dict[str, dict] | None = None,
):
    """One ``step()`` closure per rule: ``steps`` steps of ``Trainer.train_epoch``.

    ``variants`` adds labelled rule configurations (label → options, e.g. a rule option).
    """
    data = load_dataset(dataset, train_size=steps * 100 * 2)
    closures = {}
    runs = {rule: {"rule": rule} for rule in rules} | (variants or {})
    for label, chosen in runs.items():
        rule = chosen["rule"]
        options = {
            "dataset": dataset,
            "model": model,
            "activation": "relu",
            "loss": "mse-shifted",
            "optimizer": "sgd",
            "momentum": 0.0,
            "lr": 0.1,
            "batch_size": 100,
            **chosen,
            **extra,
        }
        if rule in ("fa", "dfa"):
            options.update(feedback_init="gaussian")
        trainer = Trainer(make_config(options), data=data, log=None, progress=False)
        epoch = iter(range(1, 10**6))
        closures[label] = lambda t=trainer, e=epoch: t.train_epoch(next(e), max_steps=steps)
    return closures


def rnn_steps(width: int, rules: list[str], steps: int):
    """One closure per rule: ``steps`` SGD steps of the Add task (batch 30, T = 100)."""
    (x, y), _ = make_add_task()
    x, y = x[:30], y[:30]
    closures = {}
    for rule in rules:
        torch.manual_seed(derive_seed(0, "model"))  # the Add task's RNN of seed 0
        model = build_model("rnn-ntk", tuple(x.shape[1:]), 1, widths=[width], activation="relu")
        learner = get_rule(rule)
        learner.attach(model, Loss("mse"))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def run(model=model, learner=learner, opt=opt) -> None:
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                learner.backward(model, x, y)
                opt.step()

        closures[rule] = run
    return closures


def time_round_robin(closures: dict[str, Callable[[], object]], repeats: int, steps: int) -> dict:
    times: dict[str, list[float]] = {name: [] for name in closures}
    for r in range(repeats + 1):  # repeat 0 warms up and is discarded
        for name, run in closures.items():
            start = time.perf_counter()
            run()
            if r:
                times[name].append((time.perf_counter() - start) / steps)
    ref = next(iter(closures))
    rows = []
    for name in closures:
        ratios = [a / b for a, b in zip(times[name], times[ref], strict=True)]
        rows.append(
            {
                "rule": name,
                "ms_per_step": 1000 * statistics.median(times[name]),
                "ratio_to_bp": statistics.median(ratios),
            }
        )
    return {"reference": ref, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed block")
    parser.add_argument("--mlp-width", type=int, default=1024)
    parser.add_argument("--conv-width", type=int, default=32)
    parser.add_argument("--rnn-width", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/align_step.json")
    parser.add_argument(
        "--setups", default="mlp,conv,rnn", help="comma-separated subset of mlp, conv, rnn"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    w, c = args.mlp_width, args.conv_width
    twin_bn = {"align-ada (twin BN)": {"rule": "align-ada", "align_bn_mixing": "twin"}}
    builders = {
        "mlp": lambda: (
            f"mlp-ntk {w}x{w} MNIST batch 100",
            classifier_steps("mlp-ntk", "mnist", {"widths": [w, w]}, RULES, args.steps),
        ),
        "conv": lambda: (
            f"convnet-ntk {c},{c} (BN) Fashion-MNIST batch 100",
            classifier_steps(
                "convnet-ntk",
                "fashion-mnist",
                {"channels": [c, c], "widths": []},
                RULES,
                args.steps,
                twin_bn,
            ),
        ),
        "rnn": lambda: (
            f"RNN {args.rnn_width} units, Add task T=100 batch 30",
            rnn_steps(args.rnn_width, RNN_RULES, args.steps),
        ),
    }
    chosen = [name.strip() for name in args.setups.split(",") if name.strip()]
    if any(name not in builders for name in chosen):
        parser.error(f"--setups takes a subset of {', '.join(builders)}")
    setups = dict(builders[name]() for name in chosen)
    results = {}
    for name, closures in setups.items():
        results[name] = time_round_robin(closures, args.repeats, args.steps)
        print(f"\n{name}")
        print("| rule | ms/step | × bp |\n|---|---:|---:|")
        for row in results[name]["rows"]:
            print(f"| {row['rule']} | {row['ms_per_step']:.1f} | {row['ratio_to_bp']:.2f} |")
    meta = {
        "threads": args.threads,
        "repeats": args.repeats,
        "steps": args.steps,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
