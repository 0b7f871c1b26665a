"""The torch backend's dropout mask as one Triton pass (``kernels._common.hash_keep_mask``, used on CUDA)
equals the torch-op definition (``ops._torch_dropout.keep_mask``) bit for bit."""
import pytest
import torch

from peft_kernels import dispatch
from peft_kernels.ops import _torch_dropout as D

pytestmark = pytest.mark.skipif(dispatch.unavailable_reason("triton", torch.device("cpu")) is not None,
                                reason="needs the Triton interpreter")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.75, 0.999])  # thresholds below and above 2^31
@pytest.mark.parametrize("offset", [0, 3, 2 ** 32 - 700])  # the last crosses into the high index word
def test_triton_hash_mask_equals_the_torch_ops(p, offset):
    from peft_kernels.kernels import _common

    seed = D.draw_seed("cpu")
    k = D.keys(seed, p)
    n = 1500
    want = D.keep_mask(seed, (n,), p, "cpu", offset=offset)
    kt = torch.tensor([k.k0, k.k1, k.k2], dtype=torch.int64)
    got = _common.hash_keep_mask(kt, k.thr, n, offset, torch.device("cpu"))
    assert got.dtype == torch.bool and torch.equal(got, want)
    assert 0 < int(want.sum()) < n  # a mask that keeps some and drops some


def test_device_keys_are_read_from_the_device_tensor():
    """CUDA seeds give tensor keys (graph-safe); the kernel reads the same values the int path computes."""
    from peft_kernels.kernels import _common

    seed = torch.tensor([123456789012345], dtype=torch.int64)
    ints = D.keys(int(seed), 0.3)
    s = seed.reshape(-1)[:1]
    k0 = D._fmix32((s & D._M32) ^ 0x9E3779B9)
    k1 = D._fmix32((s >> 32) ^ k0 ^ 0x85EBCA77)
    k2 = D._fmix32(k1 ^ 0xC2B2AE3D)
    assert [int(k0), int(k1), int(k2)] == [ints.k0, ints.k1, ints.k2]
    got = _common.hash_keep_mask(torch.cat([k0, k1, k2]), ints.thr, 999, 0, torch.device("cpu"))
    assert torch.equal(got, D.keep_mask(int(seed), (999,), 0.3, "cpu"))
