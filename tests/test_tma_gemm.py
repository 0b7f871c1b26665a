"""The persistent TMA GEMMs (#16 item 3): what an sm_90 GPU runs past the decode bucket for the forward GEMM and dX.
Under the interpreter (``tma_override(True)``; it runs host-side tensor descriptors) the LoRA op through them
matches the fp64 reference, forward and every gradient; the eligibility rules; and the sm_90 compile uses TMA
loads and wgmma without spills (the AOT test covers every shipped variant)."""
import subprocess
import sys

import pytest
import torch

import peft_kernels as pk
from peft_kernels import dispatch
from peft_kernels.reference import dora_linear_ref

from helpers import assert_close, count_launches, real_jit_env
from test_lora_op import make_inputs, run_and_compare

pytestmark = pytest.mark.skipif(dispatch.unavailable_reason("triton", torch.device("cpu")) is not None,
                                reason=str(dispatch.unavailable_reason("triton", torch.device("cpu"))))

HALF = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
GEMMS = ["_fwd_gemm_tma_kernel", "_bwd_dx_tma_kernel", "_fwd_gemm_kernel", "_bwd_dx_kernel"]


def _mods():
    from peft_kernels.kernels import _common as C
    from peft_kernels.kernels import lora as KL

    return C, KL


def _row_strided(x: torch.Tensor, pad: int = 8) -> torch.Tensor:
    """x as a view of a wider buffer: unit inner stride, row stride K + pad (16-byte aligned), not contiguous."""
    wide = torch.cat([x, torch.zeros(*x.shape[:-1], pad, dtype=x.dtype)], dim=-1)
    v = wide[..., : x.shape[-1]]
    assert not v.is_contiguous() and v.stride(-1) == 1
    return v


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("lead,K,N,r,bias,layout,p", [
    pytest.param((70,), 48, 104, 5, True, "contig", 0.2, id="M70-dropout"),
    pytest.param((3, 40), 64, 40, 80, False, "contig", 0.0, id="3d-r80-nobias"),
    pytest.param((129,), 40, 72, 1, True, "rowstrided", 0.0, id="rowstrided-r1"),
    pytest.param((2, 50), 56, 88, 16, True, "rowstrided", 0.2, id="3d-rowstrided-dropout"),
])
def test_lora_through_the_tma_gemms(monkeypatch, dtype, lead, K, N, r, bias, layout, p):
    """The forward GEMM and dX take the TMA kernels (2 programs walk all the output tiles), and the output and every
    gradient match the fp64 reference within a small multiple of torch's own error."""
    C, KL = _mods()
    t = make_inputs(lead, K, N, r, bias, "contig", dtype)
    if layout == "rowstrided":
        t["x"] = _row_strided(t["x"])
    grids = []
    real = KL._fwd_gemm_tma_kernel.run
    monkeypatch.setattr(KL._fwd_gemm_tma_kernel, "run",
                        lambda *a, **kw: grids.append((tuple(kw["grid"]), a[15], a[6], a[7])) or real(*a, **kw))
    launches = count_launches(monkeypatch, [getattr(KL, n) for n in GEMMS])
    with C.tma_override(True):
        run_and_compare("triton", t, scaling=0.75, p=p)
    assert launches == ["_fwd_gemm_tma_kernel", "_bwd_dx_tma_kernel"], launches
    (grid, progs, M, Nn), = grids
    tiles = -(-M // 32) * -(-Nn // 32)
    assert tiles > 2 and grid == (2,) and progs == 2  # persistent: the CPU budget (2 programs) walks every tile


@pytest.mark.parametrize("dtype", HALF)
def test_tma_gemms_sum_the_split_partials(monkeypatch, dtype):
    """A budget of 8 programs: the shrink splits K (2 partials of S, summed by the TMA forward GEMM, whose column
    block 0 stores S for backward) and the dY launch splits N (2 partials of dS, summed by the TMA dX, which stores
    the sum for dA); 8 persistent programs walk the forward's 12 tiles (dX has 6). Values against the fp64 reference."""
    C, KL = _mods()
    monkeypatch.setattr(KL, "program_budget", lambda device: 8)
    grids = {}
    for k in (KL._shrink_kernel, KL._bwd_dy_kernel, KL._fwd_gemm_tma_kernel, KL._bwd_dx_tma_kernel):
        real = k.run
        monkeypatch.setattr(k, "run", lambda *a, _r=real, _n=k.__name__, **kw:
                            grids.setdefault(_n, (tuple(kw["grid"]), kw.get("num_parts"))) and _r(*a, **kw))
    with C.tma_override(True):
        run_and_compare("triton", make_inputs((70,), 48, 104, 6, True, "contig", dtype), scaling=0.75, p=0.2)
    assert grids == {"_shrink_kernel": ((3, 1, 2), None), "_fwd_gemm_tma_kernel": ((8,), 2),
                     "_bwd_dy_kernel": ((3, 1, 2), None), "_bwd_dx_tma_kernel": ((6,), 2)}, grids


@pytest.mark.parametrize("dtype", HALF)
def test_dora_through_the_tma_gemm(dtype):
    """DoRA's column scale and z store in the TMA GEMM's epilogue (the shared ``_fwd_epilogue``)."""
    C, KL = _mods()
    g = torch.Generator().manual_seed(5)
    M, K, N, r = 70, 48, 40, 6
    x = torch.randn(M, K, generator=g).to(dtype)
    W, b = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype), torch.randn(N, generator=g).to(dtype)
    A, B = (torch.randn(r, K, generator=g) / K ** 0.5).to(dtype), (torch.randn(N, r, generator=g) / r ** 0.5).to(dtype)
    m = (1 + 0.3 * torch.rand(N, generator=g)).to(dtype)
    leaves = [v.clone().requires_grad_() for v in (x, A, B, m)]
    with C.tma_override(True):
        assert KL.tma_gemm(M, x, W, a=A)
        y = pk.dora_linear(leaves[0], W, b, leaves[1], leaves[2], 2.0, leaves[3], backend="triton")
        dy = torch.randn(y.shape, generator=g).to(dtype)
        got = torch.autograd.grad(y, leaves, dy)
    l64 = [v.double().requires_grad_() for v in (x, A, B, m)]
    y64 = dora_linear_ref(l64[0], W.double(), b.double(), l64[1], l64[2], 2.0, l64[3])
    lt = [v.clone().requires_grad_() for v in (x, A, B, m)]
    yt = dora_linear_ref(lt[0], W, b, lt[1], lt[2], 2.0, lt[3])
    assert_close(y, y64, yt, "y")
    for name, g_, w_, t_ in zip(("dx", "dA", "dB", "dm"), got, torch.autograd.grad(y64, l64, dy.double()),
                                torch.autograd.grad(yt, lt, dy)):
        assert_close(g_, w_, t_, name, mult=8)


def test_eligibility_rules(monkeypatch):
    """TMA needs an sm_90 GPU, M past the decode bucket, 16-bit operands of one dtype (adapters too), unit inner
    stride and 16-byte aligned base and row stride; anything else takes the cp.async GEMMs."""
    C, KL = _mods()
    h = torch.float16
    x, W, A = torch.empty(100, 64, dtype=h), torch.empty(40, 64, dtype=h), torch.empty(8, 64, dtype=h)
    assert not KL.tma_gemm(100, x, W, a=A)  # the CPU: no TMA
    assert "is not CUDA" in C.tma_unavailable_reason(torch.device("cpu"))
    with C.tma_override(True):
        assert KL.tma_gemm(100, x, W, a=A) and KL.tma_gemm(65, x[:65], W, a=A)
        assert not KL.tma_gemm(64, x[:64], W, a=A)  # decode bucket: the GEMV tiles
        assert not KL.tma_gemm(100, x.float(), W.float(), a=A.float())  # fp32
        assert not KL.tma_gemm(100, x, W, a=A.float())  # fp32 adapters on a 16-bit base
        assert not KL.tma_gemm(100, x, W.bfloat16(), a=A)  # mixed operand dtypes
        assert not KL.tma_gemm(100, x[:, ::2], W[:, ::2], a=A)  # inner stride 2
        odd = torch.empty(100, 45, dtype=h)
        assert not KL.tma_gemm(100, odd, torch.empty(40, 45, dtype=h), a=A)  # row stride 90 B
        assert KL.tma_gemm(99, torch.empty(100, 64, dtype=h)[1:], W, a=A)  # base 128 B in: aligned
        buf = torch.empty(100 * 64 + 1, dtype=h)
        assert not KL.tma_gemm(100, buf[1:].view(100, 64), W, a=A)  # base 2 B off 16
        assert not KL.tma_gemm(100, torch.empty(100, 0, dtype=h), torch.empty(40, 0, dtype=h), a=A)  # empty K
    with C.tma_override(False):
        assert not KL.tma_gemm(100, x, W, a=A)
    monkeypatch.setenv(C.TMA_VAR, "0")
    assert C.tma_unavailable_reason(torch.device("cuda")) == f"turned off by {C.TMA_VAR}=0"
    with pytest.raises(ValueError, match="tma_override takes True, False or None"):
        with C.tma_override("yes"):
            pass


def test_unaligned_and_decode_inputs_keep_the_cp_async_gemms(monkeypatch):
    """Odd N (dY's row stride unaligned) keeps dX on the cp.async kernel while the forward takes TMA; decode takes
    neither (the fused GEMV path); an fp32 base neither."""
    C, KL = _mods()
    launches = count_launches(monkeypatch, [getattr(KL, n) for n in GEMMS])
    with C.tma_override(True):
        run_and_compare("triton", make_inputs((70,), 48, 33, 4, True, "contig", torch.float16), scaling=0.5, p=0.0)
        assert launches == ["_fwd_gemm_tma_kernel", "_bwd_dx_kernel"], launches
        launches.clear()
        run_and_compare("triton", make_inputs((9,), 48, 40, 4, True, "contig", torch.bfloat16), scaling=0.5, p=0.0)
        run_and_compare("triton", make_inputs((70,), 48, 40, 4, True, "contig", torch.float32), scaling=0.5, p=0.0)
    assert "_fwd_gemm_tma_kernel" not in launches and "_bwd_dx_tma_kernel" not in launches, launches


COMPILE = r"""
import re, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from peft_kernels.kernels import aot, lora as L
from peft_kernels.kernels._common import tma_override
M = K = N = 4096
h = torch.bfloat16
x, W, A, B = torch.empty(M, K, dtype=h), torch.empty(N, K, dtype=h), torch.empty(16, K, dtype=h), torch.empty(N, 16, dtype=h)
kernels = [L._shrink_kernel, L._fwd_gemm_tma_kernel, L._bwd_dy_kernel, L._bwd_dx_tma_kernel, L._bwd_da_kernel]
with tma_override(True), aot.record_launches(kernels) as calls:
    _, S = L.lora_forward(x, W, None, A, B, 1.0, 0.0, None)
    L.lora_backward(torch.empty(M, N, dtype=h), x, W, A, B, S, 1.0, 0.0, None, True, True, True)
tma = [c for c in calls if aot.sm90_only(c)]
print("TMA", [c.kernel.__name__ for c in tma], "SM80", [aot.sm90_only(c) for c in calls if c not in tma])
for c in tma:
    k = c.kernel
    backend, kwargs, bound, spec, opts = aot._bind(c, 90)
    opts, sig, cx, attrs = k._pack_args(backend, kwargs, bound, spec, opts)
    ck = triton.compile(ASTSource(k, sig, cx, attrs), target=GPUTarget("cuda", 90, 32), options=opts.__dict__)
    ptx = ck.asm["ptx"]
    r = aot.compile_launch(c, 90)
    print("ROW", k.__name__, r.dtype, "bulk", len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
          "wgmma", len(re.findall(r"wgmma\.mma_async", ptx)), "cpasync", len(re.findall(r"cp\.async\.cg", ptx)),
          "spills", r.spills, "smem", r.shared_bytes, "i32addr", len(r.offset_problems))
"""


def test_sm90_compile_uses_tma_and_wgmma():
    """The recorded q_proj launches compile for sm_90 to TMA bulk-tensor loads feeding async wgmma (no cp.async
    copies of x or W), without spills or 32-bit address arithmetic; the AOT checker never compiles them for sm_80."""
    out = subprocess.run([sys.executable, "-c", COMPILE], env=real_jit_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "TMA ['_fwd_gemm_tma_kernel', '_bwd_dx_tma_kernel'] SM80 [False, False, False]" in lines, out.stdout
    rows = [ln.split() for ln in lines if ln.startswith("ROW")]
    assert [r[1] for r in rows] == ["_fwd_gemm_tma_kernel", "_bwd_dx_tma_kernel"]
    for r in rows:
        v = dict(zip(r[3::2], map(int, r[4::2])))
        assert r[2] == "bf16" and v["bulk"] >= 2 and v["wgmma"] >= 1 and v["cpasync"] == 0, r
        assert v["spills"] == 0 and v["i32addr"] == 0 and v["smem"] <= 227 * 1024, r
