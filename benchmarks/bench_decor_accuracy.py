"""Accuracy and speed-up of decorrelated training, each method at its own tuned learning rates.

Two phases, all runs through :func:`decorrelate.compare.run_plan` (``--jobs`` in parallel):

1. **grid** (one seed, ``--grid-dataset``, 10 % of the training set held out for validation):
   every method (``none`` = plain BP) × Adam lr ∈ ``--lrs`` × η ∈ the method's ``--etas``.
   Each method's configuration with the best validation accuracy (max over epochs) is selected;
   the test set is not looked at. Diverged runs count as failed.
2. **final** (``--seeds``, the full training set, every dataset in ``--datasets``): each rule in
   ``--rules`` × each method at its selected (lr, η). Test accuracy vs epoch and vs seconds,
   mean ± std over seeds, epochs and seconds to the reference's (the first rule without
   decorrelation) best test accuracy: ``results.md``/``results.json``/PNGs per dataset.

Run directories (checkpoints, large) go under ``--work-dir``; summaries go to ``--out``.
Finished runs are reused, so an interrupted benchmark continues, and a second invocation with
more rules (e.g. ``--rules bp,fa,dfa --selection OUT/grid.json``) reuses the BP runs.

    python benchmarks/bench_decor_accuracy.py --jobs 2 --out benchmarks/results/decor_accuracy_mlp
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch
from decorrelate.compare import _dir_name, run_label, run_plan

from bench_groups import run_spec
from decorrelate import make_config
from decorrelate.config import TrainConfig

#: η values tried per method (see decorrelate.nn.methods.DEFAULT_LR for the defaults' reasons).
DEFAULT_ETAS = {
    "none": [None],
    "scaled": [1e-5, 1e-4, 3e-4],
    "dbp": [1e-4, 1e-3],
    "copi": [1e-4, 1e-3],
    "zca": [1e-3, 1e-2],
    "newton": [1e-2],
}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _label(rule: str, method: str, lr: float, eta: float | None) -> str:
    combo = {"lr": f"{lr:g}"}
    if eta is not None:
        combo["decor-lr"] = f"{eta:g}"
    return run_label(rule, method, combo)


def grid_plan(
    base: TrainConfig, methods: list[str], lrs: list[float], etas: dict[str, list], work: Path
) -> list[tuple[str, TrainConfig, dict[str, Any]]]:
    plan = []
    for method in methods:
        for lr in lrs:
            for eta in etas[method]:
                label = _label("bp", method, lr, eta)
                cfg = base.replace(
                    decor=method,
                    lr=lr,
                    decor_lr=eta,
                    val_split=0.1,
                    seed=0,
                    out=str(work / "grid" / _dir_name(label, 0)),
                )
                plan.append((label, cfg, {"method": method, "lr": lr, "decor_lr": eta}))
    return plan


def select(plan: list, histories: list) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Best validation accuracy per method; every grid row for the table."""
    rows, best = [], {}
    for (label, _, spec), history in zip(plan, histories, strict=True):
        row = {"label": label, **spec}
        if history is None:
            row.update(val_acc=None, test_acc=None, diverged=True)
        else:
            top = max(history[1:], key=lambda r: r["val_acc"])
            row.update(val_acc=top["val_acc"], epoch=top["epoch"], diverged=False)
        rows.append(row)
        if row["val_acc"] is not None and (
            spec["method"] not in best or row["val_acc"] > best[spec["method"]]["val_acc"]
        ):
            best[spec["method"]] = row
    return best, rows


def grid_table(rows: list[dict[str, Any]], best: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| method | Adam lr | η | best val acc (%) | at epoch | selected |",
        "|---|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        eta = "—" if r["decor_lr"] is None else f"{r['decor_lr']:g}"
        acc = "diverged" if r["diverged"] else f"{r['val_acc'] * 100:.2f}"
        epoch = "" if r["diverged"] else str(r["epoch"])
        mark = "✓" if best.get(r["method"]) is r else ""
        lines.append(f"| {r['method']} | {r['lr']:g} | {eta} | {acc} | {epoch} | {mark} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--widths", default="1000,1000,1000,1000")
    parser.add_argument("--methods", default="none,scaled,dbp,copi,zca")
    parser.add_argument("--rules", default="bp", help="rules of the final phase")
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    parser.add_argument(
        "--etas",
        action="append",
        default=[],
        metavar="METHOD=V1,V2",
        help="override a method's η grid",
    )
    parser.add_argument("--grid-dataset", default="mnist")
    parser.add_argument("--grid-epochs", type=int, default=3)
    parser.add_argument("--datasets", default="mnist,fashion-mnist")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--selection",
        default=None,
        help="grid.json of an earlier run: skip the grid, use its selection",
    )
    parser.add_argument("--work-dir", default="runs/bench_decor_accuracy")
    parser.add_argument("--out", default="benchmarks/results/decor_accuracy_mlp")
    args = parser.parse_args()

    out, work = Path(args.out), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    etas = dict(DEFAULT_ETAS)
    for item in args.etas:
        key, _, values = item.partition("=")
        etas[key] = _floats(values)
    common = dict(
        model=args.model,
        batch_size=args.batch_size,
        optimizer="adam",
        train_size=args.train_size,
        activation="leaky-relu",
    )
    if args.widths:
        common["widths"] = [int(w) for w in args.widths.split(",")]

    if args.selection:
        selection = json.loads(Path(args.selection).read_text())["selected"]
    else:
        base = make_config(common, {"dataset": args.grid_dataset, "epochs": args.grid_epochs})
        plan = grid_plan(base, methods, _floats(args.lrs), etas, work)
        histories = run_plan(
            [(label, cfg) for label, cfg, _ in plan], jobs=args.jobs, keep_going=True
        )
        best, rows = select(plan, histories)
        selection = {m: {"lr": r["lr"], "decor_lr": r["decor_lr"]} for m, r in best.items()}
        (out / "grid.json").write_text(
            json.dumps(
                {
                    "dataset": args.grid_dataset,
                    "epochs": args.grid_epochs,
                    "config": common,
                    "rows": rows,
                    "selected": selection,
                    "machine": {
                        "torch": torch.__version__,
                        "python": platform.python_version(),
                        "jobs": args.jobs,
                    },
                },
                indent=1,
            )
            + "\n"
        )
        (out / "grid.md").write_text(grid_table(rows, best) + "\n")
        print(grid_table(rows, best))

    groups = {}
    for rule in args.rules.split(","):
        for method in methods:
            if method not in selection:
                print(f"{method}: every grid run diverged; left out of the final phase")
                continue
            chosen = selection[method]
            label = _label(rule, method, chosen["lr"], chosen["decor_lr"])
            groups[label] = {"rule": rule, "decor": method, **chosen}
    spec = {
        "base": {**common, "epochs": args.epochs},
        "datasets": args.datasets.split(","),
        "seeds": [int(s) for s in args.seeds.split(",")],
        "groups": groups,
    }
    run_spec(spec, work, out, jobs=args.jobs)


if __name__ == "__main__":
    main()
