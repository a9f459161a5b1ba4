"""Recurrent modules rebuilt from ``nn.Linear`` cells, so that a learning rule sees layers.

``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (and the single-step ``nn.RNNCell`` / ``nn.LSTMCell`` /
``nn.GRUCell``) compute their gates with fused kernels on flat weight tensors that no rule can
hook. :func:`decorrelate.layers.unroll` replaces each by the module here that computes the same
thing from, per layer and direction, two ``nn.Linear`` layers — ``ih`` (input → gates) and ``hh``
(hidden → gates), plus ``hr`` (hidden → projection) for an LSTM with ``proj_size`` — called once
per time step: a rule sees one layer called T times. The Linear layers hold the *same*
Parameter objects as the original module (``cell.ih.weight is lstm.weight_ih_l0``), so an
optimizer built before unrolling keeps training them. Outputs and gradients equal the original's
to float rounding; the gate order and formulas are PyTorch's:

* RNN:  h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu
* LSTM: i, f, g, o = chunks of (W_ih x + b_ih + W_hh h + b_hh); c' = σ(f) c + σ(i) tanh(g);
  h' = σ(o) tanh(c'), then h' = W_hr h' with ``proj_size``
* GRU:  r, z, n chunks of ih(x) and hh(h) separately; r = σ(i_r + h_r), z = σ(i_z + h_z),
  n = tanh(i_n + r (W_hn h + b_hn)); h' = (1 - z) n + z h

Contract with the rules: every Linear here is called on a [batch, features] tensor (dim 0 is the
batch, also for unbatched input, which gets a batch of one). Dropout between layers uses
``F.dropout`` (the global RNG), as the original does.

The state_dict keys change (``weight_ih_l0`` becomes ``l0.ih.weight``); ``load_state_dict``
also accepts the original module's keys, so a checkpoint of the model before unrolling loads.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import UserError


def linear_from(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An ``nn.Linear`` whose weight and bias ARE the given Parameters (no new tensor, no draw
    from the global RNG, which constructing an ordinary Linear would make)."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features = int(weight.shape[1])
    lin.out_features = int(weight.shape[0])
    lin.weight = weight
    lin.register_parameter("bias", bias)
    return lin


def _param(module: nn.Module, name: str) -> nn.Parameter | None:
    """``module.<name>`` as a Parameter (None if absent); a computed tensor (weight norm, a
    parametrization) cannot be shared and is refused."""
    value = getattr(module, name, None)
    if value is None or isinstance(value, nn.Parameter):
        return value
    raise UserError(
        f"{type(module).__name__}.{name} is not a Parameter (weight norm or a parametrization?); "
        "remove it before decorrelate.layers.unroll"
    )


def _remap_hook(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *_args: Any, **_kwargs: Any
) -> None:
    """load_state_dict pre-hook: rename the original module's keys (``weight_ih_l0``) to where
    the same Parameter lives now, found by identity (so it survives a later wrapper)."""
    where = {id(p): name for name, p in module.named_parameters()}
    for old, param in module._origin_params.items():
        key = prefix + old
        if key in state_dict and id(param) in where:
            new = prefix + where[id(param)]
            if new not in state_dict:
                state_dict[new] = state_dict.pop(key)


class _Origin(nn.Module):
    """Shared part of the unrolled modules: the original's parameter names, for loading a
    state_dict of the original and for reading ``module.weight_ih_l0`` as before."""

    def _remember(self, names: dict[str, nn.Parameter | None]) -> None:
        # a plain dict attribute: not registered again, follows deepcopy's memo
        object.__setattr__(
            self, "_origin_params", {k: v for k, v in names.items() if v is not None}
        )
        self.register_load_state_dict_pre_hook(_remap_hook)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            origin = self.__dict__.get("_origin_params", {})
            if name in origin:  # the original's name for a Parameter (read-only alias)
                return origin[name]
            raise


# ---------------------------------------------------------------------------------- cells


def _rnn_step(cell: nn.Module, x: Tensor, h: Tensor) -> Tensor:
    pre = cell.ih(x) + cell.hh(h)
    return torch.tanh(pre) if cell.nonlinearity == "tanh" else torch.relu(pre)


def _lstm_step(cell: nn.Module, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    gates = cell.ih(x) + cell.hh(h)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if cell.hr is not None:
        h = cell.hr(h)
    return h, c


def _gru_step(cell: nn.Module, x: Tensor, h: Tensor) -> Tensor:
    i_r, i_z, i_n = cell.ih(x).chunk(3, dim=-1)
    h_r, h_z, h_n = cell.hh(h).chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


class _Cell(_Origin):
    """One step of a recurrent layer from ``ih`` and ``hh`` Linear layers."""

    mode: str = ""

    def __init__(
        self,
        w_ih: nn.Parameter,
        w_hh: nn.Parameter,
        b_ih: nn.Parameter | None,
        b_hh: nn.Parameter | None,
        w_hr: nn.Parameter | None = None,
        nonlinearity: str = "tanh",
    ) -> None:
        super().__init__()
        self.ih = linear_from(w_ih, b_ih)
        self.hh = linear_from(w_hh, b_hh)
        self.hr = None if w_hr is None else linear_from(w_hr, None)
        self.nonlinearity = nonlinearity
        self.input_size = self.ih.in_features
        self.hidden_size = self.hh.in_features if w_hr is None else int(w_hr.shape[1])
        self.bias = b_ih is not None

    @property
    def out_size(self) -> int:
        return self.hh.in_features

    def extra_repr(self) -> str:
        extra = f", nonlinearity={self.nonlinearity!r}" if self.mode == "RNN" else ""
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias}{extra}"

    def _check_input(self, x: Tensor) -> tuple[Tensor, bool]:
        if x.dim() not in (1, 2):
            raise UserError(
                f"{type(self).__name__} expects a 1-D or 2-D input, got shape {tuple(x.shape)}"
            )
        if x.shape[-1] != self.input_size:
            raise UserError(
                f"{type(self).__name__} expects {self.input_size} input features, "
                f"got shape {tuple(x.shape)}"
            )
        return (x, True) if x.dim() == 2 else (x.unsqueeze(0), False)

    def _state(self, hx: Tensor | None, x: Tensor, size: int, batched: bool) -> Tensor:
        if hx is None:
            return x.new_zeros(x.shape[0], size)
        hx = hx if batched else hx.unsqueeze(0)
        if tuple(hx.shape) != (x.shape[0], size):
            raise UserError(
                f"{type(self).__name__}: hidden state of shape {tuple(hx.shape)} does not match "
                f"(batch {x.shape[0]}, {size})"
            )
        return hx


class UnrolledRNNCell(_Cell):
    """``nn.RNNCell`` (and one layer-direction of ``nn.RNN``) from two Linear layers."""

    mode = "RNN"

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, batched = self._check_input(input)
        h = _rnn_step(self, x, self._state(hx, x, self.out_size, batched))
        return h if batched else h.squeeze(0)


class UnrolledLSTMCell(_Cell):
    """``nn.LSTMCell`` (and one layer-direction of ``nn.LSTM``) from Linear layers."""

    mode = "LSTM"

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        x, batched = self._check_input(input)
        h0, c0 = (None, None) if hx is None else hx
        h = self._state(h0, x, self.out_size, batched)
        c = self._state(c0, x, self.hh.out_features // 4, batched)
        h, c = _lstm_step(self, x, h, c)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class UnrolledGRUCell(_Cell):
    """``nn.GRUCell`` (and one layer-direction of ``nn.GRU``) from two Linear layers."""

    mode = "GRU"

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, batched = self._check_input(input)
        h = _gru_step(self, x, self._state(hx, x, self.out_size, batched))
        return h if batched else h.squeeze(0)


_CELL_OF = {"RNN": UnrolledRNNCell, "LSTM": UnrolledLSTMCell, "GRU": UnrolledGRUCell}


def unroll_cell(cell: nn.RNNCellBase) -> _Cell:
    """The unrolled replacement of an ``nn.RNNCell`` / ``nn.LSTMCell`` / ``nn.GRUCell``."""
    mode = {nn.RNNCell: "RNN", nn.LSTMCell: "LSTM", nn.GRUCell: "GRU"}[_base_type(cell)]
    names = {n: _param(cell, n) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    new = _CELL_OF[mode](
        names["weight_ih"],
        names["weight_hh"],
        names["bias_ih"],
        names["bias_hh"],
        nonlinearity=getattr(cell, "nonlinearity", "tanh"),
    )
    new._remember(names)
    new.train(cell.training)
    return new


# ------------------------------------------------------------------------- whole modules


class UnrolledRNN(_Origin):
    """``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` as a Python loop over time of Linear cells.

    Same constructor-level attributes as the original (``input_size``, ``hidden_size``,
    ``num_layers``, ``bias``, ``batch_first``, ``dropout``, ``bidirectional``, ``proj_size``,
    ``mode``) and the same call: ``forward(input, hx=None)`` returns ``(output, h_n)`` (RNN, GRU)
    or ``(output, (h_n, c_n))`` (LSTM), same shapes and layout. Layer ``k``'s cells are the
    children ``l{k}`` and, if bidirectional, ``l{k}_reverse`` (an :class:`UnrolledRNNCell`,
    :class:`UnrolledLSTMCell` or :class:`UnrolledGRUCell`). A ``PackedSequence`` input is refused
    (pad it and pass the padded tensor).
    """

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        base = _base_type(rnn)
        self.mode = {nn.RNN: "RNN", nn.LSTM: "LSTM", nn.GRU: "GRU"}[base]
        self.nonlinearity = getattr(rnn, "nonlinearity", "tanh")
        self.input_size = rnn.input_size
        self.hidden_size = rnn.hidden_size
        self.num_layers = rnn.num_layers
        self.bias = rnn.bias
        self.batch_first = rnn.batch_first
        self.dropout = float(rnn.dropout)
        self.bidirectional = rnn.bidirectional
        self.proj_size = getattr(rnn, "proj_size", 0)
        origin: dict[str, nn.Parameter | None] = {}
        for layer in range(self.num_layers):
            for sfx in ("", "_reverse") if self.bidirectional else ("",):
                names = [f"{n}_l{layer}{sfx}" for n in ("weight_ih", "weight_hh", "bias_ih")]
                names += [f"bias_hh_l{layer}{sfx}", f"weight_hr_l{layer}{sfx}"]
                params = [_param(rnn, n) for n in names]
                origin.update(zip(names, params, strict=True))
                self.add_module(
                    f"l{layer}{sfx}",
                    _CELL_OF[self.mode](*params, nonlinearity=self.nonlinearity),
                )
        self._remember(origin)
        self.train(rnn.training)

    def flatten_parameters(self) -> None:
        """No-op (there is no flat cuDNN buffer); kept because models call it in forward."""

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def out_size(self) -> int:
        """Features of h (``proj_size`` if set, else ``hidden_size``)."""
        return self.proj_size or self.hidden_size

    def extra_repr(self) -> str:
        s = f"{self.mode}: {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        for name, default in (("bias", True), ("batch_first", False), ("dropout", 0.0)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        return s

    def _initial(self, hx: Tensor | None, size: int, batch: int, like: Tensor, what: str) -> Tensor:
        shape = (self.num_layers * self.num_directions, batch, size)
        if hx is None:
            return like.new_zeros(shape)
        if tuple(hx.shape) != shape:
            raise UserError(
                f"{self.mode}: {what} has shape {tuple(hx.shape)}, expected {shape} "
                "(num_layers * num_directions, batch, features)"
            )
        return hx

    def forward(self, input: Tensor, hx: Any = None) -> tuple[Tensor, Any]:
        if isinstance(input, PackedSequence):
            raise UserError(
                f"the unrolled {self.mode} does not take a PackedSequence; pass the padded "
                "tensor (torch.nn.utils.rnn.pad_packed_sequence) and mask the padded steps"
            )
        if input.dim() not in (2, 3):
            raise UserError(f"{self.mode} expects a 2-D or 3-D input, got {tuple(input.shape)}")
        if input.shape[-1] != self.input_size:
            raise UserError(
                f"{self.mode} expects {self.input_size} input features, got {tuple(input.shape)}"
            )
        batched = input.dim() == 3
        x = input if not batched else (input if self.batch_first else input.transpose(0, 1))
        if not batched:
            x = x.unsqueeze(0)
        lstm = self.mode == "LSTM"
        h0, c0 = (hx if hx is not None else (None, None)) if lstm else (hx, None)
        if not batched:
            h0 = None if h0 is None else h0.unsqueeze(1)
            c0 = None if c0 is None else c0.unsqueeze(1)
        batch, steps = x.shape[0], x.shape[1]
        h0 = self._initial(h0, self.out_size, batch, x, "h0")
        if lstm:
            c0 = self._initial(c0, self.hidden_size, batch, x, "c0")
        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        seq = list(x.unbind(1))  # T tensors [B, F]
        for layer in range(self.num_layers):
            outs = []
            for d, sfx in enumerate(("", "_reverse")[: self.num_directions]):
                cell = getattr(self, f"l{layer}{sfx}")
                k = layer * self.num_directions + d
                h = h0[k]
                c = c0[k] if lstm else None
                out: list[Tensor] = [h] * steps
                for t in range(steps - 1, -1, -1) if d else range(steps):
                    if lstm:
                        h, c = _lstm_step(cell, seq[t], h, c)
                    elif self.mode == "GRU":
                        h = _gru_step(cell, seq[t], h)
                    else:
                        h = _rnn_step(cell, seq[t], h)
                    out[t] = h
                h_n.append(h)
                if lstm:
                    c_n.append(c)
                outs.append(out)
            seq = [torch.cat(parts, dim=-1) for parts in zip(*outs, strict=True)]
            if self.dropout and self.training and layer < self.num_layers - 1:
                seq = list(F.dropout(torch.stack(seq, 1), self.dropout, True).unbind(1))
        output = torch.stack(seq, 1)  # [B, T, D * out]
        hn = torch.stack(h_n, 0)
        cn = torch.stack(c_n, 0) if lstm else None
        if not batched:
            output, hn = output.squeeze(0), hn.squeeze(1)
            cn = None if cn is None else cn.squeeze(1)
        elif not self.batch_first:
            output = output.transpose(0, 1)
        return output, ((hn, cn) if lstm else hn)


_RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)
_CELLS = (nn.RNNCell, nn.LSTMCell, nn.GRUCell)


def _base_type(module: nn.Module) -> type:
    """The torch class among RNN/LSTM/GRU and their cells that ``module`` is; a subclass with
    its own ``forward`` is refused (unrolling would drop that forward)."""
    for base in (*_RECURRENT, *_CELLS):
        if isinstance(module, base):
            if type(module).forward is not base.forward:
                raise UserError(
                    f"{type(module).__name__} subclasses nn.{base.__name__} with its own forward; "
                    "decorrelate.layers.unroll cannot unroll it (replace it by a plain "
                    f"nn.{base.__name__} or register a layer kind for it)"
                )
            return base
    raise TypeError(f"{type(module).__name__} is not a recurrent module")


def is_recurrent(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.RNN`` / ``LSTM`` / ``GRU`` or one of their cells."""
    return isinstance(module, _RECURRENT + _CELLS)


def unroll_recurrent(module: nn.Module) -> nn.Module:
    """The unrolled replacement of a recurrent module or cell (see the module docstring)."""
    if isinstance(module, _CELLS):
        return unroll_cell(module)
    return UnrolledRNN(module)  # which checks the type (_base_type)
