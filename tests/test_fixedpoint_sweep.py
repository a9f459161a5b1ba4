"""Fixed-point runs on the experiment layer: the ``fixedpoint`` run kind, the learning-rate sweep
as a plan (reuse, diverged runs as results, the table and plot) and ``reproduce zhu2024``."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from decorrelate.errors import UserError
from decorrelate.experiments import fixedpoint_sweep as fs
from decorrelate.experiments.papers import reproduce, zhu2024
from decorrelate.experiments.plan import Run
from decorrelate.experiments.report import CONFIRMED, REFUTED, group_results
from decorrelate.experiments.runner import Result, run_plan
from decorrelate.fixedpoint import tasks
from decorrelate.fixedpoint.config import FixedPointConfig
from decorrelate.fixedpoint.rules import applicable_rules


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_teacher(**overrides) -> FixedPointConfig:
    options = dict(task="linear-teacher", hidden=12, samples=6, steps=30, diag_every=10)
    return FixedPointConfig(**{**options, **overrides})


def no_training(monkeypatch):
    """Make any training attempt fail (to show that finished runs are read back)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(tasks, "run_task", refuse)
    monkeypatch.setattr("decorrelate.fixedpoint.landscape.run_landscape", refuse)
    # the kind imported both when it was built: rebuild it with the refusing ones
    from decorrelate.experiments import kinds

    monkeypatch.delitem(kinds._KINDS, "fixedpoint", raising=False)


def test_sweep_records_divergence_as_a_result_and_reuses_finished_runs(tmp_path, monkeypatch):
    # Euclidean descent at a huge lr jumps far away and stalls (r ≈ 0, loss flat): a result.
    # The linearized rule at a huge lr blows up: also a result, "diverged at step k".
    out = tmp_path / "sweep"
    sweep = fs.run_sweep(tiny_teacher(), ["euclidean", "linearized"], [0.3, 1e5], out, log=None)
    by_key = {(r.run.axes["rule"], r.run.axes["lr"]): r for r in sweep.results}
    assert list(by_key) == [
        ("euclidean", 0.3),
        ("euclidean", 1e5),
        ("linearized", 0.3),
        ("linearized", 1e5),
    ]
    huge = by_key[("linearized", 1e5)].summary
    assert huge["diverged"] and huge["diverged_at"] is not None and huge["final_loss"] == math.inf
    assert "rule linearized, lr 100000" in huge["diverged"]
    assert math.isfinite(by_key[("euclidean", 1e5)].summary["final_loss"])
    table = sweep.table.markdown()
    assert "| linearized | 100000 | inf | — |" in table
    assert f"diverged at step {huge['diverged_at']} |" in table
    ok = by_key[("euclidean", 0.3)].summary
    assert f"| euclidean | 0.3 | {ok['final_loss']:.3e} |" in table
    for name in ("sweep.json", "sweep.md", "sweep.csv", "sweep.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "sweep.md").read_text() == table + "\n"
    assert {d.name for d in out.iterdir() if d.is_dir()} == {
        "euclidean-lr0.3",
        "euclidean-lr100000",
        "linearized-lr0.3",
        "linearized-lr100000",
    }
    summary = json.loads((out / "sweep.json").read_text())
    assert [(s["rule"], s["lr"]) for s in summary] == list(by_key)
    assert summary[3]["final_loss"] == "inf"
    # The history is the metrics rows (as written) and the summary.
    rows = [
        json.loads(x) for x in (out / "euclidean-lr0.3" / "metrics.jsonl").read_text().splitlines()
    ]
    assert by_key[("euclidean", 0.3)].history[:-1] == rows
    assert [r["step"] for r in rows] == list(range(1, 31))
    # Running the same sweep again reads every run back (training would fail here).
    no_training(monkeypatch)
    again = fs.run_sweep(tiny_teacher(), ["euclidean", "linearized"], [0.3, 1e5], out, log=None)
    assert [r.summary for r in again.results] == [r.summary for r in sweep.results]
    assert [r.history for r in again.results] == [r.history for r in sweep.results]
    assert again.table.markdown() == table
    # out and threads do not identify a run: a plan at another thread count reuses it too.
    threaded = fs.run_sweep(tiny_teacher(threads=1), ["euclidean"], [0.3], out, log=None).results[0]
    assert threaded.summary == by_key[("euclidean", 0.3)].summary


def test_the_reuse_check_refuses_a_directory_holding_another_run(tmp_path):
    out = tmp_path / "sweep"
    [done] = fs.run_sweep(tiny_teacher(), ["euclidean"], [0.3], out, log=None).results
    for change in ({"lr": 0.5}, {"steps": 31}, {"seed": 1}, {"hidden": 13}, {"eig_samples": 3}):
        config = dataclasses.replace(done.run.config, **change)
        other = Run("fixedpoint", config, done.run.axes, done.run.out, done.run.group)
        with pytest.raises(UserError, match="holds a different run") as err:
            run_plan([other], log=None)
        assert "\n" not in str(err.value)


def test_an_interrupted_run_is_trained_again_and_only_it(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    first = fs.run_sweep(tiny_teacher(), ["linearized"], [1.0, 3.0], out, log=None).results
    (first[0].run.out / "summary.json").unlink()  # as if it stopped before the end
    trained = []
    real = tasks.run_task

    def counting(cfg, run_dir=None):
        trained.append(cfg.lr)
        return real(cfg, run_dir)

    monkeypatch.setattr(tasks, "run_task", counting)
    from decorrelate.experiments import kinds

    monkeypatch.delitem(kinds._KINDS, "fixedpoint")  # rebuilt with the counting run_task
    again = fs.run_sweep(tiny_teacher(), ["linearized"], [1.0, 3.0], out, log=None).results
    assert trained == [1.0]
    assert (first[0].run.out / "summary.json").exists()
    # same seed, same run: the retrained one ends where the first attempt did
    assert again[0].summary["final_loss"] == first[0].summary["final_loss"]
    assert again[1].summary == first[1].summary


def test_rules_declare_what_they_need():
    linear = tiny_teacher().resolved()
    assert applicable_rules(["all"], linear) == [
        "euclidean",
        "bptt",
        "reparam",
        "linearized",
        "linearized-g",
    ]
    tanh = FixedPointConfig(task="mnist").resolved()
    assert "reparam" not in applicable_rules(["all"], tanh)
    adam = tiny_teacher(optimizer="adam").resolved()
    assert "reparam" not in applicable_rules(["all"], adam)
    assert applicable_rules(["linearized", "euclidean", "linearized"], adam) == [
        "linearized",
        "euclidean",
    ]
    with pytest.raises(UserError, match="needs a linear network"):
        applicable_rules(["reparam"], tanh)
    with pytest.raises(UserError, match="only plain SGD"):
        applicable_rules(["reparam"], tiny_teacher(momentum=0.9).resolved())
    with pytest.raises(UserError, match="does not train a fixed-point network"):
        applicable_rules(["bp"], linear)
    with pytest.raises(UserError, match="at least one learning rate"):
        fs.sweep_plan(tiny_teacher(), ["euclidean"], [], "unused")
    with pytest.raises(UserError, match="steps"):  # validated when the plan is built
        fs.sweep_plan(tiny_teacher(steps=0), ["euclidean"], [0.1], "unused")


def test_several_seeds_get_their_own_directories_and_table_rows(tmp_path):
    plan = fs.sweep_plan(tiny_teacher(steps=5), ["euclidean"], [0.3], tmp_path, seeds=[0, 1])
    assert [r.out.name for r in plan.runs] == ["euclidean-lr0.3-s0", "euclidean-lr0.3-s1"]
    assert [r.config.seed for r in plan.runs] == [0, 1]
    results = run_plan(plan, log=None)
    assert results[0].summary["final_loss"] != results[1].summary["final_loss"]
    table = fs.sweep_table(results, "linear-teacher", 1e-4)
    assert table.header[:3] == ["rule", "lr", "seed"]
    assert [row[2] for row in table.rows] == ["0", "1"]


@pytest.mark.slow
def test_sweep_runs_in_worker_processes(tmp_path):
    sweep = fs.run_sweep(
        tiny_teacher(steps=5), ["euclidean", "linearized"], [0.3], tmp_path, jobs=2, log=None
    )
    alone = fs.run_sweep(
        tiny_teacher(steps=5), ["euclidean", "linearized"], [0.3], tmp_path / "one", log=None
    )
    assert [r.summary["final_loss"] for r in sweep.results] == [
        r.summary["final_loss"] for r in alone.results
    ]


# ----------------------------------------------------------------------------- zhu2024


def fake(rule: str, lr: float, seed: int, **summary) -> Result:
    config = tiny_teacher(rule=rule, lr=lr, seed=seed, steps=100)
    run = Run("fixedpoint", config, {"rule": rule, "lr": lr, "seed": seed}, None, f"{rule} {lr}")
    return Result(run, [], {"final_loss": 1e-3, "steps_to_threshold": None, **summary})


def test_teacher_claims_follow_the_per_seed_numbers():
    # reparam reaches the threshold at lr 3 in every seed, euclidean only at lr 1: confirmed.
    results = []
    for seed in range(3):
        results += [
            fake("euclidean", 1.0, seed, steps_to_threshold=90 + seed, final_loss=1e-5),
            fake("euclidean", 3.0, seed, final_loss=1e-2),
            fake("reparam", 1.0, seed, steps_to_threshold=50, final_loss=1e-9),
            fake("reparam", 3.0, seed, steps_to_threshold=20 + seed, final_loss=1e-20),
            fake("linearized", 1.0, seed, steps_to_threshold=50, final_loss=1e-9),
            fake("linearized", 3.0, seed, steps_to_threshold=20 + seed, final_loss=1e-20),
        ]
    groups = {zhu2024.TEACHER: group_results(results)}
    assert zhu2024.judge_largest_lr(groups).verdict == CONFIRMED
    fewer = zhu2024.judge_fewer_steps(groups)
    assert fewer.verdict == CONFIRMED
    assert "euclidean 91 ± 1 (η = 1) vs linearized 21 ± 1 (η = 3)" in fewer.ours
    assert zhu2024.judge_stalls(groups).verdict == CONFIRMED
    # The other way round: euclidean faster in every seed refutes the claim.
    swapped = [
        fake(
            "euclidean" if r.run.axes["rule"] == "linearized" else r.run.axes["rule"],
            r.run.axes["lr"],
            r.run.axes["seed"],
            **r.summary,
        )
        if r.run.axes["rule"] != "euclidean"
        else fake("linearized", r.run.axes["lr"], r.run.axes["seed"], **r.summary)
        for r in results
    ]
    assert zhu2024.judge_fewer_steps({zhu2024.TEACHER: group_results(swapped)}).verdict == REFUTED


def test_a_diverged_run_counts_as_a_huge_loss_in_the_claims():
    results = []
    for seed in range(2):
        results += [
            fake("euclidean", 3.0, seed, final_loss=math.inf, diverged="blew up", diverged_at=4),
            fake("reparam", 3.0, seed, final_loss=1e-20 * (seed + 1)),
        ]
    found = zhu2024.judge_stalls({zhu2024.TEACHER: group_results(results)})
    assert found.verdict == CONFIRMED
    assert "euclidean 10.0 ± 0.0" in found.ours


def test_mnist_claims_compare_eigenvalues_and_accuracy_seed_by_seed():
    results = []
    for seed in range(3):
        results += [
            fake("euclidean", 0.1, seed, max_re_eig_W_max=1.4 + 0.01 * seed, final_test_acc=0.9),
            fake("linearized", 0.1, seed, max_re_eig_W_max=0.5, final_test_acc=0.88 + 0.001 * seed),
            # euclidean loses its fixed points in epoch 1: its last accuracy is epoch 0's
            fake("euclidean", 1.0, seed, max_re_eig_W_max=1.3, final_test_acc=0.1, diverged="x"),
            fake("linearized", 1.0, seed, max_re_eig_W_max=1.1, final_test_acc=0.89 + 0.001 * seed),
        ]
    groups = {zhu2024.MNIST: group_results(results)}
    eig = zhu2024.judge_eigenvalue(groups)
    assert eig.verdict == CONFIRMED and "at η = 0.1: euclidean 1.41 ± 0.01" in eig.ours
    large = zhu2024.judge_large_lr_accuracy(groups)
    assert large.verdict == CONFIRMED and "euclidean stopped in 3/3" in large.ours
    # at each rule's best lr (0.1 for euclidean, 1 for linearized) euclidean is better in
    # every seed: the claim is refuted
    best = zhu2024.judge_best_accuracy(groups)
    assert "linearized 89.1 ± 0.1 % (η = 1) vs euclidean 90.0 ± 0.0 % (η = 0.1)" in best.ours
    assert best.verdict == REFUTED


def test_reproduce_zhu2024_quick_writes_tables_claims_and_plots(tmp_path, monkeypatch):
    out = tmp_path / "zhu"
    claims, files = reproduce("zhu2024", out, scale="quick", log=None)
    assert [row[0] for row in claims.rows] == [c.text for c in zhu2024.CLAIMS]
    assert all(row[3] for row in claims.rows)
    assert not any("not measured" in row[2] for row in claims.rows)
    for name in ("claims", "teacher", "mnist", "landscape"):
        assert (out / f"{name}.md").stat().st_size > 0
        assert (out / f"{name}.csv").stat().st_size > 0
    for png in ("teacher/sweep.png", "mnist/sweep.png", "landscape.png"):
        assert (out / png).stat().st_size > 0
    results = (out / "results.md").read_text()
    assert "| rule | η | log10 final loss |" in results and "| claim |" in results
    assert (out / "teacher" / "reparam-lr3-s1" / "summary.json").exists()
    teacher = (out / "teacher.md").read_text()
    spec = zhu2024.SCALES["quick"][zhu2024.TEACHER]
    for rule in spec["rules"]:
        for lr in spec["lrs"]:
            assert f"| {rule} | {lr:g} |" in teacher
    sweep = (out / "teacher" / "sweep.md").read_text()  # one row per run, seeds apart
    assert sweep.count("\n") == 2 + len(spec["rules"]) * len(spec["lrs"]) * 2
    assert "| rule | lr | seed |" in sweep
    assert set(map(str, files)) >= {str(out / "claims.md"), str(out / "teacher" / "sweep.md")}
    # A second reproduction reads every run back and draws the same conclusions.
    no_training(monkeypatch)
    again, _ = reproduce("zhu2024", out, scale="quick", log=None)
    assert again.rows == claims.rows


def test_cli_sweep_refuses_jobs_below_one_before_writing_anything(tmp_path):
    from decorrelate import cli_fixedpoint as fp_cli
    from decorrelate.cli import _Parser

    parser = _Parser(prog="decorrelate")
    fp_cli.add_parser(parser.add_subparsers(dest="command", parser_class=_Parser))
    out = tmp_path / "sw"
    argv = ["fixedpoint", "--rule", "euclidean,linearized", "--jobs", "0", "--out", str(out)]
    with pytest.raises(UserError, match="--jobs must be at least 1") as err:
        fp_cli.run(parser.parse_args([*argv, "--quiet"]))
    assert "\n" not in str(err.value) and not out.exists()
