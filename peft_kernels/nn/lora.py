"""``LoRALinear``: a drop-in ``nn.Linear`` with a fused LoRA update."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dispatch, quant
from ..ops.dora import dora_linear, dora_weight_norm
from ..ops.lora import lora_linear
from ._disabled import adapters_disabled


def is_conv1d(m: nn.Module) -> bool:
    """transformers' GPT-2-style ``Conv1D``: a linear layer whose weight is stored [in, out]."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None \
        and m.weight.dim() == 2


def base_features(linear: nn.Module):
    """(in_features, out_features) of an nn.Linear or a Conv1D; TypeError for anything else."""
    if isinstance(linear, nn.Linear):
        return linear.in_features, linear.out_features
    if is_conv1d(linear):
        return tuple(linear.weight.shape)
    raise TypeError(f"linear must be an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")


def adopt_frozen_base(module: nn.Module, base: Optional[nn.Module], in_features, out_features, bias, device,
                      dtype) -> None:
    """Give ``module`` the frozen ``weight``/``bias`` of ``base`` (its Parameters, reused) or of a new nn.Linear.

    A ``Conv1D`` base keeps its [in, out] weight (``module.fan_in_fan_out = True``; the ops read its
    transpose, a view), so its state-dict keys and shapes stay the checkpoint's."""
    if base is None:
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
    # the wrapped layer itself (not a submodule: its Parameters are this module's), for peft_kernels.unload
    object.__setattr__(module, "_original_base", base)
    module.fan_in_fan_out = is_conv1d(base)
    if module.fan_in_fan_out:
        module.in_features, module.out_features = base.weight.shape
    else:
        module.in_features = base.in_features
        module.out_features = base.out_features
    module.weight = base.weight
    module.bias = base.bias
    module.weight.requires_grad_(False)
    if module.bias is not None:
        module.bias.requires_grad_(False)


def load_unmerged(module: nn.Module, load) -> None:
    """Run ``load`` (a state-dict load of an unmerged layer) with ``module`` unmerged, merging it again after."""
    was_merged = module.merged
    if was_merged:
        module.unmerge()
    load()
    if was_merged:
        module.merge()


def _check_unmerged(m: nn.Module) -> None:
    if getattr(m, "merged", False):
        raise ValueError(f"{type(m).__name__}: adapters are disabled (peft_kernels.disable_adapters) but this layer is "
                         "merged, so its weight holds the update; unmerge it first")


class LoRALinear(nn.Module):
    """Frozen ``nn.Linear`` plus a trainable low-rank update, HF PEFT semantics.

    ``y = x·Wᵀ + b + scaling · B·A·dropout(x)``, ``scaling = lora_alpha / r`` (or
    ``lora_alpha / sqrt(r)`` with ``use_rslora``).

    Parameters keep nn.Linear's names, so an ``nn.Linear`` checkpoint loads into the base:
    ``weight`` [out, in] and ``bias`` [out] (frozen), plus trainable ``lora_A`` [r, in] and
    ``lora_B`` [out, r] (the HF PEFT layouts of ``lora_A.weight`` / ``lora_B.weight``).

    ``init_lora_weights``: True (kaiming-uniform A, zero B: the layer starts equal to the base),
    ``"gaussian"`` (A ~ N(0, std=1/r), zero B), or False (random A and B, for tests).
    ``lora_dtype``: dtype of the LoRA parameters (default: the base weight's dtype; float32 on a
    half-precision base mirrors HF PEFT's ``autocast_adapter_dtype``).

    ``use_dora=True``: DoRA with HF PEFT's math (``peft_kernels.ops.dora``): a trainable
    ``lora_magnitude_vector`` [out] m, initialised to ``‖W + scaling·B·A‖`` per row, and
    ``y = (m / ‖W + scaling·B·A‖) ⊙ (x·Wᵀ + scaling·B·A·x) + b`` with the norm detached. The norm is
    computed without forming B·A, in fp64 (its terms can cancel), from the current weights every call.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        init_lora_weights: Union[bool, str] = True,
        device=None,
        dtype=None,
        backend: str = "auto",
        lora_dtype: Optional[torch.dtype] = None,
        *,
        lora_bias: bool = False,
        use_dora: bool = False,
        _base: Optional[nn.Linear] = None,
    ):
        super().__init__()
        self._check_hparams(r, lora_alpha, lora_dropout, init_lora_weights, backend)
        self._adopt_base(_base, in_features, out_features, bias, device, dtype)
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.backend = backend
        ldtype = lora_dtype if lora_dtype is not None else self._default_lora_dtype()
        if not ldtype.is_floating_point:
            raise TypeError(f"lora_dtype must be a floating dtype, got {ldtype}")
        dev = self.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=dev, dtype=ldtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, device=dev, dtype=ldtype))
        # PEFT's lora_bias: lora_B is a Linear with a bias, so the update is scaling·(B·A·x + b_B)
        self.lora_bias = bool(lora_bias)
        self.lora_B_bias = (nn.Parameter(torch.zeros(self.out_features, device=dev, dtype=ldtype))
                            if self.lora_bias else None)
        self.init_lora_weights = init_lora_weights
        self.merged = False
        self._merged_with = None
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be a bool, got {use_dora!r}")
        if use_dora and lora_bias:
            raise ValueError("use_dora=True with lora_bias=True is not supported (neither is it by HF PEFT)")
        self._check_dora(use_dora)
        self.use_dora = use_dora
        self.lora_magnitude_vector = (nn.Parameter(torch.empty(self.out_features, device=dev, dtype=ldtype))
                                      if use_dora else None)
        self.reset_lora_parameters()

    def _adopt_base(self, base, in_features, out_features, bias, device, dtype) -> None:
        adopt_frozen_base(self, base, in_features, out_features, bias, device, dtype)

    def _check_dora(self, use_dora: bool) -> None:
        pass

    def _default_lora_dtype(self) -> torch.dtype:
        return self.weight.dtype

    @staticmethod
    def _check_hparams(r, lora_alpha, lora_dropout, init_lora_weights, backend):
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)):
            raise TypeError(f"lora_alpha must be a number, got {lora_alpha!r}")
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
            raise ValueError(f"lora_dropout must be a float in [0, 1), got {lora_dropout!r}")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        if backend not in dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {dispatch.BACKENDS}, got {backend!r}")

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                    backend: str = "auto", lora_dtype: Optional[torch.dtype] = None,
                    lora_bias: bool = False, use_dora: bool = False) -> "LoRALinear":
        """Wrap ``linear`` (an nn.Linear, or a GPT-2-style Conv1D: fan_in_fan_out): its own weight/bias
        Parameters are reused (no copy) and frozen."""
        in_f, out_f = base_features(linear)
        if cls is LoRALinear and quant.kind_of(linear) is not None:
            from .qlora import QLoRALinear  # a quantized frozen base (bitsandbytes, torchao)

            cls = QLoRALinear
        return cls(in_f, out_f, r=r, lora_alpha=lora_alpha,
                   lora_dropout=lora_dropout, use_rslora=use_rslora, init_lora_weights=init_lora_weights,
                   backend=backend, lora_dtype=lora_dtype, lora_bias=lora_bias, use_dora=use_dora, _base=linear)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        init = self.init_lora_weights
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)
        if self.use_dora:
            self.reset_dora_magnitude()

    @torch.no_grad()
    def reset_dora_magnitude(self) -> None:
        """m = ‖W + scaling·B·A‖ per row (the layer then equals plain LoRA), as PEFT initialises it."""
        if not self.use_dora:
            raise RuntimeError("reset_dora_magnitude(): this layer was built with use_dora=False")
        self.lora_magnitude_vector.copy_(self.dora_weight_norm())

    def dora_weight_norm(self) -> torch.Tensor:
        """‖W + scaling·B·A‖ per output row (fp32, detached), from the current W, A and B every time (no cache:
        a cache keyed on versions missed updates made through ``.data``)."""
        return dora_weight_norm(self.base_weight(), self.lora_A, self.lora_B, self.scaling)

    # ---------------------------------------------------------------------------------- forward
    def base_weight(self) -> torch.Tensor:
        """The frozen weight as [out, in] (a transposed view for a Conv1D base)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _lora_bias_term(self) -> torch.Tensor:
        return (self.lora_B_bias * self.scaling).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if adapters_disabled(self):
            _check_unmerged(self)
            return F.linear(x, self.base_weight(), self.bias)
        if self.merged:
            return F.linear(x, self.base_weight(), self.bias)
        group = self.__dict__.get("_siblings")  # nn/siblings.py: q/k/v-style layers fused into one op
        if group is not None and group.enabled and not torch.compiler.is_compiling():
            out = group.member_forward(self, x)
            if out is not None:
                return out
        bias = self.bias
        if self.lora_bias:  # differentiable in lora_B_bias through the op's bias gradient
            bias = self._lora_bias_term() if bias is None else bias + self._lora_bias_term()
        if self.use_dora:
            return dora_linear(x, self.base_weight(), bias, self.lora_A, self.lora_B, self.scaling,
                               self.lora_magnitude_vector, dropout_p=self.lora_dropout, training=self.training,
                               backend=self.backend, weight_norm=self.dora_weight_norm())
        return lora_linear(x, self.base_weight(), bias, self.lora_A, self.lora_B, self.scaling,
                           dropout_p=self.lora_dropout, training=self.training, backend=self.backend)

    # ------------------------------------------------------------------------------------ merge
    def delta_weight(self) -> torch.Tensor:
        """``scaling · B·A`` in fp32, in the stored weight's layout (transposed for a Conv1D base)."""
        return self._delta(self.lora_A, self.lora_B, self.scaling)

    def _delta(self, A, B, scaling: float) -> torch.Tensor:
        d = (B.float() @ A.float()) * scaling
        return d.t() if self.fan_in_fan_out else d

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Fold the LoRA update into ``weight`` (forward then runs the plain linear)."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): already merged; call unmerge() first")
        if self.lora_bias and self.bias is None:
            raise ValueError("LoRALinear.merge(): lora_bias needs a base bias to merge into; this layer has none")
        new = self._merged_weight_fp32().to(self.weight.dtype)
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError("LoRALinear.merge(safe_merge=True): merging would produce NaN/Inf weights; "
                             "the layer was left unmerged")
        # what was folded in, so unmerge() takes out exactly that even if A, B, the scaling or the magnitude
        # change while merged (the base is shared with the user's original nn.Linear)
        self._merged_with = {"lora_A": self.lora_A.detach().clone(), "lora_B": self.lora_B.detach().clone(),
                             "scaling": torch.tensor(float(self.scaling), dtype=torch.float64)}
        if self.lora_bias:
            self._merged_with["bias_term"] = self._lora_bias_term().detach().clone()
        if self.use_dora:
            self._merged_with["factor"] = self._merge_factor
        self.weight.copy_(new)
        if self.lora_bias:
            self.bias.add_(self._merged_with["bias_term"])
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take out of ``weight`` (and ``bias``) exactly what ``merge()`` folded in: the A, B, scaling and DoRA
        factor of that moment, whatever changed since. The base comes back to within the rounding of
        (W + Δ) − Δ in its dtype."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): the layer is not merged")
        w, b = self._unmerged_base()
        self.weight.copy_(w)
        if b is not None:
            self.bias.copy_(b)
        self.merged = False
        self._merged_with = None

    @torch.no_grad()
    def _unmerged_base(self):
        """(weight, bias) with what ``merge()`` folded in taken out; bias is None when merge() did not touch it."""
        mw = self._merged_with
        delta = self._delta(mw["lora_A"], mw["lora_B"], float(mw["scaling"]))
        w = self.weight.float()
        if self.use_dora:  # W = W' / g − scaling·B·A, with g the factor merge() applied
            w = w / mw["factor"].reshape(self._g_shape())
        b = self.bias - mw["bias_term"] if "bias_term" in mw else None
        return (w - delta).to(self.weight.dtype), b

    # A state dict always holds the unmerged base, whether or not the layer is merged, so loading it into a
    # fresh (unmerged) layer cannot add the update twice, and the keys stay those of a plain layer.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            w, b = self._unmerged_base()
            destination[prefix + "weight"] = w
            if b is not None:
                destination[prefix + "bias"] = b

    def _load_from_state_dict(self, *args):
        # what is loaded is an unmerged base; a merged layer folds the loaded A, B (and magnitude) back in
        load_unmerged(self, lambda: super(LoRALinear, self)._load_from_state_dict(*args))

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new plain ``nn.Linear`` with the LoRA update merged in (this layer is unchanged)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        w = self.weight.float() if self.merged else self._merged_weight_fp32()
        lin.weight.copy_((w.t() if self.fan_in_fan_out else w).to(self.weight.dtype))
        if self.bias is not None:
            lin.bias.copy_(self.bias if self.merged or not self.lora_bias else self.bias + self._lora_bias_term())
        return lin

    def _g_shape(self):
        return (1, -1) if self.fan_in_fan_out else (-1, 1)

    def _merged_weight_fp32(self) -> torch.Tensor:
        """W + scaling·B·A (DoRA: scaled per output row by m / ‖W + scaling·B·A‖), fp32, stored layout."""
        w = self.weight.float() + self.delta_weight()
        if self.use_dora:
            g = self.lora_magnitude_vector.float() / dora_weight_norm(self.base_weight(), self.lora_A, self.lora_B,
                                                                       self.scaling)
            self._merge_factor = g.detach().clone()
            w = w * g.reshape(self._g_shape())
        return w

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"use_rslora={self.use_rslora}, backend={self.backend!r}, merged={self.merged}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else "") + (", use_dora=True" if self.use_dora else ""))
