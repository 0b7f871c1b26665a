"""A GPU launch model for the LoRA linear, before any GPU run: ``python -m peft_kernels.bench --model h200``.

It is a model, not a measurement. For every launch of one forward (+ backward) it takes the programs from
the grids our launchers actually compute (the Triton launchers are called with empty tensors while a
recorder stands in for each kernel, with the machine's SM count as the program budget), and the FLOPs
and bytes from the launch's sizes. Then, per launch:

    u       = min(1, programs / SMs)              the share of the machine the launch can occupy
    waves   = programs / SMs; padded = ⌈waves⌉ / waves (≥ 1): the last wave costs a whole one
    time    = max(FLOPs / (peak · u), bytes / (bandwidth · u)) · padded, at least MIN_KERNEL_US

One resident program per SM is assumed (the GEMM tiles take most of an SM's shared memory); bytes
count each operand read once and each output written once (perfect reuse inside a launch, none across
launches, as ``traffic.py`` states); FLOPs count a multiply-add as 2. Library calls (cuBLAS GEMMs and
elementwise kernels in HF PEFT's graph and in our torch path) are taken to fill the machine (u = 1, no
padding): the model favours them, never us.

Ceilings (16-bit dense tensor-core FLOP/s and copy bandwidth): the H200's were measured on such a
machine (about 790 TFLOP/s and 4.3 TB/s); the H100 SXM and A100 SXM are scaled from the H200's by their
datasheets (dense bf16 989 / 989 / 312 TFLOP/s; HBM 4.8 / 3.35 / 2.04 TB/s).

Calibration: our Triton GEMM tile does not reach cuBLAS's rate. On an H200 (gpu-check, 2026-12-01, two runs)
the fused GEMM alone ran at 0.57–0.73 of ``torch.mm``'s TFLOP/s at the Llama shapes (mean 0.66), so the
compute time of our GEMM launches (forward GEMM, dX) is divided by ``GPU.triton_gemm_eff`` = 0.66; the
H100 and A100 take the H200's factor (not measured there). Without it the model put Triton at 0.82–0.98×
PEFT at M=4096, where the H200 measured triton 1.35–1.54× our torch path.

Providers: ``triton`` (our fused kernels: what the launches do), ``torch`` (our torch backend: the
base GEMM accumulates into the LoRA expand, ``addmm``), ``auto`` (the measured dispatch: the faster of
the two), ``peft`` (HF PEFT's unfused LoRA layer on cuBLAS).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

MIN_KERNEL_US = 2.0  # a launch's floor on the GPU (start, drain): decode is launch-bound


@dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    tflops: float  # dense 16-bit tensor-core FLOP/s, in TFLOP/s
    tbs: float     # copy bandwidth, TB/s
    triton_gemm_eff: float = 1.0  # our Triton GEMM's rate as a fraction of cuBLAS's (measured: see the docstring)


_H200_TFLOPS, _H200_TBS = 790.0, 4.3
_TRITON_GEMM_EFF = 0.66  # measured on the H200: the fused GEMM alone at 0.57-0.73 of torch.mm's TFLOP/s
GPUS = {
    "h200": GPU("H200 (measured ceilings)", 132, _H200_TFLOPS, _H200_TBS, _TRITON_GEMM_EFF),
    "h100": GPU("H100 SXM (H200 ceilings × datasheet ratios)", 132, _H200_TFLOPS * 989 / 989, _H200_TBS * 3.35 / 4.8,
                _TRITON_GEMM_EFF),
    "a100": GPU("A100 SXM 80GB (H200 ceilings × datasheet ratios)", 108, _H200_TFLOPS * 312 / 989,
                _H200_TBS * 2.039 / 4.8, _TRITON_GEMM_EFF),
}
TRITON_GEMMS = ("fwd_gemm", "bwd_dx")  # the launches whose compute runs at GPU.triton_gemm_eff of cuBLAS's rate


@dataclass
class Launch:
    """One kernel launch: ``programs`` None for a library call (taken to fill the machine)."""
    provider: str
    kernel: str
    flops: float
    bytes: float
    programs: Optional[int] = None
    grid: tuple = ()
    modelled: Dict[str, float] = field(default_factory=dict)

    def model(self, gpu: GPU) -> "Launch":
        if self.programs is None:
            u, waves, pad = 1.0, None, 1.0
        else:
            waves = self.programs / gpu.sms
            u = min(1.0, waves)
            pad = math.ceil(waves) / waves if waves >= 1 else 1.0
        compute_us = self.flops / (gpu.tflops * 1e12 * max(u, 1e-12)) * 1e6
        if self.provider == "triton" and self.kernel in TRITON_GEMMS:
            compute_us /= gpu.triton_gemm_eff
        memory_us = self.bytes / (gpu.tbs * 1e12 * max(u, 1e-12)) * 1e6
        t = max(compute_us, memory_us) * pad
        self.modelled = {"waves": waves, "utilisation": u, "padded_wave_factor": pad, "compute_us": compute_us,
                         "memory_us": memory_us, "us": max(t, MIN_KERNEL_US),
                         "bound": "compute" if compute_us >= memory_us else "memory"}
        return self


# --------------------------------------------------------------------------------------------
# our Triton launches: recorded from the launchers, costed from their sizes
# --------------------------------------------------------------------------------------------
def _triton_cost(launch, e: int) -> tuple:
    """(FLOPs, bytes) of one recorded LoRA launch (e = bytes per element of x; fp32 buffers 4 bytes)."""
    name, a, kw = launch.kernel.__name__, launch.arg, launch.kwargs
    if name == "_shrink_kernel":
        M, K, R = a("M"), a("K"), a("R")
        splits = launch.grid[2] if len(launch.grid) > 2 else 1
        bits = M * -(-K // 8) if kw.get("HAS_DROPOUT") else 0  # the packed mask it writes
        return 2.0 * M * K * R, M * K * e + R * K * e + splits * M * R * 4 + bits
    if name == "_fwd_gemm_kernel":
        M, N, K, R = a("M"), a("N"), a("K"), a("R")
        parts = kw.get("num_parts", 1)
        store_s = M * R * 4 if kw.get("STORE_S") else 0
        return (2.0 * M * N * K + 2.0 * M * N * R,
                M * K * e + N * K * e + parts * M * R * 4 + N * R * e + N * e + M * N * e + store_s)
    if name == "_bwd_dy_kernel":
        M, N, R = a("M"), a("N"), a("R")
        P = launch.grid[0]
        db = kw.get("COMPUTE_DB", True)
        return ((2.0 + (2.0 if db else 0.0)) * M * N * R,
                M * N * e + N * R * e + 2 * M * R * 4 + (P * N * R * 4 if db else 0))
    if name == "_bwd_dx_kernel":
        M, N, K, R = a("M"), a("N"), a("K"), a("R")
        drop = kw.get("HAS_DROPOUT", False)
        return (2.0 * M * N * K + 2.0 * M * K * R,
                M * N * e + N * K * e + M * R * 4 + R * K * e + M * K * e + (M * -(-K // 8) if drop else 0))
    if name == "_bwd_da_kernel":
        M, N, K, R, P = a("M"), a("N"), a("K"), a("R"), a("P")
        da = kw.get("COMPUTE_DA", True)
        bits = M * -(-K // 8) if da and kw.get("HAS_DROPOUT") else 0
        return (2.0 * M * K * R if da else 0.0,
                (M * R * 4 + M * K * e + R * K * e if da else 0) + P * N * R * 4 + N * R * e + bits)
    raise ValueError(f"no cost model for kernel {name}")


def triton_lora_launches(M: int, K: int, N: int, R: int, dtype, gpu: GPU, backward: bool = True,
                         bias: bool = True) -> List[Launch]:
    """Every launch our Triton LoRA launchers make for one forward (+ backward) at these sizes, with the
    machine's SM count as the program budget. Needs the real JIT (not TRITON_INTERPRET)."""
    import torch

    from ..kernels import aot
    from ..kernels import lora as L

    saved = L.program_budget
    L.program_budget = lambda device: gpu.sms
    try:
        kernels = [L._shrink_kernel, L._fwd_gemm_kernel, L._bwd_dy_kernel, L._bwd_dx_kernel, L._bwd_da_kernel]
        with aot.record_launches(kernels) as calls:
            x = torch.empty(M, K, dtype=dtype)
            W = torch.empty(N, K, dtype=dtype)
            A, B = torch.empty(R, K, dtype=dtype), torch.empty(N, R, dtype=dtype)
            b = torch.empty(N, dtype=dtype) if bias else None
            _, S = L.lora_forward(x, W, b, A, B, 2.0, 0.0, None)
            if backward:
                L.lora_backward(torch.empty(M, N, dtype=dtype), x, W, A, B, S, 2.0, 0.0, None, True, True, True)
    finally:
        L.program_budget = saved
    e = torch.empty(0, dtype=dtype).element_size()
    out = []
    for c in calls:
        fl, by = _triton_cost(c, e)
        programs = math.prod(c.grid) if c.grid else None
        out.append(Launch("triton", c.kernel.__name__.strip("_").replace("_kernel", ""), fl, by, programs, c.grid))
    return out


# --------------------------------------------------------------------------------------------
# library graphs: HF PEFT's unfused layer and our torch backend (one library call per op)
# --------------------------------------------------------------------------------------------
def _mm(provider, name, m, n, k, e, c_bytes=0):
    """A GEMM [m, k]·[k, n]: reads both operands (and C when accumulating), writes [m, n]."""
    return Launch(provider, name, 2.0 * m * n * k, (m * k + k * n + m * n) * e + c_bytes)


def _ew(provider, name, elems, e, reads=1):
    return Launch(provider, name, 0.0, elems * e * (reads + 1))


def peft_lora_launches(M, K, N, R, e, backward=True, bias=True) -> List[Launch]:
    """HF PEFT's LoRA Linear at dropout 0 (nn.Identity): base addmm, lora_A, lora_B, ·scaling, +; autograd's
    backward of that graph (the base weight frozen)."""
    p = "peft"
    out = [_mm(p, "base addmm", M, N, K, e, N * e if bias else 0), _mm(p, "lora_A mm", M, R, K, e),
           _mm(p, "lora_B mm", M, N, R, e), _ew(p, "mul scaling", M * N, e), _ew(p, "add", M * N, e, reads=2)]
    if backward:
        out += [_ew(p, "mul scaling (bwd)", M * N, e), _mm(p, "dB = dYsᵀ·h", N, R, M, e), _mm(p, "dh = dYs·B", M, R, N, e),
                _mm(p, "dA = dhᵀ·x", R, K, M, e), _mm(p, "dx_lora = dh·A", M, K, R, e),
                _mm(p, "dx_base = dY·W", M, K, N, e), _ew(p, "dx add", M * K, e, reads=2)]
    return out


def torch_lora_launches(M, K, N, R, e, backward=True, bias=True) -> List[Launch]:
    """Our torch backend (ops/lora.py, dropout 0): S = x·Aᵀ; y = addmm(bias, S, Bᵀ, α=s); y += x·Wᵀ (addmm_);
    backward dS = dY·B (·s in place), dB = dYᵀ·S (·s), dA = dSᵀ·x, dX = dS·A then += dY·W (addmm_)."""
    p = "torch"
    out = [_mm(p, "S = x·Aᵀ", M, R, K, e), _mm(p, "y = addmm(b, S, Bᵀ)", M, N, R, e, N * e if bias else 0),
           _mm(p, "y += x·Wᵀ (addmm_)", M, N, K, e, M * N * e)]
    if backward:
        out += [_mm(p, "dS = dY·B", M, R, N, e), _ew(p, "dS ·= s", M * R, e), _mm(p, "dB = dYᵀ·S", N, R, M, e),
                _ew(p, "dB ·= s", N * R, e), _mm(p, "dA = dSᵀ·x", R, K, M, e), _mm(p, "dX = dS·A", M, K, R, e),
                _mm(p, "dX += dY·W (addmm_)", M, K, N, e, M * K * e)]
    return out


# --------------------------------------------------------------------------------------------
# cases and report
# --------------------------------------------------------------------------------------------
LLAMA3_8B = {"q_proj": (4096, 4096), "mlp_up": (4096, 14336), "mlp_down": (14336, 4096)}  # (K, N)
TOKENS = (1, 16, 64, 4096)


def model_lora(gpu: GPU, shapes=None, tokens=TOKENS, r: int = 16, dtype=None, modes=("fwd", "fwd+bwd")) -> List[dict]:
    """One row per (shape, M, mode, provider): total modelled µs, its launches (each with programs, waves,
    utilisation, padded-wave factor, bound) and the ratio to PEFT's."""
    import torch

    dtype = dtype or torch.bfloat16
    e = torch.empty(0, dtype=dtype).element_size()
    rows = []
    for sname, (K, N) in (shapes or LLAMA3_8B).items():
        for M in tokens:
            for mode in modes:
                bwd = mode == "fwd+bwd"
                per = {"triton": triton_lora_launches(M, K, N, r, dtype, gpu, bwd),
                       "torch": torch_lora_launches(M, K, N, r, e, bwd),
                       "peft": peft_lora_launches(M, K, N, r, e, bwd)}
                totals = {}
                for prov, launches in per.items():
                    for la in launches:
                        la.model(gpu)
                    totals[prov] = sum(la.modelled["us"] for la in launches)
                # "auto" measures both of our backends and keeps the faster (dispatch.Tuner)
                best = min(("triton", "torch"), key=lambda k: totals[k])
                per["auto"] = per[best]
                totals["auto"] = totals[best]
                for prov, launches in per.items():
                    under = [la.kernel for la in launches if la.programs is not None and la.programs < gpu.sms
                             and prov == "triton"]
                    rows.append({"auto_picks": best if prov == "auto" else None, "model": "launch model (not a measurement)", "gpu": gpu.name, "sms": gpu.sms, "op": "lora",
                                 "shape": sname, "M": M, "K": K, "N": N, "r": r, "mode": mode, "provider": prov,
                                 "modelled_us": totals[prov], "vs_peft": totals[prov] / totals["peft"],
                                 "launches": len(launches), "under_one_wave": under,
                                 "per_launch": [{"kernel": la.kernel, "programs": la.programs, "grid": list(la.grid),
                                                 "flops": la.flops, "bytes": la.bytes, **la.modelled}
                                                for la in launches]})
    return rows


def write_model(out_dir: str, rows: List[dict]) -> List[str]:
    """model.json (every row with its launches) and model.csv (one line per provider row), written atomically."""
    import csv
    import io
    import json
    import os
    import tempfile

    os.makedirs(out_dir, exist_ok=True)
    buf = io.StringIO()
    cols = ["model", "gpu", "op", "shape", "M", "K", "N", "r", "mode", "provider", "modelled_us", "vs_peft", "launches",
            "under_one_wave"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "under_one_wave": " ".join(r["under_one_wave"])})
    paths = []
    for name, text in (("model.json", json.dumps(rows, indent=1)), ("model.csv", buf.getvalue())):
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))
        paths.append(os.path.join(out_dir, name))
    return paths


def format_model(rows: List[dict]) -> str:
    lines = ["LAUNCH MODEL (a model, not a measurement; see peft_kernels/bench/launch_model.py): "
             + (rows[0]["gpu"] if rows else ""),
             f"{'shape':9s} {'M':>5s} {'mode':8s} {'provider':8s} {'model µs':>10s} {'× PEFT':>7s} {'launches':>8s}  "
             "Triton launches: kernel programs/waves (bound)"]
    for r in rows:
        detail = ""
        if r["provider"] == "triton":
            detail = "  " + ", ".join(
                f"{p['kernel']} {p['programs']}/{p['waves']:.2f}{'*' if p['programs'] < r['sms'] else ''} ({p['bound'][0]})"
                for p in r["per_launch"])
        if r["provider"] == "auto":
            detail = f"  (= {r['auto_picks']})"
        lines.append(f"{r['shape']:9s} {r['M']:5d} {r['mode']:8s} {r['provider']:8s} {r['modelled_us']:10.1f} "
                     f"{r['vs_peft']:7.3f} {r['launches']:8d}{detail}")
    under = sorted({(r["shape"], r["M"], k) for r in rows for k in r["under_one_wave"]})
    lines.append("")
    worst = max((r for r in rows if r["provider"] == "auto"), key=lambda r: r["vs_peft"], default=None)
    if worst is not None:
        lines.append(f"auto against PEFT: worst case {worst['vs_peft']:.3f}× ({worst['shape']} M={worst['M']} "
                     f"{worst['mode']})")
    lines.append(f"Triton launches under one wave: {len(under)}" +
                 ("" if not under else " — " + "; ".join(f"{s} M={m}: {k}" for s, m, k in under)))
    return "\n".join(lines)
