"""Learning-rate sweeps: every rule at every learning rate, drawn side by side like the paper.

Runs go sequentially into ``OUT/<rule>-lr<lr>/`` (each with its own ``config.json``,
``metrics.jsonl`` and ``summary.json``). A run that diverges is a *result* — its final loss is
``inf`` and the table says "diverged at step k" — not an error. The sweep writes ``sweep.json``
(every run's summary), ``sweep.md`` (a markdown table) and ``sweep.png``: one column per learning
rate, the training loss of every rule on a log scale on top and max Re λ(W) (the stability
diagnostic; the dashed line is 1) below.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from ..errors import UserError
from ..plotting import _pyplot
from .config import FixedPointConfig
from .rules import FIXEDPOINT_RULES
from .tasks import RunOutcome, json_safe, run_task

Log = Callable[[str], None]

LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))


@dataclass
class SweepResult:
    """The outcomes of a sweep, its markdown table and the files written."""

    outcomes: list[RunOutcome]
    table: str
    files: list[Path] = field(default_factory=list)


def applicable_rules(rules: Sequence[str], activation: str) -> list[str]:
    """Expand ``all`` and check each rule fits the network (``reparam`` needs a linear one)."""
    names: list[str] = []
    for name in rules:
        if name == "all":
            names += [r for r in FIXEDPOINT_RULES if r != "reparam" or activation == "identity"]
        elif name not in FIXEDPOINT_RULES:
            raise UserError(
                f"rule {name!r} does not train a fixed-point network; choose from: "
                f"{', '.join(FIXEDPOINT_RULES)} or all"
            )
        elif name == "reparam" and activation != "identity":
            raise UserError(
                f"rule 'reparam' needs a linear network (activation identity), not {activation}"
            )
        else:
            names.append(name)
    return list(dict.fromkeys(names))


def run_dir_name(rule: str, lr: float) -> str:
    return f"{rule}-lr{lr:g}"


def run_sweep(
    base: FixedPointConfig,
    rules: Sequence[str],
    lrs: Sequence[float],
    out: str | Path,
    log: Log | None = print,
    reuse: bool = True,
) -> SweepResult:
    """Train every (rule, lr) of the grid on ``base.task``; write the summary files and plot.

    With ``reuse`` a finished run already in its directory with the same resolved config is
    read back instead of trained again, so an interrupted or extended sweep only runs what is
    missing.
    """
    base = base.resolved()
    assert base.activation is not None
    names = applicable_rules(rules, base.activation)
    if not lrs:
        raise UserError("a sweep needs at least one learning rate")
    if "reparam" in names and (base.optimizer != "sgd" or base.momentum):
        raise UserError(
            "rule 'reparam' is exact only under plain SGD; use --optimizer sgd --momentum 0 "
            "or leave reparam out of the sweep"
        )
    root = ckpt.prepare_out_dir(out)
    outcomes = []
    for rule in names:
        for lr in lrs:
            cfg = replace(base, rule=rule, lr=float(lr))
            run_dir = root / run_dir_name(rule, lr)
            outcome = _finished_run(run_dir, cfg) if reuse else None
            if outcome is None:
                outcome = run_task(cfg, run_dir)
            outcomes.append(outcome)
            if log is not None:
                log(describe(outcome))
                warning = stability_warning(outcome)
                if warning:
                    log(warning)
    table = sweep_table(outcomes, base.task, base.loss_threshold)
    files = [root / "sweep.json", root / "sweep.md", root / "sweep.png"]
    summaries = [json_safe(o.summary) for o in outcomes]
    ckpt.atomic_write_bytes(
        files[0], lambda f: f.write((json.dumps(summaries, indent=2) + "\n").encode())
    )
    ckpt.atomic_write_bytes(files[1], lambda f: f.write((table + "\n").encode()))
    plot_sweep(outcomes, files[2], title=f"{base.task}: loss per rule and learning rate")
    return SweepResult(outcomes, table, files)


def load_outcome(run_dir: str | Path) -> RunOutcome:
    """A finished run read back from its directory (config, metrics rows and summary)."""
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / ckpt.CONFIG).read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{run_dir} is not a finished fixed-point run ({err})") from None
    outcome = RunOutcome(
        config=FixedPointConfig.from_dict(config),
        rows=ckpt.read_metrics(run_dir),
        diverged=summary.get("diverged"),
        diverged_at=summary.get("diverged_at"),
        steps=summary.get("steps", 0),
        seconds=summary.get("seconds", 0.0),
        summary=summary,
    )
    return outcome


def _finished_run(run_dir: Path, cfg: FixedPointConfig) -> RunOutcome | None:
    """The run in ``run_dir`` if it finished with exactly the config ``cfg`` (else None)."""
    if not (run_dir / "summary.json").is_file():
        return None
    try:
        saved = json.loads((run_dir / ckpt.CONFIG).read_text())
        saved = json_safe(FixedPointConfig.from_dict(saved).to_dict())  # earlier layouts too
    except (OSError, json.JSONDecodeError, UserError):
        return None
    if saved != json_safe(cfg.resolved().to_dict()):
        return None
    return load_outcome(run_dir)


def load_sweep(root: str | Path) -> list[RunOutcome]:
    """Every run of a sweep directory, in the order of ``sweep.json``."""
    root = Path(root)
    try:
        entries = json.loads((root / "sweep.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{root} holds no readable sweep.json ({err})") from None
    outcomes = []
    for entry in entries:
        outcome = load_outcome(root / run_dir_name(entry["rule"], float(entry["lr"])))
        outcome.diverged = outcome.diverged or entry.get("diverged")
        outcomes.append(outcome)
    return outcomes


def stability_warning(outcome: RunOutcome) -> str | None:
    """One warning line if a run that did not diverge ends with an unstable W (else None).

    The solver can return a fixed point that the dynamics never reach (a linear network's
    r = (I − W)⁻¹X exists whenever I − W is invertible), so a finite loss does not show this.
    """
    s = outcome.summary
    if outcome.diverged or not s.get("final_unstable"):
        return None
    head = f"warning: rule {s['rule']}, lr {s['lr']:g}: the final W is unstable"
    state = s.get("final_stability")
    if state == "no fixed point":
        return f"{head}: the solver finds no fixed point for some inputs of the last batch"
    eig, eig_gw = s.get("max_re_eig_W_final"), s.get("max_re_eig_GW_final")
    if outcome.config.activation == "identity":
        what = f"max Re λ(W) = {eig:.4g} ≥ 1"
    else:
        what = f"max Re λ(G·W) = {eig_gw:.4g} ≥ 1 at the last batch's fixed points"
        what += f" (max Re λ(W) = {eig:.4g})"
    return f"{head} ({what}): its fixed point is not an attractor of the dynamics"


def describe(outcome: RunOutcome) -> str:
    """One line per run: the rule, lr and how it ended."""
    s = outcome.summary
    head = f"{s['rule']:>13} lr {s['lr']:<6g}"
    if outcome.diverged:
        return f"{head} diverged at step {outcome.diverged_at}  [{outcome.seconds:.1f}s]"
    text = f"{head} final loss {outcome.final_loss:.3e}"
    if s.get("best_test_acc") is not None:
        text += f"  best train/test acc {s['best_train_acc']:.4f}/{s['best_test_acc']:.4f}"
    if s.get("max_re_eig_W_final") is not None:
        text += (
            f"  max Re eig W max/final {s['max_re_eig_W_max']:.4g}/{s['max_re_eig_W_final']:.4g}"
        )
    if s.get("final_unstable"):
        text += "  UNSTABLE"
    return text + f"  [{outcome.seconds:.1f}s]"


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def sweep_table(outcomes: Sequence[RunOutcome], task: str, threshold: float) -> str:
    """A markdown table with one row per (rule, lr)."""
    key = f"steps_to_loss_{threshold:g}"
    if task == "mnist":
        head = "| rule | lr | final train loss | best train acc | best test acc | "
        head += "max Re λ(W) (max / final) | result |"
    else:
        head = f"| rule | lr | final loss | steps to loss < {threshold:g} | "
        head += "max Re λ(W) (max / final) | result |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for o in outcomes:
        s = o.summary
        loss = "inf" if o.diverged else _fmt(o.final_loss, ".3e")
        eig = (
            f"{_fmt(s.get('max_re_eig_W_max'), '.3f')} / {_fmt(s.get('max_re_eig_W_final'), '.3f')}"
        )
        result = f"diverged at step {o.diverged_at}" if o.diverged else "ok"
        if not o.diverged and s.get("final_unstable"):
            result = f"final W unstable ({s.get('final_stability')})"
        if task == "mnist":
            cells = [
                s["rule"],
                f"{s['lr']:g}",
                loss,
                _fmt(s.get("best_train_acc"), ".4f"),
                _fmt(s.get("best_test_acc"), ".4f"),
                eig,
                result,
            ]
        else:
            cells = [s["rule"], f"{s['lr']:g}", loss, _fmt(s.get(key), "d"), eig, result]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(outcomes: Sequence[RunOutcome], path: str | Path, title: str = "") -> Path:
    """Loss (log scale) and max Re λ(W) vs step, one column per learning rate, all rules."""
    plt = _pyplot()
    lrs = sorted({o.config.lr for o in outcomes})
    rules = list(dict.fromkeys(o.config.rule for o in outcomes))
    colors = {rule: f"C{i}" for i, rule in enumerate(rules)}
    # Rules can coincide (all reparameterised rules agree on a linear network): dashes keep
    # every curve visible.
    styles = {rule: LINESTYLES[i % len(LINESTYLES)] for i, rule in enumerate(rules)}
    fig, axes = plt.subplots(
        2, len(lrs), figsize=(3.2 * len(lrs), 5.6), dpi=120, squeeze=False, sharex="col"
    )
    for col, lr in enumerate(lrs):
        top, bottom = axes[0][col], axes[1][col]
        for o in (o for o in outcomes if o.config.lr == lr):
            rows = [r for r in o.rows if "loss" in r]
            steps = [r["step"] for r in rows]
            losses = [r["loss"] for r in rows]
            color = colors[o.config.rule]
            style = styles[o.config.rule]
            marker = "o" if len(steps) < 5 else None  # a run that stopped at once stays visible
            top.plot(
                steps,
                losses,
                color=color,
                ls=style,
                lw=1.2,
                marker=marker,
                ms=3,
                label=o.config.rule,
            )
            if o.diverged and steps:
                top.plot(steps[-1], losses[-1], "x", color=color, ms=8, mew=2)
            eig = [(r["step"], r["max_re_eig_W"]) for r in rows if "max_re_eig_W" in r]
            if eig:
                bottom.plot(
                    *zip(*eig, strict=True),
                    color=color,
                    ls=style,
                    lw=1.2,
                    marker="o" if len(eig) < 5 else None,
                    ms=3,
                )
        top.set_yscale("log")
        top.set_title(f"lr = {lr:g}")
        bottom.axhline(1.0, color="k", ls="--", lw=0.8)
        bottom.set_xlabel("iteration")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        if col == 0:
            top.set_ylabel("training loss")
            bottom.set_ylabel("max Re λ(W)")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title + "  (× = diverged)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
