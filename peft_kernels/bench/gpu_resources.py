"""``python -m peft_kernels.bench --gpu-resources``: per-kernel registers, spills, shared memory and
theoretical occupancy on sm_80 (A100) and sm_90 (H100), with no GPU.

- Triton: every shipped launch config is AOT-compiled (``peft_kernels.kernels.aot``) with the JIT's own
  signature and divisibility hints; ptxas reports registers and spills, Triton's metadata the
  (dynamic) shared memory; the block is ``num_warps`` warps.
- CUDA C++: the CMake build's ``nvcc -Xptxas -v`` log (``build/ptxas.log``; built on demand with
  the toolkit) gives registers, spills and static shared memory; the block size is each kernel's
  ``__launch_bounds__``, read from the PTX (``.maxntid``) that nvcc emits for the same source.

Theoretical occupancy is the CUDA occupancy calculator's formula: resident warps per SM as limited by
the register file (registers allocated per warp in units of 256), shared memory (per block, rounded
up to 128 bytes, plus the 1 KiB the runtime reserves per block), the warp slots and the block slots,
over the SM's warp slots. The per-SM limits are the architectures' published figures (CUDA C
Programming Guide, "Features and Technical Specifications"), not tuning tables.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional


@dataclass(frozen=True)
class SMLimits:
    regs: int = 65536            # 32-bit registers per SM
    reg_unit: int = 256          # registers are allocated per warp in units of this
    max_warps: int = 64
    max_blocks: int = 32
    smem: int = 167936           # shared memory per SM usable by blocks (max carveout), bytes
    smem_unit: int = 128
    smem_reserved: int = 1024    # per block, reserved by the CUDA runtime


SM = {80: SMLimits(smem=167936), 90: SMLimits(smem=233472)}  # A100: 164 KiB, H100: 228 KiB


def occupancy(arch: int, registers: int, threads: int, smem_bytes: int) -> dict:
    """Theoretical occupancy of a kernel: resident blocks and warps per SM, the fraction of the SM's warp
    slots, and which resource limits it."""
    if arch not in SM:
        raise ValueError(f"arch must be one of {sorted(SM)}, got {arch}")
    if threads < 1 or registers < 0 or smem_bytes < 0:
        raise ValueError(f"threads must be ≥ 1 and registers/shared memory ≥ 0, got {threads}, {registers}, {smem_bytes}")
    L = SM[arch]
    warps = -(-threads // 32)
    lim = {"warps": L.max_warps // warps, "blocks": L.max_blocks}
    if registers:
        per_warp = -(-registers * 32 // L.reg_unit) * L.reg_unit
        lim["registers"] = (L.regs // per_warp) // warps
    per_block = -(-(smem_bytes + L.smem_reserved) // L.smem_unit) * L.smem_unit
    lim["shared memory"] = L.smem // per_block
    blocks = min(lim.values())
    limiter = min(lim, key=lambda k: (lim[k], k != "registers"))
    return dict(blocks=blocks, warps=blocks * warps, occupancy=blocks * warps / L.max_warps, limiter=limiter)


@dataclass
class Row:
    kind: str        # "triton" / "cuda"
    arch: int
    kernel: str
    dtype: str
    config: str
    threads: int
    registers: int
    spills: int
    smem: int
    occ: dict

    def as_dict(self) -> dict:
        return dict(kind=self.kind, arch=self.arch, kernel=self.kernel, dtype=self.dtype, config=self.config,
                    threads=self.threads, registers=self.registers, spill_bytes=self.spills, smem_bytes=self.smem,
                    blocks_per_sm=self.occ["blocks"], warps_per_sm=self.occ["warps"],
                    occupancy=self.occ["occupancy"], limiter=self.occ["limiter"])


def triton_rows(archs=(80, 90), ops=None, quick: bool = False, jobs: Optional[int] = None) -> List[Row]:
    """AOT-compile the shipped Triton configs. ``quick``: only the first config of each kernel per arch."""
    if os.environ.get("TRITON_INTERPRET"):
        raise RuntimeError("AOT compilation needs real JIT kernels: run without TRITON_INTERPRET "
                           "(--gpu-resources re-runs itself without it when set)")
    from ..kernels import aot

    ops = tuple(ops or sorted(aot.RECORDERS))
    compiled, _ = aot.check_all(archs, verbose=False, ops=ops, jobs=jobs, first_per_kernel=quick)
    rows = []
    for c in compiled:
        threads = c.num_warps * 32
        cfg = " ".join(f"{k}={v}" for k, v in c.constexprs.items() if k.startswith("BLOCK")) + \
            f" w={c.num_warps} s={c.num_stages}"
        rows.append(Row("triton", c.arch, c.name, c.dtype, cfg, threads, c.registers, c.spills, c.shared_bytes,
                        occupancy(c.arch, c.registers, threads, c.shared_bytes)))
    return rows


_PTX_ENTRY = re.compile(r"\.entry\s+(\S+)\s*\(")
_MAXNTID = re.compile(r"\.maxntid\s+(\d+)(?:,\s*(\d+))?(?:,\s*(\d+))?")


def launch_bounds(arch: int) -> Dict[str, int]:
    """Mangled kernel name -> max threads per block, from the PTX of csrc/cuda/*.cu (``.maxntid``)."""
    from .. import cuda_build

    root = cuda_build.toolkit_root()
    if root is None:
        raise RuntimeError(cuda_build.missing_tools())
    out: Dict[str, int] = {}
    src_dir = os.path.join(cuda_build.ROOT, "csrc", "cuda")
    with tempfile.TemporaryDirectory() as d:
        for f in sorted(os.listdir(src_dir)):
            if not f.endswith(".cu"):
                continue
            ptx = os.path.join(d, f + ".ptx")
            cmd = [os.path.join(root, "bin", "nvcc"), "-ptx", f"-arch=sm_{arch}", "-std=c++17", "-O3",
                   "-I", os.path.join(cuda_build.ROOT, "csrc", "include"), os.path.join(src_dir, f), "-o", ptx]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
            text = open(ptx).read()
            for m in _PTX_ENTRY.finditer(text):
                body = text[m.end():text.find("{", m.end())]
                t = _MAXNTID.search(body)
                if t:
                    out[m.group(1)] = int(t.group(1)) * int(t.group(2) or 1) * int(t.group(3) or 1)
    return out


def cuda_rows(ptxas_log: Optional[str] = None, build_dir: Optional[str] = None, archs=(80, 90)) -> List[Row]:
    """Rows for the CUDA C++ kernels from a CMake ptxas log (built into ``build_dir`` when not given)."""
    from .. import cuda_build

    if ptxas_log is None:
        # a fresh build directory: ptxas reports only what it compiles, and an up-to-date build compiles nothing
        import shutil

        tmp = build_dir or tempfile.mkdtemp(prefix="peft_kernels-gpu-resources-")
        try:
            text = cuda_build.cmake_build(tmp, ";".join(f"{a}a" if a >= 90 else str(a) for a in archs))
        finally:
            if build_dir is None:
                shutil.rmtree(tmp, ignore_errors=True)
    else:
        with open(ptxas_log) as f:
            text = f.read()
    rows = []
    bounds = {a: launch_bounds(a) for a in archs}
    for k in cuda_build.parse_ptxas_log(text):
        if k.arch not in archs:
            continue
        threads = bounds[k.arch].get(k.mangled)
        if threads is None:
            raise RuntimeError(f"{k.name}<{k.dtype}> has no __launch_bounds__ in the PTX for sm_{k.arch}; "
                               "every CUDA kernel must declare one (its block size)")
        rows.append(Row("cuda", k.arch, k.name, k.dtype, "", threads, k.registers, k.spills + k.stack, k.smem,
                        occupancy(k.arch, k.registers, threads, k.smem)))
    return rows


def format_rows(rows: List[Row]) -> str:
    hdr = (f"{'arch':6s} {'kind':6s} {'kernel':22s} {'dtype':14s} {'threads':>7s} {'regs':>5s} {'spills':>6s} "
           f"{'smem KiB':>8s} {'blocks/SM':>9s} {'occupancy':>9s}  {'limited by':14s} config")
    lines = [hdr, "-" * len(hdr)]
    for r in sorted(rows, key=lambda r: (r.arch, r.kind, r.kernel, r.dtype, r.config)):
        lines.append(f"sm_{r.arch:<3d} {r.kind:6s} {r.kernel:22s} {r.dtype:14s} {r.threads:7d} {r.registers:5d} "
                     f"{r.spills:6d} {r.smem / 1024:8.1f} {r.occ['blocks']:9d} {r.occ['occupancy']:9.1%}  "
                     f"{r.occ['limiter']:14s} {r.config}")
    return "\n".join(lines)


def summary(rows: List[Row]) -> List[str]:
    out = []
    for kind in ("triton", "cuda"):
        for arch in sorted({r.arch for r in rows}):
            sub = [r for r in rows if r.kind == kind and r.arch == arch]
            if not sub:
                continue
            occ = sorted(r.occ["occupancy"] for r in sub)
            out.append(f"{kind} sm_{arch}: {len(sub)} variants, {len({r.kernel for r in sub})} kernels; registers "
                       f"{min(r.registers for r in sub)}–{max(r.registers for r in sub)}, spills "
                       f"{sum(r.spills for r in sub)} B, shared ≤ {max(r.smem for r in sub) / 1024:.1f} KiB, occupancy "
                       f"{occ[0]:.1%}–{occ[-1]:.1%} (median {occ[len(occ) // 2]:.1%})")
    return out


def reexec_without_interpreter(argv: List[str]) -> int:
    """Run ``python -m peft_kernels.bench argv`` in a child without TRITON_INTERPRET (AOT needs the real JIT)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.call([sys.executable, "-m", "peft_kernels.bench", *argv], env=env)
