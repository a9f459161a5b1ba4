import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decorrelate import Loss, UserError, get_rule, resume, train
from decorrelate.checkpoint import load_checkpoint, read_metrics
from decorrelate.metrics import angle, update_angles, weight_feedback_alignment
from decorrelate.models import ConvNet
from decorrelate.train import evaluate_checkpoint


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def bp_grads(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    loss = Loss()
    model.zero_grad(set_to_none=True)
    loss(model(x), y).backward()
    out = grads(model)
    model.zero_grad(set_to_none=True)
    return out


def rule_grads(rule, model, x, y) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    rule.backward(model, x, y)
    return grads(model)


def mlp(seed=0, act=nn.Tanh):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), act(), nn.Linear(5, 4), act(), nn.Linear(4, 3)
    ).double()


def small_convnet():
    torch.manual_seed(0)
    return ConvNet((2, 8, 8), 3, channels=[3, 4, 4, 5], widths=[7]).double()


@pytest.mark.parametrize("make", [mlp, small_convnet])
def test_fa_with_b_equal_w_is_exactly_bp(make):
    model = make()
    shape = (2, 8, 8) if make is small_convnet else (6,)
    x = torch.randn(9, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    expected = bp_grads(model, x, y)
    rule = get_rule("fa", feedback_init="weight")
    rule.attach(model, Loss())
    got = rule_grads(rule, model, x, y)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-14)


def test_fa_matches_hand_computed_backward_with_random_feedback():
    model = mlp()
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    rule = get_rule("fa")
    rule.attach(model, Loss(), torch.Generator().manual_seed(1))
    got = rule_grads(rule, model, x, y)
    l1, l2, l3 = model[1], model[3], model[5]
    b2, b3 = l2.fa_feedback, l3.fa_feedback
    assert b2.shape == l2.weight.shape and not torch.equal(b2, l2.weight)
    a1 = x @ l1.weight.T + l1.bias
    h1 = torch.tanh(a1)
    a2 = h1 @ l2.weight.T + l2.bias
    h2 = torch.tanh(a2)
    out = h2 @ l3.weight.T + l3.bias
    d3 = (torch.softmax(out, 1) - F.one_hot(y, 3)) / 7
    d2 = (d3 @ b3) * (1 - h2**2)
    d1 = (d2 @ b2) * (1 - h1**2)
    torch.testing.assert_close(got["5.weight"], d3.T @ h2)
    torch.testing.assert_close(got["3.weight"], d2.T @ h1)
    torch.testing.assert_close(got["1.weight"], d1.T @ x)
    torch.testing.assert_close(got["1.bias"], d1.sum(0))


def test_fa_straight_through_uses_unit_derivative():
    model = mlp(act=nn.ReLU)
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    rule = get_rule("fa", feedback_init="weight", straight_through=True)
    rule.attach(model, Loss())
    got = rule_grads(rule, model, x, y)
    l1, l2, l3 = model[1], model[3], model[5]
    h1 = torch.relu(x @ l1.weight.T + l1.bias)
    h2 = torch.relu(h1 @ l2.weight.T + l2.bias)
    out = h2 @ l3.weight.T + l3.bias
    d3 = (torch.softmax(out, 1) - F.one_hot(y, 3)) / 7
    d2 = d3 @ l3.weight  # no f' anywhere
    d1 = d2 @ l2.weight
    torch.testing.assert_close(got["1.weight"], d1.T @ x)
    torch.testing.assert_close(got["3.weight"], d2.T @ h1)


@pytest.mark.parametrize("block_size", [None, 2], ids=["full-R", "block-diagonal-R"])
def test_fa_through_decorrelated_layers_sends_error_back_through_r_transpose(block_size):
    dnn = pytest.importorskip("decorrelate.nn")
    model = mlp()
    dnn.decorrelate(model, "scaled", block_size=block_size)
    torch.manual_seed(3)
    wrappers = [m for _, m in dnn.decorrelators(model)]
    for w in wrappers:  # non-identity R, as after some training
        w.R.copy_(torch.eye(w.R.shape[-1], dtype=w.R.dtype) + 0.3 * torch.randn_like(w.R))
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    rule = get_rule("fa")
    rule.attach(model, Loss(), torch.Generator().manual_seed(1))
    got = rule_grads(rule, model, x, y)
    (r1, w1), (r2, w2), (r3, w3) = [(m.dense_R(), m.layer) for m in wrappers]
    assert block_size is None or wrappers[0].R.dim() == 3
    b2, b3 = wrappers[1].fa_feedback, wrappers[2].fa_feedback
    z1 = x @ r1.T
    h1 = torch.tanh(z1 @ w1.weight.T + w1.bias)
    z2 = h1 @ r2.T
    h2 = torch.tanh(z2 @ w2.weight.T + w2.bias)
    z3 = h2 @ r3.T
    out = z3 @ w3.weight.T + w3.bias
    d3 = (torch.softmax(out, 1) - F.one_hot(y, 3)) / 7
    d2 = (d3 @ b3 @ r3) * (1 - h2**2)  # error through B, then through Rᵀ
    d1 = (d2 @ b2 @ r2) * (1 - h1**2)
    names = {id(m.layer.weight): n for n, m in dnn.decorrelators(model)}
    assert len(names) == 3
    torch.testing.assert_close(got["1.layer.weight"], d1.T @ z1)
    torch.testing.assert_close(got["3.layer.weight"], d2.T @ z2)
    torch.testing.assert_close(got["5.layer.weight"], d3.T @ z3)


def test_dfa_with_b_equal_w2_transpose_is_bp_for_one_hidden_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    expected = bp_grads(model, x, y)
    rule = get_rule("dfa")
    rule.attach(model, Loss(), torch.Generator().manual_seed(0), example=x)
    assert model[2].dfa_feedback.shape == (5, 3)
    model[2].dfa_feedback.copy_(model[2].weight.detach().T)
    got = rule_grads(rule, model, x, y)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


def test_dfa_projects_the_output_error_to_every_hidden_layer():
    model = small_convnet()
    x, y = torch.randn(4, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    rule = get_rule("dfa")
    rule.attach(model, Loss(), torch.Generator().manual_seed(0), example=x)
    got = rule_grads(rule, model, x, y)
    with rule.suspended():
        expected = bp_grads(model, x, y)
    last = [n for n in got if n.endswith("weight")][-1]
    torch.testing.assert_close(got[last], expected[last])  # the output layer is plain BP
    # the first conv gets δ = f'(a) ⊙ B e directly: recompute it by hand
    conv1 = model[0]
    a1 = conv1(x)
    h1 = F.leaky_relu(a1, 0.01)
    out = model(x)
    e = (torch.softmax(out, 1) - F.one_hot(y, 3)) / 4
    b = model[2].dfa_feedback  # input of the second conv
    delta = (e @ b.T).reshape(h1.shape) * torch.where(a1 > 0, 1.0, 0.01)
    expected_w = torch.nn.grad.conv2d_weight(x, conv1.weight.shape, delta, padding=1)
    torch.testing.assert_close(got["0.weight"], expected_w)


def test_angle_metrics_on_constructed_cases():
    a = torch.tensor([1.0, 0.0, 0.0])
    assert angle(a, 3 * a) == pytest.approx(0.0, abs=1e-6)
    assert angle(a, -a) == pytest.approx(180.0)
    assert angle(a, torch.tensor([0.0, 2.0, 0.0])) == pytest.approx(90.0)
    assert angle(a, torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(45.0)
    assert math.isnan(angle(a, torch.zeros(3)))
    w = torch.randn(4, 5)
    out = weight_feedback_alignment({"l": (w, 2 * w)})
    assert out["wb_angle/l"] == pytest.approx(0.0, abs=1e-4)
    assert out["wb_norm_ratio/l"] == pytest.approx(2.0)


def test_update_angles_against_bp():
    model = mlp()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    same = get_rule("fa", feedback_init="weight")
    same.attach(model, Loss())
    same.backward(model, x, y)
    before = grads(model)
    angles = update_angles(model, same, x, y)
    assert set(angles) == {"angle/1.weight", "angle/3.weight", "angle/5.weight"}
    assert all(v == pytest.approx(0.0, abs=1e-4) for v in angles.values())
    after = grads(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # training grads restored
    same.detach()
    fa = get_rule("fa")
    fa.attach(model, Loss(), torch.Generator().manual_seed(0))
    fa.backward(model, x, y)
    angles = update_angles(model, fa, x, y)
    assert angles["angle/5.weight"] == pytest.approx(0.0, abs=1e-4)  # output layer: exact
    assert angles["angle/1.weight"] > 5.0  # random feedback: not BP's direction


def test_update_angles_name_decorrelated_layers_like_plain_ones():
    dnn = pytest.importorskip("decorrelate.nn")
    model = dnn.decorrelate(mlp(), "scaled")
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    fa = get_rule("fa", feedback_init="weight")  # B = W: FA is BP, through R too
    fa.attach(model, Loss())
    fa.backward(model, x, y)
    angles = update_angles(model, fa, x, y)
    assert set(angles) == {"angle/1.weight", "angle/3.weight", "angle/5.weight"}
    assert all(v == pytest.approx(0.0, abs=1e-4) for v in angles.values())


class _Scale(nn.Module):
    """A parameterised module no layer kind covers."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.gain


@pytest.mark.parametrize(
    "name", ["fa", "dfa", "align-zero", "align-ada", "align-prop", "last-layer"]
)
def test_unsupported_layers_are_refused(name):
    model = nn.Sequential(nn.Linear(4, 3), _Scale(), nn.Linear(3, 2))
    with pytest.raises(UserError, match="1 is a _Scale with parameters"):
        get_rule(name).attach(model, Loss())


def test_bad_feedback_options_are_refused():
    with pytest.raises(UserError, match="needs B shaped like W"):
        get_rule("dfa", feedback_init="weight").attach(mlp(), Loss())
    with pytest.raises(UserError, match="unknown feedback init"):
        get_rule("fa", feedback_init="orthogonal")


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_feedback_survives_checkpoint_and_resume(tiny, tmp_path, rule):
    opts = {**tiny, "rule": rule, "alignment_every": 3}
    straight = train({**opts, "out": str(tmp_path / "straight")}, log=None)
    train({**opts, "epochs": 1, "out": str(tmp_path / "split")}, log=None)
    resumed = resume(tmp_path / "split", {"epochs": 2}, log=None)
    timing = {"seconds", "epoch_seconds", "eval_seconds"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in resumed.history]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in straight.history]
    state = load_checkpoint(tmp_path / "split")["model"]
    key = f"{rule}_feedback"
    assert any(k.endswith(key) for k in state)
    ref = load_checkpoint(tmp_path / "straight")["model"]
    assert all(torch.equal(state[k], ref[k]) for k in state if k.endswith(key))
    rows = read_metrics(tmp_path / "split")
    assert any(k.startswith("angle/") for k in rows[1])
    if rule == "fa":
        assert any(k.startswith("wb_angle/") for k in rows[1])
    assert evaluate_checkpoint(tmp_path / "split")["acc"] == resumed.final_test_acc


def test_fa_handles_string_padding():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding="same"), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6 * 6, 3)
    ).double()
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    expected = bp_grads(model, x, y)
    rule = get_rule("fa", feedback_init="weight")
    rule.attach(model, Loss())
    got = rule_grads(rule, model, x, y)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


def test_dfa_attached_under_no_grad_draws_every_feedback_matrix():
    model = mlp()
    x = torch.randn(4, 6, dtype=torch.float64)
    rule = get_rule("dfa")
    with torch.no_grad():
        rule.attach(model, Loss(), torch.Generator().manual_seed(0), example=x)
    assert [hasattr(model[i], "dfa_feedback") for i in (1, 3, 5)] == [False, True, True]
