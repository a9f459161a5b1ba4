"""A zoo of small models of the architectures people train, to try every rule on.

Each builder returns a freshly initialised ``nn.Module`` (seeded: the same ``seed`` gives the same
weights, and the global RNG is left as it was), tiny by default so that a few training steps take
milliseconds on a CPU; every size is a keyword argument. Each architecture comes with the task it
expects in :data:`ZOO`: a :class:`ZooEntry` holding the builder, a function that makes a seeded
synthetic batch of the right shapes and dtypes, and the keyword arguments of the
:class:`~decorrelate.losses.Loss` to train it with::

    from decorrelate.zoo import ZOO
    entry = ZOO["gpt"]
    model = entry.build()                                  # logits [B, T, V]
    x, y = entry.batch(8, torch.Generator().manual_seed(0))  # tokens [B, T], next tokens [B, T]
    loss = entry.make_loss()

The synthetic tasks are learnable (labels come from a fixed random teacher, sequences follow a
fixed random transition table), so a loss that falls on them measures learning, not noise fitting.

Dropout defaults to 0 everywhere (the models are deterministic functions of their inputs, which
the exact-gradient tests need); pass ``dropout=`` to switch it on.

The Hugging Face entries (``hf-gpt2``, ``hf-bert``) need ``transformers`` (the ``zoo`` extra:
``pip install -c constraints.txt -e '.[zoo]'``); they are built from tiny configs with random
weights — nothing is downloaded — and return a ``ModelOutput``, so their loss selects
``"logits"``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ZOO",
    "BasicBlock",
    "ZooEntry",
    "conv1d_net",
    "conv_bn",
    "depthwise_separable",
    "gpt",
    "gru_lm",
    "hf_bert",
    "hf_gpt2",
    "lstm_lm",
    "mlp",
    "resnet",
    "transformer_encoder",
]


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Run ``build`` with the global RNG seeded to ``seed``, restoring the RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# ----------------------------------------------------------------------------- vision and MLP


def mlp(
    in_features: int = 16, hidden: tuple[int, ...] = (32, 32), classes: int = 4, seed: int = 0
) -> nn.Module:
    """A ReLU MLP: input [B, in_features] → logits [B, classes]."""

    def build() -> nn.Module:
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        return nn.Sequential(*layers, nn.Linear(width, classes))

    return _seeded(build, seed)


def conv_bn(
    channels: int = 1, width: int = 8, classes: int = 4, depth: int = 2, seed: int = 0
) -> nn.Module:
    """Conv3×3 → BatchNorm2d → ReLU blocks, a 2× max-pool after each, global average pool,
    Linear: images [B, channels, H, W] → logits [B, classes]."""

    def build() -> nn.Module:
        layers: list[nn.Module] = []
        c = channels
        for i in range(depth):
            out = width * 2**i
            layers += [
                nn.Conv2d(c, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c = out
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))

    return _seeded(build, seed)


class BasicBlock(nn.Module):
    """ResNet's BasicBlock: conv-BN-ReLU-conv-BN plus the (projected) input, then ReLU.

    With ``zero_init`` the second BN's γ starts at zero, so the block starts as the identity
    (torchvision's ``zero_init_residual``, timm's default): the first conv of the block gets no
    gradient until γ has moved, which a rule must be able to train.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, zero_init: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if zero_init:
            nn.init.zeros_(self.bn2.weight)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def resnet(
    channels: int = 1,
    width: int = 8,
    stages: tuple[int, ...] = (1, 1),
    classes: int = 4,
    zero_init: bool = True,
    seed: int = 0,
) -> nn.Module:
    """A ResNet of :class:`BasicBlock` s: stem conv-BN-ReLU, ``stages[i]`` blocks per stage
    (width doubles and resolution halves from the second stage on), global average pool, Linear.
    Images [B, channels, H, W] → logits [B, classes]."""

    def build() -> nn.Module:
        layers: list[nn.Module] = [
            nn.Conv2d(channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        c = width
        for i, blocks in enumerate(stages):
            out = width * 2**i
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(BasicBlock(c, out, stride, zero_init))
                c = out
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))

    return _seeded(build, seed)


def depthwise_separable(
    channels: int = 1, width: int = 8, classes: int = 4, depth: int = 2, seed: int = 0
) -> nn.Module:
    """MobileNet-style: a stem conv, then blocks of depthwise 3×3 (``groups`` = channels) → BN →
    ReLU → pointwise 1×1 → BN → ReLU (stride 2 in the depthwise conv of every block after the
    first), global average pool, Linear. Images [B, channels, H, W] → logits [B, classes]."""

    def build() -> nn.Module:
        layers: list[nn.Module] = [
            nn.Conv2d(channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        c = width
        for i in range(depth):
            out = width * 2**i
            layers += [
                nn.Conv2d(c, c, 3, stride=1 if i == 0 else 2, padding=1, groups=c, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.Conv2d(c, out, 1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(),
            ]
            c = out
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))

    return _seeded(build, seed)


def conv1d_net(
    channels: int = 1, width: int = 8, classes: int = 4, depth: int = 2, seed: int = 0
) -> nn.Module:
    """A 1-d conv net for sequences/audio: Conv1d(k=5, stride 2) → BatchNorm1d → ReLU blocks,
    global average pool over time, Linear. Signals [B, channels, L] → logits [B, classes]."""

    def build() -> nn.Module:
        layers: list[nn.Module] = []
        c = channels
        for i in range(depth):
            out = width * 2**i
            layers += [nn.Conv1d(c, out, 5, stride=2, padding=2), nn.BatchNorm1d(out), nn.ReLU()]
            c = out
        return nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(c, classes))

    return _seeded(build, seed)


# ----------------------------------------------------------------------------- sequence models


class RecurrentLM(nn.Module):
    """Embedding → ``nn.LSTM`` / ``nn.GRU`` (batch first) → Linear over the vocabulary.

    Tokens [B, T] (long) → next-token logits [B, T, V].
    """

    def __init__(
        self, cell: str, vocab: int, embed: int, hidden: int, layers: int, dropout: float
    ) -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = rnn(embed, hidden, layers, batch_first=True, dropout=dropout)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out)


def lstm_lm(
    vocab: int = 16,
    embed: int = 16,
    hidden: int = 32,
    layers: int = 1,
    dropout: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """An LSTM language model (:class:`RecurrentLM`): tokens [B, T] → logits [B, T, vocab]."""
    return _seeded(lambda: RecurrentLM("lstm", vocab, embed, hidden, layers, dropout), seed)


def gru_lm(
    vocab: int = 16,
    embed: int = 16,
    hidden: int = 32,
    layers: int = 1,
    dropout: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """A GRU language model (:class:`RecurrentLM`): tokens [B, T] → logits [B, T, vocab]."""
    return _seeded(lambda: RecurrentLM("gru", vocab, embed, hidden, layers, dropout), seed)


class _TokenModel(nn.Module):
    """Token + learned position embeddings (``embed``, ``pos``), shared by
    :class:`EncoderClassifier` and :class:`GPT`."""

    def __init__(self, vocab: int, d_model: int, max_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Tokens [B, T] → their embeddings plus those of positions 0..T−1, [B, T, d_model]."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.embed(tokens) + self.pos(positions)


class EncoderClassifier(_TokenModel):
    """Token + learned position embeddings → pre-LN ``nn.TransformerEncoderLayer`` s
    (``norm_first=True``, batch first) → LayerNorm → mean over tokens → Linear.

    Tokens [B, T] (long, T ≤ ``max_len``) → logits [B, classes].
    """

    def __init__(
        self,
        vocab: int,
        d_model: int,
        heads: int,
        layers: int,
        ff: int,
        classes: int,
        max_len: int,
        dropout: float,
    ) -> None:
        super().__init__(vocab, d_model, max_len)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model, heads, ff, dropout, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h).mean(1))


def transformer_encoder(
    vocab: int = 16,
    d_model: int = 16,
    heads: int = 2,
    layers: int = 2,
    ff: int = 32,
    classes: int = 4,
    max_len: int = 16,
    dropout: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """A pre-LN transformer encoder classifier (:class:`EncoderClassifier`)."""
    return _seeded(
        lambda: EncoderClassifier(vocab, d_model, heads, layers, ff, classes, max_len, dropout),
        seed,
    )


class DecoderBlock(nn.Module):
    """A GPT block: x + MHA(LN(x)) under a causal mask, then x + MLP(LN(x)) (Linear-GELU-Linear)."""

    def __init__(self, d_model: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, ff)
        self.act = nn.GELU()
        self.proj = nn.Linear(ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.drop(self.proj(self.act(self.fc(self.ln2(x)))))


class GPT(_TokenModel):
    """A GPT-style decoder LM from ``nn.Embedding`` / ``nn.MultiheadAttention`` / ``nn.Linear``:
    token + learned position embeddings, :class:`DecoderBlock` s with a causal mask, final
    LayerNorm, Linear head. Tokens [B, T] (T ≤ ``max_len``) → next-token logits [B, T, V]."""

    def __init__(
        self,
        vocab: int,
        d_model: int,
        heads: int,
        layers: int,
        ff: int,
        max_len: int,
        dropout: float,
    ) -> None:
        super().__init__(vocab, d_model, max_len)
        self.blocks = nn.ModuleList(
            DecoderBlock(d_model, heads, ff, dropout) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        # True above the diagonal: position i may not attend to j > i.
        mask = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)
        h = self.embed_tokens(tokens)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.norm(h))


def gpt(
    vocab: int = 16,
    d_model: int = 16,
    heads: int = 2,
    layers: int = 2,
    ff: int = 32,
    max_len: int = 16,
    dropout: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """A GPT-style decoder language model (:class:`GPT`)."""
    return _seeded(lambda: GPT(vocab, d_model, heads, layers, ff, max_len, dropout), seed)


# ----------------------------------------------------------------------------- Hugging Face


def has_transformers() -> bool:
    """Whether Hugging Face ``transformers`` is importable (the ``zoo`` extra)."""
    return importlib.util.find_spec("transformers") is not None


def hf_gpt2(
    vocab: int = 16,
    d_model: int = 16,
    heads: int = 2,
    layers: int = 2,
    max_len: int = 16,
    dropout: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Hugging Face ``GPT2LMHeadModel`` from a tiny ``GPT2Config``, random init, no download.

    Its layers are ``transformers``' ``Conv1D`` (weight stored [in, out]); the forward returns a
    ``CausalLMOutputWithCrossAttentions`` whose ``.logits`` are [B, T, vocab].
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=max_len,
        n_embd=d_model,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = "eager"
    return _seeded(lambda: GPT2LMHeadModel(config), seed)


def hf_bert(
    vocab: int = 16,
    d_model: int = 16,
    heads: int = 2,
    layers: int = 2,
    ff: int = 32,
    classes: int = 4,
    max_len: int = 16,
    dropout: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Hugging Face ``BertForSequenceClassification`` from a tiny ``BertConfig``, random init.

    The forward returns a ``SequenceClassifierOutput`` whose ``.logits`` are [B, classes].
    """
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ff,
        max_position_embeddings=max_len,
        num_labels=classes,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=0,
    )
    config._attn_implementation = "eager"
    return _seeded(lambda: BertForSequenceClassification(config), seed)


# ----------------------------------------------------------------------------- tasks


def _teacher_labels(x: Tensor, classes: int, seed: int) -> Tensor:
    """Labels from a fixed random linear teacher on the flattened input (seeded by ``seed``)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    flat = x.reshape(x.shape[0], -1).float()
    w = torch.randn(flat.shape[1], classes, generator=g)
    return (flat @ w).argmax(1)


def image_batch(
    batch: int, generator: torch.Generator, channels: int = 1, size: int = 8, classes: int = 4
) -> tuple[Tensor, Tensor]:
    """Gaussian images [B, channels, size, size] and teacher labels [B]."""
    x = torch.randn(batch, channels, size, size, generator=generator)
    return x, _teacher_labels(x, classes, 0)


def vector_batch(
    batch: int, generator: torch.Generator, features: int = 16, classes: int = 4
) -> tuple[Tensor, Tensor]:
    """Gaussian vectors [B, features] and teacher labels [B]."""
    x = torch.randn(batch, features, generator=generator)
    return x, _teacher_labels(x, classes, 0)


def signal_batch(
    batch: int, generator: torch.Generator, channels: int = 1, length: int = 32, classes: int = 4
) -> tuple[Tensor, Tensor]:
    """Gaussian signals [B, channels, length] and teacher labels [B]."""
    x = torch.randn(batch, channels, length, generator=generator)
    return x, _teacher_labels(x, classes, 0)


def _transitions(vocab: int) -> Tensor:
    """A fixed random transition table: after token a comes one of two successors of a."""
    g = torch.Generator().manual_seed(20_000 + vocab)
    return torch.randint(vocab, (vocab, 2), generator=g)


def token_batch(
    batch: int, generator: torch.Generator, vocab: int = 16, length: int = 8
) -> tuple[Tensor, Tensor]:
    """Token sequences [B, length + 1] from a fixed random Markov chain (each token has two
    equally likely successors), split into inputs [B, length] and next-token targets
    [B, length]: a language-modelling task whose best loss is log 2."""
    table = _transitions(vocab)
    seq = torch.empty(batch, length + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(vocab, (batch,), generator=generator)
    choice = torch.randint(2, (batch, length), generator=generator)
    for t in range(length):  # over time steps, vectorised over the batch
        seq[:, t + 1] = table[seq[:, t], choice[:, t]]
    return seq[:, :-1], seq[:, 1:]


def token_class_batch(
    batch: int, generator: torch.Generator, vocab: int = 16, length: int = 8, classes: int = 4
) -> tuple[Tensor, Tensor]:
    """Random token sequences [B, length] labelled by a fixed random teacher on their bag of
    tokens: a sequence-classification task."""
    x = torch.randint(vocab, (batch, length), generator=generator)
    bags = torch.nn.functional.one_hot(x, vocab).sum(1)
    return x, _teacher_labels(bags, classes, 1)


@dataclass(frozen=True)
class ZooEntry:
    """One architecture of the zoo and the task it expects.

    ``build(**sizes)`` makes the model; ``batch(n, generator)`` a synthetic batch ``(x, y)`` of
    ``n`` samples that fits the default sizes; :meth:`make_loss` the loss to train it with
    (cross-entropy, with ``loss_kwargs`` such as the output selector); ``requires`` names an
    optional package the builder imports (None: torch only); ``task`` says in words what x and y
    are.
    """

    build: Callable[..., nn.Module]
    batch: Callable[[int, torch.Generator], tuple[Tensor, Tensor]]
    task: str
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    requires: str | None = None

    def make_loss(self) -> Any:
        """The :class:`~decorrelate.losses.Loss` for this task (cross-entropy)."""
        from .losses import Loss

        return Loss("cross-entropy", **self.loss_kwargs)


#: Every architecture of the zoo, by name.
ZOO: dict[str, ZooEntry] = {
    "mlp": ZooEntry(mlp, vector_batch, "vectors [B, 16] float → 4 classes [B]"),
    "conv-bn": ZooEntry(conv_bn, image_batch, "images [B, 1, 8, 8] float → 4 classes [B]"),
    "resnet": ZooEntry(resnet, image_batch, "images [B, 1, 8, 8] float → 4 classes [B]"),
    "depthwise": ZooEntry(
        depthwise_separable, image_batch, "images [B, 1, 8, 8] float → 4 classes [B]"
    ),
    "conv1d": ZooEntry(conv1d_net, signal_batch, "signals [B, 1, 32] float → 4 classes [B]"),
    "lstm-lm": ZooEntry(lstm_lm, token_batch, "tokens [B, 8] long → next tokens [B, 8] (V=16)"),
    "gru-lm": ZooEntry(gru_lm, token_batch, "tokens [B, 8] long → next tokens [B, 8] (V=16)"),
    "encoder": ZooEntry(
        transformer_encoder, token_class_batch, "tokens [B, 8] long → 4 classes [B]"
    ),
    "gpt": ZooEntry(gpt, token_batch, "tokens [B, 8] long → next tokens [B, 8] (V=16)"),
    "hf-gpt2": ZooEntry(
        hf_gpt2,
        token_batch,
        "tokens [B, 8] long → next tokens [B, 8] (V=16); output: ModelOutput.logits",
        {"output": "logits"},
        "transformers",
    ),
    "hf-bert": ZooEntry(
        hf_bert,
        token_class_batch,
        "tokens [B, 8] long → 4 classes [B]; output: ModelOutput.logits",
        {"output": "logits"},
        "transformers",
    ),
}
