import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_flags
from decorrelate.cli import main


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None):
    """Run the real console entry point in a subprocess (exit codes and streams as a user sees)."""
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "decorrelate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--rule", "magic"], "choose one of: bp"),
        (["train", "--rule", "euclidean"], "a rule of `decorrelate fixedpoint`"),
        (["compare", "--rules", "bp,reparam"], "run `decorrelate fixedpoint --rule reparam`"),
        (["train", "--dataset", "imagenet"], "choose one of: mnist"),
        (["train", "--lr", "abc"], "invalid value for lr"),
        (["train", "--batch-size", "0"], "must be > 0"),
        (["train", "--bogus-flag", "1"], "unrecognized arguments"),
        (["eval", "/nonexistent/run"], "no checkpoint"),
        (["plot", "/nonexistent/run"], "not a run directory"),
        (["compare", "--seeds", "a"], "--seeds takes integers"),
        (["compare", "--sweep", "lr"], "KEY=V1,V2"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        code = main(args)
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_data_names_the_files(tmp_path):
    proc = run_cli(
        "train",
        "--dataset",
        "cifar10",
        "--data-dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "run"),
        cwd=tmp_path,
        env={"DECORRELATE_NO_DOWNLOAD": "1"},
    )
    assert proc.returncode == 2
    assert "cifar-10" in proc.stderr and "--data-dir" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_unwritable_output_dir(tmp_path, tiny):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_cli("train", *cli_flags({**tiny, "out": str(blocker / "run")}))
    assert proc.returncode == 2
    assert "cannot write to output directory" in proc.stderr and "Traceback" not in proc.stderr


def test_config_file_unknown_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rule: bp\nlearning-rate: 0.1\n")
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(["train", "--config", str(cfg)]))
    assert exc.value.code == 2


def test_train_eval_plot_and_resume_from_the_command_line(tiny, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**tiny, "epochs": 1, "lr": 0.5}))
    # flags override the file
    assert main(["train", "--config", str(cfg), "--lr", "0.002", "--quiet", "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("done:") and "epochs=1" in out[0]
    saved = json.loads((Path(tiny["out"]) / "config.json").read_text())
    assert saved["lr"] == 0.002
    assert main(["train", "--resume", tiny["out"], "--epochs", "2", "--quiet"]) == 0
    assert "epochs=2" in capsys.readouterr().out
    assert main(["eval", tiny["out"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epoch"] == 2
    assert main(["plot", tiny["out"], "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "acc_vs_epoch.png").stat().st_size > 1000


def test_divergence_exits_non_zero_in_one_line(tiny):
    proc = run_cli(
        "train", *cli_flags(tiny), "--optimizer", "sgd", "--lr", "1e30", "--momentum", "0"
    )
    assert proc.returncode == 3
    assert "diverged" in proc.stderr and proc.stderr.count("\n") == 1


def test_compare_writes_table_and_plots(tiny, tmp_path, capsys):
    out = tmp_path / "grid"
    args = [
        "compare",
        *cli_flags({**tiny, "out": str(out), "epochs": 1}),
        "--seeds",
        "0,1",
        "--sweep",
        "lr=1e-3,3e-3",
        "--quiet",
        "--no-progress",
    ]
    assert main(args) == 0
    table = (out / "results.md").read_text()
    assert "| bp lr=1e-3 | 2 | 1 |" in table and "| bp lr=3e-3 | 2 | 1 |" in table
    assert "epochs to" in table and "seconds to" in table
    assert (out / "acc_vs_seconds.png").exists() and (out / "acc_vs_epoch.png").exists()
    results = json.loads((out / "results.json").read_text())
    assert [g["seeds"] for g in results["groups"]] == [2, 2]
    first = (out / "bp_lr=1e-3-s0" / "metrics.jsonl").read_text()
    capsys.readouterr()
    # a second call reuses the finished runs (no retraining: metrics files unchanged)
    assert main(args) == 0
    assert (out / "bp_lr=1e-3-s0" / "metrics.jsonl").read_text() == first
