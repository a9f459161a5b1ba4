"""Decorrelation of every decorrelable layer kind (issue 16): the forward equals W (R x) written
from the formula (with explicit patches for convolutions), the local update decorrelates, the
gradients through a wrapper equal autograd's, what is left out is said, small subsamples warn,
bf16 layers compute in float32, fold() exports a plain model, R is block-diagonal above a size.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decorrelate import layers as L
from decorrelate.errors import UserError
from decorrelate.nn import (
    METHODS,
    DecorConv,
    DecorLinear,
    decorrelate,
    decorrelators,
    fold,
    local_update,
)
from decorrelate.nn.sampling import conv_patches

ROOT = Path(__file__).parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D`` as transformers defines it: x W + b, W stored [in, out]."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class SubLinear(nn.Linear):
    """A Linear subclass with Linear's own forward (timm heads, attention's out_proj)."""


class OddLinear(nn.Linear):
    """A Linear subclass that computes something else: R cannot be folded into it."""

    def forward(self, x):
        return super().forward(x).relu()


# ----------------------------------------------------------------------------- the formula


def explicit_patches(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """[B, *out, C·k₁·…·kₙ]: every input patch, from padding + Tensor.unfold (the formula)."""
    n = len(conv.kernel_size)
    if conv.padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
    elif conv.padding == "valid":
        pads = [(0, 0)] * n
    else:
        pads = [(p, p) for p in conv.padding]
    flat_pads = [v for before_after in reversed(pads) for v in before_after]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, flat_pads, mode=mode)
    for i, (k, s, d) in enumerate(zip(conv.kernel_size, conv.stride, conv.dilation, strict=True)):
        span = d * (k - 1) + 1
        xp = xp.unfold(2 + i, span, s)  # appends a dim of size span
        xp = xp[..., ::d]
    # xp: [B, C, *out, k1, ..., kn] → [B, *out, C, k1, ..., kn]
    perm = [0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n)]
    xp = xp.permute(perm)
    return xp.reshape(*xp.shape[: 1 + n], -1)


def conv_formula(conv, x, dense_r):
    """out[o] = W_g(o) · (R p)_chunk g(o) + b over every patch p: W (R x) for a convolution."""
    patches = explicit_patches(conv, x)
    z = patches @ dense_r.T
    g = conv.groups
    w = conv.weight.reshape(conv.out_channels, -1)
    chunk, per = z.shape[-1] // g, conv.out_channels // g
    outs = [z[..., i * chunk : (i + 1) * chunk] @ w[i * per : (i + 1) * per].T for i in range(g)]
    out = torch.cat(outs, -1)
    if conv.bias is not None:
        out = out + conv.bias
    return out.movedim(-1, 1)


def features_last_formula(layer, x, dense_r):
    """W (R x) + b: the layer's own forward on z = R x."""
    return layer(x @ dense_r.T)


def _kinds():
    yield "linear-3d-input", lambda: nn.Linear(6, 5), (4, 3, 6)
    yield "linear-subclass", lambda: SubLinear(6, 4, bias=False), (7, 6)
    yield "hf-conv1d", lambda: Conv1D(5, 6), (2, 3, 6)
    yield "conv1d", lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (2, 3, 9)
    yield (
        "conv1d-circular",
        lambda: nn.Conv1d(2, 3, 3, padding=2, padding_mode="circular"),
        (
            2,
            2,
            7,
        ),
    )
    yield (
        "conv2d-grouped-dilated",
        lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2),
        (
            2,
            4,
            7,
            7,
        ),
    )
    yield "conv2d-depthwise", lambda: nn.Conv2d(3, 3, 3, groups=3, padding="same"), (2, 3, 6, 6)
    yield (
        "conv2d-reflect",
        lambda: nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),
        (
            2,
            2,
            5,
            5,
        ),
    )
    yield "conv2d-same-even", lambda: nn.Conv2d(2, 3, 4, padding="same"), (2, 2, 6, 6)
    yield (
        "conv3d",
        lambda: nn.Conv3d(2, 3, (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1)),
        (
            2,
            2,
            4,
            5,
            5,
        ),
    )


KINDS = list(_kinds())
IDS = [k[0] for k in KINDS]


def _formula(layer, x, dense_r):
    if isinstance(layer, nn.modules.conv._ConvNd):
        return conv_formula(layer, x, dense_r)
    return features_last_formula(layer, x, dense_r)


def _moved_r(wrapper, gen):
    """Set R to a random non-identity matrix of its layout; return it dense."""
    with torch.no_grad():
        wrapper.R.add_(0.3 * torch.randn(wrapper.R.shape, generator=gen, dtype=wrapper.R.dtype))
    return wrapper.dense_R()


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name, make, shape", KINDS, ids=IDS)
@pytest.mark.parametrize("fold_weight", [None, True, False], ids=["auto", "fold", "direct"])
def test_every_kind_is_unchanged_at_init_and_computes_w_r_x(name, make, shape, fold_weight):
    torch.manual_seed(0)
    layer = make().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    before = layer(x).detach()
    wrapper = decorrelate(layer, "scaled", fold=fold_weight)
    assert wrapper.layer is layer
    assert isinstance(wrapper, DecorConv if "conv" in name and "hf" not in name else DecorLinear)
    torch.testing.assert_close(wrapper(x), before, rtol=1e-12, atol=1e-12)
    dense = _moved_r(wrapper, gen)
    if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1:
        # one block per group: R never mixes inputs of different groups
        chunk = dense.shape[0] // layer.groups
        mask = torch.block_diag(*[torch.ones(chunk, chunk)] * layer.groups).bool()
        assert torch.all(dense[~mask] == 0) and wrapper.R.shape[0] == layer.groups
    expected = _formula(layer, x, dense)
    torch.testing.assert_close(wrapper(x), expected.detach(), rtol=1e-10, atol=1e-10)
    # the patch sampler reads the patches the formula uses (every position, in order)
    if isinstance(layer, nn.modules.conv._ConvNd):
        everything = conv_patches(x, layer, None, seed=0, step=0)
        torch.testing.assert_close(
            everything, explicit_patches(layer, x).reshape(-1, dense.shape[0])
        )


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name, make, shape", KINDS, ids=IDS)
def test_gradients_through_every_wrapper_equal_autograd(name, make, shape):
    """layers.weight_grad / input_grad on the wrapper = ∂⟨e, W R x⟩/∂W and ∂/∂x by autograd."""
    torch.manual_seed(0)
    layer = make().double()
    wrapper = decorrelate(layer, "copi")
    gen = torch.Generator().manual_seed(2)
    _moved_r(wrapper, gen)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    out = wrapper(x)
    e = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * e).sum().backward()
    gw, gb = L.weight_grad(wrapper, [x.detach(), x.detach()], [e, e])
    torch.testing.assert_close(gw, 2 * layer.weight.grad, rtol=1e-10, atol=1e-10)
    if layer.bias is not None:
        torch.testing.assert_close(gb, 2 * layer.bias.grad, rtol=1e-10, atol=1e-10)
    back = L.input_grad(wrapper, e, x.detach(), layer.weight.detach())
    torch.testing.assert_close(back, x.grad, rtol=1e-10, atol=1e-10)
    assert wrapper.R.grad is None
    # the effective weight is W R in the layer's own layout; weight_grad maps back through Rᵀ
    eff = wrapper.effective_weight()
    assert eff.shape == layer.weight.shape
    torch.testing.assert_close(
        L.kind_of(layer).apply(layer, x.detach(), eff),
        _formula(layer, x.detach(), wrapper.dense_R())
        - (0 if layer.bias is None else _bias_like(layer, out)),
    )


def _bias_like(layer, out):
    shape = [1] * out.dim()
    shape[L.kind_of(layer).bias_dim(layer)] = -1
    return layer.bias.reshape(shape)


# ----------------------------------------------------------------------------- learning


def correlated_input(shape, gen, channels_dim):
    """Inputs whose features share two factors (mean |corr| ≈ 0.5); for a conv, the channels."""
    c = shape[channels_dim]
    loads = 0.5 + torch.rand(c, 2, generator=gen)
    mixing = torch.cat([loads, 0.5 * torch.eye(c)], 1)  # [c, c + 2]
    moved = list(shape)
    moved[channels_dim] = c + 2
    latent = torch.randn(moved, generator=gen).movedim(channels_dim, -1)
    x = (latent @ mixing.T).movedim(-1, channels_dim)
    if channels_dim == 1 and x.dim() > 2:  # images: neighbouring positions correlate too
        x = x + x.roll(1, dims=-1)
    return x


def block_corr(samples, blocks):
    """Mean |corr_ij| over i ≠ j within each diagonal block (uncentred, as the rules)."""
    parts = samples.reshape(samples.shape[0], blocks, -1).transpose(0, 1)
    c = parts.mT @ parts / samples.shape[0]
    s = torch.diagonal(c, dim1=-2, dim2=-1).rsqrt()
    corr = (c * s[..., :, None] * s[..., None, :]).abs()
    b = corr.shape[-1]
    return float((corr.sum((-2, -1)) - torch.diagonal(corr, dim1=-2, dim2=-1).sum(-1)).mean()) / (
        b * (b - 1)
    )


LEARNING = [
    ("linear", lambda: nn.Linear(8, 6), (64, 8), -1),
    ("hf-conv1d", lambda: Conv1D(6, 8), (16, 4, 8), -1),
    ("conv1d", lambda: nn.Conv1d(4, 5, 3, padding=1), (8, 4, 12), 1),
    ("conv2d-grouped", lambda: nn.Conv2d(4, 4, 3, groups=2, padding=1), (8, 4, 6, 6), 1),
    (
        "conv2d-reflect",
        lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        (8, 3, 6, 6),
        1,
    ),
    ("conv3d", lambda: nn.Conv3d(2, 3, 2), (8, 2, 4, 4, 4), 1),
]


@pytest.mark.parametrize("name, make, shape, channels_dim", LEARNING, ids=[c[0] for c in LEARNING])
def test_local_update_moves_r_and_decorrelates_every_kind(name, make, shape, channels_dim):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(make())
    decorrelate(model, "dbp", lr=0.02, sample_frac=1.0)
    ((_, wrapper),) = decorrelators(model)
    for _ in range(150):
        x = correlated_input(shape, gen, channels_dim)
        model(x).sum().backward()  # a training forward: captures the subsample
        local_update(model)
    assert int(wrapper.num_updates) == 150
    assert not torch.allclose(wrapper.dense_R(), torch.eye(wrapper.in_features))
    x = correlated_input((64, *shape[1:]), gen, channels_dim)
    if isinstance(wrapper, DecorConv):
        samples = conv_patches(x, wrapper.layer, None, seed=0, step=0)
    else:
        samples = x.reshape(-1, wrapper.in_features)
    before = block_corr(samples, wrapper.blocks)
    after = block_corr(wrapper.transform(samples), wrapper.blocks)
    assert before > 0.1
    assert after < before / 3, (before, after)


# ----------------------------------------------------------------------------- what is left out


def test_every_layer_left_out_is_named_in_one_warning_and_strict_raises():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.scale

    def build():
        return nn.Sequential(
            OrderedDict(
                emb=nn.Embedding(10, 4),
                norm=nn.LayerNorm(4),
                sub=SubLinear(4, 4),
                odd=OddLinear(4, 4),
                custom=Custom(),
                skip=nn.Linear(4, 4),
                head=nn.Linear(4, 3),
            )
        )

    model = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decorrelate(model, "scaled", exclude=["skip"])
    mine = [w for w in caught if "left out" in str(w.message)]
    assert len(mine) == 1
    text = str(mine[0].message)
    assert "'emb' (Embedding: its input is an index" in text
    assert "'odd' (OddLinear: it overrides" in text
    assert "'custom' (Custom: no layer kind covers its parameters scale" in text
    assert "norm" not in text and "skip" not in text and "'sub'" not in text
    assert [n for n, _ in decorrelators(model)] == ["sub", "head"]
    with pytest.raises(UserError, match=r"left out 3 layer\(s\): 'emb'.*'odd'.*'custom'"):
        decorrelate(build(), "scaled", exclude=["skip"], strict=True)
    # nothing left out: no warning, and strict is quiet too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decorrelate(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 2)), strict=True)
    # exclude may name any module (everything inside it is left alone, unwarned)
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decorrelate(model, exclude=["emb", "odd", "custom"])


def test_attention_and_recurrent_projections_get_an_r_each_once_unrolled():
    """With layers.unroll (merged from another branch) MHA/LSTM become Linear layers; without
    it their parameters are named in the warning, never silently skipped."""
    model = nn.Sequential(OrderedDict(lstm=nn.LSTM(4, 5, batch_first=True)))
    if hasattr(L, "unroll"):
        decorrelate(model, "scaled")
        assert len(decorrelators(model)) >= 2
    else:
        left_out = r"'lstm' \(LSTM: no layer kind covers.*weight_ih_l0"
        with pytest.warns(UserWarning, match=left_out), pytest.raises(UserError, match="no layer"):
            decorrelate(model, "scaled")


def test_decorrelating_after_a_rule_attached_its_hooks_is_refused():
    """A wrapper computes W R x itself, so hooks on the wrapped layer (FA's routing) would
    silently stop running: refused, naming the layer."""
    from decorrelate.losses import Loss
    from decorrelate.rules import FeedbackAlignment

    model = nn.Sequential(OrderedDict(a=nn.Linear(4, 5), act=nn.Tanh(), b=nn.Linear(5, 3)))
    FeedbackAlignment().attach(model, Loss("cross-entropy"), torch.Generator().manual_seed(0))
    # a rule says so itself (layers.runtime marks what it attached to)
    with pytest.raises(UserError, match=r"rule 'fa' is already attached.*after decorrelate"):
        decorrelate(model, "scaled")
    plain = nn.Sequential(nn.Linear(4, 5))
    handle = plain[0].register_forward_hook(lambda m, i, o: None)
    with pytest.raises(UserError, match="hooks"):
        decorrelate(plain)
    handle.remove()
    decorrelate(plain)


# ----------------------------------------------------------------------------- small batches


def test_a_subsample_of_one_row_warns_once_with_what_to_do():
    gen = torch.Generator().manual_seed(4)
    layer = decorrelate(nn.Linear(6, 3), "scaled", lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            layer(torch.randn(8, 6, generator=gen)).sum().backward()  # ⌊0.1·8⌋ + 1 = 1 row
            layer.update()
    mine = [w for w in caught if "learns R from 1 sample" in str(w.message)]
    assert len(mine) == 1
    assert "sample_frac" in str(mine[0].message) and "max_samples" in str(mine[0].message)
    assert torch.equal(layer.R, torch.eye(6))  # what the warning says: R does not move
    ok = decorrelate(nn.Linear(6, 3), "scaled", lr=0.01, sample_frac=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            ok(torch.randn(8, 6, generator=gen)).sum().backward()
            ok.update()
    assert not torch.equal(ok.R, torch.eye(6))


# ----------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("how", ["bf16-weights", "autocast"])
def test_bf16_layers_decorrelate_in_float32(method, how):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 6))
    opts = {"every": 1} if method in ("zca", "newton") else {}
    decorrelate(model, method, sample_frac=1.0, **opts)
    if how == "bf16-weights":
        model.bfloat16()  # R and its statistics stay float32, their values untouched
    wrappers = [m for _, m in decorrelators(model)]
    assert all(w.R.dtype == torch.float32 for w in wrappers)
    assert all(
        b.dtype in (torch.float32, torch.long)
        for w in wrappers
        for b in w.buffers()
        if b is not w.layer.weight and b is not w.layer.bias
    )
    dtype = torch.bfloat16 if how == "bf16-weights" else torch.float32
    for _ in range(30):
        x = correlated_input((8, 3, 5, 5), gen, 1).to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
            out = model(x)
            assert out.dtype == torch.bfloat16
            out.float().sum().backward()
            local_update(model)  # inside autocast: the update turns it off itself
    for w in wrappers:
        assert w.R.dtype == torch.float32 and torch.isfinite(w.R).all()
        assert not torch.equal(w.dense_R(), torch.eye(w.in_features)), w.name


def test_a_bf16_layer_built_so_gets_float32_r():
    layer = decorrelate(nn.Linear(5, 3).to(torch.bfloat16), "zca")
    assert layer.R.dtype == torch.float32 and layer.running_cov.dtype == torch.float32
    assert layer(torch.randn(4, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- fold


def plain_net() -> nn.Module:
    """torch-only classes: a grouped, a reflect-padded and a 1-d convolution and Linears."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, groups=3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(2),  # [B, 6, 25]: a sequence of 25 steps with 6 channels
        nn.Conv1d(6, 4, 3, stride=2),
        nn.Flatten(),
        nn.Linear(4 * 12, 10),
        nn.ReLU(),
        nn.Linear(10, 3),
    )


def _train(model, gen, steps=20):
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = correlated_input((8, 3, 5, 5), gen, 1)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        local_update(model)


@pytest.mark.parametrize(
    "method, options",
    [("dbp", {"demean": True}), ("scaled", {"block_size": 9}), ("zca", {"every": 1})],
    ids=["dbp-demean", "scaled-blocks", "zca"],
)
def test_fold_gives_a_plain_model_with_the_same_outputs(method, options, tmp_path):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(6)
    model = plain_net()
    decorrelate(model, method, lr=0.01 if method != "zca" else 0.5, sample_frac=1.0, **options)
    _train(model, gen)
    assert all(
        not torch.equal(w.dense_R(), torch.eye(w.in_features)) for _, w in decorrelators(model)
    )
    folded = fold(model)
    assert decorrelators(model)  # the decorrelated model is left as it was
    assert not any(type(m).__module__.startswith("decorrelate") for m in folded.modules())
    assert [type(m) for m in folded.modules()] == [type(m) for m in plain_net().modules()]
    x = correlated_input((5, 3, 5, 5), gen, 1)
    for train in (False, True):
        model.train(train)
        folded.train(train)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    # loadable into a freshly built plain model of the original architecture
    path = tmp_path / "folded.pt"
    torch.save(folded.state_dict(), path)
    fresh = plain_net().eval()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_folded_model_unpickles_without_this_library(tmp_path):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(7)
    model = plain_net()
    decorrelate(model, "dbp", lr=0.01, sample_frac=1.0)
    _train(model, gen)
    model.eval()
    x = correlated_input((4, 3, 5, 5), gen, 1)
    torch.save(fold(model), tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "expected.pt")
    script = (
        "import sys; sys.modules['decorrelate'] = None\n"
        "import torch\n"
        "d = sys.argv[1]\n"
        "m = torch.load(d + '/model.pt', weights_only=False)\n"
        "x = torch.load(d + '/x.pt'); expected = torch.load(d + '/expected.pt')\n"
        "with torch.no_grad(): out = m(x)\n"
        "assert not any('decorrelate' in type(s).__module__ for s in m.modules())\n"
        "print(float((out - expected).abs().max()))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) < 1e-5


def test_fold_transposes_for_hf_conv1d_and_handles_a_bare_layer():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(8)
    model = nn.Sequential(Conv1D(5, 6), nn.Tanh(), Conv1D(3, 5))
    decorrelate(model, "copi", lr=0.05, sample_frac=1.0)
    for _ in range(20):
        model(correlated_input((16, 6), gen, -1)).sum().backward()
        local_update(model)
    folded = fold(model)
    assert [type(m) for m in folded] == [Conv1D, nn.Tanh, Conv1D]
    assert folded[0].weight.shape == (6, 5)
    x = correlated_input((4, 6), gen, -1)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    bare = decorrelate(nn.Linear(4, 2), "scaled")
    with torch.no_grad():
        bare.R.add_(0.1)
    plain = fold(bare)
    assert type(plain) is nn.Linear
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), bare(x))
    with pytest.raises(UserError, match="no decorrelated layer"):
        fold(nn.Linear(2, 2))


def test_the_real_hugging_face_conv1d_is_decorrelated_and_folded():
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(5, 6), nn.Tanh(), conv1d(3, 5))
    x = torch.randn(4, 2, 6)
    before = model(x).detach()
    decorrelate(model, "scaled", strict=True)
    torch.testing.assert_close(model(x), before)
    for _, w in decorrelators(model):
        with torch.no_grad():
            w.R.add_(0.1 * torch.randn(w.R.shape))
    folded = fold(model)
    assert type(folded[0]) is conv1d
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_of_bf16_layers_computes_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    decorrelate(model, "scaled")
    model.bfloat16()
    for _, w in decorrelators(model):
        with torch.no_grad():
            w.R.add_(0.2 * torch.randn(w.R.shape))
    folded = fold(model)
    assert all(p.dtype == torch.bfloat16 for p in folded.parameters())
    expected = model[0].layer.weight.float() @ model[0].R
    torch.testing.assert_close(folded[0].weight, expected.to(torch.bfloat16))


# ----------------------------------------------------------------------------- block default


def _load_bench():
    path = ROOT / "benchmarks" / "bench_r_memory.py"
    spec = importlib.util.spec_from_file_location("bench_r_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_block_default_keeps_the_papers_layers_full_and_splits_wide_ones():
    cases = {784: (1, 784), 1000: (1, 1000), 3136: (1, 3136), 4096: (1, 4096), 4608: (6, 768)}
    for d, layout in cases.items():
        layer = nn.Linear(d, 2, device="meta")
        wrapper = decorrelate(layer, "scaled")
        assert (wrapper.blocks, wrapper.block) == layout, d
        full = decorrelate(nn.Linear(d, 2, device="meta"), "scaled", block_above=None)
        assert (full.blocks, full.block) == (1, d)
    # an explicit block_size still blocks every layer wider than it
    small = decorrelate(nn.Linear(24, 2), "scaled", block_size=8)
    assert small.R.shape == (3, 8, 8)
    # a ResNet-18 (512-channel 3×3 convolutions: d = 4608) no longer grows 10×
    bench = _load_bench()
    sizes = bench.state_bytes(bench.resnet18, device="meta")
    assert 44e6 < sizes["none"] < 48e6
    assert sizes["full"] > 9 * sizes["none"]
    assert sizes["default"] < sizes["full"] / 1.5
    assert (4608, 6, 768) in sizes["default_layouts"]  # the 512-channel 3×3 convolutions
    assert all(k == 1 for d, k, _ in sizes["default_layouts"] if d <= 4096)
    assert sizes["full_R"] - sizes["default_R"] == 4 * 3 * (4608**2 - 6 * 768**2)


def test_block_above_is_validated_and_a_cli_option():
    with pytest.raises(UserError, match="block_above=0"):
        decorrelate(nn.Linear(3, 2), block_above=0)
    from decorrelate.config import TrainConfig

    assert TrainConfig().decor_block_above == 4096
