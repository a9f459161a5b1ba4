"""decorrelate.layers.unroll: recurrent and attention modules rebuilt from nn.Linear layers.

Every test compares the unrolled module with a deep copy of the original torch module (the
reference), on outputs (float32, 1e-6) and parameter gradients (1e-5), over grids of the
modules' options; the Linear layers must hold the original Parameter objects.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from decorrelate.errors import UserError
from decorrelate.layers import unroll
from decorrelate.layers.attention import UnrolledAttention
from decorrelate.layers.recurrent import UnrolledLSTMCell, UnrolledRNN
from decorrelate.layers.unroll import needs_unroll, unrolled_modules

OUT_TOL = 1e-6
GRAD_TOL = 1e-5


def _outputs(result):
    """Flatten (output, h) / (output, (h, c)) into a list of tensors."""
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for part in result if part is not None for t in _outputs(part)]


def _compare(make, call, *, train=True, grads=True):
    """Build a module, keep a deep copy, unroll the module; outputs and parameter gradients of
    ``call(module)`` must agree, and the unrolled module must hold the original Parameters."""
    original = make()
    original.train(train)
    reference = copy.deepcopy(original)
    before = dict(original.named_parameters())
    unrolled = unroll(original)
    assert (unrolled is not original) == needs_unroll(original)
    assert {id(p) for p in unrolled.parameters()} == {id(p) for p in before.values()}
    out_ref, out_new = _outputs(call(reference)), _outputs(call(unrolled))
    assert len(out_ref) == len(out_new)
    for a, b in zip(out_ref, out_new, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=OUT_TOL, rtol=0)
    if not grads:
        return unrolled
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(a.shape, generator=gen) for a in out_ref]
    sum(torch.sum(w * a) for w, a in zip(weights, out_ref, strict=True)).backward()
    sum(torch.sum(w * b) for w, b in zip(weights, out_new, strict=True)).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(before[name].grad, p.grad, atol=GRAD_TOL, rtol=0, msg=name)
    return unrolled


# ------------------------------------------------------------------------------ recurrent

RECURRENT = {
    "rnn-tanh": lambda **kw: nn.RNN(nonlinearity="tanh", **kw),
    "rnn-relu": lambda **kw: nn.RNN(nonlinearity="relu", **kw),
    "lstm": lambda **kw: nn.LSTM(**kw),
    "lstm-proj": lambda **kw: nn.LSTM(proj_size=2, **kw),
    "gru": lambda **kw: nn.GRU(**kw),
}
IN, HID, B, T = 3, 4, 2, 5


def _state(kind, layers, dirs, batched, gen):
    out = 2 if kind == "lstm-proj" else HID
    lead = (layers * dirs, B) if batched else (layers * dirs,)
    h = torch.randn(*lead, out, generator=gen)
    if kind.startswith("lstm"):
        return h, torch.randn(*lead, HID, generator=gen)
    return h


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("kind", list(RECURRENT))
def test_recurrent_matches_torch_over_the_option_grid(kind):
    for layers, bias, batch_first, bidir, with_hx, batched in itertools.product(
        (1, 2), (True, False), (False, True), (False, True), (False, True), (True, False)
    ):
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)

        def make(layers=layers, bias=bias, batch_first=batch_first, bidir=bidir):
            return RECURRENT[kind](
                input_size=IN,
                hidden_size=HID,
                num_layers=layers,
                bias=bias,
                batch_first=batch_first,
                bidirectional=bidir,
                dropout=0.3 if layers > 1 else 0.0,
            )

        shape = ((B, T) if batch_first else (T, B)) if batched else (T,)
        x = torch.randn(*shape, IN, generator=gen)
        hx = _state(kind, layers, 2 if bidir else 1, batched, gen) if with_hx else None
        # eval: the inter-layer dropout is off, so outputs must agree exactly
        _compare(make, lambda m, x=x, hx=hx: m(x, hx), train=False)


@pytest.mark.parametrize("kind", list(RECURRENT))
def test_recurrent_train_mode_without_dropout_matches(kind):
    torch.manual_seed(0)
    x = torch.randn(B, T, IN)
    _compare(
        lambda: RECURRENT[kind](input_size=IN, hidden_size=HID, num_layers=2, batch_first=True),
        lambda m: m(x),
        train=True,
    )


def test_recurrent_dropout_draws_from_the_global_rng():
    torch.manual_seed(0)
    m = unroll(nn.LSTM(IN, HID, num_layers=3, dropout=0.5))
    x = torch.randn(T, B, IN)
    torch.manual_seed(5)
    a = m(x)[0]
    torch.manual_seed(5)
    b = m(x)[0]
    torch.manual_seed(6)
    c = m(x)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0], rtol=0, atol=0)


def test_lstm_layout_and_gate_order_against_the_formula():
    """One LSTM step written from PyTorch's documented formula (gates i, f, g, o): catches a gate
    permutation even where a permuted module still looked plausible."""
    torch.manual_seed(0)
    lstm = nn.LSTM(IN, HID)
    w_ih, w_hh = lstm.weight_ih_l0.detach(), lstm.weight_hh_l0.detach()
    b = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach()
    x = torch.randn(1, B, IN)
    h0, c0 = torch.randn(1, B, HID), torch.randn(1, B, HID)
    i, f, g, o = (x[0] @ w_ih.T + h0[0] @ w_hh.T + b).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c0[0] + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    out, (hn, cn) = unroll(lstm)(x, (h0, c0))
    torch.testing.assert_close(cn[0], c, atol=OUT_TOL, rtol=0)
    torch.testing.assert_close(hn[0], h, atol=OUT_TOL, rtol=0)
    torch.testing.assert_close(out[0], h, atol=OUT_TOL, rtol=0)


def test_gru_reset_gate_multiplies_the_hidden_bias():
    """n = tanh(W_in x + b_in + r (W_hn h + b_hn)): with a large b_hn and r driven to 0 or 1 the
    bias's place matters."""
    torch.manual_seed(0)
    gru = nn.GRU(IN, HID)
    with torch.no_grad():
        gru.bias_hh_l0[2 * HID :] = 3.0
        gru.bias_ih_l0[:HID] = torch.tensor([-20.0, 20.0, -20.0, 20.0])  # r ≈ 0, 1, 0, 1
    x, h0 = torch.randn(T, B, IN), torch.randn(1, B, HID)
    _compare(lambda: gru, lambda m: m(x, h0))


def test_recurrent_linears_are_called_once_per_step_on_batch_first_inputs():
    torch.manual_seed(0)
    m = unroll(nn.GRU(IN, HID, num_layers=2, bidirectional=True))  # seq-first input
    seen: dict[str, list[tuple[int, ...]]] = {}
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            mod.register_forward_hook(
                lambda mod, inp, out, name=name: seen.setdefault(name, []).append(
                    tuple(inp[0].shape)
                )
            )
    m(torch.randn(T, B, IN))
    assert sorted(seen) == sorted(
        f"l{k}{s}.{p}" for k in (0, 1) for s in ("", "_reverse") for p in ("ih", "hh")
    )
    assert seen["l0.ih"] == [(B, IN)] * T
    assert seen["l1.ih"] == [(B, 2 * HID)] * T
    assert seen["l1_reverse.hh"] == [(B, HID)] * T


@pytest.mark.parametrize("cls", [nn.RNNCell, nn.LSTMCell, nn.GRUCell])
def test_cells_match_torch(cls):
    for bias, with_hx, batched, relu in itertools.product(
        (True, False), (False, True), (True, False), (False, True)
    ):
        if relu and cls is not nn.RNNCell:
            continue
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        kw = {"nonlinearity": "relu"} if relu else {}
        lead = (B,) if batched else ()
        x = torch.randn(*lead, IN, generator=gen)
        hx = None
        if with_hx:
            hx = torch.randn(*lead, HID, generator=gen)
            if cls is nn.LSTMCell:
                hx = (hx, torch.randn(*lead, HID, generator=gen))
        _compare(
            lambda cls=cls, bias=bias, kw=kw: cls(IN, HID, bias=bias, **kw),
            lambda m, x=x, hx=hx: m(x, hx),
        )


def test_a_cell_shared_by_two_paths_gets_one_replacement_and_steps_are_exact():
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.LSTMCell(IN, HID)
            self.alias = self.cell  # the same cell under a second name
            self.head = nn.Linear(HID, 1)

        def forward(self, x):
            h = c = torch.zeros(x.shape[1], HID)
            for t in range(x.shape[0]):
                h, c = (self.cell if t % 2 else self.alias)(x[t], (h, c))
            return self.head(h)

    torch.manual_seed(0)
    x = torch.randn(T, B, IN)
    model = Loop()
    reference = copy.deepcopy(model)
    assert unroll(model) is model
    assert isinstance(model.cell, UnrolledLSTMCell) and model.cell is model.alias
    assert model.cell.ih.weight is not None
    torch.testing.assert_close(model(x), reference(x), atol=OUT_TOL, rtol=0)
    assert [n for n, _ in unrolled_modules(model)] == ["cell"]


def test_idempotent_and_shared_modules():
    torch.manual_seed(0)
    lstm = nn.LSTM(IN, HID)
    model = nn.ModuleDict({"a": lstm, "b": nn.Sequential(lstm), "att": nn.MultiheadAttention(4, 2)})
    assert unroll(model) is model
    assert isinstance(model["a"], UnrolledRNN) and model["b"][0] is model["a"]
    assert isinstance(model["att"], UnrolledAttention)
    modules = dict(model.named_modules())
    keys = list(model.state_dict())
    assert unroll(model) is model
    assert dict(model.named_modules()) == modules and list(model.state_dict()) == keys
    assert unroll(model["a"]) is model["a"]


def test_code_written_for_the_original_still_runs():
    """Original parameter names stay readable, flatten_parameters() is accepted."""
    lstm = nn.LSTM(IN, HID, bidirectional=True)
    w = lstm.weight_hh_l0_reverse
    new = unroll(lstm)
    assert new.weight_hh_l0_reverse is w is new.l0_reverse.hh.weight
    new.flatten_parameters()
    cell = unroll(nn.GRUCell(IN, HID))
    assert cell.weight_ih is cell.ih.weight
    with pytest.raises(AttributeError):
        _ = new.weight_hh_l1


def test_unroll_keeps_the_optimizer_and_the_rng():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(IN, HID, batch_first=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rng = torch.get_rng_state()
    unroll(model)
    assert torch.equal(rng, torch.get_rng_state())  # building the Linears drew nothing
    x = torch.randn(B, T, IN)
    before = model[0](x)[0].detach()
    model[0](x)[0].sum().backward()
    opt.step()
    assert (model[0](x)[0] - before).abs().max() > 1e-4


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_original_state_dict_loads_into_the_unrolled_module():
    torch.manual_seed(0)
    source = nn.LSTM(IN, HID, num_layers=2, bidirectional=True, proj_size=2)
    target = unroll(nn.LSTM(IN, HID, num_layers=2, bidirectional=True, proj_size=2))
    target.load_state_dict(source.state_dict())
    x = torch.randn(T, B, IN)
    for a, b in zip(_outputs(source(x)), _outputs(target(x)), strict=True):
        torch.testing.assert_close(b, a, atol=OUT_TOL, rtol=0)
    # its own state_dict round-trips too
    again = unroll(nn.LSTM(IN, HID, num_layers=2, bidirectional=True, proj_size=2))
    again.load_state_dict(target.state_dict())
    torch.testing.assert_close(again(x)[0], target(x)[0], rtol=0, atol=0)

    mha_src, mha_dst = (
        nn.MultiheadAttention(4, 2, kdim=3),
        unroll(nn.MultiheadAttention(4, 2, kdim=3)),
    )
    with torch.no_grad():
        mha_src.in_proj_bias.normal_()
    mha_dst.load_state_dict(mha_src.state_dict())
    q, k = torch.randn(T, B, 4), torch.randn(T, B, 3)
    torch.testing.assert_close(mha_dst(q, k, q)[0], mha_src(q, k, q)[0], atol=OUT_TOL, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_recurrent_bad_inputs_are_one_clear_error():
    lstm = unroll(nn.LSTM(IN, HID))
    packed = pack_padded_sequence(torch.randn(T, B, IN), torch.tensor([T, 3]))
    with pytest.raises(UserError, match="PackedSequence"):
        lstm(packed)
    with pytest.raises(UserError, match="input features"):
        lstm(torch.randn(T, B, IN + 1))
    with pytest.raises(UserError, match="h0 has shape"):
        lstm(torch.randn(T, B, IN), (torch.zeros(2, B, HID), torch.zeros(1, B, HID)))

    class Custom(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x * 2, hx)

    with pytest.raises(UserError, match="its own forward"):
        unroll(nn.Sequential(Custom(IN, HID)))
    normed = nn.utils.weight_norm(nn.GRU(IN, HID), "weight_hh_l0")
    with pytest.raises(UserError, match="not a Parameter"):
        unroll(normed)


# ------------------------------------------------------------------------------ attention

E, H = 4, 2


def _masks(kind, bsz, tgt, src, gen, *, float_masks):
    attn, kpm = None, None
    if kind in ("attn2d", "both"):
        attn = torch.rand(tgt, src, generator=gen) < 0.3
        attn[:, 0] = False  # keep one key visible per query
    if kind == "attn3d":
        attn = torch.rand(bsz * H, tgt, src, generator=gen) < 0.3
        attn[..., 0] = False
    if kind in ("kpm", "both"):
        kpm = torch.rand(bsz, src, generator=gen) < 0.3
        kpm[:, 0] = False
    if float_masks:
        to_f = lambda m: None if m is None else torch.zeros(m.shape).masked_fill(m, -1e4)  # noqa: E731
        attn, kpm = to_f(attn), to_f(kpm)
    return attn, kpm


def test_attention_matches_torch_over_the_option_grid():
    """Every combination of the module's options, each with three of the 30 combinations of
    mask kind x mask dtype x (need_weights, average), cycling so that every one is met."""
    module_options = [
        c
        for c in itertools.product(
            (False, True),
            (None, 3),
            (True, False),
            (False, True),
            (False, True),
            ("self", "kv", "none"),
        )
        if c[1] is None or c[5] == "none"  # kdim != embed_dim: no self-attention
    ]
    call_options = list(
        itertools.product(
            ("none", "attn2d", "attn3d", "kpm", "both"),
            (False, True),
            ((False, True), (True, True), (True, False)),
        )
    )
    grid = [
        (*m, mask_kind, float_masks, need, avg)
        for i, m in enumerate(module_options)
        for mask_kind, float_masks, (need, avg) in (
            call_options[(3 * i + j) % len(call_options)] for j in range(3)
        )
    ]
    assert {c[6:] for c in grid} == {(a, b, *n) for a, b, n in call_options}
    count = 0
    for (
        batch_first,
        kdim,
        bias,
        bias_kv,
        zero_attn,
        share,
        mask_kind,
        float_masks,
        need,
        avg,
    ) in grid:
        gen = torch.Generator().manual_seed(count)
        torch.manual_seed(count)
        count += 1
        tgt, src = 3, (3 if share == "self" else 5)
        q = torch.randn(*((B, tgt) if batch_first else (tgt, B)), E, generator=gen)
        kd = kdim or E
        k = torch.randn(*((B, src) if batch_first else (src, B)), kd, generator=gen)
        v = k if share == "kv" else torch.randn(k.shape, generator=gen)
        if share == "self":
            k = v = q
        attn, kpm = _masks(mask_kind, B, tgt, src, gen, float_masks=float_masks)

        def make(batch_first=batch_first, kdim=kdim, bias=bias, bias_kv=bias_kv, z=zero_attn):
            m = nn.MultiheadAttention(
                E,
                H,
                bias=bias,
                add_bias_kv=bias_kv,
                add_zero_attn=z,
                kdim=kdim,
                vdim=kdim,
                batch_first=batch_first,
            )
            if bias:
                with torch.no_grad():
                    m.in_proj_bias.normal_()
                    m.out_proj.bias.normal_()
            return m

        def call(m, q=q, k=k, v=v, attn=attn, kpm=kpm, need=need, avg=avg):
            return m(
                q,
                k,
                v,
                key_padding_mask=kpm,
                attn_mask=attn,
                need_weights=need,
                average_attn_weights=avg,
            )

        _compare(make, call, train=count % 2 == 0)
    assert count == len(grid)


def test_attention_unbatched_and_causal():
    torch.manual_seed(0)
    x = torch.randn(T, E)
    _compare(lambda: nn.MultiheadAttention(E, H), lambda m: m(x, x, x))
    causal = nn.Transformer.generate_square_subsequent_mask(T)
    xb = torch.randn(B, T, E)
    for need in (False, True):
        _compare(
            lambda: nn.MultiheadAttention(E, H, batch_first=True),
            lambda m, need=need: m(xb, xb, xb, attn_mask=causal, is_causal=True, need_weights=need),
        )
    with pytest.raises(UserError, match="is_causal"):
        unroll(nn.MultiheadAttention(E, H))(xb, xb, xb, is_causal=True)


def test_attention_with_a_computed_projection_weight_is_refused():
    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    mha = nn.MultiheadAttention(E, H)
    nn.utils.parametrize.register_parametrization(mha, "in_proj_weight", Doubled())
    with pytest.raises(UserError, match=r"MultiheadAttention\.in_proj_weight is not a Parameter"):
        unroll(nn.Sequential(mha))


def test_attention_dropout_draws_from_the_global_rng():
    torch.manual_seed(0)
    m = unroll(nn.MultiheadAttention(E, H, dropout=0.5))
    x = torch.randn(T, B, E)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(m(x, x, x, need_weights=False)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert (outs[0] - outs[2]).abs().max() > 1e-3
    # with weights asked for, torch drops out the [B*H, L, S] weights with F.dropout too: the
    # same draws from the same seed, so the unrolled module matches it even in training
    torch.manual_seed(0)
    original = nn.MultiheadAttention(E, H, dropout=0.5)
    m = unroll(copy.deepcopy(original))
    for avg in (True, False):
        torch.manual_seed(7)
        ref = original(x, x, x, average_attn_weights=avg)
        torch.manual_seed(7)
        new = m(x, x, x, average_attn_weights=avg)
        for a, b in zip(ref, new, strict=True):
            torch.testing.assert_close(b, a, atol=OUT_TOL, rtol=0)


def test_attention_projections_see_batch_first_inputs():
    torch.manual_seed(0)
    m = unroll(nn.MultiheadAttention(E, H, batch_first=False))
    seen = []
    m.in_proj.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    m.out_proj.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    x, mem = torch.randn(T, B, E), torch.randn(T + 1, B, E)
    m(x, x, x)
    assert seen == [(B, T, E), (B, T, E)]
    seen.clear()
    m(x, mem, mem)  # cross-attention: the query call, then one call on key = value
    assert seen == [(B, T, E), (B, T + 1, E), (B, T, E)]


def _encoder_layer(norm_first, batch_first):
    return nn.TransformerEncoderLayer(
        E, H, dim_feedforward=8, dropout=0.0, norm_first=norm_first, batch_first=batch_first
    )


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_layers_match_torch_in_train_and_eval(norm_first, batch_first):
    torch.manual_seed(0)
    shape = (B, T, E) if batch_first else (T, B, E)
    x, mem = torch.randn(shape), torch.randn(shape)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # bool, like the padding mask
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, -2:] = True
    for train in (True, False):
        _compare(lambda: _encoder_layer(norm_first, batch_first), lambda m: m(x), train=train)
        _compare(
            lambda: _encoder_layer(norm_first, batch_first),
            lambda m: m(x, src_mask=causal, is_causal=True, src_key_padding_mask=kpm),
            train=train,
        )
        _compare(
            lambda: nn.TransformerDecoderLayer(
                E, H, 8, 0.0, norm_first=norm_first, batch_first=batch_first
            ),
            lambda m: m(x, mem, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=kpm),
            train=train,
        )
        # eval under no_grad: the original takes its fused fast path, ours the Linear modules
        make = lambda: _encoder_layer(norm_first, batch_first)  # noqa: E731
        _compare(make, lambda m: _no_grad(m, x), train=train, grads=False)


def _no_grad(m, *args, **kwargs):
    with torch.no_grad():
        return m(*args, **kwargs)


def test_whole_transformer_matches_torch():
    torch.manual_seed(0)
    src, tgt = torch.randn(B, T, E), torch.randn(B, T - 1, E)
    causal = nn.Transformer.generate_square_subsequent_mask(T - 1)

    def make():
        return nn.Transformer(
            E,
            H,
            num_encoder_layers=2,
            num_decoder_layers=2,
            dim_feedforward=8,
            dropout=0.0,
            batch_first=True,
        )

    for train in (True, False):
        _compare(make, lambda m: m(src, tgt, tgt_mask=causal, tgt_is_causal=True), train=train)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_encoder_nested_tensor_path_is_turned_off():
    """An eval nn.TransformerEncoder under no_grad with a padding mask runs its layers on nested
    tensors; unroll turns that off and outputs agree on the unpadded positions (the nested path
    writes zeros at padded ones)."""
    torch.manual_seed(0)
    x = torch.randn(B, T, E)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, -2:] = True
    enc = nn.TransformerEncoder(_encoder_layer(False, True), 2, enable_nested_tensor=True)
    enc.eval()
    reference = copy.deepcopy(enc)
    unroll(enc)
    assert not enc.use_nested_tensor
    with torch.no_grad():
        a = reference(x, src_key_padding_mask=kpm)
        b = enc(x, src_key_padding_mask=kpm)
    keep = ~kpm
    torch.testing.assert_close(b[keep], a[keep], atol=OUT_TOL, rtol=0)


@pytest.mark.parametrize("norm_first", [False, True])
def test_eval_fast_path_never_bypasses_the_projection_modules(norm_first, monkeypatch):
    """A change made through the in_proj Linear module (here: its forward scaled by 2, as a
    rule or decorrelation acting on the module would) must show in eval-mode outputs under
    no_grad, where torch's fused path would read in_proj_weight directly. Patching forward, not a
    hook, because hooks alone already disable torch's fast path."""
    torch.manual_seed(0)
    layer = _encoder_layer(norm_first, True)
    with torch.no_grad():
        layer.self_attn.in_proj_bias.normal_()
    layer.eval()
    scaled = copy.deepcopy(layer)
    with torch.no_grad():
        scaled.self_attn.in_proj_weight.mul_(2)
        scaled.self_attn.in_proj_bias.mul_(2)
    unroll(layer)
    lin = layer.self_attn.in_proj
    monkeypatch.setattr(lin, "forward", lambda x: 2 * nn.Linear.forward(lin, x))
    x = torch.randn(B, T, E)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), scaled(x), atol=OUT_TOL, rtol=0)
        enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        torch.testing.assert_close(enc(x), scaled(x), atol=OUT_TOL, rtol=0)
