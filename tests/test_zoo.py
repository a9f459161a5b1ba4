"""Every rule × every decorrelation method × every zoo architecture (issue 16, item 6).

Three properties per architecture of :mod:`decorrelate.zoo`:

* **the loss falls**: every rule of :func:`available_rules` (those defined on the architecture,
  see :data:`UNDEFINED`), after ``decorrelate(model, method)`` for method in {none, scaled, dbp},
  trains a fixed batch for a few steps with the library's loop (``rule.backward`` fills
  ``.grad``, ``optimizer.step()``, ``local_update``) and the mean loss of the last steps is
  below 0.9 × the first step's;
* **FA with B = W is BP**: feedback alignment whose feedback matrices are the forward weights
  gives backprop's gradients (float64, 1e-6 relative), for every parameter;
* **NP points along the gradient**: node perturbation's update averaged over many noisy
  samples (float64, small σ) has cosine > 0.9 with BP's gradient, over all parameters — every
  trainable parameter gets an update (none left None).

Tiny models and batches: the file runs in well under a minute on two cores.
"""

from __future__ import annotations

import copy
import fnmatch

import pytest
import torch
from torch import Tensor, nn

import decorrelate as dc
from decorrelate.fixedpoint.rules import FixedPointRule
from decorrelate.rules import available_rules, get_rule, rule_class
from decorrelate.zoo import ZOO, ZooEntry

ARCHITECTURES = tuple(ZOO)
DECORRELATION = ("none", "scaled", "dbp")
RULES = available_rules()

#: Cells where a rule is not defined for an architecture: (architecture, rule, reason). Glob
#: patterns. The one place a cell of the matrix is left out for good.
UNDEFINED: list[tuple[str, str, str]] = [
    ("*", name, "a fixed-point rule trains a rate RNN (decorrelate.fixedpoint), not a zoo model")
    for name in RULES
    if issubclass(rule_class(name), FixedPointRule)
]

# ----------------------------------------------------------------------------- known gaps
# Cells where the rule is defined but does not (yet) meet the test, measured on this machine
# (seed 0; numbers are the loss at step 1 → mean of the last 5 of 40 steps, or the cosine).
# They are reported as xfail without running (CI time); issue 16 stays open on them.
# Patterns: (test, architecture, rule, decorrelation), test one of "loss", "fa=bp", "np-cos".
KNOWN_GAPS: list[tuple[str, str, str | tuple[str, ...], str, str]] = [
    ("loss", "resnet", ("np", "inp", "anp"), "*",
     "zero-init γ ResNet: 1.39 → 1.36-1.40 in 40 steps (needs < 0.9×)"),
    ("loss", "depthwise", ("np", "anp"), "*", "1.43 → 1.32-1.34 in 40 steps (needs < 0.9×)"),
    ("loss", ("resnet", "depthwise", "hf-bert"), "align-zero", "*",
     "the linearised network's descent stalls: e.g. resnet 1.39 → 1.29-1.36"),
    ("loss", "hf-gpt2", "fa", "*", "the loss rises, 2.75 → 3.12-3.18 at Adam 1e-2"),
    ("loss", "hf-gpt2", "last-layer", "*",
     "the readout is tied to the token embedding: 2.75 → 2.62-2.63 (needs < 2.48)"),
    ("loss", "hf-gpt2", "anp", "dbp", "2.75 → 2.49 (needs < 2.48)"),
    ("np-cos", ("resnet", "depthwise", "lstm-lm", "hf-gpt2", "hf-bert"), "np", "*",
     "variance: cosine 0.79 / 0.84 / 0.90 / 0.72 / 0.80 at 10 × 2000 noisy passes (eval mode)"),
]  # fmt: skip
# -----------------------------------------------------------------------------
# -----------------------------------------------------------------------------


def _match(patterns: list[tuple], *cell: str) -> str | None:
    for *pattern, reason in patterns:
        if all(
            c in p if isinstance(p, tuple) else fnmatch.fnmatchcase(c, p)
            for c, p in zip(cell, pattern, strict=True)
        ):
            return reason
    return None


def _skip_if_out(test: str, arch: str, rule: str, decor: str = "none") -> ZooEntry:
    entry = ZOO[arch]
    if entry.requires is not None:
        pytest.importorskip(entry.requires)
    reason = _match(UNDEFINED, arch, rule)
    if reason is not None:
        pytest.skip(f"{rule} is not defined on {arch}: {reason}")
    reason = _match(KNOWN_GAPS, test, arch, rule, decor)
    if reason is not None:
        pytest.xfail(f"known gap (issue 16): {reason}")
    return entry


def _batch(entry: ZooEntry, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    return entry.batch(n, torch.Generator().manual_seed(seed))


def _options(rule: str) -> dict:
    """Per-family options: forward-only (perturbation) rules average over more noisy copies."""
    return {"samples": 8} if rule_class(rule).forward_only else {}


#: (steps, Adam learning rate) where the default (40, 1e-2) does not fit a rule. align-zero
#: descends the network linearised at initialisation: larger steps leave the linear regime and
#: the true network's loss rises again (the MLP at seed 2 and lr 1e-2 fell to 0.58 of its
#: initial loss by step 20, then rose back to 0.99). last-layer trains a linear readout (a convex
#: problem), slowly at 1e-2 on the zero-init ResNet (0.88 of the initial loss at seed 0; 0.73
#: at 3e-2, worst of seeds 0-3).
STEPS: dict[str, tuple[int, float]] = {"align-zero": (40, 5e-3), "last-layer": (40, 3e-2)}


def _steps(rule: str) -> tuple[int, float]:
    """(steps, Adam learning rate): perturbation rules (forward only) take smaller steps."""
    if rule in STEPS:
        return STEPS[rule]
    return (40, 5e-3) if rule_class(rule).forward_only else (40, 1e-2)


def train_losses(
    arch: str, rule: str, decor: str, seed: int = 0, steps: int | None = None
) -> list[float]:
    """The clean loss at every step of training ``arch`` with ``rule`` on one fixed batch."""
    entry = ZOO[arch]
    torch.manual_seed(seed)  # random modules (none by default) draw from the global RNG
    model = entry.build(seed=seed)
    x, y = _batch(entry, 16, seed)
    if decor != "none":
        dc.nn.decorrelate(model, decor, sample_frac=0.5)
    learner = get_rule(rule, **_options(rule))
    learner.attach(model, entry.make_loss(), torch.Generator().manual_seed(seed), example=x[:1])
    n, lr = _steps(rule)
    optimizer = torch.optim.Adam(model.parameters(), lr)
    losses = []
    for _ in range(steps or n):
        optimizer.zero_grad(set_to_none=True)
        out = learner.backward(model, x, y)
        optimizer.step()
        dc.nn.local_update(model)
        losses.append(float(out.loss))
    return losses


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_zoo_builders_are_seeded_and_fit_their_task(arch: str) -> None:
    """Same seed, same weights; the global RNG is left alone; output and targets fit the loss."""
    entry = ZOO[arch]
    if entry.requires is not None:
        pytest.importorskip(entry.requires)
    state = torch.random.get_rng_state()
    a, b, c = entry.build(seed=3), entry.build(seed=3), entry.build(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    pa, pb, pc = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    x, y = _batch(entry, 4)
    x2, y2 = _batch(entry, 4)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    out = a(x)
    logits = out.logits if entry.loss_kwargs.get("output") == "logits" else out
    assert y.dtype == torch.long
    assert logits.shape[:-1] == y.shape  # [B, K] with [B], or [B, T, V] with [B, T]
    assert int(y.max()) < logits.shape[-1]


def test_zoo_structure() -> None:
    """The properties the zoo promises: zero-init residual γ, depthwise groups, a Markov task."""
    blocks = [m for m in ZOO["resnet"].build().modules() if type(m).__name__ == "BasicBlock"]
    assert blocks and all(torch.all(b.bn2.weight == 0) for b in blocks)
    convs = [m for m in ZOO["depthwise"].build().modules() if isinstance(m, nn.Conv2d)]
    assert any(m.groups == m.in_channels == m.out_channels > 1 for m in convs)
    x, y = _batch(ZOO["gpt"], 64)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    successors = {(int(a), int(b)) for a, b in zip(x.flatten(), y.flatten(), strict=True)}
    assert len(successors) <= 2 * 16  # each token has at most two successors


@pytest.mark.parametrize("decor", DECORRELATION)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loss_falls(arch: str, rule: str, decor: str) -> None:
    _skip_if_out("loss", arch, rule, decor)
    losses = train_losses(arch, rule, decor)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    final = sum(losses[-5:]) / 5
    assert final < 0.9 * losses[0], f"{arch}/{rule}/{decor}: {losses[0]:.4f} → {final:.4f}"


def _params_and_grads(
    entry: ZooEntry, rule: str, options: dict, model: nn.Module, x: Tensor, y: Tensor, calls: int
) -> list[Tensor | None]:
    """Every parameter's ``.grad`` after ``calls`` backward calls of ``rule`` (summed)."""
    params = list(model.parameters())  # before attach: rules keep the Parameter objects
    learner = get_rule(rule, **options)
    learner.attach(model, entry.make_loss(), torch.Generator().manual_seed(1), example=x[:1])
    for p in params:
        p.grad = None
    for _ in range(calls):
        learner.backward(model, x, y)
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def _float64(entry: ZooEntry, n: int = 8, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    model = entry.build(seed=seed).double()
    x, y = _batch(entry, n, seed)
    return model, (x.double() if x.is_floating_point() else x), y


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fa_with_weight_feedback_is_bp(arch: str) -> None:
    entry = _skip_if_out("fa=bp", arch, "fa")
    model, x, y = _float64(entry)
    twin = copy.deepcopy(model)
    bp = _params_and_grads(entry, "bp", {}, model, x, y, 1)
    fa = _params_and_grads(entry, "fa", {"feedback_init": "weight"}, twin, x, y, 1)
    names = [n for n, _ in entry.build().named_parameters()]
    for name, g_bp, g_fa in zip(names, bp, fa, strict=True):
        assert g_bp is not None, f"{arch}: BP left {name} without a gradient"
        assert g_fa is not None, f"{arch}: FA left {name} without a gradient"
        scale = max(g_bp.norm().item(), 1e-12)
        assert (g_fa - g_bp).norm().item() <= 1e-6 * scale + 1e-12, f"{arch}: {name}"


def _cosine(a: list[Tensor], b: list[Tensor]) -> float:
    u, v = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float(u @ v / (u.norm() * v.norm()))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_np_mean_update_points_along_bp(arch: str) -> None:
    """σ = 1e-4 in float64: the estimator's bias is O(σ) and its rounding O(1e-16/σ²), both
    negligible. Its variance: the relative squared error of the batch update is about
    (perturbed nodes per sample) × (Σ‖per-sample gradient‖² / ‖batch gradient‖²) / (noisy
    copies); per-sample gradients cancel in a batch mean (on the MLP 4 × 500 copies of an
    8-sample batch gave only 0.87), so the batch is 2 samples and the copies 10 × 2000:
    for the largest zoo models (≈ 2,300 nodes per sample) the expected cosine is ≈ 0.95+."""
    entry = _skip_if_out("np-cos", arch, "np")
    model, x, y = _float64(entry, n=2)
    # eval mode: BatchNorm with its running statistics, where NP is unbiased for BP's gradient
    # (in training mode a per-sample loss difference cannot see the cross-sample terms through
    # the batch statistics: NP then follows the gradient with those held constant, see the
    # rules.perturbation docstring)
    model.eval()
    twin = copy.deepcopy(model)
    bp = _params_and_grads(entry, "bp", {}, model, x, y, 1)
    np_ = _params_and_grads(entry, "np", {"sigma": 1e-4, "samples": 2000}, twin, x, y, 10)
    names = [n for n, _ in entry.build().named_parameters()]
    missing = [n for n, g in zip(names, np_, strict=True) if g is None]
    assert not missing, f"{arch}: NP left these parameters without an update: {missing}"
    cos = _cosine(bp, np_)
    assert cos > 0.9, f"{arch}: cosine(NP mean update, BP gradient) = {cos:.3f}"
