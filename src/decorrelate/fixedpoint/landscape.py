"""The loss landscape of the linear teacher task around a minimiser, with its poles.

For a linear network the loss L(W) = ⟨‖(I − W)⁻¹X − r̂‖²⟩ (the paper's J) is a rational function
of W with poles wherever I − W is singular. Along a line W* + tD that happens at t = 1/μ for
every *real* eigenvalue μ of A*D (A* = (I − W*)⁻¹), because I − W* − tD = (I − W*)(I − t A*D).
The tool draws the loss on a log scale along a few random lines (poles marked by dotted
verticals) and on a random plane through the minimiser (poles show as bright ridges), and writes
the numbers.

The minimiser: with m < N samples the teacher task has a whole affine family of exact solutions
in A. W* is the one whose response matrix is the teacher's projected onto it,
A*ᵀ = Âᵀ + X⁺(r̂ − X Âᵀ), so L(W*) = 0 up to rounding. Random directions D are Gaussian,
scaled to ‖D‖_F = ‖W*‖_F, so t = ±1 is a perturbation as large as W* itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import checkpoint as ckpt
from ..plotting import _pyplot
from ..seeding import make_generator
from .config import FixedPointConfig
from .losses import TargetLoss
from .tasks import TeacherData, json_safe, make_teacher, prepare_run_dir

#: The landscape's numbers (:func:`landscape_summary`), beside ``landscape.json``.
SUMMARY = "summary.json"
#: Grid points solved per batched call (bounds memory: CHUNK·N² values).
CHUNK = 64


@dataclass
class LandscapeResult:
    """Lines (t, loss, poles), the plane (s, t, loss grid) and the files written."""

    t: Tensor
    line_losses: Tensor  # [lines, points]
    poles: list[list[float]]
    grid: Tensor  # [g]
    plane: Tensor  # [g, g] (rows: first direction, columns: second)
    min_loss: float
    files: list[Path]


def minimiser(data: TeacherData) -> Tensor:
    """An exact minimiser W* of the teacher loss (see the module docstring)."""
    n = data.teacher.shape[0]
    eye = torch.eye(n, dtype=data.X.dtype)
    A_hat_T = torch.linalg.inv(eye - data.teacher).T
    correction = torch.linalg.pinv(data.X) @ (data.target - data.X @ A_hat_T)
    A_star = (A_hat_T + correction).T
    return eye - torch.linalg.inv(A_star)


def losses_at(weights: Tensor, data: TeacherData) -> Tensor:
    """The teacher loss ⟨‖r − r̂‖²⟩ (:class:`TargetLoss`) with r = (I − W)⁻¹X for a batch of
    weight matrices ``[K, N, N]``."""
    n = weights.shape[-1]
    eye = torch.eye(n, dtype=weights.dtype)
    out = []
    for chunk in weights.split(CHUNK):
        r = torch.linalg.solve(eye - chunk, data.X.T.expand(chunk.shape[0], -1, -1))  # [k, N, m]
        per_sample = TargetLoss()(
            r.transpose(1, 2), data.target.expand_as(r.transpose(1, 2)), "none"
        )
        out.append(per_sample.mean(-1))
    return torch.cat(out)


def line_poles(W_star: Tensor, direction: Tensor, span: float) -> list[float]:
    """The t in [−span, span] where I − W* − tD is singular (1/μ for real eigenvalues μ of A*D)."""
    eye = torch.eye(W_star.shape[0], dtype=W_star.dtype)
    mu = torch.linalg.eigvals(torch.linalg.solve(eye - W_star, direction))
    real = mu[(mu.imag.abs() <= 1e-9 * mu.abs().clamp_min(1e-300)) & (mu.real != 0)].real
    t = (1.0 / real).tolist()
    return sorted(x for x in t if -span <= x <= span)


def run_landscape(cfg: FixedPointConfig, out: str | Path | None = None) -> LandscapeResult:
    """Compute and draw the lines and the plane; write ``landscape.png``/``.json`` and metrics."""
    cfg = cfg.resolved()
    path = prepare_run_dir(cfg, out)
    assert cfg.hidden is not None
    data = make_teacher(cfg.hidden, cfg.samples, cfg.seed, cfg.torch_dtype)
    W_star = minimiser(data)
    gen = make_generator(cfg.seed, "landscape")
    norm = W_star.norm()

    def direction() -> Tensor:
        D = torch.randn(W_star.shape, generator=gen, dtype=W_star.dtype)
        return D * (norm / D.norm())

    t = torch.linspace(-cfg.span, cfg.span, cfg.line_points, dtype=W_star.dtype)
    line_losses, poles = [], []
    for _ in range(cfg.lines):
        D = direction()
        line_losses.append(losses_at(W_star + t[:, None, None] * D, data))
        poles.append(line_poles(W_star, D, cfg.span))
    D1, D2 = direction(), direction()
    grid = torch.linspace(-cfg.span, cfg.span, cfg.grid, dtype=W_star.dtype)
    plane_weights = (
        W_star + grid[:, None, None, None] * D1 + grid[None, :, None, None] * D2
    ).reshape(-1, *W_star.shape)
    plane = losses_at(plane_weights, data).reshape(cfg.grid, cfg.grid)
    min_loss = float(losses_at(W_star[None], data)[0])
    result = LandscapeResult(t, torch.stack(line_losses), poles, grid, plane, min_loss, [])
    if path is not None:
        result.files = _write(result, path)
    return result


def _write(result: LandscapeResult, path: Path) -> list[Path]:
    rows: list[dict[str, Any]] = []
    for i, (losses, poles) in enumerate(zip(result.line_losses, result.poles, strict=True)):
        rows.append(
            {
                "line": i,
                "poles": len(poles),
                "pole_t": poles,
                "min_loss": float(losses.min()),
                "max_loss": float(losses.max()),
                "loss_at_minimiser": result.min_loss,
            }
        )
    ckpt.write_metrics(path / ckpt.METRICS, rows)
    data = {
        "t": result.t.tolist(),
        "line_losses": result.line_losses.tolist(),
        "poles": result.poles,
        "grid": result.grid.tolist(),
        "plane_losses": result.plane.tolist(),
        "loss_at_minimiser": result.min_loss,
    }
    json_path = path / "landscape.json"
    ckpt.atomic_write_bytes(json_path, lambda f: f.write(json.dumps(json_safe(data)).encode()))
    png = path / "landscape.png"
    plot_landscape(result, png)
    summary_path = path / SUMMARY
    text = json.dumps(json_safe(landscape_summary(result)), indent=2) + "\n"
    ckpt.atomic_write_bytes(summary_path, lambda f: f.write(text.encode()))
    return [path / ckpt.METRICS, json_path, png, summary_path]


def landscape_summary(result: LandscapeResult) -> dict[str, Any]:
    """The landscape's numbers in ``summary.json`` (what a report tabulates): poles per line in
    [−span, span], the loss at the minimiser, and the largest loss drawn on the lines (at a
    pole it is huge: the loss is a rational function of W with poles where I − W is singular)."""
    counts = [len(p) for p in result.poles]
    return {
        "lines": len(counts),
        "poles": sum(counts),
        "poles_per_line": sum(counts) / max(1, len(counts)),
        "lines_with_a_pole": sum(1 for c in counts if c),
        "loss_at_minimiser": result.min_loss,
        "max_line_loss": float(result.line_losses.max()),
        "median_line_loss": float(result.line_losses.median()),
    }


def plot_landscape(result: LandscapeResult, path: Path) -> Path:
    """Left: loss along the lines (log scale, poles dotted); right: log10 loss on the plane."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120)
    t = result.t.numpy()
    for i, (losses, poles) in enumerate(zip(result.line_losses, result.poles, strict=True)):
        color = f"C{i}"
        left.plot(t, losses.clamp_min(1e-30).numpy(), color=color, lw=1, label=f"line {i}")
        for p in poles:
            left.axvline(p, color=color, ls=":", lw=0.8)
    left.set_yscale("log")
    # L(W*) = 0 up to rounding; keep that single point from squashing the range.
    left.set_ylim(bottom=float(result.line_losses.quantile(0.01)) / 10)
    left.set_xlabel("t  (W = W* + t·D)")
    left.set_ylabel("loss")
    left.set_title("loss along random lines (dotted: poles)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    g = result.grid.numpy()
    log_plane = result.plane.clamp_min(1e-30).log10()
    image = right.imshow(
        log_plane.T.numpy(),
        vmin=float(log_plane.quantile(0.01)),
        origin="lower",
        extent=(g[0], g[-1], g[0], g[-1]),
        cmap="viridis",
        aspect="auto",
    )
    right.plot([0], [0], "r*", ms=10, label="minimiser W*")
    right.set_xlabel("s  (direction D₁)")
    right.set_ylabel("t  (direction D₂)")
    right.set_title("log₁₀ loss on a random plane")
    right.legend(fontsize=8, loc="upper right")
    fig.colorbar(image, ax=right)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
