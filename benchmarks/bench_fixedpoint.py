"""Benchmarks of the fixed-point rate networks (Zhu & Rosenbaum 2024), single CPU thread.

Four parts, each writing ``benchmarks/results/fixedpoint_<part>.json`` (and a PNG where it draws):

* ``teacher`` — the linear teacher task, full batch, every rule at η ∈ {0.03, 0.1, 0.3, 1, 3}
  for 3500 iterations: final loss, iterations to reach loss < 1e-4, stability and update angle.
  ``bptt`` costs ~15× a Euclidean step here, so it is checked against ``euclidean`` (which it
  must reproduce when unrolled to tolerance) over the first ``--bptt-steps`` iterations.
* ``mnist`` — 300 tanh units, fixed random W_x and readout, only W trained, batch 512, 3 epochs of
  plain SGD, per rule over a learning-rate sweep: best train/test accuracy and max Re λ(W).
  ``mnist-skip`` repeats Euclidean descent with ``on_nonconvergence=skip`` (training goes on past
  inputs that no longer settle, which are counted) and adds it to the same JSON.
* ``speed`` — time per step at N = 300, batch 512 of ``euclidean`` and ``linearized`` against a
  straightforward per-sample-inverse implementation of the same maths (a Python loop over samples
  inverting G_b⁻¹ − W), both for the update alone and for the whole step (solve included).
* ``solver`` — iterations and time to tolerance 1e-6 (float32, N = 300, batch 512): damped
  iteration vs Anderson (and Newton), on the initial MNIST network, on networks after Euclidean
  training, and on harder random ones.

    python benchmarks/bench_fixedpoint.py [--part all|teacher|mnist|mnist-skip|speed|solver]
        [--rules euclidean,linearized,linearized-g] [--seeds 0,1,2] [--mnist-lrs 0.1,0.3,1,3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from decorrelate.data import load_dataset
from decorrelate.experiments.fixedpoint_sweep import run_sweep, sweep_table
from decorrelate.fixedpoint import RateRNN, SolverConfig, euclidean_gradient, linearized_update
from decorrelate.fixedpoint.config import FixedPointConfig
from decorrelate.fixedpoint.rules import loss_and_delta
from decorrelate.fixedpoint.solver import solve_fixed_point
from decorrelate.fixedpoint.tasks import run_task
from decorrelate.losses import Loss
from decorrelate.seeding import make_generator

RESULTS = Path("benchmarks/results")
TEACHER_LRS = (0.03, 0.1, 0.3, 1.0, 3.0)
MNIST_LRS = (0.1, 0.3, 1.0, 3.0)


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become strings, tuples lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _save(name: str, payload: dict[str, Any]) -> Path:
    path = RESULTS / f"fixedpoint_{name}.json"
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    path.write_text(json.dumps(_clean({**payload, "meta": meta}), indent=2) + "\n")
    print(f"wrote {path}")
    return path


# ----------------------------------------------------------------------------- (1) teacher


def bench_teacher(runs: Path, bptt_steps: int) -> None:
    base = FixedPointConfig(task="linear-teacher", steps=3500)
    sweep = run_sweep(
        base,
        ["euclidean", "reparam", "linearized", "linearized-g"],
        TEACHER_LRS,
        runs / "teacher",
    )
    shutil.copy(runs / "teacher" / "sweep.png", RESULTS / "fixedpoint_teacher.png")
    angles = {}
    for r in sweep.results:
        values = [row["angle_deg"] for row in r.history if row.get("angle_deg") is not None]
        angles[f"{r.run.axes['rule']} lr {r.run.axes['lr']:g}"] = (
            statistics.median(values) if values else None
        )
    # bptt unrolled to tolerance must follow euclidean step by step.
    bptt = []
    for lr in (0.3, 1.0):
        curves = {}
        for rule in ("euclidean", "bptt"):
            cfg = dataclasses.replace(base, rule=rule, lr=lr, steps=bptt_steps)
            outcome = run_task(cfg, runs / f"teacher-{rule}-{lr:g}")
            curves[rule] = (outcome, [r["loss"] for r in outcome.rows])
        (e_out, e), (b_out, b) = curves["euclidean"], curves["bptt"]
        bptt.append(
            {
                "lr": lr,
                "steps": bptt_steps,
                "max_rel_loss_diff": max(abs(x - y) / abs(x) for x, y in zip(e, b, strict=True)),
                "final_loss_euclidean": e[-1],
                "final_loss_bptt": b[-1],
                "ms_per_step_euclidean": 1e3 * e_out.seconds / e_out.steps,
                "ms_per_step_bptt": 1e3 * b_out.seconds / b_out.steps,
            }
        )
    print(sweep.table.markdown())
    _save(
        "teacher",
        {
            "setup": "N=200, m=100, X~0.1N(0,1), teacher 0.5N(0,1)/sqrtN, "
            "targets (I-W^)^-1X+0.01 noise, "
            "W0 0.75N(0,1)/sqrtN, loss J = <|r-r^|^2> (the paper's, no 1/2; lr as in the paper), "
            "full-batch plain GD, 3500 iterations, "
            "float64, Newton solver (one shared LU), seed 0",
            "runs": [r.summary for r in sweep.results],
            "median_angle_to_euclidean_deg": angles,
            "bptt_vs_euclidean": bptt,
            "table": sweep.table.markdown(),
        },
    )


# ----------------------------------------------------------------------------- (2) MNIST


MNIST_RULES = ("euclidean", "linearized", "linearized-g")


def _mean_std(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else None,
    }


def bench_mnist(
    runs: Path,
    data_dir: str | None,
    rules: list[str],
    seeds: list[int],
    lrs: tuple[float, ...] | list[float] = MNIST_LRS,
) -> None:
    """The MNIST sweep of ``rules`` at every learning rate of ``lrs`` and every seed: one plan,
    runs in ``runs/mnist/<rule>-lr<lr>[-s<seed>]``.

    The JSON keeps the entries of rules not run this time (``runs`` holds seed-0 summaries,
    ``multi_seed`` per rule and lr the per-seed numbers and mean ± std of the best accuracies);
    ``table`` is the table of the runs of the first seed.
    """
    base = FixedPointConfig(task="mnist", epochs=3, data_dir=data_dir)
    sweep = run_sweep(base, rules, lrs, runs / "mnist", seeds=seeds)
    if set(rules) == set(MNIST_RULES) and set(lrs) == set(MNIST_LRS):
        shutil.copy(runs / "mnist" / "sweep.png", RESULTS / "fixedpoint_mnist.png")
    first = [r for r in sweep.results if r.run.config.seed == seeds[0]]
    table = sweep_table(first, "mnist", base.loss_threshold).markdown()
    print(table)
    per_key: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in sweep.results:
        key = (r.run.axes["rule"], r.run.axes["lr"])
        per_key.setdefault(key, []).append({**r.summary, "seed": r.run.config.seed})
    # Read the JSON only now: another invocation may have written it while these runs went on.
    path = RESULTS / "fixedpoint_mnist.json"
    payload = json.loads(path.read_text()) if path.exists() else {}
    payload.pop("meta", None)
    payload["table"] = table
    runs_by_key = {
        (r["rule"], float(r["lr"]), r.get("seed", 0)): r for r in payload.get("runs", [])
    }
    multi = payload.get("multi_seed", {})
    for (rule, lr), summaries in per_key.items():
        for s in summaries:
            if s["seed"] == 0:
                runs_by_key[(rule, lr, 0)] = s
        entry: dict[str, Any] = {"seeds": [s["seed"] for s in summaries]}
        for key in ("best_train_acc", "best_test_acc", "max_re_eig_W_max", "max_re_eig_W_final"):
            entry[key] = [s.get(key) for s in summaries]
        for key in ("best_train_acc", "best_test_acc"):
            entry[f"{key}_stats"] = _mean_std([v for v in entry[key] if v is not None])
        entry["diverged_at"] = [s.get("diverged_at") for s in summaries]
        entry["final_unstable"] = [s.get("final_unstable") for s in summaries]
        multi[f"{rule} lr {lr:g}"] = entry
    merged = sorted(runs_by_key.values(), key=lambda r: (MNIST_RULES.index(r["rule"]), r["lr"]))
    per_rule: dict[str, Any] = {}
    for s in merged:
        best = per_rule.get(s["rule"])
        if best is None or (s.get("best_test_acc") or 0) > (best["best_test_acc"] or 0):
            per_rule[s["rule"]] = {
                "lr": s["lr"],
                "best_train_acc": s.get("best_train_acc"),
                "best_test_acc": s.get("best_test_acc"),
                "max_re_eig_W_max": s.get("max_re_eig_W_max"),
            }
    payload.update(
        setup="MNIST (normalised), 300 tanh units, W_x ~ N(0,1/784), readout ~ N(0,1/300), "
        "W0 0.5N(0,1)/sqrtN, cross-entropy (mean; same lr convention as the authors), batch 512, "
        "3 epochs plain SGD, float32, Anderson solver tol 1e-6, iterative adjoint; runs: seed 0, "
        "multi_seed: every seed run",
        runs=merged,
        multi_seed=multi,
        best_per_rule=per_rule,
    )
    _save("mnist", payload)


def bench_mnist_skip(runs: Path, data_dir: str | None) -> None:
    """Euclidean descent once more, but training on past inputs that no longer settle.

    Under the default policy a run stops at the first input whose fixed point cannot be found;
    with ``on_nonconvergence="skip"`` such inputs are left out of the update, counted, and count
    as errors in the accuracy, which shows how far training gets and how many inputs are lost.
    """
    base = FixedPointConfig(task="mnist", epochs=3, data_dir=data_dir, on_nonconvergence="skip")
    sweep = run_sweep(base, ["euclidean"], (0.3, 1.0, 3.0), runs / "mnist-skip")
    rows = []
    for r in sweep.results:
        epochs = [row for row in r.history if "test_acc" in row and row["epoch"] > 0]
        rows.append(
            r.summary
            | {
                "per_epoch": [
                    {
                        k: row.get(k)
                        for k in (
                            "epoch",
                            "train_acc",
                            "test_acc",
                            "train_nonconverged",
                            "test_nonconverged",
                        )
                    }
                    for row in epochs
                ]
            }
        )
    path = RESULTS / "fixedpoint_mnist.json"
    payload = json.loads(path.read_text()) if path.exists() else {}
    payload.pop("meta", None)
    payload["euclidean_skip_nonconverged"] = rows
    payload["euclidean_skip_table"] = sweep.table.markdown()
    print(sweep.table.markdown())
    _save("mnist", payload)


# ----------------------------------------------------------------------------- (3) speed


def euclidean_per_sample(W, r, g, delta):
    """The straightforward form: per sample, A_b = (G_b⁻¹ − W)⁻¹ and ∇_W L_b = A_bᵀ δ_b r_bᵀ."""
    grad = torch.zeros_like(W)
    for b in range(r.shape[0]):
        A = torch.linalg.inv(torch.diag(1.0 / g[b]) - W)
        grad += torch.outer(A.T @ delta[b], r[b])
    return grad


def linearized_per_sample(W, r, g, delta):
    """Per sample, the explicit product (I − WG)(I − WG)ᵀ ∇_W L_b (I − GW)ᵀ(I − GW)."""
    eye = torch.eye(W.shape[0], dtype=W.dtype)
    update = torch.zeros_like(W)
    for b in range(r.shape[0]):
        G = torch.diag(g[b])
        A = torch.linalg.inv(torch.diag(1.0 / g[b]) - W)
        grad_b = torch.outer(A.T @ delta[b], r[b])
        left, right = eye - W @ G, eye - G @ W
        update += left @ left.T @ grad_b @ right.T @ right
    return update


def _time(fn, repeats: int) -> tuple[float, Any]:
    result = fn()  # warm-up (and the value to compare)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def mnist_batch(batch: int, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("mnist", data_dir=data_dir).train
    order = torch.randperm(len(data), generator=make_generator(0, "bench-batch"))[:batch]
    return data.x[order], data.y[order]


def bench_speed(repeats: int, data_dir: str | None) -> None:
    x, y = mnist_batch(512, data_dir)
    model = RateRNN(
        300,
        784,
        10,
        activation="tanh",
        w_scale=0.5,
        generator=make_generator(0, "fixedpoint-model"),
    )
    loss = Loss("cross-entropy")
    W = model.W.detach()
    fp = model.fixed_point(x)
    _, delta = loss_and_delta(model, fp.r, y, loss)
    r, g = fp.r, fp.gain
    rows = []
    reference_repeats = max(1, repeats // 3)
    t_ref_e, ref_e = _time(lambda: euclidean_per_sample(W, r, g, delta), reference_repeats)
    t_ref_l, ref_l = _time(lambda: linearized_per_sample(W, r, g, delta), reference_repeats)
    t_solve, _ = _time(lambda: model.fixed_point(x), repeats)
    for name, fn, t_ref, ref in (
        (
            "euclidean (adjoint direct: batched LU)",
            lambda: euclidean_gradient(W, r, g, delta, "tanh", SolverConfig(adjoint="direct")),
            t_ref_e,
            ref_e,
        ),
        (
            "euclidean (adjoint iterative: Anderson)",
            lambda: euclidean_gradient(W, r, g, delta, "tanh", SolverConfig(adjoint="iterative")),
            t_ref_e,
            ref_e,
        ),
        ("linearized", lambda: linearized_update(W, r, g, delta), t_ref_l, ref_l),
    ):
        t_ours, ours = _time(fn, repeats)
        rows.append(
            {
                "rule": name,
                "update_ms": 1e3 * t_ours,
                "per_sample_inverse_update_ms": 1e3 * t_ref,
                "update_speedup": t_ref / t_ours,
                "step_ms": 1e3 * (t_solve + t_ours),
                "per_sample_inverse_step_ms": 1e3 * (t_solve + t_ref),
                "step_speedup": (t_solve + t_ref) / (t_solve + t_ours),
                "rel_diff_vs_reference": float((ours - ref).norm() / ref.norm()),
            }
        )
    lines = [
        "| rule | ours: update / whole step (ms) | per-sample inverse: update / step (ms) "
        "| speed-up: update / step | rel. diff |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['rule']} | {row['update_ms']:.1f} / {row['step_ms']:.1f} | "
            f"{row['per_sample_inverse_update_ms']:.0f} / "
            f"{row['per_sample_inverse_step_ms']:.0f} | "
            f"{row['update_speedup']:.0f}× / {row['step_speedup']:.1f}× | "
            f"{row['rel_diff_vs_reference']:.1e} |"
        )
    table = "\n".join(lines)
    print(table)
    _save(
        "speed",
        {
            "setup": "N=300, batch 512 MNIST, tanh, float32, 1 thread; the step includes the "
            f"fixed-point solve (Anderson, {1e3 * t_solve:.0f} ms, shared by both columns)",
            "solve_ms": 1e3 * t_solve,
            "rows": rows,
            "table": table,
        },
    )


# ----------------------------------------------------------------------------- (4) solver


def _solver_case(W: torch.Tensor, X: torch.Tensor, tol: float, max_iter: int) -> list[dict]:
    from decorrelate.fixedpoint.activations import get_activation

    act = get_activation("tanh")
    rows = []
    for name, config in (
        (
            "damped α=0.5",
            SolverConfig(
                method="damped", damping=0.5, tol=tol, max_iter=max_iter, on_nonconvergence="skip"
            ),
        ),
        (
            "damped α=1",
            SolverConfig(
                method="damped", damping=1.0, tol=tol, max_iter=max_iter, on_nonconvergence="skip"
            ),
        ),
        (
            "anderson (damped to 1e-3, then m=5)",
            SolverConfig(method="anderson", tol=tol, max_iter=max_iter, on_nonconvergence="skip"),
        ),
        ("newton", SolverConfig(method="newton", tol=tol, max_iter=10, on_nonconvergence="skip")),
    ):
        start = time.perf_counter()
        try:
            fp = solve_fixed_point(W, X, act, config)
            rows.append(
                {
                    "method": name,
                    "iterations": fp.iterations,
                    "seconds": time.perf_counter() - start,
                    "converged_fraction": float(fp.converged.double().mean()),
                    "max_residual": fp.max_residual,
                }
            )
        except Exception as err:  # every sample failed: still a result
            rows.append(
                {
                    "method": name,
                    "iterations": None,
                    "seconds": time.perf_counter() - start,
                    "converged_fraction": 0.0,
                    "error": str(err).split(";")[0],
                }
            )
    return rows


def bench_solver(data_dir: str | None, max_iter: int) -> None:
    tol = 1e-6
    x, _ = mnist_batch(512, data_dir)
    gen = make_generator(0, "bench-solver")
    model = RateRNN(
        300,
        784,
        10,
        activation="tanh",
        w_scale=0.5,
        generator=make_generator(0, "fixedpoint-model"),
    )
    X = model.drive(x)
    cases: dict[str, torch.Tensor] = {
        "MNIST net at initialisation (W0 = 0.5·N(0,1)/√N)": model.W.detach().clone()
    }
    # Networks after Euclidean training on MNIST (stability degrades as max Re λ(W) grows).
    for lr, steps in ((1.0, 40), (3.0, 40)):
        cfg = FixedPointConfig(
            task="mnist",
            rule="euclidean",
            lr=lr,
            epochs=1,
            train_size=512 * steps,
            data_dir=data_dir,
            log_every=1000,
            diag_every=1000,
        )
        out = Path("runs/bench-fixedpoint") / f"solver-euclidean-{lr:g}"
        outcome = run_task(cfg, out)
        state = torch.load(out / "model.pt", weights_only=True)["model"]
        label = f"after {outcome.steps} Euclidean steps at lr {lr:g}"
        if outcome.diverged:  # the weights where training stopped: some inputs do not settle
            label += " (where training stopped)"
        cases[label] = state["W"]
    base = 0.5 * torch.randn(300, 300, generator=gen) / math.sqrt(300)
    cases["random W = 1.5·N(0,1)/√N (|λ| > 1, Re λ < 1)"] = 3.0 * base
    U = torch.linalg.qr(torch.randn(300, 4, generator=gen))[0]
    cases["W0 + 2·UUᵀ (rank-4 gain 2: multistable)"] = base + 2.0 * U @ U.T
    results = []
    for name, W in cases.items():
        eig = float(torch.linalg.eigvals(W).real.max())
        rows = _solver_case(W, X, tol, max_iter)
        results.append({"case": name, "max_re_eig_W": eig, "methods": rows})
        print(name, f"max Re λ(W) = {eig:.3f}")
        for row in rows:
            print(
                f"   {row['method']:<22} iters {row['iterations']}  {row['seconds']:.3f}s  "
                f"converged {row['converged_fraction']:.3f}"
            )
    lines = [
        "| network | max Re λ(W) | "
        + " | ".join(r["method"] for r in results[0]["methods"])
        + " |",
        "|---|---|" + "---|" * len(results[0]["methods"]),
    ]
    for res in results:
        cells = []
        for row in res["methods"]:
            if row["iterations"] is None:
                cells.append("failed")
                continue
            text = f"{row['iterations']} it, {1e3 * row['seconds']:.0f} ms"
            if row["converged_fraction"] < 1:
                text += f" ({100 * row['converged_fraction']:.1f} % conv.)"
            cells.append(text)
        lines.append(f"| {res['case']} | {res['max_re_eig_W']:.2f} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    _save(
        "solver",
        {
            "setup": f"tanh, N=300, batch 512 MNIST drives, float32, tol {tol:g} (∞-norm), "
            f"max_iter {max_iter} (newton 10), start r=0, 1 thread",
            "cases": results,
            "table": table,
        },
    )


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part",
        default="all",
        choices=("all", "teacher", "mnist", "mnist-skip", "speed", "solver"),
    )
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (speed part)")
    parser.add_argument("--bptt-steps", type=int, default=500)
    parser.add_argument("--solver-max-iter", type=int, default=2000)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--rules", default=",".join(MNIST_RULES), help="mnist part: rules, comma-separated"
    )
    parser.add_argument("--seeds", default="0", help="mnist part: seeds, comma-separated")
    parser.add_argument(
        "--mnist-lrs",
        default=",".join(f"{v:g}" for v in MNIST_LRS),
        help="mnist part: learning rates, comma-separated",
    )
    parser.add_argument(
        "--runs",
        default="runs/bench-fixedpoint",
        help="where the per-run directories go (not committed)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs)
    start = time.perf_counter()
    if args.part in ("all", "speed"):
        bench_speed(args.repeats, args.data_dir)
    if args.part in ("all", "solver"):
        bench_solver(args.data_dir, args.solver_max_iter)
    if args.part in ("all", "teacher"):
        bench_teacher(runs, args.bptt_steps)
    if args.part in ("all", "mnist"):
        seeds = [int(k) for k in _split(args.seeds)]
        lrs = [float(v) for v in _split(args.mnist_lrs)]
        bench_mnist(runs, args.data_dir, _split(args.rules), seeds, lrs)
    if args.part in ("all", "mnist-skip"):
        bench_mnist_skip(runs, args.data_dir)
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
