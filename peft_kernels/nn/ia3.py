"""``IA3Linear``: a frozen linear layer with a learned (IA)³ scaling vector, HF PEFT semantics."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dispatch, quant
from ..ops.ia3 import ia3_linear
from ._disabled import adapters_disabled
from .lora import adopt_frozen_base, base_features


class IA3Linear(nn.Module):
    """``y = (x·Wᵀ + b) ⊙ l`` (output scaling: attention k/v), or ``y = (x ⊙ l)·Wᵀ + b`` with
    ``feedforward=True`` (input scaling: PEFT's ``feedforward_modules``).

    ``weight``/``bias`` keep nn.Linear's names and are frozen; the trainable ``ia3_l`` has PEFT's layout
    ([out, 1], or [1, in] for feedforward), so a PEFT IA3 checkpoint's ``ia3_l`` tensors load as they are.
    ``init_ia3_weights=True`` starts l at ones (the layer equals the base), as PEFT does.
    """

    def __init__(self, in_features: int, out_features: int, feedforward: bool = False, bias: bool = True,
                 init_ia3_weights: bool = True, device=None, dtype=None, backend: str = "auto", *,
                 _base=None):
        super().__init__()
        if not isinstance(feedforward, bool):
            raise TypeError(f"feedforward must be a bool, got {feedforward!r}")
        if backend not in dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {dispatch.BACKENDS}, got {backend!r}")
        self._adopt_base(_base, in_features, out_features, bias, device, dtype)
        self.feedforward = feedforward
        self.backend = backend
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.empty(shape, device=self.weight.device, dtype=self._param_dtype()))
        self.init_ia3_weights = bool(init_ia3_weights)
        self.reset_ia3_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Module, feedforward: bool = False, init_ia3_weights: bool = True,
                    backend: str = "auto") -> "IA3Linear":
        """Wrap ``linear`` (nn.Linear or GPT-2 Conv1D): its weight/bias Parameters are reused and frozen."""
        in_f, out_f = base_features(linear)
        if cls is IA3Linear and quant.kind_of(linear) is not None:
            from .qlora import QIA3Linear  # a quantized frozen base (bitsandbytes, torchao)

            cls = QIA3Linear
        return cls(in_f, out_f, feedforward, init_ia3_weights=init_ia3_weights, backend=backend, _base=linear)

    def _adopt_base(self, base, in_features, out_features, bias, device, dtype) -> None:
        adopt_frozen_base(self, base, in_features, out_features, bias, device, dtype)

    def _param_dtype(self) -> torch.dtype:
        return self.weight.dtype

    @torch.no_grad()
    def reset_ia3_parameters(self) -> None:
        if self.init_ia3_weights:
            self.ia3_l.fill_(1.0)
        else:
            self.ia3_l.normal_(1.0, 0.1)

    def base_weight(self) -> torch.Tensor:
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if adapters_disabled(self):
            return F.linear(x, self.base_weight(), self.bias)
        return ia3_linear(x, self.base_weight(), self.bias, self.ia3_l, feedforward=self.feedforward,
                          backend=self.backend)

    def _scaled(self):
        """(W', b') with the scaling folded in: W⊙l per column (input) or per row (+ b⊙l) (output)."""
        l = self.ia3_l.reshape(-1).float()
        W = self.base_weight().float()
        if self.feedforward:
            return W * l[None, :], None if self.bias is None else self.bias.float()
        return W * l[:, None], None if self.bias is None else self.bias.float() * l

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new plain nn.Linear with the scaling merged in (this layer is unchanged)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        W, b = self._scaled()
        lin.weight.copy_(W)
        if b is not None:
            lin.bias.copy_(b)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"feedforward={self.feedforward}, backend={self.backend!r}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else ""))
