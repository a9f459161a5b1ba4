"""Boopathy & Fiete 2022 (Align): width sweeps, the low-data sweep and the RNN Add task.

``decorrelate reproduce boopathy2022`` (or one experiment by its old name, e.g.
``decorrelate reproduce align-width``) runs four plans, all through the one training loop:

``align-width``       NTK MLPs (two hidden layers) on MNIST: every rule × width × seed.
``align-width-conv``  NTK conv nets (batch norm without affine parameters) on Fashion-MNIST,
                      swept over the number of channels.
``align-lowdata``     a width-512 NTK MLP trained on nested subsets of MNIST for a fixed number
                      of SGD steps (batch min(100, n)); a small training set is repeated up to
                      ``epoch_size`` rows per epoch, so it is not evaluated after every step.
``align-rnn``         the recurrent Add task (``--dataset add-task``, :mod:`..data.addtask`)
                      on an NTK ReLU RNN (``--model rnn-ntk``, ``--loss mse``).

The sizes are data: the suite files ``decorrelate/experiments/align-*.json`` hold each plan's
base config and axes for the ``cpu`` scale (what a CPU runs in minutes), a ``quick`` section
(synthetic data, tiny sizes) and a ``paper`` section (the paper's sizes), each merged over the
defaults. The ``bp`` runs of the width sweeps log the alignment score per layer
(``alignment_score: true``), so it costs no extra runs; its shuffled-ΔŴ control is chance level.

Feedback of ``fa``/``dfa`` in the NTK nets is drawn N(0, 1) like the forward weights
(``feedback_init=gaussian`` with ``feedback_scale`` √fan_in, or √classes for DFA): the default
1/√fan_in would make the feedback √fan_in times weaker than the forward weights, and FA would
barely train its hidden layers under plain SGD. These are the per-point options of this paper's
plans (:func:`rule_options`), not knowledge of the generic code.

The report: accuracy vs width per rule, the alignment score vs width per layer (with the
control), accuracy vs training-set size with the advantage of the align rules, and the Add task's
test MSE vs width — markdown + CSV tables and PNG plots per experiment — then the claims table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...plotting import plot_sweep
from ..plan import Plan, grid
from ..report import (
    Claim,
    Finding,
    Groups,
    Table,
    cell,
    mean_std,
    pivot_table,
    series,
    verdict,
    write_table,
)
from ..runner import Result
from . import Paper

#: Where the suite files live (package data of ``decorrelate``).
SUITE_DIR = Path(__file__).resolve().parents[1]
#: The plans of this paper, by the names the suites had (also accepted by ``reproduce``).
EXPERIMENTS = ("align-width", "align-width-conv", "align-lowdata", "align-rnn")
#: All classifier data sets here (MNIST, Fashion-MNIST, the synthetic default) have 10 classes.
CLASSES = 10
#: The learning rules the advantage table compares: the paper's rules and its FA baselines.
ALIGN_RULES = ("align-zero", "align-ada", "align-prop")
FA_RULES = ("fa", "dfa")


# ----------------------------------------------------------------------------- suite files


def load_suite(name: str, scale: str = "cpu") -> dict[str, Any]:
    """The settings of experiment ``name`` at ``scale``: the file's defaults (``cpu``), with its
    ``quick`` or ``paper`` section merged over them (a ``base`` section key by key)."""
    path = SUITE_DIR / f"{name}.json"
    if name not in EXPERIMENTS or not path.is_file():
        raise UserError(
            f"unknown Align experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}"
        )
    spec = json.loads(path.read_text())
    sections = {key: spec.pop(key, {}) for key in ("quick", "paper")}
    for key, value in sections.get(scale, {}).items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    spec["name"] = name
    return spec


def seeds_for(spec: Mapping[str, Any], size: int) -> list[int]:
    """All seeds, or only the first above ``single_seed_above`` (to bound the compute)."""
    limit = spec.get("single_seed_above")
    seeds = list(spec["seeds"])
    return seeds[:1] if limit is not None and size > limit else seeds


def rule_options(base: Mapping[str, Any], rule: str, width: int) -> dict[str, Any]:
    """Per-rule options of this paper's NTK nets: N(0, 1) feedback for fa/dfa (module docstring);
    ``width`` is the hidden width (MLP) or the channels (conv: fan-in 9·width)."""
    if not str(base.get("model", "")).endswith("-ntk") or rule not in FA_RULES:
        return {}
    if rule == "dfa":
        return {"feedback_init": "gaussian", "feedback_scale": math.sqrt(CLASSES)}
    fan_in = 9 * width if str(base["model"]).startswith("convnet") else width
    return {"feedback_init": "gaussian", "feedback_scale": math.sqrt(fan_in)}


# ----------------------------------------------------------------------------- plans


def _sweep(
    spec: Mapping[str, Any],
    out: Path,
    axis: str,
    sizes: Sequence[int],
    options: Callable[[dict[str, Any]], dict[str, Any]],
) -> Plan:
    """Every (size, rule, seed) of ``spec`` — sizes slowest, seeds per :func:`seeds_for`."""
    plan = Plan(spec["name"], axes=[axis, "rule", "seed"], description=spec.get("description", ""))
    for size in sizes:
        axes = {axis: [size], "rule": list(spec["rules"]), "seed": seeds_for(spec, size)}
        plan = plan + grid(spec["name"], spec["base"], axes, out / "runs", options=options)
    return plan.check()


def width_axis(spec: Mapping[str, Any]) -> str:
    return str(spec.get("width_name", "width"))


def width_plan(spec: Mapping[str, Any], out: Path) -> Plan:
    """A width sweep (MLP widths, or conv channels with ``width_key: channels``)."""
    axis, depth = width_axis(spec), int(spec.get("depth", 2))
    key = "channels" if spec.get("width_key") == "channels" else "widths"
    score = bool(spec.get("alignment", True))

    def options(point: dict[str, Any]) -> dict[str, Any]:
        rule, width = point["rule"], point[axis]
        changes = {key: [width] * depth, "rule": rule, "seed": point["seed"], "threads": 1}
        if score and rule == "bp":
            changes["alignment_score"] = True
        return {**rule_options(spec["base"], rule, width), **changes}

    return _sweep(spec, out, axis, spec["widths"], options)


def lowdata_plan(spec: Mapping[str, Any], out: Path) -> Plan:
    """Accuracy vs training-set size at a fixed number of SGD steps."""
    base = spec["base"]
    width = int(base["widths"][0])
    steps, epoch_size = int(spec["steps"]), int(spec.get("epoch_size", 5000))

    def options(point: dict[str, Any]) -> dict[str, Any]:
        size, rule = point["train_size"], point["rule"]
        batch = min(int(base.get("batch_size", 100)), size)
        rows = size * max(1, math.ceil(epoch_size / size))  # the tiled training set
        return {
            **rule_options(base, rule, width),
            "rule": rule,
            "seed": point["seed"],
            "train_size": size,
            "epoch_size": epoch_size,
            "batch_size": batch,
            "epochs": max(1, math.ceil(steps / math.ceil(rows / batch))),
            "threads": 1,
        }

    return _sweep(spec, out, "train_size", spec["train_sizes"], options)


def rnn_plan(spec: Mapping[str, Any], out: Path) -> Plan:
    """The Add task vs RNN width (one hidden layer)."""

    def options(point: dict[str, Any]) -> dict[str, Any]:
        rule, seed = point["rule"], point["seed"]
        return {"widths": [point["width"]], "rule": rule, "seed": seed, "threads": 1}

    return _sweep(spec, out, "width", spec["widths"], options)


PLANNERS: dict[str, Callable[[Mapping[str, Any], Path], Plan]] = {
    "width": width_plan,
    "lowdata": lowdata_plan,
    "rnn": rnn_plan,
}


def plan_for(name: str, scale: str, out: Path) -> Plan:
    """Experiment ``name``'s plan at ``scale`` with its runs under ``out/<name>/runs``."""
    spec = load_suite(name, scale)
    if "test_size" in spec:  # a data option of every run
        spec["base"] = {**spec["base"], "test_size": spec["test_size"]}
    return PLANNERS[spec["sweep"]](spec, Path(out) / name)


def plans(scale: str, out: Path) -> list[Plan]:
    return [plan_for(name, scale, out) for name in EXPERIMENTS]


# ----------------------------------------------------------------------------- report


def _ok(results: Sequence[Result]) -> list[Result]:
    return [r for r in results if r.ok]


def score_layers(results: Sequence[Result]) -> list[str]:
    """The layers the bp runs scored, in their order (``align_score/<layer>`` keys)."""
    for r in _ok(results):
        keys = [k.split("/", 1)[1] for k in r.summary if k.startswith("align_score/")]
        if keys:
            return keys
    return []


def score_series(results: Sequence[Result], axis: str) -> dict[str, dict[Any, list[float]]]:
    """``{"layer k (name)": {width: [score per seed]}, "... shuffled": ...}`` of the bp runs."""
    bp = [r for r in results if r.run.axes.get("rule") == "bp"]
    out: dict[str, dict[Any, list[float]]] = {}
    for k, layer in enumerate(score_layers(bp), start=1):  # "layer 1 (2)": 1st layer, module 2
        for suffix, key in (("", "align_score/"), (" shuffled", "align_score_shuffled/")):
            line = out.setdefault(f"layer {k} ({layer}){suffix}", {})
            for r in bp:
                value = r.summary.get(key + layer, math.nan) if r.ok else math.nan
                line.setdefault(r.run.axes[axis], []).append(value)
    return out


def series_table(
    lines: Mapping[str, Mapping[Any, Sequence[float]]],
    first: str,
    axis: str,
    *,
    scale: float = 1.0,
    digits: int = 3,
    title: str = "",
) -> Table:
    """A pivot of ready series: one row per line, one column per x, mean ± sample std."""
    xs = sorted({x for line in lines.values() for x in line})
    n = {x: max(len(line.get(x, [])) for line in lines.values()) for x in xs}
    table = Table([first, *(f"{axis}={x} (n={n[x]})" for x in xs)], title=title)
    for label, line in lines.items():
        table.rows.append([label, *(cell(line[x], scale, digits) if x in line else "" for x in xs)])
        raw: dict[str, Any] = {first: label}
        for x in xs:
            mean, std, count = mean_std(line.get(x, []))
            raw.update({f"{axis}={x}": mean, f"{axis}={x}_std": std, f"{axis}={x}_n": count})
        table.raw.append(raw)
    return table


def _means(results: Sequence[Result], axis: str, key: str) -> dict[str, dict[Any, float]]:
    return {
        rule: {x: mean_std(values)[0] for x, values in points.items()}
        for rule, points in series(results, "rule", axis, key).items()
    }


def advantage_table(results: Sequence[Result], axis: str = "train_size") -> Table | None:
    """Accuracy of the best align rule minus the best of fa/dfa (and minus bp), per size, in
    percentage points (best: the highest mean over seeds at that size)."""
    means = _means(results, axis, "final_test_acc")
    aligns = [r for r in means if r in ALIGN_RULES]
    baselines = [r for r in means if r in FA_RULES]
    if not aligns or not baselines:
        return None
    xs = sorted({x for points in means.values() for x in points})

    def best(rules: Sequence[str], x: Any) -> float:
        values = [means[r][x] for r in rules if math.isfinite(means[r].get(x, math.nan))]
        return max(values) if values else math.nan

    table = Table(
        ["vs", *(f"n={x}" for x in xs)],
        title="Advantage of the best align rule (percentage points of test accuracy):",
    )
    against = {"best of fa/dfa": baselines, **({"bp": ["bp"]} if "bp" in means else {})}
    for label, rules in against.items():
        diffs = [100 * (best(aligns, x) - best(rules, x)) for x in xs]
        table.rows.append([label, *(f"{d:+.1f}" for d in diffs)])
        table.raw.append({"vs": label, **{f"n={x}": d for x, d in zip(xs, diffs, strict=True)}})
    return table


def add_task_baseline(results: Sequence[Result]) -> float:
    """The test MSE of predicting the mean target: the variance of the Add task's test targets."""
    from ...train import load_data

    if not results:
        return math.nan
    y = load_data(results[0].run.config).test.y
    return float(y.var(unbiased=False))


def _width_report(name: str, results: list[Result], out: Path) -> tuple[list[Table], list[Path]]:
    spec = load_suite(name)
    axis = width_axis(spec)
    acc = pivot_table(
        results,
        "rule",
        axis,
        "final_test_acc",
        scale=100.0,
        digits=1,
        title=f"{name}: final test accuracy (%) vs {axis}, mean ± std over seeds:",
    )
    tables, files = [acc], write_table(acc, out / "accuracy")
    files.append(
        plot_sweep(
            series(results, "rule", axis, "final_test_acc"),
            out / "acc_vs_width.png",
            xlabel=axis,
            ylabel="final test accuracy",
            title=f"{name}: accuracy vs {axis}",
            reference=1.0 / CLASSES,
            reference_label="chance",
        )
    )
    scores = score_series(results, axis)
    if scores:
        table = series_table(
            scores,
            "layer",
            axis,
            title=f"{name}: alignment score of BP training (ΔWᵀΔW vs the align-zero prediction "
            "ΔŴᵀΔŴ driven by BP's error) per layer, and the shuffled-ΔŴ control, mean ± std "
            "over seeds:",
        )
        tables.append(table)
        files += write_table(table, out / "alignment_score")
        files.append(
            plot_sweep(
                scores,
                out / "align_score_vs_width.png",
                xlabel=axis,
                ylabel="alignment score",
                title=f"{name}: alignment score vs {axis}",
            )
        )
    return tables, files


def _lowdata_report(name: str, results: list[Result], out: Path) -> tuple[list[Table], list[Path]]:
    steps = sorted({sum(row.get("steps", 0) for row in r.history) for r in _ok(results)})
    each = f"{steps[0]}–{steps[-1]} SGD steps" if steps else "no finished run"
    each = each.replace(f"{steps[0]}–", "", 1) if len(steps) == 1 else each
    acc = pivot_table(
        results,
        "rule",
        "train_size",
        "final_test_acc",
        scale=100.0,
        digits=1,
        title=f"{name}: final test accuracy (%) vs training-set size ({each}), mean ± std over "
        "seeds:",
    )
    tables, files = [acc], write_table(acc, out / "accuracy")
    gap = advantage_table(results)
    if gap is not None:
        tables.append(gap)
        files += write_table(gap, out / "advantage")
    files.append(
        plot_sweep(
            series(results, "rule", "train_size", "final_test_acc"),
            out / "acc_vs_train_size.png",
            xlabel="training examples",
            ylabel="final test accuracy",
            title=f"{name}: accuracy vs training-set size",
            reference=1.0 / CLASSES,
            reference_label="chance",
        )
    )
    return tables, files


def _rnn_report(name: str, results: list[Result], out: Path) -> tuple[list[Table], list[Path]]:
    baseline = add_task_baseline(results)
    # The loss is 0.5·(output − target)² per time step: the MSE is twice the test loss.
    lines = {
        rule: {x: [2.0 * v for v in values] for x, values in points.items()}
        for rule, points in series(results, "rule", "width", "final_test_loss").items()
    }
    mse = series_table(
        lines,
        "rule",
        "width",
        digits=4,
        title=f"{name}: Add task, final test MSE per time step vs RNN width, mean ± std over "
        f"seeds; predicting the mean gives {baseline:.4f}:",
    )
    plot = plot_sweep(
        lines,
        out / "rnn_loss_vs_width.png",
        xlabel="hidden units",
        ylabel="test MSE per time step",
        title=f"{name}: Add task loss vs width",
        logy=True,
        reference=baseline,
        reference_label="predict the mean",
    )
    return [mse], [*write_table(mse, out / "test_mse"), plot]


REPORTS = {"width": _width_report, "lowdata": _lowdata_report, "rnn": _rnn_report}


def report(results: dict[str, list[Result]], out: Path) -> tuple[list[Table], list[Path]]:
    """Tables and plots of every experiment that ran, into ``out/<experiment>/``."""
    tables: list[Table] = []
    files: list[Path] = []
    for name in EXPERIMENTS:
        if name not in results:
            continue
        sweep = load_suite(name)["sweep"]
        t, f = REPORTS[sweep](name, results[name], Path(out) / name)
        tables += t
        files += f
    return tables, files


# ----------------------------------------------------------------------------- claims


def _flat(groups: Groups) -> list[Result]:
    return [r for results in groups.values() for r in results]


def _by_seed(results: Sequence[Result], axis: str, rule: str, key: str) -> dict[Any, dict]:
    """``{x: {seed: summary[key]}}`` of one rule's finished runs."""
    out: dict[Any, dict] = {}
    for r in _ok(results):
        if r.run.axes.get("rule") == rule and key in r.summary:
            out.setdefault(r.run.axes[axis], {})[r.run.seed] = float(r.summary[key])
    return out


def _span(results: Sequence[Result], axis: str) -> tuple[Any, Any]:
    """The smallest x and the largest x that has the most seeds (every seed, if any has)."""
    seeds: dict[Any, set] = {}
    for r in results:
        seeds.setdefault(r.run.axes[axis], set()).add(r.run.seed)
    xs = sorted(seeds)
    if len(xs) < 2:
        raise ValueError(f"the sweep has fewer than two values of {axis}")
    most = max(len(s) for s in seeds.values())
    return xs[0], max(x for x in xs if len(seeds[x]) == most)


def gap_shrinks(
    plan: str,
    axis: str,
    rule: str,
    key: str,
    *,
    reference: str = "bp",
    lower_is_better: bool = False,
    scale: float = 100.0,
    digits: int = 1,
    unit: str = "points",
) -> Callable[[Mapping[str, Groups]], Finding]:
    """Judge "``rule``'s gap to ``reference`` shrinks with ``axis``": per seed, the gap at the
    smallest size minus the gap at the largest (the gap: reference − rule, or rule − reference
    when lower is better)."""

    def judge(groups: Mapping[str, Groups]) -> Finding:
        results = _flat(groups[plan])
        small, large = _span(results, axis)
        ref, own = _by_seed(results, axis, reference, key), _by_seed(results, axis, rule, key)
        sign = -1.0 if lower_is_better else 1.0

        def gaps(x: Any) -> dict[Any, float]:
            return {
                s: sign * (ref[x][s] - own[x][s]) for s in ref.get(x, {}) if s in own.get(x, {})
            }

        at_small, at_large = gaps(small), gaps(large)
        diffs = [at_small[s] - at_large[s] for s in at_small if s in at_large]
        if not diffs:
            raise ValueError(
                f"no seed of {rule} and {reference} at both {axis} {small} and {large}"
            )
        ours = (
            f"gap to {reference} {cell(list(at_small.values()), scale, digits)} {unit} at "
            f"{axis} {small} → {cell(list(at_large.values()), scale, digits)} at {large}"
        )
        return Finding(ours, verdict(diffs))

    return judge


def _advantage(
    results: Sequence[Result],
    axis: str,
    key: str,
    rules: Sequence[str],
    baselines: Sequence[str],
    x: Any,
) -> tuple[str, str, dict[Any, float]]:
    """At ``x``: the best of ``rules`` and of ``baselines`` (highest mean) and, per seed, the
    first's value minus the second's."""

    def best(names: Sequence[str]) -> tuple[str, dict[Any, float]]:
        found = {n: _by_seed(results, axis, n, key).get(x, {}) for n in names}
        found = {n: v for n, v in found.items() if v}
        if not found:
            raise ValueError(f"none of {', '.join(names)} finished at {axis} {x}")
        name = max(found, key=lambda n: mean_std(found[n].values())[0])
        return name, found[name]

    (a, own), (b, ref) = best(rules), best(baselines)
    return a, b, {s: own[s] - ref[s] for s in own if s in ref}


def beats_at_smallest(
    plan: str, axis: str, key: str, rules: Sequence[str], baselines: Sequence[str]
) -> Callable[[Mapping[str, Groups]], Finding]:
    """Judge "the best of ``rules`` beats the best of ``baselines`` at the smallest size": per
    seed, the difference of the two rules with the highest means there."""

    def judge(groups: Mapping[str, Groups]) -> Finding:
        results = _flat(groups[plan])
        small, _ = _span(results, axis)
        a, b, diffs = _advantage(results, axis, key, rules, baselines, small)
        ours = f"{a} − {b} at {axis} {small}: {cell(list(diffs.values()), 100.0, 1)} points"
        return Finding(ours, verdict(list(diffs.values())))

    return judge


def advantage_shrinks(
    plan: str, axis: str, key: str, rules: Sequence[str], baselines: Sequence[str]
) -> Callable[[Mapping[str, Groups]], Finding]:
    """Judge "the advantage of ``rules`` over ``baselines`` is largest at the smallest size":
    per seed, the advantage at the smallest size minus that at the largest."""

    def judge(groups: Mapping[str, Groups]) -> Finding:
        results = _flat(groups[plan])
        small, large = _span(results, axis)
        _, _, lo = _advantage(results, axis, key, rules, baselines, small)
        _, _, hi = _advantage(results, axis, key, rules, baselines, large)
        diffs = [lo[s] - hi[s] for s in lo if s in hi]
        ours = (
            f"best align − best fa/dfa: {cell(list(lo.values()), 100.0, 1)} points at {axis} "
            f"{small}, {cell(list(hi.values()), 100.0, 1)} at {large}"
        )
        return Finding(ours, verdict(diffs))

    return judge


def score_rises(plan: str, axis: str) -> Callable[[Mapping[str, Groups]], Finding]:
    """Judge "the alignment score of BP training rises with width": per seed, the mean over
    layers of the score at the largest size minus that at the smallest."""

    def judge(groups: Mapping[str, Groups]) -> Finding:
        results = [r for r in _flat(groups[plan]) if r.run.axes.get("rule") == "bp"]
        small, large = _span(results, axis)
        layers = score_layers(results)
        if not layers:
            raise ValueError("the bp runs logged no alignment score")

        def mean_score(x: Any) -> dict[Any, float]:
            return {
                r.run.seed: mean_std(r.summary.get(f"align_score/{n}") for n in layers)[0]
                for r in _ok(results)
                if r.run.axes[axis] == x
            }

        lo, hi = mean_score(small), mean_score(large)
        diffs = [hi[s] - lo[s] for s in hi if s in lo]
        if not diffs:
            raise ValueError(f"no bp seed at both {axis} {small} and {large}")
        ours = (
            f"mean over {len(layers)} layers {cell(list(lo.values()), 1.0, 3)} at {axis} {small} "
            f"→ {cell(list(hi.values()), 1.0, 3)} at {large}"
        )
        return Finding(ours, verdict(diffs))

    return judge


QUALITATIVE = "qualitative (no number given)"

CLAIMS = (
    Claim(
        "Align-ada matches BP in wide MLPs: its accuracy gap to BP shrinks with width",
        f"{QUALITATIVE}; width sweep, MLP",
        gap_shrinks("align-width", "width", "align-ada", "final_test_acc"),
    ),
    Claim(
        "Align-ada matches BP in wide conv nets: its gap to BP shrinks with the channels",
        f"{QUALITATIVE}; conv width sweep 8…512 channels",
        gap_shrinks("align-width-conv", "channels", "align-ada", "final_test_acc"),
    ),
    Claim(
        "The alignment score of BP training rises (towards 1) with width",
        f"{QUALITATIVE}; alignment score vs width",
        score_rises("align-width", "width"),
    ),
    Claim(
        "Align rules beat FA/DFA in the low-data regime (the smallest training set)",
        f"{QUALITATIVE}; low-data sweep, 45…45 000 examples",
        beats_at_smallest("align-lowdata", "train_size", "final_test_acc", ALIGN_RULES, FA_RULES),
    ),
    Claim(
        "The align rules' advantage over FA/DFA is largest with the least data",
        f'{QUALITATIVE}; low-data sweep ("especially with little data")',
        advantage_shrinks("align-lowdata", "train_size", "final_test_acc", ALIGN_RULES, FA_RULES),
    ),
    Claim(
        "Align-ada on the RNN Add task matches BPTT at large width: its MSE gap shrinks with width",
        f"{QUALITATIVE}; Add task, 8…4096 hidden units",
        gap_shrinks(
            "align-rnn",
            "width",
            "align-ada",
            "final_test_loss",
            lower_is_better=True,
            scale=2.0,
            digits=4,
            unit="MSE",
        ),
    ),
)


PAPER = Paper(
    name="boopathy2022",
    title="Boopathy & Fiete 2022: how to train your wide neural network without backprop (Align)",
    plans=plans,
    report=report,
    claims=CLAIMS,
)
