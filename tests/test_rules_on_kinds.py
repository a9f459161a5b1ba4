"""fa / dfa / align-* / last-layer on every built-in layer kind (decorrelate.layers).

Oracles: BP itself where the rule must equal it (FA with B = W; the Align rules at
initialisation, where the twin is the network), and references written from the rule's formula
in the test (δ_in = Bᵀδ as the adjoint of the layer run with B in place of W; DFA's B e; the
linearised network's J₀ᵀe from torch.func). All in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp

import decorrelate.rules.align  # noqa: F401  (registers the align rules)
from conftest import bp_grads, grads, rule_grads
from decorrelate import Loss, UserError, get_rule
from decorrelate import nn as dnn


class Conv1D(nn.Module):
    """Stand-in for Hugging Face's GPT-2 ``Conv1D``: x W + b with W stored [in, out]."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class SubLinear(nn.Linear):
    """A Linear subclass (timm's classifier heads, attention's out_proj)."""


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


class MeanOver(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.mean(self.dim)


class Shared(nn.Module):
    """One Linear called three times in a forward (a cell unrolled over time)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 5)
        self.cell = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for _ in range(3):
            h = torch.tanh(self.cell(h))
        return self.head(h)


class HeadFirst(nn.Module):
    """The readout is defined first in ``__init__`` and called last (by keyword)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(5, 3)
        self.body = nn.Linear(6, 5)

    def forward(self, x):
        return self.head(input=torch.tanh(self.body(x)))


def _models():
    """name → (builder, input shape or 'tokens')."""
    return {
        "linear-subclass": (
            lambda: nn.Sequential(SubLinear(6, 5), nn.Tanh(), SubLinear(5, 3)),
            (6,),
        ),
        "conv1d": (
            lambda: nn.Sequential(
                nn.Conv1d(2, 4, 3, stride=2, dilation=2, padding=1), nn.Tanh(),
                nn.Conv1d(4, 4, 3, groups=4, padding="same", padding_mode="reflect"), nn.Tanh(),
                nn.Flatten(), nn.Linear(4 * 5, 3),
            ),
            (2, 11),
        ),
        "conv2d-depthwise-grouped": (
            lambda: nn.Sequential(
                nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
                nn.Conv2d(4, 4, 3, groups=4, padding="same"), nn.Tanh(),
                nn.Conv2d(4, 6, 4, groups=2, padding="same"), nn.Tanh(),
                nn.Flatten(), nn.Linear(6 * 5 * 5, 3),
            ),
            (2, 5, 5),
        ),
        "conv3d": (
            lambda: nn.Sequential(
                nn.Conv3d(1, 3, (2, 3, 3), stride=(1, 2, 1)), nn.Tanh(),
                nn.Conv3d(3, 2, 1, padding_mode="circular"), nn.Tanh(),
                nn.Flatten(), nn.Linear(2 * 3 * 2 * 3, 3),
            ),
            (1, 4, 5, 5),
        ),
        "hf-conv1d-layernorm": (
            lambda: nn.Sequential(
                Conv1D(5, 6), nn.LayerNorm(5), nn.Tanh(), Conv1D(4, 5), nn.Tanh(),
                MeanOver(1), nn.Linear(4, 3),
            ),
            (4, 6),
        ),
        "embedding": (
            lambda: nn.Sequential(
                nn.Embedding(9, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(),
                MeanOver(1), nn.Linear(5, 3),
            ),
            "tokens",
        ),
        "shared-layer": (Shared, (6,)),
    }  # fmt: skip


MODELS = _models()


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = make().double()
    gen = torch.Generator().manual_seed(seed + 1)
    if shape == "tokens":
        x = torch.randint(0, 9, (6, 4), generator=gen)
    else:
        x = torch.randn(6, *shape, generator=gen, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (6,), generator=gen)


RULES_EQUAL_TO_BP = {  # rule options under which the rule is BP (at initialisation)
    "fa": {"feedback_init": "weight"},
    "align-prop": {},
    "align-zero": {},
    "align-ada": {},
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("rule_name", list(RULES_EQUAL_TO_BP))
def test_rule_equals_bp_on_every_layer_kind(rule_name, model_name):
    """FA with B = W is BP; Align at initialisation (twin = network) is BP: every parameter,
    every kind, a layer called three times, embeddings and norms in between."""
    model, x, y = build(model_name)
    expected = bp_grads(model, x, y)
    rule = get_rule(rule_name, **RULES_EQUAL_TO_BP[rule_name])
    rule.attach(model, Loss(), torch.Generator().manual_seed(0), example=x)
    got = rule_grads(rule, model, x, y)
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("conv", [False, True])
def test_fa_with_b_equal_w_is_bp_through_decorrelated_layers(conv):
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 3)
        ).double()
        x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    else:
        model = Shared().double()
        x = torch.randn(6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    dnn.decorrelate(model, "scaled")
    for _, m in dnn.decorrelators(model):  # R ≠ I, as after some training
        m.R.add_(0.2 * torch.randn(m.R.shape, dtype=m.R.dtype))
    expected = bp_grads(model, x, y)
    rule = get_rule("fa", feedback_init="weight")
    rule.attach(model, Loss())
    got = rule_grads(rule, model, x, y)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-6, atol=1e-12)


def _adjoint(conv, weight, h, delta):
    """Bᵀδ from the formula: the adjoint (vector–Jacobian product in the input) of the layer's
    own convolution (its padding mode included) with its weight replaced by B, bias aside."""
    h = h.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(conv._conv_forward(h, weight, None), h, delta)
    return g


@pytest.mark.parametrize(
    "second",
    [
        lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=2),
        lambda: nn.Conv1d(4, 4, 3, groups=4, padding=1, padding_mode="replicate"),
    ],
    ids=["conv1d-strided-dilated", "conv1d-depthwise-replicate"],
)
def test_fa_sends_b_transpose_delta_through_convolutions(second):
    torch.manual_seed(0)
    first = nn.Conv1d(2, 4, 3, padding=1)
    conv = second()
    model = nn.Sequential(first, nn.Tanh(), conv, nn.Tanh(), nn.Flatten()).double()
    x = torch.randn(5, 2, 10, dtype=torch.float64)
    with torch.no_grad():
        width = model(x).shape[1]
    model.append(nn.Linear(width, 3).double())
    y = torch.randint(0, 3, (5,))
    rule = get_rule("fa")
    rule.attach(model, Loss(), torch.Generator().manual_seed(1))
    got = rule_grads(rule, model, x, y)
    head = model[5]
    b_head, b_conv = head.fa_feedback, conv.fa_feedback
    assert b_conv.shape == conv.weight.shape and not torch.equal(b_conv, conv.weight)
    with torch.no_grad():
        h1 = torch.tanh(first(x))
        h2 = torch.tanh(conv(h1))
        out = head(h2.flatten(1))
    e = (torch.softmax(out, 1) - F.one_hot(y, 3)) / 5
    d2 = (e @ b_head).reshape(h2.shape) * (1 - h2**2)  # at conv's output
    d1 = _adjoint(conv, b_conv, h1, d2) * (1 - h1**2)  # δ_in = Bᵀδ, then f′
    ref = torch.nn.grad.conv1d_weight(x, first.weight.shape, d1, padding=1)
    torch.testing.assert_close(got["0.weight"], ref)
    torch.testing.assert_close(got["0.bias"], d1.sum((0, 2)))


def _shared_layer_states(model, x):
    """h_0 … h_3 of the "shared-layer" model (its cell called 3 times) and its output."""
    with torch.no_grad():
        hs = [torch.tanh(model.inp(x))]
        for _ in range(3):
            hs.append(torch.tanh(model.cell(hs[-1])))
        return hs, model.head(hs[-1])


def test_fa_routes_every_call_of_a_shared_layer():
    model, x, y = build("shared-layer")
    rule = get_rule("fa")
    rule.attach(model, Loss(), torch.Generator().manual_seed(1))
    got = rule_grads(rule, model, x, y)
    w0, ws, wh = model.inp.weight, model.cell.weight, model.head.weight
    bs, bh = model.cell.fa_feedback, model.head.fa_feedback
    hs, out = _shared_layer_states(model, x)
    e = (torch.softmax(out, 1) - F.one_hot(y, 3)) / x.shape[0]
    d = (e @ bh) * (1 - hs[3] ** 2)
    gws = torch.zeros_like(ws)
    for k in (3, 2, 1):  # call k maps h_{k-1} → h_k
        gws += d.T @ hs[k - 1]
        d = (d @ bs) * (1 - hs[k - 1] ** 2)
    torch.testing.assert_close(
        got["head.weight"], ((torch.softmax(out, 1) - F.one_hot(y, 3)) / 6).T @ hs[3]
    )
    torch.testing.assert_close(got["cell.weight"], gws)
    torch.testing.assert_close(got["inp.weight"], d.T @ x)
    assert wh.grad is not None and w0.grad is not None


def test_dfa_projects_to_every_call_of_a_shared_layer():
    model, x, y = build("shared-layer")
    rule = get_rule("dfa")
    rule.attach(model, Loss(), torch.Generator().manual_seed(1), example=x)
    got = rule_grads(rule, model, x, y)
    bs, bh = model.cell.dfa_feedback, model.head.dfa_feedback
    assert not hasattr(model.inp, "dfa_feedback")  # its input is the data
    hs, out = _shared_layer_states(model, x)
    e = (torch.softmax(out, 1) - F.one_hot(y, 3)) / x.shape[0]
    deltas = [(e @ bs.T) * (1 - h**2) for h in hs[:3]] + [(e @ bh.T) * (1 - hs[3] ** 2)]
    torch.testing.assert_close(got["inp.weight"], deltas[0].T @ x)
    torch.testing.assert_close(got["cell.weight"], sum(deltas[k].T @ hs[k - 1] for k in (1, 2, 3)))
    torch.testing.assert_close(got["head.weight"], e.T @ hs[3])


def test_dfa_and_last_layer_find_the_readout_by_forward_order():
    torch.manual_seed(0)
    model = HeadFirst().double()
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    expected = bp_grads(model, x, y)
    rule = get_rule("dfa")
    rule.attach(model, Loss(), torch.Generator().manual_seed(0), example=x)
    assert model.head.dfa_feedback.shape == (5, 3) and not hasattr(model.body, "dfa_feedback")
    got = rule_grads(rule, model, x, y)  # random B: the body gets B e, not the head's Wᵀe
    with torch.no_grad():
        h = torch.tanh(model.body(x))
        e = (torch.softmax(model.head(h), 1) - F.one_hot(y, 3)) / 7
    delta = (e @ model.head.dfa_feedback.T) * (1 - h**2)
    torch.testing.assert_close(got["body.weight"], delta.T @ x)
    torch.testing.assert_close(got["head.weight"], expected["head.weight"])
    model.head.dfa_feedback.copy_(model.head.weight.detach().T)  # B = Wᵀ: one hidden layer → BP
    got = rule_grads(rule, model, x, y)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n])
    rule.detach()
    for example in (x, None):  # readout found at attach, or on the first step
        last = get_rule("last-layer")
        last.attach(model, Loss(), example=example)
        got = rule_grads(last, model, x, y)
        assert last.readout is model.head
        assert set(got) == {"head.weight", "head.bias"}
        torch.testing.assert_close(got["head.weight"], expected["head.weight"])
        last.detach()
    named = get_rule("last-layer", readout="body")  # named explicitly: that layer only
    named.attach(model, Loss(), example=x)
    got = rule_grads(named, model, x, y)
    assert set(got) == {"body.weight", "body.bias"}
    torch.testing.assert_close(got["body.weight"], expected["body.weight"])
    named.detach()
    with pytest.raises(UserError, match="readout 'tail' is not a layer of the model"):
        get_rule("last-layer", readout="tail").attach(model, Loss())


class TokenCE:
    """Token-level cross-entropy on [B, T, V] logits (until Loss does it itself)."""

    def __call__(self, out, y, reduction="mean"):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)


def test_dfa_feedback_acts_per_position_on_sequences():
    torch.manual_seed(0)
    vocab, dim, hidden = 7, 5, 6
    model = nn.Sequential(
        nn.Embedding(vocab, dim), nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, vocab)
    ).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (3, 4), generator=gen)
    rule = get_rule("dfa")
    rule.attach(model, TokenCE(), torch.Generator().manual_seed(0), example=x)
    emb, l1, l2 = model[0], model[1], model[3]
    assert l2.dfa_feedback.shape == (hidden, vocab)  # [F, V], not [T·F, T·V]
    assert l1.dfa_feedback.shape == (dim, vocab)
    for t in (4, 6):  # any sequence length: B acts per position
        xs = torch.randint(0, vocab, (3, t), generator=gen)
        ys = torch.randint(0, vocab, (3, t), generator=gen)
        got = rule_grads(rule, model, xs, ys)
        with torch.no_grad():
            a0 = emb(xs)
            h1 = torch.tanh(l1(a0))
            out = l2(h1)
        e = (torch.softmax(out, -1) - F.one_hot(ys, vocab)) / (3 * t)  # [B, T, V]
        d1 = torch.einsum("btv,fv->btf", e, l2.dfa_feedback) * (1 - h1**2)
        d0 = torch.einsum("btv,dv->btd", e, l1.dfa_feedback)
        torch.testing.assert_close(got["3.weight"], torch.einsum("btv,btf->vf", e, h1))
        torch.testing.assert_close(got["1.weight"], torch.einsum("btf,btd->fd", d1, a0))
        ref_emb = torch.zeros_like(emb.weight).index_add_(0, xs.reshape(-1), d0.reshape(-1, dim))
        torch.testing.assert_close(got["0.weight"], ref_emb)


def _twin_reference(model, twin_params, x, y, loss):
    """J₀ᵀe: the current network's output error pulled back through the network at
    initialisation, in its weights (gradient descent on the linearised network)."""
    out = model(x).detach().requires_grad_(True)
    (e,) = torch.autograd.grad(loss(out, y), out)
    _, pull = vjp(lambda p: functional_call(model, p, (x,)), twin_params)
    return pull(e)[0]


def test_align_zero_on_conv1d_hf_conv1d_and_embedding_is_twin_backprop():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(9, 4), Transpose(), nn.Conv1d(4, 6, 3, padding=1), nn.Tanh(), Transpose(),
        Conv1D(5, 6), nn.Tanh(), MeanOver(1), nn.Linear(5, 3),
    ).double()  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 9, (6, 5), generator=gen), torch.randint(0, 3, (6,), generator=gen)
    twin = {n: p.detach().clone() for n, p in model.named_parameters()}
    rule = get_rule("align-zero")
    rule.attach(model, Loss())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):  # move away from initialisation with BP
        xs = torch.randint(0, 9, (6, 5), generator=gen)
        opt.zero_grad()
        Loss()(model(xs), torch.randint(0, 3, (6,), generator=gen)).backward()
        opt.step()
    expected = _twin_reference(model, twin, x, y, Loss())
    got = rule_grads(rule, model, x, y)
    assert got.keys() == expected.keys()
    bp = bp_grads(model, x, y)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-12)
        if n.endswith("weight"):  # the twin is not the network (the readout's Σe is the same)
            assert not torch.allclose(got[n], bp[n], rtol=1e-3)


def test_align_zero_on_decorrelated_layers_uses_the_twins_r():
    """The twin keeps R (and W) as at attach: J₀ᵀe with the twin's parameters and buffers."""
    model, x, y = build("shared-layer")
    dnn.decorrelate(model, "scaled")
    rule = get_rule("align-zero")
    rule.attach(model, Loss())
    twin = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad()
    Loss()(model(x), y).backward()
    opt.step()
    for _, m in dnn.decorrelators(model):  # R moves too
        m.R.add_(0.2 * torch.randn(m.R.shape, dtype=m.R.dtype))
    out = model(x).detach().requires_grad_(True)
    (e,) = torch.autograd.grad(Loss()(out, y), out)
    params = {n: twin[n] for n, _ in model.named_parameters()}
    buffers = {n: twin[n] for n, _ in model.named_buffers()}
    _, pull = vjp(lambda p: functional_call(model, {**p, **buffers}, (x,)), params)
    expected = pull(e)[0]
    got = rule_grads(rule, model, x, y)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rule_name", ["fa", "dfa", "align-zero", "align-ada", "align-prop",
                                       "last-layer"])  # fmt: skip
def test_decorrelating_after_attaching_a_rule_is_refused(rule_name):
    model, x, _ = build("shared-layer")
    rule = get_rule(rule_name)
    rule.attach(model, Loss(), torch.Generator().manual_seed(0), example=x)
    with pytest.raises(UserError, match=r"attach the rule after decorrelate\(\.\.\.\)"):
        dnn.decorrelate(model, "scaled")
    rule.detach()
    dnn.decorrelate(model, "scaled")  # detached: the model is free again


class Square(nn.Module):
    """A parameter-free nonlinearity straight-through FA does not know."""

    def forward(self, x):
        return x * x


def test_straight_through_fa_straightens_activations_only():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), Square(), nn.Linear(5, 3)
    ).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    rule = get_rule("fa", feedback_init="weight", straight_through=True)
    rule.attach(model, Loss())
    got = rule_grads(rule, model, x, y)
    l1, l2, l3 = model[0], model[2], model[4]
    with torch.no_grad():
        h1 = torch.tanh(l1(x))
        a2 = l2(h1)
        out = l3(a2 * a2)
    e = (torch.softmax(out, 1) - F.one_hot(y, 3)) / 6
    d2 = (e @ l3.weight) * 2 * a2  # Square keeps its derivative
    d1 = d2 @ l2.weight  # Tanh's is 1
    torch.testing.assert_close(got["2.weight"], d2.T @ h1)
    torch.testing.assert_close(got["0.weight"], d1.T @ x)


class DictOut(nn.Module):
    """A model whose forward returns a dict (as Hugging Face models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Shared()

    def forward(self, x):
        return {"logits": self.body(x), "hidden": x}


class SelectingLoss(Loss):
    """Loss with an output selector (``Loss.select``; the real one lands with issue 16)."""

    def select(self, raw):
        return raw["logits"] if isinstance(raw, dict) else raw


@pytest.mark.parametrize("rule_name", ["fa", "dfa", "align-zero", "align-ada", "align-prop",
                                       "last-layer"])  # fmt: skip
def test_rules_take_the_output_the_loss_selects(rule_name):
    torch.manual_seed(0)
    model = DictOut().double()
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss = SelectingLoss()
    model.zero_grad(set_to_none=True)
    loss(loss.select(model(x)), y).backward()
    expected = grads(model)
    options = {"feedback_init": "weight"} if rule_name == "fa" else {}
    rule = get_rule(rule_name, **options)
    rule.attach(model, loss, torch.Generator().manual_seed(0), example=x)
    model.zero_grad(set_to_none=True)
    step = rule.backward(model, x, y)
    got = grads(model)
    assert step.output.shape == (6, 3)
    torch.testing.assert_close(step.loss, loss(expected_out := loss.select(model(x)), y).detach())
    assert expected_out.shape == (6, 3)
    torch.testing.assert_close(got["body.head.weight"], expected["body.head.weight"])


def test_last_layer_tied_to_an_embedding_gets_its_readout_gradient_only():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.mid = nn.Embedding(7, 5), nn.Linear(5, 5)
            self.head = nn.Linear(5, 7, bias=False)
            self.head.weight = self.emb.weight  # GPT-2's lm_head

        def forward(self, x):
            return self.head(torch.tanh(self.mid(self.emb(x)))).mean(1)

    torch.manual_seed(0)
    model = Tied().double()
    x, y = torch.randint(0, 7, (4, 3)), torch.randint(0, 7, (4,))
    rule = get_rule("last-layer")
    rule.attach(model, Loss(), example=x)
    got = rule_grads(rule, model, x, y)
    assert set(got) == {"emb.weight"}
    with torch.no_grad():
        h = torch.tanh(model.mid(model.emb(x)))
        out = model(x)
    e = (torch.softmax(out, 1) - F.one_hot(y, 7)) / 4  # at the mean over positions
    torch.testing.assert_close(got["emb.weight"], torch.einsum("bv,btf->vf", e / 3, h))


def test_last_layer_readout_option_from_the_cli(tiny, capsys):
    from conftest import cli_flags
    from decorrelate.cli import main

    opts = {**tiny, "rule": "last-layer", "epochs": 1}
    assert main(["train", *cli_flags({**opts, "readout": "nope"}), "--quiet", "--no-progress"]) == 2
    assert "readout 'nope' is not a layer of the model" in capsys.readouterr().err
