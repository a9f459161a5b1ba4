"""Choosing the subsample a decorrelator learns from, and gathering conv patches cheaply.

R is updated from ⌊sample_frac·B⌋ + 1 batch elements (paper 1's authors use ≈10 %; the node
perturbation authors the whole batch). For a convolution every spatial position of those
elements is a sample (a C_in·kh·kw patch); a random subset of at most ``max_samples`` positions
(or all of them, ``max_samples=None``, as the authors) is gathered directly from the input with
one flat index, which costs O(n·d) and never pads or copies an image.

The choice is random but reproducible: it is drawn from a generator seeded by the run seed, the
layer name and the update count, so a resumed run draws exactly the same subsamples.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..context import BatchShard
from ..layers.kinds import conv_explicit_pad
from ..seeding import make_generator


def subsample_size(total: int, frac: float) -> int:
    """⌊frac·total⌋ + 1, at most ``total``."""
    return min(total, math.floor(frac * total) + 1)


def global_rows(
    shard: BatchShard | None, batch: int, rows: int, per_sample: int
) -> tuple[int, int]:
    """(offset, total) of this rank's ``rows`` within the global batch's rows.

    ``shard``: where this rank's batch lies in the global batch (the step context's, see
    :func:`decorrelate.nn.step_context`). Without one, or when the input is not the sharded
    batch (``batch`` differs from the shard's size), the rows are all there is: (0, rows).
    """
    where = None if shard is None else shard.rows(batch, per_sample)
    return (0, rows) if where is None else where


def choose(total: int, count: int, device: torch.device, seed: int, *tags: object) -> Tensor:
    """``count`` distinct indices in ``range(total)``, reproducible from (seed, *tags)."""
    if count >= total:
        return torch.arange(total, device=device)
    gen = make_generator(seed, *tags)
    return torch.randperm(total, generator=gen)[:count].to(device)


def conv_pads(conv: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """(before, after) zero padding of ``conv`` per spatial dim, in the input's dim order.

    'same' puts the odd extra row/column at the end, as PyTorch's convolution does. Only
    meaningful for ``padding_mode='zeros'`` (other modes are padded explicitly first).
    """
    if conv.padding == "valid":
        return [(0, 0)] * len(conv.kernel_size)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in conv.padding]


def conv_patches(
    x: Tensor,
    conv: nn.modules.conv._ConvNd,
    count: int | None,
    seed: int,
    step: int,
    images: Tensor | None = None,
    image_offset: int | None = None,
) -> Tensor:
    """``count`` random patches [count, C·k₁·…·kₙ] of batch ``x``, as ``conv`` sees them.

    Any ``nn.Conv1d``/``Conv2d``/``Conv3d``: stride, dilation, every padding mode, groups (the
    patch spans all C input channels, in channel order, so group g's inputs are the g-th
    contiguous chunk of it). ``count=None`` takes every position of the chosen images, in order
    (image, then output positions in row-major order).

    ``images`` indexes the batch elements to sample from (default: all). With ``image_offset``
    (a rank's shard of a global batch), ``images`` are global indices and ``x`` holds the
    images from ``image_offset`` on: the patches are chosen among all ``images`` and only those
    of images in ``x`` are returned, so the ranks' patches together are the single-process
    choice. With zero padding, patches are gathered straight from ``x`` with one flat index
    (positions in the padding read as 0), so no image is copied, padded or unfolded; other
    padding modes (reflect, replicate, circular) pad the batch explicitly first. The flattening
    order (channel, kernel offsets) matches ``conv.weight.reshape(C_out, -1)`` and ``F.unfold``.
    At most all k·H_out·W_out(·D_out) patches are returned.
    """
    if conv.padding_mode != "zeros":
        x = conv_explicit_pad(conv, x)
        pads = [(0, 0)] * len(conv.kernel_size)
    else:
        pads = conv_pads(conv)
    x = x.contiguous()
    batch, channels, *sizes = x.shape
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    out = [
        (size + before + after - dil * (k - 1) - 1) // st + 1
        for size, (before, after), k, st, dil in zip(
            sizes, pads, kernel, stride, dilation, strict=True
        )
    ]
    per_image = math.prod(out)
    device = x.device
    if images is None:
        images = torch.arange(batch, device=device)
    total = images.numel() * per_image
    pos = choose(total, total if count is None else count, device, seed, step, "positions")
    img = images[pos // per_image]
    rem = pos % per_image
    if image_offset is not None:
        img = img - image_offset
        mine = (img >= 0) & (img < batch)
        img, rem = img[mine], rem[mine]
    n_dims = len(sizes)
    # per spatial dim: the input coordinates [n, k_i] each patch reads
    coords = []
    for i in reversed(range(n_dims)):
        coords.append(
            (rem % out[i] * stride[i] - pads[i][0]).unsqueeze(1)
            + torch.arange(kernel[i], device=device) * dilation[i]
        )
        rem = rem // out[i]
    coords.reverse()

    def spread(t: Tensor, i: int) -> Tensor:
        """[n, k_i] → [n, 1, …, k_i, …, 1] over the n kernel dims (after the channel dim)."""
        shape = [t.shape[0], 1] + [1] * n_dims
        shape[2 + i] = t.shape[1]
        return t.reshape(shape)

    inside = None
    flat = (img[:, None] * channels + torch.arange(channels, device=device)).reshape(
        [img.numel(), channels] + [1] * n_dims
    )
    for i, (c, size) in enumerate(zip(coords, sizes, strict=True)):
        ok = spread((c >= 0) & (c < size), i)
        inside = ok if inside is None else inside & ok
        flat = flat * size + spread(c.clamp(0, size - 1), i)
    patches = x.reshape(-1)[flat] * inside
    return patches.reshape(img.numel(), channels * math.prod(kernel))


def gather_rows(rows: Tensor) -> Tensor:
    """All ranks' sample rows, concatenated in rank order (the input itself without DDP).

    Under ``torch.distributed`` each rank holds a different shard of the batch; gathering the
    few sample rows (n·d numbers, far less than the d² of R) lets every rank apply the identical
    update from the union of the subsamples, so the replicas of R never drift apart.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    world = dist.get_world_size()
    size = torch.tensor([rows.shape[0]], device=rows.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = rows.new_zeros((longest, rows.shape[1]))
    padded[: rows.shape[0]] = rows
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])
