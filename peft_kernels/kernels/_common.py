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
