"""Tuning on a validation split (experiments.tuning) and the decorrelation benchmark built on it."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from decorrelate.errors import UserError
from decorrelate.experiments.plan import Run
from decorrelate.experiments.runner import Result
from decorrelate.experiments.tuning import chosen, select_best

ROOT = Path(__file__).resolve().parents[1]


def _result(decor, lr, val, test, diverged=None):
    axes = {"decor": decor, "lr": lr, "seed": 0}
    run = Run("train", {}, axes, Path(f"/x/{decor}-{lr}"), f"{decor} lr={lr}")
    summary = {} if diverged else {"best_val_acc": val, "best_test_acc": test}
    return Result(run, summary=summary, diverged=diverged)


def test_select_best_chooses_on_validation_never_on_test():
    results = [
        _result("none", 1e-3, val=0.90, test=0.99),  # best on test, not on validation
        _result("none", 3e-4, val=0.95, test=0.91),
        _result("scaled", 1e-3, val=0.97, test=0.80),
        _result("scaled", 3e-4, val=0.96, test=0.98),  # best on test, not on validation
    ]
    best = select_best(results, by=("decor",))
    assert list(best) == [("none",), ("scaled",)]
    assert best[("none",)].run.axes["lr"] == 3e-4
    assert best[("scaled",)].run.axes["lr"] == 1e-3
    # the same results chosen on the test accuracy would pick the other runs: the choice is
    # really made by the key, and select_best refuses that key
    with pytest.raises(UserError, match="test set"):
        select_best(results, by=("decor",), key="best_test_acc")
    assert chosen(best, ("lr", "decor_lr")) == {
        ("none",): {"lr": 3e-4, "decor_lr": None},
        ("scaled",): {"lr": 1e-3, "decor_lr": None},
    }


def test_select_best_skips_diverged_and_non_finite_runs_and_keeps_the_first_of_a_tie():
    results = [
        _result("a", 1.0, val=None, test=None, diverged="loss is nan"),
        _result("a", 2.0, val=0.5, test=0.5),
        _result("a", 3.0, val=0.5, test=0.9),  # a tie: the first planned wins
        _result("b", 1.0, val=math.nan, test=0.9),
        _result("c", 1.0, val=None, test=None, diverged="loss is nan"),
    ]
    best = select_best(results, by=("decor",))
    assert {k: r.run.axes["lr"] for k, r in best.items()} == {("a",): 2.0}
    # minimising (a loss): the lowest score wins
    losses = [_result("a", 1.0, val=0.3, test=0.0), _result("a", 2.0, val=0.2, test=0.0)]
    low = select_best(losses, by=("decor",), maximise=False)
    assert low[("a",)].run.axes["lr"] == 2.0


def test_select_best_needs_a_validation_score():
    result = _result("a", 1.0, val=0.5, test=0.5)
    result.summary.pop("best_val_acc")
    with pytest.raises(UserError, match="validation split"):
        select_best([result], by=("decor",))
    with pytest.raises(UserError, match="seed"):
        chosen({}, ("lr", "seed"))


def _bench():
    path = ROOT / "benchmarks" / "bench_decor_accuracy.py"
    spec = importlib.util.spec_from_file_location("bench_decor_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decor_accuracy_benchmark_tunes_on_validation_then_runs_the_selection_over_seeds(
    tiny, tmp_path
):
    from decorrelate.experiments import run_plan
    from decorrelate.experiments.specs import run_spec

    bench = _bench()
    common = {k: v for k, v in tiny.items() if k not in ("out", "epochs")}
    base = {**common, "epochs": 1}
    etas = {"none": [None], "scaled": [1e-4, 1e-3]}
    plan = bench.tuning_plan(base, ["none", "scaled"], [0.003, 0.03], etas, tmp_path / "w")
    assert [r.group for r in plan.runs] == [
        "bp lr=0.003",
        "bp lr=0.03",
        "bp+scaled lr=0.003 decor-lr=0.0001",
        "bp+scaled lr=0.003 decor-lr=0.001",
        "bp+scaled lr=0.03 decor-lr=0.0001",
        "bp+scaled lr=0.03 decor-lr=0.001",
    ]
    assert all(r.config.val_split == bench.VAL_SPLIT and r.config.seed == 0 for r in plan.runs)
    assert plan.runs[0].out == tmp_path / "w" / "grid" / "bp_lr=0.003-s0"
    results = run_plan(plan, log=None, keep_going=True)
    rows = bench.tuning_rows(results)
    selected = bench.selection(results)
    for method in ("none", "scaled"):
        mine = [r for r in rows if r["method"] == method and not r["diverged"]]
        top = max(mine, key=lambda r: r["val_acc"])
        assert selected[method] == {"lr": top["lr"], "decor_lr": top["decor_lr"]}
    table = bench.grid_table(rows, selected)
    assert table.count("✓") == 2
    spec = bench.final_spec(
        common,
        selected,
        rules=["bp"],
        methods=["none", "scaled"],
        datasets=["synthetic"],
        seeds=[0, 1],
        epochs=1,
    )
    assert all(g["lr"] == selected[g["decor"]]["lr"] for g in spec["groups"].values())
    summaries = run_spec(spec, tmp_path / "w", tmp_path / "out", jobs=1, log=None)
    groups = json.loads((tmp_path / "out" / "synthetic" / "results.json").read_text())["groups"]
    assert [g["label"] for g in groups] == list(spec["groups"])
    assert all(g["seeds"] == 2 for g in groups) and "synthetic" in summaries


def test_select_best_reproduces_the_committed_decor_accuracy_selection():
    # the committed tuning grid (one seed, validation split) chosen again by select_best
    grid = json.loads((ROOT / "benchmarks/results/decor_accuracy_mlp/grid.json").read_text())
    results = []
    for row in grid["rows"]:
        axes = {"decor": row["method"], "lr": row["lr"], "seed": 0}
        if row["decor_lr"] is not None:
            axes["decor_lr"] = row["decor_lr"]
        run = Run("train", {}, axes, Path("/x") / row["label"], row["label"])
        summary = {"best_val_acc": row["val_acc"], "best_test_acc": 1.0 - row["val_acc"]}
        results.append(Result(run, summary=summary, diverged="x" if row["diverged"] else None))
    best = select_best(results, by=("decor",))
    selected = {k[0]: v for k, v in chosen(best, ("lr", "decor_lr")).items()}
    assert selected == grid["selected"]
