"""The paper's training tasks, both driven by the one :class:`~.loop.StepLoop`.

* ``linear-teacher`` (experiment a): N = 200 units, m = 100 drives X ~ 0.1·N(0, 1) fed in
  directly, teacher Ŵ = 0.5·N(0, 1)/√N, targets r̂ = (I − Ŵ)⁻¹X + 0.01·noise, student
  W₀ = 0.75·N(0, 1)/√N, loss ⟨‖r* − r̂‖²⟩ (the paper's J, no ½, so its learning rates carry
  over), full-batch plain gradient descent for ``steps`` iterations.
* ``mnist`` (experiment c): 300 tanh units, fixed random W_x and readout, only W trained,
  cross-entropy, batch 512, ``epochs`` epochs of plain SGD (``dataset`` may also be
  fashion-mnist, or synthetic for quick checks). Each epoch ends with a test evaluation row.

Where the authors' MNIST script (``Train_MNIST_Model.py``) departs from the paper, the paper's form
is what runs here: (1) it evaluates a test batch before calling ``Set_Grad`` and passes that
batch's ``r, X, Y, Yhat`` on, so its dW1/dW3/dW4 updates are computed on test batches (BPTT, which
calls ``Loss.backward()`` on the training loss, is unaffected); here every rule updates on the
training batch. (2) Its final test accuracy feeds ``test_dataset.data`` as raw 0–255 values while
training saw [0, 1] pixels. (3) Its fixed point is 500 Euler steps of dt/τ = 0.01, a few percent
off; here a solver with a tolerance (``--solver euler`` reproduces theirs).

Each returns a :class:`RunOutcome`; divergence is part of the outcome (a sweep records it), never
an exception here. A run directory receives ``config.json``, ``metrics.jsonl`` (one row per
logging interval, plus one per epoch for MNIST), ``summary.json`` and ``model.pt`` (the final
network, written atomically; for a diverged run, the weights at the step where it stopped).
Everything random comes from generators derived from ``seed``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import checkpoint as ckpt
from .. import distributed as dist
from ..data import epoch_order, load_dataset
from ..errors import TrainingDiverged, UserError
from ..losses import Loss
from ..rules.base import rule_class
from ..seeding import make_generator
from .config import FixedPointConfig
from .loop import StepDiverged, StepLoop
from .losses import TargetLoss
from .model import RateRNN
from .rules import FIXEDPOINT_RULES, FixedPointRule

Log = Callable[[str], None]

#: The teacher task's scales (the paper's setup).
TEACHER_INPUT_STD = 0.1
TEACHER_WEIGHT_SCALE = 0.5
TEACHER_NOISE_STD = 0.01
#: The trained network (state dict and config) saved in every run directory.
MODEL_FILE = "model.pt"
#: What ``model.pt`` holds (for :func:`~decorrelate.checkpoint.load_checkpoint`'s ``require``).
MODEL_KEYS = ("config", "model")
#: The synthetic stand-in for MNIST (quick checks and tests): 8×8 inputs, 10 classes.
SYNTHETIC = {"synthetic_shape": (1, 8, 8), "synthetic_train": 2000, "synthetic_test": 500}


# ----------------------------------------------------------------------------- building blocks


def build_rule(cfg: FixedPointConfig) -> FixedPointRule:
    """The fixed-point rule named ``cfg.rule`` (``reparam`` gets η = ``cfg.lr``)."""
    if cfg.rule not in FIXEDPOINT_RULES:
        raise UserError(
            f"rule {cfg.rule!r} does not train a fixed-point network; choose one of: "
            f"{', '.join(FIXEDPOINT_RULES)}"
        )
    rule = rule_class(cfg.rule).from_config(cfg)
    assert isinstance(rule, FixedPointRule)
    return rule


def build_model(cfg: FixedPointConfig, inputs: int | None, outputs: int | None) -> RateRNN:
    """The rate network of ``cfg``, with W, W_x and the readout drawn from the run seed."""
    assert cfg.hidden is not None and cfg.activation is not None and cfg.w_scale is not None
    return RateRNN(
        cfg.hidden,
        inputs,
        outputs,
        activation=cfg.activation,
        w_scale=cfg.w_scale,
        readout_scale=cfg.readout_scale,
        solver=cfg.solver_config,
        generator=make_generator(cfg.seed, "fixedpoint-model"),
        dtype=cfg.torch_dtype,
    )


def build_optimizer(cfg: FixedPointConfig, model: RateRNN) -> torch.optim.Optimizer:
    """Plain SGD (the paper's choice, default) or Adam on W."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam([model.W], lr=cfg.lr)
    return torch.optim.SGD([model.W], lr=cfg.lr, momentum=cfg.momentum)


@dataclass
class RunOutcome:
    """The result of one run: its metrics rows and the numbers a sweep table needs."""

    config: FixedPointConfig
    rows: list[dict[str, Any]]
    diverged: str | None = None
    diverged_at: int | None = None
    steps: int = 0
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """The last logged training loss; ``inf`` if the run diverged."""
        if self.diverged:
            return math.inf
        losses = [r["loss"] for r in self.rows if "loss" in r]
        return losses[-1] if losses else math.nan


def first_step_below(rows: list[dict[str, Any]], key: str, threshold: float) -> int | None:
    """The first logged step whose ``key`` is below ``threshold`` (None if never)."""
    for row in rows:
        value = row.get(key)
        if value is not None and "step" in row and value < threshold:
            return int(row["step"])
    return None


def _finish(
    cfg: FixedPointConfig,
    loop: StepLoop,
    out: Path | None,
    diverged: StepDiverged | None,
    extra: dict[str, Any],
) -> RunOutcome:
    """Write the metrics and build the outcome (shared by both tasks)."""
    loop.flush()
    step_rows = [r for r in loop.rows if "loss" in r]
    final = loop.final_diagnostics()  # of the final W, not of the last diagnostic row
    eigs = [r["max_re_eig_W"] for r in step_rows if r.get("max_re_eig_W") is not None]
    if final["max_re_eig_W_final"] is not None:
        eigs.append(final["max_re_eig_W_final"])
    outcome = RunOutcome(
        config=cfg,
        rows=loop.rows,
        diverged=str(diverged) if diverged else None,
        diverged_at=diverged.step if diverged else None,
        steps=loop.steps,
        seconds=loop.seconds,
    )
    outcome.summary = {
        "rule": cfg.rule,
        "lr": cfg.lr,
        "activation": cfg.activation,
        "final_loss": outcome.final_loss,
        "diverged": outcome.diverged,
        "diverged_at": outcome.diverged_at,
        f"steps_to_loss_{cfg.loss_threshold:g}": first_step_below(
            step_rows, "loss", cfg.loss_threshold
        ),
        **final,
        "max_re_eig_W_max": max(eigs) if eigs else None,
        "max_residual": max((r.get("residual", 0.0) for r in step_rows), default=None),
        "nonconverged_total": loop.unsettled,  # over every training step, not just logged ones
        "steps": loop.steps,
        "seconds": loop.seconds,
        **extra,
    }
    if out is not None:
        ckpt.save_checkpoint(
            out / MODEL_FILE, {"model": loop.model.state_dict(), "config": cfg.to_dict()}
        )
        ckpt.atomic_write_bytes(
            out / "summary.json",
            lambda f: f.write((json.dumps(json_safe(outcome.summary), indent=2) + "\n").encode()),
        )
    return outcome


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats (an ``inf`` final loss) written as strings, for JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def prepare_run_dir(cfg: FixedPointConfig, out: str | Path | None) -> Path | None:
    """Create the run directory and save the resolved config there (None: write nothing)."""
    if out is None or not dist.is_main():  # several processes: rank 0 writes
        return None
    path = ckpt.prepare_out_dir(out)
    text = json.dumps(json_safe(cfg.to_dict()), indent=2) + "\n"
    ckpt.atomic_write_bytes(path / ckpt.CONFIG, lambda f: f.write(text.encode()))
    return path


def _make_loop(cfg: FixedPointConfig, model: RateRNN, loss: Any, out: Path | None) -> StepLoop:
    rule = build_rule(cfg)
    rule.attach(model, loss, make_generator(cfg.seed, "rule"))
    assert cfg.log_every is not None and cfg.diag_every is not None
    return StepLoop(
        model,
        rule,
        build_optimizer(cfg, model),
        log_every=cfg.log_every,
        diag_every=cfg.diag_every,
        eig_samples=cfg.eig_samples,
        metrics_path=None if out is None else out / ckpt.METRICS,
    )


# ----------------------------------------------------------------------------- linear teacher


class TeacherData(NamedTuple):
    """The teacher task: drives ``X`` [m, N], targets [m, N] and the teacher's Ŵ [N, N]."""

    X: Tensor
    target: Tensor
    teacher: Tensor


def make_teacher(hidden: int, samples: int, seed: int, dtype: torch.dtype) -> TeacherData:
    """Drives X ~ 0.1·N(0,1), Ŵ = 0.5·N(0,1)/√N, targets (I − Ŵ)⁻¹X + 0.01·noise (row form)."""
    gen = make_generator(seed, "teacher")
    X = TEACHER_INPUT_STD * torch.randn(samples, hidden, generator=gen, dtype=dtype)
    teacher = TEACHER_WEIGHT_SCALE * torch.randn(hidden, hidden, generator=gen, dtype=dtype)
    teacher /= math.sqrt(hidden)
    eye = torch.eye(hidden, dtype=dtype)
    clean = torch.linalg.solve(eye - teacher, X.T).T
    noise = TEACHER_NOISE_STD * torch.randn(samples, hidden, generator=gen, dtype=dtype)
    return TeacherData(X, clean + noise, teacher)


def run_linear_teacher(cfg: FixedPointConfig, out: str | Path | None = None) -> RunOutcome:
    """Full-batch training on the teacher task for ``cfg.steps`` iterations."""
    cfg = cfg.resolved()
    path = prepare_run_dir(cfg, out)
    assert cfg.hidden is not None
    data = make_teacher(cfg.hidden, cfg.samples, cfg.seed, cfg.torch_dtype)
    model = build_model(cfg, inputs=None, outputs=None)
    loop = _make_loop(cfg, model, TargetLoss(), path)
    diverged = None
    try:
        for _ in range(cfg.steps):
            loop.step(data.X, data.target)
    except StepDiverged as err:
        diverged = err
    return _finish(cfg, loop, path, diverged, {})


# ----------------------------------------------------------------------------- MNIST


def run_mnist(cfg: FixedPointConfig, out: str | Path | None = None) -> RunOutcome:
    """``cfg.epochs`` epochs of minibatch SGD on W; test loss/accuracy after every epoch.

    Under torchrun each rank trains on its shard of every batch (see
    :mod:`decorrelate.distributed`).
    """
    dist.setup("cpu")  # no-op unless launched by torchrun
    cfg = cfg.resolved()
    path = prepare_run_dir(cfg, out)
    extra = SYNTHETIC if cfg.dataset == "synthetic" else {}
    splits = load_dataset(
        cfg.dataset,
        data_dir=cfg.data_dir,
        train_size=cfg.train_size,
        normalize=cfg.normalize,
        **extra,
    )
    train, test = splits.train, splits.test
    inputs = math.prod(train.input_shape)
    model = build_model(cfg, inputs=inputs, outputs=train.num_classes)
    loss = Loss("cross-entropy")
    loop = _make_loop(cfg, model, loss, path)
    diverged = None
    best: dict[str, float | None] = {"best_train_acc": None, "best_test_acc": None}
    try:
        loop.record(_epoch_row(0, model, loss, test, cfg, None, loop))
        for epoch in range(1, cfg.epochs + 1):
            order = epoch_order(len(train), cfg.seed, epoch)
            total = torch.zeros((), dtype=torch.float64)
            correct = torch.zeros((), dtype=torch.int64)
            unsettled = torch.zeros((), dtype=torch.int64)
            for x, y, shard in dist.shard_batches(train, cfg.batch_size, order):
                out = loop.step(x, y, shard, epoch=epoch)
                settled = loop.settled()
                total += out.loss.double() * int(settled.sum())
                correct += ((out.output.argmax(-1) == y) & settled).sum()
                unsettled += (~settled).sum()
            sums = dist.all_sum(torch.stack([total, correct.double(), unsettled.double()]))
            total, correct, unsettled = sums[0], int(sums[1]), int(sums[2])
            running = {
                "train_loss": float(total) / max(1, len(train) - int(unsettled)),
                "train_acc": float(correct) / len(train),
                "train_nonconverged": int(unsettled),
            }
            row = _epoch_row(epoch, model, loss, test, cfg, running, loop)
            loop.record(row)
            loop.flush()
            for key in ("train_acc", "test_acc"):  # None until an epoch is complete
                best[f"best_{key}"] = max(best[f"best_{key}"] or 0.0, row[key])
    except StepDiverged as err:
        diverged = err
    return _finish(cfg, loop, path, diverged, best)


def _epoch_row(
    epoch: int,
    model: RateRNN,
    loss: Loss,
    test: Any,
    cfg: FixedPointConfig,
    running: dict[str, Any] | None,
    loop: StepLoop,
) -> dict[str, Any]:
    """Test metrics after an epoch (and the running training loss/accuracy of that epoch)."""
    start = time.perf_counter()
    try:
        test_loss, test_acc, unsettled = evaluate_fixed_points(model, test, loss, cfg.batch_size)
    except TrainingDiverged as err:  # a test batch whose fixed point cannot be found
        loop.flush()
        raise StepDiverged(f"test evaluation after epoch {epoch}: {err}", loop.steps) from None
    row: dict[str, Any] = {"epoch": epoch, "step": loop.steps, **(running or {})}
    row.update(test_loss=test_loss, test_acc=test_acc, test_nonconverged=unsettled)
    row.update(seconds=loop.seconds, eval_seconds=time.perf_counter() - start)
    return row


@torch.no_grad()
def evaluate_fixed_points(
    model: RateRNN, data: Any, loss: Loss, batch_size: int
) -> tuple[float, float, int]:
    """Mean loss, accuracy and the number of inputs whose fixed point was not found.

    Under the solver policy ``raise`` any such input stops the evaluation. Under ``skip`` it
    counts as an error in the accuracy and is left out of the mean loss: the output of a network
    that does not settle is never used.
    """
    sums = torch.zeros(3, dtype=torch.float64)  # loss, correct, unsettled
    # several processes: a share each
    for x, y in data.batches(batch_size, order=dist.shard_order(len(data))):
        fp = model.fixed_point(x)
        ok = fp.usable
        out = model.read(fp.r)
        sums[0] += loss(out[ok], y[ok], reduction="sum").double()
        sums[1] += ((out.argmax(-1) == y) & ok).sum()
        sums[2] += fp.num_failed
    total, correct, failed = dist.all_sum(sums).tolist()
    unsettled = int(failed)
    n = max(1, len(data))
    return float(total) / max(1, n - unsettled), float(correct) / n, unsettled


TASK_RUNNERS: dict[str, Callable[[FixedPointConfig, str | Path | None], RunOutcome]] = {
    "linear-teacher": run_linear_teacher,
    "mnist": run_mnist,
}


def run_task(cfg: FixedPointConfig, out: str | Path | None = None) -> RunOutcome:
    """Run the training task ``cfg.task`` (linear-teacher or mnist)."""
    runner = TASK_RUNNERS.get(cfg.task)
    if runner is None:
        raise UserError(f"task {cfg.task!r} is not a training task; choose linear-teacher or mnist")
    return runner(cfg, out)


# ----------------------------------------------------------------------------- one line per run


def stability_warning(summary: Mapping[str, Any]) -> str | None:
    """One warning line if a run that did not diverge ends with an unstable W (else None).

    ``summary``: a run's summary (:attr:`RunOutcome.summary`, ``summary.json``). The solver can
    return a fixed point that the dynamics never reach (a linear network's r = (I − W)⁻¹X exists
    whenever I − W is invertible), so a finite loss does not show this.
    """
    s = summary
    if s.get("diverged") or not s.get("final_unstable"):
        return None
    head = f"warning: rule {s['rule']}, lr {float(s['lr']):g}: the final W is unstable"
    state = s.get("final_stability")
    if state == "no fixed point":
        return f"{head}: the solver finds no fixed point for some inputs of the last batch"
    eig, eig_gw = s.get("max_re_eig_W_final"), s.get("max_re_eig_GW_final")
    if state == "non-finite W" or eig is None:
        return f"{head} ({state})"
    if s.get("activation", "identity") == "identity":
        what = f"max Re λ(W) = {eig:.4g} ≥ 1"
    else:
        what = f"max Re λ(G·W) = {eig_gw:.4g} ≥ 1 at the last batch's fixed points"
        what += f" (max Re λ(W) = {eig:.4g})"
    return f"{head} ({what}): its fixed point is not an attractor of the dynamics"


def describe(summary: Mapping[str, Any]) -> str:
    """One line per run (from its summary): the rule, lr and how it ended."""
    s = summary
    head = f"{s['rule']:>13} lr {float(s['lr']):<6g}"
    seconds = float(s.get("seconds", 0.0))
    if s.get("diverged"):
        return f"{head} diverged at step {s.get('diverged_at')}  [{seconds:.1f}s]"
    text = f"{head} final loss {float(s['final_loss']):.3e}"
    if s.get("best_test_acc") is not None:
        text += f"  best train/test acc {s['best_train_acc']:.4f}/{s['best_test_acc']:.4f}"
    if s.get("max_re_eig_W_final") is not None:
        text += (
            f"  max Re eig W max/final {s['max_re_eig_W_max']:.4g}/{s['max_re_eig_W_final']:.4g}"
        )
    if s.get("final_unstable"):
        text += "  UNSTABLE"
    return text + f"  [{seconds:.1f}s]"
