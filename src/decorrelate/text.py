"""A small character-level language-modelling task: next-character prediction on a text.

The text is a file of the user's, a string, or — by default — a corpus GENERATED here from a
small probabilistic grammar (deterministic given the seed, nothing downloaded, nothing large
committed). The grammar gives the text structure a model can learn at several scales: the
spelling of a few dozen words, which word classes follow which (determiner → adjective/noun →
verb → ...), and sentence ends. A character model that learns nothing scores ln(vocab) ≈ 3.3
nats per character; predicting the letter frequencies alone gives about 2.8.

Every example is a window of ``seq_len`` characters: inputs ``x`` ``[N, T]`` (int64 character
ids) and targets ``y`` ``[N, T]``, the same window shifted by one character. Windows do not
overlap, and the test (and validation) windows come from the end of the text, after all the
training windows, so no test character is ever a training target. The result is an ordinary
:class:`~decorrelate.data.DataSplits` (``num_classes`` = vocabulary size), so ``Dataset.batches``
and :func:`decorrelate.train.evaluate` work on it; train with a :class:`~decorrelate.losses.Loss`
(token-level cross-entropy), e.g.::

    task = char_task(seq_len=32)
    for x, y in task.splits.train.batches(64, order=epoch_order(len(task.splits.train), 0, 1)):
        rule.backward(model, x, y)   # model: [B, T] ids -> logits [B, T, vocab]
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .data.dataset import Dataset, DataSplits
from .errors import UserError

__all__ = ["CharTask", "char_task", "generate_corpus"]

# The grammar: word classes, and for each sentence pattern the classes in order.
_WORDS: dict[str, tuple[str, ...]] = {
    "det": ("the", "a", "every", "no", "one"),
    "adj": ("small", "red", "quiet", "old", "bright", "heavy", "strange", "green"),
    "noun": ("cat", "dog", "bird", "river", "stone", "garden", "child", "lamp", "boat", "tree"),
    "name": ("anna", "tom", "maria", "jon", "ella"),
    "verb_t": ("sees", "finds", "likes", "carries", "follows", "paints", "hears"),
    "verb_i": ("sleeps", "waits", "sings", "runs", "falls", "shines"),
    "adv": ("slowly", "today", "again", "quietly", "often"),
    "prep": ("near", "under", "behind", "over", "beside"),
    "conj": ("and", "but", "while"),
}
_CLAUSES: tuple[tuple[tuple[str, ...], float], ...] = (
    (("NP", "verb_t", "NP"), 0.35),
    (("NP", "verb_i"), 0.2),
    (("NP", "verb_i", "adv"), 0.15),
    (("NP", "verb_t", "NP", "prep", "NP"), 0.15),
    (("NP", "verb_i", "prep", "NP"), 0.15),
)


def _noun_phrase(rng: random.Random) -> list[str]:
    if rng.random() < 0.2:
        return [rng.choice(_WORDS["name"])]
    words = [rng.choice(_WORDS["det"])]
    while rng.random() < 0.4 and len(words) < 3:
        words.append(rng.choice(_WORDS["adj"]))
    words.append(rng.choice(_WORDS["noun"]))
    return words


def _clause(rng: random.Random) -> list[str]:
    patterns, weights = zip(*_CLAUSES, strict=True)
    (pattern,) = rng.choices(patterns, weights=weights)
    words: list[str] = []
    for part in pattern:
        words.extend(_noun_phrase(rng) if part == "NP" else [rng.choice(_WORDS[part])])
    return words


def generate_corpus(n_chars: int = 100_000, seed: int = 0) -> str:
    """About ``n_chars`` characters (whole sentences) of grammar text; the same for a seed.

    Sentences are one or two clauses (joined by a conjunction), end with ". ", and start a new
    line every few sentences. Uses Python's seeded ``random.Random``, so the text is identical
    on every platform.
    """
    if n_chars < 1:
        raise UserError(f"n_chars must be a positive integer, got {n_chars!r}")
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < n_chars:
        words = _clause(rng)
        if rng.random() < 0.3:
            words += [rng.choice(_WORDS["conj"]), *_clause(rng)]
        sentence = " ".join(words) + "."
        sentence += "\n" if rng.random() < 0.2 else " "
        parts.append(sentence)
        length += len(sentence)
    return "".join(parts)


@dataclass
class CharTask:
    """A character-level task: its splits and the vocabulary that maps ids to characters."""

    splits: DataSplits
    vocab: str

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> Tensor:
        """Character ids (int64) of ``text``; a character outside the vocabulary is a UserError."""
        index = {c: i for i, c in enumerate(self.vocab)}
        unknown = sorted({c for c in text if c not in index})
        if unknown:
            raise UserError(f"characters {unknown!r} are not in the task's vocabulary")
        return torch.tensor([index[c] for c in text], dtype=torch.int64)

    def decode(self, ids: Tensor) -> str:
        """The text of a 1-D tensor of character ids."""
        return "".join(self.vocab[int(i)] for i in ids.reshape(-1))


def char_task(
    text: str | None = None,
    *,
    path: str | Path | None = None,
    seq_len: int = 32,
    test_frac: float = 0.1,
    val_frac: float = 0.0,
    n_chars: int = 100_000,
    seed: int = 0,
) -> CharTask:
    """Next-character prediction windows from ``text``, the file ``path``, or a generated corpus.

    Without ``text`` or ``path`` the corpus is :func:`generate_corpus` ``(n_chars, seed)``. The
    windows are cut in order: the first ``1 − test_frac − val_frac`` of them train, then the
    validation windows, then the test windows (contiguous blocks, so a held-out window's
    characters are never training targets).
    """
    if text is not None and path is not None:
        raise UserError("give the text or a path to it, not both")
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read the text file {path}: {err}") from None
    if text is None:
        text = generate_corpus(n_chars, seed)
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise UserError(f"seq_len must be a positive integer, got {seq_len!r}")
    if not (0 < test_frac < 1 and 0 <= val_frac < 1 and test_frac + val_frac < 1):
        raise UserError(
            f"test_frac ({test_frac}) must be in (0, 1), val_frac ({val_frac}) in [0, 1), and "
            "together below 1"
        )
    vocab = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    windows = (ids.numel() - 1) // seq_len
    n_test = max(1, round(windows * test_frac))
    n_val = round(windows * val_frac) if val_frac > 0 else 0
    n_train = windows - n_test - n_val
    if n_train < 1 or (val_frac > 0 and n_val < 1):
        raise UserError(
            f"the text has {ids.numel()} characters, {windows} windows of {seq_len}: too short "
            "for a train/test split; give a longer text or a smaller seq_len"
        )
    x = ids[: windows * seq_len].reshape(windows, seq_len)
    y = ids[1 : windows * seq_len + 1].reshape(windows, seq_len)
    k = len(vocab)

    def part(start: int, stop: int, name: str) -> Dataset:
        return Dataset(x[start:stop].clone(), y[start:stop].clone(), k, name)

    train = part(0, n_train, "chars-train")
    val = part(n_train, n_train + n_val, "chars-val") if n_val else None
    test = part(n_train + n_val, windows, "chars-test")
    splits = DataSplits(train=train, test=test, val=val, root=None, mean=[0.0], std=[1.0])
    return CharTask(splits=splits, vocab=vocab)
