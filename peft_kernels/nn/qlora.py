"""``QLoRALinear``: :class:`LoRALinear` on a quantized frozen base (bitsandbytes 4/8-bit, torchao weight-only).

``LoRALinear.from_linear`` (and so ``inject_lora``, ``load_peft_adapter`` and ``from_peft``) returns one when
the layer is quantized (``peft_kernels.quant``). The quantized layer is kept whole as ``base_layer`` (its
packed weight and quantization state, saved under its own keys, as PEFT keeps it); nothing dequantized is
stored. ``weight`` and ``bias`` read the base layer's.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

from ..ops.dora import dora_weight_norm
from ..ops.qlora import qdora_linear, qia3_linear, qlora_linear
from ..quant import QuantBase
from .ia3 import IA3Linear
from ._disabled import adapters_disabled
from .lora import LoRALinear, _check_unmerged
from .multi_lora import MultiLoRALinear

MERGE_WARNING = ("Merging LoRA into a quantized base layer requantizes the merged weight: outputs may differ by "
                 "the quantization's rounding (as with PEFT's merge on bitsandbytes/torchao layers)")


class QuantBaseModule:
    """What a module on a quantized frozen base shares: the layer kept whole as ``base_layer`` (frozen), its
    ``QuantBase`` reader, ``weight``/``bias`` read from it, the float dtype it dequantizes to, and requantizing a
    merged weight into it as PEFT does."""

    def _adopt_quant(self, base) -> None:
        if base is None:
            raise TypeError(f"{type(self).__name__} wraps an existing quantized layer: use .from_linear(layer)")
        self.quant_base = QuantBase(base)
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.fan_in_fan_out = False
        self.in_features, self.out_features = self.quant_base.in_features, self.quant_base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def base_weight(self) -> torch.Tensor:
        """The dequantized frozen weight [out, in] in float32 (a temporary: merging and tests)."""
        return self.quant_base.dequantize(torch.float32)

    def _float_dtype(self) -> torch.dtype:
        k, w = self.quant_base.kind, self.weight
        if k in ("bnb-nf4", "bnb-fp4"):
            return getattr(self.base_layer, "compute_dtype", None) or self.quant_base.float_dtype()
        if k == "bnb-int8":
            return self.bias.dtype if self.bias is not None else torch.float32
        return w.dtype

    def _requantize(self, w: torch.Tensor) -> None:
        """Replace the base layer's quantized weight by ``w`` (fp32 [out, in]) quantized the same way."""
        layer, old, kind = self.base_layer, self.weight, self.quant_base.kind
        dev = old.device
        if kind in ("bnb-nf4", "bnb-fp4"):
            import bitsandbytes as bnb

            kw = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
            kw.update(bnb_quantized=False, requires_grad=False)
            kw.pop("quant_state", None)
            layer.weight = bnb.nn.Params4bit(w.to(self.quant_base.float_dtype()).cpu(), **kw).to(dev)
        elif kind == "bnb-int8":
            import bitsandbytes as bnb

            layer.weight = bnb.nn.Int8Params(w.to(torch.float16).cpu(), requires_grad=False,
                                             has_fp16_weights=False).to(dev)
            layer.state.reset_grads()
        else:
            from torchao.quantization import quantize_

            cfg = _torchao_config(old)
            layer.weight = nn.Parameter(w.to(old.dtype), requires_grad=False)
            quantize_(layer, cfg)
            layer.weight.requires_grad_(False)
        self.quant_base = QuantBase(layer)


class QLoRALinear(QuantBaseModule, LoRALinear):
    """Frozen quantized base + trainable low-rank update: ``y = x·deq(W)ᵀ + b + scaling·B·A·dropout(x)``.

    The LoRA parameters are float32 by default (PEFT's QLoRA adapters are). ``merge()`` requantizes
    ``W + scaling·B·A`` into the base layer, as PEFT does (with its rounding warning); ``unmerge()``
    dequantizes, subtracts and requantizes again. ``to_linear()`` returns a float ``nn.Linear`` with the
    update merged (no requantization). DoRA (``use_dora=True``): ``ops.qlora.qdora_linear``, its weight norm
    from the quantized weight in row chunks.
    """

    def _adopt_base(self, base, in_features, out_features, bias, device, dtype) -> None:
        self._adopt_quant(base)

    def _default_lora_dtype(self) -> torch.dtype:
        return torch.float32

    def dora_weight_norm(self) -> torch.Tensor:
        """‖deq(W) + scaling·B·A‖ per row, from the quantized weight in row chunks (no dequantized copy)."""
        return dora_weight_norm(self.quant_base, self.lora_A, self.lora_B, self.scaling)

    def _merged_weight_fp32(self) -> torch.Tensor:
        w = self.base_weight() + self.delta_weight()
        if self.use_dora:
            g = self.lora_magnitude_vector.float() / self.dora_weight_norm()
            self._merge_factor = g.detach().clone()
            w = w * g[:, None]
        return w

    def _lora_bias_term(self) -> torch.Tensor:
        return self.lora_B_bias * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if adapters_disabled(self):
            _check_unmerged(self)
            return self.base_layer(x)
        if self.merged:
            return self.base_layer(x)
        bias = self.bias
        if self.lora_bias:
            bias = self._lora_bias_term() if bias is None else bias + self._lora_bias_term()
        if self.use_dora:
            return qdora_linear(x, self.quant_base, bias, self.lora_A, self.lora_B, self.scaling,
                                self.lora_magnitude_vector, dropout_p=self.lora_dropout, training=self.training,
                                backend=self.backend, weight_norm=self.dora_weight_norm())
        return qlora_linear(x, self.quant_base, bias, self.lora_A, self.lora_B, self.scaling,
                            dropout_p=self.lora_dropout, training=self.training, backend=self.backend)

    # ------------------------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        if self.merged:
            raise RuntimeError("QLoRALinear.merge(): already merged; call unmerge() first")
        if self.lora_bias:
            raise ValueError("QLoRALinear.merge(): lora_bias adapters do not merge into a quantized base")
        new = self._merged_weight_fp32()
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError("QLoRALinear.merge(safe_merge=True): merging would produce NaN/Inf weights; the layer "
                             "was left unmerged")
        warnings.warn(MERGE_WARNING, UserWarning, stacklevel=2)
        self._merged_with = {"lora_A": self.lora_A.detach().clone(), "lora_B": self.lora_B.detach().clone(),
                             "scaling": float(self.scaling)}
        if self.use_dora:
            self._merged_with["factor"] = self._merge_factor
        self._requantize(new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("QLoRALinear.unmerge(): the layer is not merged")
        mw = self._merged_with
        warnings.warn(MERGE_WARNING, UserWarning, stacklevel=2)
        w = self.base_weight()
        if self.use_dora:  # W = W' / g − scaling·B·A, with g the factor merge() applied
            w = w / mw["factor"][:, None]
        self._requantize(w - self._delta(mw["lora_A"], mw["lora_B"], mw["scaling"]))
        self.merged = False
        self._merged_with = None

    # the base layer saves itself (as it is: requantized when merged); LoRALinear's unmerged-base rewrite of
    # ``weight`` does not apply
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        nn.Module._load_from_state_dict(self, *args, **kwargs)

    @torch.no_grad()
    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A new float ``nn.Linear`` [in → out] carrying the dequantized weight with the LoRA update merged
        (``dtype``: default the base's compute/original dtype). This layer is unchanged."""
        dtype = dtype or self._float_dtype()
        w = self.base_weight() if self.merged else self._merged_weight_fp32()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None or self.lora_bias,
                        device=w.device, dtype=dtype)
        lin.weight.copy_(w)
        if lin.bias is not None:
            b = torch.zeros(self.out_features, device=w.device) if self.bias is None else self.bias.float()
            lin.bias.copy_(b + (self._lora_bias_term().float() if self.lora_bias and not self.merged else 0))
        return lin

def _torchao_config(w):
    import torchao.quantization as tq

    if type(w).__name__ == "Int8Tensor":
        return tq.Int8WeightOnlyConfig()
    return tq.IntxWeightOnlyConfig(weight_dtype=w.target_dtype, granularity=tq.PerGroup(int(w.block_size[-1])))


class QIA3Linear(QuantBaseModule, IA3Linear):
    """:class:`IA3Linear` on a quantized frozen base (``IA3Linear.from_linear`` returns one there):
    ``(x·deq(W)ᵀ + b) ⊙ l`` or ``(x ⊙ l)·deq(W)ᵀ + b`` (``ops.qlora.qia3_linear``); ``ia3_l`` is float32, as
    PEFT's. ``to_linear()`` returns a float ``nn.Linear`` with the scaling merged."""

    def _adopt_base(self, base, in_features, out_features, bias, device, dtype) -> None:
        self._adopt_quant(base)

    def _param_dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if adapters_disabled(self):
            return self.base_layer(x)
        return qia3_linear(x, self.quant_base, self.bias, self.ia3_l, feedforward=self.feedforward)

    @torch.no_grad()
    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        dtype = dtype or self._float_dtype()
        W, b = self._scaled()
        lin = nn.Linear(self.in_features, self.out_features, bias=b is not None, device=W.device, dtype=dtype)
        lin.weight.copy_(W)
        if b is not None:
            lin.bias.copy_(b)
        return lin


class QMultiLoRALinear(QuantBaseModule, MultiLoRALinear):
    """:class:`MultiLoRALinear` on a quantized frozen base (``MultiLoRALinear.from_linear`` returns one there): the
    base's output comes from the quantized weight in row chunks (``quant.base_linear``), and the slots' updates
    are the multi-adapter op's, unchanged. x runs in the base's compute dtype (bitsandbytes' ``compute_dtype``
    when set), the result in x's; the slots are float32 by default."""

    def _adopt_base(self, base, in_features, out_features, bias, device, dtype) -> None:
        self._adopt_quant(base)

    def _default_lora_dtype(self) -> torch.dtype:
        return torch.float32

    def _op_weight(self):
        return self.quant_base

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def forward(self, x: torch.Tensor, adapter_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        cdt = self.quant_base.compute_dtype(x.dtype) if isinstance(x, torch.Tensor) else None
        if cdt is None or cdt == x.dtype:
            return super().forward(x, adapter_ids)
        return super().forward(x.to(cdt), adapter_ids).to(x.dtype)
