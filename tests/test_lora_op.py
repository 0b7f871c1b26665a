"""lora_linear, every backend against the reference: forward and all gradients."""
import math

import pytest
import torch

import peft_kernels as pk
from peft_kernels import dispatch
from peft_kernels.ops.lora import _draw_seed, dropout_mask
from peft_kernels.reference import lora_linear_ref

from helpers import arg, assert_close, backend_params, count_launches, dtype_params, spy_triton_launches

# (leading dims, K, N, r, bias, layout): M, K, N are odd / not multiples of any block
CASES = [
    pytest.param((70,), 75, 45, 19, True, "contig", id="M70-K75-N45-r19-bias"),
    pytest.param((2, 9), 37, 29, 1, False, "contig", id="3d-r1-nobias"),
    pytest.param((33,), 53, 67, 128, True, "contig", id="r128"),
    pytest.param((17,), 40, 24, 160, False, "contig", id="r160-rank-chunks"),
    pytest.param((3, 11), 45, 31, 8, True, "strided", id="3d-noncontig-stride2"),
    pytest.param((5, 7), 33, 21, 4, True, "transposed", id="3d-transposed"),
]


def make_inputs(lead, K, N, r, bias, layout, dtype, adapter_dtype=None):
    g = torch.Generator().manual_seed(1234)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(*lead, K, generator=g, **f64)
    W = torch.randn(N, K, generator=g, **f64) / math.sqrt(K)
    b = torch.randn(N, generator=g, **f64) if bias else None
    A = torch.randn(r, K, generator=g, **f64) / math.sqrt(K)
    B = torch.randn(N, r, generator=g, **f64) / math.sqrt(r)
    dy = torch.randn(*lead, N, generator=g, **f64)
    adt = adapter_dtype or dtype
    xl = x.to(dtype)
    if layout == "strided":  # last-dim stride 2
        xl = torch.stack([xl, torch.zeros_like(xl)], dim=-1).flatten(-2)[..., ::2]
        assert not xl.is_contiguous()
    elif layout == "transposed":  # a non-contiguous 3-D view whose 2-D reshape needs a copy
        xl = xl.transpose(0, 1).contiguous().transpose(0, 1)
        assert not xl.is_contiguous()
    return dict(x=xl, W=W.to(dtype), b=None if b is None else b.to(dtype), A=A.to(adt), B=B.to(adt),
                dy=dy.to(dtype))


def run_and_compare(backend, t, scaling, p, grads_for_base=False, mult=4.0):
    """Run the op, then the reference in fp64 (on the same rounded inputs) and in the same low
    precision; compare output and every gradient."""
    x = t["x"].detach().requires_grad_()  # not clone(): a clone of a strided view is contiguous
    W = t["W"].detach().clone().requires_grad_(grads_for_base)
    b = None if t["b"] is None else t["b"].detach().clone().requires_grad_(grads_for_base)
    A = t["A"].detach().clone().requires_grad_()
    B = t["B"].detach().clone().requires_grad_()
    torch.manual_seed(77)
    y = pk.lora_linear(x, W, b, A, B, scaling, dropout_p=p, training=True, backend=backend)
    y.backward(t["dy"])
    M, K = x.numel() // x.shape[-1], x.shape[-1]
    mask = None
    if p > 0:
        torch.manual_seed(77)
        mask = dropout_mask(backend, _draw_seed(), (M, K), p, x.device).view(x.shape)

    def ref(dtype_of):
        ins = [None if v is None else v.detach().to(dtype_of(v)).requires_grad_(v.requires_grad)
               for v in (x, W, b, A, B)]
        m = None if mask is None else mask.to(dtype_of(x))
        out = lora_linear_ref(ins[0], ins[1], ins[2], ins[3], ins[4], scaling, m)
        out.backward(t["dy"].to(out.dtype))
        return out, ins

    y64, i64 = ref(lambda v: torch.float64)
    ylp, ilp = ref(lambda v: v.dtype)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], W.shape[0])
    assert_close(y, y64, ylp, "y", mult)
    names = ["dx", "dW", "db", "dA", "dB"]
    for name, got, r64, rlp in zip(names, (x, W, b, A, B), i64, ilp):
        if got is None or not got.requires_grad:
            continue
        assert got.grad is not None, f"{name} missing"
        assert got.grad.dtype == got.dtype, f"{name} dtype {got.grad.dtype} != {got.dtype}"
        assert_close(got.grad, r64.grad, rlp.grad, name, mult)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("lead,K,N,r,bias,layout", CASES)
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
def test_against_reference(backend, dtype, lead, K, N, r, bias, layout, p):
    t = make_inputs(lead, K, N, r, bias, layout, dtype)
    run_and_compare(backend, t, scaling=0.75, p=p)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp32_adapter_on_half_base(backend, dtype):
    """HF PEFT keeps adapters in fp32 on a half-precision base; the branch computes in fp32."""
    t = make_inputs((41,), 38, 27, 6, True, "contig", dtype, adapter_dtype=torch.float32)
    run_and_compare(backend, t, scaling=2.0, p=0.1)


@pytest.mark.parametrize("backend", backend_params())
def test_unfrozen_base_gets_gradients(backend):
    t = make_inputs((2, 13), 29, 19, 3, True, "contig", torch.float32)
    run_and_compare(backend, t, scaling=0.5, p=0.2, grads_for_base=True)


@pytest.mark.parametrize("backend", backend_params())
def test_only_requested_grads(backend):
    t = make_inputs((19,), 23, 17, 2, False, "contig", torch.float32)
    x = t["x"].clone()  # no grad for x: the dX GEMM is skipped
    A = t["A"].clone().requires_grad_()
    B = t["B"].clone()
    y = pk.lora_linear(x, t["W"], None, A, B, 1.0, backend=backend)
    y.sum().backward()
    assert A.grad is not None and B.grad is None and x.grad is None
    A64, A32 = t["A"].double().requires_grad_(), t["A"].clone().requires_grad_()
    lora_linear_ref(x.double(), t["W"].double(), None, A64, B.double(), 1.0).sum().backward()
    lora_linear_ref(x, t["W"], None, A32, B, 1.0).sum().backward()
    assert_close(A.grad, A64.grad, A32.grad, "dA only")


@pytest.mark.parametrize("backend", backend_params())
def test_eval_mode_ignores_dropout(backend):
    t = make_inputs((21,), 30, 20, 4, True, "contig", torch.float32)
    args = (t["x"], t["W"], t["b"], t["A"], t["B"], 0.5)
    y_eval = pk.lora_linear(*args, dropout_p=0.5, training=False, backend=backend)
    y_nodrop = pk.lora_linear(*args, backend=backend)
    y_train = pk.lora_linear(*args, dropout_p=0.5, training=True, backend=backend)
    assert torch.equal(y_eval, y_nodrop)
    assert not torch.allclose(y_train, y_nodrop), "dropout in training mode changed nothing"


@pytest.mark.parametrize("backend", backend_params())
def test_dropout_reproducible_with_manual_seed(backend):
    t = make_inputs((21,), 30, 20, 4, True, "contig", torch.float32)
    args = (t["x"], t["W"], t["b"], t["A"], t["B"], 0.5)
    torch.manual_seed(3)
    y1 = pk.lora_linear(*args, dropout_p=0.3, training=True, backend=backend)
    torch.manual_seed(3)
    y2 = pk.lora_linear(*args, dropout_p=0.3, training=True, backend=backend)
    y3 = pk.lora_linear(*args, dropout_p=0.3, training=True, backend=backend)
    assert torch.equal(y1, y2)
    assert not torch.equal(y2, y3), "two calls without reseeding used the same dropout mask"


def test_gradcheck_fp64_torch_with_dropout():
    """Reseeding inside the function gives every call the same mask; gradcheck then passes only
    if backward regenerates forward's mask (it is never stored)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 11, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(9, 11, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(3, 11, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(9, 3, dtype=torch.float64, generator=g, requires_grad=True)

    def f(x, W, b, A, B):
        torch.manual_seed(11)
        return pk.lora_linear(x, W, b, A, B, 0.8, dropout_p=0.3, training=True, backend="torch")

    assert torch.autograd.gradcheck(f, (x, W, b, A, B))
    # and the mask really is active: the output differs from the no-dropout one
    assert not torch.allclose(f(x, W, b, A, B), pk.lora_linear(x, W, b, A, B, 0.8, backend="torch"))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(backend, p):
    M, K = 384, 512
    mask = dropout_mask(backend, 12345, (M, K), p, "cpu")
    kept = mask > 0
    n = kept.numel()
    rate = kept.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.5f} vs {1 - p} (5σ = {5 * sigma:.2e})"
    vals = torch.unique(mask)
    assert len(vals) == 2 and vals[0] == 0, f"mask values {vals}"
    assert abs(vals[1].item() - 1 / (1 - p)) < 1e-3, "inverted-dropout scale"
    assert abs(mask.double().mean().item() - 1.0) < 6 * sigma / (1 - p), "mask is biased"
    # rows and columns are not correlated copies of each other
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[:, 0], kept[:, 1])
    assert torch.equal(mask, dropout_mask(backend, 12345, (M, K), p, "cpu"))
    assert not torch.equal(mask, dropout_mask(backend, 12346, (M, K), p, "cpu"))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_saved_for_backward_is_x_and_S_only(backend, p):
    """Autograd keeps x itself (same storage, never a dropped copy) and the M×r S; nothing else
    but parameters. The dropout mask is never saved."""
    t = make_inputs((3, 17), 29, 23, 5, True, "contig", torch.float32)
    x = t["x"].clone().requires_grad_()
    params = [t["W"], t["b"], t["A"].requires_grad_(), t["B"].requires_grad_()]
    param_ptrs = {q.untyped_storage().data_ptr() for q in params}
    saved = []

    def pack(v):
        if v.untyped_storage().data_ptr() not in param_ptrs:
            saved.append(v)
        return v

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        y = pk.lora_linear(x, t["W"], t["b"], t["A"], t["B"], 1.0, dropout_p=p, training=True, backend=backend)
    storages = {v.untyped_storage().data_ptr(): v for v in saved}
    assert x.untyped_storage().data_ptr() in storages, "x itself is not what was saved"
    others = [v for ptr, v in storages.items() if ptr != x.untyped_storage().data_ptr()]
    assert len(others) == 1 and tuple(others[0].shape) == (51, 5), [tuple(v.shape) for v in others]
    y.sum().backward()  # and backward works from exactly that
    assert x.grad is not None


def test_triton_launch_counts(monkeypatch):
    """Forward is 2 kernel launches; backward at most 3 (and 2 when x needs no grad)."""
    from peft_kernels.kernels import lora as K

    launches = count_launches(monkeypatch, [K._shrink_kernel, K._fwd_gemm_kernel, K._bwd_dy_kernel, K._bwd_dx_kernel,
                                            K._bwd_da_kernel])
    t = make_inputs((37,), 45, 33, 6, True, "contig", torch.float32)
    x = t["x"].clone().requires_grad_()
    A, B = t["A"].clone().requires_grad_(), t["B"].clone().requires_grad_()
    y = pk.lora_linear(x, t["W"], t["b"], A, B, 1.0, dropout_p=0.2, training=True, backend="triton")
    assert launches == ["_shrink_kernel", "_fwd_gemm_kernel"]
    launches.clear()
    y.sum().backward()
    assert sorted(launches) == sorted(["_bwd_dy_kernel", "_bwd_dx_kernel", "_bwd_da_kernel"])
    launches.clear()
    pk.lora_linear(t["x"], t["W"], t["b"], A, B, 1.0, backend="triton").sum().backward()
    assert sorted(launches) == sorted(["_shrink_kernel", "_fwd_gemm_kernel", "_bwd_dy_kernel", "_bwd_da_kernel"])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_empty_batch(backend, p):
    """No tokens: an empty output and zero LoRA gradients, not a crash."""
    x = torch.randn(2, 0, 8, requires_grad=True)
    W = torch.randn(5, 8)
    A, B = torch.randn(2, 8, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    y = pk.lora_linear(x, W, None, A, B, 1.0, dropout_p=p, training=True, backend=backend)
    assert y.shape == (2, 0, 5)
    y.sum().backward()
    assert torch.equal(A.grad, torch.zeros_like(A)) and torch.equal(B.grad, torch.zeros_like(B))
    assert x.grad.shape == x.shape


def test_strided_x_reaches_the_triton_kernels(monkeypatch):
    """A really strided x (last-dim stride 2, no dense copy) is read through its strides by every kernel that
    reads x, forward and backward, and the result is right (run_and_compare's "strided" cases check values)."""
    from peft_kernels.kernels import lora as K

    calls = spy_triton_launches(monkeypatch, [K._shrink_kernel, K._fwd_gemm_kernel, K._bwd_da_kernel])
    t = make_inputs((21,), 30, 20, 4, True, "strided", torch.float32)
    x = t["x"].detach().requires_grad_()
    assert x.stride() == (60, 2)
    A, B = t["A"].clone().requires_grad_(), t["B"].clone().requires_grad_()
    pk.lora_linear(x, t["W"], t["b"], A, B, 0.5, dropout_p=0.2, training=True, backend="triton").backward(t["dy"])
    seen = {name: args for name, args in calls}
    assert arg(K._shrink_kernel, seen["_shrink_kernel"], "stride_xk") == 2
    assert arg(K._fwd_gemm_kernel, seen["_fwd_gemm_kernel"], "stride_xk") == 2
    assert arg(K._bwd_da_kernel, seen["_bwd_da_kernel"], "stride_xk") == 2
    assert arg(K._shrink_kernel, seen["_shrink_kernel"], "stride_xm") == 60


@pytest.mark.parametrize("M,K,r,expect", [(3, 100, 4, 2), (1, 33, 1, 2), (5, 32, 20, 1), (70, 100, 4, 1),
                                          (2, 1000, 70, 2), (2, 300, 200, 1)])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
def test_split_k_shrink_at_small_m(monkeypatch, M, K, r, expect, p):
    """Where row blocks × rank chunks are fewer than the machine's programs (the interpreter's budget is 2),
    the shrink splits K into fp32 partials that the forward GEMM sums in a fixed order and stores as S for
    backward: the launched grid has the splits, and forward and every gradient (dropout on: its mask spans
    the splits) match the fp64 reference."""
    if dispatch.unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip(dispatch.unavailable_reason("triton", torch.device("cpu")))
    from peft_kernels.kernels import lora as KL

    grids = []
    real = KL._shrink_kernel.run
    monkeypatch.setattr(KL._shrink_kernel, "run", lambda *a, **kw: grids.append(tuple(kw["grid"])) or real(*a, **kw))
    t = make_inputs((M,), K, 19, r, True, "contig", torch.float16)
    run_and_compare("triton", t, scaling=0.75, p=p)
    if p == 0 and KL.fused_decode(M, t["x"], t["A"], r, KL.configs(torch.float16, r)):
        assert grids == []  # the decode forward computes S inside its GEMM: no shrink launch to split
    else:
        assert grids and all(g[2] == expect for g in grids), grids
    t32 = make_inputs((M,), K, 19, r, True, "contig", torch.float32)  # an fp32 base never splits
    grids.clear()
    run_and_compare("triton", t32, scaling=0.75, p=p)
    assert grids and all(g[2] == 1 for g in grids), grids
    cfg = KL.configs(torch.float16, r)
    splits, k_per = KL.shrink_splits(torch.device("cpu"), M, K, r, cfg["shrink"].block_m, cfg["shrink"].block_k,
                                     cfg["block_r"])
    assert splits == expect and (splits - 1) * k_per < K <= splits * k_per  # no empty split, K covered


def test_shrink_split_rule_on_a_gpu_sized_machine(monkeypatch):
    """With 132 programs to fill (an H100/H200), decode and small-M shrinks split K; prefill does not."""
    from peft_kernels.kernels import lora as KL

    monkeypatch.setattr(KL, "program_budget", lambda device: 132)
    cfg = KL.configs(torch.bfloat16, 16, interpreted=False)
    c, br = cfg["shrink"], cfg["block_r"]
    dev = torch.device("cpu")
    assert KL.shrink_splits(dev, 1, 4096, 16, c.block_m, c.block_k, br) == (16, 256)  # 1 row block → 16 splits
    # 16 row blocks: ⌈132/16⌉ = 9 wanted; 64 K blocks in equal spans of ⌈64/9⌉ = 8 blocks → 8 splits
    assert KL.shrink_splits(dev, 1024, 4096, 16, c.block_m, c.block_k, br) == (8, 512)
    # 64 row blocks: ⌈132/64⌉ = 3 wanted; spans of ⌈64/3⌉ = 22 blocks (1408) → 3 splits
    assert KL.shrink_splits(dev, 4096, 4096, 16, c.block_m, c.block_k, br) == (3, 1408)
    assert KL.shrink_splits(dev, 16384, 4096, 16, c.block_m, c.block_k, br)[0] == 1    # fills the machine


def test_m_buckets():
    from peft_kernels.kernels import lora as KL

    assert [KL.m_bucket(m) for m in (1, 64, 65, 1024, 1025, 16384, None)] == \
        ["decode", "decode", "mid", "mid", "prefill", "prefill", "prefill"]
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        dec = KL.configs(dt, 16, interpreted=False, M=1)["gemm"]
        pre = KL.configs(dt, 16, interpreted=False, M=4096)["gemm"]
        assert KL.configs(dt, 16, interpreted=False)["gemm"] == pre == KL.configs(dt, 16, interpreted=False, M=65)["gemm"]
        if dt == torch.float32:  # fp32 keeps the prefill tile (every 16-row fp32 tile spilled somewhere)
            assert dec == pre
            continue
        assert dec.block_m == 16 and dec != pre
        # a decode GEMM at Llama q_proj (N = 4096) fills about one wave of 132 SMs; the prefill tile gave 32 programs
        assert -(-4096 // dec.block_n) == 128 and -(-4096 // pre.block_n) <= 64


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("M", [3, 70], ids=["decode", "mid"])
def test_gpu_configs_under_the_interpreter(monkeypatch, dtype, M):
    """The GPU launch configs (decode and mid buckets), not the interpreter's small tiles, run the same kernels
    to the fp64 reference: forward and every gradient, dropout on."""
    if dispatch.unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip(dispatch.unavailable_reason("triton", torch.device("cpu")))
    import functools

    from peft_kernels.kernels import lora as KL

    monkeypatch.setattr(KL, "configs", functools.partial(KL.configs, interpreted=False))
    seen = []
    real = KL._fwd_gemm_kernel.run
    monkeypatch.setattr(KL._fwd_gemm_kernel, "run", lambda *a, **kw: seen.append(kw["BLOCK_M"]) or real(*a, **kw))
    t = make_inputs((M,), 160, 96, 8, True, "contig", dtype)
    run_and_compare("triton", t, scaling=0.75, p=0.2)
    want = KL.configs(dtype, 8, True, interpreted=False, M=M)["gemm"].block_m
    assert seen == [want] and want == (64 if dtype == torch.float32 else (16 if M <= 64 else 128))
