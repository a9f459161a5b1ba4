"""Bad or unusual input through the real command line: one line and an exit code, never a
traceback, never a silent fallback (issue 14: resume options, config files, finite divergence,
--help, compare --jobs, output that reaches a pipe while a run is going)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import cli_flags
from decorrelate.cli import EXIT_DIVERGED, EXIT_USER, main


def one_line(capsys, *needles: str) -> str:
    """The single stderr line of the last command, which must contain every needle."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# ----------------------------------------------------------------------------- --resume


def test_resume_accepts_options_equal_to_the_saved_ones(tiny, capsys):
    """``--seed 0`` / ``--lr 0.01`` / ``--lr 1e-2`` name the saved values: the strings of the
    command line are resolved before they are compared with what was saved."""
    assert main(["train", *cli_flags({**tiny, "epochs": 1}), "--quiet", "--no-progress"]) == 0
    run = tiny["out"]
    same = [
        "--seed",
        "0",
        "--lr",
        "1e-2",
        "--widths",
        "32",
        "--rule",
        "bp",
        "--normalize",
        "standard",
    ]
    assert main(["train", "--resume", run, "--epochs", "2", *same, "--quiet"]) == 0
    assert "epochs=2" in capsys.readouterr().out
    assert main(["train", "--resume", run, "--epochs", "2", "--lr", "0.01", "--quiet"]) == 0
    capsys.readouterr()
    # a value that differs is still refused, named as its flag
    assert main(["train", "--resume", run, "--epochs", "3", "--seed", "1"]) == EXIT_USER
    one_line(capsys, "cannot change seed when resuming")
    assert main(["train", "--resume", run, "--epochs", "3", "--rule", "danp"]) == EXIT_USER
    one_line(capsys, "cannot change rule, decor when resuming")


def test_resume_takes_a_config_file_in_either_spelling(tiny, tmp_path, capsys):
    assert main(["train", *cli_flags({**tiny, "epochs": 1}), "--quiet", "--no-progress"]) == 0
    cfg = tmp_path / "again.yaml"
    cfg.write_text("batch-size: 64\nepochs: 2\n")  # the saved batch size, dashed
    args = ["train", "--resume", tiny["out"], "--config", str(cfg), "--batch-size", "64"]
    assert main([*args, "--quiet"]) == 0
    assert "epochs=2" in capsys.readouterr().out


# ----------------------------------------------------------------------------- config files


#: What the config-file tests train if the file were accepted: nothing (epochs 0), quickly.
NO_RUN = ["--dataset", "synthetic", "--synthetic-shape", "1,4,4", "--synthetic-train", "64"]
NO_RUN += ["--synthetic-test", "32", "--widths", "4", "--epochs", "0", "--quiet"]


def test_a_config_file_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("rule: bp  # réglage\n".encode("latin-1"))
    run = ["--out", str(tmp_path / "run")]
    assert main(["train", "--config", str(path), *NO_RUN, *run]) == EXIT_USER
    one_line(capsys, "is not UTF-8 text", "byte 0xe9")


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        (
            "spellings.yaml",
            "batch_size: 32\nbatch-size: 64\n",
            "(as 'batch_size' and 'batch-size')",
        ),
        ("twice.yaml", "lr: 0.1\nrule: bp\nlr: 0.2\n", "option lr is given twice"),
        ("twice.json", '{"lr": 0.1, "lr": 0.2}', "option lr is given twice"),
    ],
)
def test_an_option_given_twice_in_one_config_file(tmp_path, capsys, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    run = ["--out", str(tmp_path / "run")]
    assert main(["train", "--config", str(path), *NO_RUN, *run]) == EXIT_USER
    one_line(capsys, needle, str(path))


def test_config_json_is_replaced_atomically(tiny, monkeypatch):
    """A crash while config.json is rewritten (here: the disk fails at fsync) leaves the old
    file whole and no temporary file behind."""
    assert main(["train", *cli_flags({**tiny, "epochs": 1}), "--quiet", "--no-progress"]) == 0
    config = Path(tiny["out"]) / "config.json"
    before = config.read_bytes()

    def disk_fails(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("decorrelate.checkpoint.os.fsync", disk_fails)
    with pytest.raises(OSError, match="No space"):
        main(["train", "--resume", tiny["out"], "--epochs", "2", "--max-loss-growth", "1e4"])
    assert config.read_bytes() == before
    assert json.loads(before)["max_loss_growth"] == 1e3
    assert sorted(p.name for p in config.parent.iterdir() if p.name.startswith(".")) == []


# ----------------------------------------------------------------------------- divergence


def test_a_loss_that_grows_by_orders_of_magnitude_stops_the_run(tiny, capsys):
    """Adam at lr 1e6 drives the loss from 2.3 to ~1e14 and it stays finite: past
    ``max_loss_growth`` (1e3) times the untrained loss the run stops as diverged, exit 3."""
    opts = {**tiny, "lr": 1e6, "epochs": 3}
    assert main(["train", *cli_flags(opts), "--quiet", "--no-progress"]) == EXIT_DIVERGED
    one_line(capsys, "diverged: training loss grew to", "1000x", "epoch 1", "lower --lr")
    from decorrelate.checkpoint import load_checkpoint

    assert load_checkpoint(tiny["out"])["epoch"] == 0  # the last good checkpoint
    # the documented way out: 0 turns the check off, and the finite loss is then trained on
    off = ["--max-loss-growth", "0", "--overwrite", "--quiet", "--no-progress"]
    assert main(["train", *cli_flags(opts), *off]) == 0
    assert "done:" in capsys.readouterr().out
    assert main(["train", *cli_flags(opts), "--max-loss-growth", "1"]) == EXIT_USER
    one_line(capsys, "max-loss-growth", "must be 0 (off) or > 1")


# ----------------------------------------------------------------------------- output


def option_helps(text: str) -> dict[str, str]:
    """``--flag`` → its help text (continuation lines joined) from an argparse help page."""
    helps: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        match = re.match(r"^  (--[a-z0-9-]+)(.*)$", line)
        if match:
            flag = match.group(1)
            helps[flag] = match.group(2)
        elif flag and line.startswith("    "):
            helps[flag] += " " + line.strip()
        else:
            flag = None
    return helps


@pytest.mark.parametrize("command", ["train", "compare"])
def test_help_states_each_default_once(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    helps = option_helps(capsys.readouterr().out)
    assert "--decor-lr" in helps and "--lr" in helps
    doubled = {
        f: h for f, h in helps.items() if "default" in h.split("(default:")[0] and "(default:" in h
    }
    assert doubled == {}
    assert "(default: 0.001)" in helps["--lr"] and "per method" in helps["--decor-lr"]


def test_compare_with_no_jobs_leaves_no_folder(tiny, tmp_path, capsys):
    out = tmp_path / "grid"
    assert main(["compare", *cli_flags({**tiny, "out": str(out)}), "--jobs", "0"]) == EXIT_USER
    one_line(capsys, "--jobs must be at least 1, got 0")
    assert not out.exists()


GATE_SAMPLER = """\
import os, time, torch

def gated(shape, generator, device, dtype):
    # the first training step waits until the test has read a line from the pipe
    while not os.path.exists(os.environ["DECORRELATE_TEST_GATE"]):
        time.sleep(0.01)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)
"""


def test_parallel_runs_print_a_line_per_epoch_into_a_pipe(tiny, tmp_path):
    """``compare --jobs 2`` (what ``make demo`` runs) into a pipe, not a TTY: a worker's epoch
    lines reach the pipe while its run goes on. Training is held at its first step until the
    test has read an epoch-0 line, so a line kept in a buffer (or never sent by the worker)
    fails the test instead of arriving at exit."""
    (tmp_path / "gate_noise.py").write_text(GATE_SAMPLER)
    gate = tmp_path / "open"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as in a shell
    env = {
        **env,
        "DECORRELATE_TEST_GATE": str(gate),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    opts = {**tiny, "out": str(tmp_path / "grid"), "epochs": 2}
    opts["np_noise"] = "gate_noise:gated"
    command = [sys.executable, "-m", "decorrelate", "compare", *cli_flags(opts)]
    command += ["--rules", "np", "--seeds", "0", "--jobs", "2", "--no-progress"]
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    first = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"np seed \d: epoch +0/2", line):
                first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        arrived = first.wait(timeout=120)  # generous: two spawned workers import torch
        gate.touch()
        proc.wait(timeout=120)
    finally:
        gate.touch()
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    assert arrived, lines
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    epochs = [ln for ln in lines if ln.startswith("np seed 0: epoch")]
    assert [int(re.search(r"epoch +(\d)/", ln).group(1)) for ln in epochs] == [0, 1, 2]
    assert any(ln.startswith("[1/1] np seed 0: best test acc") for ln in lines)
