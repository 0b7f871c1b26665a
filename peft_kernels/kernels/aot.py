"""Ahead-of-time compilation of the shipped Triton launch configs, with no GPU.

Every kernel launch that a launcher would make is recorded (not run), then compiled for a
``GPUTarget`` with exactly the signature, constexprs and ``tt.divisibility`` attrs that Triton's own
JIT binder derives from those arguments, so the register/spill/shared-memory numbers are the ones
the JIT would get on a real GPU. ptxas (shipped with triton) reports registers and spills.

Must run in a process where TRITON_INTERPRET is not set (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, create_function_from_signature

from ._common import INTERPRETED

# Per-block shared memory limit for one CTA (opt-in maximum): sm_80 163 KB, sm_90 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def record_launches(kernels):
    """Within the block, launching any of ``kernels`` records the call instead of running it."""
    if INTERPRETED:
        raise RuntimeError("AOT compilation needs real JIT kernels: unset TRITON_INTERPRET before importing triton")
    calls = []
    saved = {}
    for k in kernels:
        saved[k] = k.run

        def fake(*args, grid, warmup, _k=k, **kwargs):
            calls.append(Launch(_k, args, kwargs))

        k.run = fake
    try:
        yield calls
    finally:
        for k, run in saved.items():
            k.run = run


@dataclass
class Compiled:
    name: str
    arch: int
    num_warps: int
    num_stages: int
    constexprs: dict
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def row(self) -> str:
        return (f"sm_{self.arch} {self.name:18s} warps={self.num_warps} stages={self.num_stages} "
                f"regs={self.registers:3d} spills={self.spills} smem={self.shared_bytes / 1024:.1f}KiB "
                f"{self.constexprs}")


def _ptxas_stats(ptx: str, arch: int):
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"-arch={sm}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(m.group(1)), int(m.group(2)), log


def compile_launch(launch: Launch, arch: int) -> Compiled:
    k = launch.kernel
    backend = triton.compiler.make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(k.signature, k.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    kwargs.setdefault("instrumentation_mode", "")
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = k._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(k, signature, constexprs, attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    regs, st, ld, _ = _ptxas_stats(ck.asm["ptx"], arch)
    named = {k.arg_names[i[0]]: v for i, v in constexprs.items() if k.arg_names[i[0]].isupper()}
    return Compiled(k.__name__, arch, options.num_warps, options.num_stages, named, regs, st, ld,
                    ck.metadata.shared)
