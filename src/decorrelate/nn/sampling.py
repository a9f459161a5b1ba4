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

from ..seeding import make_generator


def subsample_size(total: int, frac: float) -> int:
    """⌊frac·total⌋ + 1, at most ``total``."""
    return min(total, math.floor(frac * total) + 1)


def global_rows(batch: int, rows: int, per_sample: int) -> tuple[int, int]:
    """(offset, total) of this rank's ``rows`` within the global batch's rows.

    Without a distributed batch shard (see :func:`decorrelate.distributed.batch_shard`), or when
    the input is not the sharded batch (``batch`` differs from the shard's size), the rows are
    all there is: (0, rows).
    """
    from ..distributed import current_shard

    shard = current_shard()
    if shard is None or batch != shard.size:
        return 0, rows
    return shard.offset * per_sample, shard.total * per_sample


def choose(total: int, count: int, device: torch.device, seed: int, *tags: object) -> Tensor:
    """``count`` distinct indices in ``range(total)``, reproducible from (seed, *tags)."""
    if count >= total:
        return torch.arange(total, device=device)
    gen = make_generator(seed, *tags)
    return torch.randperm(total, generator=gen)[:count].to(device)


def conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of ``conv``, as ``F.pad`` takes it.

    'same' puts the odd extra row/column at the end, as PyTorch's convolution does.
    """
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        pads = []
        for k, dil in zip(reversed(conv.kernel_size), reversed(conv.dilation), strict=True):
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        return (pads[0], pads[1], pads[2], pads[3])
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def conv_patches(
    x: Tensor,
    conv: nn.Conv2d,
    count: int | None,
    seed: int,
    step: int,
    images: Tensor | None = None,
    image_offset: int | None = None,
) -> Tensor:
    """``count`` random patches [count, C·kh·kw] of batch ``x``, as ``conv`` sees them.

    ``count=None`` takes every position of the chosen images, in order (image, row, column).

    ``images`` indexes the batch elements to sample from (default: all). With ``image_offset``
    (a rank's shard of a global batch), ``images`` are global indices and ``x`` holds the
    images from ``image_offset`` on: the patches are chosen among all ``images`` and only those
    of images in ``x`` are returned, so the ranks' patches together are the single-process
    choice. Patches are gathered straight from ``x`` with one flat index (positions in the zero
    padding read as 0), so no image is copied, padded or unfolded. The flattening order
    (channel, row, column) matches ``conv.weight.reshape(C_out, -1)`` and ``F.unfold``. At most
    all k·H_out·W_out patches are returned.
    """
    x = x.contiguous()
    batch, channels, height, width = x.shape
    left, right, top, bottom = conv_padding(conv)
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    out_h = (height + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + left + right - dw * (kw - 1) - 1) // sw + 1
    device = x.device
    if images is None:
        images = torch.arange(batch, device=device)
    total = images.numel() * out_h * out_w
    pos = choose(total, total if count is None else count, device, seed, step, "positions")
    img = images[pos // (out_h * out_w)]
    rem = pos % (out_h * out_w)
    if image_offset is not None:
        img = img - image_offset
        mine = (img >= 0) & (img < batch)
        img, rem = img[mine], rem[mine]
    rows = (rem // out_w * sh - top).unsqueeze(1) + torch.arange(kh, device=device) * dh
    cols = (rem % out_w * sw - left).unsqueeze(1) + torch.arange(kw, device=device) * dw
    inside = ((rows >= 0) & (rows < height)).unsqueeze(2) & ((cols >= 0) & (cols < width))[
        :, None, :
    ]  # [n, kh, kw]
    chan = torch.arange(channels, device=device)
    flat = (
        ((img[:, None, None, None] * channels + chan[None, :, None, None]) * height)
        + rows.clamp(0, height - 1)[:, None, :, None]
    ) * width + cols.clamp(0, width - 1)[:, None, None, :]
    patches = x.reshape(-1)[flat] * inside.unsqueeze(1)
    return patches.reshape(img.numel(), channels * kh * kw)


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
