"""Multi-process training on ``torch.distributed``: setup, batch shards, hand-written gradients.

Launch with PyTorch's own launcher (or ``decorrelate train --nproc N``, which calls it)::

    torchrun --nproc-per-node 2 -m decorrelate train --rule anp --decor copi ...

Every rank holds the whole model and the whole in-memory dataset; each global batch (the
``--batch-size`` the user asked for) is cut into one contiguous shard per rank
(:func:`shard_bounds`). What keeps the ranks identical:

* **gradients** — autograd rules (``bp``, ``fa``, ``dfa``, ``align-prop``) run their forward
  through :class:`~torch.nn.parallel.DistributedDataParallel`, which all-reduces ``.grad`` during
  the backward pass; rules that write ``.grad`` themselves (node perturbation, Align, last-layer)
  are all-reduced explicitly by :func:`average_grads`. Shards of unequal size (a last, odd
  batch) are weighted exactly: the loss of rank r is scaled by n_r·W/N
  (:attr:`decorrelate.context.StepContext.loss_scale`, which the loop passes to the rule), so
  the average over ranks is the global batch mean.
* **decorrelators** — each rank takes the part of the single-process subsample that falls in its
  shard (the :class:`~decorrelate.context.BatchShard` of the step's context, handed to them by
  :func:`decorrelate.nn.step_context`) and the rows are all-gathered before the update
  (:func:`decorrelate.nn.sampling.gather_rows`), so every R gets the identical update.
* **noise** — node-perturbation noise is drawn for the global batch (the context's shard) from
  the run's seeded generator on every rank and each rank adds its own rows: the same noise a
  single process would use, no two samples sharing it.
* feedback matrices and frozen twins come from the run seed, identical everywhere.

Rank 0 alone logs, plots and writes checkpoints. Collectives time out after ``--dist-timeout``
seconds, so a rank that died ends the job with an error instead of a hang. After such a failure
(:func:`is_peer_failure`) a rank leaves without waiting for the others (:func:`mark_failed`):
the group is broken, and one more collective would only fail again.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .context import BatchShard as BatchShard  # where a rank's rows lie; re-exported
from .errors import UserError


def launched() -> bool:
    """True inside a multi-process launch (torchrun sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (torchrun's ``RANK`` before the group is joined; 0 alone)."""
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that logs and writes files."""
    return rank() == 0


def setup(device: str = "auto", timeout: float = 300.0, backend: str = "auto") -> None:
    """Join the process group torchrun describes in the environment (no-op without one).

    ``backend`` auto: nccl when training on CUDA, gloo otherwise. Each rank then uses GPU
    ``LOCAL_RANK`` (see :func:`local_device`).
    """
    global _FAILED
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    _FAILED = False
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed support")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))


#: Set in the workers by ``decorrelate train --nproc`` (:func:`decorrelate.cli.launch`): the
#: launcher reports a lost peer or an interruption itself, in one line for the whole job.
LAUNCHER_ENV = "DECORRELATE_LAUNCHER"

#: Exit code of a rank that gave up because a peer died or stopped responding.
EXIT_PEER_LOST = 4

_FAILED = False


def mark_failed() -> None:
    """The group is broken (a peer died, a collective timed out, or we were interrupted).

    :func:`teardown` then leaves without its barrier, which could only fail or hang again.
    """
    global _FAILED
    _FAILED = True


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank died or went silent.

    Only meaningful inside a multi-process group; c10d raises :class:`DistError` subclasses
    or, for gloo's transport, plain RuntimeErrors naming the lost connection or the timeout.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        marker in text
        for marker in (
            "Connection closed by peer",
            "Connection reset by peer",
            "Broken pipe",
            "Timed out waiting",
            "timed out",
            "gloo/transport",
            "NCCL communicator",
        )
    )


def under_launcher() -> bool:
    """True in a worker started by ``decorrelate train --nproc`` (see :data:`LAUNCHER_ENV`)."""
    return launched() and os.environ.get(LAUNCHER_ENV) == "1"


def teardown() -> None:
    """Leave the process group; every rank waits for the others first.

    Without the barrier a rank that finishes early tears its connections down while a peer is
    still in a collective or in its own teardown, and gloo can abort that peer at exit. After a
    failure (:func:`mark_failed`) there is no barrier: the peers are gone or broken.
    """
    if dist.is_available() and dist.is_initialized() and not _FAILED:
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def broken() -> bool:
    """Whether :func:`mark_failed` was called: this process should leave at once.

    A normal interpreter exit would wait (tens of seconds) in the process group's destructor
    for the peer that is gone; :func:`decorrelate.cli.main` then ends with ``os._exit``.
    """
    return _FAILED


def local_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for CUDA under a launch, else ``device``."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    if active():
        dist.barrier()


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself alone.

    Used for decisions only rank 0 can make (it alone locks and writes the run directory), so
    that every rank acts on the same answer.
    """
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- batch shards


def shard_bounds(total: int, world: int, rank: int) -> tuple[int, int]:
    """(offset, size) of rank ``rank``'s contiguous part of ``total`` rows (sizes differ ≤ 1)."""
    base, extra = divmod(total, world)
    size = base + (1 if rank < extra else 0)
    offset = rank * base + min(rank, extra)
    return offset, size


def shard_order(total: int) -> Tensor | None:
    """Indices of this rank's contiguous share of ``total`` examples (None: all, one process)."""
    offset, size = shard_bounds(total, world_size(), rank())
    return None if size == total else torch.arange(offset, offset + size)


def shard_batches(
    data: Any, batch_size: int, order: Tensor
) -> Iterator[tuple[Tensor, Tensor, BatchShard | None]]:
    """This rank's part of each global batch of ``data`` in ``order``, and where it lies.

    One process: the plain batches of :meth:`decorrelate.data.Dataset.batches` with shard None.
    """
    world = world_size()
    if world == 1:
        for x, y in data.batches(batch_size, order=order):
            yield x, y, None
        return
    check_batch_size(batch_size, world)
    me = rank()
    for start in range(0, order.numel(), batch_size):
        idx = order[start : start + batch_size].to(data.x.device)
        offset, size = shard_bounds(idx.numel(), world, me)
        local = idx[offset : offset + size]
        yield data.x[local], data.y[local], BatchShard(offset, size, idx.numel())


def check_batch_size(batch_size: int, world: int) -> None:
    if batch_size < world:
        raise UserError(
            f"--batch-size {batch_size} is smaller than the {world} processes: every rank needs "
            "at least one sample of each global batch"
        )


# ----------------------------------------------------------------------------- gradients


def average_grads(params: Sequence[Tensor]) -> int:
    """All-reduce (mean over ranks) the ``.grad`` of ``params`` in one flat buffer.

    For rules that fill ``.grad`` by hand. Parameters without a gradient on every rank are
    skipped (all ranks run the same rule, so they agree). Returns the bytes all-reduced.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not active() or not grads:
        return 0
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    start = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[start : start + n].view_as(g))
        start += n
    return flat.numel() * flat.element_size()


def all_sum(values: Tensor) -> Tensor:
    """Sum of ``values`` over ranks (in place; the tensor itself without a process group)."""
    if active():
        dist.all_reduce(values)
    return values
