"""Align-zero / Align-ada / Align-prop, last-layer, the alignment score, NTK models.

The Add task and the paper's experiments: tests/test_boopathy2022.py."""

import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp

import decorrelate.rules.align  # noqa: F401  (registers the align rules)
from conftest import bp_grads, rule_grads
from decorrelate import Loss, UserError, build_model, get_rule, make_config, resume, train
from decorrelate.align import AlignmentProbe
from decorrelate.checkpoint import load_checkpoint
from decorrelate.data.addtask import add_targets
from decorrelate.metrics import (
    ConvGeometry,
    alignment_score,
    alignment_scores,
    kernel_alignment_score,
    shuffled,
)
from decorrelate.models import NTKScale, VanillaRNN
from decorrelate.rules import rule_class

TIMING = {"seconds", "epoch_seconds", "eval_seconds"}


def ntk_mlp(seed=0):
    torch.manual_seed(seed)
    return build_model("mlp-ntk", (1, 5, 5), 4, widths=[16, 12], activation="relu").double()


def ntk_convnet(seed=0):
    torch.manual_seed(seed)
    return build_model("convnet-ntk", (2, 8, 8), 3, channels=[4, 5], activation="relu").double()


def ntk_rnn(seed=0):
    torch.manual_seed(seed)
    return build_model("rnn-ntk", (9, 1), 1, widths=[12], activation="relu").double()


CASES = {
    "mlp": (ntk_mlp, (1, 5, 5), Loss("mse-shifted"), 4),
    "convnet-bn": (ntk_convnet, (2, 8, 8), Loss("cross-entropy"), 3),
    "rnn": (ntk_rnn, None, Loss("mse"), None),
}


def batch(case: str, seed: int = 1):
    _, shape, _, classes = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    if case == "rnn":
        x = torch.bernoulli(torch.full((6, 9, 1), 0.5), generator=gen).double()
        return x, add_targets(x)
    x = torch.randn(10, *shape, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, classes, (10,), generator=gen)


def sgd_steps(model, loss, steps=3, lr=0.5, case="mlp"):
    """Move the model away from its initialisation with a few BP steps."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for i in range(steps):
        x, y = batch(case, seed=10 + i)
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["align-zero", "align-ada", "align-prop"])
def test_align_rules_equal_bp_exactly_at_initialisation(case, name):
    make, _, loss, _ = CASES[case]
    model = make()
    x, y = batch(case)
    expected = bp_grads(model, x, y, loss)
    rule = get_rule(name)
    rule.attach(model, loss)
    got = rule_grads(rule, model, x, y)
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-10, atol=1e-13)


def test_align_zero_is_gradient_descent_on_the_linearised_network():
    """ΔW = J_0ᵀ e: the gradient of the network linearised at init, driven by the real error."""
    model = ntk_mlp()
    params0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = Loss("mse-shifted")
    rule = get_rule("align-zero")
    rule.attach(model, loss)
    sgd_steps(model, loss)  # the real network has moved: f_t ≠ f_lin
    x, y = batch("mlp")
    got = rule_grads(rule, model, x, y)

    frozen = rule.twin

    def f_lin(p):  # f_0(x) + J_0 (θ − θ_0), by a forward-mode product at θ_0
        tangent = {n: p[n] - params0[n] for n in p}
        out0, change = jvp(lambda q: functional_call(frozen, q, (x,)), (params0,), (tangent,))
        return out0 + change

    theta_t = {n: p.detach().clone() for n, p in model.named_parameters()}
    out_t = model(x).detach().requires_grad_(True)
    (error,) = torch.autograd.grad(loss(out_t, y), out_t)
    expected = grad(lambda p: (error * f_lin(p)).sum())(theta_t)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-10, atol=1e-13)
    # and it is not BP any more (the network is no longer at its initialisation)
    bp = bp_grads(model, x, y, loss)
    assert not torch.allclose(got["2.weight"], bp["2.weight"], rtol=1e-3)


def test_align_ada_uses_twin_deltas_and_current_presynaptic_activity():
    model = ntk_mlp()
    loss = Loss("mse-shifted")
    ada, zero = get_rule("align-ada"), get_rule("align-zero")
    ada.attach(model, loss)
    zero.attach(model, loss)
    sgd_steps(model, loss)
    x, y = batch("mlp")
    got_ada = rule_grads(ada, model, x, y)
    got_zero = rule_grads(zero, model, x, y)
    bp = bp_grads(model, x, y, loss)
    # readout: align-ada is e ⊗ current features = BP's readout gradient; align-zero is not
    torch.testing.assert_close(got_ada["8.weight"], bp["8.weight"], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got_ada["8.bias"], bp["8.bias"], rtol=1e-10, atol=1e-13)
    assert not torch.allclose(got_zero["8.weight"], bp["8.weight"], rtol=1e-3)
    # hidden layer 2 by hand: δ from the twin, input activity from the current network
    acts = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, k=k: acts.__setitem__(k, (a[0], o)))
        for k, m in (("real", model[5]), ("twin", ada.twin[5]))
    ]
    out_t = model(x).detach().requires_grad_(True)
    (error,) = torch.autograd.grad(loss(out_t, y), out_t)
    twin_out = ada.twin(x.clone().requires_grad_(True))  # a graph through the frozen twin
    for h in hooks:
        h.remove()
    (delta,) = torch.autograd.grad(twin_out, acts["twin"][1], error)
    torch.testing.assert_close(got_ada["5.weight"], delta.T @ acts["real"][0].detach())
    torch.testing.assert_close(got_zero["5.weight"], delta.T @ acts["twin"][0].detach())
    torch.testing.assert_close(got_ada["5.bias"], delta.sum(0))


def bn_backward(a: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """∂L/∂a from ∂L/∂BN(a) for batch norm with batch statistics per channel (no affine)."""
    dims = (0, 2, 3)
    mean, var = a.mean(dims, keepdim=True), a.var(dims, unbiased=False, keepdim=True)
    std = (var + eps).sqrt()
    xhat = (a - mean) / std
    return (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True)) / std


def conv_update(x: torch.Tensor, delta: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Σ over samples and positions of δ ⊗ input patch, shaped like the kernel."""
    patches = nn.functional.unfold(x, conv.kernel_size, padding=conv.padding)  # [B, C_in·9, L]
    return torch.einsum("bol,bil->oi", delta.flatten(2), patches).reshape(conv.weight.shape)


def test_align_ada_mixes_through_the_real_networks_batchnorm_by_default():
    """ΔW = BN_realᵀ(δ at the twin's BN output) ⊗ current input, written out by hand."""
    model = ntk_convnet()
    loss = Loss("cross-entropy")
    real_mix, twin_mix = get_rule("align-ada"), get_rule("align-ada", bn_mixing="twin")
    real_mix.attach(model, loss)
    twin_mix.attach(model, loss)
    sgd_steps(model, loss, steps=4, lr=0.5, case="convnet-bn")  # BN statistics now differ
    x, y = batch("convnet-bn", seed=3)
    got_real = rule_grads(real_mix, model, x, y)
    got_twin = rule_grads(twin_mix, model, x, y)

    twin = real_mix.twin
    seen: dict[str, tuple] = {}
    hooks = [
        net[i].register_forward_hook(lambda m, a, o, k=(tag, i): seen.__setitem__(k, (a[0], o)))
        for tag, net in (("real", model), ("twin", twin))
        for i in (1, 2, 6, 7)  # the two convs and their batch norms
    ]
    with torch.no_grad():
        out_t = model(x)
    out_t.requires_grad_(True)
    (error,) = torch.autograd.grad(loss(out_t, y), out_t)
    out0 = twin(x.clone().requires_grad_(True))
    for h in hooks:
        h.remove()
    post = torch.autograd.grad(out0, [seen["twin", 2][1], seen["twin", 7][1]], error)
    for (conv_i, bn_i), g in zip(((1, 2), (6, 7)), post, strict=True):
        eps = model[bn_i].eps
        real_in, real_pre = seen["real", conv_i]
        twin_pre = seen["twin", conv_i][1].detach()
        delta_real = bn_backward(real_pre, g, eps)  # the network's own batch statistics
        delta_twin = bn_backward(twin_pre, g, eps)  # the twin's
        conv = model[conv_i]
        for got, delta in ((got_real, delta_real), (got_twin, delta_twin)):
            expected = conv_update(real_in, delta, conv)
            torch.testing.assert_close(got[f"{conv_i}.weight"], expected, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(got[f"{conv_i}.bias"], delta.sum((0, 2, 3)))
        # the two mixing points really differ once the network has moved
        rel = (got_real[f"{conv_i}.weight"] - got_twin[f"{conv_i}.weight"]).norm()
        assert rel / got_real[f"{conv_i}.weight"].norm() > 1e-3
    torch.testing.assert_close(got_real["12.weight"], got_twin["12.weight"])  # no BN: same
    with pytest.raises(UserError, match="mixing"):
        get_rule("align-ada", bn_mixing="after")
    assert rule_class("align-ada").from_config(make_config({})).bn_mixing == "real"
    twin_cfg = make_config({"align_bn_mixing": "twin"})
    assert rule_class("align-ada").from_config(twin_cfg).bn_mixing == "twin"


@pytest.mark.parametrize("name", ["align-ada", "align-zero"])
def test_align_rules_match_the_authors_stop_gradient_construction(name):
    """The authors' TF graph, in torch: twin input x_lin + (x − sg x) after each BN, real layers
    on sg(x), loss L(f + f_lin − sg f_lin) (align-ada: grads of the real weights) or
    L(sg f + f_lin − sg f_lin) (align-zero: grads of the twin's weights, applied to the real)."""
    model = ntk_convnet()
    loss = Loss("mse-shifted")
    rule = get_rule(name)
    rule.attach(model, loss)
    sgd_steps(model, loss, steps=3, lr=0.5, case="convnet-bn")
    x, y = batch("convnet-bn", seed=4)
    got = rule_grads(rule, model, x, y)

    twin = rule.twin
    lin = {n: p.detach().clone().requires_grad_(True) for n, p in twin.named_parameters()}
    xr, xl = x, x
    for i, (m, m0) in enumerate(zip(model, twin, strict=True)):
        own = {k.split(".", 1)[1]: v for k, v in lin.items() if k.split(".", 1)[0] == str(i)}
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            xr = m(xr.detach())
        elif isinstance(m, nn.BatchNorm2d):
            xr = nn.functional.batch_norm(xr, None, None, training=True, eps=m.eps)
        else:
            xr = m(xr)
        xl = functional_call(m0, own, (xl,)) if own else m0(xl)
        if isinstance(m, nn.BatchNorm2d):
            xl = xl + (xr - xr.detach())
    zero = name == "align-zero"
    value = loss((xr.detach() if zero else xr) + xl - xl.detach(), y)
    targets = list(lin.values()) if zero else list(model.parameters())
    expected = torch.autograd.grad(value, targets)
    for (n, _), e in zip(model.named_parameters(), expected, strict=True):
        # conv biases before BN get ~0 (rounding) from both: compare on the layer's scale
        scale = got[n.rsplit(".", 1)[0] + ".weight"].abs().max()
        torch.testing.assert_close(got[n], e, rtol=0, atol=1e-12 * float(scale))


def test_twin_is_frozen_and_batchnorm_statistics_stay_put():
    model = ntk_convnet()
    rule = get_rule("align-ada")
    rule.attach(model, Loss())
    before = {k: v.clone() for k, v in rule.twin.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        x, y = batch("convnet-bn", seed=i)
        opt.zero_grad()
        rule.backward(model, x, y)
        opt.step()
    after = rule.twin.state_dict()
    for k, v in before.items():
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    assert not any(p.requires_grad for p in rule.twin.parameters())
    assert model[2].running_var.sub(1).abs().max() > 0  # the real net's BN statistics moved
    assert rule.diagnostics()["weight_change/1"] > 0


@pytest.mark.parametrize("name", ["align-zero", "align-ada"])
@pytest.mark.parametrize("norm", ["batchnorm", "layernorm"])
def test_align_rules_train_norm_affine_parameters_as_layers(name, norm):
    """γ, β of a norm are a layer (a = γ⊙x̂ + β): at initialisation the update is BP's."""
    torch.manual_seed(0)
    layer = nn.BatchNorm1d(6) if norm == "batchnorm" else nn.LayerNorm(6)
    model = nn.Sequential(nn.Linear(4, 6), layer, nn.Tanh(), nn.Linear(6, 2)).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    expected = bp_grads(model, x, y, Loss())
    rule = get_rule(name)
    rule.attach(model, Loss())
    got = rule_grads(rule, model, x, y)
    assert got.keys() == expected.keys() and "1.weight" in got
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-10, atol=1e-13)


def test_align_rules_refuse_parameters_outside_every_layer():
    class WithOffset(nn.Module):
        def __init__(self):
            super().__init__()
            self.offset = nn.Parameter(torch.zeros(4))
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(x + self.offset)

    with pytest.raises(UserError, match="offset is a parameter outside every layer"):
        get_rule("align-zero").attach(WithOffset(), Loss())


def test_align_prop_keeps_initial_weights_as_feedback():
    model = ntk_mlp()
    w0 = {i: model[i].weight.detach().clone() for i in (2, 5, 8)}
    loss = Loss("mse-shifted")
    rule = get_rule("align-prop")
    rule.attach(model, loss)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for i in range(3):
        x, y = batch("mlp", seed=i)
        opt.zero_grad()
        rule.backward(model, x, y)
        opt.step()
    for i, w in w0.items():
        torch.testing.assert_close(model[i].fa_feedback, w, rtol=0, atol=0)
        assert not torch.equal(model[i].weight.detach(), w)
    # hand-computed: the error reaches layer 5's output through W0 of layer 8 (and NTK scaling)
    x, y = batch("mlp")
    got = rule_grads(rule, model, x, y)
    h = {}
    hooks = [
        model[k].register_forward_hook(lambda m, a, o, k=k: h.__setitem__(k, o))
        for k in (5, 6, 7, 8)
    ]
    with torch.no_grad():
        out = model(x)
    for hook in hooks:
        hook.remove()
    e = out - loss.target(y, 4)
    e = e / x.shape[0]
    delta5 = (e @ w0[8]) * model[7].factor * (h[5] > 0)
    torch.testing.assert_close(got["5.bias"], delta5.sum(0))
    assert rule.diagnostics()["wb_angle/8"] > 0


def test_last_layer_trains_only_the_readout():
    model = ntk_mlp()
    loss = Loss("mse-shifted")
    x, y = batch("mlp")
    expected = bp_grads(model, x, y, loss)
    rule = get_rule("last-layer")
    rule.attach(model, loss)
    got = rule_grads(rule, model, x, y)
    assert set(got) == {"8.weight", "8.bias"}
    torch.testing.assert_close(got["8.weight"], expected["8.weight"])
    with rule.suspended():  # the BP reference of the metrics still sees every layer
        assert set(bp_grads(model, x, y, loss)) == set(expected)


# ----------------------------------------------------------------------------- training loop


@pytest.fixture
def ntk_tiny(tiny):
    return {
        **tiny,
        "model": "mlp-ntk",
        "activation": "relu",
        "loss": "mse-shifted",
        "optimizer": "sgd",
        "momentum": 0.0,
        "lr": 0.3,
    }


@pytest.mark.parametrize("rule", ["align-zero", "align-ada", "align-prop", "last-layer"])
def test_align_rules_train_and_resume_bit_identically(ntk_tiny, tmp_path, rule):
    cfg = {**ntk_tiny, "rule": rule, "alignment_every": 4}
    full = train({**cfg, "out": str(tmp_path / "full")}, log=None)
    part = {**cfg, "out": str(tmp_path / "part"), "epochs": 1}
    train(part, log=None)
    resumed = resume(tmp_path / "part", {"epochs": 2}, log=None)

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]

    assert strip(resumed.history) == strip(full.history)
    assert full.history[-1]["train_loss"] < full.history[0]["train_loss"]
    if rule in ("align-zero", "align-ada"):
        assert "twin" in load_checkpoint(tmp_path / "full")["rule"]
    lines = (tmp_path / "full" / "alignment.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    if rule != "last-layer":  # at step 0 the align rules are BP
        assert all(v < 1e-3 for k, v in first.items() if k.startswith("angle/"))


def test_alignment_probe_matches_bp_and_scores_the_prediction():
    model = ntk_mlp()
    loss = Loss("mse-shifted")
    x, y = batch("mlp")
    expected = bp_grads(model, x, y, loss)
    probe = AlignmentProbe()
    probe.attach(model, loss)
    got = rule_grads(probe, model, x, y)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.step()  # one step from init: ΔW = −η g and ΔŴ = −g, so every score is 1
    scores = probe.diagnostics()
    for name in ("2", "5", "8"):
        assert scores[f"align_score/{name}"] == pytest.approx(1.0, abs=1e-9)
        assert scores[f"align_score_shuffled/{name}"] < 0.9
    state = probe.state_dict()
    other = AlignmentProbe()
    other.attach(ntk_mlp(seed=5), loss)
    other.load_state_dict(state)
    torch.testing.assert_close(other.predicted["8"], probe.predicted["8"])


# ----------------------------------------------------------------------------- alignment score


def test_alignment_score_identical_scaled_disjoint_and_shuffled():
    gen = torch.Generator().manual_seed(0)
    # error-scaled input correlations: ΔW = E Xᵀ with inputs in a low-dimensional subspace
    basis = torch.randn(200, 5, generator=gen, dtype=torch.float64)
    inputs = basis @ torch.randn(5, 300, generator=gen, dtype=torch.float64)
    dw = torch.randn(30, 300, generator=gen, dtype=torch.float64) @ inputs.T  # [30, 200]
    assert alignment_score(dw, dw) == pytest.approx(1.0, abs=1e-12)
    assert alignment_score(dw, -3.0 * dw) == pytest.approx(1.0, abs=1e-12)
    other_outputs = torch.randn(30, 300, generator=gen, dtype=torch.float64) @ inputs.T
    assert alignment_score(dw, other_outputs) > 0.6  # same input correlations, other errors
    control = alignment_score(dw, shuffled(dw, gen))
    assert 0 <= control < 0.1
    left = torch.zeros(8, 10, dtype=torch.float64)
    right = torch.zeros(8, 10, dtype=torch.float64)
    left[:, :5], right[:, 5:] = 1.0, 1.0
    assert alignment_score(left, right) == 0.0  # disjoint inputs
    # tall matrices take the other exact branch; the probe estimate agrees with the exact score
    tall = torch.randn(50, 8, generator=gen, dtype=torch.float64)
    tall2 = tall + 0.5 * torch.randn(50, 8, generator=gen, dtype=torch.float64)
    exact = alignment_score(tall, tall2)
    estimate = alignment_score(tall, tall2, probes=4000, generator=gen)
    assert estimate == pytest.approx(exact, abs=0.03)
    assert math.isnan(alignment_score(torch.zeros(3, 4), torch.ones(3, 4)))
    kernels = (torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="geometry"):  # a kernel alone is not the operator
        alignment_scores({"c": kernels})
    geometry = {"c": ConvGeometry.of(nn.Conv2d(2, 4, 3, padding=1), (5, 5))}
    conv = alignment_scores({"c": kernels}, geometry=geometry)
    assert set(conv) == {"align_score/c", "align_score_shuffled/c", "align_score_kernel/c"}


def operator_matrix(kernel: torch.Tensor, conv: nn.Conv2d, size) -> torch.Tensor:
    """The conv's effective matrix [C_out·H'·W', C_in·H·W]: the conv of every basis input."""
    n = kernel.shape[1] * size[0] * size[1]
    basis = torch.eye(n, dtype=torch.float64).reshape(n, kernel.shape[1], *size)
    layer = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=False,
    ).double()
    with torch.no_grad():
        layer.weight.copy_(kernel)
        return layer(basis).reshape(n, -1).T


def gram_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """tr(AᵀA BᵀB) / (‖AᵀA‖_F ‖BᵀB‖_F), straight from the paper's formula."""
    ga, gb = a.T @ a, b.T @ b
    return float(
        torch.trace(ga @ gb) / (torch.linalg.matrix_norm(ga) * torch.linalg.matrix_norm(gb))
    )


@pytest.mark.parametrize(
    "kernel_size, stride, padding, dilation, size",
    [(3, 1, 1, 1, (7, 6)), (3, 2, 1, 1, (7, 7)), (5, 2, 0, 1, (9, 8)), (3, 1, 2, 2, (6, 7))],
)
def test_conv_alignment_score_is_the_operators(kernel_size, stride, padding, dilation, size):
    """Score of the conv as a linear map on flattened inputs, against its explicit matrix."""
    gen = torch.Generator().manual_seed(kernel_size + stride)
    conv = nn.Conv2d(3, 4, kernel_size, stride, padding, dilation)
    dw = torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64)
    dw_hat = dw + 0.7 * torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64)
    geometry = ConvGeometry.of(conv, size)
    expected = gram_cosine(operator_matrix(dw, conv, size), operator_matrix(dw_hat, conv, size))
    # sums of O(10³) products of O(1) doubles: exact to ~1e-13
    assert alignment_score(dw, dw_hat, geometry=geometry) == pytest.approx(expected, abs=1e-12)
    # it is not the flattened kernel's score (boundary and overlap structure matter)
    assert abs(kernel_alignment_score(dw, dw_hat) - expected) > 0.02
    # Hutchinson estimate: relative std of each trace ~ sqrt(2/k) / (effective rank)^½
    estimate = alignment_score(dw, dw_hat, geometry=geometry, probes=4000, generator=gen)
    assert estimate == pytest.approx(expected, abs=0.02)


def test_alignment_probe_scores_conv_layers_as_operators():
    model = ntk_convnet()
    loss = Loss("cross-entropy")
    probe = AlignmentProbe()
    probe.attach(model, loss)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for i in range(3):
        x, y = batch("convnet-bn", seed=20 + i)
        opt.zero_grad()
        probe.backward(model, x, y)
        opt.step()
    scores = probe.diagnostics()
    changes = probe.changes()
    for name, size in (("1", (8, 8)), ("6", (4, 4))):
        conv = model[int(name)]
        dw, dw_hat = changes[name]
        expected = gram_cosine(operator_matrix(dw, conv, size), operator_matrix(dw_hat, conv, size))
        assert scores[f"align_score/{name}"] == pytest.approx(expected, abs=1e-10)
        assert scores[f"align_score_kernel/{name}"] == pytest.approx(
            kernel_alignment_score(dw, dw_hat), abs=1e-12
        )
    other = AlignmentProbe()
    other.attach(ntk_convnet(seed=3), loss)
    other.load_state_dict(probe.state_dict())
    assert other.input_sizes == {"1": (8, 8), "6": (4, 4)}


# ----------------------------------------------------------------------------- models


def test_ntk_parameterisation():
    torch.manual_seed(0)
    model = build_model("mlp-ntk", (1, 28, 28), 10, widths=[256, 256], activation="relu")
    linears = [m for m in model if isinstance(m, nn.Linear)]
    scales = [m for m in model if isinstance(m, NTKScale)]
    assert [s.fan_in for s in scales] == [784, 256, 256]
    assert linears[1].weight.std().item() == pytest.approx(1.0, abs=0.02)
    assert all(float(lin.bias.detach().abs().max()) == 0 for lin in linears)
    x = torch.randn(3, 1, 28, 28)
    h = torch.relu(x.flatten(1) @ linears[0].weight.T / 28)
    h = torch.relu(h @ linears[1].weight.T / 16)
    torch.testing.assert_close(model(x), h @ linears[2].weight.T / 16)
    conv = build_model("convnet-ntk", (1, 28, 28), 10, channels=[8, 8], activation="relu")
    norms = [m for m in conv if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 2 and not any(n.affine for n in norms)
    assert sum(isinstance(m, nn.MaxPool2d) for m in conv) == 2
    assert conv(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    standard = build_model("mlp", (4,), 2, widths=[3], parameterization="ntk")
    assert isinstance(standard[1], NTKScale)
    with pytest.raises(UserError, match="parameterization"):
        build_model("mlp", (4,), 2, parameterization="mup")


def test_vanilla_rnn_follows_its_equation():
    torch.manual_seed(0)
    rnn = VanillaRNN(2, 6, 3, parameterization="ntk")
    x = torch.randn(4, 5, 2)
    h = torch.zeros(4, 6)
    outs = []
    for t in range(5):
        pre = x[:, t] @ rnn.input.weight.T / math.sqrt(2) + rnn.input.bias
        pre = pre + h @ rnn.recurrent.weight.T / math.sqrt(6)
        h = torch.relu(pre)
        outs.append(h @ rnn.readout.weight.T / math.sqrt(6) + rnn.readout.bias)
    torch.testing.assert_close(rnn(x), torch.stack(outs, 1))
    with pytest.raises(UserError, match="batch, time"):
        rnn(torch.zeros(4, 2))


@pytest.mark.parametrize("name", ["align-zero", "align-ada"])
@pytest.mark.parametrize("conv", [False, True])
def test_align_rules_on_decorrelated_layers_equal_bp_when_twin_is_current(name, conv):
    """Decorrelated layers (a = W R x): ΔW = δ (R x)ᵀ, mapped through the wrapper's Rᵀ."""
    from decorrelate.nn import decorrelate, local_update

    model = decorrelate(ntk_convnet() if conv else ntk_mlp(), "scaled", lr=0.05)
    case = "convnet-bn" if conv else "mlp"
    loss = CASES[case][2]
    for i in range(2):  # learn R ≠ I first
        model(batch(case, seed=20 + i)[0]).sum().backward()
        local_update(model)
    assert any(float((m.R - torch.eye(m.R.shape[0])).abs().max()) > 1e-4 for m in _decors(model))
    x, y = batch(case)
    expected = bp_grads(model, x, y, loss)
    rule = get_rule(name)
    rule.attach(model, loss)  # the twin is taken now, so it equals the network
    got = rule_grads(rule, model, x, y)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-12)


def _decors(model):
    from decorrelate.nn import decorrelators

    return [m for _, m in decorrelators(model)]
