"""The one training loop, shared by every learning rule and every decorrelation method.

Per step: ``rule.backward`` fills ``.grad`` → ``optimizer.step()`` → decorrelators update from
their stored subsample. Per epoch (and once before training, as epoch 0): evaluate, append a row to
``metrics.jsonl``, write ``checkpoint.pt`` atomically. Everything random comes from generators
derived from the run seed, so the same seed gives the same metrics on CPU, and resuming from a
checkpoint continues bit-identically.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed as dist
from .config import TrainConfig, code_references, make_config, save_config, without_code
from .data import Dataset, DataSplits, epoch_order, load_dataset
from .errors import TrainingDiverged, UserError
from .losses import Loss, as_loss
from .metrics import update_angles
from .models import build_model
from .nn import decorrelators, local_stats, local_update
from .rules import LearningRule, rule_class
from .seeding import derive_seed, make_generator

Log = Callable[[str], None]

#: Options that may differ when a run is resumed (they do not change the maths).
RESUME_OVERRIDES = (
    "epochs",
    "device",
    "threads",
    "data_dir",
    "out",
    "dist_timeout",
    "dist_backend",
    "max_loss_growth",
)


# ----------------------------------------------------------------------------- building blocks


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda if available else cpu; asking for cuda without one is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available; use --device cpu")
    return torch.device(name)


def load_data(config: TrainConfig) -> DataSplits:
    """The dataset splits a config asks for."""
    return load_dataset(
        config.dataset,
        data_dir=config.data_dir,
        val_split=config.val_split,
        train_size=config.train_size,
        normalize=config.normalize,
        synthetic_shape=config.synthetic_shape,
        synthetic_classes=config.synthetic_classes,
        synthetic_train=config.synthetic_train,
        synthetic_test=config.synthetic_test,
    )


def build_network(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model of ``config`` with decorrelators inserted, initialised from the run seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "model"))
        model = build_model(
            config.model,
            input_shape,
            num_classes,
            widths=config.widths,
            channels=config.channels,
            activation=config.activation,
            leaky_slope=config.leaky_slope,
            weight_init=config.weight_init,
        )
    if config.decor != "none":
        from .nn import decorrelate

        options: dict[str, Any] = {
            "sample_frac": config.decor_sample_frac,
            "demean": config.decor_demean,
            "max_samples": config.decor_max_samples,
            "block_above": config.decor_block_above,
            "seed": config.seed,
        }
        if config.decor_var_floor is not None:
            options["var_floor"] = config.decor_var_floor
        if config.decor_lr is not None:
            options["lr"] = config.decor_lr
        if config.decor_kappa is not None:
            options["kappa"] = config.decor_kappa
        if config.decor_every is not None:
            options["every"] = config.decor_every
        if config.decor_block_size is not None:
            options["block_size"] = config.decor_block_size
        exclude = [name for name in config.decor_exclude.split(",") if name]
        decorrelate(model, config.decor, exclude=exclude, **options)
    return model


def build_parts(
    config: TrainConfig,
    splits: DataSplits,
    device: torch.device,
    loss: Loss | str | Callable[..., Tensor] | None = None,
) -> tuple[nn.Module, LearningRule, Loss]:
    """Model (with decorrelators) on ``device``, its attached rule, and the loss.

    Training and :func:`evaluate_checkpoint` both build through here, so a checkpoint's buffers
    (decorrelation matrices, feedback matrices) always find their modules. ``loss`` (a Loss, a
    name or a callable) replaces ``config.loss``.
    """
    model = build_network(config, splits.train.input_shape, splits.train.num_classes).to(device)
    loss = as_loss(config.loss if loss is None else loss)
    rule = rule_class(config.rule).from_config(config)
    if config.alignment_score:
        if not type(rule).exact_gradient:
            raise UserError("--alignment-score measures BP training; use it with --rule bp")
        from .align import AlignmentProbe

        rule = AlignmentProbe()
    example = splits.train.x[:1].to(device)
    rule.attach(model, loss, make_generator(config.seed, "rule", device=device), example=example)
    return model, rule, loss


def build_optimizer(config: TrainConfig, params: Any) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(
        params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay
    )


def build_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    if config.lr_schedule == "constant":
        return None
    total = max(1, config.epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, loss: Loss, batch_size: int) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``data`` (eval mode, no graph).

    Under torch.distributed each rank evaluates its contiguous share and the sums are
    all-reduced, so every rank returns the numbers of the whole set. The model may return a
    dict/tuple/``ModelOutput`` (``loss.select`` picks the output); with token-level targets
    [N, T] both numbers are over the non-ignored tokens (``loss.count``).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=data.x.device)  # loss, correct, targets
    for x, y in data.batches(batch_size, order=dist.shard_order(len(data))):
        out = loss.select(model(x))
        sums[0] += loss(out, y, reduction="sum").double()
        sums[1] += loss.correct(out, y)
        sums[2] += loss.count(y)
    model.train(was_training)
    total_loss, correct, n = dist.all_sum(sums).tolist()
    n = max(1.0, n)
    return total_loss / n, correct / n


def _decor_hooks(model: nn.Module) -> tuple[Callable[[], None] | None, Callable[[], dict]]:
    """The model's local-update and stats functions, if it contains decorrelators."""
    if not decorrelators(model):
        return None, dict
    return (lambda: local_update(model)), (lambda: local_stats(model))


# ----------------------------------------------------------------------------- the trainer


@dataclass
class RunResult:
    """What a finished run returns: where it lives and its per-epoch metrics."""

    out: Path
    config: TrainConfig
    history: list[dict[str, Any]]

    @property
    def best_test_acc(self) -> float:
        return max(row["test_acc"] for row in self.history)

    @property
    def final_test_acc(self) -> float:
        return self.history[-1]["test_acc"]

    @property
    def seconds(self) -> float:
        return self.history[-1]["seconds"]


class Trainer:
    """Holds everything of one run: data, model, rule, optimizer, history.

    Most users call :func:`train`; the class exists so benchmarks and tests can drive single
    epochs (``train_epoch``) and so resuming is one method (``load``). ``loss`` (a
    :class:`~decorrelate.losses.Loss`, a loss name or a callable ``fn(output, target)``)
    replaces ``config.loss``; config.json still names ``config.loss``, so pass the same ``loss``
    again to resume such a run.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        data: DataSplits | None = None,
        log: Log | None = print,
        progress: bool | None = None,
        loss: Loss | str | Callable[..., Tensor] | None = None,
    ) -> None:
        self.config = config
        dist.setup(config.device, config.dist_timeout, config.dist_backend)  # no-op unless launched
        self.rank, self.world = dist.rank(), dist.world_size()
        self.log = (log if self.rank == 0 else None) or (lambda _msg: None)
        self.progress = progress if self.rank == 0 else False
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.device = dist.local_device(resolve_device(config.device))
        splits = data if data is not None else load_data(config)
        self.train_data = splits.train.to(self.device)
        self.test_data = splits.test.to(self.device)
        self.val_data = splits.val.to(self.device) if splits.val is not None else None
        self.model, self.rule, self.loss = build_parts(config, splits, self.device, loss)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(config, self.params)
        # Several processes: autograd rules run through DDP (it all-reduces .grad during the
        # backward pass); rules that write .grad themselves are all-reduced after backward().
        self.forward_model: nn.Module = self.model
        self.sync_grads = False
        if self.world > 1:
            dist.check_batch_size(config.batch_size, self.world)
            if self.rule.ddp_autograd:
                from torch.nn.parallel import DistributedDataParallel

                ids = [self.device.index] if self.device.type == "cuda" else None
                # R is kept identical on every rank by its gathered update; broadcasting the
                # buffers from rank 0 at every forward would only cost d² per layer per step.
                params = inspect.signature(DistributedDataParallel).parameters
                no_sync = (
                    {"forward_sync_buffers": False}
                    if "forward_sync_buffers" in params
                    else {"broadcast_buffers": False}  # torch before 2.13
                )
                self.forward_model = DistributedDataParallel(self.model, device_ids=ids, **no_sync)
            else:
                self.sync_grads = True
        self.steps_per_epoch = self.train_data.num_batches(config.batch_size)
        self.scheduler = build_scheduler(config, self.optimizer, self.steps_per_epoch)
        self._local_update, self._local_stats = _decor_hooks(self.model)
        self.epoch = -1  # last completed epoch; 0 = evaluated untrained
        self.seconds = 0.0  # cumulative training time, excluding evaluation
        self.history: list[dict[str, Any]] = []
        self.alignment: list[dict[str, Any]] = []  # every --alignment-every steps

    # -------------------------------------------------------------- one epoch
    def train_epoch(self, epoch: int, max_steps: int | None = None) -> dict[str, float]:
        """Train one epoch (data order from ``(seed, epoch)``); running loss and accuracy."""
        cfg = self.config
        model, rule, optimizer, scheduler = self.model, self.rule, self.optimizer, self.scheduler
        local_update = self._local_update
        align_every = cfg.alignment_every
        order = epoch_order(len(self.train_data), cfg.seed, epoch).to(self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = torch.zeros((), dtype=torch.int64, device=self.device)  # targets, not ignored
        # A sync per step is free on CPU; on a GPU check for divergence less often.
        check_every = 1 if self.device.type == "cpu" else 20
        limit = self.loss_limit()
        model.train()
        total = self.steps_per_epoch if max_steps is None else min(max_steps, self.steps_per_epoch)
        bar = tqdm(
            total=total,
            desc=f"epoch {epoch}",
            leave=False,
            disable=True if self.progress is False else None,
            dynamic_ncols=True,
        )
        reduce = dist.average_grads if self.world > 1 else None
        start = time.perf_counter()
        try:
            for step, (x, y, shard) in enumerate(
                dist.shard_batches(self.train_data, cfg.batch_size, order)
            ):
                if step == total:
                    break
                optimizer.zero_grad(set_to_none=True)
                if shard is not None:  # exact global mean after averaging over ranks
                    self.loss.scale = shard.size * self.world / shard.total
                with dist.batch_shard(shard):
                    out = rule.backward(self.forward_model, x, y)
                if self.sync_grads:
                    dist.average_grads(self.params)
                if step % check_every == 0:
                    self._check_loss(epoch, step, out.loss / self.loss.scale, limit)
                global_step = (epoch - 1) * self.steps_per_epoch + step
                if align_every and global_step % align_every == 0:
                    row = {"epoch": epoch, "step": global_step}
                    row.update(update_angles(model, rule, x, y, reduce=reduce))
                    self.alignment.append(row)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if local_update is not None:
                    local_update()
                count = self.loss.count(y)
                loss_sum += out.loss.double() / self.loss.scale * count
                correct += self.loss.correct(out.output, y)
                seen += count
                bar.update()
        finally:
            self.loss.scale = 1.0
        totals = dist.all_sum(torch.stack([loss_sum, correct.double(), seen.double()]))
        loss_sum, correct, seen = totals[0], int(totals[1]), int(totals[2])
        mean_loss = loss_sum / max(1, seen)
        if not torch.isfinite(mean_loss) or mean_loss > limit:  # same on every rank
            self._diverged(epoch, total - 1, mean_loss, what="epoch's mean training loss")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        bar.close()
        return {
            "train_loss": loss_sum.item() / max(1, seen),
            "train_acc": correct / max(1, seen),
            "epoch_seconds": elapsed,
            "steps": total,
        }

    def loss_limit(self) -> float:
        """The training loss past which the run has diverged although it is still finite.

        ``max_loss_growth`` times the loss of the untrained network (epoch 0's ``train_loss``,
        the mean over the whole training set): a run whose loss grew that much is not
        learning, however long it would go on (Adam at lr 1e6 reaches 1e15 and stays finite).
        ``inf`` when the check is off (0) or before epoch 0 has been measured.
        """
        growth = self.config.max_loss_growth
        start = self.history[0]["train_loss"] if self.history else None
        if not growth or start is None or not start > 0:
            return math.inf
        return growth * start

    def _check_loss(self, epoch: int, step: int, loss: Tensor, limit: float) -> None:
        """Stop on a non-finite loss or one past ``limit``; under torch.distributed every rank
        stops at the same step (the verdicts are summed)."""
        bad = torch.logical_or(loss.isfinite().logical_not(), loss > limit)
        if dist.all_sum(bad.double().reshape(1)).item() > 0:  # on some rank, at this step
            self._diverged(epoch, step, loss if bad else None)

    def _diverged(
        self,
        epoch: int,
        step: int,
        value: Tensor | None,
        what: str = "training loss",
    ) -> NoReturn:
        """Raise :class:`TrainingDiverged`, naming the loss, the rule and what to lower."""
        if value is None:
            happened = f"{what} diverged on another process"
        elif torch.isfinite(value):
            start = self.history[0]["train_loss"]
            happened = (
                f"{what} grew to {value.item():.3g}, over {self.config.max_loss_growth:g}x its "
                f"{start:.4g} before training (--max-loss-growth)"
            )
        else:
            happened = f"{what} became {value.item()}"
        raise TrainingDiverged(
            f"{happened} at epoch {epoch}, step {step} "
            f"(rule {self.config.rule}, {self.config.optimizer} lr {self.config.lr:g}); "
            f"lower --lr; the last good checkpoint is kept"
        )

    # -------------------------------------------------------------- evaluation row
    def evaluate_row(self, epoch: int, train_stats: dict[str, float] | None) -> dict[str, Any]:
        cfg = self.config
        eval_start = time.perf_counter()
        if train_stats is None:  # epoch 0: the untrained network, measured on the full train set
            train_loss, train_acc = evaluate(
                self.model, self.train_data, self.loss, cfg.eval_batch_size
            )
            train_stats = {
                "train_loss": train_loss,
                "train_acc": train_acc,
                "epoch_seconds": 0.0,
                "steps": 0,
            }
        test_loss, test_acc = evaluate(self.model, self.test_data, self.loss, cfg.eval_batch_size)
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": train_stats["train_loss"],
            "train_acc": train_stats["train_acc"],
            "test_loss": test_loss,
            "test_acc": test_acc,
        }
        if self.val_data is not None:
            row["val_loss"], row["val_acc"] = evaluate(
                self.model, self.val_data, self.loss, cfg.eval_batch_size
            )
        row["seconds"] = self.seconds
        row["epoch_seconds"] = train_stats["epoch_seconds"]
        row["steps"] = train_stats["steps"]
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        row.update(self._local_stats())
        row.update(self.rule.diagnostics())
        row.update(_epoch_means([r for r in self.alignment if r["epoch"] == epoch]))
        row["eval_seconds"] = time.perf_counter() - eval_start
        return row

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "seconds": self.seconds,
            "history": self.history,
            "alignment": self.alignment,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rule": self.rule.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict[str, Any], where: str | Path = "the checkpoint") -> None:
        """Restore a :meth:`state_dict`; a state that does not fit this run is one UserError."""
        ckpt.load_weights(self.model, state["model"], where)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler") is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            self.rule.load_state_dict(state["rule"])
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"the training state in {where} does not match its config: {first}"
            ) from None
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.epoch = state["epoch"]
        self.seconds = state["seconds"]
        self.history = list(state["history"])
        self.alignment = list(state.get("alignment", []))

    def save(self, out: Path) -> None:
        """Checkpoint first, then metrics: a metrics row never exists without its checkpoint.

        Under torch.distributed rank 0 writes and the others wait for it.
        """
        if self.rank == 0:
            ckpt.save_checkpoint(out / ckpt.CHECKPOINT, self.state_dict())
            ckpt.write_metrics(out / ckpt.METRICS, self.history)
            if self.alignment:
                ckpt.write_metrics(out / ckpt.ALIGNMENT, self.alignment)
        dist.barrier()

    # -------------------------------------------------------------- the loop
    def fit(self, out: Path) -> RunResult:
        """Train up to ``config.epochs``, evaluating and checkpointing after every epoch."""
        cfg = self.config
        if self.epoch < 0:
            self.epoch = 0
            self._record(self.evaluate_row(0, None), out)
        for epoch in range(self.epoch + 1, cfg.epochs + 1):
            stats = self.train_epoch(epoch)
            self.seconds += stats["epoch_seconds"]
            self.epoch = epoch
            self._record(self.evaluate_row(epoch, stats), out)
        return RunResult(out, cfg, self.history)

    def _record(self, row: dict[str, Any], out: Path) -> None:
        self.history.append(row)
        self.save(out)
        self.log(format_row(row, self.config.epochs))


def _epoch_means(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of each ``angle/...`` value over one epoch's alignment measurements."""
    keys = [k for k in (rows[0] if rows else {}) if k.startswith("angle/")]
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def format_row(row: dict[str, Any], epochs: int) -> str:
    text = (
        f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} "
        f"acc {row['train_acc']:.4f}  test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f}"
    )
    if "val_acc" in row:
        text += f"  val acc {row['val_acc']:.4f}"
    return text + f"  [{row['seconds']:.1f}s]"


def summary_line(result: RunResult) -> str:
    cfg = result.config
    return (
        f"done: {cfg.dataset} {cfg.model} rule={cfg.rule} decor={cfg.decor} seed={cfg.seed} "
        f"epochs={result.history[-1]['epoch']} best_test_acc={result.best_test_acc:.4f} "
        f"final_test_acc={result.final_test_acc:.4f} train_seconds={result.seconds:.1f} "
        f"out={result.out}"
    )


# ----------------------------------------------------------------------------- entry points


def train(
    config: TrainConfig | dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
    log: Log | None = print,
    progress: bool | None = None,
    data: DataSplits | None = None,
    loss: Loss | str | Callable[..., Tensor] | None = None,
) -> RunResult:
    """Train a fresh run described by ``config`` and write its directory.

    ``loss`` replaces ``config.loss`` (see :class:`Trainer`).

    Refuses to overwrite a directory that already holds a checkpoint unless ``overwrite``
    (use :func:`resume` to continue one).
    """
    cfg = config if isinstance(config, TrainConfig) else make_config(config or {})
    dist.setup(cfg.device, cfg.dist_timeout, cfg.dist_backend)
    out = ckpt.prepare_out_dir(cfg.out or cfg.default_out())

    def no_run_there() -> None:
        if (out / ckpt.CHECKPOINT).exists() and not overwrite:
            raise UserError(
                f"{out} already holds a run; continue it with --resume {out} or pass --overwrite"
            )

    lock = _claim(out, no_run_there)  # every rank has its answer before rank 0 writes anything
    try:
        cfg = cfg.replace(out=str(out))
        trainer = Trainer(cfg, data=data, log=log, progress=progress, loss=loss)
        cfg = _resolved(cfg, trainer)
        trainer.config = cfg
        if dist.is_main():
            save_config(cfg, out / ckpt.CONFIG)
        return trainer.fit(out)
    finally:
        if lock is not None:
            lock.release()


def resume(
    run_dir: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    log: Log | None = print,
    progress: bool | None = None,
    data: DataSplits | None = None,
    loss: Loss | str | Callable[..., Tensor] | None = None,
) -> RunResult:
    """Continue the run in ``run_dir`` from its checkpoint (optionally to more ``epochs``).

    ``loss``: the one the run was trained with, if it was not ``config.loss`` (see
    :class:`Trainer`).

    ``overrides`` are what the user gave (command line, their own config file). A noise sampler
    the checkpoint names by import path (``module:function``) is imported only when the
    overrides name the same one: a checkpoint never makes us import code by itself.
    """
    path = Path(run_dir)
    state = ckpt.load_checkpoint(path)
    overrides = {k.replace("-", "_"): v for k, v in (overrides or {}).items()}
    saved = state["config"]
    # Compare resolved values (``--seed 0`` is the saved 0, ``--rule danp`` is anp + copi).
    before = make_config(saved)
    cfg = make_config(saved, overrides, {"out": str(path)})
    changed = [
        name.replace("_", "-")
        for name in before.to_dict()
        if name not in RESUME_OVERRIDES and getattr(cfg, name) != getattr(before, name)
    ]
    if changed:
        raise UserError(
            f"cannot change {', '.join(changed)} when resuming; only "
            f"{', '.join(n.replace('_', '-') for n in RESUME_OVERRIDES)} may differ"
        )
    for name, spec in code_references(cfg).items():
        if overrides.get(name) != spec:
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"{path} names the sampler {spec!r} ({flag}), which would import and run that "
                f"code; a checkpoint's config never does that by itself: to resume, give "
                f"{flag} {spec} yourself"
            )
    out = ckpt.prepare_out_dir(cfg.out)
    dist.setup(cfg.device, cfg.dist_timeout, cfg.dist_backend)
    seen = _file_identity(out / ckpt.CHECKPOINT)
    lock = _claim(out)
    try:
        if _file_identity(out / ckpt.CHECKPOINT) != seen:  # a run finished in between: reread
            state = ckpt.load_checkpoint(path)
        trainer = Trainer(cfg, data=data, log=log, progress=progress, loss=loss)
        trainer.load_state_dict(state, where=out / ckpt.CHECKPOINT)
        if dist.is_main():
            save_config(cfg, out / ckpt.CONFIG)
        if trainer.epoch >= cfg.epochs and log:
            log(
                f"{out} already trained for {trainer.epoch} epochs; pass --epochs N to train longer"
            )
        return trainer.fit(out)
    finally:
        if lock is not None:
            lock.release()


def _claim(out: Path, check: Callable[[], None] | None = None) -> ckpt.RunLock | None:
    """Lock ``out`` for this run (rank 0 alone; ``check`` runs under the lock).

    Every rank gets rank 0's verdict, so under torch.distributed all ranks stop with the same
    one-line error when the directory is taken. Returns the held lock (None on other ranks).
    """
    lock, error = None, None
    if dist.is_main():
        lock = ckpt.RunLock(out)
        try:
            lock.acquire()
            if check is not None:
                check()
        except UserError as err:
            lock.release()
            lock, error = None, str(err)
    error = dist.from_main(error)
    if error is not None:
        if lock is not None:
            lock.release()
        raise UserError(error)
    return lock


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime, size) of ``path``: an atomic rename over it changes the inode."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _resolved(cfg: TrainConfig, trainer: Trainer) -> TrainConfig:
    """Fill model-specific defaults (widths, channels) so config.json states what ran."""
    from .models import DEFAULT_CHANNELS, DEFAULT_WIDTHS

    changes: dict[str, Any] = {}
    if cfg.widths is None:
        changes["widths"] = list(DEFAULT_WIDTHS[cfg.model])
    if cfg.channels is None and cfg.model in ("convnet", "convnet-ntk"):
        changes["channels"] = list(DEFAULT_CHANNELS)
    if cfg.device == "auto":
        changes["device"] = trainer.device.type
    return cfg.replace(**changes) if changes else cfg


def evaluate_checkpoint(
    path: str | Path,
    *,
    split: str = "test",
    data_dir: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Load a checkpoint (file or run directory) and evaluate it on ``split``."""
    state = ckpt.load_checkpoint(path)
    overrides: dict[str, Any] = {"device": device}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    # Evaluation runs no training step: code the checkpoint's config names (a noise sampler)
    # is never imported (a checkpoint never makes us import code).
    cfg = without_code(make_config(state["config"], overrides))
    splits = load_data(cfg)
    data = {"train": splits.train, "test": splits.test, "val": splits.val}.get(split)
    if data is None:
        raise UserError(
            f"split {split!r} is not available (choose train, test, or val when the run used "
            "--val-split)"
        )
    dev = resolve_device(cfg.device)
    model, _, loss_fn = build_parts(cfg, splits, dev)
    ckpt.load_weights(model, state["model"], path)
    loss, acc = evaluate(model, data.to(dev), loss_fn, batch_size or cfg.eval_batch_size)
    return {
        "checkpoint": str(path),
        "epoch": state["epoch"],
        "split": split,
        "loss": loss,
        "acc": acc,
        "examples": len(data),
    }
