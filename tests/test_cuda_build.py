"""csrc/cuda builds with CMake for sm_80 and sm_90a with no GPU, and every kernel compiles with 0 spills,
no local stack and shared memory within the block limit (parsed from nvcc's -Xptxas -v report).

Without a CUDA toolkit the build test is skipped with the reason, unless PEFT_KERNELS_REQUIRE_CUDA_TOOLKIT=1
(`make test` sets it: CI has nvcc, so a missing toolkit there is a failure, not a skip)."""
import os

import pytest

from peft_kernels import cuda_build as cb

KERNELS = {"bgmv_shrink_kernel", "bgmv_expand_kernel", "sgmv_shrink_kernel", "sgmv_expand_kernel",
           "lora_expand_kernel"}
DTYPES = {"float", "__half", "__nv_bfloat16"}


def _require_toolkit():
    why = cb.missing_tools()
    if why is None:
        return
    if os.environ.get("PEFT_KERNELS_REQUIRE_CUDA_TOOLKIT") == "1":
        pytest.fail(f"PEFT_KERNELS_REQUIRE_CUDA_TOOLKIT=1 but {why}")
    pytest.skip(why)


def test_cmake_cuda_build_has_no_spills(tmp_path):
    _require_toolkit()
    rows = cb.parse_ptxas_log(cb.cmake_build(str(tmp_path / "build"), "80;90a"))
    assert (tmp_path / "build" / "libpeft_kernels_cuda.so").exists()
    for arch in (80, 90):
        got = {(r.name, r.dtype) for r in rows if r.arch == arch}
        assert got == {(k, d) for k in KERNELS for d in DTYPES}, f"sm_{arch}: {sorted(got)}"
    assert cb.problems(rows) == [], "\n".join(r.row() for r in rows)


LOG = """ptxas info    : Compiling entry function '_ZN12peft_kernels4cuda12_GLOBAL__N_118sgmv_shrink_kernelI6__halfEEvPKT_' for 'sm_90a'
ptxas info    : Function properties for _ZN12peft_kernels4cuda12_GLOBAL__N_118sgmv_shrink_kernelI6__halfEEvPKT_
    24 bytes stack frame, 20 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 200000 bytes smem, 504 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN12peft_kernels4cuda12_GLOBAL__N_118sgmv_expand_kernelIfLb1EEEvPKf' for 'sm_80'
ptxas info    : Function properties for _ZN12peft_kernels4cuda12_GLOBAL__N_118sgmv_expand_kernelIfLb1EEEvPKf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 4096 bytes smem, 528 bytes cmem[0]
"""


def test_ptxas_parser_reports_spills_and_smem():
    """The checker can fail: a report with spills and too much shared memory gives problems."""
    rows = cb.parse_ptxas_log(LOG)
    assert [(r.name, r.dtype, r.arch, r.registers, r.spills, r.stack, r.smem) for r in rows] == [
        ("sgmv_shrink_kernel", "__half", 90, 255, 36, 24, 200000),
        ("lora_expand_kernel", "float", 80, 80, 0, 0, 4096)]
    probs = cb.problems(rows)
    assert len(probs) == 2 and "36 bytes of spills" in probs[0] and "shared memory" in probs[1]
    assert cb.problems(rows[1:]) == []
