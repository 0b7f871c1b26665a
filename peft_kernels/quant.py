"""Quantized frozen bases (QLoRA): bitsandbytes 4-bit and 8-bit layers, torchao weight-only tensors.

A quantized layer stays as it is (its packed weight, its quantization state, its own state-dict keys);
:class:`QuantBase` reads it. The weight is never kept dequantized: the ops dequantize it in row chunks
of a few MiB, each multiplied while it is in cache (:func:`base_mm`), in forward and again in backward.

Supported (``KINDS``):

==================  ==========================================================================
``bnb-nf4``         ``bitsandbytes.nn.Linear4bit`` with ``quant_type="nf4"``, with or without
``bnb-fp4``         double quantization (``compress_statistics``), any ``compute_dtype``
``bnb-int8``        ``bitsandbytes.nn.Linear8bitLt`` with int8 weights (``has_fp16_weights=False``)
``torchao-int8``    an ``nn.Linear`` whose weight is torchao's weight-only ``Int8Tensor``
``torchao-intx``    ... or torchao's weight-only ``IntxUnpackedToInt8Tensor`` (int4 weight-only on CPU:
                    ``IntxWeightOnlyConfig(weight_dtype=torch.int4)``)
==================  ==========================================================================

Anything else that is quantized (GPTQ, AWQ, HQQ, EETQ, AQLM layers, torchao tensors that also quantize
the activations, float8) is refused by :func:`check_layer` with the reason, before a model is changed.

The dequantized values are those of the quantizer's own dequantize, bit for bit: NF4/FP4 through
``torch.ops.peft_kernels.dequantize_4bit`` (csrc/cpu/dequant.cpp) or bitsandbytes' op when the
extension is not built; int8 with bitsandbytes' formula; torchao through the tensor's ``dequantize()``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from . import _ext

KINDS = ("bnb-nf4", "bnb-fp4", "bnb-int8", "torchao-int8", "torchao-intx")
SUPPORTED = ("bitsandbytes Linear4bit (nf4/fp4, double quantization or not) and Linear8bitLt (int8 weights); "
             "torchao weight-only Int8Tensor and IntxUnpackedToInt8Tensor")
# quantized layer classes of other libraries (not nn.Linear subclasses): refused by name, with the reason
_OTHER_QUANT = ("QuantLinear", "WQLinear", "HQQLinear", "EetqLinear", "QuantizedLinear", "AqlmLinear", "QLinear",
                "FP8Linear", "Linear8bitLtFP16")
CHUNK_BYTES = 4 << 20  # a dequantized row chunk: about 4 MiB (measured: 256 rows at K=4096 fp32 was fastest)


class UnsupportedQuantization(ValueError):
    """A quantized layer of a kind peft_kernels cannot take as a frozen base."""


def _bnb_kind(layer: nn.Module) -> Optional[str]:
    w = getattr(layer, "weight", None)
    cls = type(w).__name__
    if cls == "Params4bit":
        qs = getattr(w, "quant_state", None)
        if qs is None:
            raise UnsupportedQuantization(
                f"{type(layer).__name__}: its 4-bit weight is not quantized yet (bitsandbytes quantizes on the "
                "move to a device: call .to(device) first)")
        qt = getattr(qs, "quant_type", None)
        if qt not in ("nf4", "fp4"):
            raise UnsupportedQuantization(f"{type(layer).__name__}: 4-bit quant_type {qt!r} (expected nf4 or fp4)")
        return f"bnb-{qt}"
    if cls == "Int8Params":
        if w.dtype != torch.int8:
            raise UnsupportedQuantization(
                f"{type(layer).__name__}: a Linear8bitLt with has_fp16_weights=True (float weights, trained in "
                "8-bit) is not a frozen quantized base; load it with has_fp16_weights=False")
        return "bnb-int8"
    return None


def _torchao_kind(w: torch.Tensor) -> Optional[str]:
    cls = type(w).__name__
    if not type(w).__module__.startswith("torchao"):
        return None
    if cls == "Int8Tensor" and getattr(w, "act_quant_kwargs", None) is None:
        return "torchao-int8"
    if cls == "IntxUnpackedToInt8Tensor" and getattr(w, "activation_quantization", None) is None:
        return "torchao-intx"
    what = "quantizes activations too" if getattr(w, "act_quant_kwargs", None) is not None \
        or getattr(w, "activation_quantization", None) is not None else "is not a weight-only tensor we read"
    raise UnsupportedQuantization(f"torchao {cls} {what}; supported: {SUPPORTED}")


def kind_of(layer: nn.Module) -> Optional[str]:
    """The quantized-base kind of ``layer`` (one of ``KINDS``), or None for a float layer. Raises
    :class:`UnsupportedQuantization` for a quantized layer we do not support."""
    k = _bnb_kind(layer)
    if k is not None:
        return k
    w = getattr(layer, "weight", None)
    if isinstance(w, torch.Tensor):
        k = _torchao_kind(w)
        if k is not None:
            return k
        if not w.is_floating_point():
            raise UnsupportedQuantization(f"{type(layer).__name__} has a {w.dtype} weight of type {type(w).__name__}; "
                                          f"supported quantized bases: {SUPPORTED}")
    return None


def is_other_quantized(module: nn.Module) -> bool:
    """A quantized linear layer of a library we do not support (GPTQ, AWQ, HQQ, ...), recognised by its class
    name or a packed ``qweight``."""
    name = type(module).__name__
    return any(name.startswith(n) for n in _OTHER_QUANT) or isinstance(getattr(module, "qweight", None), torch.Tensor)


def check_layer(module: nn.Module, name: str) -> Optional[str]:
    """:func:`kind_of`, with the module's name in the error."""
    try:
        return kind_of(module)
    except UnsupportedQuantization as e:
        raise UnsupportedQuantization(f"module {name!r}: {e}") from None


def refuse_quantized(layer: nn.Module, what: str) -> None:
    """ValueError when ``layer`` is quantized: ``what`` cannot take a quantized base yet."""
    kind = kind_of(layer)
    if kind is not None:
        raise UnsupportedQuantization(f"{what} on a quantized base ({kind}) is not supported yet; LoRALinear "
                                      "(inject_lora, load_peft_adapter, from_peft) is")


def bnb_4bit_standard(w: torch.Tensor):
    """(packed uint8 bytes [N·K/2], absmax fp32 [N·K/bs] or None when double-quantized and still in the standard
    layout) of a bitsandbytes 4-bit weight, in bitsandbytes' standard layout: two codes a byte (the first in the high
    nibble), the absmax blocks running over the flattened [N, K] weight.

    bitsandbytes (0.50, on CPUs with AVX512-BF16) repacks a ``Linear4bit``'s weight in place on its first eval
    forward without grad on the CPU (``quant_state.packing_format_for_cpu``): codes interleaved in blocks of 32
    rows, the absmax de-nested, transposed to [K/bs, N] and rounded to bf16. Read as the standard layout that is
    garbage, and bitsandbytes' own inverse leaves that absmax transposed; so the packed form is converted here,
    exactly (the values bitsandbytes now computes with), without touching the layer (bitsandbytes' forward expects
    its packed form)."""
    qs = w.quant_state
    data = w.data if w.data.dtype == torch.uint8 else w.data.view(torch.uint8)
    if not getattr(qs, "packing_format_for_cpu", False):
        return data.reshape(-1), (None if qs.nested else qs.absmax.float())
    N, K = int(qs.shape[0]), int(qs.shape[1])
    p = data.reshape(-1, 32)  # [N/32 · K/2, 32]: the low nibbles are rows 0-15 of a 32-row block, the high 16-31
    codes = torch.cat([p & 15, p >> 4], dim=1)  # [.., 64]: rows 0-31 of the block, a (k, k+1) pair each
    codes = codes.reshape(N // 32, K // 2, 32, 2).transpose(1, 2).reshape(-1)  # [N, K] row-major
    packed = (codes[0::2] << 4) | codes[1::2]
    absmax = qs.absmax.float().t().reshape(-1)  # [K/bs, N] → the standard [N, K/bs] order
    return packed.contiguous(), absmax


class QuantBase:
    """A frozen quantized weight [N, K], read from its layer at every call (nothing is cached, so a reloaded
    or moved layer is seen as it is now)."""

    def __init__(self, layer: nn.Module):
        kind = kind_of(layer)
        if kind is None:
            raise TypeError(f"{type(layer).__name__} is not a quantized layer")
        self.layer, self.kind = layer, kind
        self.in_features, self.out_features = int(layer.in_features), int(layer.out_features)

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    @property
    def shape(self):
        """(out_features, in_features): the logical weight's shape."""
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.layer.weight.device

    def compute_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        """The dtype the base GEMM runs in: bitsandbytes 4-bit's ``compute_dtype`` when set (bitsandbytes casts
        x to it), otherwise x's."""
        if self.kind in ("bnb-nf4", "bnb-fp4"):
            cd = getattr(self.layer, "compute_dtype", None)
            if cd is not None:
                return cd
        return x_dtype

    def float_dtype(self) -> torch.dtype:
        """A bitsandbytes 4-bit weight's float dtype (``quant_state.dtype``, or the one it had before bitsandbytes
        repacked it for its CPU kernels, which sets bf16 there: see ``bnb_4bit_standard``)."""
        qs = self.weight.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            return getattr(qs, "original_dtype", None) or qs.dtype
        return qs.dtype

    def row_align(self) -> int:
        """Chunks start at multiples of this many rows (a 4-bit block never spans two chunks)."""
        if self.kind in ("bnb-nf4", "bnb-fp4"):
            bs = int(self.weight.quant_state.blocksize)
            return bs // math.gcd(self.in_features, bs)
        return 1

    def chunk_rows(self, dtype: torch.dtype, device: torch.device) -> int:
        """Rows per dequantized chunk: about ``CHUNK_BYTES`` on the CPU (each chunk is multiplied while in
        cache: measured faster than one dequantized copy); the whole weight elsewhere (one GEMM, as
        bitsandbytes does on a GPU; a chunked dX would round its partial sums once per chunk)."""
        if device.type != "cpu":
            return self.out_features
        K, a = self.in_features, self.row_align()
        rows = max(1, CHUNK_BYTES // max(1, K * torch.empty((), dtype=dtype).element_size()))
        return max(a, rows // a * a)

    def stored_bytes(self) -> int:
        """Bytes the quantized weight and its scales occupy (what a GEMM has to read)."""
        w = self.weight
        if self.kind in ("bnb-nf4", "bnb-fp4"):
            qs = w.quant_state
            n = w.numel() * w.element_size() + qs.absmax.numel() * qs.absmax.element_size()
            if qs.nested:
                n += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + 256 * 4
            return n + 16 * 4
        if self.kind == "bnb-int8":
            return w.numel() + self.out_features * 4
        return sum(t.numel() * t.element_size() for t in (w.qdata, w.scale, getattr(w, "zero_point", None))
                   if isinstance(t, torch.Tensor))

    def reader(self, dtype: torch.dtype) -> "_Reader":
        """Dequantizes row chunks into ``dtype``; per-call state (the fp32 absmax of a double-quantized weight)
        is resolved once here."""
        return _Reader(self, dtype)

    def triton_reason(self) -> Optional[str]:
        """Why the Triton kernels cannot read this weight (None when they can): their blocks are powers of two."""
        if self.kind in ("torchao-int8", "torchao-intx"):
            w = self.weight
            gs, row = int(w.block_size[-1]), tuple(w.block_size) == (1, self.in_features)
            if not row and (gs < 2 or gs & (gs - 1)):
                return f"the Triton kernels read quantization groups of a power-of-two size, this weight's are {gs}"
        return None

    def kernel_operand(self):
        """The weight as the Triton GEMMs read it (``kernels.lora.QuantOperand``): the packed data and its scales as
        stored, on its device (a double-quantized absmax stays uint8: the kernels dequantize it)."""
        from .kernels.lora import QuantOperand

        w, N, K = self.weight, self.out_features, self.in_features
        if self.kind in ("bnb-nf4", "bnb-fp4"):
            qs = w.quant_state
            packed, absmax = bnb_4bit_standard(w)
            code = qs.code.float().to(w.device)
            if absmax is None:  # the kernels dequantize the uint8 absmax themselves (double quantization, mainloop)
                s2 = qs.state2
                return QuantOperand(1, packed, qs.absmax, int(qs.blocksize), N, K, code=code,
                                    absmax_code=s2.code.float().to(w.device), absmax2=s2.absmax.float(),
                                    absmax_offset=float(qs.offset), block2=int(s2.blocksize))
            return QuantOperand(1, packed, absmax, int(qs.blocksize), N, K, code=code)
        if self.kind == "bnb-int8":
            rd = self.reader(torch.float32)
            return QuantOperand(2, rd.cb.reshape(-1), rd.scale.float().reshape(-1), K, N, K, row_scale=True)
        gs = int(w.block_size[-1])
        zp = getattr(w, "zero_point", None)
        scale = w.scale.float().reshape(-1)
        row = gs == K and tuple(w.block_size)[0] == 1
        if isinstance(zp, torch.Tensor) and bool((zp != 0).any()):
            return QuantOperand(3, w.qdata.reshape(-1), scale, gs, N, K, zero=zp.to(torch.int8).reshape(-1))
        return QuantOperand(2, w.qdata.reshape(-1), scale, gs, N, K, row_scale=row)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole weight [N, K] in ``dtype`` (merging, DoRA norms, tests; never on the GEMM path)."""
        return self.reader(dtype).rows(0, self.out_features)


class _Reader:
    def __init__(self, qb: QuantBase, dtype: torch.dtype):
        self.qb, self.dtype = qb, dtype
        w = qb.weight
        if qb.kind in ("bnb-nf4", "bnb-fp4"):
            qs = w.quant_state
            self.packed, absmax = bnb_4bit_standard(w)
            if absmax is None:  # double-quantized
                import bitsandbytes.functional as BF

                absmax = BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
            self.absmax = absmax.float()
            self.code, self.bs, self.qt = qs.code.float(), int(qs.blocksize), qs.quant_type
        elif qb.kind == "bnb-int8":
            state = getattr(qb.layer, "state", None)
            scb = w.SCB if getattr(w, "SCB", None) is not None else getattr(state, "SCB", None)
            if scb is None:
                raise RuntimeError(f"{type(qb.layer).__name__}: the int8 weight has no SCB scales")
            self.cb, self.scale = w.data, scb.unsqueeze(1).mul(1.0 / 127.0)  # bitsandbytes' MatMul8bitFp

    def rows(self, n0: int, n1: int) -> torch.Tensor:
        """Rows [n0, n1) of the dequantized weight, [n1 - n0, K] in the reader's dtype (n0 a multiple of
        ``row_align()``)."""
        qb, K = self.qb, self.qb.in_features
        if qb.kind in ("bnb-nf4", "bnb-fp4"):
            e0, e1 = n0 * K, n1 * K
            packed = self.packed[e0 // 2:(e1 + 1) // 2]
            absmax = self.absmax[e0 // self.bs:(e1 + self.bs - 1) // self.bs]
            if packed.device.type == "cpu" and _ext.available():
                return _ext.ops().dequantize_4bit(packed, absmax, self.code, self.bs, n1 - n0, K, self.dtype)
            # one flat row: the format's blocks run over the flattened weight, and bitsandbytes' AVX-512 CPU kernel
            # indexes a block's absmax per row (wrong where K is not a multiple of the blocksize; flat, it is right)
            return torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, self.bs, self.qt, [1, (n1 - n0) * K],
                                                          self.dtype).view(n1 - n0, K)
        if qb.kind == "bnb-int8":
            return self.cb[n0:n1].to(self.dtype).mul_(self.scale[n0:n1])
        w = qb.weight[n0:n1]
        return w.dequantize().to(self.dtype)


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the base GEMMs run in for ``t``: on the CPU, half-precision inputs run in float32 (CPU bf16/fp16
    GEMMs without AVX512-BF16/AMX are several times slower than fp32 ones, and fp32 is the more exact, the dX
    chunks included); the results are stored in ``t``'s dtype."""
    return torch.float32 if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def base_linear(x: torch.Tensor, qb: QuantBase, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x·deq(W)ᵀ + b`` (x [M, K]) in x's dtype, not differentiable (the ops' autograd Functions call it)."""
    wdt = work_dtype(x)
    xw = x.to(wdt)
    M, N = x.shape[0], qb.out_features
    y = bias.to(wdt).expand(M, N).contiguous() if bias is not None else xw.new_zeros((M, N))
    return base_mm(y, xw, qb, transpose=True).to(x.dtype)


def base_grad_input(dy: torch.Tensor, qb: QuantBase) -> torch.Tensor:
    """``dy·deq(W)`` (dy [M, N]) in dy's dtype: the base's part of dX."""
    wdt = work_dtype(dy)
    out = dy.new_zeros((dy.shape[0], qb.in_features), dtype=wdt)
    return base_mm(out, dy.to(wdt), qb, transpose=False).to(dy.dtype)


def base_mm(out: torch.Tensor, a: torch.Tensor, qb: QuantBase, *, transpose: bool) -> torch.Tensor:
    """``out += a · Wᵀ`` (``transpose=True``: the forward, out [M, N], a [M, K]) or ``out += a · W`` (the dX
    GEMM: out [M, K], a [M, N]), W dequantized chunk by chunk (``QuantBase.chunk_rows``) into ``out``'s dtype;
    returns out. The dX GEMM's sums over N span the chunks: on the CPU ``out`` is float32 (``ops/qlora.py``)."""
    rd = qb.reader(out.dtype)
    N, step = qb.out_features, qb.chunk_rows(out.dtype, out.device)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        wc = rd.rows(n0, n1)
        if transpose:
            o = out[:, n0:n1]
            o.addmm_(a, wc.t())
        else:
            out.addmm_(a[:, n0:n1], wc)
    return out
