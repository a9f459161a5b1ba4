"""The ``decorrelate`` command: train, eval, compare, plot, demo.

Training flags are generated from :class:`decorrelate.config.TrainConfig`, so every option is
settable as a flag and from ``--config FILE.yaml|json`` (flags win). A user mistake is one line on
stderr and exit code 2; a diverged run is one line and exit code 3; a multi-process run that lost
a process (killed, or silent past ``--dist-timeout``) is one line and exit code 4; a signal
(SIGINT, SIGTERM, SIGHUP) ends a run like Ctrl-C, exit code 128 + signal; never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .config import FIELDS, TrainConfig, load_config_file, make_config
from .errors import DataError, TrainingDiverged, UserError
from .schema import add_flags, given_flags

EXIT_USER = 2
EXIT_DIVERGED = 3


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not the usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER, f"{self.prog}: error: {message} (see --help)\n")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field (see :func:`decorrelate.schema.add_flags`)."""
    add_flags(parser, TrainConfig)


def _config_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None):
    """Defaults < --config file < flags < ``extra``."""
    file_values = load_config_file(args.config) if args.config else {}
    return make_config(file_values, given_flags(args, TrainConfig), extra or {})


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="decorrelate",
        description="Train networks with decorrelation and learning rules beyond backprop.",
    )
    parser.add_argument("--version", action="version", version=f"decorrelate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="train one network", description="Train one network.")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of options")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train on N local processes (launches torchrun --standalone --nproc-per-node N)",
    )
    _add_config_flags(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint", description="Evaluate a checkpoint.")
    p.add_argument("checkpoint", help="checkpoint.pt or a run directory")
    p.add_argument("--split", default="test", choices=("train", "test", "val"))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser(
        "compare",
        help="run a grid of rules x decorrelation x seeds and summarise it",
        description="Run a grid (rules x decorrelation methods x seeds x sweeps), one run at a "
        "time or --jobs at a time; write results.md/results.json and PNG plots of test accuracy "
        "vs epoch and vs seconds. "
        "Finished runs found in OUT are reused, interrupted ones resumed.",
    )
    p.add_argument("--rules", default="bp", help="comma-separated rules (default: bp)")
    p.add_argument("--decors", default="none", help="comma-separated decorrelation methods")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="also sweep a config option (repeatable), e.g. --sweep lr=1e-3,1e-4",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained in parallel worker processes, each with cpu_count/JOBS threads "
        "unless --threads is given (default: 1)",
    )
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of base options")
    p.add_argument("--quiet", action="store_true", help="print only the results table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(p)

    p = sub.add_parser("plot", help="plot runs", description="Plot test accuracy of run dirs.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="PNG prefix (default: plot in the first RUN_DIR)")

    from .cli_fixedpoint import add_parser as add_fixedpoint_parser

    add_fixedpoint_parser(sub)

    p = sub.add_parser(
        "reproduce",
        help="reproduce a paper's central experiments, ending in a claims table",
        description="Run one paper's central experiments (see --list) and judge its claims: "
        "each claim in one line, the paper's figure, ours with its seed spread, and a verdict "
        "(confirmed / refuted / inconclusive at this scale). Finished runs found in OUT are "
        "reused, so an interrupted reproduction continues. A single experiment's name (an "
        "alias, see --list) runs that experiment alone.",
    )
    p.add_argument("name", nargs="?", metavar="PAPER", help="paper or experiment (see --list)")
    p.add_argument(
        "--scale",
        choices=("quick", "cpu", "paper"),
        default=None,
        help="quick: synthetic data, seconds (a smoke test); cpu (default): this machine, up "
        "to about an hour; paper: the paper's own sizes, for a GPU or a cluster",
    )
    p.add_argument("--quick", action="store_true", help="the same as --scale quick")
    p.add_argument("--list", action="store_true", help="list the papers, experiments, aliases")
    p.add_argument(
        "--only",
        metavar="EXPERIMENT",
        default=None,
        help="run one of the paper's experiments (see --list); the claims that need the others "
        "say 'not measured'",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs in parallel, each in its own process (default: 1)",
    )
    p.add_argument("--out", default=None, help="output directory (default runs/reproduce/PAPER)")
    p.add_argument("--quiet", action="store_true", help="print only the claims and the files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="accepted for old scripts: every run keeps its checkpoint.pt (finished runs are "
        "reused from it)",
    )

    p = sub.add_parser("demo", help="the README demo: MNIST, MLP, Adam, compared side by side")
    p.add_argument("--epochs", default="3")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="runs at a time (default: both at once when there are 2 cores)",
    )
    return parser


def _split(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _launch(nproc: int, argv: Sequence[str]) -> int:
    """Re-run this ``train`` command on ``nproc`` local processes under torchrun's agent.

    The agent runs in this process (``torch.distributed.run``, as the ``torchrun`` command
    would), so a SIGTERM, SIGINT or SIGHUP sent to ``decorrelate train --nproc`` reaches it: it
    passes the signal on to the workers and waits for them (SIGKILL after its shutdown timeout,
    ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, 30 s), so no worker trains on after the command ended.
    A failed worker ends the job in one line (:func:`_report_failure`), not torchrun's traceback.
    """
    import logging

    from . import distributed

    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if distributed.launched():
        raise UserError("--nproc is for a plain launch; under torchrun leave it out")
    rest, skip = [], False
    for item in argv:  # drop --nproc N / --nproc=N, keep everything else as given
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            rest.append(item)
    command = ["--standalone", f"--nproc-per-node={nproc}", "-m", "decorrelate", *rest]
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    previous = os.environ.get(distributed.LAUNCHER_ENV)
    os.environ[distributed.LAUNCHER_ENV] = "1"  # inherited by the workers
    forwarded = [
        getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, n)
    ]
    handlers = {sig: signal.getsignal(sig) for sig in forwarded}  # the agent replaces them
    logging.disable(logging.CRITICAL)  # the agent's own log lines; we report in one line
    try:
        torchrun.run(torchrun.parse_args(command))
    except ChildFailedError as err:
        return _report_failure(err.failures)
    except SignalException as err:
        name = signal.Signals(err.sigval).name
        print(
            f"decorrelate: interrupted ({name}); the {nproc} processes were stopped and the last "
            "finished epoch's checkpoint is kept",
            file=sys.stderr,
        )
        return 128 + int(err.sigval)
    except (RuntimeError, OSError, ValueError) as err:  # the agent could not start the workers
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not launch {nproc} processes: {first}") from None
    finally:
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
        logging.disable(logging.NOTSET)
        if previous is None:
            os.environ.pop(distributed.LAUNCHER_ENV, None)
        else:
            os.environ[distributed.LAUNCHER_ENV] = previous
    return 0


def _report_failure(failures: dict[int, Any]) -> int:
    """Exit code (and, for a lost process, one line) for the workers that failed.

    A worker that stopped on an error of its own (bad input, divergence) has already said so in
    one line: its exit code is passed on (the agent then stops the others). Otherwise a worker
    was killed by a signal or gave up on a peer (:data:`decorrelate.distributed.EXIT_PEER_LOST`):
    that is reported here, with every failed rank and what ended it.
    """
    from .distributed import EXIT_PEER_LOST

    codes = {rank: failure.exitcode for rank, failure in failures.items()}
    # 128 + N is a worker that caught signal N (the agent's SIGTERM once another rank failed, or
    # one sent to it by hand): a consequence or a kill, never an error the worker reported itself
    own = [code for code in codes.values() if 0 < code < 128 and code != EXIT_PEER_LOST]
    if own:  # a worker stopped on its own error and said so; the others were stopped after it
        return max(own)
    parts = []
    for rank in sorted(failures):
        code = codes[rank]
        if code < 0:
            what = f"ended by {failures[rank].signal_name()}"
        elif code > 128 and code - 128 in {int(s) for s in signal.Signals}:
            what = f"ended by {signal.Signals(code - 128).name}"
        elif code == EXIT_PEER_LOST:
            what = "lost its peers"
        else:
            what = f"exit code {code}"
        parts.append(f"rank {rank} {what}")
    print(
        f"decorrelate: error: a peer process died or stopped responding ({'; '.join(parts)}); "
        "the last checkpoint is kept",
        file=sys.stderr,
    )
    return EXIT_PEER_LOST


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import resume, summary_line, train

    if args.nproc != 1:
        return _launch(args.nproc, args.argv)

    log = None if args.quiet else print
    progress = False if args.no_progress else None
    if args.resume:
        given = given_flags(args, TrainConfig)
        if args.config:  # flags win over the file, whichever spelling the file uses
            from_file = {
                k.strip().replace("-", "_"): v for k, v in load_config_file(args.config).items()
            }
            given = {**from_file, **given}
        result = resume(args.resume, given, log=log, progress=progress)
    else:
        result = train(
            _config_from_args(args), overwrite=args.overwrite, log=log, progress=progress
        )
    from . import distributed

    if distributed.is_main():
        print(summary_line(result))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .train import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint, split=args.split, data_dir=args.data_dir, device=args.device
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['checkpoint']} (epoch {result['epoch']}) {result['split']}: "
            f"loss {result['loss']:.4f} acc {result['acc']:.4f} on {result['examples']} examples"
        )
    return 0


def _parse_sweeps(items: Sequence[str]) -> dict[str, list[str]]:
    sweeps: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not _split(values):
            raise UserError(f"--sweep takes KEY=V1,V2,..., got {item!r}")
        if key not in FIELDS:
            raise UserError(f"--sweep: unknown option {key!r}")
        if key in ("rule", "decor", "seed", "out"):
            raise UserError(f"--sweep {key}: use --rules/--decors/--seeds/--out instead")
        sweeps[key] = _split(values)
    return sweeps


def _cmd_compare(args: argparse.Namespace) -> int:
    from .experiments.compare import run_grid

    base = _config_from_args(args)
    seeds = []
    for s in _split(args.seeds):
        try:
            seeds.append(int(s))
        except ValueError:
            raise UserError(f"--seeds takes integers, got {s!r}") from None
    out = Path(base.out or "runs/compare")
    summary = run_grid(
        base,
        rules=_split(args.rules),
        decors=_split(args.decors),
        seeds=seeds,
        sweeps=_parse_sweeps(args.sweep),
        out=out,
        log=None if args.quiet else print,
        progress=False if args.no_progress else None,
        jobs=args.jobs,
    )
    print(summary.table)
    for path in summary.files:
        print(f"wrote {path}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .checkpoint import read_metrics
    from .plotting import plot_angles, plot_curves

    runs = {Path(r).name or str(r): [read_metrics(r)] for r in args.runs}
    prefix = Path(args.out) if args.out else Path(args.runs[0]) / "plot"
    for path in [*plot_curves(runs, prefix), *plot_angles(runs, prefix)]:
        print(f"wrote {path}")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .experiments.papers import ALIASES, PAPERS, get_paper, reproduce

    if args.quick and args.scale not in (None, "quick"):
        raise UserError(f"--quick is --scale quick; give one of --quick, --scale {args.scale}")
    scale = "quick" if args.quick else args.scale or "cpu"
    if args.list:
        print(_list_papers(scale))
        return 0
    if not args.name:
        raise UserError(f"name a paper: {', '.join(PAPERS)} (see --list)")
    if args.name in ALIASES:
        if args.only is not None:
            raise UserError(f"{args.name} is one experiment already; --only names one of a paper")
        paper, only = ALIASES[args.name]
    elif args.name in PAPERS:
        paper, only = args.name, args.only
    else:
        names = [*PAPERS, *ALIASES]
        raise UserError(f"unknown paper {args.name!r}; choose one of: {', '.join(names)}")
    try:
        get_paper(paper)
    except ImportError as err:  # a paper whose module this install does not have
        raise UserError(f"paper {paper} is not available here ({err})") from None
    claims, files = reproduce(
        paper,
        Path(args.out or f"runs/reproduce/{paper}"),
        scale=scale,
        jobs=args.jobs,
        log=None if args.quiet else print,
        progress=False if args.no_progress else None,
        only=only,
    )
    print(("\n" if not args.quiet else "") + claims.markdown())
    for path in files:
        print(f"wrote {path}")
    return 0


def _list_papers(scale: str) -> str:
    """``reproduce --list``: each paper's title and experiments (at ``scale``), the aliases."""
    from .experiments.papers import ALIASES, PAPERS, get_paper

    lines = []
    for name in PAPERS:
        try:
            paper = get_paper(name)
        except ImportError as err:  # a paper whose module is not in this install
            lines.append(f"{name}: not available ({err})")
            continue
        plans = paper.plans(scale, Path("runs/reproduce") / name)
        lines.append(f"{name}: {paper.title}")
        lines.append(f"  experiments ({scale} scale): {', '.join(p.name for p in plans)}")
    if ALIASES:
        lines.append("aliases (one experiment of a paper):")
        lines += [f"  {alias}: {paper} {plan}" for alias, (paper, plan) in ALIASES.items()]
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .experiments.compare import run_demo

    summary = run_demo(
        epochs=args.epochs,
        out=Path(args.out),
        data_dir=args.data_dir,
        progress=False if args.no_progress else None,
        jobs=args.jobs,
    )
    print(summary.table)
    for path in summary.files:
        print(f"wrote {path}")
    return 0


def _cmd_fixedpoint(args: argparse.Namespace) -> int:
    from .cli_fixedpoint import run

    return run(args)


COMMANDS = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "compare": _cmd_compare,
    "plot": _cmd_plot,
    "reproduce": _cmd_reproduce,
    "fixedpoint": _cmd_fixedpoint,
    "demo": _cmd_demo,
}


class _Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) during ``train``: unwind like Ctrl-C, so files are left complete."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated(signum)


def _line_buffered() -> None:
    """Print every line as it is made, also into a pipe or a file (a log, ``make demo | tee``),
    where Python would otherwise hold the lines of a long run back in its buffer."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        with contextlib.suppress(ValueError, OSError):  # a detached stream stays as it is
            reconfigure(line_buffering=True)


def main(argv: Sequence[str] | None = None) -> int:
    from . import distributed

    parser = build_parser()
    _line_buffered()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return EXIT_USER
    handlers = {}
    in_main_thread = threading.current_thread() is threading.main_thread()
    if args.command == "train" and getattr(args, "nproc", 1) == 1 and in_main_thread:
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                handlers[sig] = signal.signal(sig, _raise_terminated)
    code = 1  # an unexpected exception propagates with its traceback
    try:
        code = _run_command(args)
        return code
    finally:
        distributed.teardown()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if distributed.broken():  # the group is gone: do not wait in its destructor
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _run_command(args: argparse.Namespace) -> int:
    """Run the command; every expected failure becomes one line and an exit code."""
    from . import distributed

    say = distributed.is_main  # under torchrun every rank fails alike; one of them says so
    try:
        return COMMANDS[args.command](args)
    except (UserError, DataError) as err:
        if say():
            print(f"decorrelate: error: {err}", file=sys.stderr)
        return EXIT_USER
    except TrainingDiverged as err:
        if say():
            print(f"decorrelate: diverged: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt as err:
        signum = err.signum if isinstance(err, _Terminated) else int(signal.SIGINT)
        if distributed.launched():
            distributed.mark_failed()  # the peers are being stopped too: no closing barrier
        if say() and not distributed.under_launcher():  # the launcher says it once for all
            print(
                "decorrelate: interrupted; the last finished epoch's checkpoint is kept",
                file=sys.stderr,
            )
        return 128 + signum
    except Exception as err:
        if not distributed.is_peer_failure(err):
            raise
        distributed.mark_failed()
        if not distributed.under_launcher():
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(
                f"decorrelate: error: a peer process died or stopped responding (rank "
                f"{distributed.rank()} saw: {first[:200]}); the last checkpoint is kept",
                file=sys.stderr,
            )
        return distributed.EXIT_PEER_LOST


if __name__ == "__main__":
    sys.exit(main())
