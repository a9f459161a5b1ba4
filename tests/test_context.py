"""The step context, in one process: what two ranks would compute on their shards of a batch,
each told its :class:`~decorrelate.context.StepContext`, adds up to the global batch's step.

These are the properties :mod:`tests.test_distributed` relies on, checked here without a process
group: the loss weight n_r·W/N makes the mean of the ranks' gradients the global batch mean, node
perturbation draws every rank's noise for the global batch, and decorrelators told the shard
by :func:`decorrelate.nn.step_context` keep exactly their rows of the global subsample.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import decorrelate as dc
from decorrelate.context import SINGLE_PROCESS, BatchShard, StepContext
from decorrelate.rules import AlignmentProbe, LearningRule
from decorrelate.rules.perturbation import _Injector, gaussian

N, WORLD = 51, 2
SHARDS = [BatchShard(0, 26, N), BatchShard(26, 25, N)]  # unequal: 26 / 25


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (N,))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def test_the_context_of_a_shard_weights_its_loss_by_its_share():
    ctx = StepContext.of(7, SHARDS[1], WORLD)
    assert (ctx.step, ctx.shard, ctx.loss_scale) == (7, SHARDS[1], 25 * 2 / 51)
    assert StepContext.of(3, None, WORLD) == StepContext(3)
    loss = torch.tensor(2.0)
    assert ctx.scaled(loss).item() == pytest.approx(2.0 * 50 / 51)
    assert ctx.unscaled(ctx.scaled(loss)).item() == pytest.approx(2.0)
    assert SINGLE_PROCESS.scaled(loss) is loss  # one process: the very tensor, no extra op
    assert SHARDS[1].rows(25, per_sample=4) == (26 * 4, 51 * 4)
    assert SHARDS[1].rows(24) is None  # not this shard's batch: its rows are all there is
    assert BatchShard(0, 51, 51).rows(51) is None


@pytest.mark.parametrize(
    "name", ["bp", "fa", "dfa", "np", "anp", "align-zero", "last-layer", "probe"]
)
def test_the_ranks_gradients_average_to_the_global_batch_gradient(name):
    """For every rule family: W shard steps with their contexts, averaged, equal the one
    process step on the whole batch; each reports its own batch's unweighted mean loss."""
    x, y = data()

    def make() -> tuple[nn.Module, LearningRule]:
        model = mlp()
        rule = AlignmentProbe() if name == "probe" else dc.get_rule(name)
        if name in ("np", "anp"):
            rule.sigma = 1e-4
        rule.attach(model, dc.Loss("cross-entropy"), torch.Generator().manual_seed(5))
        return model, rule

    model, rule = make()
    whole = rule.backward(model, x, y)
    expected = grads(model)
    parts = []
    for shard in SHARDS:
        model, rule = make()  # every rank starts from the same model and generator state
        rows = slice(shard.offset, shard.offset + shard.size)
        out = rule.backward(model, x[rows], y[rows], ctx=StepContext.of(0, shard, WORLD))
        alone = rule.loss(model(x[rows]), y[rows])
        torch.testing.assert_close(out.loss, alone.detach())  # not weighted
        parts.append(grads(model))
    assert any(g is not None for g in expected)
    for e, a, b in zip(expected, *parts, strict=True):
        if e is None:  # a parameter the rule does not train (last-layer)
            assert a is None and b is None
            continue
        torch.testing.assert_close((a + b) / WORLD, e, rtol=1e-9, atol=1e-12)
    assert whole.loss.item() == pytest.approx(rule.loss(model(x), y).item())


def test_node_perturbation_noise_of_a_shard_is_its_rows_of_the_global_draw():
    def draw(shard: BatchShard | None, rows: int) -> torch.Tensor:
        injector = _Injector(gaussian, 0.5, torch.Generator().manual_seed(3), shard=shard)
        eps, token = injector.draw(torch.zeros(rows, 4, dtype=torch.float64))
        torch.testing.assert_close(injector.noise(token), eps)  # replayed for the same rows
        return eps

    full = draw(None, N)
    for shard in SHARDS:
        torch.testing.assert_close(draw(shard, shard.size), full[shard.offset :][: shard.size])
    assert not torch.equal(draw(None, 25), full[26:])  # without the shard: another draw


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_decorrelators_told_the_shard_keep_their_rows_of_the_global_subsample(layer):
    """The union of the ranks' captured rows is the one-process subsample, and the shard is
    forgotten after the step."""
    torch.manual_seed(0)
    if layer == "linear":
        base, x = nn.Sequential(nn.Linear(6, 5)), torch.randn(N, 6)
    else:
        base, x = nn.Sequential(nn.Conv2d(2, 3, 3)), torch.randn(N, 2, 5, 5)
    model = dc.nn.decorrelate(base, "copi", sample_frac=0.3, max_samples=40)
    (_, decor), *_ = dc.nn.decorrelators(model)

    def captured(batch: torch.Tensor, ctx: StepContext | None) -> torch.Tensor:
        with dc.nn.step_context(model, ctx):
            model(batch).sum().backward()
            assert decor.shard == (None if ctx is None else ctx.shard)
        assert decor.shard is None
        rows = decor._sample[0]
        decor.clear_sample()
        return rows

    whole = captured(x, None)
    parts = [captured(x[s.offset : s.offset + s.size], StepContext.of(0, s, WORLD)) for s in SHARDS]
    assert 0 < parts[0].shape[0] < whole.shape[0]
    union = torch.cat(parts)  # the same rows, in another order (R learns from their moments)
    assert union.shape == whole.shape
    torch.testing.assert_close(torch.unique(union, dim=0), torch.unique(whole, dim=0))
    alone = captured(x[26:], None)  # a shard that is not told where it lies chooses by itself
    assert alone.shape != parts[1].shape or not torch.equal(alone, parts[1])


def test_a_rule_whose_backward_takes_no_context_is_refused_when_defined():
    with pytest.raises(TypeError, match="must also accept the step context"):

        class Old(LearningRule):
            def backward(self, model, x, y):
                return None

    class New(LearningRule):
        def backward(self, model, x, y, ctx=SINGLE_PROCESS):
            return ctx

    assert New().backward(None, None, None) is SINGLE_PROCESS


def test_no_module_keeps_the_shard_or_the_loss_weight():
    """The hidden channels are gone: no module-level shard, no mutable scale on the loss."""
    import decorrelate.distributed as dist

    assert not hasattr(dist, "current_shard") and not hasattr(dist, "batch_shard")
    assert not hasattr(dc.Loss("mse"), "scale")
    assert copy.copy(SINGLE_PROCESS) == StepContext()


@pytest.mark.parametrize("name", ["euclidean", "linearized", "linearized-g", "bptt"])
def test_fixed_point_rules_weight_their_update_by_the_loss_scale(name):
    """The fixed-point rules' updates are linear in ∂L/∂r: the context's weight scales W.grad
    exactly as it scales the loss, and the reported loss is the batch's own."""
    import decorrelate.fixedpoint  # noqa: F401  (registers the rules)
    from decorrelate.fixedpoint.model import RateRNN
    from decorrelate.fixedpoint.solver import SolverConfig

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=gen)
    results = []
    for ctx in (SINGLE_PROCESS, StepContext(4, SHARDS[0], 0.75)):
        model = RateRNN(
            7,
            5,
            3,
            w_scale=0.6,
            solver=SolverConfig(tol=1e-12, max_iter=2000),
            generator=torch.Generator().manual_seed(1),
            dtype=torch.float64,
        )
        rule = dc.get_rule(name)
        rule.attach(model, dc.Loss("cross-entropy"))
        out = rule.backward(model, x, y, ctx=ctx)
        results.append((out.loss, model.W.grad.clone()))
    (loss, grad), (loss_w, grad_w) = results
    assert grad.abs().max() > 0
    torch.testing.assert_close(loss_w, loss)
    torch.testing.assert_close(grad_w, 0.75 * grad, rtol=1e-9, atol=1e-12)
