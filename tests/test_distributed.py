"""Multi-process training (torch.distributed, gloo, 2 real processes on localhost) equals one
process with the same global batch: for autograd rules through DDP, rules that write .grad
themselves, decorrelators, node-perturbation noise, shards of unequal size and resume.

Every case runs in float64 (see :data:`DTYPE`, :data:`ATOL`): two processes sum a batch in another
order than one process does, and what these runs compute amplifies that rounding."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from decorrelate import distributed, train
from decorrelate.checkpoint import load_checkpoint
from decorrelate.fixedpoint.config import FixedPointConfig
from decorrelate.fixedpoint.tasks import MODEL_FILE, run_task

WORKER = Path(__file__).with_name("ddp_worker.py")

#: The runs are built and trained in float64. Two processes sum each batch in two shards and
#: all-reduce them; one process sums it at once. The two orders round differently, and the runs
#: amplify that rounding: node perturbation divides loss differences by sigma^2 (here 1e-4), and
#: Adam divides each gradient entry by its own running magnitude, so a tiny entry's relative
#: rounding error becomes its update's. In float32 (unit roundoff u = 6.0e-8) the anp case
#: ended 3.5e-6 apart on one machine and 1.26e-5 apart on another (against a former atol of
#: 1e-5): an amplification of up to 1.26e-5 / 6.0e-8 = 2.1e2 u. That factor belongs to the
#: computation, not the dtype (to first order the error is linear in u), so in float64
#: (u = 1.1e-16) it predicts <= 2.1e2 * 1.1e-16 = 2.3e-14; measured 1.1e-14 for anp and
#: <= 8.2e-16 for every other case, alike under OMP_NUM_THREADS=1 and 2.
DTYPE = torch.float64
#: |two - one| allowed on every state entry: 4e3 times the predicted worst float64 rounding
#: (2.3e-14, above), so another CPU's kernels pass; and 1e6 times below the smallest error of a
#: wrong multi-process rule (mutation checks: shards averaged without their sizes' weights, in
#: train and in the fixed-point loop; each rank drawing its own noise; decorrelator updates
#: from the local rows only: every one moves some entry by >= 1.3e-4).
ATOL = 1e-10
#: Relative slack for the few state entries larger than 1 (running variances): the same bound.
RTOL = 1e-10


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build and train in ``dtype`` (as the workers do) and restore the default afterwards."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


#: 204 examples in batches of 51: every global batch splits 26 / 25, so the exact weighting of
#: unequal shards is exercised at every step.
BASE = {
    "dataset": "synthetic",
    "synthetic_shape": [1, 8, 8],
    "synthetic_train": 204,
    "synthetic_test": 100,
    "widths": [16, 12],
    "batch_size": 51,
    "lr": 0.01,
    "epochs": 2,
    "threads": 1,
}
CASES = {
    "bp": {},
    "bp-scaled": {"decor": "scaled", "decor_lr": 1e-2, "decor_sample_frac": 0.3},
    "fa": {"rule": "fa", "alignment_every": 2},
    "anp": {"rule": "anp", "np_sigma": 1e-2, "decor": "copi", "decor_lr": 1e-2},
    "conv-dfa": {"rule": "dfa", "model": "convnet", "channels": [3, 4], "widths": [8]},
    "bp-resumed": {"resume_from_epoch": 1},
}


#: The fixed-point `linearized` rule on the MNIST task's loop (synthetic data), batches split 32/31.
FIXEDPOINT = {
    "fixedpoint": True,
    "task": "mnist",
    "dataset": "synthetic",
    "train_size": 252,
    "hidden": 16,
    "epochs": 1,
    "batch_size": 63,
    "rule": "linearized",
    "lr": 0.1,
    "log_every": 1,
    "diag_every": 100,
    "dtype": str(DTYPE).removeprefix("torch."),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(two-process run, one-process run) directories per case; the 2-process ones in one launch."""
    root = tmp_path_factory.mktemp("ddp")
    cases = {name: {**BASE, **opts} for name, opts in CASES.items()}
    cases["fixedpoint-linearized"] = dict(FIXEDPOINT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", str(WORKER), str(root / "two"), json.dumps(cases)]
    command.append(str(DTYPE).removeprefix("torch."))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    if done.returncode != 0 and "terminate called without an active exception" in done.stderr:
        # gloo's C++ teardown has been seen to abort a rank at exit, after all its work was
        # done (once in ~10 launches before teardown() gained its barrier): launch once more.
        shutil.rmtree(root / "two", ignore_errors=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    out = {}
    for name, options in cases.items():
        options = {k: v for k, v in options.items() if k not in ("resume_from_epoch", "fixedpoint")}
        with default_dtype(DTYPE):
            if name.startswith("fixedpoint"):
                run_task(FixedPointConfig(**options), root / "one" / name)
            else:
                train({**options, "out": str(root / "one" / name)}, log=None, progress=False)
        out[name] = (root / "two" / name, root / "one" / name)
    return out


def test_fixed_point_rule_under_two_processes_equals_one(runs):
    two, one = (
        torch.load(p / MODEL_FILE, weights_only=False)["model"]
        for p in runs["fixedpoint-linearized"]
    )
    assert not torch.equal(one["W"], two["W"] * 0)
    assert one["W"].dtype == DTYPE
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=RTOL, atol=ATOL, msg=key)
    summaries = [
        json.loads((p / "summary.json").read_text()) for p in runs["fixedpoint-linearized"]
    ]
    assert summaries[0]["best_test_acc"] == pytest.approx(summaries[1]["best_test_acc"])


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_end_where_one_process_does(runs, case):
    """Same state after 2 epochs, to the float64 tolerance derived at :data:`ATOL`.

    The losses are float64 sums of the same float64 numbers (relative 1e-9 is far above their
    rounding, far below any real difference). The alignment angles are ``acos`` of a cosine
    whose rounding (<= 2.3e-14, as above) moves an angle by at most sqrt(2 * 2.3e-14) rad
    = 1.2e-5 degrees (the worst case, near 0 degrees), hence abs 1e-4 degrees.
    """
    two, one = (load_checkpoint(path) for path in runs[case])
    assert two["epoch"] == one["epoch"] == BASE["epochs"]
    assert two["model"].keys() == one["model"].keys()
    for key, value in one["model"].items():
        if key.endswith("stats_rows"):  # diagnostics ring buffer: same rows, other order
            continue
        assert value.dtype in (DTYPE, torch.int64), key
        torch.testing.assert_close(two["model"][key], value, rtol=RTOL, atol=ATOL, msg=key)
    moved = [
        k
        for k, v in one["model"].items()
        if k.endswith(".R") and not torch.equal(v, torch.eye(v.shape[-1]))
    ]
    if case in ("bp-scaled", "anp"):
        assert moved, "the decorrelators should have learned"
    for a, b in zip(two["history"], one["history"], strict=True):
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1e-9)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
    if case == "fa":  # angles use the global batch's BP gradient on every rank
        for a, b in zip(two["alignment"], one["alignment"], strict=True):
            for key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_only_rank_zero_writes_and_the_config_is_recorded(runs):
    two, _ = runs["bp"]
    assert sorted(p.name for p in two.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "metrics.jsonl",
    ]


def test_shards_cover_the_batch_and_too_small_batches_are_refused():
    bounds = [distributed.shard_bounds(51, 2, r) for r in range(2)]
    assert bounds == [(0, 26), (26, 25)]
    assert [distributed.shard_bounds(10, 4, r) for r in range(4)] == [
        (0, 3),
        (3, 3),
        (6, 2),
        (8, 2),
    ]
    with pytest.raises(Exception, match="smaller than the 4 processes"):
        distributed.check_batch_size(3, 4)


def test_nproc_relaunches_the_same_command_under_torchrun(monkeypatch):
    from torch.distributed import run as torchrun

    from decorrelate import cli

    seen = []
    monkeypatch.setattr(torchrun, "run", lambda args: seen.append(args))
    argv = ["train", "--nproc", "3", "--rule", "anp", "--nproc=3", "--epochs", "1"]
    assert cli.main(argv) == 0
    (args,) = seen  # torchrun's own arguments, run by its agent in the launching process
    assert args.standalone and args.nproc_per_node == "3"
    assert args.module and args.training_script == "decorrelate"
    assert args.training_script_args == ["train", "--rule", "anp", "--epochs", "1"]
    assert cli.main(["train", "--nproc", "0"]) == cli.EXIT_USER
