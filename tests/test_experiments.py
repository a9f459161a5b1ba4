"""The experiment layer: plans over named axes, the one runner (jobs, reuse, resume), the report."""

import json
import math
import os

import pytest

from decorrelate import make_config
from decorrelate.errors import TrainingDiverged, UserError
from decorrelate.experiments import grid, run_plan
from decorrelate.experiments.plan import Plan, Run, axis_label
from decorrelate.experiments.report import (
    CONFIRMED,
    INCONCLUSIVE,
    REFUTED,
    Claim,
    Column,
    Finding,
    cell,
    claims_table,
    group_results,
    mean_std,
    pivot_table,
    summary_table,
    verdict,
)
from decorrelate.experiments.runner import DIVERGED, Result, same_run


def _runs(tiny, root, **extra):
    base = make_config({**tiny, "epochs": 1, **extra})
    ok = base.replace(out=str(root / "ok"))
    bad = ok.replace(optimizer="sgd", lr=1e30, momentum=0.0, out=str(root / "bad"))
    return [
        Run("train", ok, {"seed": 0}, root / "ok", "ok"),
        Run("train", ok.replace(decor="scaled", out=str(root / "d")), {"seed": 0}, root / "d", "d"),
        Run("train", bad, {"seed": 0}, root / "bad", "bad"),
    ]


def test_grid_is_every_combination_in_axis_order_with_labels_and_directories(tiny, tmp_path):
    plan = grid(
        "g",
        make_config(tiny),
        {"rule": ["bp", "fa"], "decor": ["none", "scaled"], "seed": [0, 1]},
        tmp_path,
    )
    assert len(plan.runs) == 8 and plan.axes == ["rule", "decor", "seed"]
    assert plan.groups() == ["bp", "bp+scaled", "fa", "fa+scaled"]
    first, last = plan.runs[0], plan.runs[-1]
    assert (first.config.rule, first.config.decor, first.config.seed) == ("bp", "none", 0)
    assert (last.config.rule, last.config.decor, last.config.seed) == ("fa", "scaled", 1)
    assert last.out == tmp_path / "fa+scaled-s1" and last.config.out == str(last.out)
    assert axis_label({"rule": "bp", "decor": "dbp", "lr": 3e-4, "seed": 2}) == "bp+dbp lr=0.0003"


def test_grid_validates_every_point_and_refuses_shared_directories(tiny, tmp_path):
    with pytest.raises(UserError, match="invalid value for lr"):
        grid("g", make_config(tiny), {"lr": [0.1, -1.0]}, tmp_path)
    with pytest.raises(UserError, match="would share"):
        grid("g", make_config(tiny), {"lr": [0.1, 0.2]}, tmp_path, label=lambda p: "same")
    with pytest.raises(UserError, match="has no values"):
        grid("g", make_config(tiny), {"rule": []}, tmp_path)


def test_parallel_runs_match_sequential_ones_and_divergence_can_be_kept_going(tiny, tmp_path):
    seq = run_plan(_runs(tiny, tmp_path / "seq"), log=None, progress=False, keep_going=True)
    par = run_plan(_runs(tiny, tmp_path / "par"), jobs=2, log=None, keep_going=True)
    assert not seq[2].ok and not par[2].ok  # the diverged run, reported not raised
    assert (tmp_path / "seq" / "bad" / DIVERGED).exists()
    for a, b in zip(seq[:2], par[:2], strict=True):  # worker processes train bit-identically
        assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
        assert a.summary == {**b.summary, "train_seconds": a.summary["train_seconds"]}
    with pytest.raises(TrainingDiverged):
        run_plan(_runs(tiny, tmp_path / "raise")[2:], log=None, progress=False)
    # a diverged run is a result: asked again, it is not trained again
    bad = tmp_path / "seq" / "bad"
    stamps = {p.name: p.stat().st_mtime_ns for p in bad.iterdir()}
    again = run_plan(_runs(tiny, tmp_path / "seq")[2:], log=None, keep_going=True)
    assert {p.name: p.stat().st_mtime_ns for p in bad.iterdir()} == stamps
    assert again[0].diverged == seq[2].diverged
    with pytest.raises(TrainingDiverged):
        run_plan(_runs(tiny, tmp_path / "seq")[2:], log=None)


def test_finished_runs_are_reused_extended_ones_resumed_and_others_refused(tiny, tmp_path):
    runs = _runs(tiny, tmp_path)[:1]
    (first,) = run_plan(runs, log=None, progress=False)
    ckpt = tmp_path / "ok" / "checkpoint.pt"
    stamp = os.stat(ckpt).st_mtime_ns
    (again,) = run_plan(runs, log=None, progress=False)
    assert again.history == first.history and os.stat(ckpt).st_mtime_ns == stamp  # reused
    longer = Run("train", runs[0].config.replace(epochs=2), {}, runs[0].out, "ok")
    (extended,) = run_plan([longer], log=None, progress=False)
    assert extended.history[:2] == first.history and extended.history[-1]["epoch"] == 2
    (shorter,) = run_plan(runs, log=None, progress=False)  # the longer run covers the shorter
    assert shorter.history == extended.history[:2]
    other = Run("train", runs[0].config.replace(lr=0.5), {}, runs[0].out, "other")
    with pytest.raises(UserError, match="holds a different run"):
        run_plan([longer, other], log=None, progress=False)


def test_the_reuse_check_ignores_what_a_resume_may_change_and_options_added_later(tiny):
    cfg = make_config(tiny)
    run = Run("train", cfg, {}, cfg.out, "x")
    saved = cfg.to_dict()
    del saved["alignment_every"]  # as if saved by a version without this option
    assert same_run(run, saved)
    assert same_run(run, {**saved, "epochs": 9, "threads": 2, "out": "elsewhere"})
    assert not same_run(run, {**saved, "lr": 0.5})
    assert not same_run(Run("train", cfg.replace(alignment_every=7), {}, cfg.out, "x"), saved)


def _result(group, seed, ok=True, **summary):
    return Result(
        Run("train", None, {"seed": seed, **summary.pop("axes", {})}, "", group),
        summary=summary,
        diverged=None if ok else "nan loss",
    )


def test_mean_std_is_the_sample_spread_of_the_finite_values():
    assert mean_std([1.0, 2.0, 3.0, math.nan]) == (2.0, 1.0, 3)
    assert mean_std([5.0]) == (5.0, 0.0, 1)
    assert cell([0.5, 0.7], 100.0, 1) == "60.0 ± 14.1"
    assert cell([0.5, math.nan], 100.0, 1) == "50.0 (1 diverged)"
    assert cell([math.nan]) == "diverged"


def test_summary_and_pivot_tables_average_over_seeds_and_write_csv():
    results = [
        _result("bp", 0, acc=0.90, axes={"rule": "bp", "width": 8}),
        _result("bp", 1, acc=0.92, axes={"rule": "bp", "width": 8}),
        _result("fa", 0, acc=0.80, axes={"rule": "fa", "width": 8}),
        _result("fa", 1, ok=False, axes={"rule": "fa", "width": 8}),
        _result("bp w16", 0, acc=0.95, axes={"rule": "bp", "width": 16}),
    ]
    table = summary_table(group_results(results), [Column("acc", "acc (%)", 100.0, 1)])
    assert table.rows[0] == ["bp", "2", "91.0 ± 1.4"]
    assert table.rows[1] == ["fa", "2", "80.0 (1 diverged)"]
    csv = table.csv().splitlines()
    assert csv[0] == "run,seeds,acc,acc_std,acc_n" and csv[1].startswith("bp,2,0.91")
    pivot = pivot_table(results, "rule", "width", "acc", scale=100.0, digits=1)
    assert pivot.header == ["rule", "width=8 (n=2)", "width=16 (n=1)"]
    assert pivot.rows == [["bp", "91.0 ± 1.4", "95.0"], ["fa", "80.0 (1 diverged)", ""]]
    assert "| rule | width=8 (n=2) |" in pivot.markdown()


def test_verdict_needs_the_95_percent_t_interval_on_one_side_of_zero():
    assert verdict([0.10, 0.12, 0.11]) == CONFIRMED
    assert verdict([-0.10, -0.12, -0.11]) == REFUTED
    assert verdict([0.10, -0.08, 0.02]) == INCONCLUSIVE  # spread swamps the mean
    assert verdict([0.5]) == INCONCLUSIVE  # one seed cannot decide
    # n 3, std 0.01: margin t(2)·0.01/√3 = 4.303·0.00577 = 0.0248
    assert verdict([0.01, 0.02, 0.03]) == INCONCLUSIVE  # mean 0.02 (two SE would confirm it)
    assert verdict([0.02, 0.03, 0.04]) == CONFIRMED  # mean 0.03
    # n 5: margin t(4)·std/√5 = 2.776·std/2.236
    assert verdict([-0.005, 0.005, 0.01, 0.015, 0.025]) == INCONCLUSIVE  # 0.010 < 0.0139
    assert verdict([0.005, 0.01, 0.015, 0.02, 0.025]) == CONFIRMED  # 0.015 > 0.0098


def test_about_five_percent_of_noise_only_comparisons_are_decided():
    """The verdict's error rate under the null: differences drawn around zero with 3 seeds."""
    import torch

    gen = torch.Generator().manual_seed(0)
    draws = torch.randn(4000, 3, generator=gen, dtype=torch.float64).tolist()
    decided = sum(verdict(d) != INCONCLUSIVE for d in draws) / len(draws)
    assert 0.03 < decided < 0.07, decided


def test_a_claim_whose_runs_are_missing_is_inconclusive_not_a_crash():
    def judge(groups):
        return Finding(f"{groups['plan']['bp'][0].summary['acc']:.2f}", CONFIRMED)

    ok = claims_table(
        [Claim("bp learns", "Fig. 1", judge)], {"plan": {"bp": [_result("bp", 0, acc=0.9)]}}
    )
    assert ok.rows == [["bp learns", "Fig. 1", "0.90", CONFIRMED]]
    missing = claims_table([Claim("bp learns", "Fig. 1", judge)], {"plan": {}})
    assert missing.rows[0][3] == INCONCLUSIVE and "not measured" in missing.rows[0][2]


def test_any_kind_runs_through_the_same_runner_also_in_worker_processes(tmp_path):
    kind = "toy_kind:toy_kind"
    runs = [
        Run(
            kind,
            {"x": x, "out": str(tmp_path / f"x{x}")},
            {"x": x, "seed": 0},
            tmp_path / f"x{x}",
            f"x={x}",
        )
        for x in (1, 2)
    ]
    plan = Plan("toy", runs, ["x", "seed"])
    par = run_plan(plan, jobs=2, log=None)
    assert [r.summary["square"] for r in par] == [1, 4]
    saved = json.loads((tmp_path / "x2" / "config.json").read_text())
    assert saved == {"x": 2, "out": str(tmp_path / "x2")}
    seq = run_plan(plan, log=None)  # reused: the toy kind counts its executions in the folder
    assert [r.summary["runs"] for r in seq] == [1, 1]
