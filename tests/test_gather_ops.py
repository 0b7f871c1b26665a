"""The compiled gather ops (torch.ops.peft_kernels.{bgmv,sgmv}_{shrink,expand}, lora_expand) against an
fp64 reference, on every device they have kernels for: the CPU kernels (csrc/cpu) here, the CUDA
kernels (csrc/cuda) where a GPU and a CUDA build exist (skipped with the reason otherwise). Odd sizes,
per-slot true ranks (rank 0 included), scalings, strided weight views, -1 tokens; opcheck; errors."""
import pytest
import torch

from peft_kernels import _ext, dispatch
from peft_kernels.ops.multi_lora import build_mapping

from helpers import assert_close, dtype_params

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension: {_ext.unavailable_reason()}")


def device_params():
    why = dispatch.cuda_unavailable_reason(torch.device("cuda"))
    return [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda", marks=[pytest.mark.skip(reason=f"cuda: {why}")] if why else [])]


def setup(device, dtype, T=29, K=37, N=23, R=9, S=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, S, (T,), generator=g)
    ids[:3] = 2  # a multi-token segment
    m = build_mapping(ids.to(device), T, S, device=torch.device(device))
    t = dict(x=torch.randn(T, K, generator=g), A=torch.randn(S, R, K, generator=g) / K ** 0.5,
             B=torch.randn(S, N, R, generator=g), y=torch.randn(T, N, generator=g))
    ranks = torch.tensor([R, 4, 1, 0][:S], dtype=torch.int32)  # full, partial, rank 1, empty slot
    scal = torch.rand(S, generator=g) + 0.5
    dev = {k: v.to(device=device, dtype=dtype) for k, v in t.items()}
    return m, t, dev, ranks.to(device), scal.to(device), ranks, scal


def ref_shrink(x, A, m, ranks, scal=None, dtype=torch.float64):
    """S[p, r] = s? · x[perm[p]]·A[slot_p, r] for r < rank, computed in ``dtype`` (fp64: the reference;
    fp32: the same-precision yardstick)."""
    perm, slots = m.perm.long().cpu(), m.pos_slots.long().cpu()
    S = torch.einsum("pk,prk->pr", x.to(dtype)[perm], A.to(dtype)[slots])
    S = S * (torch.arange(A.shape[1])[None, :] < ranks[slots][:, None])
    return S * scal.to(dtype)[slots][:, None] if scal is not None else S


def ref_expand(y, S, B, m, ranks, scal):
    perm, slots = m.perm.long().cpu(), m.pos_slots.long().cpu()
    mask = torch.arange(B.shape[2])[None, :] < ranks[slots][:, None]
    upd = torch.einsum("pr,pnr->pn", S.double() * mask, B.double()[slots]) * scal.double()[slots][:, None]
    out = y.double().clone()
    out[perm] += upd
    return out


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("path", ["bgmv", "sgmv"])
@pytest.mark.parametrize("device", device_params())
def test_shrink_and_expand_match_reference(device, path, dtype):
    m, t, dev, ranks_d, scal_d, ranks, scal = setup(device, dtype)
    ops = _ext.ops()
    if path == "bgmv":
        S = ops.bgmv_shrink(dev["x"], dev["A"], m.perm, m.pos_slots, ranks_d, scal_d)
    else:
        S = ops.sgmv_shrink(dev["x"], dev["A"], m.perm, m.seg_slots, m.seg_starts, ranks_d, scal_d, m.max_count)
    low = dict(x=t["x"].to(dtype).float(), A=t["A"].to(dtype).float())
    S64 = ref_shrink(low["x"], low["A"], m, ranks, scal)
    assert S.dtype == torch.float32 and S.shape == S64.shape
    # same-precision yardstick: the einsum computed in fp32 over the dtype-rounded inputs
    assert_close(S.cpu(), S64, ref_shrink(low["x"], low["A"], m, ranks, scal, torch.float32), f"{path} shrink")
    y = dev["y"].clone()
    Sin = S64.float().to(device)
    if path == "bgmv":
        ops.bgmv_expand(y, Sin, dev["B"], m.perm, m.pos_slots, ranks_d, scal_d)
    else:
        ops.sgmv_expand(y, Sin, dev["B"], m.perm, m.seg_slots, m.seg_starts, ranks_d, scal_d, m.max_count)
    y64 = ref_expand(t["y"].to(dtype), S64.float(), t["B"].to(dtype), m, ranks, scal)
    ylp = y64.to(dtype)  # the result rounded once to the output dtype: the kernels' best possible
    assert_close(y.cpu(), y64, ylp, f"{path} expand")
    untouched = torch.ones(t["y"].shape[0], dtype=torch.bool)
    untouched[m.perm.long().cpu()] = False  # id -1 rows are exactly the input
    assert torch.equal(y.cpu()[untouched], dev["y"].cpu()[untouched])


@pytest.mark.parametrize("device", device_params())
def test_strided_weight_views(device):
    """The backward reads B and A transposed through strides (no copy): same result as a contiguous copy."""
    m, t, dev, ranks_d, scal_d, ranks, scal = setup(device, torch.float32)
    ops = _ext.ops()
    dy = dev["y"]
    Bt = dev["B"].transpose(1, 2)  # [S, R, N] view
    for shrink in (lambda w: ops.bgmv_shrink(dy, w, m.perm, m.pos_slots, ranks_d, scal_d),
                   lambda w: ops.sgmv_shrink(dy, w, m.perm, m.seg_slots, m.seg_starts, ranks_d, scal_d,
                                             m.max_count)):
        a, b = shrink(Bt), shrink(Bt.contiguous())
        ref = ref_shrink(t["y"], t["B"].transpose(1, 2), m, ranks, scal)  # fp64, from the data itself
        assert_close(a.cpu(), ref, b.cpu(), "strided shrink (the contiguous copy as the baseline)")


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("device", device_params())
def test_lora_expand(device, bias, dtype):
    g = torch.Generator().manual_seed(1)
    M, N, R = 19, 45, 7
    S = torch.randn(M, R, generator=g)
    B = torch.randn(N, R, generator=g).to(dtype)
    y0 = torch.randn(M, N, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    y = y0.to(device).clone()
    _ext.ops().lora_expand(y, S.to(device), B.to(device), b.to(device) if bias else None, 0.75)
    ref = y0.double() + 0.75 * S.double() @ B.double().t() + (b.double() if bias else 0)
    assert_close(y.cpu(), ref, ref.to(dtype), "lora_expand")


def test_opcheck():
    """Schemas, fake (meta) kernels, in-place annotations and autograd registration are consistent."""
    m, t, dev, ranks_d, scal_d, _, _ = setup("cpu", torch.float32)
    ops = torch.ops.peft_kernels
    S = ops.bgmv_shrink(dev["x"], dev["A"], m.perm, m.pos_slots, ranks_d, scal_d)
    cases = [
        (ops.bgmv_shrink, (dev["x"], dev["A"], m.perm, m.pos_slots, ranks_d, scal_d)),
        (ops.sgmv_shrink, (dev["x"], dev["A"], m.perm, m.seg_slots, m.seg_starts, ranks_d, None, m.max_count)),
        (ops.bgmv_expand, (dev["y"].clone(), S, dev["B"], m.perm, m.pos_slots, ranks_d, scal_d)),
        (ops.sgmv_expand, (dev["y"].clone(), S, dev["B"], m.perm, m.seg_slots, m.seg_starts, ranks_d, scal_d,
                           m.max_count)),
        (ops.lora_expand, (torch.randn(5, 6), torch.randn(5, 3), torch.randn(6, 3), torch.randn(6), 0.5)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_errors_name_the_argument():
    m, t, dev, ranks_d, scal_d, _, _ = setup("cpu", torch.float32)
    ops = _ext.ops()
    with pytest.raises(TypeError, match="w dtype .* must match x's"):
        ops.bgmv_shrink(dev["x"], dev["A"].half(), m.perm, m.pos_slots, ranks_d, scal_d)
    with pytest.raises(ValueError, match=r"w must be \[slots, rank, 37\]"):
        ops.bgmv_shrink(dev["x"], dev["A"][:, :, :5], m.perm, m.pos_slots, ranks_d, scal_d)
    with pytest.raises(TypeError, match="perm must be int32"):
        ops.bgmv_shrink(dev["x"], dev["A"], m.perm.long(), m.pos_slots, ranks_d, scal_d)
    with pytest.raises(ValueError, match="ranks must have one entry per slot"):
        ops.bgmv_shrink(dev["x"], dev["A"], m.perm, m.pos_slots, ranks_d[:2], scal_d)
    with pytest.raises(TypeError, match="S must be float32"):
        ops.bgmv_expand(dev["y"], torch.zeros(m.num_active, 9, dtype=torch.float64), dev["B"], m.perm, m.pos_slots,
                        ranks_d, scal_d)
    with pytest.raises(ValueError, match="seg_starts must have len"):
        ops.sgmv_shrink(dev["x"], dev["A"], m.perm, m.seg_slots, m.seg_starts[:-1], ranks_d, scal_d, m.max_count)
    with pytest.raises(ValueError, match="bias must be"):
        ops.lora_expand(torch.randn(5, 6), torch.randn(5, 3), torch.randn(6, 3), torch.randn(5), 0.5)
