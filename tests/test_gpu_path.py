"""The GPU path's defects that no interpreter run shows (issue #14), each proven on the CPU:

- the fp32 precision read the way torch resolves it (the new ``fp32_precision`` API no longer breaks every op);
- fp32 adapters on a 16-bit base as their own case (3×TF32 LoRA dots, TF32 in the 16-bit GEMMs' low-rank tile);
- 64-bit addresses (launcher bounds here; the compiled IR is checked in test_aot.py);
- ranks clamped in the Triton multi-adapter kernels (no read or write past row R with check_ids=False);
- the dB partial buffer bounded by the machine, not by M, and still deterministic;
- no host sync inside a multi-adapter layer call (CUDA-graph capture), and one per mapping build;
- the dropout seed read from device memory (graph replays, no JIT re-specialization);
- autocast: the fused modules behave like nn.Linear under torch.autocast.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import peft_kernels as pk
from peft_kernels.reference import lora_linear_ref, multi_lora_linear_ref

from helpers import HostSyncSpy, assert_close, backend_params, real_jit_env, record_triton_launches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# TF32: the precision torch itself uses, on every API
# --------------------------------------------------------------------------------------------
PRECISION_SCRIPT = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
import peft_kernels as pk
from peft_kernels.kernels import _common, lora as L

seen = []
real = L._shrink_kernel.run
def spy(*a, **kw):
    seen.append(kw["F32_PREC"])
    return real(*a, **kw)
L._shrink_kernel.run = spy
x, W, A, B = torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
for i, case in enumerate(sys.argv[1:]):
    pid = os.fork()  # a fresh copy of torch's global precision state per case
    if pid == 0:
        exec(case)
        try:  # the op first: before the fix, every launcher raised "mix of the legacy and new APIs" here
            y = pk.lora_linear(x, W, None, A, B, 1.0, backend="triton")
            err = float((y - pk.lora_linear(x, W, None, A, B, 1.0, backend="torch")).abs().max())
            resolved = getattr(_common, "torch_fp32_precision", _common.f32_precision)()
            print("RESULT", i, resolved, seen[-1], err, flush=True)
        except Exception as e:
            print("RESULT", i, "ERROR", type(e).__name__, str(e)[:100].replace(chr(10), " "), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
"""

PRECISION_CASES = [
    ("pass", "ieee"),
    ("torch.backends.cuda.matmul.allow_tf32 = True", "tf32"),
    ("torch.set_float32_matmul_precision('high')", "tf32"),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "tf32"),
    ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", "ieee"),
    ("torch.backends.fp32_precision = 'tf32'", "tf32"),
    ("torch.backends.fp32_precision = 'tf32'; torch.backends.cuda.matmul.fp32_precision = 'ieee'", "ieee"),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'; torch.backends.cuda.matmul.fp32_precision = 'none'",
     "ieee"),
]


def test_fp32_precision_follows_torch_on_the_legacy_and_the_new_api():
    """Every way of setting torch's fp32 matmul precision, legacy and new: the launchers read the same
    value torch's cuBLAS path uses, and no op fails (reading the legacy flag after the new API was set
    raised "mix of the legacy and new APIs" in every launcher before)."""
    out = subprocess.run([sys.executable, "-c", PRECISION_SCRIPT] + [c for c, _ in PRECISION_CASES],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            i, *rest = line.split()[1:]
            rows[int(i)] = rest
    assert len(rows) == len(PRECISION_CASES), out.stdout + out.stderr[-2000:]
    for i, (case, expect) in enumerate(PRECISION_CASES):
        got = rows[i]
        assert got[0] != "ERROR", f"{case}: {got}"
        assert got[0] == expect and got[1] == expect, f"{case}: resolved {got[0]}, launched {got[1]}, want {expect}"
        assert float(got[2]) < 1e-4, f"{case}: triton vs torch differ by {got[2]}"


def test_precision_override_is_scoped_and_validated():
    from peft_kernels.kernels import _common

    before = _common.torch_fp32_precision()
    with _common.fp32_precision_override("tf32"):
        assert _common.torch_fp32_precision() == "tf32"
    assert _common.torch_fp32_precision() == before
    with pytest.raises(ValueError, match="fp32 precision must be"):
        with _common.fp32_precision_override("bf16"):
            pass


# --------------------------------------------------------------------------------------------
# fp32 adapters on a 16-bit base: their own precision and configs
# --------------------------------------------------------------------------------------------
LORA_KERNELS = ("_shrink_kernel", "_fwd_gemm_kernel", "_bwd_dy_kernel", "_bwd_dx_kernel", "_bwd_da_kernel")


def _launch_flags(monkeypatch, x_dtype, a_dtype, precision=None):
    from peft_kernels.kernels import _common, lora as K

    calls = record_triton_launches(monkeypatch, [getattr(K, n) for n in LORA_KERNELS])
    x = torch.randn(40, 24).to(x_dtype)
    W, A, B = torch.randn(20, 24).to(x_dtype), torch.randn(4, 24).to(a_dtype), torch.randn(20, 4).to(a_dtype)
    S = torch.zeros(40, 4)
    with _common.fp32_precision_override(precision):
        K.lora_forward(x, W, None, A, B, 1.0, 0.0, None)
        K.lora_backward(torch.randn(40, 20).to(x_dtype), x, W, A, B, S, 1.0, 0.0, None, True, True, True)
    return {name: kw for name, _, kw in calls}


@pytest.mark.parametrize("base", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_adapter_on_half_base_runs_its_lora_dots_on_tensor_cores(monkeypatch, base):
    """The LoRA-only kernels (shrink, dY, dA: fp32 outputs) get 3×TF32 (fp32-class products on tensor
    cores, not CUDA-core FMA); the low-rank tile inside the 16-bit GEMMs gets TF32; torch's TF32 setting
    makes all of them TF32. Before, they all got torch's "ieee" (FMA: 254 registers, spills on sm_80)."""
    fl = _launch_flags(monkeypatch, base, torch.float32)
    for n in ("_shrink_kernel", "_bwd_dy_kernel", "_bwd_da_kernel"):
        assert fl[n]["F32_PREC"] == "tf32x3", (n, fl[n])
    for n in ("_fwd_gemm_kernel", "_bwd_dx_kernel"):
        assert fl[n]["LORA_PREC"] == "tf32", (n, fl[n])
    fl = _launch_flags(monkeypatch, base, torch.float32, "tf32")
    assert {fl[n].get("F32_PREC") for n in ("_shrink_kernel", "_bwd_dy_kernel", "_bwd_da_kernel")} == {"tf32"}
    # an fp32 model follows torch exactly; a 16-bit adapter on a 16-bit base has no fp32 dot to choose for
    fl = _launch_flags(monkeypatch, torch.float32, torch.float32)
    assert {kw.get("F32_PREC") for kw in fl.values()} == {"ieee"} and fl["_fwd_gemm_kernel"]["LORA_PREC"] == "ieee"


def test_fp32_adapter_configs_are_their_own_case():
    from peft_kernels.kernels import lora as K

    half = K.configs(torch.bfloat16, 64, True, interpreted=False)
    mixed = K.configs(torch.bfloat16, 64, True, interpreted=False, adapter_dtype=torch.float32)
    assert mixed["gemm"] == half["gemm"], "the base GEMM keeps the 16-bit tiles"
    assert mixed["gemm_block_r"] < half["gemm_block_r"] and mixed["shrink"] != half["shrink"]


# --------------------------------------------------------------------------------------------
# 64-bit addresses: the launchers' bound on 32-bit sizes (the IR itself: test_aot.py)
# --------------------------------------------------------------------------------------------
def test_launchers_refuse_sizes_past_their_32bit_index_arithmetic():
    """A dimension past 2³¹ - 2²⁰ raises a ValueError naming it (checked before anything is allocated: the
    inputs here are stride-0 views of one row)."""
    from peft_kernels.kernels import _common, ia3 as I, lora as K

    big = _common.MAX_DIM + 1
    x = torch.zeros(1, 8).expand(big, 8)
    W, A, B = torch.zeros(6, 8), torch.zeros(2, 8), torch.zeros(6, 2)
    with pytest.raises(ValueError, match=rf"M={big} is larger than the Triton kernels support"):
        K.lora_forward(x, W, None, A, B, 1.0, 0.0, None)
    with pytest.raises(ValueError, match=rf"M={big}"):
        K.lora_backward(torch.zeros(1, 6).expand(big, 6), x, W, A, B, torch.zeros(1, 2).expand(big, 2), 1.0, 0.0,
                        None, True, True, True)
    with pytest.raises(ValueError, match=rf"M={big}"):
        I.ia3_forward(x, W, None, torch.ones(6), False, False)
    _common.check_dims(M=_common.MAX_DIM, N=4096)  # the bound itself is fine


# --------------------------------------------------------------------------------------------
# rank bounds in the Triton multi-adapter kernels
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["bgmv", "sgmv"])
def test_triton_multi_lora_clamps_ranks_past_max_rank(path):
    """ranks = [R+3, -2, R] with check_ids=False: slot 0 computes at rank R and never reads slot 1's rows
    (which hold data here, so an over-read changes the result), slot 1 acts as rank 0; forward and the
    gradients equal the reference with the ranks clamped, and the torch backend agrees."""
    g = torch.Generator().manual_seed(5)
    S, R, K, N = 3, 4, 19, 13
    x = torch.randn(23, K, generator=g)
    W = torch.randn(N, K, generator=g) / 4
    A = torch.randn(S, R, K, generator=g) / 4
    Bm = torch.randn(S, N, R, generator=g) / 2
    ids = torch.tensor([0, 2, 0, 1, -1, 0, 2, 2, 0, 1, 0, 0, 2, 1, 0, 0, 0, 2, 0, -1, 0, 1, 0])
    scal = torch.tensor([0.5, 2.0, 1.5])
    bad = torch.tensor([R + 3, -2, R], dtype=torch.int32)
    clamped = bad.clamp(0, R)
    dy = torch.randn(23, N, generator=g)

    def run(backend, ranks, check_ids):
        xx, AA, BB = x.clone().requires_grad_(), A.clone().requires_grad_(), Bm.clone().requires_grad_()
        y = pk.multi_lora_linear(xx, W, None, AA, BB, scal, ids, ranks=ranks, backend=backend, path=path,
                                 check_ids=check_ids)
        y.backward(dy)
        return y.detach(), xx.grad, AA.grad, BB.grad

    got = run("triton", bad, False)
    x64, A64, B64 = x.double().requires_grad_(), A.double().requires_grad_(), Bm.double().requires_grad_()
    ref = multi_lora_linear_ref(x64, W.double(), None, A64, B64, scal.double(), ids, clamped)
    ref.backward(dy.double())
    for name, a, r in zip(("y", "dx", "dA", "dB"), got, (ref, x64.grad, A64.grad, B64.grad)):
        err = (a.double() - r).abs().max().item()
        assert err < 1e-4 * max(1.0, r.abs().max().item()), f"{name}: {err}"
    torch_got = run("torch", bad, False)
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, torch_got):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), name
    with pytest.raises(ValueError, match=r"ranks must be in \[0, max_rank=4\]"):
        run("triton", bad, True)


# --------------------------------------------------------------------------------------------
# dB partials: bounded by the machine, deterministic
# --------------------------------------------------------------------------------------------
def test_db_partials_are_bounded_by_the_machine_not_by_m(monkeypatch):
    """On a 132-SM GPU the dY launch has at most 132 row programs over its rank chunks, whatever M is:
    at M=16384, N=14336, r=256 the partial buffer is 66·N·R·4 B = 0.97 GB instead of 512·N·R·4 = 7.5 GB."""
    from peft_kernels.kernels import _common, lora as K

    monkeypatch.setattr(_common, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert K.dy_programs(cuda, 4096, 64, 1) == 64  # fewer row blocks than SMs: one program each
    for M in (16384, 10 ** 6, 10 ** 8):
        assert K.dy_programs(cuda, M, 32, 1) == 132
        assert K.dy_programs(cuda, M, 32, 2) == 66
    P = K.dy_programs(cuda, 16384, 32, 2)
    assert P * 14336 * 256 * 4 < 1.0e9
    assert K.dy_programs(cuda, 0, 32, 1) == 0


def test_db_partials_walk_row_blocks_deterministically(monkeypatch):
    """Under the interpreter the budget is 2 programs, so M=200 (7 row blocks of 32) makes each program
    accumulate 3-4 blocks into its partial. dB matches the reference and two runs are bitwise equal."""
    from peft_kernels.kernels import _common, lora as K

    assert _common.program_budget(torch.device("cpu")) == 2
    seen = []
    real = K._bwd_da_kernel.run

    def spy(*a, **kw):
        seen.append(a[11])  # P: the number of partials the reduction sums
        return real(*a, **kw)

    monkeypatch.setattr(K._bwd_da_kernel, "run", spy)
    g = torch.Generator().manual_seed(2)
    x, W = torch.randn(200, 24, generator=g), torch.randn(20, 24, generator=g)
    A, B, dy = torch.randn(6, 24, generator=g), torch.randn(20, 6, generator=g), torch.randn(200, 20, generator=g)
    grads = []
    for _ in range(2):
        AA, BB = A.clone().requires_grad_(), B.clone().requires_grad_()
        pk.lora_linear(x, W, None, AA, BB, 0.5, backend="triton").backward(dy)
        grads.append((AA.grad, BB.grad))
    assert seen == [2, 2]
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    A64, B64 = A.double().requires_grad_(), B.double().requires_grad_()
    lora_linear_ref(x.double(), W.double(), None, A64, B64, 0.5).backward(dy.double())
    BBl = B.clone().requires_grad_()
    pk.lora_linear(x, W, None, A, BBl, 0.5, backend="torch").backward(dy)
    assert_close(grads[0][1], B64.grad, BBl.grad, "dB")


# --------------------------------------------------------------------------------------------
# host syncs: none inside a multi-adapter layer call; one per mapping build
# --------------------------------------------------------------------------------------------
def _multi_model(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16))
    for i in (0, 2):
        model[i] = pk.MultiLoRALinear.from_linear(model[i], max_adapters=4, max_rank=8, backend=backend)
        for slot, r in ((0, 8), (2, 3)):
            model[i].set_adapter(slot, torch.randn(r, model[i].in_features), torch.randn(model[i].out_features, r), 0.5)
    return model


MULTI_KERNELS = ("_sgmv_shrink_kernel", "_sgmv_expand_kernel", "_bgmv_shrink_kernel", "_bgmv_expand_kernel",
                 "_seg_outer_kernel")


@pytest.mark.parametrize("path", ["bgmv", "sgmv"])
@pytest.mark.parametrize("train", [False, True], ids=["decode", "train"])
def test_multi_lora_layer_calls_make_no_host_sync(monkeypatch, path, train):
    """With the mapping built once (its one sync) and handed to adapter_ids, a model's MultiLoRALinear
    calls on the triton backend (check_ids=True, the default) make no .item()/.tolist()/host copy and no
    data-dependent-shape op, forward or backward: the Python side of a CUDA-graph capture. Before, every
    call copied the ranks to the host."""
    from peft_kernels.kernels import multi_lora as ML

    model = _multi_model("triton")
    for m in model.modules():
        if isinstance(m, pk.MultiLoRALinear):
            m.path = path
    calls = record_triton_launches(monkeypatch, [getattr(ML, n) for n in MULTI_KERNELS])
    ids = torch.tensor([0, 2, -1, 0, 0, 2, 3, 0])
    mapping = pk.build_mapping(ids, 8, 4)
    x = torch.randn(8, 16, requires_grad=train)
    with pk.adapter_ids(model, mapping):
        with torch.set_grad_enabled(train), HostSyncSpy() as spy:
            y = model(x)
            if train:
                y.sum().backward()
    assert spy.calls == [], spy.calls
    assert len(calls) >= 4  # the kernels were launched (recorded, not run)


def test_multi_lora_cuda_backend_python_side_makes_no_host_sync():
    """The cuda backend's forward and backward (run here through the CPU twins of its gather ops) need no
    host copy of ranks or scalings: dA/dB come from full-width products that are zero past each rank."""
    from peft_kernels import _ext
    from peft_kernels.ops import multi_lora as MO

    if not _ext.available():
        pytest.skip(f"extension: {_ext.unavailable_reason()}")
    g = torch.Generator().manual_seed(1)
    x, W = torch.randn(9, 12, generator=g), torch.randn(10, 12, generator=g)
    A, B = torch.randn(3, 4, 12, generator=g), torch.randn(3, 10, 4, generator=g)
    ranks = torch.tensor([4, 2, 0], dtype=torch.int32)
    scal = torch.tensor([0.5, 1.5, 1.0])
    A[1, 2:] = 7.0  # padding past slot 1's rank that must never count
    B[1, :, 2:] = 7.0
    ids = torch.tensor([0, 1, 1, -1, 2, 0, 1, 0, 2])
    m = pk.build_mapping(ids, 9, 3)
    dy = torch.randn(9, 10, generator=g)
    for path in ("bgmv", "sgmv"):
        call = MO.MultiLoRACall(m, scal, ranks, (), (), "cuda", path, False)
        with HostSyncSpy() as spy:
            y, S = MO._forward_2d(x, W, None, A, B, call)
            dx, dA, dB = MO._gather_backward(dy, x, W, A, B, S, m, scal, ranks, path, True, True, True)
        assert spy.calls == [], spy.calls
        A64, B64, x64 = A.double().requires_grad_(), B.double().requires_grad_(), x.double().requires_grad_()
        ref = multi_lora_linear_ref(x64, W.double(), None, A64, B64, scal.double(), ids, ranks)
        ref.backward(dy.double())
        for name, a, r in (("y", y, ref), ("dx", dx, x64.grad), ("dA", dA, A64.grad), ("dB", dB, B64.grad)):
            assert (a.double() - r).abs().max().item() < 1e-4, (path, name)


def test_build_mapping_on_a_device_is_one_host_copy(monkeypatch):
    """The device path of build_mapping (used on CUDA) copies one small tensor to the host (counts, bad-id
    count, and the ranks when asked) and runs no data-dependent-shape op: one sync per batch. Before it was
    unique_consecutive (a sync), two .tolist() and two blocking host→device copies."""
    from peft_kernels import _ext
    from peft_kernels.ops import multi_lora as MO

    monkeypatch.setattr(_ext, "available", lambda: False)  # the path every non-CPU device takes
    ids = torch.tensor([3, 0, -1, 3, 1, 0, 7, 3])
    with HostSyncSpy() as spy:
        m, ranks_h = MO._build_mapping(ids, 8, 4, None, False, torch.tensor([2, 4, 0, 1], dtype=torch.int32))
    assert spy.calls == ["Tensor.tolist"], spy.calls
    assert ranks_h == (2, 4, 0, 1)
    assert m.slots == (0, 1, 3) and m.starts == (0, 2, 3, 6)
    assert m.perm.tolist() == [1, 5, 4, 0, 3, 7] and m.pos_slots.tolist() == [0, 0, 1, 3, 3, 3]
    assert m.seg_slots.tolist() == [0, 1, 3] and m.seg_starts.tolist() == [0, 2, 3, 6]
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 4\).*\[7\]"):
        MO._build_mapping(ids, 8, 4, None, True)
    # the C++ CPU path groups identically
    monkeypatch.undo()
    if _ext.available():
        m2 = pk.build_mapping(ids, 8, 4, check_ids=False)
        assert (m2.slots, m2.starts, m2.perm.tolist(), m2.pos_slots.tolist()) == \
            (m.slots, m.starts, m.perm.tolist(), m.pos_slots.tolist())


def test_prebuilt_mapping_is_checked_against_the_layer():
    model = _multi_model("torch")
    m = pk.build_mapping(torch.zeros(5, dtype=torch.long), 5, 4)
    with pk.adapter_ids(model, m):
        with pytest.raises(ValueError, match="covers 5 tokens but x has 8"):
            model(torch.randn(8, 16))
    with pytest.raises(TypeError, match="AdapterMapping"):
        with pk.adapter_ids(model, [0, 1]):
            pass


# --------------------------------------------------------------------------------------------
# dropout: the seed lives in device memory
# --------------------------------------------------------------------------------------------
def test_dropout_seed_is_a_device_tensor_drawn_in_the_call(monkeypatch):
    """The seed is drawn by torch's generator of x's device inside the call (an RNG op a CUDA graph captures
    and advances per replay) and handed to the shrink as a tensor, which writes the packed mask that dX and
    dA read (the same uint8 tensor); no launch argument carries the seed's value, and no host copy is made."""
    from peft_kernels.kernels import lora as K

    calls = record_triton_launches(monkeypatch, [getattr(K, n) for n in LORA_KERNELS])
    x = torch.randn(12, 16, requires_grad=True)
    W, A, B = torch.randn(8, 16), torch.randn(3, 16, requires_grad=True), torch.randn(8, 3, requires_grad=True)
    drawn = []
    from peft_kernels.ops import _torch_dropout

    real = _torch_dropout.draw_seed
    monkeypatch.setattr(_torch_dropout, "draw_seed", lambda device: drawn.append(real(device)) or drawn[-1])
    with HostSyncSpy() as spy:
        y = pk.lora_linear(x, W, None, A, B, 1.0, dropout_p=0.3, training=True, backend="triton")
        y.sum().backward()
    assert spy.calls == [], spy.calls
    assert len(drawn) == 1 and drawn[0].dtype == torch.int64 and drawn[0].device == x.device
    seed_val = int(drawn[0])
    bits = None
    for name, args, _ in calls:
        if name == "_shrink_kernel":
            assert any(a is drawn[0] for a in args), f"{name} did not get the seed tensor"
            (bits,) = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.uint8]
            assert tuple(bits.shape) == (12, 2)  # ⌈16 / 8⌉ bytes per row
        if name in ("_bwd_dx_kernel", "_bwd_da_kernel"):
            assert bits is not None and any(a is bits for a in args), f"{name} did not get forward's mask"
            assert not any(a is drawn[0] for a in args), f"{name} draws the mask again"
        assert not any(isinstance(a, int) and not isinstance(a, bool) and a == seed_val for a in args), name
    assert bits is not None


SPECIALIZATION_SCRIPT = r"""
import torch
from peft_kernels.kernels import aot, lora as L
from peft_kernels.ops import lora as LO

def manual_seed_giving(div16):  # a torch.manual_seed whose dropout seed draw is (not) a multiple of 16
    for k in range(10000):
        torch.manual_seed(k)
        if (int(torch.randint(0, 2 ** 62, (1,))) % 16 == 0) == div16:
            return k

x = torch.empty(256, 512, dtype=torch.bfloat16); W = torch.empty(512, 512, dtype=torch.bfloat16)
A = torch.empty(16, 512, dtype=torch.bfloat16); B = torch.empty(512, 16, dtype=torch.bfloat16)
keys = []
for k in (manual_seed_giving(True), manual_seed_giving(False)):
    torch.manual_seed(k)
    seed = LO._draw_seed()  # what lora_linear draws and hands to the launchers
    with aot.record_launches([L._shrink_kernel, L._fwd_gemm_kernel, L._bwd_dy_kernel, L._bwd_dx_kernel,
                              L._bwd_da_kernel]) as calls:
        L.lora_forward(x, W, None, A, B, 1.0, 0.1, seed)
        L.lora_backward(torch.empty(256, 512, dtype=torch.bfloat16), x, W, A, B, torch.empty(256, 16), 1.0, 0.1,
                        seed, True, True, True)
    keys.append([aot._launch_key(c, 90) for c in calls])
print("SAME" if keys[0] == keys[1] else "DIFFERENT", len(keys[0]))
"""


def test_dropout_seed_never_changes_the_compiled_variant():
    """Triton specializes integer arguments (== 1, divisible by 16): a host-int seed compiled a second
    variant whenever the draw was divisible by 16. The JIT's own binder sees the same specialization for a
    draw divisible by 16 and one that is not (the seed is a tensor the kernels load)."""
    out = subprocess.run([sys.executable, "-c", SPECIALIZATION_SCRIPT], env=real_jit_env(),
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[0] == "SAME" and int(out.stdout.split()[1]) == 5, out.stdout


# --------------------------------------------------------------------------------------------
# autocast: like nn.Linear
# --------------------------------------------------------------------------------------------
def _autocast_check(make, x_shape, backend, ref_fn):
    """make(backend) -> fp32 module; under CPU bf16 autocast its output is bf16 like nn.Linear's, equals the
    reference on bf16-cast inputs, and its fp32 trainable parameters get fp32 gradients."""
    torch.manual_seed(0)
    mod = make(backend)
    x = torch.randn(*x_shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin = nn.Linear(x_shape[-1], 4)(x)
        y = mod(x)
    assert lin.dtype == torch.bfloat16 and y.dtype == torch.bfloat16, y.dtype
    y.float().sum().backward()
    trained = [(n, p) for n, p in mod.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in trained), \
        [(n, None if p.grad is None else p.grad.dtype) for n, p in trained]
    r64 = ref_fn(mod, x)
    rlp = ref_fn(mod, x, torch.bfloat16)
    assert_close(y, r64.to(torch.float64), rlp, "y under autocast")


def _bf16_then(dtype):
    return lambda t: None if t is None else t.detach().to(torch.bfloat16).to(dtype)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_linear_under_autocast(backend, dora):
    def make(b):
        return pk.LoRALinear(24, 20, r=4, lora_alpha=8, init_lora_weights=False, backend=b, use_dora=dora)

    def ref(mod, x, dtype=torch.float64):
        c = _bf16_then(dtype)
        if dora:
            z = lora_linear_ref(c(x), c(mod.weight), None, c(mod.lora_A), c(mod.lora_B), mod.scaling)
            g = (mod.lora_magnitude_vector.detach().double() / mod.dora_weight_norm().double()).to(dtype)
            return z * g.to(torch.bfloat16).to(dtype) + c(mod.bias)
        return lora_linear_ref(c(x), c(mod.weight), c(mod.bias), c(mod.lora_A), c(mod.lora_B), mod.scaling)

    _autocast_check(make, (6, 24), backend, ref)


@pytest.mark.parametrize("backend", backend_params())
def test_stacked_model_under_autocast(backend):
    """nn.Linear (autocast: bf16 out) feeding a fp32 LoRALinear: before, a dtype TypeError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), pk.LoRALinear(24, 8, r=2, init_lora_weights=False, backend=backend))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(3, 16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert model[1].lora_A.grad.dtype == torch.float32


class _WithIds(nn.Module):
    """A MultiLoRALinear called with fixed ids (so the autocast check can treat it as a plain module)."""

    def __init__(self, m, ids):
        super().__init__()
        self.m, self.ids = m, ids

    def forward(self, x):
        return self.m(x, self.ids)


@pytest.mark.parametrize("backend", backend_params(supported=("torch", "triton")))
def test_multi_lora_under_autocast(backend):
    def make(b):
        m = pk.MultiLoRALinear(24, 20, max_adapters=3, max_rank=4, backend=b)
        m.set_adapter(0, torch.randn(4, 24), torch.randn(20, 4), 0.5)
        m.set_adapter(2, torch.randn(2, 24), torch.randn(20, 2), 2.0)
        return _WithIds(m, torch.tensor([0, 2, -1, 0, 2, 2]))

    def ref(mod, x, dtype=torch.float64):
        c, m = _bf16_then(dtype), mod.m
        return multi_lora_linear_ref(c(x), c(m.weight), c(m.bias), c(m.lora_A), c(m.lora_B), m.scalings.to(dtype),
                                     mod.ids, m.ranks)

    _autocast_check(make, (6, 24), backend, ref)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("feedforward", [False, True], ids=["out", "in"])
def test_ia3_under_autocast(backend, feedforward):
    def make(b):
        m = pk.IA3Linear(24, 20, feedforward=feedforward, backend=b)
        with torch.no_grad():
            m.ia3_l.uniform_(0.5, 1.5)
        return m

    def ref(mod, x, dtype=torch.float64):
        c = _bf16_then(dtype)
        lv = mod.ia3_l.detach().reshape(-1).to(dtype)
        if feedforward:
            return torch.nn.functional.linear((c(x) * lv).to(torch.bfloat16).to(dtype), c(mod.weight), c(mod.bias))
        return torch.nn.functional.linear(c(x), c(mod.weight), c(mod.bias)) * lv

    _autocast_check(make, (6, 24), backend, ref)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_adapter_linear_under_autocast(backend, mode):
    from peft_kernels.reference import adapter_linear_ref

    def make(b):
        m = pk.AdapterLinear(24, 20, bottleneck_size=6, activation="gelu", mode=mode, backend=b)
        with torch.no_grad():
            m.adapter_up.weight.normal_(0, 0.3)
        return m

    def ref(mod, x, dtype=torch.float64):
        c = _bf16_then(dtype)
        return adapter_linear_ref(c(x), c(mod.weight), c(mod.bias), c(mod.adapter_down.weight),
                                  c(mod.adapter_down.bias), c(mod.adapter_up.weight), c(mod.adapter_up.bias),
                                  "gelu", mod._scaling(), mode)

    _autocast_check(make, (6, 24), backend, ref)


@pytest.mark.parametrize("backend", backend_params())
def test_bottleneck_adapter_under_autocast_keeps_the_residual_dtype(backend):
    """The adapter's projections run in bf16; the residual stream h is added in its own fp32, as the unfused
    module does (a residual stream is not downcast)."""
    torch.manual_seed(0)
    ad = pk.BottleneckAdapter(24, bottleneck_size=6, activation="relu", backend=backend)
    with torch.no_grad():
        ad.adapter_up.weight.normal_(0, 0.3)
    h = torch.randn(5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ad(h)
        unfused = h + ad.adapter_up(torch.relu(ad.adapter_down(h))) * ad._scaling()
    assert out.dtype == unfused.dtype == torch.float32
    assert (out - unfused).abs().max().item() < 2e-2 * unfused.abs().max().item()
    out.sum().backward()
    assert ad.adapter_down.weight.grad.dtype == torch.float32
