"""Fixed-point rate networks: solver, implicit gradient, reparameterised rules, tasks, CLI.

Every number checked here would be wrong if the maths were: gradients against central finite
differences in float64, the vectorised rules against their explicit matrix forms, the
reparameterised step against an exact step in A, solver residuals against the tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from decorrelate import cli_fixedpoint as fp_cli
from decorrelate.checkpoint import load_checkpoint
from decorrelate.cli import _Parser
from decorrelate.data import Dataset
from decorrelate.errors import TrainingDiverged, UserError
from decorrelate.fixedpoint import (
    FixedPointNotConverged,
    RateRNN,
    SolverConfig,
    TargetLoss,
    gradient_wrt_A,
    linearized_update,
    response_matrix,
    solve_adjoint,
)
from decorrelate.fixedpoint.config import SOLVER_FIELDS, FixedPointConfig
from decorrelate.fixedpoint.landscape import line_poles, losses_at, minimiser, run_landscape
from decorrelate.fixedpoint.loop import StepLoop
from decorrelate.fixedpoint.rules import loss_and_delta
from decorrelate.fixedpoint.tasks import MODEL_KEYS as FIXEDPOINT_KEYS
from decorrelate.fixedpoint.tasks import build_model, evaluate_fixed_points, make_teacher, run_task
from decorrelate.losses import Loss
from decorrelate.rules import get_rule

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (and on a busy machine,
    waiting for a descheduled thread makes every op take milliseconds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TIGHT = SolverConfig(tol=1e-13, max_iter=2000, adjoint="direct")


def make_net(
    activation: str,
    *,
    hidden: int = 7,
    inputs: int = 5,
    outputs: int | None = 3,
    w_scale: float = 0.8,
    solver: SolverConfig = TIGHT,
    seed: int = 0,
) -> RateRNN:
    gen = torch.Generator().manual_seed(seed)
    return RateRNN(
        hidden,
        inputs,
        outputs,
        activation=activation,
        w_scale=w_scale,
        solver=solver,
        generator=gen,
        dtype=F64,
    )


def batch(inputs: int = 5, n: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, inputs, generator=gen, dtype=F64), torch.tensor([0, 1, 2, 1])[:n]


def loss_of(model: RateRNN, x: torch.Tensor, y: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    fp = model.solve(model.drive(x), W)
    return Loss("cross-entropy")(model.read(fp.r), y)


def finite_difference(model: RateRNN, x: torch.Tensor, y: torch.Tensor, h: float = 1e-6):
    W = model.W.detach()
    grad = torch.zeros_like(W)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            E = torch.zeros_like(W)
            E[i, j] = h
            grad[i, j] = (loss_of(model, x, y, W + E) - loss_of(model, x, y, W - E)) / (2 * h)
    return grad


def rule_grad(name: str, model: RateRNN, x, y, loss=None, **options) -> torch.Tensor:
    rule = get_rule(name, **options)
    rule.attach(model, loss or Loss("cross-entropy"))
    model.W.grad = None
    rule.backward(model, x, y)
    grad = model.W.grad.clone()
    model.W.grad = None
    return grad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("activation", ["tanh", "identity"])
@pytest.mark.parametrize("adjoint", ["direct", "iterative"])
def test_implicit_gradient_matches_finite_differences(activation, adjoint):
    model = make_net(activation, solver=SolverConfig(tol=1e-13, max_iter=2000, adjoint=adjoint))
    x, y = batch()
    fd = finite_difference(model, x, y)
    assert rel_err(rule_grad("euclidean", model, x, y), fd) < 1e-6
    # The model's own autograd path (implicit backward) gives the same gradient.
    Loss("cross-entropy")(model(x), y).backward()
    assert rel_err(model.W.grad, fd) < 1e-6


def test_bptt_through_converged_iterations_matches_implicit_gradient():
    model = make_net("tanh", solver=SolverConfig(tol=1e-12, max_iter=3000, adjoint="direct"))
    x, y = batch()
    assert rel_err(rule_grad("bptt", model, x, y), rule_grad("euclidean", model, x, y)) < 1e-8


def test_adjoint_direct_and_iterative_agree_and_solve_the_system():
    model = make_net("tanh", hidden=12)
    x, _ = batch()
    fp = model.fixed_point(x)
    delta = torch.randn(fp.r.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    W = model.W.detach()
    u_direct = solve_adjoint(W, fp.gain, delta, "tanh", SolverConfig(adjoint="direct"))
    u_iter = solve_adjoint(W, fp.gain, delta, "tanh", SolverConfig(adjoint="iterative", tol=1e-12))
    residual = u_direct - (fp.gain * u_direct) @ W - delta  # (I − WᵀG) u − δ in row form
    assert residual.abs().max() < 1e-12
    assert (u_direct - u_iter).abs().max() < 1e-10


def test_iterative_adjoint_falls_back_to_an_exact_solve_where_it_stalls():
    model = make_net("tanh", hidden=12)
    x, _ = batch()
    fp = model.fixed_point(x)
    delta = torch.randn(fp.r.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    W = model.W.detach()
    starved = SolverConfig(adjoint="iterative", tol=1e-14, max_iter=2)  # cannot converge
    exact = solve_adjoint(W, fp.gain, delta, "tanh", SolverConfig(adjoint="direct"))
    assert (solve_adjoint(W, fp.gain, delta, "tanh", starved) - exact).abs().max() < 1e-13


def test_linearized_equals_closed_form_linear_rule():
    model = make_net("identity", outputs=None, hidden=6, inputs=None)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    target = torch.randn(5, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    loss = TargetLoss()
    lin = rule_grad("linearized", model, x, target, loss)
    lin_g = rule_grad("linearized-g", model, x, target, loss)
    euclid = rule_grad("euclidean", model, x, target, loss)
    fp = model.fixed_point(x)
    _, delta = loss_and_delta(model, fp.r, target, loss)
    B = torch.eye(6, dtype=F64) - model.W.detach()
    grad_A = gradient_wrt_A(fp.drive, delta)
    assert rel_err(lin, B @ grad_A @ B) < 1e-12  # B (∇_A L) B
    assert rel_err(lin, B @ B.T @ euclid @ B.T @ B) < 1e-10  # (BBᵀ) ∇_W L (BᵀB)
    assert rel_err(lin_g, lin) < 1e-12  # G = I: the two variants coincide


def explicit_tanh_instance(hidden: int = 30, n: int = 6, seed: int = 0):
    """A tanh network with N = ``hidden`` at its fixed points, and everything the rules need
    computed from the formulas with explicit float64 matrices: per-sample G_b = diag(1 − tanh²(a_b))
    at a_b = W r_b + X_b, and δ_b = ∂L/∂r_b = Rᵀ(softmax(R r_b) − onehot(y_b))/B of the mean
    cross-entropy."""
    model = make_net("tanh", hidden=hidden, inputs=5, outputs=3, w_scale=0.9, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = 2 * torch.randn(n, 5, generator=gen, dtype=F64)  # large enough that G is far from I
    y = torch.randint(0, 3, (n,), generator=gen)
    fp = model.fixed_point(x)
    W, R = model.W.detach(), model.readout
    X = x @ model.input_weights.T
    gains = [torch.diag(1 - torch.tanh(W @ fp.r[b] + X[b]) ** 2) for b in range(n)]
    p = torch.softmax(fp.r @ R.T, dim=-1)
    deltas = [R.T @ (p[b] - nn.functional.one_hot(y[b], 3).to(F64)) / n for b in range(n)]
    return model, x, y, W, fp.r, gains, deltas


def test_linearized_g_is_dW4_with_I_minus_WG_in_both_factors():
    """dW4 = Σ_b [(I − W G_b) δ_b] [(I − W G_b)ᵀ(I − W G_b) r_b]ᵀ (paper, authors' Set_Grad_dW4)."""
    model, x, y, W, r, gains, deltas = explicit_tanh_instance()
    eye = torch.eye(W.shape[0], dtype=F64)
    want = torch.zeros_like(W)
    wrong = torch.zeros_like(W)  # the former right factor (I − G W)ᵀ(I − G W) r
    for G, delta, r_b in zip(gains, deltas, r, strict=True):  # explicit matrices: fine in a test
        left = eye - W @ G
        want += torch.outer(left @ delta, left.T @ left @ r_b)
        wrong += torch.outer(left @ delta, (eye - G @ W).T @ (eye - G @ W) @ r_b)
    got = rule_grad("linearized-g", model, x, y)
    assert rel_err(got, want) < 1e-10
    assert rel_err(wrong, want) > 0.1  # the two factors differ a lot on this network


def test_linearized_is_dW3_and_euclidean_is_dW1_from_explicit_matrices():
    model, x, y, W, r, gains, deltas = explicit_tanh_instance()
    eye = torch.eye(W.shape[0], dtype=F64)
    dW1 = torch.zeros_like(W)
    dW3 = torch.zeros_like(W)
    dW3_metric = torch.zeros_like(W)
    for G, delta, r_b in zip(gains, deltas, r, strict=True):
        grad_b = torch.outer(torch.linalg.inv(torch.linalg.inv(G) - W).T @ delta, r_b)
        dW1 += grad_b  # (G⁻¹ − W)⁻ᵀ δ rᵀ
        left, right = eye - W @ G, eye - G @ W
        dW3 += torch.outer(left @ G @ delta, right.T @ right @ r_b)
        dW3_metric += left @ left.T @ grad_b @ right.T @ right  # the same, via ∇_W L
    assert rel_err(rule_grad("euclidean", model, x, y), dW1) < 1e-10
    assert rel_err(rule_grad("linearized", model, x, y), dW3) < 1e-10
    assert rel_err(dW3_metric, dW3) < 1e-10


@pytest.mark.parametrize("rule", ["euclidean", "reparam", "linearized", "linearized-g"])
def test_one_teacher_step_at_the_papers_lr_is_the_notebooks_step(rule, tmp_path):
    """The loss is the paper's J = (1/m) Σ_b ‖r_b − r̂_b‖² (no ½), so one step of ours at the
    paper's η is the authors' notebook step (LinearNDdW123, column form, X: [N, m]):
    dW1: W − η (2/m) Aᵀ(AX − r̂)(AX)ᵀ; dW2: I − (A − η (2/m)(AX − r̂)Xᵀ)⁻¹;
    dW3: W − η (2/m) (X − (I − W) r̂) Xᵀ (I − W) (dW4 = dW3 in a linear network)."""
    lr, n, m = 0.3, 12, 8
    cfg = tiny_teacher(rule=rule, lr=lr, hidden=n, samples=m, steps=1)
    outcome = run_task(cfg, tmp_path / "run")
    W1 = load_checkpoint(tmp_path / "run" / "model.pt", require=FIXEDPOINT_KEYS)["model"]["W"]
    data = make_teacher(n, m, cfg.seed, F64)
    W0 = build_model(cfg.resolved(), None, None).W.detach()  # the same seeded draw as the run
    X, r_hat, eye = data.X.T, data.target.T, torch.eye(n, dtype=F64)  # column form
    A = torch.linalg.inv(eye - W0)
    AX = A @ X
    if rule == "euclidean":
        want = W0 - lr * (2 / m) * A.T @ (AX - r_hat) @ AX.T
    elif rule == "reparam":
        want = eye - torch.linalg.inv(A - lr * (2 / m) * (AX - r_hat) @ X.T)
    else:
        want = W0 - lr * (2 / m) * (X - (eye - W0) @ r_hat) @ X.T @ (eye - W0)
    assert rel_err(W1 - W0, want - W0) < 1e-10
    assert outcome.rows[0]["loss"] == pytest.approx(
        float((AX - r_hat).square().sum()) / m, rel=1e-12
    )


def test_reparam_moves_A_exactly_one_gradient_step():
    model = make_net("identity", outputs=None, hidden=6, inputs=None)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    target = torch.randn(5, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    lr = 0.7
    A = response_matrix(model.W.detach()).requires_grad_(True)
    TargetLoss()(x @ A.T, target).backward()  # r = A x in row form: the loss as a function of A
    want = A.detach() - lr * A.grad
    rule = get_rule("reparam")
    rule.attach(model, TargetLoss())
    opt = torch.optim.SGD([model.W], lr=lr)
    rule.bind_optimizer(opt)  # takes η from the optimizer
    opt.zero_grad()
    rule.backward(model, x, target)
    opt.step()
    assert rel_err(response_matrix(model.W.detach()), want) < 1e-12


def test_reparam_refuses_nonlinear_networks_and_inexact_optimizers():
    with pytest.raises(UserError, match="needs a linear network"):
        get_rule("reparam", lr=0.1).attach(make_net("tanh"), Loss())
    rule = get_rule("reparam", lr=0.1)
    model = make_net("identity")
    rule.attach(model, Loss())
    for opt in (torch.optim.Adam([model.W], lr=0.1), torch.optim.SGD([model.W], 0.1, momentum=0.9)):
        with pytest.raises(UserError, match="only plain SGD"):
            rule.bind_optimizer(opt)
    with pytest.raises(UserError, match=r"built for lr 0\.1"):
        rule.bind_optimizer(torch.optim.SGD([model.W], lr=0.2))


@pytest.mark.parametrize("name", ["euclidean", "bptt", "reparam", "linearized", "linearized-g"])
def test_rules_refuse_other_models_in_one_line(name):
    with pytest.raises(UserError) as err:
        get_rule(name).attach(nn.Sequential(nn.Linear(3, 3)), Loss())
    message = str(err.value)
    assert "fixed-point rate network" in message and "decorrelate fixedpoint" in message
    assert "\n" not in message


# ----------------------------------------------------------------------------- solver


@pytest.mark.parametrize("method", ["damped", "anderson", "newton"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
def test_solver_residual_is_below_tolerance(method, activation):
    solver = SolverConfig(method=method, tol=1e-10)
    model = make_net(activation, hidden=20, w_scale=0.5, solver=solver)
    x, _ = batch()
    fp = model.fixed_point(x)
    recomputed = (fp.r - model.act.f(fp.r @ model.W.detach().T + model.drive(x))).abs().amax(-1)
    scale = fp.r.abs().amax(-1).clamp_min(1.0)  # tol is relative beyond |r| = 1
    assert bool(fp.converged.all()) and bool((fp.residual <= 1e-10 * scale).all())
    assert torch.allclose(recomputed, fp.residual)
    assert fp.iterations >= 1
    if method == "newton" and activation == "identity":
        assert fp.iterations == 1  # one shared LU solve is exact


def test_float32_verdict_holds_however_the_batch_is_split():
    """A settled point must pass whichever rows it is measured with: the active-set iterations
    measure sub-batches and the verdict the whole batch, whose float32 matmuls round differently.
    (At a tolerance of one rounding floor, settled MNIST samples failed the verdict.)"""
    gen = torch.Generator().manual_seed(0)
    solver = SolverConfig(tol=1e-9, on_nonconvergence="skip")  # below float32's floor
    model = RateRNN(300, 100, None, w_scale=0.7, solver=solver, generator=gen)
    x = 3 * torch.randn(512, 100, generator=gen)
    fp = model.fixed_point(x)
    assert fp.num_failed == 0
    W, X = model.W.detach(), fp.drive
    for size in (1, 7, 64, 512):
        res = torch.cat(
            [
                (r - torch.tanh(r @ W.T + X_)).abs().amax(-1)
                for r, X_ in zip(fp.r.split(size), X.split(size), strict=True)
            ]
        )
        assert bool((res <= fp.tolerance).all()), size


def test_methods_agree_on_the_fixed_point():
    points = [
        make_net("tanh", hidden=20, solver=SolverConfig(method=m, tol=1e-11))
        .fixed_point(batch()[0])
        .r
        for m in ("damped", "anderson", "newton")
    ]
    assert (points[0] - points[1]).abs().max() < 1e-9
    assert (points[0] - points[2]).abs().max() < 1e-9


def unstable_net(policy: str = "raise") -> RateRNN:
    """W = 3·N(0,1)/√N with tanh: chaotic, no fixed point within a few iterations."""
    solver = SolverConfig(
        method="damped", damping=1.0, tol=1e-8, max_iter=20, on_nonconvergence=policy
    )
    return make_net("tanh", hidden=40, w_scale=3.0, solver=solver)


def test_nonconvergence_raises_a_clear_error():
    with pytest.raises(FixedPointNotConverged, match=r"did not converge for \d+/4 samples"):
        unstable_net().fixed_point(batch()[0])
    rule = get_rule("linearized")
    model = unstable_net()
    rule.attach(model, Loss())
    with pytest.raises(TrainingDiverged):  # the rules never use the point
        rule.backward(model, *batch())
    assert model.W.grad is None


def test_loop_counts_every_unsettled_sample_under_skip():
    solver = SolverConfig(tol=1e-12, max_iter=2000, on_nonconvergence="skip")
    model = make_net("tanh", hidden=6, solver=solver)
    rule = get_rule("linearized")
    rule.attach(model, Loss("cross-entropy"))
    loop = StepLoop(model, rule, torch.optim.SGD([model.W], lr=0.1), log_every=2, diag_every=2)
    x, y = batch()
    x[0] = math.nan
    for _ in range(3):
        loop.step(x, y)
    assert loop.unsettled == 3  # one per step, logged or not
    assert [row["nonconverged"] for row in loop.rows] == [1, 1]  # steps 1 and 2
    assert all(row["acc"] <= 0.75 for row in loop.rows)  # the unsettled sample counts as wrong


def test_skip_policy_still_raises_when_every_sample_fails():
    with pytest.raises(FixedPointNotConverged, match="every sample failed"):
        unstable_net("skip").fixed_point(batch()[0])


def test_skip_policy_gradient_equals_gradient_of_the_converged_samples():
    solver = SolverConfig(tol=1e-12, max_iter=2000, on_nonconvergence="skip", adjoint="direct")
    model = make_net("tanh", hidden=6, solver=solver)
    x, y = batch()
    # Make sample 0 impossible: a non-finite drive never converges.
    x_bad = x.clone()
    x_bad[0] = math.nan
    rule = get_rule("euclidean")
    rule.attach(model, Loss("cross-entropy"))
    rule.backward(model, x_bad, y)
    assert rule.diagnostics()["nonconverged"] == 1
    got = model.W.grad.clone()
    model.W.grad = None
    want = rule_grad("euclidean", model, x[1:], y[1:])
    assert rel_err(got, want) < 1e-12


def test_evaluation_counts_unsettled_inputs_as_errors_under_skip():
    solver = SolverConfig(tol=1e-12, max_iter=2000, on_nonconvergence="skip")
    model = make_net("tanh", hidden=6, solver=solver)
    x, y = batch()
    x[0] = math.nan  # this input never settles
    data = Dataset(x, y, num_classes=3, name="toy")
    loss_value, acc, unsettled = evaluate_fixed_points(model, data, Loss("cross-entropy"), 2)
    out = model.read(model.fixed_point(x[1:]).r)
    assert unsettled == 1
    assert acc == pytest.approx(float((out.argmax(-1) == y[1:]).sum()) / 4)
    assert loss_value == pytest.approx(float(Loss("cross-entropy")(out, y[1:])))


def test_euler_is_the_fixed_step_setting_with_its_residual_reported():
    solver = SolverConfig(method="euler", euler_steps=500, euler_dt=0.01)
    fp = make_net("tanh", hidden=20, solver=solver).fixed_point(batch()[0])
    assert fp.iterations == 500 and fp.method == "euler"
    assert 1e-4 < fp.max_residual < 1.0  # T = 5τ is a few percent off the fixed point
    assert not bool(fp.converged.any())  # reported, not hidden — and not raised
    assert bool(fp.usable.all())  # the approximate point is the explicit choice of this method
    model = make_net("tanh", hidden=20, solver=solver)
    x, y = batch()
    grad = rule_grad("linearized", model, x, y)  # the rules use all samples of the Euler point
    _, delta = loss_and_delta(model, fp.r, y, Loss("cross-entropy"))
    want = linearized_update(model.W.detach(), fp.r, fp.gain, delta)
    assert rel_err(grad, want) < 1e-12


def test_bptt_with_euler_trains_the_unrolled_iterate_and_reports_its_residual():
    solver = SolverConfig(method="euler", euler_steps=60, euler_dt=0.1)
    model = make_net("tanh", hidden=10, solver=solver)
    x, y = batch()
    grad = rule_grad("bptt", model, x, y)  # no exception: euler has no tolerance to enforce
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert model.last_solve is not None and model.last_solve.iterations == 60
    assert model.last_solve.max_residual > 1e-6  # the approximate point, reported


def test_bad_solver_options_are_user_errors():
    with pytest.raises(UserError, match="solver option damping must be in"):
        SolverConfig(damping=0)
    with pytest.raises(UserError, match="method must be one of"):
        SolverConfig(method="bisection")


# ----------------------------------------------------------------------------- tasks and loop


def tiny_teacher(**overrides) -> FixedPointConfig:
    options = dict(task="linear-teacher", hidden=20, samples=10, steps=60, diag_every=10)
    return FixedPointConfig(**{**options, **overrides})


def test_teacher_task_learns_and_logs_the_diagnostics(tmp_path):
    outcome = run_task(tiny_teacher(rule="linearized", lr=3.0), tmp_path / "run")
    rows = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
        if line
    ]
    assert len(rows) == 60 and rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    diag = rows[9]
    for key in (
        "loss",
        "residual",
        "solver_iterations",
        "nonconverged",
        "max_re_eig_W",
        "max_re_eig_GW",
        "angle_deg",
        "seconds",
    ):
        assert key in diag
    assert diag["residual"] < 1e-6 and 0 < diag["angle_deg"] < 90
    assert outcome.summary["nonconverged_total"] == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["rule"] == "linearized"


def test_runs_are_deterministic_in_the_seed():
    a = run_task(tiny_teacher(rule="euclidean", steps=20), None)
    b = run_task(tiny_teacher(rule="euclidean", steps=20), None)
    c = run_task(tiny_teacher(rule="euclidean", steps=20, seed=1), None)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a.rows) == strip(b.rows)
    assert strip(a.rows) != strip(c.rows)
    t1, t2 = make_teacher(8, 4, 0, F64), make_teacher(8, 4, 0, F64)
    assert torch.equal(t1.target, t2.target)


def max_re_eig_explicit(M: torch.Tensor) -> float:
    return float(torch.linalg.eigvals(M).real.max())


def test_final_stability_is_that_of_the_final_W_and_an_unstable_W_is_flagged(tmp_path, capsys):
    # Only step 1 is diagnosed (diag-every 1000); Euclidean descent at lr 1e5 then throws W far
    # out. The linear solver still returns r = (I − W)⁻¹X, so the loss alone does not show it.
    out = tmp_path / "blown"
    argv = ["--rule", "euclidean", "--lr", "1e5", "--diag-every", "1000", *TINY]
    assert fp_cli.run(parse(*argv, "--out", str(out))) == 0
    printed = capsys.readouterr().out.splitlines()
    summary = json.loads((out / "summary.json").read_text())
    W = load_checkpoint(out / "model.pt", require=FIXEDPOINT_KEYS)["model"]["W"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last_diagnosed = [r["max_re_eig_W"] for r in rows if "max_re_eig_W" in r][-1]
    assert last_diagnosed < 1  # what used to be reported as "final"
    assert summary["max_re_eig_W_final"] == pytest.approx(max_re_eig_explicit(W), rel=1e-9)
    assert summary["max_re_eig_W_final"] > 1
    assert summary["final_unstable"] is True and summary["final_stability"] == "unstable"
    assert summary["max_re_eig_W_max"] >= summary["max_re_eig_W_final"]
    warnings = [line for line in printed if line.startswith("warning:")]
    assert len(warnings) == 1 and "final W is unstable" in warnings[0] and "λ(W)" in warnings[0]
    # A run that stays stable: the final value is still the final W's, and no warning.
    out = tmp_path / "fine"
    argv = ["--rule", "linearized", "--lr", "0.3", "--diag-every", "1000", *TINY]
    assert fp_cli.run(parse(*argv, "--out", str(out))) == 0
    assert "warning:" not in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    W = load_checkpoint(out / "model.pt", require=FIXEDPOINT_KEYS)["model"]["W"]
    assert summary["max_re_eig_W_final"] == pytest.approx(max_re_eig_explicit(W), rel=1e-9)
    assert summary["final_unstable"] is False and summary["final_stability"] == "stable"


def test_final_diagnostics_of_a_tanh_network_use_G_W_at_the_final_fixed_points():
    solver = SolverConfig(method="damped", damping=1.0, tol=1e-12, max_iter=200)
    model = make_net("tanh", hidden=20, w_scale=0.5, solver=solver)
    rule = get_rule("euclidean")
    rule.attach(model, Loss("cross-entropy"))
    loop = StepLoop(model, rule, torch.optim.SGD([model.W], lr=0.5), diag_every=100, eig_samples=3)
    x, y = batch()
    for _ in range(3):
        loop.step(x, y)
    final = loop.final_diagnostics()
    W = model.W.detach()
    fp = model.fixed_point(x[:3])
    want = max(
        max_re_eig_explicit(torch.diag(1 - torch.tanh(W @ fp.r[b] + fp.drive[b]) ** 2) @ W)
        for b in range(3)
    )
    assert final["max_re_eig_GW_final"] == pytest.approx(want, rel=1e-9)
    assert final["max_re_eig_W_final"] == pytest.approx(max_re_eig_explicit(W), rel=1e-9)
    assert final["final_stability"] == "stable" and final["final_unstable"] is False
    with torch.no_grad():
        model.W.mul_(8.0)  # chaotic: the solver finds no fixed point
    final = loop.final_diagnostics()
    assert final["final_stability"] == "no fixed point" and final["final_unstable"] is True
    with torch.no_grad():
        model.W[0, 0] = math.inf
    assert loop.final_diagnostics()["final_stability"] == "non-finite W"


def test_mnist_task_runs_on_synthetic_data_and_beats_chance():
    cfg = FixedPointConfig(
        task="mnist",
        dataset="synthetic",
        train_size=1024,
        hidden=32,
        epochs=2,
        batch_size=64,
        rule="linearized",
        lr=0.1,
        readout_scale=3.0,
        log_every=4,
        diag_every=8,
    )
    outcome = run_task(cfg, None)
    epochs = [r for r in outcome.rows if "test_acc" in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert outcome.summary["best_test_acc"] > 0.3  # 10 classes: chance is 0.1
    assert any("acc" in r and "max_re_eig_GW" in r for r in outcome.rows)
    again = run_task(cfg, None)
    assert [r["test_acc"] for r in again.rows if "test_acc" in r] == [r["test_acc"] for r in epochs]


def test_landscape_has_its_poles_where_predicted(tmp_path):
    cfg = FixedPointConfig(
        task="landscape", hidden=16, samples=8, lines=2, line_points=101, grid=9, span=4.0
    )
    result = run_landscape(cfg, tmp_path / "land")
    assert result.min_loss < 1e-20  # W* is an exact minimiser
    assert (tmp_path / "land" / "landscape.png").stat().st_size > 0
    data = make_teacher(16, 8, 0, F64)
    W_star = minimiser(data)
    D = torch.randn(16, 16, generator=torch.Generator().manual_seed(5), dtype=F64)
    poles = line_poles(W_star, D, 10.0)
    assert poles
    p = poles[0]
    near = losses_at(torch.stack([W_star + (p + e) * D for e in (1e-7, 0.3)]), data)
    assert near[0] > 1e6 * near[1]  # the loss blows up at the predicted pole


# ----------------------------------------------------------------------------- CLI


def parse(*argv: str) -> argparse.Namespace:
    parser = _Parser(prog="decorrelate")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    fp_cli.add_parser(sub)
    return parser.parse_args(["fixedpoint", *argv])


TINY = ["--hidden", "12", "--samples", "6", "--steps", "15", "--threads", "1", "--quiet"]


def test_cli_single_run_writes_metrics(tmp_path, capsys):
    out = tmp_path / "one"
    assert fp_cli.run(parse("--rule", "reparam", "--lr", "1", *TINY, "--out", str(out))) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 16))
    assert "done:" in capsys.readouterr().out


def test_cli_sweep_and_divergence(tmp_path, capsys):
    args = parse("--rule", "all", "--lr", "0.1,1e6", *TINY, "--out", str(tmp_path / "sw"))
    assert fp_cli.run(args) == 0
    printed = capsys.readouterr().out
    assert "| reparam |" in printed and "diverged at step" in printed
    assert Path(tmp_path / "sw" / "sweep.png").exists()
    single = parse("--rule", "linearized", "--lr", "1e6", *TINY, "--out", str(tmp_path / "d"))
    with pytest.raises(TrainingDiverged, match="rule linearized, lr 1e"):
        fp_cli.run(single)


def test_cli_no_normalize_reaches_the_dataset_loader(monkeypatch, tmp_path):
    from decorrelate.fixedpoint import tasks

    seen = {}

    def fake_load(name, **kwargs):
        seen.update(kwargs)
        raise UserError("stop here")

    monkeypatch.setattr(tasks, "load_dataset", fake_load)
    for flags, want in (([], True), (["--no-normalize"], False)):
        args = parse("--task", "mnist", *flags, "--quiet", "--out", str(tmp_path / str(want)))
        with pytest.raises(UserError, match="stop here"):
            fp_cli.run(args)
        assert seen["normalize"] is want


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "abc"], "invalid value for lr: 'abc'"),
        (["--lr", "-1"], r"invalid value for lr: -1.0 \(must be > 0\)"),
        (["--lr", "0.1,,"], None),
        (["--lr", ","], "lr needs at least one value"),
        (["--rule", "bp"], "does not train a fixed-point network"),
        (["--rule", "reparam", "--task", "mnist"], "needs a linear network"),
        (["--steps", "0"], r"invalid value for steps: 0 \(must be > 0\)"),
        (["--steps", "1.5"], "invalid value for steps: '1.5'"),
        (["--solver", "bisection"], "invalid value for solver: 'bisection'; choose one of: auto"),
        (["--damping", "0"], r"invalid value for damping: 0.0 \(must be in \(0, 1\]\)"),
        (["--threads", "0"], "invalid value for threads"),
        (["--activation", "sigmoid"], "invalid value for activation"),
        (["--rule", "reparam,euclidean", "--optimizer", "adam"], "plain SGD"),
        (["--rule", "reparam", "--momentum", "0.9"], "only plain SGD"),
        (["--task", "landscape", "--activation", "tanh"], "landscape"),
    ],
)
def test_cli_user_mistakes_are_one_line_user_errors(argv, message, tmp_path):
    if message is None:  # empty items of a list are skipped, as in train's list options
        assert fp_cli.config_from_args(parse(*argv)).lr == pytest.approx(0.1)
        return
    with pytest.raises(UserError, match=message) as err:
        fp_cli.run(parse(*argv, "--out", str(tmp_path / "x"), "--quiet"))
    assert "\n" not in str(err.value)


def words(*parts: str) -> list[str]:
    return " ".join(parts).split()


#: Command lines of the former hand-written parser and the config each gave (rule ``all``
#: now resolves to the first rule it runs), with the solver options it put in SolverConfig.
OLD_COMMAND_LINES = [
    ([], {}, SolverConfig()),
    (
        words(
            "--task mnist --rule linearized --lr 0.3 --no-normalize --hidden 50 --solver",
            "euler --euler-steps 100 --euler-dt 0.05 --on-nonconvergence skip",
        ),
        dict(task="mnist", rule="linearized", lr=0.3, normalize=False, hidden=50),
        SolverConfig(method="euler", euler_steps=100, euler_dt=0.05, on_nonconvergence="skip"),
    ),
    (
        words(
            "--rule all --lr 0.03,0.1 --steps 10 --samples 7 --tol 1e-9 --max-iter 50",
            "--damping 0.3 --memory 3 --anderson-start 0.01 --adjoint direct --seed 4 --out x",
        ),
        dict(rule="euclidean", lr=0.03, steps=10, samples=7, seed=4, out="x"),
        SolverConfig(
            tol=1e-9, max_iter=50, damping=0.3, memory=3, anderson_start=0.01, adjoint="direct"
        ),
    ),
    (
        words(
            "--task landscape --lines 2 --line-points 11 --grid 5 --span 2.5 --w-scale 0.4",
            "--dtype float32",
        ),
        dict(
            task="landscape",
            lines=2,
            line_points=11,
            grid=5,
            span=2.5,
            w_scale=0.4,
            dtype="float32",
        ),
        SolverConfig(),
    ),
    (
        words(
            "--task mnist --optimizer adam --momentum 0.5 --batch-size 64 --epochs 2",
            "--dataset synthetic --data-dir d --train-size 100 --readout-scale 2 --log-every",
            "3 --diag-every 6 --loss-threshold 0.01 --activation relu --threads 2",
        ),
        dict(
            task="mnist",
            optimizer="adam",
            momentum=0.5,
            batch_size=64,
            epochs=2,
            dataset="synthetic",
            data_dir="d",
            train_size=100,
            readout_scale=2.0,
            log_every=3,
            diag_every=6,
            loss_threshold=0.01,
            activation="relu",
            threads=2,
        ),
        SolverConfig(),
    ),
]


@pytest.mark.parametrize(("argv", "fields", "solver"), OLD_COMMAND_LINES)
def test_cli_former_flags_give_the_former_configs(argv, fields, solver):
    cfg = fp_cli.config_from_args(parse(*argv))
    flat_solver = {name: getattr(solver, field) for name, field in SOLVER_FIELDS.items()}
    assert cfg == FixedPointConfig(**fields, **flat_solver).resolved()
    for name, value in fields.items():
        assert getattr(cfg, name) == value
    assert cfg.solver_config == solver
    if cfg.task == "mnist" and "activation" not in fields:  # task defaults still fill in
        assert (cfg.activation, cfg.hidden or 0, cfg.dtype) == ("tanh", fields["hidden"], "float32")
    if cfg.task == "landscape":
        assert (cfg.activation, cfg.hidden, cfg.dtype) == ("identity", 200, "float32")


def test_cli_reads_a_config_file_and_flags_win(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text(
        "task: linear-teacher\nrule: [linearized, euclidean]\nlr: [0.1, 1]\nhidden: 12\n"
        "max-iter: 77\nnormalize: false\nsolver: damped\n"
    )
    request = fp_cli.request_from_args(parse("--config", str(path), "--hidden", "9", "--lr", "3"))
    assert request.rules == ["linearized", "euclidean"] and request.lrs == [3.0]
    cfg = request.config
    assert (cfg.hidden, cfg.max_iter, cfg.normalize, cfg.rule, cfg.lr) == (
        9,
        77,
        False,
        "linearized",
        3.0,
    )
    assert cfg.solver_config == SolverConfig(method="damped", max_iter=77)
    json_path = tmp_path / "f.json"
    json_path.write_text('{"rule": "all", "lr": "0.1,1", "on_nonconvergence": "skip"}')
    request = fp_cli.request_from_args(parse("--config", str(json_path), "--no-normalize"))
    assert request.is_sweep and "reparam" in request.rules and request.lrs == [0.1, 1.0]
    assert request.config.solver_config.on_nonconvergence == "skip"
    assert request.config.normalize is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hiden: 12\n", "unknown option 'hiden'; valid options: task, rule, lr"),
        ("steps: -3\n", r"invalid value for steps: -3 \(must be > 0\)"),
        ("adjoint: lu\n", "invalid value for adjoint: 'lu'; choose one of: auto, direct"),
        ("hidden: 3\nhidden: 4\n", "option hidden is given twice"),
        ("rule: [euclidean, bp]\n", "does not train a fixed-point network"),
    ],
)
def test_cli_config_file_mistakes_are_one_line_and_exit_2(text, message, tmp_path, capsys):
    from decorrelate.cli import EXIT_USER, main

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["fixedpoint", "--config", str(path), "--out", str(tmp_path / "o")]) == EXIT_USER
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("decorrelate: error: ")
    assert re.search(message, err)
    assert not (tmp_path / "o").exists()


def test_bad_flag_values_exit_2_in_one_line(tmp_path, capsys):
    from decorrelate.cli import EXIT_USER, main

    for argv in (["--tol", "x"], ["--task", "cifar"], ["--normalize=3"], ["--lr", "1,-2"]):
        try:
            code = main(["fixedpoint", *argv, "--out", str(tmp_path / "o")])
        except SystemExit as exc:  # refused by argparse itself
            code = exc.code
        assert code == EXIT_USER, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error" in err, argv


def test_saved_configs_load_in_both_layouts(tmp_path):
    cfg = FixedPointConfig(hidden=12, tol=1e-8, solver="damped").resolved()
    assert FixedPointConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    former = {k: v for k, v in cfg.to_dict().items() if k not in SOLVER_FIELDS}
    former["solver"] = {
        "method": "damped",
        **{k: getattr(cfg, k) for k in SOLVER_FIELDS if k != "solver"},
    }
    assert FixedPointConfig.from_dict(former) == cfg  # the nested "solver" of earlier files
    with pytest.raises(UserError, match="unknown solver option"):
        FixedPointConfig.from_dict({**former, "solver": {"method": "damped", "bogus": 1}})


def test_a_sweep_reads_back_runs_saved_in_the_former_layout(tmp_path, monkeypatch):
    from decorrelate.experiments import kinds
    from decorrelate.experiments.fixedpoint_sweep import run_sweep
    from decorrelate.fixedpoint import tasks

    first = run_sweep(tiny_teacher(steps=5), ["linearized"], [0.1], tmp_path / "sw", log=None)
    path = tmp_path / "sw" / "linearized-lr0.1" / "config.json"
    saved = json.loads(path.read_text())
    former = {k: v for k, v in saved.items() if k not in SOLVER_FIELDS}
    former["solver"] = {SOLVER_FIELDS[k]: saved[k] for k in SOLVER_FIELDS}
    path.write_text(json.dumps(former))

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(tasks, "run_task", refuse)
    monkeypatch.delitem(kinds._KINDS, "fixedpoint")  # rebuilt with the refusing run_task
    again = run_sweep(tiny_teacher(steps=5), ["linearized"], [0.1], tmp_path / "sw", log=None)
    assert [r.summary for r in again.results] == [r.summary for r in first.results]  # reused
