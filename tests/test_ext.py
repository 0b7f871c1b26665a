"""The compiled CPU extension (csrc/): its dropout mask is the torch backend's mask bit for bit,
and its fused passes match plain torch on the same mask. Both torch paths (with and without the
extension) are checked against the reference in test_lora_op.py / below."""
import os

import pytest
import torch

from peft_kernels import _ext
from peft_kernels.ops import _torch_dropout as D

from helpers import cpu_isa, isa_params  # noqa: F401 (fixture)
from test_lora_op import CASES, make_inputs, run_and_compare


def test_extension_built_when_required():
    """`make test` sets PEFT_KERNELS_REQUIRE_EXT=1: a silently failed C++ build must fail CI."""
    if os.environ.get("PEFT_KERNELS_REQUIRE_EXT") != "1":
        pytest.skip("PEFT_KERNELS_REQUIRE_EXT is not set (make test sets it)")
    assert _ext.available(), _ext.unavailable_reason()


needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"extension: {_ext.unavailable_reason()}")


@needs_ext
@pytest.mark.parametrize("cpu_isa", isa_params(), indirect=True)
@pytest.mark.parametrize("M,K,offset", [(37, 53, 0), (5, 4097, 123), (3, 7, 2 ** 32 - 10), (2, 9, 2 ** 40 + 1)])
@pytest.mark.parametrize("seed", [0, 1, 2 ** 31 + 5, 2 ** 62 - 1])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.999])
def test_cpp_mask_equals_torch_twin(cpu_isa, M, K, offset, seed, p):
    ks = D.keys(seed, p)
    a = D.keep_mask(seed, (M, K), p, "cpu", offset=offset)
    b = _ext.ops().dropout_keep_mask(M, K, *ks, offset)
    assert torch.equal(a, b)


@needs_ext
@pytest.mark.parametrize("cpu_isa", isa_params(), indirect=True)
@pytest.mark.parametrize("M,K,R", [(37, 53, 3), (70, 75, 19), (100, 200, 128), (1100, 300, 5), (1, 1, 1)])
def test_fused_passes_match_torch(cpu_isa, M, K, R):
    g = torch.Generator().manual_seed(0)
    x, A, dS = (torch.randn(*s, generator=g) for s in ((M, K), (R, K), (M, R)))
    ks = D.keys(99, 0.3)
    keep = D.keep_mask(99, (M, K), 0.3, "cpu").double()
    ops = _ext.ops()
    ref = {"S": (x.double() * keep) @ A.double().t(), "dx": (dS.double() @ A.double()) * keep,
           "dA": dS.double().t() @ (x.double() * keep)}
    dx, dA = ops.lora_dropout_bwd(dS, x, A, *ks, True, True)
    got = {"S": ops.lora_dropout_shrink(x, A, *ks), "dx": dx, "dA": dA}
    only_dx, no_da = ops.lora_dropout_bwd(dS, x, A, *ks, True, False)
    no_dx, only_da = ops.lora_dropout_bwd(dS, x, A, *ks, False, True)
    assert no_da.numel() == 0 and no_dx.numel() == 0
    assert torch.equal(only_dx, dx) and torch.equal(only_da, dA)
    plain = {"S": (x * keep.float()) @ A.t(), "dx": (dS @ A) * keep.float(), "dA": dS.t() @ (x * keep.float())}
    from helpers import assert_close

    for k in ref:
        assert_close(got[k], ref[k], plain[k], k)


@needs_ext
def test_fused_passes_non_contiguous_and_errors():
    x = torch.randn(20, 30).t()  # [30, 20], non-contiguous
    A = torch.randn(4, 20)
    ks = D.keys(1, 0.2)
    keep = D.keep_mask(1, (30, 20), 0.2, "cpu")
    torch.testing.assert_close(_ext.ops().lora_dropout_shrink(x, A, *ks), (x * keep) @ A.t())
    with pytest.raises(TypeError, match="float32"):
        _ext.ops().lora_dropout_shrink(x.double(), A, *ks)
    with pytest.raises(ValueError, match="columns"):
        _ext.ops().lora_dropout_shrink(x, torch.randn(4, 21), *ks)
    with pytest.raises(ValueError, match="uint32"):
        _ext.ops().lora_dropout_shrink(x, A, -1, 0, 0, 0)


def _group_inputs(M, K, ranks, ps, g):
    x = torch.randn(M, K, generator=g)
    As = [torch.randn(r, K, generator=g) for r in ranks]
    dS = [torch.randn(M, r, generator=g) for r in ranks]
    keys = [D.keys(1000 + i, p) for i, p in enumerate(ps)]
    return x, As, dS, keys


@needs_ext
@pytest.mark.parametrize("cpu_isa", isa_params(), indirect=True)
@pytest.mark.parametrize("M,K,ranks,ps", [(37, 53, (3, 1, 70), (0.1, 0.5, 0.3)), (1100, 300, (5, 16), (0.05, 0.05)),
                                          (1, 1, (1, 1), (0.5, 0.999)), (64, 4100, (2,), (0.2,))])
def test_dropout_group_kernels(cpu_isa, M, K, ranks, ps):
    """The sibling group kernels against fp64 on each member's own mask (every member's mask differs), and bit for
    bit equal to the one-member kernels member by member (dx: their sum in member order), whichever of dx / dA_i
    are asked for."""
    from helpers import assert_close

    ops = _ext.ops()
    x, As, dS, keys = _group_inputs(M, K, ranks, ps, torch.Generator().manual_seed(0))
    flat = [int(k) for ks in keys for k in ks]
    keeps = [D.keep_mask(1000 + i, (M, K), p, "cpu") for i, p in enumerate(ps)]
    if len(ps) > 1:
        assert not torch.equal(keeps[0], keeps[1])
    S = ops.lora_dropout_shrink_group(x, As, flat)
    for i, (A, kp) in enumerate(zip(As, keeps)):
        assert_close(S[i], (x.double() * kp) @ A.double().t(), (x * kp) @ A.t(), f"S[{i}]")
        assert torch.equal(S[i], ops.lora_dropout_shrink(x, A, *keys[i]))
    # really strided inputs (a transposed x, every other column of each A, dS in column-major storage): the values
    # of the contiguous call
    xs = x.t().contiguous().t()
    As_s = [torch.stack([A, A], 2)[:, :, 0] for A in As]
    dS_s = [d.t().contiguous().t() for d in dS]
    assert (M == 1 or K == 1) or not (xs.is_contiguous() or As_s[0].is_contiguous())
    for a, b in zip(ops.lora_dropout_shrink_group(xs, As_s, flat), S):
        assert torch.equal(a, b)
    sdx, sdA = ops.lora_dropout_bwd_group(dS_s, xs, As_s, flat, True, [1] * len(ps))
    cdx, cdA = ops.lora_dropout_bwd_group(dS, x, As, flat, True, [1] * len(ps))
    assert torch.equal(sdx, cdx) and all(torch.equal(a, b) for a, b in zip(sdA, cdA))
    ref_dx = sum((d.double() @ A.double()) * kp for d, A, kp in zip(dS, As, keeps))
    plain_dx = sum((d @ A) * kp for d, A, kp in zip(dS, As, keeps))
    for need_dx in (True, False):
        for need_da in ([1] * len(ps), [0] * len(ps), [i % 2 for i in range(len(ps))]):
            dx, dA = ops.lora_dropout_bwd_group(dS, x, As, flat, need_dx, need_da)
            one = [ops.lora_dropout_bwd(d, x, A, *ks, need_dx, bool(f)) for d, A, ks, f in zip(dS, As, keys, need_da)]
            if need_dx:
                assert_close(dx, ref_dx, plain_dx, "dx")
                want = one[0][0].clone()
                for o in one[1:]:
                    want.add_(o[0])
                assert torch.equal(dx, want)
            else:
                assert dx.numel() == 0
            for i, f in enumerate(need_da):
                if f:
                    assert_close(dA[i], dS[i].double().t() @ (x.double() * keeps[i]), dS[i].t() @ (x * keeps[i]),
                                 f"dA[{i}]")
                    assert torch.equal(dA[i], one[i][1])
                else:
                    assert dA[i].numel() == 0


@needs_ext
def test_dropout_group_kernels_errors():
    """Inconsistent lists, shapes, dtypes and keys raise (no crash): the group ops check every member."""
    ops = _ext.ops()
    x, As, dS, keys = _group_inputs(13, 20, (3, 4), (0.1, 0.2), torch.Generator().manual_seed(0))
    flat = [int(k) for ks in keys for k in ks]
    bad = [
        (ValueError, "at least one member", lambda: ops.lora_dropout_shrink_group(x, [], [])),
        (ValueError, "4 values", lambda: ops.lora_dropout_shrink_group(x, As, flat[:-1])),
        (ValueError, "columns", lambda: ops.lora_dropout_shrink_group(x, [As[0], torch.randn(4, 21)], flat)),
        (TypeError, "float32", lambda: ops.lora_dropout_shrink_group(x, [As[0], As[1].double()], flat)),
        (ValueError, "2-D", lambda: ops.lora_dropout_shrink_group(x, [As[0], As[1][None]], flat)),
        (ValueError, "uint32", lambda: ops.lora_dropout_shrink_group(x, As, flat[:4] + [-1] + flat[5:])),
        (ValueError, "one tensor per member", lambda: ops.lora_dropout_bwd_group(dS[:1], x, As, flat, True, [1, 1])),
        (ValueError, "one flag per member", lambda: ops.lora_dropout_bwd_group(dS, x, As, flat, True, [1])),
        (ValueError, "0 or 1", lambda: ops.lora_dropout_bwd_group(dS, x, As, flat, True, [1, 2])),
        (ValueError, r"dS\[1\] must be \[13, 4\]", lambda: ops.lora_dropout_bwd_group([dS[0], dS[0]], x, As, flat,
                                                                                      True, [1, 1])),
        (ValueError, r"dS\[1\] must be", lambda: ops.lora_dropout_bwd_group([dS[0], torch.randn(14, 4)], x, As, flat,
                                                                           True, [1, 1])),
        (TypeError, "float32", lambda: ops.lora_dropout_bwd_group([dS[0], dS[1].half()], x, As, flat, True, [1, 1])),
    ]
    for exc, msg, f in bad:
        with pytest.raises(exc, match=msg):
            f()


@pytest.mark.parametrize("lead,K,N,r,bias,layout", CASES[:3] + CASES[4:5])
def test_torch_backend_without_extension(monkeypatch, lead, K, N, r, bias, layout):
    """The pure-torch fallback (no compiler, or other devices) gives the same results."""
    monkeypatch.setenv("PEFT_KERNELS_DISABLE_EXT", "1")
    assert not _ext.available()
    t = make_inputs(lead, K, N, r, bias, layout, torch.float32)
    run_and_compare("torch", t, scaling=0.75, p=0.2)


def test_same_mask_with_and_without_extension(monkeypatch):
    """The torch backend's output does not depend on whether the extension is built."""
    import peft_kernels as pk

    t = make_inputs((33,), 41, 19, 5, True, "contig", torch.float32)
    args = (t["x"], t["W"], t["b"], t["A"], t["B"], 0.5)
    torch.manual_seed(4)
    y1 = pk.lora_linear(*args, dropout_p=0.3, training=True, backend="torch")
    monkeypatch.setenv("PEFT_KERNELS_DISABLE_EXT", "1")
    torch.manual_seed(4)
    y2 = pk.lora_linear(*args, dropout_p=0.3, training=True, backend="torch")
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)


@needs_ext
def test_opcheck_dropout_and_multi_adapter_ops():
    """torch.library.opcheck (schema, fake kernels, in-place annotations) for the extension's other tensor
    ops; the gather ops are checked in test_gather_ops.py."""
    from peft_kernels.ops.multi_lora import build_mapping

    ops = _ext.ops()
    g = torch.Generator().manual_seed(0)
    x, A = torch.randn(13, 20, generator=g), torch.randn(5, 20, generator=g)
    ks = D.keys(3, 0.2)
    T, S, R, K, N = 17, 4, 6, 20, 9
    ids = torch.randint(-1, S, (T,), generator=g)
    m = build_mapping(ids, T, S)
    A3, B3 = torch.randn(S, R, K, generator=g), torch.randn(S, N, R, generator=g)
    ranks, scal = torch.tensor([6, 3, 1, 0], dtype=torch.int32), torch.rand(S, generator=g)
    xs, y = torch.randn(T, K, generator=g), torch.randn(T, N, generator=g)
    Sb = ops.multi_lora_fwd(y.clone(), xs, A3, B3, m.perm, m.seg_slots, m.seg_starts, ranks, scal, None)
    cases = [
        (ops.lora_dropout_shrink, (x, A, *ks)),
        (ops.lora_dropout_bwd, (torch.randn(13, 5, generator=g), x, A, *ks, True, True)),
        (ops.lora_dropout_bwd, (torch.randn(13, 5, generator=g), x, A, *ks, False, True)),
        (ops.multi_lora_fwd, (y.clone(), xs, A3, B3, m.perm, m.seg_slots, m.seg_starts, ranks, scal, None)),
        (ops.multi_lora_bwd, (torch.randn(T, N, generator=g), xs, Sb, A3, B3, m.perm, m.seg_slots, m.seg_starts,
                              ranks, scal, torch.zeros(T, K), True, True, None)),
        (ops.group_by_adapter, (ids, S)),
        (ops.lora_dropout_shrink_group, (x, [A, A[:2]], [*ks, *D.keys(4, 0.5)])),
        (ops.lora_dropout_bwd_group, ([torch.randn(13, 5, generator=g), torch.randn(13, 2, generator=g)], x,
                                      [A, A[:2]], [*ks, *D.keys(4, 0.5)], True, [1, 0])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
