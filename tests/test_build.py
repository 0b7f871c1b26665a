"""The standalone CMake build of csrc/ works and its library registers the same ops."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                    reason="cmake or a C++ compiler is not installed")
def test_cmake_builds_cpu_ops(tmp_path):
    import torch.utils

    build = tmp_path / "build"
    cfg = subprocess.run(["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                         capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    bld = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert bld.returncode == 0, bld.stdout[-3000:] + bld.stderr[-3000:]
    lib = build / "libpeft_kernels_ops.so"
    assert lib.exists()
    # load it in a fresh process (not beside peft_kernels._C, which registers the same library)
    code = f"""
import torch
torch.ops.load_library({str(lib)!r})
from peft_kernels.ops import _torch_dropout as D
ks = D.keys(7, 0.25)
assert torch.equal(torch.ops.peft_kernels.dropout_keep_mask(9, 13, *ks, 5), D.keep_mask(7, (9, 13), 0.25, 'cpu', offset=5))
print('OK')
"""
    # PEFT_KERNELS_DISABLE_EXT=1: importing peft_kernels must not load its own copy of the same ops
    env = dict(os.environ, PEFT_KERNELS_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
