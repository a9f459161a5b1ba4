"""``nn.MultiheadAttention`` rebuilt from ``nn.Linear`` projections and a parameter-free attention.

``nn.MultiheadAttention`` applies its input and output projections with ``F.linear`` on bare
Parameters (and, in eval mode, through fused kernels), so no rule can see them as layers.
:class:`UnrolledAttention` computes the same function with:

* ``in_proj`` — one ``nn.Linear`` E → 3E whose weight/bias ARE ``in_proj_weight`` /
  ``in_proj_bias`` (when ``kdim == vdim == embed_dim``); or ``q_proj`` / ``k_proj`` / ``v_proj``
  whose weights ARE ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``. In the second
  case the original's single 3E bias cannot be split into three Parameters without losing its
  identity, so the Linear layers have no bias and the module keeps it as ``proj_bias`` (added
  after the projections: a parameter outside any layer kind);
* ``out_proj`` — the original ``out_proj`` module itself;
* ``bias_k`` / ``bias_v`` (``add_bias_kv``) kept as the original Parameters, ``add_zero_attn``
  as in PyTorch;
* softmax(q kᵀ / √d + mask) v per head: ``F.scaled_dot_product_attention`` when no weights are
  asked for and no dropout applies, else the explicit product with ``F.dropout`` on the weights
  (the global RNG, so a rule replaying the RNG state replays the mask).

The same Parameter objects are reused, so an optimizer built before unrolling keeps working.
The state_dict keys change (``in_proj_weight`` becomes ``in_proj.weight``); ``load_state_dict``
accepts the original's keys too.

Contract with the rules: every projection Linear is called on a batch-first [B, T, E] tensor
(dim 0 is the batch): with ``batch_first=False`` the module transposes at its boundary, and an
unbatched [T, E] input gets a batch of one. In self-attention (query, key and value the same
tensor) ``in_proj`` is called once; otherwise it is called once on the query (its q rows used)
and once on the key/value (k and v rows; twice if key and value differ), computing rows that are
dropped — exact, at up to 3× the projection's cost for cross-attention.

``_qkv_same_embed_dim`` is always False: ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder``
would otherwise take their fused inference path in eval mode, which reads ``in_proj_weight``
directly and never calls the Linear modules (a rule's or decorrelation's change through them
would vanish at evaluation). :func:`~decorrelate.layers.unroll` also turns off an enclosing
``nn.TransformerEncoder``'s nested-tensor path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .recurrent import _Origin, _param, linear_from

#: The Parameters of ``nn.MultiheadAttention`` outside ``out_proj`` that the projections take.
_MHA_PARAMETERS = (
    "in_proj_weight",
    "in_proj_bias",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
)


class UnrolledAttention(_Origin):
    """Drop-in for ``nn.MultiheadAttention`` with ``nn.Linear`` projections (see module doc).

    Same attributes (``embed_dim``, ``kdim``, ``vdim``, ``num_heads``, ``head_dim``, ``dropout``,
    ``batch_first``, ``bias_k``, ``bias_v``, ``add_zero_attn``, ``out_proj``) and the same
    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` returning ``(output, weights or None)``.
    ``in_proj_weight`` etc. remain readable as properties.
    """

    #: never the packed fast path of nn.Transformer* (see the module docstring)
    _qkv_same_embed_dim = False

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if type(mha).forward is not nn.MultiheadAttention.forward:
            raise UserError(
                f"{type(mha).__name__} subclasses nn.MultiheadAttention with its own forward; "
                "decorrelate.layers.unroll cannot unroll it"
            )
        self.embed_dim = mha.embed_dim
        self.kdim = mha.kdim
        self.vdim = mha.vdim
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.dropout = float(mha.dropout)
        self.batch_first = mha.batch_first
        self.add_zero_attn = bool(mha.add_zero_attn)
        self.packed = bool(mha._qkv_same_embed_dim)
        names = {n: _param(mha, n) for n in _MHA_PARAMETERS}
        if self.packed:
            self.in_proj = linear_from(names["in_proj_weight"], names["in_proj_bias"])
            self.proj_bias = None
        else:
            self.q_proj = linear_from(names["q_proj_weight"], None)
            self.k_proj = linear_from(names["k_proj_weight"], None)
            self.v_proj = linear_from(names["v_proj_weight"], None)
            self.proj_bias = names["in_proj_bias"]
        self.out_proj = mha.out_proj
        self.bias_k = mha.bias_k
        self.bias_v = mha.bias_v
        self._remember(names)
        self.train(mha.training)

    # read access for code written against nn.MultiheadAttention (e.g. custom initialisers)
    @property
    def in_proj_weight(self) -> Tensor | None:
        return self.in_proj.weight if self.packed else None

    @property
    def in_proj_bias(self) -> Tensor | None:
        return self.in_proj.bias if self.packed else self.proj_bias

    @property
    def q_proj_weight(self) -> Tensor | None:
        return None if self.packed else self.q_proj.weight

    @property
    def k_proj_weight(self) -> Tensor | None:
        return None if self.packed else self.k_proj.weight

    @property
    def v_proj_weight(self) -> Tensor | None:
        return None if self.packed else self.v_proj.weight

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if not self.packed:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        return s + f", dropout={self.dropout}, batch_first={self.batch_first}"

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, T, E] from batch-first inputs, through the Linear modules."""
        e = self.embed_dim
        if not self.packed:
            q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
            if self.proj_bias is not None:
                b_q, b_k, b_v = self.proj_bias.chunk(3)
                q, k, v = q + b_q, k + b_k, v + b_v
            return q, k, v
        if query is key and key is value:
            return self.in_proj(query).split(e, dim=-1)
        q = self.in_proj(query)[..., :e]
        if key is value:
            k, v = self.in_proj(key)[..., e:].split(e, dim=-1)
        else:
            k = self.in_proj(key)[..., e : 2 * e]
            v = self.in_proj(value)[..., 2 * e :]
        return q, k, v

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise UserError("the unrolled MultiheadAttention does not take nested tensors")
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise UserError(
                "MultiheadAttention expects query, key and value all 3-D (batched) or all 2-D, "
                f"got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        batched = query.dim() == 3
        same_kv = key is value
        same_qk = query is key

        def batch_first(t: Tensor) -> Tensor:
            if not batched:
                return t.unsqueeze(0)
            return t if self.batch_first else t.transpose(0, 1)

        # to batch-first [B, T, E], keeping the identities that select the projection calls
        query = batch_first(query)
        key = query if same_qk else batch_first(key)
        value = key if same_kv else batch_first(value)
        if not batched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        bsz, tgt_len, e = query.shape
        if e != self.embed_dim:
            raise UserError(
                f"MultiheadAttention expects embed_dim {self.embed_dim}, "
                f"got query {tuple(query.shape)}"
            )

        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        if is_causal and attn_mask is None:
            raise UserError(
                "is_causal=True needs attn_mask as well (it is only a hint); pass e.g. "
                "nn.Transformer.generate_square_subsequent_mask(T)"
            )
        sdpa_causal = is_causal and key_padding_mask is None and not need_weights
        if sdpa_causal:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=query.dtype,
                check_other=False,
            )

        q, k, v = self._project(query, key, value)
        src_len = k.shape[1]
        h, d = self.num_heads, self.head_dim
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (tgt_len, src_len):
                    raise UserError(
                        f"the 2-D attn_mask has shape {tuple(attn_mask.shape)}, "
                        f"expected {(tgt_len, src_len)}"
                    )
                attn_mask = attn_mask.view(1, 1, tgt_len, src_len)
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (bsz * h, tgt_len, src_len):
                    raise UserError(
                        f"the 3-D attn_mask has shape {tuple(attn_mask.shape)}, "
                        f"expected {(bsz * h, tgt_len, src_len)}"
                    )
                attn_mask = attn_mask.view(bsz, h, tgt_len, src_len)
            else:
                raise UserError(f"attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D")
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise UserError(
                    f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, "
                    f"expected {(bsz, src_len)}"
                )
            key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len)

        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(bsz, 1, self.embed_dim)], dim=1)
            v = torch.cat([v, self.bias_v.expand(bsz, 1, self.embed_dim)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.reshape(bsz, tgt_len, h, d).transpose(1, 2)  # [B, H, L, d]
        k = k.reshape(bsz, k.shape[1], h, d).transpose(1, 2)
        v = v.reshape(bsz, v.shape[1], h, d).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, h, 1, d)], dim=2)
            v = torch.cat([v, v.new_zeros(bsz, h, 1, d)], dim=2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        if key_padding_mask is not None:
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask

        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights or dropout_p > 0.0:
            scores = torch.matmul(q * math.sqrt(1.0 / d), k.transpose(-2, -1))
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:  # the returned weights are the dropped ones, as in PyTorch
                weights = F.dropout(weights, p=dropout_p)
            out = torch.matmul(weights, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, sdpa_causal)
        out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim))

        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights if batched else weights.squeeze(0))


def unroll_attention(module: nn.MultiheadAttention) -> UnrolledAttention:
    """The unrolled replacement of an ``nn.MultiheadAttention``."""
    return UnrolledAttention(module)
