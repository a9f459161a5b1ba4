"""Seeded randomness: every random thing in a run draws from its own generator.

A run has one seed. Each consumer (model initialisation, data order in epoch ``e``, the rule's
noise, the validation split, ...) derives its own seed from it with :func:`derive_seed`, so that
adding a new random consumer never shifts the numbers another one sees, and so that the data order
of epoch ``e`` can be recreated from ``(seed, e)`` alone (which makes resuming exact and makes
per-rank sharding under DDP agree).
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *tags: object) -> int:
    """A 63-bit seed determined by ``seed`` and the tags (e.g. ``derive_seed(0, "data", 3)``)."""
    text = ":".join([str(int(seed)), *map(str, tags)])
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, *tags: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``derive_seed(seed, *tags)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *tags))
    return gen
