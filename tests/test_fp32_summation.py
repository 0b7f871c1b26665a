"""fp32 reductions in the LoRA kernels sum in two levels (``_common.mma_acc``).

On an H200 the one-level fp32 sum of the Triton kernels was 3.5–5.7× less accurate than cuBLAS at K = 4096
(gpu-check, 2026-12-01). Under the interpreter a dot with an accumulator is ``acc + a @ b`` per block, so
the order of the sum is the kernel's: a running total of 2²⁴ swallows every 0.5 added to it one block at a
time (fp32 spacing there is 2), while two-level partials of four 0.5s add exactly. Each case routes one
reduction (the base GEMM over K, the shrink over K, dX over N, dS over N, dA over M) through that pattern.
"""
import pytest
import torch

import peft_kernels as pk

BIG = 2.0 ** 24
L = 4096


def pattern():
    v = torch.zeros(L, dtype=torch.float32)
    v[::16] = 0.5
    v[0] = BIG
    return v


EXACT = float(pattern().double().sum())  # 2^24 + 127.5


def _run(case):
    f32 = torch.float32
    if case == "base GEMM over K":
        x, W = pattern()[None], torch.ones(2, L)
        A, B = torch.zeros(1, L), torch.zeros(2, 1)
        return pk.lora_linear(x, W, None, A, B, 1.0, backend="triton")[0, 0]
    if case == "shrink over K":
        x, W = pattern()[None], torch.zeros(2, L)
        A, B = torch.ones(1, L), torch.ones(2, 1)
        return pk.lora_linear(x, W, None, A, B, 1.0, backend="triton")[0, 0]
    if case == "dX over N":
        x = torch.zeros(1, 2, requires_grad=True)
        y = pk.lora_linear(x, torch.ones(L, 2), None, torch.zeros(1, 2), torch.zeros(L, 1), 1.0, backend="triton")
        y.backward(pattern()[None])
        return x.grad[0, 0]
    if case == "dS over N":
        A = torch.zeros(1, 2, requires_grad=True)
        y = pk.lora_linear(torch.ones(1, 2), torch.zeros(L, 2), None, A, torch.ones(L, 1), 1.0, backend="triton")
        y.backward(pattern()[None])
        return A.grad[0, 0]
    if case == "dA over M":
        A = torch.zeros(1, 2, requires_grad=True)
        y = pk.lora_linear(torch.ones(L, 2), torch.zeros(1, 2), None, A, torch.ones(1, 1, dtype=f32), 1.0,
                           backend="triton")
        y.backward(pattern()[:, None])
        return A.grad[0, 0]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["base GEMM over K", "shrink over K", "dX over N", "dS over N", "dA over M"])
def test_fp32_reductions_sum_in_two_levels(case):
    got = float(_run(case))
    # one level: every 0.5 is lost (error 127.5); two levels: at most the 0.5s of the first partial (≤ 4)
    assert abs(got - EXACT) <= 4.0, (case, got, EXACT)


def test_chunk_rule():
    from peft_kernels.kernels._common import acc_chunk

    assert acc_chunk(torch.float32, 16) == 4 and acc_chunk(torch.float32, 64) == 2
    assert acc_chunk(torch.float32, 128) == 2
    assert acc_chunk(torch.bfloat16, 16) == 0 and acc_chunk(torch.float16, 64) == 0
