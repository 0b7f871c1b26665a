"""Helpers shared by the Triton kernels: dot with interpreter upcast, Philox dropout, dtypes, the fp32
matmul precision, 64-bit-safe sizes and the machine's program budget."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting

# Whether the @triton.jit functions in this package were created under the interpreter. Triton
# decides this when a kernel is decorated, i.e. when this package is first imported.
INTERPRETED: bool = interpreting()


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, F32_PREC: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    UPCAST: compute in fp32 (the interpreter's bf16 ``tl.dot`` is wrong, so bf16 is upcast there).
    F32_PREC: "ieee" or "tf32", used only when the operands are fp32.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=F32_PREC)


@triton.jit
def mma_acc(a, b, acc, part, step, UPCAST: tl.constexpr, F32_PREC: tl.constexpr, CHUNK: tl.constexpr):
    """One step of a reduction loop: ``acc + a @ b``, summed in two levels when ``CHUNK > 0``.

    With CHUNK > 0 the dot accumulates into ``part``, which is added to ``acc`` (and restarted at zero)
    every CHUNK steps; the caller adds the last ``part`` after its loop (``acc_flush``). A one-level fp32
    sum over K rounds against a running total that grows like √K, so its error grows like K: 3.5–5.7× the
    error of cuBLAS's fp32 GEMM at K = 4096 (measured on an H200). Two levels of ~√K terms each cut that to
    about √K. ``acc + tl.dot(a, b)`` would not do it: Triton folds an add of a zero-initialised dot back
    into the dot's accumulator (CombineDotAddFPattern), so the partial is a loop-carried value instead.
    CHUNK = 0 is the plain ``mma`` (16-bit operands: their error is the operands' rounding, not the sum's);
    callers then pass a scalar ``part`` (0.0), so no second tile is carried through their loop.
    """
    if CHUNK > 0:
        part = mma(a, b, part, UPCAST, F32_PREC)
        if step % CHUNK == CHUNK - 1:
            acc += part
            part = tl.zeros_like(part)
    else:
        acc = mma(a, b, acc, UPCAST, F32_PREC)
    return acc, part


@triton.jit
def acc_flush(acc, part, CHUNK: tl.constexpr):
    """The end of a two-level reduction (see ``mma_acc``): the last partial added to ``acc``."""
    if CHUNK > 0:
        acc += part
    return acc


def acc_chunk(dtype: torch.dtype, block: int) -> int:
    """``mma_acc``'s CHUNK for a reduction loop whose dots take ``dtype`` operands ``block`` at a time:
    about 64 terms per partial for fp32 (√4096; the best split for K in 1k–16k is within 2× of it),
    0 (one level) for 16-bit operands."""
    if dtype != torch.float32:
        return 0
    return max(2, 64 // block)


# Activation codes of the bottleneck adapter kernels; ACT_NONE = identity (the LoRA kernels' case).
ACT_NONE = -1
ACT_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "swish": 3, "tanh": 4}


@triton.jit
def _tanh(z):
    """tanh in fp32: 2σ(2z) − 1 cancels near 0, so |z| < 0.3 takes the Taylor series (error < 1e-9 relative)."""
    z2 = z * z
    small = z * (1.0 + z2 * (-0.3333333333333333 + z2 * (0.13333333333333333 + z2 * (
        -0.05396825396825397 + z2 * (0.021869488536155203 + z2 * -0.008863235529902197)))))
    return tl.where(tl.abs(z) < 0.3, small, 2.0 * tl.sigmoid(2.0 * z) - 1.0)


@triton.jit
def act(p, ACT: tl.constexpr):
    """The activation on fp32 ``p`` (-1 identity, 0 relu, 1 gelu, 2 gelu_tanh, 3 silu, 4 tanh); act(0) = 0
    for all, so masked loads (other=0) stay inert."""
    if ACT < 0:
        out = p
    elif ACT == 0:
        out = tl.maximum(p, 0.0)
    elif ACT == 1:
        out = 0.5 * p * (1.0 + tl.math.erf(p * 0.7071067811865476))
    elif ACT == 2:  # 0.5·p·(1 + tanh(u)) = p·σ(2u): no cancellation for negative p
        out = p * tl.sigmoid(1.5957691216057308 * (p + 0.044715 * p * p * p))
    elif ACT == 3:
        out = p * tl.sigmoid(p)
    else:
        out = _tanh(p)
    return out


@triton.jit
def act_grad(p, ACT: tl.constexpr):
    """d act / d p at fp32 ``p`` (1 for the identity)."""
    if ACT < 0:
        out = tl.full(p.shape, 1.0, tl.float32)
    elif ACT == 0:
        out = tl.where(p > 0.0, 1.0, 0.0)
    elif ACT == 1:
        out = 0.5 * (1.0 + tl.math.erf(p * 0.7071067811865476)) + p * tl.exp(-0.5 * p * p) * 0.3989422804014327
    elif ACT == 2:
        sg = tl.sigmoid(1.5957691216057308 * (p + 0.044715 * p * p * p))
        out = sg + p * sg * (1.0 - sg) * 1.5957691216057308 * (1.0 + 0.134145 * p * p)
    elif ACT == 3:
        sg = tl.sigmoid(p)
        out = sg * (1.0 + p * (1.0 - sg))
    else:
        t = _tanh(p)
        out = 1.0 - t * t
    return out


@triton.jit
def _keep_bit(r, p):
    """1 where the uint32 ``r``, as Triton's ``tl.rand`` maps it to [0, 1), is ≥ p (kept), else 0."""
    return (tl.uint_to_uniform_float(r) >= p).to(tl.int32)


@triton.jit
def dropout_bytes(seed, rows, bcols, K8, p):
    """The packed keep-mask of an M×K input, ``[.., ..]`` bytes at (row, byte column): bit j of byte (m, b)
    keeps element (m, 8b + j). Byte (m, b) takes the 8 outputs of two Philox calls, counters
    2(m·K8 + b) and 2(m·K8 + b) + 1 (``K8 = ⌈K/8⌉``): a quarter of a Philox call per element, where
    ``tl.rand`` per element uses one output of four. Depends only on (seed, row, col), never on tiling.
    ``seed`` is the int64 the kernel loaded from its seed tensor (``ops._torch_dropout.draw_seed``)."""
    c = (rows.to(tl.int64) * K8 + bcols.to(tl.int64)) * 2
    a0, a1, a2, a3 = tl.randint4x(seed, c)
    b0, b1, b2, b3 = tl.randint4x(seed, c + 1)
    byte = _keep_bit(a0, p) | (_keep_bit(a1, p) << 1) | (_keep_bit(a2, p) << 2) | (_keep_bit(a3, p) << 3) | \
        (_keep_bit(b0, p) << 4) | (_keep_bit(b1, p) << 5) | (_keep_bit(b2, p) << 6) | (_keep_bit(b3, p) << 7)
    return byte


@triton.jit
def expand_bytes(byte, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_K] keep bits (uint8 0/1) of a [BLOCK_M, BLOCK_K // 8] tile of mask bytes (uint8): kept
    8 bits wide, so the unpacked tile costs a quarter of the registers an int32 one would."""
    wide = tl.reshape(tl.broadcast_to(byte[:, :, None], (BLOCK_M, BLOCK_K // 8, 8)), (BLOCK_M, BLOCK_K))
    return (wide >> (tl.arange(0, BLOCK_K) % 8).to(tl.uint8)[None, :]) & 1


@triton.jit
def load_keep(bits_ptr, rm64, m_ok, col0, K8, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Keep bits (uint8 0/1) of the [BLOCK_M, BLOCK_K] tile at rows ``rm64`` and columns ``col0 + [0, BLOCK_K)``
    (``col0`` a multiple of 8), read from the packed mask (bytes [M, K8], written by the forward shrink): one
    dense [BLOCK_M, BLOCK_K / 8] byte load, unpacked in registers (a per-element gather would hold a 64-bit
    pointer per element: 192 registers in the dX GEMM instead of 112)."""
    rb = col0 // 8 + tl.arange(0, BLOCK_K // 8)
    byte = tl.load(bits_ptr + rm64[:, None] * K8 + rb[None, :], mask=m_ok[:, None] & (rb[None, :] < K8), other=0)
    return expand_bytes(byte, BLOCK_M, BLOCK_K)


@triton.jit
def _dropout_bits_kernel(out_ptr, seed_ptr, M, K8, p, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    byte = dropout_bytes(tl.load(seed_ptr), rm[:, None], rb[None, :], K8, p)
    msk = (rm[:, None] < M) & (rb[None, :] < K8)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * K8 + rb[None, :], byte.to(tl.uint8), mask=msk)


def dropout_bits(shape2d, p: float, seed: torch.Tensor, device) -> torch.Tensor:
    """The packed keep-mask (uint8 [M, ⌈K/8⌉]) that the Triton LoRA kernels draw for ``seed``."""
    M, K = shape2d
    K8 = triton.cdiv(K, 8)
    out = torch.empty((M, K8), dtype=torch.uint8, device=device)
    _dropout_bits_kernel[(triton.cdiv(M, 32), triton.cdiv(K8, 32))](out, seed.to(device), M, K8, p,
                                                                    BLOCK_M=32, BLOCK_B=32)
    return out


def unpack_bits(bits: torch.Tensor, K: int) -> torch.Tensor:
    """Bool [M, K] of a packed mask (bit j of byte b is column 8b + j), in torch ops."""
    cols = torch.arange(K, device=bits.device)
    return ((bits[:, cols // 8].to(torch.int32) >> (cols % 8).to(torch.int32)) & 1).bool()


def dropout_mask(shape2d, p: float, seed: torch.Tensor, device) -> torch.Tensor:
    """The multiplicative mask (0 or 1/(1-p), fp32) the Triton kernels use for ``seed`` (an int64 tensor from
    ``ops._torch_dropout.draw_seed``): ``dropout_bits`` unpacked in torch ops (not the kernels' unpacking)."""
    keep = unpack_bits(dropout_bits(shape2d, p, seed, device), shape2d[1])
    return keep.to(torch.float32) * (1.0 / (1.0 - p))


@triton.jit
def _fmix32(h):
    """murmur3's 32-bit finalizer on uint32 (wrapping multiplies, logical shifts)."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def hash_keep(seed_ptr, idx, thr):
    """Kept (True) where the keyed hash of element index ``idx`` (int64) is ≥ ``thr``: the torch backend's mask
    (``ops._torch_dropout.keep_mask`` / ``rows_keep``), bit for bit, inside a kernel. The round keys are derived
    from the seed's two 32-bit words as ``_torch_dropout.keys`` does."""
    s = tl.load(seed_ptr)
    k0 = _fmix32(s.to(tl.uint32) ^ 0x9E3779B9)  # int64 -> uint32 truncates: the low word
    k1 = _fmix32((s >> 32).to(tl.uint32) ^ k0 ^ 0x85EBCA77)
    k2 = _fmix32(k1 ^ 0xC2B2AE3D)
    h = _fmix32(idx.to(tl.uint32) ^ k0)
    h = _fmix32(h ^ (idx >> 32).to(tl.uint32) ^ k1)
    h = _fmix32(h ^ k2)
    return h.to(tl.int64) >= thr  # uint32 -> int64 zero-extends


@triton.jit
def _hash_keep_kernel(out_ptr, seed_ptr, n, offset, thr, BLOCK: tl.constexpr):
    # the torch backend's mask (ops._torch_dropout.keep_mask) for elements [offset, offset + n), in one pass
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, hash_keep(seed_ptr, i + offset, thr), mask=i < n)


def hash_keep_mask(seed: torch.Tensor, thr: int, n: int, offset: int, device) -> torch.Tensor:
    """``ops._torch_dropout.keep_mask`` as one Triton launch (bool, ``n`` elements). On a GPU the torch-op
    version is ~25 int64 elementwise passes over M·K plus ~15 tiny launches for the round keys (dropout
    cost the torch backend 8.6× its no-dropout time at q_proj prefill on an H200). ``seed``: the int64
    seed tensor on ``device`` (``_torch_dropout.draw_seed``), read on the device, so graph-safe."""
    out = torch.empty(n, dtype=torch.bool, device=device)
    if n:
        _hash_keep_kernel[(triton.cdiv(n, 1024),)](out, seed, n, offset, thr, BLOCK=1024, num_warps=4)
    return out


TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def upcast_needed(*dtypes) -> bool:
    """bf16 ``tl.dot`` is wrong in the interpreter: upcast there."""
    return INTERPRETED and any(d == torch.bfloat16 for d in dtypes)


_PRECISION_OVERRIDE: contextvars.ContextVar = contextvars.ContextVar("peft_kernels_fp32_precision", default=None)


def torch_fp32_precision() -> str:
    """``"tf32"`` or ``"ieee"``: what torch's own CUDA fp32 matmuls use right now, resolved the way torch does.

    torch ≥ 2.9 has the new API (``torch.backends.cuda.matmul.fp32_precision``, which inherits from
    ``torch.backends.fp32_precision`` while it is ``"none"``; its getter returns the resolved value). Once a user sets it, reading the legacy ``allow_tf32`` raises
    ("mix of the legacy and new APIs"), so the new getter is read first. The legacy setters write the new
    state as well (``allow_tf32 = True`` reads back as ``"tf32"``), and ``"none"`` means IEEE, as in
    cuBLAS. torch < 2.9 has only the legacy flag.
    """
    forced = _PRECISION_OVERRIDE.get()
    if forced is not None:
        return forced
    mm = torch.backends.cuda.matmul
    try:
        p = mm.fp32_precision
    except AttributeError:  # torch < 2.9: legacy API only
        return "tf32" if mm.allow_tf32 else "ieee"
    return "tf32" if p == "tf32" else "ieee"


@contextlib.contextmanager
def fp32_precision_override(value: Optional[str]):
    """Within the block, launchers use ``value`` ("tf32"/"ieee") instead of torch's setting (the AOT tool
    records both variants this way without touching torch's global state)."""
    if value not in (None, "tf32", "ieee"):
        raise ValueError(f"fp32 precision must be 'tf32', 'ieee' or None, got {value!r}")
    with _context_value(_PRECISION_OVERRIDE, value):
        yield


@contextlib.contextmanager
def _context_value(var: contextvars.ContextVar, value):
    """``var`` set to ``value`` within the block (this thread/task only), restored on exit."""
    tok = var.set(value)
    try:
        yield
    finally:
        var.reset(tok)


def f32_precision(adapter_dtype: Optional[torch.dtype] = None, base_dtype: Optional[torch.dtype] = None) -> str:
    """The ``input_precision`` of the kernels' fp32 dots.

    fp32 everywhere: torch's own setting (``torch_fp32_precision``), so results match torch on the same GPU.
    fp32 adapters on a 16-bit base (HF PEFT's default adapter dtype): the LoRA dots take one 16-bit
    operand (x, dY) that TF32 represents exactly, so ``"tf32x3"`` (each fp32 operand split into two TF32
    halves, on tensor cores) gives fp32-class products (relative error ≤ 2⁻²²) instead of CUDA-core FMA;
    with torch's TF32 on it is plain ``"tf32"``. The 16-bit dots ignore the setting.
    """
    p = torch_fp32_precision()
    if p == "ieee" and adapter_dtype == torch.float32 and base_dtype in (torch.float16, torch.bfloat16):
        return "tf32x3"
    return p


# Sizes are 32-bit kernel arguments; the kernels form every address as 64-bit (rows × strides), and their
# 32-bit index arithmetic (program id × block + arange) stays exact below this bound.
MAX_DIM = 2 ** 31 - 2 ** 20


def check_dims(**dims) -> None:
    """ValueError naming the first dimension too large for the kernels' 32-bit index arithmetic."""
    for name, v in dims.items():
        if int(v) > MAX_DIM:
            raise ValueError(f"{name}={int(v)} is larger than the Triton kernels support ({MAX_DIM}); split the "
                             f"input or use backend='torch'")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def program_budget(device: torch.device) -> int:
    """How many programs fill the machine: the SM count on CUDA (132 on an H100/H200); a small number on
    the CPU (the interpreter) so tests walk several row blocks per program, and the H100's count when
    compiling ahead of time without a GPU."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2 if INTERPRETED else 132


try:  # host-side TMA descriptors (triton >= 3.3): the sm_90 GEMMs read x and W through them
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the cp.async GEMMs only
    TensorDescriptor = None

TMA_VAR = "PEFT_KERNELS_TMA"
_TMA_OVERRIDE: contextvars.ContextVar = contextvars.ContextVar("peft_kernels_tma", default=None)


@contextlib.contextmanager
def tma_override(value: Optional[bool]):
    """Within the block, ``tma_available`` answers ``value`` (None: the device's answer). The AOT tool records
    the sm_90 launches this way on a machine with no GPU; the interpreter tests run the TMA kernels with it."""
    if value not in (None, True, False):
        raise ValueError(f"tma_override takes True, False or None, got {value!r}")
    with _context_value(_TMA_OVERRIDE, value):
        yield


def tma_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the persistent TMA GEMMs cannot run on ``device`` (None when they can): they need an sm_90 GPU
    (Hopper: TMA and wgmma; sm_80 has no TMA, and newer archs are not compiled or checked by the AOT
    matrix), a triton with host-side tensor descriptors, and ``PEFT_KERNELS_TMA`` not set to 0."""
    forced = _TMA_OVERRIDE.get()
    if forced is not None:
        return None if forced else "turned off by tma_override(False)"
    if os.environ.get(TMA_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"turned off by {TMA_VAR}=0"
    if TensorDescriptor is None:
        return f"triton {triton.__version__} has no triton.tools.tensor_descriptor"
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"compute capability {major}.{minor} is not sm_90"
    return None


def tma_available(device: torch.device) -> bool:
    return tma_unavailable_reason(device) is None


def next_pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))
