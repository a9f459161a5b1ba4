"""Named experiment suites of the Align paper: ``run_suite("align-width", out)`` and friends.

A suite is a JSON file in :mod:`decorrelate.experiments` (``align-*.json``) naming a runner and
its sizes; :func:`run_suite` runs it and writes into ``out``:

* ``results.md`` — markdown tables (mean ± std over seeds), ``results.json`` — every number;
* PNG plots: accuracy vs width per rule and alignment score vs width (``width``), accuracy vs
  training-set size (``lowdata``), Add-task test MSE vs width (``rnn``);
* ``runs/<label>/`` — each run's ``config.json`` and ``metrics.jsonl`` (checkpoints are deleted
  after a run unless ``keep_checkpoints``). A finished run found there is reused, so an
  interrupted suite continues where it stopped.

Runners:

``width``    the training loop of :mod:`decorrelate.train` for every (width, rule, seed). The
             ``bp`` runs use :class:`~decorrelate.rules.probe.AlignmentProbe` (BP updates, plus
             the align-zero prediction of the weight change), so the alignment score per layer
             is logged in the same runs.
``lowdata``  the same loop for every (training-set size, rule, seed) at a fixed number of SGD
             steps. A small training set is cycled (tiled) up to ``epoch_size`` examples per
             epoch, so tiny sets are not evaluated after every single step.
``rnn``      the Add task (:mod:`decorrelate.align.addtask`) for every (width, rule, seed).

Every suite has a ``quick`` section (tiny sizes, synthetic data) used by the smoke test. The
paper's sizes are listed in each file's ``paper`` entry; the default sizes are what a CPU runs
in minutes (see BENCHMARKS.md).

Feedback matrices of ``fa``/``dfa`` in NTK-parameterised nets are drawn N(0, 1) like the
forward weights (``feedback_init=gaussian`` with ``feedback_scale`` = √fan_in, resp.
√classes for DFA): the default scale 1/√fan_in would make the feedback √fan_in times weaker than
the forward weights, and FA would barely train its hidden layers under plain SGD.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt
from ..config import TrainConfig, make_config, save_config
from ..data.dataset import Dataset, DataSplits
from ..errors import TrainingDiverged, UserError
from ..rules.probe import AlignmentProbe
from ..seeding import make_generator
from .addtask import make_add_task, train_add_task
from .plots import plot_sweep

Log = Callable[[str], None] | None
DIVERGED = "diverged.json"


# ----------------------------------------------------------------------------- suite files


#: Where the suite files live (installed as package data of ``decorrelate``).
SUITE_DIR = Path(__file__).resolve().parents[1] / "experiments"


def _suite_files() -> dict[str, Path]:
    return {path.stem: path for path in sorted(SUITE_DIR.glob("align-*.json"))}


def suite_names() -> tuple[str, ...]:
    """The Align suites that :func:`run_suite` knows (file names in ``decorrelate/experiments``)."""
    return tuple(sorted(_suite_files()))


def load_suite(name: str, quick: bool = False) -> dict[str, Any]:
    """The suite's settings; with ``quick``, its ``quick`` section merged over them."""
    files = _suite_files()
    if name not in files:
        raise UserError(f"unknown suite {name!r}; choose one of: {', '.join(suite_names())}")
    spec = json.loads(files[name].read_text())
    quick_part = spec.pop("quick", {})
    if quick:
        for key, value in quick_part.items():
            if isinstance(value, dict) and isinstance(spec.get(key), dict):
                spec[key] = {**spec[key], **value}
            else:
                spec[key] = value
    if spec.get("runner") not in RUNNERS:
        raise UserError(f"suite {name}: unknown runner {spec.get('runner')!r}")
    spec["name"] = name
    return spec


def run_suite(
    name: str,
    out: str | Path,
    quick: bool = False,
    *,
    log: Log = print,
    keep_checkpoints: bool = False,
) -> list[Path]:
    """Run the suite ``name`` into ``out``; return the files written (tables, JSON, PNGs)."""
    import decorrelate.rules.align  # noqa: F401  (registers align-*, last-layer)

    spec = load_suite(name, quick)
    out = ckpt.prepare_out_dir(out)
    if log:
        log(f"suite {name}{' (quick)' if quick else ''}: {spec.get('description', '')}")
    records, tables, plots = RUNNERS[spec["runner"]](spec, out, log, keep_checkpoints)
    text = f"# {name}{' (quick)' if quick else ''}\n\n{spec.get('description', '')}\n\n"
    text += "\n\n".join(tables) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(
        json.dumps({"suite": spec, "runs": records}, indent=1, default=_nan_safe) + "\n"
    )
    if log:
        log(text)
    return [out / "results.md", out / "results.json", *plots]


def _nan_safe(value: Any) -> Any:
    return str(value)


# ----------------------------------------------------------------------------- shared helpers


def _label(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+=_-]+", "_", "-".join(str(p) for p in parts))


def _seeds_for(spec: dict[str, Any], size: int) -> list[int]:
    """All seeds, or only the first above ``single_seed_above`` (to bound the compute)."""
    limit = spec.get("single_seed_above")
    seeds = list(spec["seeds"])
    return seeds[:1] if limit is not None and size > limit else seeds


def _test_subset(splits: DataSplits, size: int | None) -> DataSplits:
    """A fixed random subset of the test set (the same in every run) for faster evaluation."""
    if size is None or size >= len(splits.test):
        return splits
    perm = torch.randperm(len(splits.test), generator=make_generator(0, "align-test-subset"))
    return dataclasses.replace(splits, test=splits.test.subset(perm[:size]))


def ntk_feedback(cfg: dict[str, Any], rule: str, width: int, classes: int) -> dict[str, Any]:
    """Feedback options of fa/dfa in an NTK net: N(0, 1) feedback like the forward weights."""
    if not str(cfg.get("model", "")).endswith("-ntk") or rule not in ("fa", "dfa"):
        return {}
    if rule == "dfa":
        return {"feedback_init": "gaussian", "feedback_scale": math.sqrt(classes)}
    fan_in = 9 * width if cfg["model"].startswith("convnet") else width
    return {"feedback_init": "gaussian", "feedback_scale": math.sqrt(fan_in)}


def _finished(out: Path, cfg: TrainConfig) -> list[dict[str, Any]] | None:
    """The history of a finished identical run in ``out`` ([] if it diverged), else None."""
    try:
        saved = json.loads((out / ckpt.CONFIG).read_text())
    except (OSError, ValueError):
        return None
    want = {k: v for k, v in cfg.to_dict().items() if k != "out"}
    if any(saved.get(k) != v for k, v in want.items()):
        return None
    if (out / DIVERGED).exists():
        return []
    try:
        history = ckpt.read_metrics(out)
    except Exception:  # missing or partial metrics: run again
        return None
    return history if history and history[-1]["epoch"] >= cfg.epochs else None


def train_classifier(
    cfg: TrainConfig,
    data: DataSplits,
    *,
    probe: bool = False,
    keep_checkpoints: bool = False,
) -> list[dict[str, Any]]:
    """One run of the training loop into ``cfg.out`` (reused if finished); [] if it diverged.

    With ``probe`` the rule is :class:`AlignmentProbe` (BP plus the alignment score).
    """
    from ..train import Trainer

    out = Path(cfg.out)
    done = _finished(out, cfg)
    if done is not None:
        return done
    out = ckpt.prepare_out_dir(out)
    for stale in (ckpt.METRICS, DIVERGED):
        (out / stale).unlink(missing_ok=True)
    trainer = Trainer(cfg, data=data, log=None, progress=False)
    if probe:
        trainer.rule = AlignmentProbe()
        trainer.rule.attach(
            trainer.model, trainer.loss, make_generator(cfg.seed, "rule"), example=None
        )
    save_config(cfg, out / ckpt.CONFIG)
    try:
        history = trainer.fit(out).history
    except TrainingDiverged as err:
        (out / DIVERGED).write_text(json.dumps({"error": str(err)}) + "\n")
        history = []
    finally:
        if not keep_checkpoints:
            (out / ckpt.CHECKPOINT).unlink(missing_ok=True)
    return history


def _record(rule: str, x: int, seed: int, history: list[dict[str, Any]]) -> dict[str, Any]:
    if not history:
        return {"rule": rule, "x": x, "seed": seed, "diverged": True, "final_test_acc": math.nan}
    last = history[-1]
    record = {
        "rule": rule,
        "x": x,
        "seed": seed,
        "diverged": False,
        "final_test_acc": last["test_acc"],
        "best_test_acc": max(r["test_acc"] for r in history),
        "final_train_acc": last["train_acc"],
        "train_seconds": last["seconds"],
        "epochs": last["epoch"],
        "steps": sum(r.get("steps", 0) for r in history),
    }
    record.update({k: v for k, v in last.items() if k.startswith("align_score")})
    return record


def _group(records: list[dict[str, Any]], key: str) -> dict[str, dict[int, list[float]]]:
    """``{rule: {x: [value per seed]}}`` in the order rules first appear."""
    out: dict[str, dict[int, list[float]]] = {}
    for r in records:
        out.setdefault(r["rule"], {}).setdefault(r["x"], []).append(r.get(key, math.nan))
    return out


def _cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    finite = [v * scale for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "diverged"
    mean = statistics.fmean(finite)
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    extra = f" ({len(values) - len(finite)} diverged)" if len(finite) < len(values) else ""
    spread = f" ± {std:.{digits}f}" if len(finite) > 1 else ""
    return f"{mean:.{digits}f}{spread}{extra}"


def sweep_table(
    grouped: dict[str, dict[int, list[float]]],
    xname: str,
    *,
    scale: float = 100.0,
    digits: int = 1,
) -> str:
    """Markdown: one row per rule, one column per x, cells mean ± std over seeds."""
    xs = sorted({x for points in grouped.values() for x in points})
    seeds = {x: max(len(points.get(x, [])) for points in grouped.values()) for x in xs}
    head = "| rule | " + " | ".join(f"{xname}={x} (n={seeds[x]})" for x in xs) + " |"
    lines = [head, "|---|" + "---:|" * len(xs)]
    for rule, points in grouped.items():
        cells = [_cell(points[x], scale, digits) if x in points else "" for x in xs]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- width sweeps


def _width_config(spec: dict[str, Any], rule: str, width: int, seed: int, out: Path, classes: int):
    base = dict(spec["base"])
    depth = int(spec.get("depth", 2))
    if spec.get("width_key", "widths") == "channels":
        base["channels"] = [width] * depth
        base.setdefault("widths", [])
    else:
        base["widths"] = [width] * depth
    label = _label(rule, f"w{width}", f"s{seed}")
    return label, make_config(
        base,
        ntk_feedback(base, rule, width, classes),
        {"rule": rule, "seed": seed, "out": str(out / "runs" / label), "threads": 1},
    )


def _run_width(spec: dict[str, Any], out: Path, log: Log, keep: bool):
    from ..train import load_data

    probe_scores = bool(spec.get("alignment", True))
    first = make_config(spec["base"], {"rule": "bp"})
    data = _test_subset(load_data(first), spec.get("test_size"))
    records = []
    plan = [
        (width, rule, seed)
        for width in spec["widths"]
        for rule in spec["rules"]
        for seed in _seeds_for(spec, width)
    ]
    for i, (width, rule, seed) in enumerate(plan, start=1):
        label, cfg = _width_config(spec, rule, width, seed, out, data.num_classes)
        if log:
            log(f"[{i}/{len(plan)}] {label}")
        history = train_classifier(
            cfg, data, probe=probe_scores and rule == "bp", keep_checkpoints=keep
        )
        records.append(_record(rule, width, seed, history))
    what = spec.get("width_name", "width")
    acc = _group(records, "final_test_acc")
    tables = [
        f"Final test accuracy (%) vs {what}, mean ± std over seeds:\n\n" + sweep_table(acc, what)
    ]
    plots = [
        plot_sweep(
            acc,
            out / "acc_vs_width.png",
            xlabel=what,
            ylabel="final test accuracy",
            title=f"{spec['name']}: accuracy vs {what}",
            reference=1.0 / data.num_classes,
            reference_label="chance",
        )
    ]
    scores = [r for r in records if r["rule"] == "bp" and not r["diverged"]]
    if probe_scores and scores:
        layers = [k.split("/", 1)[1] for k in scores[0] if k.startswith("align_score/")]
        series = {}
        for k, layer in enumerate(layers, start=1):  # "layer 1 (2)": 1st trained layer, module 2
            series[f"layer {k} ({layer})"] = _by_x(scores, f"align_score/{layer}")
            series[f"layer {k} ({layer}) shuffled"] = _by_x(scores, f"align_score_shuffled/{layer}")
        tables.append(
            "Alignment score of BP training (ΔWᵀΔW vs the align-zero prediction ΔŴᵀΔŴ driven "
            "by BP's error) per layer, and the shuffled-ΔŴ control, mean ± std over seeds:\n\n"
            + sweep_table(series, what, scale=1.0, digits=3).replace("| rule |", "| layer |")
        )
        plots.append(
            plot_sweep(
                series,
                out / "align_score_vs_width.png",
                xlabel=what,
                ylabel="alignment score",
                title=f"{spec['name']}: alignment score vs {what}",
            )
        )
    return records, tables, plots


def _by_x(records: list[dict[str, Any]], key: str) -> dict[int, list[float]]:
    points: dict[int, list[float]] = {}
    for r in records:
        points.setdefault(r["x"], []).append(r.get(key, math.nan))
    return points


# ----------------------------------------------------------------------------- low-data sweep


def _tiled(splits: DataSplits, rows: int) -> DataSplits:
    """The training set repeated until it has at least ``rows`` examples (one epoch = rows)."""
    train = splits.train
    copies = max(1, math.ceil(rows / len(train)))
    if copies == 1:
        return splits
    tiled = Dataset(
        train.x.repeat(copies, *([1] * (train.x.ndim - 1))),
        train.y.repeat(copies),
        train.num_classes,
        train.name,
    )
    return dataclasses.replace(splits, train=tiled)


def _run_lowdata(spec: dict[str, Any], out: Path, log: Log, keep: bool):
    from ..train import load_data

    records = []
    base = dict(spec["base"])
    width = int(base["widths"][0])
    steps, epoch_size = int(spec["steps"]), int(spec.get("epoch_size", 5000))
    plan = [
        (size, rule, seed)
        for size in spec["train_sizes"]
        for rule in spec["rules"]
        for seed in spec["seeds"]
    ]
    cache: dict[int, DataSplits] = {}
    for i, (size, rule, seed) in enumerate(plan, start=1):
        batch = min(int(base.get("batch_size", 100)), size)
        rows = max(size, epoch_size)
        if size not in cache:
            raw = load_data(make_config(base, {"train_size": size}))
            cache[size] = _tiled(_test_subset(raw, spec.get("test_size")), rows)
        data = cache[size]
        epochs = max(1, math.ceil(steps / data.train.num_batches(batch)))
        label = _label(rule, f"n{size}", f"s{seed}")
        cfg = make_config(
            base,
            ntk_feedback(base, rule, width, data.num_classes),
            {
                "rule": rule,
                "seed": seed,
                "train_size": size,
                "batch_size": batch,
                "epochs": epochs,
                "out": str(out / "runs" / label),
                "threads": 1,
            },
        )
        if log:
            log(f"[{i}/{len(plan)}] {label} ({epochs} epochs of {len(data.train)} examples)")
        records.append(
            _record(rule, size, seed, train_classifier(cfg, data, keep_checkpoints=keep))
        )
    acc = _group(records, "final_test_acc")
    table = (
        f"Final test accuracy (%) vs training-set size ({steps} SGD steps each), mean ± std over "
        "seeds:\n\n" + sweep_table(acc, "n")
    )
    gap = _advantage_table(acc)
    plot = plot_sweep(
        acc,
        out / "acc_vs_train_size.png",
        xlabel="training examples",
        ylabel="final test accuracy",
        title=f"{spec['name']}: accuracy vs training-set size",
        reference=0.1,
        reference_label="chance",
    )
    return records, [table, gap] if gap else [table], [plot]


def _advantage_table(acc: dict[str, dict[int, list[float]]]) -> str:
    """Accuracy of the best align rule minus the best of fa/dfa, per x (percentage points)."""
    aligns = [r for r in acc if r.startswith("align-")]
    baselines = [r for r in acc if r in ("fa", "dfa")]
    if not aligns or not baselines:
        return ""
    xs = sorted({x for points in acc.values() for x in points})

    def best(rules: list[str], x: int) -> float:
        means = [statistics.fmean(v) for r in rules if (v := acc[r].get(x)) and _finite(v)]
        return max(means) if means else math.nan

    cells = [f"{100 * (best(aligns, x) - best(baselines, x)):+.1f}" for x in xs]
    bp = [f"{100 * (best(aligns, x) - best(['bp'], x)):+.1f}" if "bp" in acc else "" for x in xs]
    return (
        "Advantage of the best align rule (percentage points of test accuracy):\n\n"
        + "| vs | "
        + " | ".join(f"n={x}" for x in xs)
        + " |\n|---|"
        + "---:|" * len(xs)
        + "\n| best of fa/dfa | "
        + " | ".join(cells)
        + " |\n| bp | "
        + " | ".join(bp)
        + " |"
    )


def _finite(values: list[float]) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


# ----------------------------------------------------------------------------- RNN sweep


def _run_rnn(spec: dict[str, Any], out: Path, log: Log, keep: bool):
    del keep  # the Add-task runs keep no checkpoints
    task_opts = spec.get("task", {})
    task = make_add_task(**task_opts)
    records = []
    plan = [
        (width, rule, seed)
        for width in spec["widths"]
        for rule in spec["rules"]
        for seed in _seeds_for(spec, width)
    ]
    runs = out / "runs"
    runs.mkdir(exist_ok=True)
    settings = {k: spec[k] for k in ("epochs", "lr", "batch_size")}
    for i, (width, rule, seed) in enumerate(plan, start=1):
        label = _label(rule, f"w{width}", f"s{seed}")
        path = runs / f"{label}.json"
        wanted = {"task": task_opts, **settings}
        saved = json.loads(path.read_text()) if path.exists() else None
        if saved is None or saved.get("settings") != wanted:
            if log:
                log(f"[{i}/{len(plan)}] add task {label}")
            try:
                result = train_add_task(rule, width, task=task, seed=seed, **settings)
            except TrainingDiverged as err:
                result = {"rule": rule, "width": width, "seed": seed, "error": str(err)}
            saved = {"settings": wanted, **result}
            path.write_text(json.dumps(saved, default=_nan_safe) + "\n")
        history = saved.get("history")
        records.append(
            {
                "rule": rule,
                "x": width,
                "seed": seed,
                "diverged": history is None,
                "final_test_mse": history[-1]["test_mse"] if history else math.nan,
                "best_test_mse": min(r["test_mse"] for r in history) if history else math.nan,
                "final_train_mse": history[-1]["train_mse"] if history else math.nan,
                "train_seconds": history[-1]["seconds"] if history else math.nan,
            }
        )
    baseline = float(task.y_test.var(unbiased=False))
    grouped = _group(records, "final_test_mse")
    table = (
        f"Add task: final test MSE per time step vs RNN width ({spec['epochs']} epochs, SGD lr "
        f"{spec['lr']}), mean ± std over seeds; predicting the mean gives {baseline:.4f}:\n\n"
        + sweep_table(grouped, "width", scale=1.0, digits=4)
    )
    plot = plot_sweep(
        grouped,
        out / "rnn_loss_vs_width.png",
        xlabel="hidden units",
        ylabel="test MSE per time step",
        title=f"{spec['name']}: Add task loss vs width",
        logy=True,
        reference=baseline,
        reference_label="predict the mean",
    )
    return records, [table], [plot]


RUNNERS = {"width": _run_width, "lowdata": _run_lowdata, "rnn": _run_rnn}
