"""Paper 1: decorrelation at every layer (Ahmad 2024, "Correlations Are Ruining Your Gradient
Descent", arXiv 2407.10780; with Dalm et al. 2024, decorrelated backprop, arXiv 2405.02385).

The claims: decorrelating every layer's input makes plain descent a natural gradient, so it
speeds up backprop (in epochs, and in wall-clock despite R's cost), and it rescues approximate
credit assignment — feedback alignment (FA, DFA) and node perturbation — that fails without it.

Three plans, the same group labels at every scale (the claims name them):

- ``mlp`` — the paper's MLP (4 hidden layers of 1000, LeakyReLU 0.01), Adam, batch 256:
  BP / FA / DFA, each plain, with ``scaled`` (the paper's rule) and with ``dbp``; every
  decorrelation method at its own BP-tuned (lr, η) from BENCHMARKS.md §2.2 (plain lr 3e-4;
  scaled 1e-4 / 1e-5; dbp 3e-4 / 1e-4: the validation grid of
  ``benchmarks/results/decor_accuracy_mlp/grid.md``), not re-tuned per rule (§4,
  ``benchmarks/specs/fa_mlp.json``). ``dfa`` is Nøkland's direct feedback alignment, as in §4;
  the paper's own "DFA" variant (FA with f′ := 1, ``--feedback-straight-through``) is not run.
- ``conv`` — the paper's conv net (conv 32, 32, pool, 64, 64, pool, fc 1000; 'same' padding):
  BP at its conv-tuned lr 1e-3 and BP + ``scaled`` at its conv-tuned 3e-4 / 1e-4 (§2.2's conv
  grid), FA and DFA plain and with ``dbp`` at the MLP's rates (§4, ``conv_mnist.json``; §4 found
  ``scaled`` at the MLP's rates hurting FA on this net, so it is left out here).
- ``np`` — node perturbation at the NP authors' protocol (``--config np-authors``: He-normal
  init, pixels/255, 784-1024×3-10, Adam 1e-4, batch 1000, σ 1e-3), plain ``np`` against ``dnp``
  (``copi`` at η 1e-3, their setting; BENCHMARKS.md §5.1).

Scales: ``quick`` — synthetic 8×8 data (10 classes, 512 training examples), two hidden layers
of 32 (conv 4, 4, 8, 8, fc 16), batch 32, two seeds, three epochs, one lr for W (1e-2) and one
for R (1e-3), ≈ 10 s on one idle thread (a smoke test: its verdicts mean nothing). ``cpu`` —
MNIST, 3 seeds; the MLP 4 epochs on the full training set (§2.2's length), the conv net 3 epochs
on the fixed 10 000-image subset (§4), NP 3 epochs: 51 runs, ≈ 40 min with ``--jobs 2`` on the
2-core machine (≈ 80 min with one job; estimated from BENCHMARKS.md's seconds per epoch).
``paper`` — CIFAR-10, the full training set, 100 epochs (NP: 50, the NP authors' README),
Adam β₂ 0.9999 as the paper, 3 seeds; our tuned rates, not the paper's (which it chose by short
grid searches we do not have). CIFAR-100 and Tiny-ImageNet are not part of this reproduction.

Time-to-target claims use the reference group's best seed-mean test accuracy as the target (as
``decorrelate compare`` does) and compare seed s of each group with seed s of the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..plan import Plan
from ..report import Claim, Table
from ..runner import Result
from . import Paper
from .common import beats, faster, grid_reports, groups_plan, np_protocol, rescues

#: (lr, decor_lr) per decorrelation method, tuned for BP on the MLP (BENCHMARKS.md §2.2).
MLP_RATES: dict[str, tuple[float, float | None]] = {
    "none": (3e-4, None),
    "scaled": (1e-4, 1e-5),
    "dbp": (3e-4, 1e-4),
}

SCALE_SETTINGS: dict[str, dict[str, Any]] = {
    "quick": {
        "data": {
            "dataset": "synthetic",
            "synthetic_shape": [1, 8, 8],
            "synthetic_train": 512,
            "synthetic_test": 256,
        },
        "mlp": {"widths": [32, 32], "batch_size": 32, "epochs": 3},
        "conv": {"channels": [4, 4, 8, 8], "widths": [16], "batch_size": 32, "epochs": 3},
        "np": {"widths": [32, 32], "batch_size": 32, "epochs": 3},
        "seeds": [0, 1],
        "alignment_every": 0,  # no angles: seconds saved
        # 48 steps on tiny data: one learning rate for W and one for R, in place of the tuned
        "rates": {"lr": 1e-2, "decor_lr": 1e-3},
    },
    "cpu": {
        "data": {"dataset": "mnist"},
        "mlp": {"widths": [1000] * 4, "batch_size": 256, "epochs": 4},
        "conv": {"batch_size": 256, "epochs": 3, "train_size": 10000},
        "np": {"epochs": 3},
        "seeds": [0, 1, 2],
        "alignment_every": 50,
        "rates": None,
    },
    "paper": {
        "data": {"dataset": "cifar10"},
        "mlp": {"widths": [1000] * 4, "batch_size": 256, "epochs": 100, "betas": [0.9, 0.9999]},
        "conv": {"batch_size": 256, "epochs": 100, "betas": [0.9, 0.9999]},
        "np": {"epochs": 50},
        "seeds": [0, 1, 2],
        "alignment_every": 500,
        "rates": None,
    },
}

TITLES = {
    "mlp": "MLP 4×1000 (LeakyReLU), Adam, BP/FA/DFA × none/scaled/dbp at BP-tuned rates",
    "conv": "the paper's conv net, BP and BP + scaled at conv-tuned rates, FA/DFA ± dbp",
    "np": "node perturbation at the NP authors' protocol, np vs dnp (copi η 1e-3)",
}


Rates = dict[str, float] | None


def _rates(lr: float, decor_lr: float | None, quick: Rates) -> dict[str, Any]:
    """``lr`` and ``decor_lr`` of a group; at the quick scale its one pair instead."""
    if quick:
        return {"lr": quick["lr"], "decor_lr": None if decor_lr is None else quick["decor_lr"]}
    return {"lr": lr, "decor_lr": decor_lr}


def _mlp_groups(quick: Rates, every: int) -> dict[str, dict[str, Any]]:
    groups = {}
    for rule in ("bp", "fa", "dfa"):
        for method, (lr, decor_lr) in MLP_RATES.items():
            label = rule if method == "none" else f"{rule}+{method}"
            angles = {} if rule == "bp" else {"alignment_every": every}
            groups[label] = {"rule": rule, "decor": method, **_rates(lr, decor_lr, quick), **angles}
    return groups


def _conv_groups(quick: Rates, every: int) -> dict[str, dict[str, Any]]:
    angles = {"alignment_every": every}
    plain, dbp = MLP_RATES["none"], MLP_RATES["dbp"]
    return {
        "bp": {"rule": "bp", "decor": "none", **_rates(1e-3, None, quick)},
        "bp+scaled": {"rule": "bp", "decor": "scaled", **_rates(3e-4, 1e-4, quick)},
        "fa": {"rule": "fa", "decor": "none", **_rates(*plain, quick), **angles},
        "fa+dbp": {"rule": "fa", "decor": "dbp", **_rates(*dbp, quick), **angles},
        "dfa": {"rule": "dfa", "decor": "none", **_rates(*plain, quick), **angles},
        "dfa+dbp": {"rule": "dfa", "decor": "dbp", **_rates(*dbp, quick), **angles},
    }


def plans(scale: str, out: Path) -> list[Plan]:
    s = SCALE_SETTINGS[scale]
    quick, every, seeds = s["rates"], s["alignment_every"], s["seeds"]
    base = {"activation": "leaky-relu", "optimizer": "adam", **s["data"]}
    np_base = {**np_protocol(), **s["data"], **s["np"], **({"lr": quick["lr"]} if quick else {})}
    return [
        groups_plan(
            "mlp",
            {**base, "model": "mlp", **s["mlp"]},
            _mlp_groups(quick, every),
            seeds,
            out,
            TITLES["mlp"],
        ),
        groups_plan(
            "conv",
            {**base, "model": "convnet", **s["conv"]},
            _conv_groups(quick, every),
            seeds,
            out,
            TITLES["conv"],
        ),
        groups_plan(
            "np",
            np_base,
            {"np": {"rule": "np"}, "dnp": {"rule": "dnp"}},
            seeds,
            out,
            TITLES["np"],
        ),
    ]


def report(results: dict[str, list[Result]], out: Path) -> tuple[list[Table], list[Path]]:
    return grid_reports(results, out, TITLES)


CLAIMS = [
    Claim(
        "decorrelation speeds up BP: epochs to BP's best (MLP, scaled)",
        "faster convergence than BP (MLP and conv net, CIFAR-10/100, Tiny-ImageNet)",
        faster("mlp", "bp", "bp+scaled", "epochs"),
    ),
    Claim(
        "… and in wall-clock, R's cost included (MLP, scaled)",
        "> 2× faster to the same accuracy (ResNet-18, Dalm et al. 2024)",
        faster("mlp", "bp", "bp+scaled", "seconds"),
    ),
    Claim(
        "decorrelated BP ends above BP (MLP, scaled; best test accuracy)",
        "higher test accuracy than BP (Dalm et al. 2024)",
        beats("mlp", "bp+scaled", "bp"),
    ),
    Claim(
        "decorrelation rescues FA (MLP, scaled)",
        "FA, which fails without it, approaches BP",
        rescues("mlp", "bp", "fa", "fa+scaled"),
    ),
    Claim(
        "decorrelation rescues FA (MLP, dbp)",
        "FA, which fails without it, approaches BP",
        rescues("mlp", "bp", "fa", "fa+dbp"),
    ),
    Claim(
        "decorrelation rescues DFA (MLP, scaled)",
        "DFA approaches BP",
        rescues("mlp", "bp", "dfa", "dfa+scaled"),
    ),
    Claim(
        "decorrelation rescues DFA (MLP, dbp)",
        "DFA approaches BP",
        rescues("mlp", "bp", "dfa", "dfa+dbp"),
    ),
    Claim(
        "decorrelation rescues FA on conv nets (dbp)",
        "FA approaches BP on the conv net",
        rescues("conv", "bp", "fa", "fa+dbp"),
    ),
    Claim(
        "decorrelation rescues DFA on conv nets (dbp)",
        "DFA approaches BP on the conv net",
        rescues("conv", "bp", "dfa", "dfa+dbp"),
    ),
    Claim(
        "decorrelation speeds up BP on conv nets: epochs to BP's best (scaled, each tuned)",
        "faster convergence than BP (conv net)",
        faster("conv", "bp", "bp+scaled", "epochs"),
    ),
    Claim(
        "decorrelation helps node perturbation (dnp vs np, best test accuracy)",
        "NP, which fails without it, becomes competitive",
        beats("np", "dnp", "np"),
    ),
]

PAPER = Paper(
    name="ahmad2024",
    title="Correlations Are Ruining Your Gradient Descent (Ahmad 2024)",
    plans=plans,
    report=report,
    claims=CLAIMS,
)
