"""The Triton LoRA kernels' packed dropout mask: drawn once by the forward shrink (a byte per two Philox
calls), stored as uint8 [M, ⌈K/8⌉], read by backward's dX and dA."""
import pytest
import torch

import peft_kernels as pk
from peft_kernels import dispatch
from peft_kernels.kernels import _common
from peft_kernels.kernels import lora as L

pytestmark = pytest.mark.skipif(dispatch.unavailable_reason("triton", torch.device("cpu")) is not None,
                                reason="needs the Triton interpreter")


@pytest.mark.parametrize("M,K,R,dt", [(70, 48, 4, torch.float32), (1, 200, 16, torch.float16),
                                       (3, 45, 200, torch.float32), (33, 257, 7, torch.bfloat16)])
def test_the_shrink_writes_the_reference_bits(M, K, R, dt):
    """Every byte the shrink stores equals the standalone generator's: across a split K (fp16 at M=1: the
    interpreter's program budget is 2), several rank chunks (R=200 > the 128 rank tile: only the first
    chunk stores) and K not a multiple of 8."""
    torch.manual_seed(1)
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)
    x, W, A, B = (torch.randn(M, K).to(dt), torch.randn(5, K).to(dt), torch.randn(R, K).to(dt),
                  torch.randn(5, R).to(dt))
    if M == 1:
        cfg = L.configs(dt, R)
        assert L.shrink_splits(torch.device("cpu"), M, K, R, cfg["shrink"].block_m, cfg["shrink"].block_k,
                               cfg["block_r"], dt)[0] > 1
    if R == 200:
        assert L.block_r(R) < R
    bits = torch.full((M, (K + 7) // 8), 0xA5, dtype=torch.uint8)  # a pattern the kernel must overwrite
    L.lora_forward(x, W, None, A, B, 1.0, 0.3, seed, bits_out=bits)
    assert torch.equal(bits, _common.dropout_bits((M, K), 0.3, seed, "cpu"))


def test_forward_applies_the_stored_mask_and_backward_reads_it():
    """S, dX and dA equal the math with the unpacked bits (torch ops), so the shrink's in-register unpacking
    and backward's byte loads agree with the stored mask."""
    torch.manual_seed(2)
    M, K, N, R, p = 37, 52, 29, 6, 0.4
    x = torch.randn(M, K, dtype=torch.float64).float().requires_grad_()
    W, A0, B0 = torch.randn(N, K), torch.randn(R, K), torch.randn(N, R)
    A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
    seen = {}
    real = L.lora_forward

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen["bits"] = kw["bits_out"].clone()
        return out
    try:
        L.lora_forward = spy
        y = pk.lora_linear(x, W, None, A, B, 0.5, dropout_p=p, training=True, backend="triton")
    finally:
        L.lora_forward = real
    keep = _common.unpack_bits(seen["bits"], K).double() / (1 - p)
    dy = torch.randn(M, N)
    y.backward(dy)
    xd, A64, B64 = x.detach().double(), A0.double(), B0.double()
    y_ref = xd @ W.double().t() + 0.5 * ((xd * keep) @ A64.t()) @ B64.t()
    dS = 0.5 * dy.double() @ B64
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), dy.double() @ W.double() + keep * (dS @ A64), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(A.grad.double(), dS.t() @ (xd * keep), rtol=1e-4, atol=1e-4)
    assert 0.5 < keep.bool().float().mean().item() < 0.7  # keep rate near 1 - p = 0.6


def test_keep_rate_and_bit_balance():
    """The 8 bits of a byte come from 8 Philox outputs: each bit position keeps 1 - p of its elements."""
    seed = torch.tensor([987654321], dtype=torch.int64)
    M, K, p = 256, 512, 0.25
    keep = _common.unpack_bits(_common.dropout_bits((M, K), p, seed, "cpu"), K).float()
    n = M * K
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    per_bit = keep.view(M, K // 8, 8).mean(dim=(0, 1))
    assert (per_bit - (1 - p)).abs().max().item() < 5 * (p * (1 - p) / (n / 8)) ** 0.5
    # different seeds draw different masks; the same seed the same one
    other = _common.unpack_bits(_common.dropout_bits((M, K), p, seed + 1, "cpu"), K).float()
    assert 0.3 < (keep != other).float().mean().item() < 0.45  # 2p(1-p) = 0.375 for independent masks
    again = _common.unpack_bits(_common.dropout_bits((M, K), p, seed, "cpu"), K).float()
    assert torch.equal(keep, again)


def test_the_mask_buffer_is_one_bit_per_element():
    b = L.dropout_mask_buffer(4096, 4095, "cpu")
    assert b.dtype == torch.uint8 and tuple(b.shape) == (4096, 512)
