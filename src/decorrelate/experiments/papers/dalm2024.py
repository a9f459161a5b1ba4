"""Paper 2: node perturbation (Dalm, van Gerven & Ahmad, "Node perturbation can effectively train
multi-layer networks", arXiv 2310.00965).

The claims: activity-based NP (ANP, the measured change of each layer's activity in place of
the injected noise) and iterative NP (INP, one layer at a time) estimate the gradient better
than classic NP; decorrelating every layer's input (DANP: ``copi`` before every layer) makes
ANP better still and faster; ANP needs only measured differences, so it learns with
*inaccessible* noise (two noisy passes, no clean pass).

One plan per dataset, at the authors' protocol as their TensorFlow code runs it (the shipped
``--config np-authors``; BENCHMARKS.md §5.1, ``benchmarks/specs/np_authors.json``): MLP
784-1024×3-10, LeakyReLU 0.2, He-normal init, pixels/255, Adam lr 1e-4, batch 1000, σ 1e-3,
one noisy pass per step; the ``d*`` rules use ``copi`` at η 1e-3 on the whole batch, no
variance floor. Groups: ``bp`` (the reference of the report), ``np``, ``inp``, ``anp``,
``dnp``, ``dinp``, ``danp`` and ``anp inaccessible``; angles to the BP gradient are logged
once an epoch (``angles_vs_epoch.png``).

Scales: ``quick`` — synthetic 8×8 data, two hidden layers of 32, batch 32, two seeds, three
epochs, Adam lr 1e-2 (≈ 5 s on one idle thread; a smoke test whose verdicts mean nothing). ``cpu`` —
MNIST, 3 seeds, 5 epochs (the authors train 50; BENCHMARKS.md §5.1 ran 20 epochs of three of
these rules): 24 runs, ≈ 35–40 min with ``--jobs 2`` on the 2-core machine (≈ 70 min with one
job; estimated from §3's and §5's seconds per step — INP and DINP need one noisy pass per
layer and dominate). ``paper`` — MNIST (the claims), CIFAR-10 and CIFAR-100 (reported), 50
epochs, 3 seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..plan import Plan
from ..report import Claim, Table
from ..runner import Result
from . import Paper
from .common import beats, faster, grid_reports, groups_plan, learns, np_protocol

GROUPS: dict[str, dict[str, Any]] = {
    "bp": {"rule": "bp"},
    "np": {"rule": "np"},
    "inp": {"rule": "inp"},
    "anp": {"rule": "anp"},
    "dnp": {"rule": "dnp"},
    "dinp": {"rule": "dinp"},
    "danp": {"rule": "danp"},
    "anp inaccessible": {"rule": "anp", "np_inaccessible": True},
}

SCALE_SETTINGS: dict[str, dict[str, Any]] = {
    "quick": {
        "plans": {
            "mlp": {
                "dataset": "synthetic",
                "synthetic_shape": [1, 8, 8],
                "synthetic_train": 512,
                "synthetic_test": 256,
            }
        },
        "net": {"widths": [32, 32], "batch_size": 32, "epochs": 3, "lr": 1e-2},
        "seeds": [0, 1],
        "alignment_every": 0,
    },
    "cpu": {
        "plans": {"mlp": {"dataset": "mnist"}},
        "net": {"epochs": 5},
        "seeds": [0, 1, 2],
        "alignment_every": 60,  # once an epoch: 60 000 / 1000 steps
    },
    "paper": {
        "plans": {
            "mlp": {"dataset": "mnist"},
            "mlp-cifar10": {"dataset": "cifar10"},
            "mlp-cifar100": {"dataset": "cifar100"},
        },
        "net": {"epochs": 50},
        "seeds": [0, 1, 2],
        "alignment_every": 50,  # once an epoch on CIFAR (50 000 / 1000 steps)
    },
}

TITLES = {
    "mlp": "MLP 3×1024 at the NP authors' protocol (MNIST; synthetic at the quick scale)",
    "mlp-cifar10": "the same on CIFAR-10",
    "mlp-cifar100": "the same on CIFAR-100",
}


def plans(scale: str, out: Path) -> list[Plan]:
    s = SCALE_SETTINGS[scale]
    base = {**np_protocol(), **s["net"], "alignment_every": s["alignment_every"]}
    groups = {
        label: {**options, "alignment_every": 0} if options["rule"] == "bp" else options
        for label, options in GROUPS.items()
    }
    return [
        groups_plan(name, {**base, **data}, groups, s["seeds"], out, TITLES[name])
        for name, data in s["plans"].items()
    ]


def report(results: dict[str, list[Result]], out: Path) -> tuple[list[Table], list[Path]]:
    return grid_reports(results, out, TITLES)


CLAIMS = [
    Claim(
        "DANP beats NP (best test accuracy)",
        "DANP is the best NP rule; decorrelation makes NP competitive with BP",
        beats("mlp", "danp", "np"),
    ),
    Claim(
        "DANP beats ANP (decorrelation helps ANP)",
        "DANP above ANP",
        beats("mlp", "danp", "anp"),
    ),
    Claim(
        "ANP beats NP",
        "ANP aligns better with the gradient than NP, and learns better",
        beats("mlp", "anp", "np"),
    ),
    Claim(
        "INP beats NP",
        "the layer-wise estimate (INP) beats classic NP",
        beats("mlp", "inp", "np"),
    ),
    Claim(
        "ANP with inaccessible noise still learns (above chance; vs ANP)",
        "works with two noisy passes and no clean pass; classic NP cannot",
        learns("mlp", "anp inaccessible", chance=0.1, versus="anp"),
    ),
    Claim(
        "decorrelation speeds up NP: epochs to NP's best (dnp)",
        "decorrelation speeds NP up",
        faster("mlp", "np", "dnp", "epochs"),
    ),
    Claim(
        "decorrelation speeds up ANP: epochs to ANP's best (danp)",
        "DANP learns faster than ANP",
        faster("mlp", "anp", "danp", "epochs"),
    ),
]

PAPER = Paper(
    name="dalm2024",
    title="Node perturbation can effectively train multi-layer networks (Dalm et al. 2024)",
    plans=plans,
    report=report,
    claims=CLAIMS,
)
