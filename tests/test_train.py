import json
from pathlib import Path

import pytest
import torch

from decorrelate import Loss, TrainingDiverged, UserError, get_rule, make_config, resume, train
from decorrelate.checkpoint import load_checkpoint, read_metrics
from decorrelate.rules import available_rules
from decorrelate.train import evaluate_checkpoint

TIMING = {"seconds", "epoch_seconds", "eval_seconds"}


def strip_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_run_directory_contents(tiny):
    result = train(tiny, log=None)
    out = Path(tiny["out"])
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoint.pt"}
    saved = json.loads((out / "config.json").read_text())
    assert saved["widths"] == [32] and saved["device"] == "cpu"
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for key in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"):
        assert all(key in r for r in rows)
    assert rows[0]["seconds"] == 0 and rows[2]["seconds"] > rows[1]["seconds"] > 0
    assert result.history == rows
    # training did something: loss fell and accuracy beat chance (10 classes)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_acc"] > 0.3


def test_same_seed_same_metrics_different_seed_different(tiny, tmp_path):
    a = train({**tiny, "out": str(tmp_path / "a")}, log=None).history
    b = train({**tiny, "out": str(tmp_path / "b")}, log=None).history
    c = train({**tiny, "out": str(tmp_path / "c"), "seed": 1}, log=None).history
    assert strip_timing(a) == strip_timing(b)
    assert strip_timing(a) != strip_timing(c)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_is_bit_identical(tiny, tmp_path, optimizer):
    opts = {**tiny, "optimizer": optimizer, "val_split": 0.2}
    straight = train({**opts, "out": str(tmp_path / "straight")}, log=None)
    train({**opts, "epochs": 1, "out": str(tmp_path / "split")}, log=None)
    resumed = resume(tmp_path / "split", {"epochs": 2}, log=None)
    assert strip_timing(resumed.history) == strip_timing(straight.history)
    a = load_checkpoint(tmp_path / "straight")["model"]
    b = load_checkpoint(tmp_path / "split")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(read_metrics(tmp_path / "split")) == 3


def test_resume_after_interruption_with_a_schedule(tiny, tmp_path):
    """Ctrl-C after epoch 1 of a 3-epoch cosine run, then --resume: same as uninterrupted."""
    opts = {**tiny, "epochs": 3, "lr_schedule": "cosine"}
    straight = train({**opts, "out": str(tmp_path / "straight")}, log=None)

    def interrupt_after_epoch_1(line: str) -> None:
        if line.startswith("epoch   1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train({**opts, "out": str(tmp_path / "cut")}, log=interrupt_after_epoch_1)
    assert load_checkpoint(tmp_path / "cut")["epoch"] == 1
    resumed = resume(tmp_path / "cut", log=None)
    assert strip_timing(resumed.history) == strip_timing(straight.history)
    assert resumed.history[-1]["lr"] == pytest.approx(0.0)


def test_resume_refuses_to_change_the_maths(tiny):
    train({**tiny, "epochs": 1}, log=None)
    with pytest.raises(UserError, match="cannot change lr"):
        resume(tiny["out"], {"lr": 0.5, "epochs": 2}, log=None)


def test_refuses_to_overwrite_a_run(tiny):
    train({**tiny, "epochs": 0}, log=None)
    with pytest.raises(UserError, match="already holds a run"):
        train({**tiny, "epochs": 0}, log=None)
    train({**tiny, "epochs": 0}, log=None, overwrite=True)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny):
    opts = {**tiny, "optimizer": "sgd", "lr": 1e30, "momentum": 0.0, "epochs": 3}
    with pytest.raises(TrainingDiverged, match="lower --lr") as err:
        train(opts, log=None)
    assert "\n" not in str(err.value)
    state = load_checkpoint(tiny["out"])
    assert state["epoch"] == 0  # the untrained, finite network
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert [r["epoch"] for r in read_metrics(tiny["out"])] == [0]


def test_eval_checkpoint_reproduces_logged_test_accuracy(tiny):
    result = train(tiny, log=None)
    ev = evaluate_checkpoint(tiny["out"])
    assert ev["acc"] == result.final_test_acc
    assert ev["loss"] == pytest.approx(result.history[-1]["test_loss"], rel=1e-12)
    with pytest.raises(UserError, match="split 'val' is not available"):
        evaluate_checkpoint(tiny["out"], split="val")


def test_bp_rule_fills_grad_like_autograd():
    assert "bp" in available_rules()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x, y = torch.randn(11, 5), torch.randint(0, 3, (11,))
    rule = get_rule("bp")
    rule.attach(model, Loss("mse-shifted"))
    out = rule.backward(model, x, y)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    Loss("mse-shifted")(model(x), y).backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert not out.loss.requires_grad and not out.output.requires_grad
    with pytest.raises(UserError, match="unknown rule 'nope'; choose one of: bp"):
        get_rule("nope")


def test_short_mnist_run_exceeds_90_percent(mnist_dir, tmp_path):
    cfg = make_config(
        {
            "dataset": "mnist",
            "data_dir": str(mnist_dir),
            "widths": [256],
            "epochs": 1,
            "batch_size": 128,
            "lr": 1e-3,
            "out": str(tmp_path / "mnist"),
        }
    )
    result = train(cfg, log=None)
    assert result.final_test_acc > 0.90, result.history


@pytest.mark.parametrize(
    "speed",
    [{}, {"decor_block_size": 16, "decor_every": 2}],
    ids=["exact", "blocks-every-2"],
)
def test_decorrelated_run_logs_layer_stats_and_resumes_exactly(tiny, tmp_path, speed):
    opts = {**tiny, "decor": "scaled", "decor_lr": 1e-3, **speed}
    straight = train({**opts, "out": str(tmp_path / "a")}, log=None)
    train({**opts, "epochs": 1, "out": str(tmp_path / "b")}, log=None)
    resumed = resume(tmp_path / "b", {"epochs": 2}, log=None)
    assert strip_timing(resumed.history) == strip_timing(straight.history)
    row = straight.history[-1]
    for stat in ("offdiag", "cond", "R_norm"):
        assert any(k.startswith("decor/") and k.endswith(stat) for k in row)
    r_final = load_checkpoint(tmp_path / "a")["model"]
    assert any(
        k.endswith(".R") and not torch.equal(v, torch.eye(v.shape[-1]).expand_as(v))
        for k, v in r_final.items()
    )
    if speed:  # 64 inputs in 4 blocks of 16, the 32-wide classifier input in 2
        assert r_final["1.R"].shape == (4, 16, 16) and r_final["3.R"].shape == (2, 16, 16)


def test_decor_exclude_leaves_named_layers_plain(tiny):
    from decorrelate.train import build_network

    cfg = make_config({**tiny, "decor": "copi", "decor_exclude": "3"})
    names = [k for k in build_network(cfg, (1, 8, 8), 10).state_dict() if k.endswith(".R")]
    assert names == ["1.R"]
    with pytest.raises(UserError, match="the layers are: '1', '3'"):
        build_network(make_config({**tiny, "decor": "copi", "decor_exclude": "x"}), (1, 8, 8), 10)
