"""The CUDA toolkit and the CMake build of ``csrc/cuda``, without a GPU.

``cmake_build(dir)`` configures and builds ``libpeft_kernels_cuda.so`` for the given archs; nvcc's
``-Xptxas -v`` report lands in ``dir/ptxas.log`` and :func:`parse_ptxas_log` turns it into one
:class:`KernelResources` per (kernel, arch). :func:`problems` lists spills and shared memory over the
per-block limit. Used by ``tests/test_cuda_build.py`` and the benchmark's resource report.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Per-block shared memory a kernel may use (the opt-in maximum): sm_80 163 KB, sm_90 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# The dynamic shared memory a launcher may add at most (bgmv_expand: its S row, ≤ 48 KB).
DYNAMIC_SMEM_MAX = 48 * 1024


def toolkit_root() -> Optional[str]:
    """The CUDA toolkit root (the folder with ``bin/ptxas`` and ``include/cuda_runtime.h``), or None.

    ``CUDA_HOME``/``CUDA_PATH`` first, then ``/usr/local/cuda``, then the toolkit of the ``nvcc`` on PATH
    (following a wrapper script's symlink is not enough there, so its folder is checked for ptxas).
    """
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "bin", "ptxas")) and os.path.isfile(
                os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def missing_tools() -> Optional[str]:
    """Why the CMake CUDA build cannot run here, or None."""
    if toolkit_root() is None:
        return "no CUDA toolkit (set CUDA_HOME to the folder with bin/ptxas and include/cuda_runtime.h)"
    if shutil.which("cmake") is None:
        return "cmake not on PATH"
    return None


def cmake_build(build_dir: str, archs: str = "80;90a", timeout: int = 900) -> str:
    """Configure and build the CUDA kernels in ``build_dir``; returns the ptxas log's text."""
    cuda = toolkit_root()
    if cuda is None:
        raise RuntimeError(missing_tools())
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = ["cmake", "-S", ROOT, "-B", build_dir, *gen, f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
           f"-DCMAKE_CUDA_COMPILER={os.path.join(cuda, 'bin', 'nvcc')}"]
    for cmd in (cfg, ["cmake", "--build", build_dir, "-j", str(os.cpu_count() or 1)]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    with open(os.path.join(build_dir, "ptxas.log")) as f:
        return f.read()


@dataclass
class KernelResources:
    name: str          # the kernel's short name, e.g. "sgmv_expand_kernel"
    dtype: str         # float / __half / __nv_bfloat16 (the template argument)
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int          # static shared memory in bytes
    mangled: str

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def row(self) -> str:
        return (f"sm_{self.arch} {self.name:20s} {self.dtype:14s} regs={self.registers:3d} spills={self.spills} "
                f"stack={self.stack} smem={self.smem / 1024:.1f}KiB")


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)a?'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_DTYPES = {"f": "float", "6__half": "__half", "13__nv_bfloat16": "__nv_bfloat16"}


def _short(mangled: str):
    """(kernel name, dtype) from an Itanium-mangled template kernel name ("...18sgmv_expand_kernelI6__half...")."""
    m = re.search(r"\d([a-z][a-z_]*_kernel)I(f|6__half|13__nv_bfloat16)(Lb1E)?", mangled)
    if not m:
        return mangled, ""
    # sgmv_expand_kernel<T, kLora=true> is the single-adapter LoRA expand epilogue
    return ("lora_expand_kernel" if m.group(3) else m.group(1)), _DTYPES[m.group(2)]


def parse_ptxas_log(text: str) -> List[KernelResources]:
    """One entry per 'Compiling entry function' block of an ``nvcc -Xptxas -v`` report."""
    out = []
    entry = None
    props = (0, 0, 0)
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            entry, props = (m.group(1), int(m.group(2))), (0, 0, 0)
            continue
        if entry is None:
            continue
        m = _PROPS.search(line)
        if m:
            props = tuple(int(g) for g in m.groups())
            continue
        m = _USED.search(line)
        if m:
            name, dtype = _short(entry[0])
            out.append(KernelResources(name, dtype, entry[1], int(m.group(1)), props[1], props[2], props[0],
                                       int(m.group(2) or 0), entry[0]))
            entry = None
    return out


def problems(rows: List[KernelResources]) -> List[str]:
    """Spills, local stack, or static + dynamic shared memory over the block limit."""
    out = []
    for r in rows:
        if r.spills or r.stack:
            out.append(f"{r.name}<{r.dtype}> on sm_{r.arch}: {r.spills} bytes of spills, {r.stack} bytes of stack")
        limit = SMEM_LIMIT.get(r.arch, 48 * 1024)
        if r.smem + DYNAMIC_SMEM_MAX > limit:
            out.append(f"{r.name}<{r.dtype}> on sm_{r.arch}: {r.smem} B static + {DYNAMIC_SMEM_MAX} B dynamic "
                       f"shared memory > {limit} B")
    return out
