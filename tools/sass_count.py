"""SASS instruction counts and registers of the LoRA Triton kernels for sm_90, with and without dropout.

    env -u TRITON_INTERPRET .venv/bin/python tools/sass_count.py [--M 4096 --K 4096 --N 4096 --r 16]

Records the launches the real launchers make (bf16, empty CPU tensors, as ``kernels.aot`` does), compiles
each for sm_90 and counts the instructions ``cuobjdump -sass`` (the one Triton ships) prints. A static count
(loops counted once): it shows what a change adds to a kernel's body, e.g. the dropout mask's Philox.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from peft_kernels.kernels import aot
from peft_kernels.kernels import lora as L


def main() -> None:
    ap = argparse.ArgumentParser()
    for k, v in (("M", 4096), ("K", 4096), ("N", 4096), ("r", 16)):
        ap.add_argument(f"--{k}", type=int, default=v)
    a = ap.parse_args()
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    kernels = [L._shrink_kernel, L._fwd_gemm_kernel, L._bwd_dy_kernel, L._bwd_dx_kernel, L._bwd_da_kernel]
    dt = torch.bfloat16
    for p in (0.0, 0.1):
        with aot.record_launches(kernels) as calls:
            x, W = torch.empty(a.M, a.K, dtype=dt), torch.empty(a.N, a.K, dtype=dt)
            A, B = torch.empty(a.r, a.K, dtype=dt), torch.empty(a.N, a.r, dtype=dt)
            L.lora_forward(x, W, None, A, B, 0.5, p, torch.zeros(1, dtype=torch.int64))
            L.lora_backward(torch.empty(a.M, a.N, dtype=dt), x, W, A, B, torch.empty(a.M, a.r), 0.5, p,
                            L.dropout_mask_buffer(a.M, a.K, "cpu"), True, True, True)
        for c in calls:
            k = c.kernel
            backend, kwargs, bound, spec, options = aot._bind(c, 90)
            options, signature, constexprs, attrs = k._pack_args(backend, kwargs, bound, spec, options)
            ck = triton.compile(ASTSource(k, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                                options=options.__dict__)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(ck.asm["cubin"])
                f.flush()
                sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
            n = len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.M))
            regs, spills, _, _ = aot._ptxas_stats(ck.asm["ptx"], 90)
            print(f"p={p} {k.__name__:18s} sass={n:5d} regs={regs} spills={spills}", flush=True)


if __name__ == "__main__":
    main()
