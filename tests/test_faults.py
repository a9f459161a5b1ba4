"""Faults end in one line and leave the run directory sound (issue 14, items 3-7).

* a worker of ``decorrelate train --nproc 2`` killed (SIGKILL) or frozen (SIGSTOP past
  ``--dist-timeout``), and SIGTERM to the launcher: one line, non-zero exit, no process left;
* a checkpoint never makes us import code (a module that would write a marker file);
* an explicit data location is authoritative (no silent fall-back to another copy);
* a run directory is locked: a second process on the same ``--out`` gets one line, and a lock
  never outlives its process (``kill -9``);
* a zero-byte checkpoint, weights that do not fit their config, a sampler with the wrong
  signature: one line, exit code 2.

The multi-process cases wait on conditions (a metrics row written, a process gone), never on
sleeps; every wait has a generous timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from decorrelate import cli, train
from decorrelate.checkpoint import CHECKPOINT, CONFIG, METRICS, load_checkpoint

LINUX_PROC = Path("/proc/self/environ").exists()
needs_proc = pytest.mark.skipif(not LINUX_PROC, reason="finds worker processes through /proc")

#: Small enough that an epoch takes milliseconds; many epochs, so the run is still going
#: whenever the test acts on it.
TINY = [
    "--dataset", "synthetic", "--synthetic-shape", "1,4,4", "--synthetic-train", "64",
    "--synthetic-test", "32", "--widths", "8", "--batch-size", "16", "--threads", "1",
    "--device", "cpu", "--no-progress", "--quiet",
]  # fmt: skip
WAIT = 120.0  # seconds: generous upper bound for any condition below


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """``decorrelate ARGS`` in the background, stderr to ``log``.

    A file, not a pipe: a worker that outlived its launcher (the bug under test) would hold a
    pipe open, and reading it would wait for that worker instead of the launcher.
    """
    command = [sys.executable, "-m", "decorrelate", *args]
    with open(log, "w") as err:
        proc = subprocess.Popen(
            command, env=_env(), stdout=subprocess.DEVNULL, stderr=err, text=True
        )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _wait_for(condition, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if proc is not None and proc.poll() is not None:
            err = proc.log.read_text()  # type: ignore[attr-defined]
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: {err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _rows(run: Path) -> int:
    try:
        return len((run / METRICS).read_text().splitlines())
    except OSError:
        return 0


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    """The launcher's exit code and stderr, once it has ended."""
    try:
        proc.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the job did not end") from None
    return proc.returncode, proc.log.read_text()  # type: ignore[attr-defined]


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _workers(launcher: int) -> dict[int, int]:
    """{rank: pid} of the processes whose parent is ``launcher`` and that have a RANK."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry.name)
    return found


@pytest.fixture
def launch_two():
    """Start ``decorrelate train --nproc 2`` on a long tiny run; returns (launcher, {rank: pid})
    once it has logged two epochs. Whatever is left afterwards is killed (the workers run in
    sessions of their own, so this is the only way a failing test cleans them up)."""
    started: list[int] = []

    def launch(run: Path, *extra: str) -> tuple[subprocess.Popen, dict[int, int]]:
        args = ["train", "--nproc", "2", *TINY, "--epochs", "100000", "--out", str(run), *extra]
        proc = _start(args, run.parent / "launcher.err")
        started.append(proc.pid)
        _wait_for(lambda: _rows(run) >= 2, "two metrics rows", proc)
        workers = _workers(proc.pid)
        started.extend(workers.values())
        assert sorted(workers) == [0, 1], workers
        return proc, workers

    yield launch
    for pid in started:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- item 3


@needs_proc
def test_a_killed_worker_ends_the_job_in_one_line(tmp_path, launch_two):
    run = tmp_path / "run"
    proc, workers = launch_two(run)
    os.kill(workers[1], signal.SIGKILL)
    code, err = _finish(proc)
    line = _one_line(err)
    assert code == 4, err
    assert "peer process died" in line and "rank 1 ended by SIGKILL" in line
    assert "last checkpoint is kept" in line
    assert not any(_alive(pid) for pid in workers.values())
    assert load_checkpoint(run)["epoch"] >= 1  # the last checkpoint is whole


@needs_proc
def test_a_frozen_worker_ends_the_job_after_the_timeout_in_one_line(tmp_path, launch_two):
    run = tmp_path / "run"
    proc, workers = launch_two(run, "--dist-timeout", "2")
    os.kill(workers[1], signal.SIGSTOP)
    try:
        # rank 0 gives up after --dist-timeout and leaves without a second barrier
        _wait_for(lambda: not _alive(workers[0]), "rank 0 to give up")
    finally:
        os.kill(workers[1], signal.SIGCONT)  # thawed, it takes the launcher's SIGTERM
    code, err = _finish(proc)
    line = _one_line(err)
    assert code == 4, err
    assert "stopped responding" in line and "rank 0 lost its peers" in line
    assert not any(_alive(pid) for pid in workers.values())
    load_checkpoint(run)


class _Failure:
    """What the agent reports for one failed worker (exit code, and signal for negative ones)."""

    def __init__(self, exitcode: int):
        self.exitcode = exitcode

    def signal_name(self) -> str:
        return signal.Signals(-self.exitcode).name


@pytest.mark.parametrize(
    "codes, expected, says",
    [
        # rank 0 gave up on a frozen rank 1, which took the agent's SIGTERM once thawed (CI saw
        # this order: 143 must not pass for an error rank 1 had reported itself)
        ({0: 4, 1: 128 + signal.SIGTERM}, 4, "rank 0 lost its peers; rank 1 ended by SIGTERM"),
        ({0: 4, 1: -signal.SIGKILL}, 4, "rank 1 ended by SIGKILL"),
        ({0: 4, 1: 4}, 4, "rank 0 lost its peers; rank 1 lost its peers"),
        ({0: cli.EXIT_USER, 1: 128 + signal.SIGTERM}, cli.EXIT_USER, None),  # rank 0 said why
        ({0: 128 + signal.SIGTERM, 1: cli.EXIT_DIVERGED}, cli.EXIT_DIVERGED, None),
    ],
)
def test_the_launcher_reports_lost_peers_once_and_passes_on_own_errors(
    codes, expected, says, capsys
):
    failures = {rank: _Failure(code) for rank, code in codes.items()}
    assert cli._report_failure(failures) == expected
    err = capsys.readouterr().err
    if says is None:
        assert err == ""
    else:
        assert says in _one_line(err) and "the last checkpoint is kept" in err


@needs_proc
def test_sigterm_to_the_launcher_stops_and_waits_for_every_worker(tmp_path, launch_two, capsys):
    run = tmp_path / "run"
    proc, workers = launch_two(run)
    # while it runs, rank 0 holds the run directory
    assert cli.main(["train", "--resume", str(run), "--epochs", "100001"]) == cli.EXIT_USER
    assert "in use by another decorrelate run" in _one_line(capsys.readouterr().err)
    os.kill(proc.pid, signal.SIGTERM)
    code, err = _finish(proc)
    line = _one_line(err)
    assert code == 128 + signal.SIGTERM, err
    assert "interrupted (SIGTERM)" in line
    # the launcher waited for its workers: none trains on or writes after it ended
    assert not any(_alive(pid) for pid in workers.values())
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temp files
    load_checkpoint(run)


def test_sigterm_to_a_single_process_run_unwinds_like_ctrl_c(tmp_path):
    run = tmp_path / "run"
    proc = _start(["train", *TINY, "--epochs", "100000", "--out", str(run)], tmp_path / "err")
    try:
        _wait_for(lambda: _rows(run) >= 2, "two metrics rows", proc)
        proc.send_signal(signal.SIGTERM)
        code, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + signal.SIGTERM
    assert "interrupted" in _one_line(err)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temp files
    load_checkpoint(run)


# ----------------------------------------------------------------------------- item 4

#: A "sampler" module that leaves a marker file the moment it is imported.
EVIL = """
from pathlib import Path
Path({marker!r}).write_text("imported")

def sample(shape, generator, device, dtype):
    import torch
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)
"""


def _tiny_run(tmp_path: Path, **options) -> Path:
    config = {
        "dataset": "synthetic",
        "synthetic_shape": [1, 4, 4],
        "synthetic_train": 64,
        "synthetic_test": 32,
        "widths": [8],
        "batch_size": 16,
        "threads": 1,
        "epochs": 1,
        "out": str(tmp_path / "run"),
        **options,
    }
    return train(config, log=None, progress=False).out


def _plant(run: Path, module: str, **config) -> Path:
    """Rewrite the run's checkpoint config (as an attacker could) and drop ``module`` beside it."""
    marker = run.parent / f"{module}.imported"
    (run / f"{module}.py").write_text(EVIL.format(marker=str(marker)))
    state = torch.load(run / CHECKPOINT, weights_only=True)
    state["config"].update(config)
    torch.save(state, run / CHECKPOINT)
    return marker


@pytest.mark.parametrize("rule", ["bp", "np"])
def test_a_checkpoint_never_imports_the_sampler_it_names(tmp_path, monkeypatch, capsys, rule):
    run = _tiny_run(tmp_path, rule=rule)
    module = f"planted_sampler_{rule}"
    marker = _plant(run, module, np_noise=f"{module}:sample")
    monkeypatch.syspath_prepend(str(run))  # importable, as from a run directory used as cwd
    assert cli.main(["eval", str(run)]) == 0
    assert "acc" in capsys.readouterr().out
    # resuming asks the user to name the sampler themselves
    assert cli.main(["train", "--resume", str(run), "--epochs", "2"]) == cli.EXIT_USER
    line = _one_line(capsys.readouterr().err)
    assert f"--np-noise {module}:sample" in line
    assert not marker.exists() and module not in sys.modules
    if rule == "np":  # named on the command line, the user's own sampler is used
        args = ["train", "--resume", str(run), "--epochs", "2", "--np-noise", f"{module}:sample"]
        assert cli.main(args) == 0
        assert marker.exists() and load_checkpoint(run)["epoch"] == 2


def test_a_checkpoint_holding_python_objects_is_refused_without_pytorchs_advice(tmp_path, capsys):
    import argparse

    path = tmp_path / "odd.pt"
    torch.save({"format": 1, "config": argparse.Namespace(a=1)}, path)
    assert cli.main(["eval", str(path)]) == cli.EXIT_USER
    line = _one_line(capsys.readouterr().err)
    assert "argparse.Namespace" in line and "refused" in line
    assert "weights_only" not in line and "trust" not in line


# ----------------------------------------------------------------------------- item 5


def _idx_names(folder: Path, skip: str | None = None) -> None:
    """The four MNIST file names (content irrelevant: presence is checked before reading)."""
    from decorrelate.data import IDX_FILES

    folder.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        if name != skip:
            (folder / name).write_bytes(b"not read")


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A complete-looking MNIST in ./data, the copy a silent fall-back would have used."""
    from decorrelate import data

    cwd = tmp_path / "cwd"
    _idx_names(cwd / "data" / "mnist")
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(data.locate, "SHARED_FALLBACK_ROOTS", [])
    monkeypatch.delenv("DECORRELATE_DATA", raising=False)
    monkeypatch.setenv("DECORRELATE_NO_DOWNLOAD", "1")
    return cwd


def test_a_missing_data_dir_is_an_error_naming_it(elsewhere, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    out = tmp_path / "out"
    args = ["train", "--dataset", "mnist", "--data-dir", str(missing), "--out", str(out)]
    assert cli.main(args) == cli.EXIT_USER
    line = _one_line(capsys.readouterr().err)
    assert f"--data-dir {missing}" in line and "does not exist" in line
    assert not (out / CONFIG).exists()  # nothing records a path that was not used


def test_an_incomplete_decorrelate_data_is_an_error_naming_the_file(
    elsewhere, tmp_path, monkeypatch, capsys
):
    partial = tmp_path / "partial"
    _idx_names(partial / "mnist", skip="t10k-labels-idx1-ubyte.gz")
    monkeypatch.setenv("DECORRELATE_DATA", str(partial))
    assert cli.main(["train", "--dataset", "mnist", "--out", str(tmp_path / "out")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"DECORRELATE_DATA {partial}" in line
    assert "lacks t10k-labels-idx1-ubyte.gz" in line


# ----------------------------------------------------------------------------- item 6


def test_a_second_run_on_the_same_directory_gets_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *TINY, "--epochs", "100000", "--seed", "1", "--out", str(run)]
    first = _start(args, tmp_path / "first.err")
    try:
        _wait_for(lambda: _rows(run) >= 2, "the first run to write", first)
        for args in (
            ["train", *TINY, "--epochs", "1", "--seed", "2", "--out", str(run), "--overwrite"],
            ["train", "--resume", str(run), "--epochs", "100001"],
        ):
            assert cli.main(args) == cli.EXIT_USER
            line = _one_line(capsys.readouterr().err)
            assert "in use by another decorrelate run" in line
        assert first.poll() is None  # the first run is untouched and trains on
    finally:
        os.kill(first.pid, signal.SIGKILL)  # no cleanup at all: the OS drops the lock
        first.wait()
    assert json.loads((run / CONFIG).read_text())["seed"] == 1
    assert load_checkpoint(run)["config"]["seed"] == 1
    # no stale lock: a new run may take the directory at once
    args = ["train", *TINY, "--epochs", "1", "--seed", "2", "--out", str(run), "--overwrite"]
    assert cli.main(args) == 0
    assert load_checkpoint(run)["config"]["seed"] == 2
    assert json.loads((run / CONFIG).read_text())["seed"] == 2


# ----------------------------------------------------------------------------- item 7


def test_a_zero_byte_or_incomplete_checkpoint_is_one_line(tmp_path, capsys):
    for content, message in ((b"", "is empty"), (None, "lacks config, model")):
        if content is None:
            torch.save({"format": 1, "epoch": 3, "history": []}, tmp_path / CHECKPOINT)
        else:
            (tmp_path / CHECKPOINT).write_bytes(content)
        for args in (["eval", str(tmp_path)], ["train", "--resume", str(tmp_path)]):
            assert cli.main(args) == cli.EXIT_USER
            assert message in _one_line(capsys.readouterr().err)


def test_weights_that_do_not_fit_their_config_are_one_line(tmp_path, capsys):
    run = _tiny_run(tmp_path)
    state = torch.load(run / CHECKPOINT, weights_only=True)
    state["config"]["widths"] = [5]
    torch.save(state, run / CHECKPOINT)
    for args in (["eval", str(run)], ["train", "--resume", str(run), "--epochs", "2"]):
        assert cli.main(args) == cli.EXIT_USER
        line = _one_line(capsys.readouterr().err)
        assert "do not match" in line and "size mismatch" in line


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("def sample(shape):\n    return torch.zeros(shape)", "must take (shape, generator"),
        ("def sample(shape, g, device, dtype):\n    return torch.zeros(3)", "returned shape"),
        ("def sample(shape, g, device, dtype):\n    return 0.5", "must return a torch.Tensor"),
        ("def sample(shape, g, device, dtype):\n    raise ValueError('no')", "ValueError: no"),
    ],
)
def test_a_sampler_breaking_its_contract_is_one_line(tmp_path, monkeypatch, capsys, body, message):
    module = f"contract_{abs(hash(body))}"
    (tmp_path / f"{module}.py").write_text(f"import torch\n{body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["train", *TINY, "--rule", "np", "--np-noise", f"{module}:sample", "--epochs", "1"]
    assert cli.main([*args, "--out", str(tmp_path / "run")]) == cli.EXIT_USER
    line = _one_line(capsys.readouterr().err)
    assert message in line and f"{module}:sample" in line


def test_an_interrupt_during_a_checkpoint_write_arrives_after_the_file_is_in_place(tmp_path):
    """A SIGTERM handler that raises (as ``train``'s does) must not fire inside torch.save's
    zip writer, which turns it into a traceback of its own and leaves the new file unwritten:
    the signal comes during the first bytes written, and is raised once the file is in place."""
    from decorrelate.checkpoint import CHECKPOINT, atomic_write_bytes, load_checkpoint

    class Stop(BaseException):
        pass

    def stop(signum, frame):
        raise Stop

    class SignalOnFirstWrite:
        def __init__(self, f):
            self.f, self.sent = f, False

        def write(self, data):
            if not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGTERM)
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    path = tmp_path / CHECKPOINT
    old = {"format": 1, "config": {}, "model": {"w": torch.zeros(3)}, "epoch": 1, "history": []}
    atomic_write_bytes(path, lambda f: torch.save(old, f))
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stop):
            atomic_write_bytes(
                path, lambda f: torch.save({**old, "epoch": 2}, SignalOnFirstWrite(f))
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert load_checkpoint(tmp_path)["epoch"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
