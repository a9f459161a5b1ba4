"""The zoo table: rule × decorrelation × architecture → loss after K steps on a real task,
time per step ÷ BP and peak step memory ÷ BP; and what R costs in memory per zoo model.

Tasks (real data, not the zoo's synthetic batches):

* vision models (``mlp``, ``conv-bn``, ``resnet``, ``depthwise``): MNIST (``--data-dir``, found
  as the library finds it), 10 classes, 28×28; ``conv1d`` reads each MNIST image as a sequence
  of 28 rows (28 channels × 28 steps);
* language models (``lstm-lm``, ``gru-lm``, ``gpt``, ``hf-gpt2``): character-level next-token
  prediction on windows of ``--seq-len`` characters of a text corpus;
* sequence classifiers (``encoder``, ``hf-bert``): which of 4 generators wrote a window of text.

The text comes from :func:`text_corpus`, a small self-contained generator of English-like
sentences (4 "authors", each with its own vocabulary); it stands in until the library's
character-level text task lands, then the benchmark switches to it.

Every cell trains from the same seeded initialisation with Adam (``--lr``; ``--lr-np`` for the
forward-only rules) for ``--steps`` steps of ``--batch-size`` samples; the loss is the mean over
a fixed held-out set (MNIST test images / held-out text). Time: all cells of one architecture
and seed step round-robin in the same process (one step each, in turn), so that load from other
processes hits them alike; a cell's time per step is its median, divided by plain BP's (no
decorrelation) median from the same rounds (the first two steps of every cell, which build
optimizer state and lazy buffers, are not timed). Memory (``--memory``): each cell in a fresh child
process, as ``bench_memory.py`` measures it (glibc told to serve allocations above 64 KiB by
mmap, so the resident set follows the live tensors; the kernel's high-water mark over one step
after two warm-up steps, minus the resident set before it): the step's peak *extra* memory,
÷ BP's. A cell today's code cannot run is reported with its one-line error, not skipped.

    python benchmarks/bench_zoo.py --steps 200 --seeds 0,1,2 --threads 1 --memory \
        --out benchmarks/results/zoo
    python benchmarks/bench_zoo.py --r-memory --out benchmarks/results/zoo

``--r-memory`` writes only the table of parameter + buffer bytes per zoo model (at the
benchmark's sizes) without decorrelation, with ``scaled`` (full R), and with block-diagonal R
(``--block-size``). Outputs: ``zoo.md``, ``zoo.csv``, ``zoo.json`` (or ``r_memory.*``) in
``--out``.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import decorrelate as dc
from decorrelate import zoo
from decorrelate.fixedpoint.rules import FixedPointRule
from decorrelate.rules import available_rules, get_rule, rule_class

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import MMAP_ENV, _status

VISION = ("mlp", "conv-bn", "resnet", "depthwise", "conv1d")
LANGUAGE = ("lstm-lm", "gru-lm", "gpt", "hf-gpt2")
TEXT_CLASSES = ("encoder", "hf-bert")

# ----------------------------------------------------------------------------- text task

_AUTHORS = (
    ("the", "ship", "sea", "wind", "sail", "rope", "deck", "storm", "captain", "wave"),
    ("a", "king", "crown", "hall", "sword", "knight", "queen", "castle", "throne", "war"),
    ("my", "garden", "rose", "tree", "leaf", "rain", "bloom", "soil", "seed", "sun"),
    ("this", "engine", "wheel", "steam", "iron", "gear", "rail", "smoke", "coal", "track"),
)
_VERBS = ("is", "was", "saw", "held", "made", "found", "lost", "became")


def text_corpus(chars: int, author: int, seed: int) -> str:
    """About ``chars`` characters of sentences by one of 4 "authors" (seeded, self-contained).

    Each sentence is "<det> <noun> <verb> <det> <noun> [and <noun>]." from the author's own
    words, so a model can learn spelling, word order and, for classification, the author.
    """
    g = torch.Generator().manual_seed(1000 * seed + author)
    words = _AUTHORS[author]
    out: list[str] = []
    length = 0
    while length < chars:
        pick = torch.randint(len(words) - 1, (5,), generator=g).tolist()
        verb = _VERBS[int(torch.randint(len(_VERBS), (1,), generator=g))]
        s = f"{words[0]} {words[1 + pick[0]]} {verb} {words[0]} {words[1 + pick[1]]}"
        if pick[2] % 2:
            s += f" and {words[1 + pick[3]]}"
        out.append(s + ". ")
        length += len(out[-1])
    return "".join(out)


@dataclass
class Task:
    """A real task for one architecture: training batches, a held-out set, model sizes."""

    sizes: dict
    train: Callable[[int, torch.Generator], tuple[Tensor, Tensor]]
    held_out: tuple[Tensor, Tensor]
    loss_kwargs: dict


def _vocab() -> list[str]:
    return sorted(set("".join(text_corpus(4000, a, 0) for a in range(4))))


def _encode(text: str, vocab: list[str]) -> Tensor:
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text], dtype=torch.long)


def _windows(streams: Tensor, starts: Tensor, which: Tensor, length: int) -> Tensor:
    """Windows ``streams[which[i], starts[i] : starts[i] + length]`` as one gather."""
    return streams[which[:, None], starts[:, None] + torch.arange(length)]


def text_task(arch: str, seq_len: int, held: int) -> Task:
    vocab = _vocab()

    def streams(chars: int, seed: int) -> Tensor:  # [4 authors, chars]
        return torch.stack([_encode(text_corpus(chars, a, seed)[:chars], vocab) for a in range(4)])

    train, test = streams(40_000, 1), streams(8_000, 2)
    classify = arch in TEXT_CLASSES
    span = seq_len if classify else seq_len + 1

    def sample(text: Tensor, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        which = torch.randint(4, (n,), generator=g)
        starts = torch.randint(text.shape[1] - span, (n,), generator=g)
        w = _windows(text, starts, which, span)
        return (w, which) if classify else (w[:, :-1], w[:, 1:])

    sizes = {"vocab": len(vocab), "max_len": seq_len}
    if classify:
        sizes["classes"] = 4
    entry = zoo.ZOO[arch]
    return Task(
        sizes,
        lambda n, g: sample(train, n, g),
        sample(test, held, torch.Generator().manual_seed(99)),
        entry.loss_kwargs,
    )


def mnist_task(arch: str, data_dir: str | None, held: int) -> Task:
    from decorrelate.data import load_dataset

    splits = load_dataset("mnist", data_dir=data_dir, train_size=10_000)
    x, y = splits.train.x, splits.train.y
    xt, yt = splits.test.x[:held], splits.test.y[:held]
    if arch == "mlp":
        sizes = {"in_features": 784, "hidden": (128, 128), "classes": 10}
        x, xt = x.flatten(1), xt.flatten(1)
    elif arch == "conv1d":
        sizes = {"channels": 28, "classes": 10}
        x, xt = x[:, 0].transpose(1, 2), xt[:, 0].transpose(1, 2)  # 28 rows as channels
    else:
        sizes = {"channels": 1, "classes": 10}

    def train(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(len(x), (n,), generator=g)
        return x[idx], y[idx]

    return Task(sizes, train, (xt, yt), {})


def make_task(arch: str, args: argparse.Namespace) -> Task:
    """The real task of ``arch``, with only the sizes its builder takes."""
    if arch in VISION:
        task = mnist_task(arch, args.data_dir, args.held_out)
    else:
        task = text_task(arch, args.seq_len, args.held_out)
    accepted = inspect.signature(zoo.ZOO[arch].build).parameters
    task.sizes = {k: v for k, v in task.sizes.items() if k in accepted}
    return task


# ----------------------------------------------------------------------------- one cell


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


class Cell:
    """One (rule, decorrelation) configuration of an architecture, ready to step."""

    def __init__(self, arch: str, rule: str, decor: str, task: Task, seed: int, args) -> None:
        self.rule_name, self.decor = rule, decor
        self.batch_size = args.batch_size
        self.task = task
        self.loss = dc.Loss("cross-entropy", **task.loss_kwargs)
        self.model = zoo.ZOO[arch].build(seed=seed, **task.sizes)
        self.generator = torch.Generator().manual_seed(seed)  # same batches for every cell
        x, _ = task.train(1, torch.Generator().manual_seed(seed))
        if decor != "none":
            dc.nn.decorrelate(self.model, decor)
        options = {"samples": args.np_samples} if rule_class(rule).forward_only else {}
        self.rule = get_rule(rule, **options)
        self.rule.attach(self.model, self.loss, torch.Generator().manual_seed(seed), example=x)
        lr = args.lr_np if rule_class(rule).forward_only else args.lr
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr)
        self.times: list[float] = []
        self.steps = 0

    def step(self) -> None:
        x, y = self.task.train(self.batch_size, self.generator)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.rule.backward(self.model, x, y)
        self.optimizer.step()
        dc.nn.local_update(self.model)
        self.steps += 1
        if self.steps > 2:  # the first two steps build optimizer state and lazy buffers
            self.times.append(time.perf_counter() - start)

    def held_out_loss(self) -> float:
        x, y = self.task.held_out
        self.model.eval()
        with torch.no_grad():
            value = float(self.loss(self.model(x), y))
        self.model.train()
        return value


def run_group(arch: str, rules: list[str], decors: list[str], seed: int, args) -> list[dict]:
    """Every (rule, decor) cell of ``arch`` for one seed, stepped round-robin."""
    task = make_task(arch, args)
    cells: dict[tuple[str, str], Cell] = {}
    rows = []
    for decor in decors:
        for rule in rules:
            try:
                cells[(rule, decor)] = Cell(arch, rule, decor, task, seed, args)
            except Exception as exc:  # a cell today's code cannot run: report, keep going
                rows.append(
                    {
                        "arch": arch,
                        "rule": rule,
                        "decor": decor,
                        "seed": seed,
                        "error": _one_line(exc),
                    }
                )
    for _ in range(args.steps):
        for key in list(cells):
            try:
                cells[key].step()
            except Exception as exc:
                rows.append(
                    {
                        "arch": arch,
                        "rule": key[0],
                        "decor": key[1],
                        "seed": seed,
                        "error": _one_line(exc),
                    }
                )
                del cells[key]
    for (rule, decor), cell in cells.items():
        rows.append(
            {
                "arch": arch,
                "rule": rule,
                "decor": decor,
                "seed": seed,
                "loss": cell.held_out_loss(),
                "step_s": statistics.median(cell.times) if cell.times else None,
            }
        )
    return rows


# ----------------------------------------------------------------------------- memory


def measure_memory(spec: dict) -> dict:
    """Child process: the peak extra memory of one step of one cell (after 2 warm-up steps)."""
    args = argparse.Namespace(**spec["args"])
    task = make_task(spec["arch"], args)
    cell = Cell(spec["arch"], spec["rule"], spec["decor"], task, 0, args)
    cell.step()
    cell.step()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    cell.step()
    return {"peak_extra_bytes": _status("VmHWM") - before}


def memory_of(arch: str, rule: str, decor: str, args) -> float | str:
    spec = {"arch": arch, "rule": rule, "decor": decor, "args": vars(args)}
    env = {**os.environ, **MMAP_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


# ----------------------------------------------------------------------------- R memory


def state_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (what a state_dict holds)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def r_bytes(model: nn.Module) -> int:
    """Bytes of the decorrelation matrices R alone (the buffers named ``R``)."""
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith(".R"))


def r_memory(archs: list[str], args) -> list[dict]:
    """Per model: state bytes without decorrelation, with full R and with block-diagonal R
    (each also as "of which R": the rest are the decorrelators' running statistics and their
    diagnostic ring buffer of sample rows)."""
    rows = []
    for arch in archs:
        sizes = make_task(arch, args).sizes
        build = zoo.ZOO[arch].build
        row: dict = {"arch": arch, "plain": state_bytes(build(**sizes))}
        for label, options in (
            ("full R", {}),
            (f"block {args.block_size}", {"block_size": args.block_size}),
        ):
            try:
                model = dc.nn.decorrelate(build(**sizes), "scaled", **options)
                row[label] = state_bytes(model)
                row[f"{label}: of which R"] = r_bytes(model)
            except Exception as exc:
                row[label] = _one_line(exc)
                row[f"{label}: of which R"] = None
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- output


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def summarise(rows: list[dict], memory: dict, archs, rules, decors) -> list[dict]:
    table = []
    bp_time = {}
    for arch in archs:
        times = [
            r["step_s"]
            for r in rows
            if r["arch"] == arch and r["rule"] == "bp" and r["decor"] == "none" and r.get("step_s")
        ]
        bp_time[arch] = statistics.median(times) if times else None
    for arch in archs:
        for rule in rules:
            for decor in decors:
                cell = [
                    r for r in rows if (r["arch"], r["rule"], r["decor"]) == (arch, rule, decor)
                ]
                ok = [r for r in cell if "loss" in r]
                errors = sorted({r["error"] for r in cell if "error" in r})
                losses = [r["loss"] for r in ok]
                times = [r["step_s"] for r in ok if r["step_s"]]
                mem = memory.get((arch, rule, decor))
                mem_bp = memory.get((arch, "bp", "none"))
                entry = {
                    "arch": arch,
                    "rule": rule,
                    "decor": decor,
                    "seeds": len(ok),
                    "loss_mean": statistics.mean(losses) if losses else None,
                    "loss_std": statistics.stdev(losses)
                    if len(losses) > 1
                    else 0.0
                    if losses
                    else None,
                    "time_vs_bp": (statistics.median(times) / bp_time[arch])
                    if times and bp_time[arch]
                    else None,
                    "bp_step_ms": 1e3 * bp_time[arch] if bp_time[arch] else None,
                    "memory_vs_bp": (mem / mem_bp)
                    if isinstance(mem, int) and isinstance(mem_bp, int) and mem_bp > 0
                    else None,
                    "peak_extra_mib": mem / 2**20 if isinstance(mem, int) else None,
                    "error": "; ".join(errors) or (mem if isinstance(mem, str) else None),
                }
                table.append(entry)
    return table


def write_outputs(out: Path, stem: str, table: list[dict], markdown: str, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": table}, indent=1))
    with (out / f"{stem}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)


def markdown_table(table: list[dict], meta: dict) -> str:
    lines = [
        f"`{meta['command']}`",
        "",
        "| architecture | rule | decor | held-out loss (mean ± std) | time ÷ BP | memory ÷ BP "
        "| note |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in table:
        loss = "—" if r["loss_mean"] is None else f"{r['loss_mean']:.3f} ± {r['loss_std']:.3f}"
        lines.append(
            f"| {r['arch']} | {r['rule']} | {r['decor']} | {loss} | {_fmt_ratio(r['time_vs_bp'])} "
            f"| {_fmt_ratio(r['memory_vs_bp'])} | {r['error'] or ''} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_rules = [r for r in available_rules() if not issubclass(rule_class(r), FixedPointRule)]
    parser.add_argument(
        "--archs",
        default=",".join(
            a for a in zoo.ZOO if zoo.ZOO[a].requires is None or zoo.has_transformers()
        ),
    )
    parser.add_argument("--rules", default=",".join(default_rules))
    parser.add_argument("--decors", default="none,scaled,dbp")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-np", type=float, default=1e-3)
    parser.add_argument("--np-samples", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--held-out", type=int, default=1000)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory", action="store_true", help="peak step memory ÷ BP (slow)")
    parser.add_argument("--r-memory", action="store_true", help="only the R memory table")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/zoo")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure_memory(json.loads(args.child))))
        return
    archs = args.archs.split(",")
    unknown = [a for a in archs if a not in zoo.ZOO]
    if unknown:
        sys.exit(
            f"error: unknown architecture {', '.join(unknown)}; choose from {', '.join(zoo.ZOO)}"
        )
    meta = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": args.threads,
    }
    out = Path(args.out)
    if args.r_memory:
        rows = r_memory(archs, args)
        labels = [k for k in rows[0] if k != "arch"]
        md = [
            f"`{meta['command']}`",
            "",
            "| architecture | " + " | ".join(f"{k} (KiB)" for k in labels) + " |",
            "|---|" + "---:|" * len(labels),
        ]
        for r in rows:
            cells = []
            for k in labels:
                v = r[k]
                if isinstance(v, int):
                    ratio = "" if k == "plain" or "of which" in k else f" ({v / r['plain']:.1f}×)"
                    cells.append(f"{v / 1024:.1f}{ratio}")
                else:
                    cells.append("n/a" if v is None else str(v))
            md.append(f"| {r['arch']} | " + " | ".join(cells) + " |")
        write_outputs(out, "r_memory", rows, "\n".join(md) + "\n", meta)
        return
    rules, decors = args.rules.split(","), args.decors.split(",")
    if "bp" not in rules:
        rules = ["bp", *rules]  # the reference of every ratio
    rows: list[dict] = []
    for arch in archs:
        for seed in map(int, args.seeds.split(",")):
            rows += run_group(arch, rules, decors, seed, args)
    memory: dict = {}
    if args.memory:
        for arch in archs:
            for rule in rules:
                for decor in decors:
                    memory[(arch, rule, decor)] = memory_of(arch, rule, decor, args)
    table = summarise(rows, memory, archs, rules, decors)
    write_outputs(out, "zoo", table, markdown_table(table, meta), meta)


if __name__ == "__main__":
    main()
