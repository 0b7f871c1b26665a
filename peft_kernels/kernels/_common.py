"""Helpers shared by the Triton kernels: dot with interpreter upcast, Philox dropout, dtypes."""
from __future__ import annotations

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
def dropout_keep(seed, rows, cols, K, p):
    """Keep-mask for dropout on an M×K input: Philox on the element's logical index ``row*K+col``.

    Depends only on (seed, row, col), never on strides or tiling, so forward and backward kernels
    with different tile shapes regenerate the same mask.
    """
    offs = rows.to(tl.int64) * K + cols.to(tl.int64)
    return tl.rand(seed, offs) >= p


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, seed, p, scale, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, rm[:, None], rk[None, :], K, p)
    val = tl.where(keep, scale, 0.0)
    msk = (rm[:, None] < M) & (rk[None, :] < K)
    tl.store(out_ptr + rm[:, None] * K + rk[None, :], val, mask=msk)


def dropout_mask(shape2d, p: float, seed: int, device) -> torch.Tensor:
    """The multiplicative mask (0 or 1/(1-p), fp32) the Triton kernels use for ``seed``."""
    M, K = shape2d
    out = torch.empty((M, K), dtype=torch.float32, device=device)
    grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
    _dropout_mask_kernel[grid](out, M, K, seed, p, 1.0 / (1.0 - p), BLOCK_M=32, BLOCK_K=32)
    return out


TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def upcast_needed(*dtypes) -> bool:
    """bf16 ``tl.dot`` is wrong in the interpreter: upcast there."""
    return INTERPRETED and any(d == torch.bfloat16 for d in dtypes)


def f32_precision() -> str:
    """Follow torch's own fp32 matmul setting, so fp32 results match torch on the same GPU."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def next_pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))
