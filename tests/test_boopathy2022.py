"""The Align paper's experiments as plans (boopathy2022), and the Add task through the Trainer."""

import math
from pathlib import Path

import pytest
import torch

import decorrelate.rules.align  # noqa: F401  (registers the align rules)
from decorrelate import Loss, UserError, build_model, make_config
from decorrelate.checkpoint import read_metrics
from decorrelate.data import load_dataset
from decorrelate.data.addtask import add_targets, make_add_task, shift
from decorrelate.experiments.papers import ALIASES, reproduce
from decorrelate.experiments.papers import boopathy2022 as paper
from decorrelate.models import VanillaRNN
from decorrelate.seeding import derive_seed
from decorrelate.train import Trainer, evaluate, load_data

# ----------------------------------------------------------------------------- the Add task


def test_add_task_targets_are_shifted_without_wrap_around():
    x = torch.zeros(1, 8, 1)
    x[0, -1] = 1.0  # only the last input is on: it must not reappear at the start
    assert torch.equal(add_targets(x), torch.full_like(x, 0.5))
    ones = torch.ones(1, 8, 1)
    expected = [0.5, 0.5, 1.0, 1.0, 1.0, 0.75, 0.75, 0.75]
    assert add_targets(ones).flatten().tolist() == expected
    (x_train, y_train), (x_test, _) = make_add_task(n_train=30, n_test=10, steps=100, seed=3)
    assert x_train.shape == (30, 100, 1) and x_test.shape == (10, 100, 1)
    assert set(x_train.unique().tolist()) <= {0.0, 1.0}
    x = x_train[..., 0]
    for t in range(100):
        want = torch.full((30,), 0.5)
        if t >= 2:
            want = want + 0.5 * x[:, t - 2]
        if t >= 5:
            want = want - 0.25 * x[:, t - 5]
        torch.testing.assert_close(y_train[:, t, 0], want)
    torch.testing.assert_close(shift(x_train, 0), x_train)
    assert torch.equal(make_add_task(seed=3)[0][0], make_add_task(seed=3)[0][0])
    assert not torch.equal(make_add_task(seed=3)[0][0], make_add_task(seed=4)[0][0])


def test_add_task_is_a_regression_data_set_that_is_not_normalised():
    splits = load_dataset("add-task", synthetic_shape=(20, 1), synthetic_train=30, synthetic_test=7)
    (x, y), (xt, yt) = make_add_task(30, 7, 20, seed=0)
    assert torch.equal(splits.train.x, x) and torch.equal(splits.train.y, y)
    assert torch.equal(splits.test.x, xt) and torch.equal(splits.test.y, yt)
    assert splits.num_classes == 1 and splits.input_shape == (20, 1) and splits.root is None
    with pytest.raises(UserError, match=r"synthetic_shape \[T, 1\]"):
        load_dataset("add-task", synthetic_shape=(3, 32, 32))
    with pytest.raises(UserError, match="sequence data set"):
        build_model("rnn-ntk", (1, 8, 8), 10, widths=[4])
    with pytest.raises(UserError, match="one width"):
        build_model("rnn-ntk", (20, 1), 1, widths=[4, 4])


def test_rnn_model_is_the_vanilla_rnn_of_the_seed():
    torch.manual_seed(5)
    model = build_model("rnn-ntk", (20, 1), 1, widths=[16], activation="relu")
    torch.manual_seed(5)
    ref = VanillaRNN(1, 16, 1, activation="relu", parameterization="ntk")
    assert isinstance(model, VanillaRNN)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_mse_on_regression_targets_is_half_the_squared_error_per_time_step():
    gen = torch.Generator().manual_seed(0)
    out, y = torch.randn(4, 6, 1, generator=gen), torch.randn(4, 6, 1, generator=gen)
    loss = Loss("mse")
    assert loss.regression(out, y) and not loss.classifies(y)
    per_sequence = 0.5 * (out - y).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss(out, y, reduction="none"), per_sequence)
    torch.testing.assert_close(loss(out, y), 0.5 * (out - y).pow(2).mean())
    # "sum" / count is the mean, so evaluation can add batches of any size up
    torch.testing.assert_close(loss(out, y, reduction="sum") / loss.count(y), loss(out, y))
    two = torch.randn(4, 6, 2, generator=gen)
    torch.testing.assert_close(
        Loss("mse")(two, two + 1.0), torch.tensor(1.0)
    )  # 0.5·‖1‖² over 2 outputs
    assert int(loss.correct(out, y)) == 0
    with pytest.raises(UserError, match="class-index targets"):
        Loss("cross-entropy")(out, y)


ADD = {
    "dataset": "add-task",
    "synthetic_shape": [20, 1],
    "synthetic_train": 60,
    "synthetic_test": 20,
    "model": "rnn-ntk",
    "activation": "relu",
    "loss": "mse",
    "optimizer": "sgd",
    "momentum": 0.0,
    "lr": 0.3,
    "batch_size": 20,
    "max_loss_growth": 0,
    "seed": 1,
}

#: Test MSE per time step at epochs 0-3 of align/addtask.py::train_add_task (the Add task's own
#: loop, deleted) on make_add_task(60, 20, 20, seed=0), width 16, 3 epochs, lr 0.3, batch 20,
#: seed 1. The Trainer reproduces them to float32 rounding (its test MSE is 2 × test_loss).
OLD_LOOP = {
    "bp": [1.21412992477417, 0.16753463447093964, 0.12343735992908478, 0.0981520339846611],
    "align-ada": [1.21412992477417, 0.16702182590961456, 0.12287722527980804, 0.09908712655305862],
    "align-zero": [1.21412992477417, 0.1659509837627411, 0.12108904868364334, 0.09685440361499786],
    "last-layer": [1.21412992477417, 0.2287917584180832, 0.18955475091934204, 0.17306512594223022],
}


def _fit(tmp_path: Path, **options):
    cfg = make_config(ADD, options, {"out": str(tmp_path / options["rule"])})
    trainer = Trainer(cfg, log=None, progress=False)
    Path(cfg.out).mkdir(parents=True)
    return trainer, trainer.fit(Path(cfg.out)).history


@pytest.mark.parametrize("rule", list(OLD_LOOP))
def test_add_task_through_the_trainer_matches_the_old_loop(tmp_path, rule):
    _, history = _fit(tmp_path, rule=rule, widths=[16], epochs=3)
    got = [2.0 * row["test_loss"] for row in history]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(OLD_LOOP[rule]), rtol=1e-6, atol=0)
    assert all(math.isnan(row["test_acc"]) and math.isnan(row["train_acc"]) for row in history)


def test_add_task_training_beats_readout_only(tmp_path):
    train_mse = {}
    for rule in ("bp", "align-ada", "last-layer"):
        trainer, history = _fit(tmp_path, rule=rule, widths=[32], epochs=8)
        assert history[-1]["test_loss"] < history[0]["test_loss"], rule
        loss, _ = evaluate(trainer.model, trainer.train_data, trainer.loss, 1000)
        train_mse[rule] = 2.0 * loss
    assert train_mse["bp"] < train_mse["last-layer"]
    assert train_mse["align-ada"] < train_mse["last-layer"]


def test_rnn_model_is_initialised_from_the_run_seed(tmp_path):
    trainer, _ = _fit(tmp_path, rule="bp", widths=[8], epochs=0)
    torch.manual_seed(derive_seed(1, "model"))
    ref = VanillaRNN(1, 8, 1, activation="relu", parameterization="ntk")
    assert torch.equal(trainer.model.recurrent.weight, ref.recurrent.weight)


# ----------------------------------------------------------------------------- data options


def test_test_size_is_a_fixed_subset_and_epoch_size_tiles_the_training_set():
    base = {"dataset": "synthetic", "synthetic_shape": [4], "synthetic_train": 30}
    full = load_data(make_config(base))
    small = load_data(make_config(base, {"test_size": 100, "seed": 3}))
    again = load_data(make_config(base, {"test_size": 100, "seed": 4}))
    assert len(small.test) == 100 and torch.equal(small.test.x, again.test.x)  # seed-independent
    rows = {tuple(r.tolist()) for r in full.test.x}
    assert all(tuple(r.tolist()) in rows for r in small.test.x)
    assert len(load_data(make_config(base, {"test_size": 5000})).test) == len(full.test)
    tiled = load_data(make_config(base, {"epoch_size": 100}))
    assert len(tiled.train) == 120  # 4 copies of 30: at least 100 rows
    assert torch.equal(tiled.train.x[30:60], full.train.x)
    assert torch.equal(tiled.train.y[90:], full.train.y)
    assert len(load_data(make_config(base, {"epoch_size": 10})).train) == 30


# ----------------------------------------------------------------------------- plans


def test_width_plans_keep_the_suites_semantics(tmp_path):
    plan = paper.plan_for("align-width", "cpu", tmp_path)
    spec = paper.load_suite("align-width")
    assert plan.name == "align-width" and plan.axes == ["width", "rule", "seed"]
    runs = plan.runs
    widths = spec["widths"]
    per_width = {w: {r.seed for r in runs if r.axes["width"] == w} for w in widths}
    for w in widths:  # single_seed_above: one seed above the limit
        assert per_width[w] == ({0} if w > spec["single_seed_above"] else set(spec["seeds"]))
    for run in runs:
        cfg, rule, w = run.config, run.axes["rule"], run.axes["width"]
        assert cfg.widths == [w, w] and cfg.rule == rule and cfg.seed == run.seed
        assert cfg.test_size == 5000 and cfg.threads == 1 and cfg.train_size == 10000
        assert cfg.alignment_score == (rule == "bp")
        assert Path(cfg.out).parent == tmp_path / "align-width" / "runs"
        if rule == "fa":
            assert cfg.feedback_init == "gaussian" and cfg.feedback_scale == pytest.approx(w**0.5)
        elif rule == "dfa":
            assert cfg.feedback_init == "gaussian"
            assert cfg.feedback_scale == pytest.approx(10**0.5)
        else:
            assert cfg.feedback_init == make_config({}).feedback_init
    conv = paper.plan_for("align-width-conv", "cpu", tmp_path)
    fa = next(r for r in conv.runs if r.axes["rule"] == "fa" and r.axes["channels"] == 16)
    assert fa.config.channels == [16, 16] and fa.config.widths == []
    assert fa.config.feedback_scale == pytest.approx((9 * 16) ** 0.5)
    # the rules are named by the paper module only; the generic options do not
    assert paper.rule_options({"model": "mlp"}, "fa", 8) == {}


def test_lowdata_plan_batches_epochs_and_tiling(tmp_path):
    plan = paper.plan_for("align-lowdata", "cpu", tmp_path)
    spec = paper.load_suite("align-lowdata")
    for run in plan.runs:
        cfg, n = run.config, run.axes["train_size"]
        assert cfg.train_size == n and cfg.batch_size == min(100, n)
        assert cfg.epoch_size == spec["epoch_size"] and cfg.test_size == spec["test_size"]
        rows = n * max(1, math.ceil(spec["epoch_size"] / n))
        steps = cfg.epochs * math.ceil(rows / cfg.batch_size)
        assert spec["steps"] <= steps < spec["steps"] + math.ceil(rows / cfg.batch_size)
    assert {r.config.epochs for r in plan.runs if r.axes["train_size"] == 50} == {2}


def test_scales_read_their_sections_of_the_suite_files(tmp_path):
    for name in paper.EXPERIMENTS:
        quick, cpu, big = (paper.load_suite(name, s) for s in ("quick", "cpu", "paper"))
        assert quick["base"]["dataset"] in ("synthetic", "add-task")
        key = "train_sizes" if quick["sweep"] == "lowdata" else "widths"
        assert max(big[key]) > max(cpu[key]) > max(quick[key]), name
        assert len(paper.plan_for(name, "paper", tmp_path).runs) > len(
            paper.plan_for(name, "cpu", tmp_path).runs
        )
    rnn = paper.plan_for("align-rnn", "cpu", tmp_path).runs[0].config
    assert (rnn.dataset, rnn.model, rnn.loss, rnn.synthetic_shape) == (
        "add-task",
        "rnn-ntk",
        "mse",
        [100, 1],
    )
    with pytest.raises(UserError, match="unknown Align experiment"):
        paper.load_suite("align-nothing")


# ----------------------------------------------------------------------------- reproduce


def test_reproduce_quick_writes_tables_plots_and_claims_and_reuses_runs(tmp_path):
    claims, files = reproduce("boopathy2022", tmp_path, scale="quick", log=None)
    names = {Path(f).relative_to(tmp_path).as_posix() for f in files}
    for table in (
        "align-width/accuracy",
        "align-width/alignment_score",
        "align-width-conv/accuracy",
        "align-width-conv/alignment_score",
        "align-lowdata/accuracy",
        "align-lowdata/advantage",
        "align-rnn/test_mse",
        "claims",
    ):
        assert {f"{table}.md", f"{table}.csv"} <= names, table
    pngs = [
        "align-width/acc_vs_width.png",
        "align-width/align_score_vs_width.png",
        "align-width-conv/align_score_vs_width.png",
        "align-lowdata/acc_vs_train_size.png",
        "align-rnn/rnn_loss_vs_width.png",
    ]
    for png in pngs:
        assert png in names and (tmp_path / png).stat().st_size > 1000, png
    assert len(claims.rows) >= 4
    assert all(not row[2].startswith("not measured") for row in claims.rows), claims.rows
    text = (tmp_path / "results.md").read_text()
    assert "| rule | width=8 (n=1) | width=32 (n=1) |" in text
    assert "layer 1 (2) shuffled" in text and "predicting the mean gives" in text
    assert "best of fa/dfa" in text
    mse = (tmp_path / "align-rnn" / "test_mse.csv").read_text().splitlines()
    assert mse[0].startswith("rule,width=4") and len(mse) == 5  # bp, align-ada/zero, last-layer
    runs = tmp_path / "align-width" / "runs"
    bp_run = next(runs.glob("bp_*"))
    assert "align_score_shuffled/2" in read_metrics(bp_run)[-1]
    stamp = (bp_run / "metrics.jsonl").stat().st_mtime_ns
    again, _ = reproduce("boopathy2022", tmp_path, scale="quick", log=None)
    assert (bp_run / "metrics.jsonl").stat().st_mtime_ns == stamp  # reused, not retrained
    assert again.rows == claims.rows


def test_old_suite_names_are_aliases_of_one_plan(tmp_path):
    assert ALIASES["align-rnn"] == ("boopathy2022", "align-rnn")
    assert set(ALIASES) >= set(paper.EXPERIMENTS)
    claims, _ = reproduce("align-rnn", tmp_path, scale="quick", log=None)
    assert (tmp_path / "align-rnn" / "rnn_loss_vs_width.png").exists()
    assert not (tmp_path / "align-width").exists()
    rnn = next(row for row in claims.rows if "RNN" in row[0])
    assert "gap to bp" in rnn[2]
    with pytest.raises(UserError, match="no experiment"):
        reproduce("align-rnn", tmp_path, scale="quick", log=None, only="align-width")


def test_reproduce_command_runs_an_old_suite_name(tmp_path, capsys):
    from decorrelate.cli import main

    assert main(["reproduce", "--list"]) == 0
    assert "align-rnn" in capsys.readouterr().out.split()
    assert main(["reproduce", "align-rnn", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "align-rnn" / "rnn_loss_vs_width.png").exists()


# ----------------------------------------------------------------------------- claims


def _result(axis, x, rule, seed, **summary):
    from decorrelate.experiments.plan import Run
    from decorrelate.experiments.runner import Result

    axes = {axis: x, "rule": rule, "seed": seed}
    run = Run("train", None, axes, Path(f"{rule}-{x}-{seed}"), f"{rule} {axis}={x}")
    return Result(run, [], summary)


def _groups(results):
    from decorrelate.experiments.report import group_results

    return group_results(results)


@pytest.mark.parametrize("shrinks", [True, False])
def test_gap_claims_decide_by_the_per_seed_differences(shrinks):
    jitter = [0.0, 0.004, -0.003]
    results = []
    for s, j in enumerate(jitter):
        for w, ada in ((8, 0.70), (64, 0.88 if shrinks else 0.50)):
            results.append(_result("width", w, "bp", s, final_test_acc=0.9 + j))
            results.append(_result("width", w, "align-ada", s, final_test_acc=ada + 2 * j))
    results.append(_result("width", 128, "bp", 0, final_test_acc=0.95))  # one seed: not used
    judge = paper.gap_shrinks("align-width", "width", "align-ada", "final_test_acc")
    found = judge({"align-width": _groups(results)})
    assert found.verdict == ("confirmed" if shrinks else "refuted")
    assert "width 8" in found.ours and "at 64" in found.ours
    rnn = [
        _result("width", w, rule, s, final_test_loss=loss + 0.001 * s)
        for s in range(3)
        for w, (bp, ada) in ((8, (0.02, 0.04)), (128, (0.01, 0.011)))
        for rule, loss in (("bp", bp), ("align-ada", ada))
    ]
    judge = paper.gap_shrinks(
        "align-rnn", "width", "align-ada", "final_test_loss", lower_is_better=True, scale=2.0
    )
    assert judge({"align-rnn": _groups(rnn)}).verdict == "confirmed"


def test_lowdata_and_score_claims():
    results = []
    for s in range(3):
        for n, (ada, fa) in ((50, (0.44, 0.34)), (5000, (0.65, 0.36))):
            results.append(_result("train_size", n, "align-ada", s, final_test_acc=ada + 0.01 * s))
            results.append(_result("train_size", n, "align-zero", s, final_test_acc=ada - 0.05))
            results.append(_result("train_size", n, "fa", s, final_test_acc=fa - 0.005 * s))
            results.append(_result("train_size", n, "dfa", s, final_test_acc=fa - 0.1))
    groups = {"align-lowdata": _groups(results)}
    beats = paper.beats_at_smallest(
        "align-lowdata", "train_size", "final_test_acc", paper.ALIGN_RULES, paper.FA_RULES
    )
    found = beats(groups)
    assert found.verdict == "confirmed" and found.ours.startswith("align-ada − fa at train_size 50")
    largest = paper.advantage_shrinks(
        "align-lowdata", "train_size", "final_test_acc", paper.ALIGN_RULES, paper.FA_RULES
    )
    assert largest(groups).verdict == "refuted"  # +10 points at n=50, +29 at n=5000
    scores = [
        _result("width", w, "bp", s, **{"align_score/2": v + 0.01 * s, "align_score/5": v})
        for s in range(2)
        for w, v in ((8, 0.6), (512, 0.95))
    ]
    found = paper.score_rises("align-width", "width")({"align-width": _groups(scores)})
    assert found.verdict == "confirmed" and "2 layers" in found.ours
    from decorrelate.experiments.report import claims_table

    table = claims_table(paper.CLAIMS, {"align-width": _groups(scores)})  # other plans missing
    assert len(table.rows) == len(paper.CLAIMS) >= 4
    verdicts = {row[0]: row[3] for row in table.rows}
    assert (
        verdicts["The alignment score of BP training rises (towards 1) with width"] == "confirmed"
    )
    assert sum(row[2].startswith("not measured") for row in table.rows) == len(paper.CLAIMS) - 1
