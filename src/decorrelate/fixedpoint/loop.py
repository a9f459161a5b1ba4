"""The one step loop of the fixed-point tasks: backward → optimizer step → diagnostics → row.

Per step: ``rule.backward`` solves the batch's fixed points and fills ``W.grad``; the optimizer
applies it; every ``log_every`` steps a metrics row is recorded (loss, accuracy for
classification, solver residual/iterations/non-converged count), and every ``diag_every`` steps
it also carries the costlier diagnostics: max Re λ(W), max Re λ(G·W) over a few samples, and the
angle between the rule's update and the Euclidean gradient at the same W (measured before the
step). Rows are flushed to ``metrics.jsonl`` now and then and whenever the run ends.
:meth:`StepLoop.final_diagnostics` evaluates the stability of the W the run *ends* with (the
last diagnostic row can be up to ``diag_every`` steps older than that).

A run that goes wrong — non-finite loss or weights, or a fixed point the solver cannot find —
ends with :class:`StepDiverged`, whose message names the rule, the learning rate and the step.
The task functions turn that into a result (a sweep records "diverged at step k"), and the CLI
into one line and exit code 3.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

from .. import checkpoint as ckpt
from .. import distributed as dist
from ..errors import TrainingDiverged
from ..rules.base import StepOutput
from .diagnostics import angle_degrees, max_real_eig, max_real_eig_gain
from .gradients import euclidean_gradient
from .model import RateRNN
from .rules import FixedPointRule, loss_and_delta

Log = Callable[[str], None]

#: Rows are rewritten to metrics.jsonl after this many new ones (and at the end of a run).
FLUSH_EVERY = 500


class StepDiverged(TrainingDiverged):
    """The run stopped at ``step`` (non-finite loss/weights or an unsolvable fixed point)."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class StepLoop:
    """Drives one rule on one :class:`RateRNN` with one optimizer and records metrics rows."""

    def __init__(
        self,
        model: RateRNN,
        rule: FixedPointRule,
        optimizer: torch.optim.Optimizer,
        *,
        log_every: int = 1,
        diag_every: int = 10,
        eig_samples: int = 8,
        metrics_path: Path | None = None,
    ) -> None:
        self.model, self.rule, self.optimizer = model, rule, optimizer
        rule.bind_optimizer(optimizer)
        self.lr = float(optimizer.param_groups[0]["lr"])
        self.label = f"rule {rule.name}, lr {self.lr:g}"
        model.context = self.label
        self.log_every, self.diag_every, self.eig_samples = log_every, diag_every, eig_samples
        self.metrics_path = metrics_path
        self.rows: list[dict[str, Any]] = []
        self.steps = 0
        self.unsettled = 0  # samples left out of updates because they did not settle (skip)
        self.seconds = 0.0  # training time, diagnostics excluded
        self._unflushed = 0

    # ------------------------------------------------------------------ one step
    def step(
        self, x: Tensor, y: Tensor, shard: dist.BatchShard | None = None, **extra: Any
    ) -> StepOutput:
        """One training step on the batch ``(x, y)``; ``extra`` goes into a logged row.

        ``shard``: under torch.distributed, where this rank's ``(x, y)`` lies in the global batch;
        ``W.grad`` is then averaged over the ranks, weighted by their settled samples, so every
        rank takes the step one process would take on the whole batch. Logged rows describe
        rank 0's shard.
        """
        self.steps += 1
        k = self.steps
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        try:
            with dist.batch_shard(shard):
                out = self.rule.backward(self.model, x, y)
        except TrainingDiverged as err:  # the message already names the rule and lr
            self.flush()
            raise StepDiverged(f"step {k}: {err}", k) from None
        if shard is not None:
            self._average_grad()
        if not bool(torch.isfinite(out.loss)):
            self._stop(f"training loss became {float(out.loss)}", k)
        self.unsettled += int((~self.settled()).sum())
        elapsed = time.perf_counter() - start
        row = None
        if k % self.log_every == 0 or k == 1:
            row = self._row(k, out, y, with_diagnostics=k % self.diag_every == 0 or k == 1)
        start = time.perf_counter()
        self.optimizer.step()
        if not bool(torch.isfinite(self.model.W).all()):
            self._stop("the recurrent weights W became non-finite", k)
        self.seconds += elapsed + time.perf_counter() - start
        if row is not None:
            row["seconds"] = self.seconds
            row.update(extra)
            self.record(row)
        return out

    def _average_grad(self) -> None:
        """W.grad (a mean over this rank's settled samples) → the mean over all ranks' ones."""
        grad = self.model.W.grad
        used = self.settled().sum().double().reshape(1)
        total = dist.all_sum(used.clone())
        if grad is None or float(total) == 0:
            return
        grad.mul_(float(used) * dist.world_size() / float(total))
        dist.average_grads([self.model.W])

    def _stop(self, reason: str, step: int) -> NoReturn:
        self.flush()
        raise StepDiverged(
            f"{reason} at step {step} ({self.label}); lower the learning rate", step
        ) from None

    # ------------------------------------------------------------------ metrics
    def _row(self, k: int, out: StepOutput, y: Tensor, with_diagnostics: bool) -> dict[str, Any]:
        row: dict[str, Any] = {"step": k, "loss": float(out.loss)}
        if not y.dtype.is_floating_point and out.output.ndim == 2:
            hits = (out.output.argmax(-1) == y) & self.settled()
            row["acc"] = float(hits.double().mean())  # an unsettled sample counts as an error
        row.update(self.rule.diagnostics())
        if with_diagnostics:
            row.update(self.diagnostics())
        return row

    def settled(self) -> Tensor:
        """Which samples of the last batch reached their fixed point (all, unless ``skip``)."""
        state = self.rule.last_state
        assert state is not None, "settled() is only meaningful after a step"
        return state.fp.usable

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """Stability and update-angle numbers at the current W (before the optimizer step)."""
        W = self.model.W.detach()
        state = self.rule.last_state
        result = {"max_re_eig_W": max_real_eig(W)}
        if state is None:
            return result
        result["max_re_eig_GW"] = (
            result["max_re_eig_W"]
            if self.model.is_linear
            else max_real_eig_gain(W, state.fp.gain, self.eig_samples)
        )
        update = self.model.W.grad
        if update is None:
            return result
        if self.rule.exact_gradient:  # the update is the reference itself
            result["angle_deg"] = 0.0
            return result
        try:
            used, delta = state.used, state.delta
            if not state.exact or delta is None:  # bptt: compare with the true fixed point
                fp = self.model.solve(used.drive)
                used = fp.select(fp.usable)
                _, delta = loss_and_delta(self.model, used.r, state.y[fp.usable], self.rule.loss)
            reference = euclidean_gradient(
                W, used.r, used.gain, delta, self.model.activation, self.model.solver
            )
            result["angle_deg"] = angle_degrees(update, reference)
        except TrainingDiverged:  # no solvable reference here; the rule's own step went fine
            result["angle_deg"] = math.nan
        return result

    @torch.no_grad()
    def final_diagnostics(self) -> dict[str, Any]:
        """Stability of the W the run ends with, after its last optimizer step.

        The fixed point r* of τ dr/dt = −r + f(W r + X) is an attractor iff every eigenvalue of
        G·W has real part < 1 (G = I for a linear network). Returned: ``max_re_eig_W_final``
        (max Re λ(W) of the final W), ``max_re_eig_GW_final`` (for a nonlinear network, max Re
        λ(G_b W) at the final W's fixed points of the first ``eig_samples`` inputs of the last
        batch; for a linear one the same as λ(W)), ``final_stability`` — ``stable``,
        ``unstable`` (that number ≥ 1), ``no fixed point`` (the solver finds none for one of
        those inputs) or ``non-finite W`` — and ``final_unstable`` (anything but ``stable``).
        """
        W = self.model.W.detach()
        result: dict[str, Any] = {"max_re_eig_W_final": None, "max_re_eig_GW_final": None}
        if not bool(torch.isfinite(W).all()):
            return {**result, "final_stability": "non-finite W", "final_unstable": True}
        result["max_re_eig_W_final"] = max_real_eig(W)
        state = self.rule.last_state
        if self.model.is_linear or state is None:
            criterion = result["max_re_eig_W_final"] if self.model.is_linear else math.nan
        else:
            try:
                fp = self.model.solve(state.fp.drive[: self.eig_samples])
            except TrainingDiverged:
                fp = None
            if fp is None or not bool(fp.usable.all()):
                return {**result, "final_stability": "no fixed point", "final_unstable": True}
            criterion = max_real_eig_gain(W, fp.gain, self.eig_samples)
        result["max_re_eig_GW_final"] = criterion
        stable = criterion < 1  # False for nan
        result["final_stability"] = "stable" if stable else "unstable"
        result["final_unstable"] = not stable
        return result

    def record(self, row: dict[str, Any]) -> None:
        """Append a metrics row (flushed to disk every :data:`FLUSH_EVERY` rows)."""
        self.rows.append(row)
        self._unflushed += 1
        if self._unflushed >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.metrics_path is not None:
            ckpt.write_metrics(self.metrics_path, self.rows)
        self._unflushed = 0
