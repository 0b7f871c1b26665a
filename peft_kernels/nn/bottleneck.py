"""Bottleneck adapters (AdapterHub semantics): ``BottleneckAdapter`` and ``AdapterLinear``."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dispatch
from ..ops.bottleneck import MODES, adapter_linear, bottleneck_adapter
from ..reference import ACTIVATIONS
from .lora import adopt_frozen_base

# AdapterHub's presets: Pfeiffer (seq_bn) and Houlsby (double_seq_bn), reduction factor 16
PRESETS = {"pfeiffer": dict(activation="relu", reduction_factor=16),
           "houlsby": dict(activation="swish", reduction_factor=16)}
INITS = ("bert", "mam")


def _apply_preset(preset, activation, reduction_factor):
    """Explicit arguments win; a preset fills in what was left unset; then the plain defaults."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
        activation = PRESETS[preset]["activation"] if activation is None else activation
        reduction_factor = PRESETS[preset]["reduction_factor"] if reduction_factor is None else reduction_factor
    return (activation if activation is not None else "relu",
            reduction_factor if reduction_factor is not None else 16)


def _check(activation, init, scaling, dropout, backend):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not (scaling in ("learned", "channel") or (isinstance(scaling, (int, float)) and not isinstance(scaling, bool)
                                                   and math.isfinite(scaling))):
        raise ValueError(f"scaling must be a finite float, 'learned' or 'channel', got {scaling!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {dispatch.BACKENDS}, got {backend!r}")


def _bottleneck_size(features: int, bottleneck_size: Optional[int], reduction_factor) -> int:
    if bottleneck_size is None:
        if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, (int, float)) or reduction_factor <= 0:
            raise ValueError(f"reduction_factor must be a positive number, got {reduction_factor!r}")
        return max(1, int(features // reduction_factor))
    if isinstance(bottleneck_size, bool) or not isinstance(bottleneck_size, int) or bottleneck_size < 1:
        raise ValueError(f"bottleneck_size must be a positive int, got {bottleneck_size!r}")
    return bottleneck_size


class _AdapterParams(nn.Module):
    """The adapter's own parameters: ``adapter_down`` [b, in] and ``adapter_up`` [out, b] (nn.Linear,
    AdapterHub's names without the Sequential index), and ``adapter_scaling`` when learned."""

    def _init_adapter(self, in_f: int, b: int, out_f: int, activation: str, scaling, init: str, dropout: float,
                      backend: str, device, dtype):
        self.activation = activation
        self.init = init
        self.dropout = float(dropout)
        self.backend = backend
        self.adapter_down = nn.Linear(in_f, b, device=device, dtype=dtype)
        self.adapter_up = nn.Linear(b, out_f, device=device, dtype=dtype)
        self.scaling_kind = scaling if isinstance(scaling, str) else "float"
        if scaling == "learned":
            self.adapter_scaling = nn.Parameter(torch.ones((), device=device, dtype=dtype))
        elif scaling == "channel":
            self.adapter_scaling = nn.Parameter(torch.ones(out_f, device=device, dtype=dtype))
        else:
            self.adapter_scaling = None
            self.scaling_value = float(scaling)
        self.reset_adapter_parameters()

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """``"bert"`` (AdapterHub's default): weights ~ N(0, 0.02), biases 0, so the up-projection is near
        zero and a fresh adapter is close to the identity. ``"mam"``: kaiming-uniform down, zero up."""
        if self.init == "bert":
            nn.init.normal_(self.adapter_down.weight, std=0.02)
            nn.init.normal_(self.adapter_up.weight, std=0.02)
        else:
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.bias)

    def _scaling(self):
        return self.adapter_scaling if self.adapter_scaling is not None else self.scaling_value

    def _adapter_args(self):
        return (self.adapter_down.weight, self.adapter_down.bias, self.adapter_up.weight, self.adapter_up.bias,
                self._scaling())


class BottleneckAdapter(_AdapterParams):
    """``out = h + scaling · up(act(down(h)))`` (or the adapter output alone with ``residual=False``).

    ``bottleneck_size`` defaults to ``hidden_size // reduction_factor``. ``scaling``: a float,
    ``"learned"`` (a scalar parameter) or ``"channel"`` (a per-channel vector), initialised to 1.
    ``dropout`` applies to the adapter output in training (not fused: it costs one extra pass).
    ``preset="pfeiffer"`` (relu, reduction 16) or ``"houlsby"`` (swish, reduction 16) fill in the
    AdapterHub defaults for whatever is left unset; without a preset: relu, reduction 16.
    """

    def __init__(self, hidden_size: int, bottleneck_size: Optional[int] = None,
                 reduction_factor: Optional[float] = None, activation: Optional[str] = None, scaling: Union[float, str] = 1.0, residual: bool = True,
                 dropout: float = 0.0, init: str = "bert", *, preset: Optional[str] = None, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        activation, reduction_factor = _apply_preset(preset, activation, reduction_factor)
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        _check(activation, init, scaling, dropout, backend)
        self.hidden_size = hidden_size
        self.bottleneck_size = _bottleneck_size(hidden_size, bottleneck_size, reduction_factor)
        self.residual = bool(residual)
        self._init_adapter(hidden_size, self.bottleneck_size, hidden_size, activation, scaling, init, dropout,
                           backend, device, dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        args = self._adapter_args()
        if self.dropout > 0 and self.training:
            a = bottleneck_adapter(h, *args, activation=self.activation, residual=False, backend=self.backend)
            a = F.dropout(a, self.dropout, True)
            return h + a if self.residual else a
        return bottleneck_adapter(h, *args, activation=self.activation, residual=self.residual, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, "
                f"activation={self.activation!r}, scaling={self.scaling_kind if self.adapter_scaling is not None else self.scaling_value}, "
                f"residual={self.residual}, dropout={self.dropout}")


class AdapterLinear(_AdapterParams):
    """A frozen ``nn.Linear`` (``weight``/``bias``, nn.Linear's names) with a bottleneck adapter.

    ``mode="sequential"`` (Pfeiffer/Houlsby placement on a sublayer's output):
    ``y = W·x + b; out = y + s·up(act(down(y)))``. ``mode="parallel"`` (He et al. 2022):
    ``out = W·x + b + s·up(act(down(x)))``. Build one with :meth:`from_linear`.
    """

    def __init__(self, in_features: int, out_features: int, bottleneck_size: Optional[int] = None,
                 reduction_factor: Optional[float] = None, activation: Optional[str] = None, mode: str = "sequential",
                 scaling: Union[float, str] = 1.0, dropout: float = 0.0, init: str = "bert", bias: bool = True, *,
                 preset: Optional[str] = None, backend: str = "auto", device=None, dtype=None,
                 _base: Optional[nn.Linear] = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        activation, reduction_factor = _apply_preset(preset, activation, reduction_factor)
        _check(activation, init, scaling, dropout, backend)
        adopt_frozen_base(self, _base, in_features, out_features, bias, device, dtype)
        self.mode = mode
        adapter_in = self.out_features if mode == "sequential" else self.in_features
        self.bottleneck_size = _bottleneck_size(adapter_in, bottleneck_size, reduction_factor)
        self._init_adapter(adapter_in, self.bottleneck_size, self.out_features, activation, scaling, init, dropout,
                           backend, self.weight.device, self.weight.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bottleneck_size: Optional[int] = None,
                    reduction_factor: Optional[float] = None, activation: Optional[str] = None, mode: str = "sequential", scaling: Union[float, str] = 1.0,
                    dropout: float = 0.0, init: str = "bert", *, preset: Optional[str] = None,
                    backend: str = "auto") -> "AdapterLinear":
        """Wrap ``linear``: its own weight/bias Parameters are reused (no copy) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(linear.in_features, linear.out_features, bottleneck_size, reduction_factor, activation, mode,
                   scaling, dropout, init, preset=preset, backend=backend, _base=linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = self._adapter_args()
        if self.dropout > 0 and self.training:  # unfused: base, then the adapter output with dropout
            y = F.linear(x, self.weight, self.bias)
            a = bottleneck_adapter(y if self.mode == "sequential" else x, *args, activation=self.activation,
                                   residual=False, backend=self.backend)
            return y + F.dropout(a, self.dropout, True)
        return adapter_linear(x, self.weight, self.bias, *args, activation=self.activation, mode=self.mode,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode!r}, "
                f"bottleneck_size={self.bottleneck_size}, activation={self.activation!r}, dropout={self.dropout}")
