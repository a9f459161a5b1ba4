"""Layer kinds: every kind's local gradient and input error equal autograd's on the real module.

The oracle is the module itself: for a per-sample error e at its output, autograd of
⟨e, module(x)⟩ gives ∂/∂W = Σ e aᵀ (the local ⟨e aᵀ⟩ a rule forms), ∂/∂b = Σ e and ∂/∂x = Wᵀ e
(what a rule sends back with W in place of a feedback matrix). Each kind's closed form must
match these in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from decorrelate import UserError
from decorrelate import layers as L


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D`` as transformers defines it: x W + b, W stored [in, out]."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class SubLinear(nn.Linear):
    """A Linear subclass (as timm's heads or attention's out_proj)."""


def _cases():
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    yield "linear", nn.Linear(5, 4), rnd(3, 7, 5)
    yield "linear-subclass", SubLinear(5, 4, bias=False), rnd(6, 5)
    yield "hf-conv1d", Conv1D(4, 5), rnd(2, 3, 5)
    yield "conv1d", nn.Conv1d(4, 6, 3, stride=2, padding=1), rnd(2, 4, 9)
    yield "conv2d-grouped", nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2), rnd(2, 4, 7, 7)
    yield "conv2d-depthwise", nn.Conv2d(4, 4, 3, groups=4, padding="same"), rnd(2, 4, 6, 6)
    yield "conv2d-same-even", nn.Conv2d(3, 5, 4, padding="same"), rnd(2, 3, 6, 6)
    yield "conv2d-reflect", nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), rnd(2, 3, 5, 5)
    yield "conv3d", nn.Conv3d(2, 3, (2, 3, 3), stride=(1, 2, 1)), rnd(2, 2, 4, 5, 5)
    yield "embedding", nn.Embedding(10, 4, padding_idx=0), torch.randint(0, 10, (3, 5), generator=g)
    yield "batchnorm", nn.BatchNorm2d(3), rnd(4, 3, 2, 2)
    yield "layernorm", nn.LayerNorm(5), rnd(3, 4, 5)
    yield "groupnorm", nn.GroupNorm(2, 4), rnd(3, 4, 5)
    if hasattr(nn, "RMSNorm"):
        yield "rmsnorm", nn.RMSNorm(5), rnd(3, 5)


CASES = list(_cases())


@pytest.mark.parametrize("name, module, x", CASES, ids=[c[0] for c in CASES])
def test_every_kind_forms_the_gradients_autograd_gives(name, module, x):
    module = module.double()
    with torch.no_grad():  # the affine parameters are 1 and 0 at init: make them generic
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    kind = L.kind_of(module)
    assert kind is not None
    x_var = x.clone().requires_grad_(x.is_floating_point())
    out = module(x_var)
    e = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out * e).sum().backward()
    # the kind's own linear map equals the module, bias aside
    bias = L.bias_of(module)
    plain = kind.apply(module, x, L.weight_of(module))
    if bias is not None:
        shape = [1] * out.dim()
        shape[kind.bias_dim(module)] = -1
        plain = plain + bias.reshape(shape)
    torch.testing.assert_close(plain, out.detach(), rtol=1e-10, atol=1e-10)
    # two calls of the layer: the sum of their local gradients
    gw, gb = L.weight_grad(module, [x, x], [e, e])
    torch.testing.assert_close(gw, 2 * L.weight_of(module).grad, rtol=1e-10, atol=1e-10)
    if bias is not None:
        torch.testing.assert_close(gb, 2 * bias.grad, rtol=1e-10, atol=1e-10)
    else:
        assert gb is None
    back = L.input_grad(module, e, x, L.weight_of(module))
    if kind.has_input_grad:
        torch.testing.assert_close(back, x_var.grad, rtol=1e-10, atol=1e-10)
    else:
        assert back is None
    # as_matrix / from_matrix round trip, with out units as rows
    w = L.weight_of(module)
    m = kind.as_matrix(module, w)
    assert m.dim() == 2 and kind.from_matrix(module, m).shape == w.shape
    assert torch.equal(kind.from_matrix(module, m), w)


def test_the_input_error_goes_through_the_matrix_given_not_the_weight():
    """FA's B instead of W: Bᵀ δ for a Linear, the transposed convolution with B for a conv."""
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(5, 4).double()
    b = torch.randn(4, 5, generator=g, dtype=torch.float64)
    delta = torch.randn(3, 4, generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(L.input_grad(lin, delta, x, b), delta @ b)
    conv = nn.Conv1d(2, 3, 3, padding=1).double()
    kb = torch.randn(conv.weight.shape, generator=g, dtype=torch.float64)
    xc = torch.randn(2, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    dc = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    (torch.nn.functional.conv1d(xc, kb, padding=1) * dc).sum().backward()
    torch.testing.assert_close(L.input_grad(conv, dc, xc.detach(), kb), xc.grad)


def test_embedding_padding_row_gets_no_update():
    emb = nn.Embedding(6, 3, padding_idx=2)
    idx = torch.tensor([[2, 1, 2], [0, 2, 5]])
    gw, _ = L.weight_grad(emb, [idx], [torch.ones(2, 3, 3)])
    assert torch.all(gw[2] == 0)
    assert torch.equal(gw[1], torch.ones(3)) and torch.equal(gw[0], torch.ones(3))


class Scale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.weight


class ScaleKind(L.LayerKind):
    name = "scale"

    def matches(self, module):
        return isinstance(module, Scale)

    def apply(self, module, x, weight):
        return x * weight


def test_a_registered_kind_gets_exact_gradients_from_its_apply_alone():
    model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(
        UserError, match=r"^1 is a Scale with parameters \(weight\).*register_layer_kind"
    ):
        L.find_layers(model)
    kind = L.register_layer_kind(ScaleKind())
    try:
        assert [name for name, _ in L.find_layers(model)] == ["0", "1", "3"]
        x = torch.randn(5, 4, dtype=torch.float64)
        e = torch.randn(5, 4, dtype=torch.float64)
        scale = model[1].double()
        gw, gb = L.weight_grad(scale, [x], [e])
        torch.testing.assert_close(gw, (e * x).sum(0))
        assert gb is None
        torch.testing.assert_close(L.input_grad(scale, e, x, scale.weight), e * scale.weight)
    finally:
        L.unregister_layer_kind(kind)
    with pytest.raises(UserError, match="must define matches"):
        L.register_layer_kind(L.LayerKind())


def test_find_layers_lists_layers_once_and_keeps_loose_parameters_apart():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(4))
            self.emb = nn.Embedding(5, 4)
            self.norm = nn.LayerNorm(4)
            self.head = SubLinear(4, 3)

        def forward(self, x):
            return self.head(self.norm(self.emb(x) + self.pos))

    net = Net()
    assert [n for n, _ in L.find_layers(net)] == ["emb", "head"]
    assert [n for n, _ in L.find_layers(net, norms=True)] == ["emb", "norm", "head"]
    assert [n for n, _ in L.loose_parameters(net)] == ["pos"]
    with pytest.raises(UserError, match="no layer this rule can train"):
        L.find_layers(nn.Sequential(nn.LayerNorm(3), nn.ReLU()))


WRAPPED = [
    (nn.Linear(5, 4), (3, 5)),
    (nn.Linear(5, 40), (3, 5)),
    (nn.Conv2d(2, 3, 3, padding=1), (2, 2, 5, 5)),
]


@pytest.mark.parametrize("layer, x_shape", WRAPPED)
def test_a_decorrelated_layer_is_one_layer_with_weight_w_r(layer, x_shape):
    """Through the wrapper: ∂/∂W of ⟨e, W R x⟩ and the error sent to the raw input x."""
    from decorrelate.nn import decorrelate

    wrapper = decorrelate(layer.double(), "scaled")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        wrapper.R.add_(0.3 * torch.randn(wrapper.R.shape, generator=g, dtype=torch.float64))
    x = torch.randn(x_shape, generator=g, dtype=torch.float64, requires_grad=True)
    out = wrapper(x)
    e = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * e).sum().backward()
    assert L.kind_of(wrapper) is L.kind_of(layer) and L.weight_of(wrapper) is layer.weight
    gw, gb = L.weight_grad(wrapper, [x.detach()], [e])
    torch.testing.assert_close(gw, layer.weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gb, layer.bias.grad, rtol=1e-10, atol=1e-10)
    back = L.input_grad(wrapper, e, x.detach(), layer.weight.detach())
    torch.testing.assert_close(back, x.grad, rtol=1e-10, atol=1e-10)


def test_call_order_probes_one_sample_in_eval_mode_and_puts_every_mode_back():
    from decorrelate.layers.runtime import call_order

    head, body = nn.Linear(4, 2), nn.Linear(3, 4)
    model = nn.Sequential(body, nn.BatchNorm1d(4), nn.Dropout(0.5), head)
    model.train()
    model[2].eval()  # a submodule the user keeps in eval mode
    stats = model[1].running_mean.clone()
    during = []
    model[1].register_forward_pre_hook(lambda m, a: during.append(m.training))
    outputs = []
    calls = call_order(model, [head, body], torch.randn(5, 3), output=outputs.append)
    assert [(m, tuple(x.shape)) for m, x in calls] == [(body, (1, 3)), (head, (1, 4))]
    assert during == [False] and tuple(outputs[0].shape) == (1, 2)
    assert torch.equal(model[1].running_mean, stats)
    assert [m.training for m in model] == [True, True, False, True] and model.training


def test_call_order_with_grad_records_which_inputs_carry_a_gradient_even_under_no_grad():
    from decorrelate.layers.runtime import call_order

    first, second = nn.Linear(3, 4), nn.Linear(4, 2)
    model = nn.Sequential(first, nn.Tanh(), second)
    x = torch.randn(5, 3)
    with torch.no_grad():
        calls = call_order(model, [first, second], x, grad=True)
        plain = call_order(model, [first, second], x)
    assert [h.requires_grad for _, h in calls] == [False, True]
    assert [h.requires_grad for _, h in plain] == [False, False]
