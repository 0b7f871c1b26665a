"""Every shipped Triton config compiles for sm_80 and sm_90 with 0 spills and shared memory
within the limit, using the JIT's own signature/divisibility hints (no GPU needed)."""
import re
import subprocess
import sys

import background
import pytest
from helpers import real_jit_env

pytest.importorskip("triton")


def test_shipped_configs_compile_without_spills():
    out, _ = background.run("aot", timeout=1800)  # started at collection (tests/background.py)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    rows = [line for line in log.splitlines() if line.startswith("sm_")]
    kernels = {"_shrink_kernel", "_fwd_gemm_kernel", "_bwd_dy_kernel", "_bwd_dx_kernel", "_bwd_da_kernel",
               "_sgmv_shrink_kernel", "_sgmv_expand_kernel", "_bgmv_shrink_kernel", "_bgmv_expand_kernel",
               "_seg_outer_kernel", "_adapter_shrink_kernel", "_expand_kernel", "_seq_fwd_kernel",
               "_adapter_bwd_kernel", "_ia3_gemm_kernel", "_grouped_gemm_kernel"}
    tma = {"_fwd_gemm_tma_kernel", "_bwd_dx_tma_kernel"}  # sm_90's persistent TMA GEMMs (16-bit, M > 64)
    for arch in ("sm_80", "sm_90"):
        for dt in ("fp16", "bf16", "fp32"):
            seen = {r.split()[1] for r in rows if r.startswith(arch) and r.split()[2] == dt}
            want = kernels | (tma if arch == "sm_90" and dt != "fp32" else set())
            assert seen == want, f"{arch} {dt}: compiled {seen}"
        # fp32 adapters on a 16-bit base: their own configs, every LoRA and multi-adapter kernel, both precisions
        for dt in ("fp16/fp32", "bf16/fp32"):
            mixed = [r for r in rows if r.startswith(arch) and r.split()[2] == dt]
            assert {r.split()[1] for r in mixed} >= {"_shrink_kernel", "_fwd_gemm_kernel", "_bwd_dy_kernel",
                                                     "_bwd_dx_kernel", "_bwd_da_kernel", "_sgmv_shrink_kernel",
                                                     "_sgmv_expand_kernel", "_bgmv_shrink_kernel",
                                                     "_bgmv_expand_kernel", "_grouped_gemm_kernel"}, (arch, dt)
            assert any("'tf32x3'" in r for r in mixed) and any("'tf32'" in r for r in mixed), (arch, dt)
    for r in rows:
        assert int(re.search(r"spills=(\d+)", r).group(1)) == 0, r
        assert int(re.search(r"i32addr=(\d+)", r).group(1)) == 0, r  # 64-bit address arithmetic everywhere
    assert "tf32" in log and "ieee" in log
    assert re.search(r"total spills 0 bytes, 32-bit address offsets 0", log)


SPILLY = r"""
import torch, triton
from peft_kernels.kernels import aot, lora as L
# a deliberately oversized fp32 tile: the checker must report its spills
orig = L.configs
def big(dt, R, aligned=True, interpreted=False, **kw):
    c = orig(dt, R, aligned, interpreted, **kw)
    c["gemm"] = L.Config(128, 128, 32, num_warps=4, num_stages=2)  # fp32: 128 accumulators a thread, and the operands
    return c
L.configs = big
x = torch.empty(256, 512); W = torch.empty(512, 512); A = torch.empty(16, 512); B = torch.empty(512, 16)
with aot.record_launches([L._shrink_kernel, L._fwd_gemm_kernel]) as calls:
    L.lora_forward(x, W, None, A, B, 1.0, 0.0, None)
r = aot.compile_launch(calls[1], 90)
print("SPILLS", r.spills, "SMEM", r.shared_bytes)
"""


def test_checker_detects_spills():
    """The spill parser is not a check that cannot fail: an oversized tile must show spills."""
    out = subprocess.run([sys.executable, "-c", SPILLY], env=real_jit_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    m = re.search(r"SPILLS (\d+) SMEM (\d+)", out.stdout)
    assert m and int(m.group(1)) > 0, out.stdout


OFFSETS = r"""
import torch, triton, triton.language as tl
from peft_kernels.kernels import aot

@triton.jit
def i32_rows(x_ptr, y_ptr, M, stride, BLOCK: tl.constexpr):  # the defect: row * stride in int32
    rm = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + rm * stride, mask=rm < M)
    tl.store(y_ptr + rm, v, mask=rm < M)

@triton.jit
def i64_rows(x_ptr, y_ptr, M, stride, BLOCK: tl.constexpr):  # the fix: widen the row index first
    rm = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + rm.to(tl.int64) * stride, mask=rm < M)
    tl.store(y_ptr + rm, v, mask=rm < M)

@triton.jit
def i32_partials(p_ptr, y_ptr, N, R, BLOCK: tl.constexpr):  # (block·N + n)·R in int32, through a loop
    rn = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, 4):
        acc += tl.load(p_ptr + (i * N + rn) * R)
    tl.store(y_ptr + rn, acc)

@triton.jit
def i64_steps(p_ptr, y_ptr, N, R, step, BLOCK: tl.constexpr):  # pointer steps: 64-bit
    rn = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = p_ptr + rn.to(tl.int64) * R
    for i in range(0, 4):
        acc += tl.load(ptrs)
        ptrs += step
    tl.store(y_ptr + rn, acc)

x, y = torch.empty(4096), torch.empty(4096)
for k, args in ((i32_rows, (x, y, 4096, 7)), (i64_rows, (x, y, 4096, 7)), (i32_partials, (x, y, 100, 3)),
                (i64_steps, (x, y, 100, 3, 300))):
    with aot.record_launches([k]) as calls:
        k[(1,)](*args, BLOCK=64)
    r = aot.compile_launch(calls[0], 90)
    print(k.__name__, len(r.offset_problems))
"""


def test_checker_detects_32bit_address_arithmetic(tmp_path):
    """offset_problems is not a check that cannot fail: it flags ``row * stride`` and ``(i·N + n)·R`` formed
    in int32 (also through a loop) and passes the int64 and pointer-step forms the kernels use."""
    script = tmp_path / "offsets.py"  # a file: triton.jit reads the kernels' source
    script.write_text(OFFSETS)
    out = subprocess.run([sys.executable, str(script)], env=real_jit_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = dict(line.split() for line in out.stdout.strip().splitlines())
    assert int(got["i32_rows"]) >= 1 and int(got["i32_partials"]) >= 1, got
    assert got["i64_rows"] == "0" and got["i64_steps"] == "0", got
