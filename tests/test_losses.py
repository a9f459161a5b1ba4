"""Losses as users have them: output selectors, token-level targets with ignore_index, callables.

References are written from the formulas (per-token −log softmax, per-sequence means) in float64,
so they agree with the library to rounding only.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decorrelate import Loss, UserError, evaluate, get_rule
from decorrelate.data import epoch_order
from decorrelate.losses import as_loss
from decorrelate.text import char_task, generate_corpus

IGNORE = -100
RULES = [
    "bp", "fa", "dfa", "np", "inp", "anp", "align-zero", "align-ada", "align-prop", "last-layer"
]  # fmt: skip


def token_batch(b: int = 4, t: int = 6, v: int = 5, seed: int = 0):
    """float64 logits [B, T, V] and targets [B, T] with padding of different lengths; the last
    sequence is all padding."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=gen, dtype=torch.float64)
    y = torch.randint(0, v, (b, t), generator=gen)
    lengths = [t, t - 2, 1, 0][:b]
    for i, n in enumerate(lengths):
        y[i, n:] = IGNORE
    return logits, y


def ce_per_token(logits, y):
    """−log softmax(logits)[y] per position, from the formula; 0 where ignored."""
    logp = logits - logits.exp().sum(-1, keepdim=True).log()
    safe = y.clamp(min=0)
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(y == IGNORE, torch.zeros_like(nll), nll)


# ----------------------------------------------------------------------------- token-level


def test_token_cross_entropy_mean_and_sum_match_torch_with_ignore_index():
    logits, y = token_batch()
    loss = Loss("cross-entropy")
    flat_ref = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    assert torch.allclose(loss(logits, y), flat_ref, rtol=1e-12, atol=0)
    assert torch.allclose(loss(logits, y), ce_per_token(logits, y).sum() / (y != IGNORE).sum())
    assert torch.allclose(loss(logits, y, "sum"), ce_per_token(logits, y).sum())
    # sum / count == mean: what lets evaluation add batches up exactly
    assert torch.allclose(loss(logits, y, "sum") / loss.count(y), loss(logits, y))


def test_per_sample_loss_is_the_mean_over_each_sequences_valid_tokens():
    logits, y = token_batch()
    per_tok, valid = ce_per_token(logits, y), (y != IGNORE)
    expected = torch.stack(
        [
            per_tok[i][valid[i]].mean() if valid[i].any() else torch.zeros((), dtype=logits.dtype)
            for i in range(y.shape[0])
        ]
    )
    got = Loss("cross-entropy")(logits, y, reduction="none")
    assert got.shape == (y.shape[0],)
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)
    assert got[-1] == 0  # a sequence without a valid token
    # ... which differs from the token mean when the lengths differ (documented)
    assert not torch.allclose(got[:-1].mean(), Loss()(logits, y))


def test_token_mse_is_one_hot_over_the_vocabulary_per_token():
    logits, y = token_batch()
    valid = y != IGNORE
    for name, shift in (("mse", 0.0), ("mse-shifted", 0.1)):
        target = F.one_hot(y.clamp(min=0), logits.shape[-1]).double() - shift
        per_tok = 0.5 * ((logits - target) ** 2).sum(-1) * valid
        loss = Loss(name)
        assert torch.allclose(loss(logits, y), per_tok.sum() / valid.sum())
        per_seq = per_tok.sum(1) / valid.sum(1).clamp(min=1)
        assert torch.allclose(loss(logits, y, reduction="none"), per_seq)


def test_ignore_index_is_configurable_and_classic_targets_are_unchanged():
    logits, y = token_batch()
    y0 = torch.where(y == IGNORE, 0, y + 1)  # 0 is padding now, a class that is never predicted
    logits0 = torch.cat([torch.full_like(logits[..., :1], -math.inf), logits], -1)
    assert torch.allclose(Loss(ignore_index=0)(logits0, y0), Loss()(logits, y))
    out, lab = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.equal(Loss()(out, lab), F.cross_entropy(out, lab))
    assert torch.equal(Loss()(out, lab, "none"), F.cross_entropy(out, lab, reduction="none"))


def test_shape_and_dtype_mismatches_are_one_user_error():
    with pytest.raises(UserError, match=r"does not fit the targets \(4, 6\)"):
        Loss()(torch.randn(4, 5), torch.zeros(4, 6, dtype=torch.long))
    with pytest.raises(UserError, match="class-index targets"):
        Loss()(torch.randn(4, 5), torch.zeros(4))
    with pytest.raises(UserError, match="unknown reduction"):
        Loss()(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), reduction="avg")


def test_token_accuracy_counts_only_valid_tokens():
    logits, y = token_batch()
    loss = Loss()
    hits = (logits.argmax(-1) == y) & (y != IGNORE)
    assert loss.correct(logits, y) == hits.sum()
    assert loss.count(y) == (y != IGNORE).sum()
    out, lab = torch.randn(8, 3), torch.randint(0, 3, (8,))
    assert loss.correct(out, lab) == (out.argmax(-1) == lab).sum() and loss.count(lab) == 8
    # a padding id that is a real class index: a correct "prediction" of padding is not counted
    pad = Loss(ignore_index=0)
    y0 = logits.argmax(-1)
    assert pad.correct(logits, y0) == pad.count(y0) == (y0 != 0).sum() < y0.numel()


# ----------------------------------------------------------------------------- selectors


class FakeModelOutput(OrderedDict):
    """Like Hugging Face's ModelOutput: a dict whose set entries are also attributes."""

    def __init__(self, **kw):
        super().__init__(**{k: v for k, v in kw.items() if v is not None})
        for k, v in kw.items():
            object.__setattr__(self, k, v)


class Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_default_selector_takes_the_tensor_logits_or_first_element():
    t = torch.randn(2, 3)
    loss = Loss()
    assert loss.select(t) is t
    assert loss.select({"loss": torch.ones(()), "logits": t}) is t
    assert loss.select(FakeModelOutput(loss=None, logits=t, hidden=t + 1)) is t
    assert loss.select(Obj(logits=t)) is t
    assert loss.select((t, t + 1)) is t and loss.select([t]) is t
    with pytest.raises(UserError, match=r"keys 'out', 'aux' and no 'logits'; pass output="):
        loss.select({"out": t, "aux": t})
    with pytest.raises(UserError, match=r"the model returned a Obj.*pass output="):
        loss.select(Obj(out=t))
    with pytest.raises(UserError, match="returned a int"):
        loss.select(3)
    with pytest.raises(UserError, match="not a tensor"):
        loss.select(([t], t))


def test_named_indexed_and_callable_selectors():
    t, u = torch.randn(2, 3), torch.randn(2, 3)
    assert Loss(output="pred").select({"pred": t, "logits": u}) is t
    assert Loss(output="pred").select(Obj(pred=t)) is t
    assert Loss(output="hidden").select(FakeModelOutput(logits=u, hidden=t)) is t
    assert Loss(output=1).select((u, t)) is t and Loss(output=-1).select([u, t]) is t
    assert Loss(output=lambda o: o["a"]["b"]).select({"a": {"b": t}}) is t
    # a selected tensor is never selected again by key/index (a tuple index would slice rows)
    assert Loss(output=1).select(t) is t and Loss(output="pred").select(t) is t
    last = Loss(output=lambda o: o[:, -1])  # a callable applies to tensors too
    assert torch.equal(last.select(torch.arange(6).reshape(2, 3)), torch.tensor([2, 5]))
    with pytest.raises(UserError, match=r"without 'pred' \(keys: 'logits'\)"):
        Loss(output="pred").select({"logits": t})
    with pytest.raises(UserError, match=r"output=3 picks a tuple entry.*length 2"):
        Loss(output=3).select((t, u))
    with pytest.raises(UserError, match="returned a str, not a tensor"):
        Loss(output=lambda o: "x").select(t)
    with pytest.raises(UserError, match="output= selects"):
        Loss(output=1.5)
    with pytest.raises(UserError, match="ignore_index must be an int"):
        Loss(ignore_index=None)


def test_loss_on_a_raw_output_selects_first():
    logits, y = token_batch()
    loss = Loss(output="scores")
    assert torch.equal(loss({"scores": logits}, y), Loss()(logits, y))


# ----------------------------------------------------------------------------- callables


def test_user_callable_mean_sum_and_per_sample():
    logits, y = token_batch()

    def token_ce(out, target, reduction="mean"):
        return F.cross_entropy(out.flatten(0, 1), target.flatten(), reduction=reduction)

    loss = Loss(token_ce)
    assert loss.per_sample and "token_ce" in repr(loss)
    assert torch.allclose(loss(logits, y), Loss()(logits, y))
    assert torch.allclose(loss(logits, y, "sum"), Loss()(logits, y, "sum"))
    # "none" gives one value per token (flat); the Loss averages it per sequence
    assert torch.allclose(loss(logits, y, "none"), Loss()(logits, y, "none"))

    def per_sample_only(out, target, reduction="mean"):
        per = F.cross_entropy(out, target, reduction="none")
        return per if reduction == "none" else per.mean()

    out, lab = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert torch.allclose(Loss(per_sample_only)(out, lab, "none"), Loss()(out, lab, "none"))
    module = Loss(nn.CrossEntropyLoss())
    assert module.per_sample and repr(module) == "Loss(CrossEntropyLoss)"
    assert torch.allclose(module(out, lab, "none"), F.cross_entropy(out, lab, reduction="none"))
    assert torch.allclose(module(out, lab), F.cross_entropy(out, lab))
    part = Loss(functools.partial(F.cross_entropy, label_smoothing=0.1), output="logits")
    assert part.per_sample and repr(part) == "Loss(partial(cross_entropy), output='logits')"


def test_a_callable_without_reduction_cannot_give_per_sample_losses():
    def mean_only(out, target):
        return F.cross_entropy(out, target)

    loss = Loss(mean_only)
    out, lab = torch.randn(5, 3), torch.randint(0, 3, (5,))
    assert not loss.per_sample
    assert torch.allclose(loss(out, lab), F.cross_entropy(out, lab))
    with pytest.raises(UserError, match=r"cannot give one loss per sample.*reduction='none'"):
        loss(out, lab, reduction="none")
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    rule = get_rule("np")
    rule.attach(model, loss, torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="cannot give one loss per sample"):
        rule.backward(model, out, lab)
    with pytest.raises(UserError, match="not one number"):
        Loss(lambda o, t: o.sum(-1))(out, lab)
    with pytest.raises(UserError, match="expected one loss per sample"):
        Loss(lambda o, t, reduction="mean": o.sum())(out, lab, "none")


def test_as_loss_and_names():
    assert as_loss(None).name == "cross-entropy" and as_loss("mse").name == "mse"
    given = Loss("mse")
    assert as_loss(given) is given
    with pytest.raises(UserError, match="already has its output selector"):
        as_loss(given, output="logits")
    assert repr(as_loss("mse", output="logits", ignore_index=0)) == (
        "Loss('mse', output='logits', ignore_index=0)"
    )
    with pytest.raises(UserError, match=r"unknown loss 'hinge'.*or pass a callable"):
        Loss("hinge")
    with pytest.raises(UserError, match="a loss is a name"):
        Loss(3)


# ----------------------------------------------------------------------------- training


class DictLM(nn.Module):
    """Next-character model on one-hot characters returning a dict: Linear/Tanh/Linear per
    position (a bigram model), which every current rule supports."""

    def __init__(self, vocab: int, hidden: int = 32) -> None:
        super().__init__()
        self.vocab = vocab
        self.net = nn.Sequential(nn.Linear(vocab, hidden), nn.Tanh(), nn.Linear(hidden, vocab))

    def forward(self, x):
        return {"logits": self.net(F.one_hot(x, self.vocab).float()), "aux": x}


def test_char_task_is_deterministic_and_split_without_overlap():
    assert generate_corpus(2000, 3) == generate_corpus(2000, 3) != generate_corpus(2000, 4)
    task = char_task(n_chars=5000, seq_len=16, test_frac=0.2, val_frac=0.1, seed=1)
    s = task.splits
    assert s.train.x.dtype == torch.int64 and s.train.y.shape == s.train.x.shape
    assert s.num_classes == task.vocab_size == len(set(generate_corpus(5000, 1)))
    # y is x shifted by one character, across window boundaries too
    text = generate_corpus(5000, 1)
    assert task.decode(s.train.x[0]) == text[:16] and task.decode(s.train.y[0]) == text[1:17]
    n = len(s.train) + len(s.val) + len(s.test)
    assert n == (len(text) - 1) // 16 and len(s.test) == round(n * 0.2)
    assert torch.equal(task.encode(text[16:32]), s.train.x[1])
    with pytest.raises(UserError, match="too short"):
        char_task("abc", seq_len=8)


@pytest.mark.parametrize("rule_name", RULES)
def test_a_dict_model_on_token_targets_learns_with_every_rule(rule_name):
    torch.manual_seed(0)
    task = char_task(n_chars=20_000, seq_len=16, seed=0)
    train, test = task.splits.train, task.splits.test
    model = DictLM(task.vocab_size)
    loss = Loss("cross-entropy")  # picks "logits" from the dict by default
    rule = get_rule(rule_name)
    rule.attach(model, loss, torch.Generator().manual_seed(0), example=train.x[:2])
    before, acc0 = evaluate(model, test, loss, 256)
    assert before == pytest.approx(math.log(task.vocab_size), abs=0.3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(1, 4):
        for x, y in train.batches(64, order=epoch_order(len(train), 0, epoch)):
            opt.zero_grad(set_to_none=True)
            out = rule.backward(model, x, y)
            assert out.output.shape == (*y.shape, task.vocab_size)
            opt.step()
    after, acc = evaluate(model, test, loss, 256)
    assert after < before - 0.3, (before, after)
    assert acc > acc0


def test_evaluate_on_a_dict_model_is_the_token_mean_over_the_set():
    logits_model = DictLM(5)
    x = torch.randint(0, 5, (7, 4))
    y = torch.randint(0, 5, (7, 4))
    y[2, 1:] = IGNORE
    y[5] = IGNORE
    from decorrelate.data import Dataset

    data = Dataset(x, y, 5, "toy")
    loss = Loss()
    got_loss, got_acc = evaluate(logits_model, data, loss, batch_size=3)
    with torch.no_grad():
        logits = logits_model(x)["logits"].double()
    valid = y != IGNORE
    assert got_loss == pytest.approx(float(ce_per_token(logits, y).sum() / valid.sum()), rel=1e-6)
    hits = ((logits.argmax(-1) == y) & valid).sum()
    assert got_acc == pytest.approx(float(hits / valid.sum()))


def test_train_accepts_a_loss_object_or_callable(tiny):
    from decorrelate import train

    calls = []

    def my_ce(out, target, reduction="mean"):
        calls.append(reduction)
        return F.cross_entropy(out, target, reduction=reduction)

    ref = train({**tiny, "epochs": 1, "out": tiny["out"] + "-ref"}, log=None)
    got = train({**tiny, "epochs": 1}, log=None, loss=my_ce)
    assert calls and got.history[-1]["test_loss"] == pytest.approx(
        ref.history[-1]["test_loss"], rel=1e-5
    )
