"""Accuracy and speed-up of decorrelated training, each method at its own tuned learning rates.

Two phases, each a plan of the experiment layer (:mod:`decorrelate.experiments`) run by its one
runner (``--jobs`` in parallel, finished runs reused, interrupted ones resumed):

1. **tuning** (one seed, ``--grid-dataset``, 10 % of the training set held out for validation):
   every method (``none`` = plain BP) × Adam lr ∈ ``--lrs`` × η ∈ the method's ``--etas``
   (:func:`tuning_plan`). Each method's configuration with the best validation accuracy (max over
   epochs) is selected by :func:`decorrelate.experiments.tuning.select_best`; the test set is not
   looked at. Diverged runs count as failed. Written: ``grid.json`` (every row and the
   selection) and ``grid.md``.
2. **final** (``--seeds``, the full training set, every dataset in ``--datasets``): each rule in
   ``--rules`` × each method at its selected (lr, η), a benchmark spec (:func:`final_spec`) run by
   :func:`decorrelate.experiments.specs.run_spec`. Test accuracy vs epoch and vs seconds,
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

from decorrelate.experiments import Plan, Result, grid, run_plan
from decorrelate.experiments.plan import axis_label
from decorrelate.experiments.specs import run_spec
from decorrelate.experiments.tuning import VAL_KEY, chosen, select_best

#: η values tried per method (see decorrelate.nn.methods.DEFAULT_LR for the defaults' reasons).
DEFAULT_ETAS: dict[str, list[float | None]] = {
    "none": [None],
    "scaled": [1e-5, 1e-4, 3e-4],
    "dbp": [1e-4, 1e-3],
    "copi": [1e-4, 1e-3],
    "zca": [1e-3, 1e-2],
    "newton": [1e-2],
}

#: The fraction of the training set held out for the tuning phase's validation accuracy.
VAL_SPLIT = 0.1


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def tuning_plan(
    base: dict[str, Any],
    methods: list[str],
    lrs: list[float],
    etas: dict[str, list[float | None]],
    work: Path,
) -> Plan:
    """One seed of BP + every method × Adam lr × its η values, a validation split held out.

    A method whose η list is ``[None]`` (plain BP) has no ``decor_lr`` axis. Runs go into
    ``WORK/grid/<label>-s0`` (e.g. ``bp+scaled lr=0.0001 decor-lr=1e-05``).
    """
    tuning_base = {**base, "val_split": VAL_SPLIT, "seed": 0}
    plan = Plan("tuning")
    for method in methods:
        if method not in etas:
            known = ", ".join(sorted(etas))
            raise SystemExit(f"no η values for method {method!r} (known: {known}); give --etas")
        axes: dict[str, list[Any]] = {"rule": ["bp"], "decor": [method], "lr": lrs}
        if etas[method] != [None]:
            axes["decor_lr"] = etas[method]
        plan = plan + grid("tuning", tuning_base, {**axes, "seed": [0]}, work / "grid")
    return plan.check()


def best_epoch(result: Result) -> int | None:
    """The first epoch at which the run's validation accuracy was its best (None if diverged)."""
    if not result.ok:
        return None
    rows = [r for r in result.history[1:] if "val_acc" in r]
    return max(rows, key=lambda r: r["val_acc"])["epoch"] if rows else None


def tuning_rows(results: list[Result]) -> list[dict[str, Any]]:
    """``grid.json``'s rows: every tuning run's setting and its best validation accuracy."""
    rows = []
    for r in results:
        row = {
            "label": r.run.group,
            "method": r.run.axes["decor"],
            "lr": r.run.axes["lr"],
            "decor_lr": r.run.axes.get("decor_lr"),
        }
        if r.ok:
            row.update(val_acc=r.summary[VAL_KEY], epoch=best_epoch(r), diverged=False)
        else:
            row.update(val_acc=None, test_acc=None, diverged=True)
        rows.append(row)
    return rows


def selection(results: list[Result]) -> dict[str, dict[str, Any]]:
    """Each method's (lr, η) with the best validation accuracy (methods whose every run
    diverged are absent)."""
    best = select_best(results, by=("decor",), key=VAL_KEY)
    return {point[0]: values for point, values in chosen(best, ("lr", "decor_lr")).items()}


def grid_table(rows: list[dict[str, Any]], selected: dict[str, dict[str, Any]]) -> str:
    """``grid.md``: every tuning run, the selected one per method marked."""
    lines = [
        "| method | Adam lr | η | best val acc (%) | at epoch | selected |",
        "|---|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        eta = "—" if r["decor_lr"] is None else f"{r['decor_lr']:g}"
        acc = "diverged" if r["diverged"] else f"{r['val_acc'] * 100:.2f}"
        epoch = "" if r["diverged"] else str(r["epoch"])
        pick = selected.get(r["method"])
        mark = "✓" if pick == {"lr": r["lr"], "decor_lr": r["decor_lr"]} else ""
        lines.append(f"| {r['method']} | {r['lr']:g} | {eta} | {acc} | {epoch} | {mark} |")
    return "\n".join(lines)


def final_spec(
    common: dict[str, Any],
    selected: dict[str, dict[str, Any]],
    *,
    rules: list[str],
    methods: list[str],
    datasets: list[str],
    seeds: list[int],
    epochs: int,
    log: Any = print,
) -> dict[str, Any]:
    """The final phase as a benchmark spec: every rule × method at its selected (lr, η)."""
    groups = {}
    for rule in rules:
        for method in methods:
            if method not in selected:
                log(f"{method}: every grid run diverged; left out of the final phase")
                continue
            values = selected[method]
            axes = {"rule": rule, "decor": method, "lr": values["lr"]}
            if values["decor_lr"] is not None:
                axes["decor_lr"] = values["decor_lr"]
            groups[axis_label(axes)] = {"rule": rule, "decor": method, **values}
    return {
        "base": {**common, "epochs": epochs},
        "datasets": datasets,
        "seeds": seeds,
        "groups": groups,
    }


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
        selected = json.loads(Path(args.selection).read_text())["selected"]
    else:
        base = {**common, "dataset": args.grid_dataset, "epochs": args.grid_epochs}
        plan = tuning_plan(base, methods, _floats(args.lrs), etas, work)
        results = run_plan(plan, jobs=args.jobs, keep_going=True)
        rows = tuning_rows(results)
        selected = selection(results)
        (out / "grid.json").write_text(
            json.dumps(
                {
                    "dataset": args.grid_dataset,
                    "epochs": args.grid_epochs,
                    "config": common,
                    "rows": rows,
                    "selected": selected,
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
        (out / "grid.md").write_text(grid_table(rows, selected) + "\n")
        print(grid_table(rows, selected))

    spec = final_spec(
        common,
        selected,
        rules=args.rules.split(","),
        methods=methods,
        datasets=args.datasets.split(","),
        seeds=[int(s) for s in args.seeds.split(",")],
        epochs=args.epochs,
    )
    run_spec(spec, work, out, jobs=args.jobs)


if __name__ == "__main__":
    main()
