"""Decorrelation (decorrelate.nn): the maths of every method, the wrappers, conversion, safety.

Every test uses seeded generators and small sizes; numbers are checked against independent
computations (eigendecompositions, explicit unfold → R → W, autograd gradcheck).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decorrelate.errors import TrainingDiverged, UserError
from decorrelate.nn import (
    METHODS,
    DecorConv2d,
    DecorLinear,
    capturing,
    decorrelate,
    decorrelators,
    local_stats,
    local_update,
)
from decorrelate.nn.sampling import conv_patches

LEARNED = ("copi", "dbp", "scaled")


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- helpers


def factor_mixing(d: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Generator]:
    """x = A·[f; e]: two shared factors plus private noise ⇒ mean |corr| ≈ 0.47, cond(C) ≈ 300."""
    gen = torch.Generator().manual_seed(seed)
    loads = 0.5 + torch.rand(d, 2, generator=gen)
    loads[:, 1] *= torch.sign(torch.randn(d, generator=gen))
    noise = 0.3 + 0.7 * torch.rand(d, generator=gen)
    return torch.cat([loads, torch.diag(noise)], 1), gen


def draw(mixing: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, mixing.shape[1], generator=gen) @ mixing.T


def mean_abs_corr(samples: torch.Tensor) -> float:
    """Mean |C_ij| / √(C_ii C_jj) over i ≠ j of the (uncentred) second moment."""
    c = samples.T @ samples / len(samples)
    s = c.diagonal().rsqrt()
    corr = c * s[:, None] * s[None, :]
    d = len(c)
    return float((corr.abs().sum() - corr.diagonal().abs().sum()) / (d * (d - 1)))


def inv_sqrt(c: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(c.double())
    return (evecs * (evals + ridge).rsqrt()) @ evecs.T


def train_on(layer: DecorLinear, mixing, gen, steps: int, batch: int = 256) -> None:
    for _ in range(steps):
        layer(draw(mixing, batch, gen))
        layer.update()


def small_convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.LeakyReLU(0.01),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.LeakyReLU(0.01),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 16),
        nn.LeakyReLU(0.01),
        nn.Linear(16, 3),
    )


# ----------------------------------------------------------------------------- fixed points


@pytest.mark.parametrize(("method", "lr"), [("copi", 0.01), ("dbp", 0.02), ("scaled", 0.005)])
def test_learned_rules_decorrelate_and_reach_their_fixed_point(method: str, lr: float) -> None:
    mixing, gen = factor_mixing()
    layer = decorrelate(nn.Linear(24, 3), method, lr=lr, sample_frac=0.25)
    train_on(layer, mixing, gen, steps=400)
    # z power averaged over the last steps (scaled's gain is re-estimated every step)
    x = draw(mixing, 20000, gen)
    power = []
    for _ in range(50):
        layer(draw(mixing, 256, gen))
        layer.update()
        power.append(float((x @ layer.R.T).square().sum() / x.square().sum()))
    z = x @ layer.R.T
    assert mean_abs_corr(x) > 0.4
    assert mean_abs_corr(z) < mean_abs_corr(x) / 10
    var = (z.T @ z / len(z)).diagonal()
    if method == "copi":  # decorrelated; variances shrink instead of being controlled
        assert sum(power) / len(power) < 0.5
    elif method == "dbp":  # whitened to unit variance
        assert torch.allclose(var, torch.ones_like(var), atol=0.1)
    else:  # whitened up to one scale, which preserves the input power
        assert float(var.max() / var.min()) < 1.25
        assert torch.linalg.cond(z.T @ z) < 1.6
        assert sum(power) / len(power) == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("method", ["dbp", "zca"])
def test_demean_whitens_the_covariance_not_the_second_moment(method: str) -> None:
    mixing, gen = factor_mixing()
    offset = 3.0 * torch.linspace(-1, 1, 24)
    kw = {"lr": 0.02} if method == "dbp" else {"every": 5}
    layer = decorrelate(nn.Linear(24, 3), method, demean=True, sample_frac=0.25, **kw)
    for _ in range(300):
        layer(draw(mixing, 128, gen) + offset)
        layer.update()
    torch.testing.assert_close(layer.running_mean, offset, atol=0.1, rtol=0)
    x = draw(mixing, 20000, gen) + offset
    z = x @ layer.R.T
    cov = torch.cov(z.T)
    assert torch.allclose(cov, torch.eye(24), atol=0.12)
    assert not torch.allclose(z.T @ z / len(z), torch.eye(24), atol=0.5)


@pytest.mark.parametrize("method", ["zca", "newton"])
def test_exact_methods_match_an_eigendecomposition(method: str) -> None:
    mixing, gen = factor_mixing()
    layer = decorrelate(nn.Linear(24, 3), method, lr=0.05, eps=1e-3, every=5, blend=1.0)
    train_on(layer, mixing, gen, steps=200)
    cov = layer.running_cov
    reference = inv_sqrt(cov, ridge=1e-3 * float(cov.diagonal().mean()))
    err = (layer.R.double() - reference).norm() / reference.norm()
    assert err < 1e-4
    # and R whitens the population: R C Rᵀ ≈ I
    population = mixing @ mixing.T
    white = layer.R @ population @ layer.R.T
    assert torch.allclose(white, torch.eye(24), atol=0.15)


def test_exact_methods_wait_for_enough_samples_recompute_every_n_and_blend() -> None:
    mixing, gen = factor_mixing()
    layer = decorrelate(nn.Linear(24, 3), "zca", every=4, sample_frac=0.05)  # 4 rows per update
    train_on(layer, mixing, gen, steps=4, batch=64)  # 16 samples < d = 24: still the identity
    assert torch.equal(layer.R, torch.eye(24))
    train_on(layer, mixing, gen, steps=3, batch=64)  # update 7: not due yet
    assert torch.equal(layer.R, torch.eye(24))
    train_on(layer, mixing, gen, steps=1, batch=64)  # update 8: due, 32 samples seen
    cov = layer.running_cov
    target = inv_sqrt(cov, ridge=1e-3 * float(cov.diagonal().mean())).float()
    expected = torch.eye(24) + 0.1 * (target - torch.eye(24))  # default blend: 10 % of the way
    torch.testing.assert_close(layer.R, expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- forward maths


def explicit_conv(x, weight, bias, R, stride, padding, dilation):
    """The definition: unfold patches, decorrelate each with R, apply W."""
    out_c = weight.shape[0]
    patches = F.unfold(x, weight.shape[2:], dilation=dilation, padding=padding, stride=stride)
    z = torch.einsum("ij,bjl->bil", R, patches)
    a = torch.einsum("oj,bjl->bol", weight.reshape(out_c, -1), z) + bias[None, :, None]
    h = (x.shape[2] + 2 * padding - dilation * (weight.shape[2] - 1) - 1) // stride + 1
    w = (x.shape[3] + 2 * padding - dilation * (weight.shape[3] - 1) - 1) // stride + 1
    return a.reshape(x.shape[0], out_c, h, w)


def random_r(d: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    return (torch.eye(d) + 0.3 * torch.randn(d, d, generator=gen)).to(dtype)


@pytest.mark.parametrize(("stride", "padding", "dilation"), [(2, 1, 1), (1, 2, 2)])
def test_folded_conv_equals_explicit_unfold_r_w(stride, padding, dilation) -> None:
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(3, 5, (3, 2), stride=stride, padding=padding, dilation=dilation)
    layer = decorrelate(conv, "scaled")
    layer.R.copy_(random_r(18, gen))
    x = torch.randn(4, 3, 9, 8, generator=gen, requires_grad=True)
    out = layer(x)
    w = conv.weight.detach().clone().requires_grad_(True)
    b = conv.bias.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = explicit_conv(x2, w, b, layer.R, stride, padding, dilation)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn(out.shape, generator=gen)
    out.backward(grad_out)
    ref.backward(grad_out)
    torch.testing.assert_close(conv.weight.grad, w.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(conv.bias.grad, b.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert layer.R.grad is None


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(
    ("padding", "stride", "dilation"), [(0, 1, 1), (1, 1, 1), ("same", 1, 1), (2, 2, 2)]
)
def test_conv_patch_sampler_matches_unfold_and_the_convolution(padding, stride, dilation) -> None:
    gen = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(2, 3, (2, 3), padding=padding, stride=stride, dilation=dilation)
    x = torch.randn(3, 2, 6, 7, generator=gen)
    everything = conv_patches(x, conv, count=10_000, seed=0, step=0)
    if padding != "same":
        unfolded = F.unfold(x, (2, 3), padding=padding, stride=stride, dilation=dilation)
        torch.testing.assert_close(everything, unfolded.transpose(1, 2).reshape(-1, 12))
    # each patch, times the weight, is the conv output at its position ('same' pads unevenly)
    out = conv(x)
    flat = everything @ conv.weight.reshape(3, -1).T + conv.bias
    torch.testing.assert_close(flat, out.permute(0, 2, 3, 1).reshape(-1, 3))
    # a subset of the images, a subset of the positions
    per_image = out.shape[2] * out.shape[3]
    subset = conv_patches(x, conv, count=10_000, seed=0, step=0, images=torch.tensor([2, 0]))
    torch.testing.assert_close(
        subset, torch.cat([everything[2 * per_image :], everything[:per_image]])
    )
    some = conv_patches(x, conv, count=5, seed=0, step=0, images=torch.tensor([1]))
    assert some.shape == (5, 12)
    rows_of_image_1 = everything[per_image : 2 * per_image]
    assert all(any(torch.equal(row, r) for r in rows_of_image_1) for row in some)


@pytest.mark.parametrize("fold", [True, False])
def test_linear_orders_of_products_agree(fold: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    base = nn.Linear(7, 5)
    layer = decorrelate(base, "dbp", fold=fold)
    layer.R.copy_(random_r(7, gen))
    x = torch.randn(6, 7, generator=gen, requires_grad=True)
    out = layer(x)
    w = base.weight.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = (x2 @ layer.R.T) @ w.T + base.bias.detach()
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(base.weight.grad, w.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_linear_picks_the_cheaper_order() -> None:
    hidden = decorrelate(nn.Linear(50, 100), "scaled")
    classifier = decorrelate(nn.Linear(50, 3), "scaled")
    x = torch.randn(32, 50, requires_grad=True)
    assert not hidden._fold_is_cheaper(x)  # 100 outputs > 32 rows: x Rᵀ
    assert classifier._fold_is_cheaper(x)  # 3 outputs: W R


@pytest.mark.parametrize("fold", [True, False])
def test_gradcheck_linear_wrapper(fold: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    layer = decorrelate(nn.Linear(5, 4), "copi", fold=fold).double()
    layer.R.copy_(random_r(5, gen, torch.float64))
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w, b = layer.layer.weight, layer.layer.bias
    assert torch.autograd.gradcheck(lambda x, w, b: layer(x), (x, w, b))


def test_gradcheck_conv_wrapper() -> None:
    gen = torch.Generator().manual_seed(5)
    layer = decorrelate(nn.Conv2d(2, 3, 3, stride=2, padding=1), "copi").double()
    layer.R.copy_(random_r(18, gen, torch.float64))
    x = torch.randn(2, 2, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w, b = layer.layer.weight, layer.layer.bias
    assert torch.autograd.gradcheck(lambda x, w, b: layer(x), (x, w, b))


def test_rule_helpers_fold_and_map_gradients_back() -> None:
    gen = torch.Generator().manual_seed(6)
    layer = decorrelate(nn.Conv2d(2, 3, 3), "scaled")
    layer.R.copy_(random_r(18, gen))
    eff = layer.effective_weight()
    torch.testing.assert_close(eff.reshape(3, -1), layer.weight.reshape(3, -1) @ layer.R)
    g_eff = torch.randn(eff.shape, generator=gen)
    (eff * g_eff).sum().backward()
    torch.testing.assert_close(layer.weight.grad, layer.weight_grad(g_eff))


# ----------------------------------------------------------------------------- conversion


def test_converted_mlp_and_convnet_are_unchanged_at_init() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 20), nn.LeakyReLU(0.01), nn.Linear(20, 20), nn.Linear(20, 4))
    cnn = small_convnet()
    for model, x in [(mlp, torch.randn(8, 12)), (cnn, torch.randn(5, 2, 8, 8))]:
        params = list(model.parameters())
        before = model(x)
        assert decorrelate(model, "scaled") is model
        assert all(p is q for p, q in zip(params, model.parameters(), strict=True))
        layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        wrapped = [m for _, m in decorrelators(model)]
        assert len(wrapped) == len(layers)  # every layer, first and classifier included
        assert [m.layer for m in wrapped] == layers
        assert [type(m) for m in wrapped] == [
            DecorConv2d if isinstance(m, nn.Conv2d) else DecorLinear for m in layers
        ]
        assert torch.equal(model(x), before)
        model.eval()
        assert torch.equal(model(x), before)


def test_exclude_and_names() -> None:
    model = nn.Sequential(OrderedDict(first=nn.Linear(4, 8), act=nn.ReLU(), head=nn.Linear(8, 2)))
    decorrelate(model, "copi", exclude=["head"])
    assert [name for name, _ in decorrelators(model)] == ["first"]
    assert type(model.head) is nn.Linear
    with pytest.raises(UserError, match="already decorrelated"):
        decorrelate(model, "copi")
    with pytest.raises(UserError, match=r"'nope'.*'first'"):
        decorrelate(nn.Sequential(OrderedDict(first=nn.Linear(2, 2))), exclude=["nope"])


def test_shared_layer_gets_one_wrapper() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    decorrelate(model, "scaled")
    assert model[0] is model[2]
    assert isinstance(model[0], DecorLinear)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"method": "pca"}, "unknown decorrelation method 'pca'.*copi, dbp, scaled, zca, newton"),
        ({"method": "dbp", "lr": 0.0}, "lr=0.0"),
        ({"method": "dbp", "lr": float("nan")}, "lr=nan"),
        ({"method": "zca", "lr": 2.0}, r"lr=2.0 .*\(0, 1\]"),
        ({"method": "scaled", "sample_frac": 0.0}, "sample_frac"),
        ({"method": "scaled", "sample_frac": 1.5}, "sample_frac"),
        ({"method": "dbp", "kappa": 2.0}, "kappa"),
        ({"method": "scaled", "kappa": 0.1}, "'kappa' applies to dbp only"),
        ({"method": "scaled", "eps": 0.1}, "'eps' applies to zca, newton only"),
        ({"method": "scaled", "colour": 1}, "unknown decorrelation option.*colour"),
        ({"method": "newton", "iters": 0}, "iters"),
    ],
)
def test_bad_requests_are_user_errors(kwargs, pattern) -> None:
    with pytest.raises(UserError, match=pattern):
        decorrelate(nn.Linear(3, 3), **kwargs)


def test_a_model_without_layers_is_refused() -> None:
    # grouped / reflect-padded convolutions used to be refused here; they are decorrelated now
    # (tests/test_decorrelate_any.py)
    with pytest.raises(UserError, match=r"found no layer to decorrelate"):
        decorrelate(nn.Sequential(nn.ReLU()))


# ----------------------------------------------------------------------------- capture, update


def test_capture_policy_and_subsample_size() -> None:
    layer = decorrelate(nn.Linear(6, 4), "scaled")
    x = torch.randn(40, 6)
    with torch.no_grad():
        layer(x)
    assert layer._sample is None  # forward-only pass: nothing stored by default
    with torch.no_grad(), capturing(layer):
        layer(x)
    assert layer._sample[0].shape == (5, 6)  # ⌊0.1·40⌋ + 1
    assert layer.capture is None  # restored
    layer.update()
    assert layer._sample is None and int(layer.num_updates) == 1
    layer.update()  # nothing stored: no-op
    assert int(layer.num_updates) == 1
    layer.eval()
    layer(x)
    assert layer._sample is None  # eval mode never captures
    layer.train()
    layer.capture = False
    layer(x)
    assert layer._sample is None
    layer.capture = None
    rows = layer(torch.randn(40, 6, requires_grad=True))
    assert layer._sample is not None and not layer._sample[0].requires_grad
    assert rows.requires_grad


def test_sampled_rows_are_batch_rows_and_conv_samples_are_capped() -> None:
    layer = decorrelate(nn.Linear(6, 4), "copi", sample_frac=0.5)
    x = torch.randn(10, 6)
    layer(x)
    rows = layer._sample[0]
    assert rows.shape == (6, 6)
    assert all(any(torch.equal(r, xi) for xi in x) for r in rows)
    conv = decorrelate(nn.Conv2d(2, 3, 3, padding=1), "copi", max_samples=50)
    conv(torch.randn(30, 2, 8, 8))
    assert conv._sample[0].shape == (50, 18)


def test_local_update_and_stats_cover_every_layer() -> None:
    torch.manual_seed(0)
    model = decorrelate(small_convnet(), "scaled", lr=1e-3)
    x = torch.randn(16, 2, 8, 8)
    before = [m.R.clone() for _, m in decorrelators(model)]
    model(x).sum().backward()
    local_update(model)
    assert all(
        not torch.equal(b, m.R) for b, (_, m) in zip(before, decorrelators(model), strict=True)
    )
    stats = local_stats(model)
    for name, _ in decorrelators(model):
        for key in ("offdiag", "offdiag_input", "cond", "R_norm", "power_ratio", "lr_lambda"):
            assert math.isfinite(stats[f"decor/{name}/{key}"])


# ----------------------------------------------------------------------------- safety


@pytest.mark.parametrize("method", LEARNED)
def test_instability_is_detected_and_names_the_layer(method: str) -> None:
    gen = torch.Generator().manual_seed(7)
    model = nn.Sequential(OrderedDict(encoder=nn.Linear(20, 8)))
    decorrelate(model, method, lr=0.05)
    mixing = 3.0 * (torch.eye(20) + torch.ones(20, 20))  # λ_max ≈ 4000: η·λ_max ≫ 1
    with pytest.raises(TrainingDiverged, match=r"'encoder'.*--decor-lr, now 0\.05"):
        for _ in range(200):
            model(torch.randn(64, 20, generator=gen) @ mixing.T)
            local_update(model)


@pytest.mark.parametrize("method", METHODS)
def test_dead_constant_and_rare_inputs_keep_r_bounded(method: str) -> None:
    # 16 live inputs, then 5 always zero, 4 always the same constant (like standardised empty
    # MNIST pixels) and 2 active in one sample out of 2000 (like MNIST's rarely inked pixels)
    mixing, gen = factor_mixing(d=16)
    lr = {"copi": 0.02, "dbp": 0.05, "scaled": 0.01, "zca": 0.05, "newton": 0.05}[method]
    layer = decorrelate(nn.Linear(27, 4), method, lr=lr, sample_frac=0.25)

    def batch(n: int, rare_rate: float = 5e-4) -> tuple[torch.Tensor, torch.Tensor]:
        live = draw(mixing, n, gen)
        rare = 2.0 * (torch.rand(n, 2, generator=gen) < rare_rate)
        return live, torch.cat([live, torch.zeros(n, 5), torch.full((n, 4), -0.42), rare], 1)

    norms = []
    for step in range(800):
        layer(batch(64)[1])
        layer.update()
        if step in (399, 799):
            norms.append(float(layer.R.norm() / math.sqrt(27)))
    R = layer.R
    assert torch.isfinite(R).all()
    live, x = batch(20000, rare_rate=0.0)
    z = (x @ R.T)[:, :16]
    assert mean_abs_corr(z) < mean_abs_corr(live) / 10  # the live part is still decorrelated
    if method in LEARNED:
        # whitening the live part needs gains ≈ 1/√λ_min(C) ≈ 4; nothing else may grow
        assert norms[1] < 3
        assert norms[1] < 1.1 * norms[0]
        torch.testing.assert_close(R[16:], torch.eye(27)[16:])  # frozen at the identity
    else:  # the ridge caps the gain along the null directions at 1/√ridge
        ridge = 1e-3 * float(layer.running_cov.diagonal().mean())
        assert float(torch.linalg.matrix_norm(R, ord=2)) <= 1.2 / math.sqrt(ridge)


def test_state_dict_round_trip_resumes_exactly() -> None:
    mixing, gen = factor_mixing(d=12)

    def build(method: str, **kw) -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))
        return decorrelate(net, method, demean=True, **kw)

    for method, kw in [("scaled", {"lr": 0.01}), ("zca", {"every": 3})]:
        model = build(method, **kw)
        for _ in range(7):
            model(draw(mixing, 50, gen))
            local_update(model)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        assert any(k.endswith("running_mean") for k in state)
        if method == "zca":
            assert any(k.endswith("running_cov") for k in state)
        copy = build(method, **kw)
        copy.load_state_dict(state)
        for key, value in copy.state_dict().items():
            assert torch.equal(value, state[key]), key
        x = draw(mixing, 50, gen)
        model(x)
        copy(x)
        local_update(model)
        local_update(copy)  # same subsample choice, same statistics ⇒ same R
        for (_, a), (_, b) in zip(decorrelators(model), decorrelators(copy), strict=True):
            assert torch.equal(a.R, b.R)


# ----------------------------------------------------------------------------- speed options


def test_block_layout_uses_equal_blocks_that_divide_the_fan_in() -> None:
    from decorrelate.nn.methods import block_layout

    assert block_layout(3136, 512) == (7, 448)
    assert block_layout(1000, 512) == (2, 500)
    assert block_layout(784, 1000) == (1, 784)
    assert block_layout(784, None) == (1, 784)
    assert block_layout(13, 4) == (13, 1)  # prime: per-coordinate blocks


def block_mixing(blocks: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Generator]:
    """Correlations inside each block only (a block-diagonal mixing of factor models)."""
    parts = [factor_mixing(size, seed + i)[0] for i in range(blocks)]
    return torch.block_diag(*parts), torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("method", METHODS)
def test_block_diagonal_r_equals_independent_decorrelators_per_block(method: str) -> None:
    """With block_size, block i of R evolves exactly like a full R on the i-th input slice."""
    from decorrelate.nn.methods import DEFAULT_LR

    k, b = 3, 8
    lr = {"copi": 0.01, "dbp": 0.02, "scaled": 0.005}.get(method, DEFAULT_LR[method])
    extra = {"every": 2, "blend": 1.0} if method in ("zca", "newton") else {"var_floor": 0.0}
    opts = dict(lr=lr, sample_frac=1.0, **extra)
    blocked = decorrelate(nn.Linear(k * b, 3), method, block_size=b, **opts)
    singles = [decorrelate(nn.Linear(b, 3), method, **opts) for _ in range(k)]
    assert blocked.R.shape == (k, b, b)
    mixing, gen = block_mixing(k, b)
    for _ in range(30):
        x = draw(mixing, 64, gen)
        blocked(x)
        blocked.update()
        for i, single in enumerate(singles):
            single(x[:, i * b : (i + 1) * b])
            single.update()
    for i, single in enumerate(singles):
        if method in ("zca", "newton"):
            # same statistics per block; the ridge is relative to the mean over all blocks
            cov = blocked.running_cov
            torch.testing.assert_close(cov[i], single.running_cov, rtol=1e-4, atol=1e-5)
            reference = inv_sqrt(cov[i], ridge=1e-3 * float(cov.diagonal(0, 1, 2).mean()))
            assert (blocked.R[i].double() - reference).norm() / reference.norm() < 1e-4
        else:
            torch.testing.assert_close(blocked.R[i], single.R, rtol=1e-4, atol=1e-5)
    assert not torch.equal(blocked.R[0], torch.eye(b))
    # and the layer computes W·blockdiag(R)·x in both orders of products
    dense = blocked.dense_R()
    x = draw(mixing, 5, gen)
    expected = x @ dense.T @ blocked.weight.T + blocked.bias
    for fold in (True, False):
        blocked.fold_weight = fold
        torch.testing.assert_close(blocked(x), expected, rtol=1e-5, atol=1e-5)


def test_block_diagonal_conv_and_rule_helpers_match_the_dense_r() -> None:
    gen = torch.Generator().manual_seed(3)
    conv = decorrelate(nn.Conv2d(4, 5, 3, padding=1), "scaled", block_size=12)
    assert conv.R.shape == (3, 12, 12)
    conv.R.copy_(torch.eye(12) + 0.2 * torch.randn(3, 12, 12, generator=gen))
    dense = conv.dense_R()
    x = torch.randn(2, 4, 6, 6, generator=gen)
    w = conv.weight.reshape(5, -1)
    expected = explicit_conv(x, conv.weight, conv.bias, dense, 1, 1, 1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-4, atol=1e-5)
    g = torch.randn(5, 36, generator=gen)
    torch.testing.assert_close(conv.fold(w), w @ dense)
    torch.testing.assert_close(conv.weight_grad(g), g @ dense.T)
    torch.testing.assert_close(conv.transform(g), g @ dense.T)


def test_gradcheck_block_diagonal_linear() -> None:
    gen = torch.Generator().manual_seed(4)
    layer = decorrelate(nn.Linear(6, 4).double(), "copi", block_size=3)
    layer.R.copy_(torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(2, 3, 3, generator=gen))
    x = torch.randn(5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    for fold in (True, False):
        layer.fold_weight = fold
        assert torch.autograd.gradcheck(lambda inp: layer(inp), (x,))


def test_learned_rules_step_every_n_updates_only() -> None:
    mixing, gen = factor_mixing()
    every = decorrelate(nn.Linear(24, 3), "scaled", lr=0.005, every=3)
    train_on(every, mixing, gen, steps=2)
    assert torch.equal(every.R, torch.eye(24)) and int(every.num_updates) == 2
    train_on(every, mixing, gen, steps=1)
    assert not torch.equal(every.R, torch.eye(24))
    train_on(every, mixing, gen, steps=600)  # 201 steps of R: it still decorrelates
    x = draw(mixing, 4096, gen)
    assert mean_abs_corr(every.transform(x)) < mean_abs_corr(x) / 10


# ----------------------------------------------------------------------------- issue 15: fidelity


def copi_formula(R: torch.Tensor, z: torch.Tensor, lr: float) -> torch.Tensor:
    """The authors' copi step written out: R − η·offdiag(zᵀz/n)·R, on every sample row of z."""
    c = z.T @ z / z.shape[0]
    return R - lr * (c - torch.diag(torch.diagonal(c))) @ R


def test_whole_batch_r_update_is_the_formula_on_every_row() -> None:
    gen = torch.Generator().manual_seed(3)
    layer = decorrelate(nn.Linear(7, 4).double(), "copi", lr=0.05, sample_frac=1.0, var_floor=0.0)
    layer.R.copy_(torch.eye(7, dtype=torch.float64) + 0.1 * torch.randn(7, 7, generator=gen))
    R0 = layer.R.clone()
    x = torch.randn(37, 7, generator=gen, dtype=torch.float64)
    layer(x).sum().backward()
    local_update(layer)
    torch.testing.assert_close(layer.R, copi_formula(R0, x @ R0.T, 0.05), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("stride", "padding", "dilation"), [(1, 1, 1), (2, 1, 1), (1, "same", 2), (2, 0, 1)]
)
def test_uncapped_conv_r_update_uses_every_patch_position(stride, padding, dilation) -> None:
    gen = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, dilation=dilation).double()
    layer = decorrelate(conv, "copi", lr=0.01, sample_frac=1.0, max_samples=None, var_floor=0.0)
    d = 2 * 3 * 3
    layer.R.copy_(torch.eye(d, dtype=torch.float64) + 0.05 * torch.randn(d, d, generator=gen))
    R0 = layer.R.clone()
    x = torch.randn(5, 2, 9, 8, generator=gen, dtype=torch.float64)
    layer(x).sum().backward()
    pad = dilation * (3 - 1) // 2 if padding == "same" else padding
    patches = F.unfold(x, 3, dilation=dilation, padding=pad, stride=stride)  # [B, d, positions]
    rows = patches.transpose(1, 2).reshape(-1, d)  # every position of every image
    assert layer._sample[0].shape == rows.shape
    local_update(layer)
    torch.testing.assert_close(layer.R, copi_formula(R0, rows @ R0.T, 0.01), rtol=1e-12, atol=1e-14)


def test_conv_cap_is_an_option_with_the_documented_default() -> None:
    assert decorrelate(nn.Conv2d(2, 3, 3), "copi").config.max_samples == 256
    conv = decorrelate(nn.Conv2d(2, 3, 3, padding=1), "copi", max_samples=None, sample_frac=0.1)
    conv(torch.randn(30, 2, 8, 8))
    assert conv._sample[0].shape == (4 * 64, 18)  # every position of ⌊0.1·30⌋ + 1 images
    with pytest.raises(UserError, match="max_samples"):
        decorrelate(nn.Conv2d(2, 3, 3), "copi", max_samples=0)


@pytest.mark.parametrize("method", LEARNED)
@pytest.mark.parametrize("blocks", [1, 2])
def test_covariance_and_gram_forms_of_the_learned_update_agree(method, blocks, monkeypatch):
    """Many samples (uncapped conv patches) take the b×b covariance form, few the n×n Gram
    form; both must be the same step, frozen rows and per-block gains included."""
    from decorrelate.nn import methods

    choose_form = methods.use_covariance
    assert choose_form(40, 6) and not choose_form(6, 40)
    gen = torch.Generator().manual_seed(9)
    b, n = 6, 40
    cfg = methods.DecorConfig.create(method, lr=0.02, var_floor=0.05)
    x = torch.randn(blocks, n, b, generator=gen, dtype=torch.float64)
    x[0, :, 2] = 0.3 + 1e-4 * x[0, :, 2]  # a near-constant input: its row of R is frozen
    R0 = torch.eye(b, dtype=torch.float64) + 0.1 * torch.randn(blocks, b, b, generator=gen)
    z = x @ R0.mT
    results = []
    for cov in (False, True):
        monkeypatch.setattr(methods, "use_covariance", lambda n, b, cov=cov: cov)
        R, var = R0.clone(), torch.zeros(blocks, b, dtype=torch.float64)
        info = methods.learned_update(R, x, z, var, 0, cfg)
        results.append((R, float(info.lr_lambda), info.live))
    (r_gram, lam_gram, live), (r_cov, lam_cov, _) = results
    assert not bool(live[0, 2]) and bool(live.sum() > 1)
    torch.testing.assert_close(r_gram, r_cov, rtol=1e-12, atol=1e-13)
    assert lam_gram == pytest.approx(lam_cov, rel=1e-10)
    assert torch.equal(r_cov[0, 2], R0[0, 2])  # the frozen row stayed
