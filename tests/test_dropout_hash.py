"""The torch backend's dropout mask as one Triton launch (``kernels._common.hash_keep_mask``, used on CUDA)
equals the torch-op definition (``ops._torch_dropout.keep_mask``) bit for bit, round keys included."""
import pytest
import torch

from peft_kernels import dispatch
from peft_kernels.ops import _torch_dropout as D

pytestmark = pytest.mark.skipif(dispatch.unavailable_reason("triton", torch.device("cpu")) is not None,
                                reason="needs the Triton interpreter")


def _signed(v: int) -> torch.Tensor:
    v &= (1 << 64) - 1
    return torch.tensor([v - (1 << 64) if v >= 1 << 63 else v], dtype=torch.int64)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.75, 0.999])  # thresholds below and above 2^31
@pytest.mark.parametrize("offset", [0, 3, 2 ** 32 - 700])  # the last crosses into the high index word
def test_triton_hash_mask_equals_the_torch_ops(p, offset):
    from peft_kernels.kernels import _common

    seed = D.draw_seed("cpu")
    n = 1500
    want = D.keep_mask(seed, (n,), p, "cpu", offset=offset)
    got = _common.hash_keep_mask(seed, D.threshold(p), n, offset, torch.device("cpu"))
    assert got.dtype == torch.bool and torch.equal(got, want)
    assert 0 < int(want.sum()) < n  # a mask that keeps some and drops some


@pytest.mark.parametrize("seed", [0, 1, 2 ** 32 - 1, 2 ** 32, 123456789012345, 2 ** 62 - 1, 2 ** 63 + 5, 2 ** 64 - 1])
def test_round_keys_from_every_seed_word(seed):
    """The kernel derives the keys from the seed's two 32-bit words as ``keys()`` does (high words and
    seeds past 2^63, given as their signed int64 pattern, included)."""
    from peft_kernels.kernels import _common

    got = _common.hash_keep_mask(_signed(seed), D.threshold(0.3), 999, 0, torch.device("cpu"))
    assert torch.equal(got, D.keep_mask(seed, (999,), 0.3, "cpu"))
