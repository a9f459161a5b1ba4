"""Zhu & Rosenbaum (2024), "Learning fixed points of recurrent networks by reparameterising the
model" (arXiv 2307.06732; Neural Computation 36(8)): its central experiments as plans.

* ``teacher`` — experiment (a): the linear teacher task (N = 200, m = 100, full-batch plain GD for
  3500 iterations), Euclidean descent vs the exact reparameterised step (``reparam``, dW2) vs its
  linearisation (``linearized``, dW3; ``linearized-g``, dW4, at paper scale), over the paper's
  learning rates η ∈ {0.03, 0.1, 0.3, 1, 3}, three seeds (teacher, data and W₀ all drawn from the
  seed).
* ``mnist`` — experiment (c): 300 tanh units, fixed random input weights and readout, only W
  trained, batch 512, 3 epochs of plain SGD; Euclidean descent vs ``linearized`` over a
  learning-rate sweep, tracking max Re λ(W). (Inputs are standardised here; the authors feed
  [0, 1] pixels, so their η do not carry over one to one.)
* ``landscape`` — experiment (b): the loss along random lines and a plane through an exact
  minimiser of the teacher task, with its poles (where I − W is singular).

Scales: ``quick`` shrinks every size (N = 12 teacher, synthetic 8×8 "MNIST", two seeds) to test
the whole path in seconds; ``cpu`` is the paper's teacher and landscape sizes and full MNIST with
three seeds (66 runs: one to two hours on one core, ``--jobs`` divides it; not run yet, the
per-seed-0 numbers of BENCHMARKS.md §7 come from the same runs); ``paper`` adds ``linearized-g``
and more seeds and learning rates. The paper reports its results as curves (loss on a log scale
per η, max Re λ(W) over training), not as numbers, so the claims' "paper" column says what the
figures show.
"""

from __future__ import annotations

import math
import shutil
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...fixedpoint.config import FixedPointConfig
from ..fixedpoint_sweep import sweep_plan, write_sweep
from ..plan import SEED, Plan, grid
from ..report import (
    Claim,
    Finding,
    Groups,
    Table,
    cell,
    mean_std,
    verdict,
    write_table,
)
from ..runner import Result
from . import Paper

TEACHER, MNIST, LANDSCAPE = "teacher", "mnist", "landscape"

#: A diverged run's final loss, in the log-loss comparisons (it never reached a finite value).
DIVERGED_LOG10_LOSS = 10.0

#: Per scale: the teacher sweep, the MNIST sweep and the landscape.
SCALES: dict[str, dict[str, Any]] = {
    "quick": {
        "seeds": [0, 1],
        TEACHER: {
            "base": {"hidden": 12, "samples": 6, "steps": 150, "diag_every": 50},
            "rules": ["euclidean", "reparam", "linearized"],
            "lrs": [1.0, 3.0],
        },
        MNIST: {
            "base": {
                "dataset": "synthetic",
                "hidden": 16,
                "epochs": 1,
                "train_size": 256,
                "batch_size": 64,
            },
            "rules": ["euclidean", "linearized"],
            "lrs": [1.0],
        },
        LANDSCAPE: {"hidden": 12, "samples": 6, "lines": 2, "line_points": 101, "grid": 9},
    },
    "cpu": {
        "seeds": [0, 1, 2],
        TEACHER: {
            "base": {"steps": 3500},
            "rules": ["euclidean", "reparam", "linearized"],
            "lrs": [0.03, 0.1, 0.3, 1.0, 3.0],
        },
        MNIST: {
            "base": {"epochs": 3},
            "rules": ["euclidean", "linearized"],
            "lrs": [0.1, 0.3, 1.0],
        },
        LANDSCAPE: {},
    },
    "paper": {
        "seeds": [0, 1, 2, 3, 4],
        TEACHER: {
            "base": {"steps": 3500},
            "rules": ["euclidean", "reparam", "linearized", "linearized-g"],
            "lrs": [0.03, 0.1, 0.3, 1.0, 3.0],
        },
        MNIST: {
            "base": {"epochs": 3},
            "rules": ["euclidean", "linearized", "linearized-g"],
            "lrs": [0.1, 0.3, 1.0, 3.0],
        },
        LANDSCAPE: {},
    },
}


def plans(scale: str, out: Path) -> list[Plan]:
    """The teacher sweep, the MNIST sweep and the landscape at ``scale`` (runs under ``out``)."""
    size = SCALES[scale]
    seeds = size["seeds"]
    result = []
    for name, task, text in (
        (TEACHER, "linear-teacher", "linear teacher: loss vs iteration per rule and lr"),
        (MNIST, "mnist", "MNIST: accuracy and max Re λ(W) per rule and lr"),
    ):
        spec = size[name]
        base = FixedPointConfig(task=task, **spec["base"])
        result.append(
            sweep_plan(
                base,
                spec["rules"],
                spec["lrs"],
                out / name,
                seeds=seeds,
                name=name,
                description=text,
            )
        )
    base = FixedPointConfig(task="landscape", **size[LANDSCAPE])
    result.append(
        grid(
            LANDSCAPE,
            base,
            {SEED: seeds},
            out / LANDSCAPE,
            kind="fixedpoint",
            label=lambda point: "landscape",
            description="the loss along random lines and a plane through a minimiser",
        )
    )
    return result


# ----------------------------------------------------------------------------- per-seed numbers


def by_setting(groups: Groups) -> dict[tuple[str, float], dict[Any, dict[str, Any]]]:
    """``{(rule, lr): {seed: summary}}`` of a sweep's finished runs."""
    table: dict[tuple[str, float], dict[Any, dict[str, Any]]] = {}
    for results in groups.values():
        for r in results:
            if r.ok:
                key = (r.run.axes["rule"], float(r.run.axes["lr"]))
                table.setdefault(key, {})[r.run.axes.get(SEED)] = r.summary
    return table


def _steps(results: Sequence[Result]) -> int:
    return max(r.run.config.steps for r in results)


def steps_to_threshold(summary: Mapping[str, Any], never: int) -> float:
    """Iterations to the loss threshold; ``never`` when the run did not reach it."""
    value = summary.get("steps_to_threshold")
    return float(never if value is None else value)


def log_loss(summary: Mapping[str, Any]) -> float:
    """log10 of the final loss (:data:`DIVERGED_LOG10_LOSS` when it diverged)."""
    loss = float(summary.get("final_loss", math.inf))
    if summary.get("diverged") or not math.isfinite(loss):
        return DIVERGED_LOG10_LOSS
    return math.log10(max(loss, 1e-300))


def _paired(a: Mapping[Any, Any], b: Mapping[Any, Any]) -> list[Any]:
    seeds = [s for s in a if s in b]
    if not seeds:
        raise ValueError("no seed finished both settings")
    return seeds


def _spread(values: Sequence[float], digits: int = 0) -> str:
    mean, std, n = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _teacher(groups: Mapping[str, Groups]) -> tuple[dict, list[float], int]:
    table = by_setting(groups[TEACHER])
    if not table:
        raise KeyError(TEACHER)
    lrs = sorted({lr for _, lr in table})
    never = _steps([r for rs in groups[TEACHER].values() for r in rs]) + 1
    return table, lrs, never


def _best_lr(table: dict, rule: str, lrs: Sequence[float], score: Any) -> float:
    """The lr at which ``rule`` has the lowest mean ``score`` over its seeds."""
    options = [lr for lr in lrs if (rule, lr) in table]
    if not options:
        raise KeyError(rule)
    return min(options, key=lambda lr: statistics.fmean(map(score, table[(rule, lr)].values())))


# ----------------------------------------------------------------------------- claims


def judge_largest_lr(groups: Mapping[str, Groups]) -> Finding:
    """Index (in the lr grid) of the largest η reaching the threshold: reparam − euclidean."""
    table, lrs, _ = _teacher(groups)

    def largest(rule: str) -> dict[Any, int]:
        seeds = {s for (r, _), runs in table.items() if r == rule for s in runs}
        out = {}
        for seed in seeds:
            reached = [
                i
                for i, lr in enumerate(lrs)
                if (rule, lr) in table
                and seed in table[(rule, lr)]
                and table[(rule, lr)][seed].get("steps_to_threshold") is not None
            ]
            out[seed] = max(reached, default=-1)
        return out

    rep, euc = largest("reparam"), largest("euclidean")
    seeds = _paired(rep, euc)

    def show(values: dict[Any, int]) -> str:
        shown = [f"{lrs[values[s]]:g}" if values[s] >= 0 else "none" for s in seeds]
        return "(" + ", ".join(shown) + ")"

    ours = f"largest η reaching the threshold, per seed: reparam {show(rep)}, euclidean {show(euc)}"
    return Finding(ours, verdict([rep[s] - euc[s] for s in seeds]))


def judge_fewer_steps(groups: Mapping[str, Groups]) -> Finding:
    """Steps to the threshold at each rule's best η: euclidean − linearized, per seed."""
    table, lrs, never = _teacher(groups)

    def score(summary: Mapping[str, Any]) -> float:
        return steps_to_threshold(summary, never)

    lr_e = _best_lr(table, "euclidean", lrs, score)
    lr_l = _best_lr(table, "linearized", lrs, score)
    e, lin = table[("euclidean", lr_e)], table[("linearized", lr_l)]
    seeds = _paired(e, lin)
    es, ls = [score(e[s]) for s in seeds], [score(lin[s]) for s in seeds]
    ours = (
        f"euclidean {_spread(es)} (η = {lr_e:g}) vs linearized {_spread(ls)} (η = {lr_l:g}) "
        f"iterations ({never} = never reached)"
    )
    return Finding(ours, verdict([a - b for a, b in zip(es, ls, strict=True)]))


def judge_stalls(groups: Mapping[str, Groups]) -> Finding:
    """At the largest η: log10 final loss, euclidean − reparam, per seed."""
    table, lrs, _ = _teacher(groups)
    lr = lrs[-1]
    e, rep = table[("euclidean", lr)], table[("reparam", lr)]
    seeds = _paired(e, rep)
    diffs = [log_loss(e[s]) - log_loss(rep[s]) for s in seeds]
    es, rs = [log_loss(e[s]) for s in seeds], [log_loss(rep[s]) for s in seeds]
    ours = f"at η = {lr:g}: log10 final loss euclidean {_spread(es, 1)} vs reparam {_spread(rs, 1)}"
    return Finding(ours, verdict(diffs))


def _mnist(groups: Mapping[str, Groups]) -> tuple[dict, list[float]]:
    table = by_setting(groups[MNIST])
    if not table:
        raise KeyError(MNIST)
    return table, sorted({lr for _, lr in table})


def judge_eigenvalue(groups: Mapping[str, Groups]) -> Finding:
    """At the smallest η: max Re λ(W) over training, euclidean − linearized, per seed."""
    table, lrs = _mnist(groups)
    lr = lrs[0]
    e, lin = table[("euclidean", lr)], table[("linearized", lr)]
    seeds = _paired(e, lin)
    es = [float(e[s]["max_re_eig_W_max"]) for s in seeds]
    ls = [float(lin[s]["max_re_eig_W_max"]) for s in seeds]
    ours = f"at η = {lr:g}: euclidean {_spread(es, 2)} vs linearized {_spread(ls, 2)}"
    return Finding(ours, verdict([a - b for a, b in zip(es, ls, strict=True)]))


def final_acc(summary: Mapping[str, Any]) -> float:
    """The last evaluated test accuracy (epoch 0's for a run that stopped in its first epoch)."""
    return float(summary.get("final_test_acc", math.nan))


def judge_large_lr_accuracy(groups: Mapping[str, Groups]) -> Finding:
    """At the largest η: final test accuracy, linearized − euclidean, per seed."""
    table, lrs = _mnist(groups)
    lr = lrs[-1]
    e, lin = table[("euclidean", lr)], table[("linearized", lr)]
    seeds = _paired(e, lin)
    es, ls = [final_acc(e[s]) for s in seeds], [final_acc(lin[s]) for s in seeds]
    stopped = sum(1 for s in seeds if e[s].get("diverged"))
    ours = (
        f"at η = {lr:g}: linearized {_spread([100 * v for v in ls], 1)} % vs euclidean "
        f"{_spread([100 * v for v in es], 1)} % (euclidean stopped in {stopped}/{len(seeds)})"
    )
    return Finding(ours, verdict([a - b for a, b in zip(ls, es, strict=True)]))


def judge_best_accuracy(groups: Mapping[str, Groups]) -> Finding:
    """At each rule's best η: final test accuracy, linearized − euclidean, per seed."""
    table, lrs = _mnist(groups)

    def score(summary: Mapping[str, Any]) -> float:
        value = final_acc(summary)
        return -value if math.isfinite(value) else 0.0

    lr_e = _best_lr(table, "euclidean", lrs, score)
    lr_l = _best_lr(table, "linearized", lrs, score)
    e, lin = table[("euclidean", lr_e)], table[("linearized", lr_l)]
    seeds = _paired(e, lin)
    es, ls = [final_acc(e[s]) for s in seeds], [final_acc(lin[s]) for s in seeds]
    ours = (
        f"linearized {_spread([100 * v for v in ls], 1)} % (η = {lr_l:g}) vs euclidean "
        f"{_spread([100 * v for v in es], 1)} % (η = {lr_e:g})"
    )
    return Finding(ours, verdict([a - b for a, b in zip(ls, es, strict=True)]))


def judge_poles(groups: Mapping[str, Groups]) -> Finding:
    """Poles per random line through the minimiser (> 0: the loss has singularities)."""
    results = [r for rs in groups[LANDSCAPE].values() for r in rs if r.ok]
    if not results:
        raise KeyError(LANDSCAPE)
    poles = [float(r.summary["poles_per_line"]) for r in results]
    ratio = [
        math.log10(max(float(r.summary["max_line_loss"]), 1e-300))
        - math.log10(max(float(r.summary["median_line_loss"]), 1e-300))
        for r in results
    ]
    ours = (
        f"{_spread(poles, 2)} poles per line; the largest loss on the lines is "
        f"10^{_spread(ratio, 1)} × their median"
    )
    return Finding(ours, verdict(poles))


CLAIMS = (
    Claim(
        "Teacher task: the reparameterised step tolerates larger learning rates than Euclidean "
        "descent (largest η that reaches the loss threshold)",
        "qualitative (loss curves per η: reparameterised rules converge at η where GD fails)",
        judge_largest_lr,
    ),
    Claim(
        "Teacher task: the linearized rule reaches the loss threshold in fewer iterations than "
        "Euclidean descent, each at its best η",
        "qualitative (faster convergence in the loss curves)",
        judge_fewer_steps,
    ),
    Claim(
        "Teacher task: at the largest η Euclidean descent stalls (or diverges) where the "
        "reparameterised step converges (lower log10 final loss)",
        "qualitative (GD jumps, stalls or oscillates near the loss's poles)",
        judge_stalls,
    ),
    Claim(
        "MNIST: Euclidean descent drives max Re λ(W) higher than the linearized rule",
        "qualitative (Euclidean descent drives it past 1 and collapses)",
        judge_eigenvalue,
    ),
    Claim(
        "MNIST: at the largest η the linearized rule ends more accurate than Euclidean descent "
        "(a run that lost its fixed points keeps its last evaluated accuracy)",
        "qualitative (the reparameterised rules tolerate larger η)",
        judge_large_lr_accuracy,
    ),
    Claim(
        "MNIST: at each rule's best η the linearized rule ends more accurate than Euclidean "
        "descent",
        "qualitative (learns faster and better than Euclidean descent)",
        judge_best_accuracy,
    ),
    Claim(
        "Landscape: random lines through a minimiser cross poles of the loss (I − W singular)",
        "qualitative (loss along lines and planes, with its poles)",
        judge_poles,
    ),
)


# ----------------------------------------------------------------------------- report


def _fraction(values: Sequence[bool]) -> str:
    return f"{sum(values)}/{len(values)}"


def teacher_table(results: Sequence[Result]) -> Table:
    """Per (rule, η), over seeds: log10 final loss, seeds reaching the threshold and the
    iterations they needed, seeds that diverged."""
    threshold = results[0].run.config.loss_threshold
    table = Table(
        [
            "rule",
            "η",
            "log10 final loss",
            f"reached loss < {threshold:g}",
            "iterations to it",
            "diverged",
        ],
        title="Linear teacher task, mean ± std over seeds",
    )
    for (rule, lr), runs in _settings(results).items():
        ok = [r for r in runs if r.ok]
        logs = [log_loss(r.summary) for r in ok if not r.summary.get("diverged")]
        steps = [r.summary["steps_to_threshold"] for r in ok if r.summary.get("steps_to_threshold")]
        diverged = [not r.ok or bool(r.summary.get("diverged")) for r in runs]
        reached = [r.ok and r.summary.get("steps_to_threshold") is not None for r in runs]
        table.rows.append(
            [
                rule,
                f"{lr:g}",
                cell(logs) if logs else "diverged",
                _fraction(reached),
                cell(steps, digits=0) if steps else "—",
                _fraction(diverged),
            ]
        )
        mean, std, n = mean_std(logs)
        table.raw.append(
            {
                "rule": rule,
                "lr": lr,
                "log10_final_loss": mean,
                "log10_final_loss_std": std,
                "log10_final_loss_n": n,
                "reached": sum(reached),
                "iterations": mean_std(steps)[0],
                "iterations_std": mean_std(steps)[1],
                "diverged": sum(diverged),
                "seeds": len(runs),
            }
        )
    return table


def mnist_table(results: Sequence[Result]) -> Table:
    """Per (rule, η), over seeds: best and final test accuracy, max Re λ(W), runs stopped."""
    table = Table(
        [
            "rule",
            "η",
            "best test acc (%)",
            "final test acc (%)",
            "max Re λ(W)",
            "stopped (fixed point lost)",
        ],
        title="MNIST, mean ± std over seeds",
    )
    for (rule, lr), runs in _settings(results).items():
        ok = [r for r in runs if r.ok]
        best = [r.summary.get("best_test_acc") for r in ok]
        final = [final_acc(r.summary) for r in ok]
        eig = [r.summary.get("max_re_eig_W_max") for r in ok]
        stopped = [not r.ok or bool(r.summary.get("diverged")) for r in runs]
        row = [rule, f"{lr:g}", cell(best, 100.0, 1), cell(final, 100.0, 1), cell(eig)]
        table.rows.append([*(c or "—" for c in row), _fraction(stopped)])
        raw: dict[str, Any] = {"rule": rule, "lr": lr}
        for key, values in (("best_test_acc", best), ("final_test_acc", final), ("eig", eig)):
            mean, std, n = mean_std(values)
            raw.update({key: mean, f"{key}_std": std, f"{key}_n": n})
        raw.update(stopped=sum(stopped), seeds=len(runs))
        table.raw.append(raw)
    return table


def landscape_table(results: Sequence[Result]) -> Table:
    table = Table(
        [
            "seed",
            "poles per line",
            "lines with a pole",
            "loss at the minimiser",
            "max loss on lines",
        ],
        title="Loss landscape of the linear teacher task",
    )
    for r in results:
        if not r.ok:
            continue
        s = r.summary
        table.rows.append(
            [
                str(r.run.seed),
                f"{float(s['poles_per_line']):.2f}",
                f"{s['lines_with_a_pole']}/{s['lines']}",
                f"{float(s['loss_at_minimiser']):.2e}",
                f"{float(s['max_line_loss']):.2e}",
            ]
        )
        table.raw.append({"seed": r.run.seed, **s})
    return table


def _settings(results: Sequence[Result]) -> dict[tuple[str, float], list[Result]]:
    out: dict[tuple[str, float], list[Result]] = {}
    for r in results:
        out.setdefault((r.run.axes["rule"], float(r.run.axes["lr"])), []).append(r)
    return out


def report(results: dict[str, list[Result]], out: Path) -> tuple[list[Table], list[Path]]:
    """Per sweep: its per-run sweep files (``<plan>/sweep.*``) and a mean ± std table over seeds
    (``teacher.md``/``mnist.md``); the landscape's table and the first seed's figure."""
    tables: list[Table] = []
    files: list[Path] = []
    for name, summarise in ((TEACHER, teacher_table), (MNIST, mnist_table)):
        if not results.get(name):
            continue
        _, written = write_sweep(results[name], out / name)
        files += written
        table = summarise(results[name])
        files += write_table(table, out / name)
        tables.append(table)
    if results.get(LANDSCAPE):
        table = landscape_table(results[LANDSCAPE])
        files += write_table(table, out / LANDSCAPE)
        tables.append(table)
        first = results[LANDSCAPE][0]
        png = first.run.out / "landscape.png"
        if first.ok and png.exists():
            target = out / "landscape.png"
            shutil.copyfile(png, target)
            files.append(target)
    return tables, files


PAPER = Paper(
    name="zhu2024",
    title="Zhu & Rosenbaum (2024): learning fixed points of recurrent networks by "
    "reparameterising the model",
    plans=plans,
    report=report,
    claims=CLAIMS,
)
