"""A GPU launch model for the LoRA linear, before any GPU run: ``python -m peft_kernels.bench --model h200``
(also the multi-adapter op against a per-adapter loop, and the programs and waves of DoRA, the bottleneck
adapter and (IA)³: see ``model_multi_lora`` and ``other_op_waves``).

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

Multi-adapter (``model_multi_lora``): 32 adapters on a 4096→4096 layer, all-distinct (32 × 128 tokens), skewed
(3972 + 31 × 4) and decode (32 × 1) batches. ``triton`` is the base GEMM on cuBLAS plus every launch of our
gather kernels (the path ``choose_path`` picks), ``loop`` HF PEFT's mixed-batch forward (per adapter: gather
the rows, lora_A, lora_B, scale, add back) and autograd's backward of it. On the H200 gpu-check measured
triton at 0.145-0.18× the loop (distinct and skewed) and 0.055-0.10× (decode); the model says 0.35-0.41× and
0.036×: it prices each library call at its bandwidth or a 2 µs floor, not at the host's launch cost, so at
prefill it favours the loop.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
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
    tma: bool = False  # sm_90: the launchers take the persistent TMA GEMMs past the decode bucket


_H200_TFLOPS, _H200_TBS = 790.0, 4.3
_TRITON_GEMM_EFF = 0.66  # measured on the H200: the fused GEMM alone at 0.57-0.73 of torch.mm's TFLOP/s
GPUS = {
    "h200": GPU("H200 (measured ceilings)", 132, _H200_TFLOPS, _H200_TBS, _TRITON_GEMM_EFF, tma=True),
    "h100": GPU("H100 SXM (H200 ceilings × datasheet ratios)", 132, _H200_TFLOPS * 989 / 989, _H200_TBS * 3.35 / 4.8,
                _TRITON_GEMM_EFF, tma=True),
    "a100": GPU("A100 SXM 80GB (H200 ceilings × datasheet ratios)", 108, _H200_TFLOPS * 312 / 989,
                _H200_TBS * 2.039 / 4.8, _TRITON_GEMM_EFF),
}
# the launches whose compute runs at GPU.triton_gemm_eff of cuBLAS's rate (the persistent TMA GEMMs take the
# cp.async GEMM's measured factor until gpu-check measures theirs: the model does not assume they are faster)
TRITON_GEMMS = ("fwd_gemm", "bwd_dx", "fwd_gemm_tma", "bwd_dx_tma")


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


@contextlib.contextmanager
def _sm_budget(gpu: GPU):
    """The launchers' program budget set to the modelled GPU's SM count (LoRA's, which DoRA, the bottleneck
    adapter and (IA)³ use, and the multi-adapter launcher's), and the TMA GEMMs on where the GPU is sm_90;
    restored on exit."""
    from ..kernels import lora as L
    from ..kernels import multi_lora as ML

    from ..kernels._common import tma_override

    saved = L.program_budget, ML.program_budget
    L.program_budget = ML.program_budget = lambda device: gpu.sms
    try:
        with tma_override(gpu.tma):
            yield
    finally:
        L.program_budget, ML.program_budget = saved


# --------------------------------------------------------------------------------------------
# our Triton launches: recorded from the launchers, costed from their sizes
# --------------------------------------------------------------------------------------------
def _triton_cost(launch, e: int) -> tuple:
    """(FLOPs, bytes) of one recorded LoRA launch (e = bytes per element of x; fp32 buffers 4 bytes)."""
    name, a, kw = launch.kernel.__name__.replace("_tma_kernel", "_kernel"), launch.arg, launch.kwargs
    if name == "_shrink_kernel":
        M, K, R = a("M"), a("K"), a("R")
        splits = launch.grid[2] if len(launch.grid) > 2 else 1
        bits = M * -(-K // 8) if kw.get("HAS_DROPOUT") else 0  # the packed mask it writes
        return 2.0 * M * K * R, M * K * e + R * K * e + splits * M * R * 4 + bits
    if name == "_fwd_gemm_kernel":
        M, N, K, R = a("M"), a("N"), a("K"), a("R")
        base = M * K * e + N * K * e + N * R * e + N * e + M * N * e
        if kw.get("FUSE_SHRINK"):  # decode: S = x·Aᵀ inside the GEMM (reads A, stores S)
            return 2.0 * M * N * K + 2.0 * M * N * R + 2.0 * M * K * R, base + R * K * e + M * R * 4
        parts = kw.get("num_parts", 1)
        store_s = M * R * 4 if kw.get("STORE_S") else 0
        return 2.0 * M * N * K + 2.0 * M * N * R, base + parts * M * R * 4 + store_s
    if name == "_bwd_dy_kernel":
        M, N, R = a("M"), a("N"), a("R")
        P = launch.grid[0]
        splits = launch.grid[2] if len(launch.grid) > 2 else 1  # N split: one dS partial per split
        db = kw.get("COMPUTE_DB", True)
        return ((2.0 + (2.0 if db else 0.0)) * M * N * R,
                M * N * e + N * R * e + M * R * 4 + splits * M * R * 4 + (P * N * R * 4 if db else 0))
    if name == "_bwd_dx_kernel":
        M, N, K, R = a("M"), a("N"), a("K"), a("R")
        drop = kw.get("HAS_DROPOUT", False)
        by = M * N * e + N * K * e + R * K * e + M * K * e + (M * -(-K // 8) if drop else 0)
        if kw.get("FUSE_DS"):  # decode: dS = s·dY·B inside dX (reads B, stores dS)
            return 2.0 * M * N * K + 2.0 * M * K * R + 2.0 * M * N * R, by + N * R * e + M * R * 4
        parts = kw.get("num_parts", 1)
        return (2.0 * M * N * K + 2.0 * M * K * R,
                by + parts * M * R * 4 + (M * R * 4 if kw.get("STORE_S") else 0))
    if name == "_bwd_da_kernel":
        M, N, K, R, P = a("M"), a("N"), a("K"), a("R"), a("P")
        da = kw.get("COMPUTE_DA", True)
        direct = kw.get("DB_DIRECT", False)
        db = launch.grid[0] > (-(-K // kw["BLOCK_K"]) if da else 0)  # it has dB programs
        bits = M * -(-K // 8) if da and kw.get("HAS_DROPOUT") else 0
        ds_parts = kw.get("ds_parts", 1)
        flops = (2.0 * M * K * R if da else 0.0) + (2.0 * M * N * R if direct and db else 0.0)
        if not db:
            db_bytes = 0
        elif direct:  # decode: dB = s·dYᵀ·S from dY and S (no dY launch, no partials)
            db_bytes = M * N * e + M * R * 4 + N * R * e
        else:
            db_bytes = P * N * R * 4 + N * R * e
        return flops, (ds_parts * M * R * 4 + M * K * e + R * K * e if da else 0) + db_bytes + bits
    raise ValueError(f"no cost model for kernel {name}")


def _work_units(c, L) -> int:
    """Programs of a recorded launch, or the output tiles of a persistent one (``persistent_tiles``)."""
    return persistent_tiles(c) if c.kernel in (L._fwd_gemm_tma_kernel, L._bwd_dx_tma_kernel) else math.prod(c.grid)


def persistent_tiles(launch) -> int:
    """Output tiles of a persistent TMA GEMM launch (its grid is min(tiles, SMs) programs, each walking tiles
    pid, pid + grid, ...): the model's waves count these, so the last round's padding is priced as for a
    launch of one program per tile."""
    a, kw = launch.arg, launch.kwargs
    cols = a("N") if launch.kernel.__name__ == "_fwd_gemm_tma_kernel" else a("K")
    width = kw["BLOCK_N"] if launch.kernel.__name__ == "_fwd_gemm_tma_kernel" else kw["BLOCK_K"]
    return -(-a("M") // kw["BLOCK_M"]) * -(-cols // width)


def triton_lora_launches(M: int, K: int, N: int, R: int, dtype, gpu: GPU, backward: bool = True,
                         bias: bool = True) -> List[Launch]:
    """Every launch our Triton LoRA launchers make for one forward (+ backward) at these sizes, with the
    machine's SM count as the program budget. Needs the real JIT (not TRITON_INTERPRET)."""
    import torch

    from ..kernels import aot
    from ..kernels import lora as L

    kernels = [L._shrink_kernel, L._fwd_gemm_kernel, L._bwd_dy_kernel, L._bwd_dx_kernel, L._bwd_da_kernel,
               L._fwd_gemm_tma_kernel, L._bwd_dx_tma_kernel]
    with _sm_budget(gpu), aot.record_launches(kernels) as calls:
        x = torch.empty(M, K, dtype=dtype)
        W = torch.empty(N, K, dtype=dtype)
        A, B = torch.empty(R, K, dtype=dtype), torch.empty(N, R, dtype=dtype)
        b = torch.empty(N, dtype=dtype) if bias else None
        _, S = L.lora_forward(x, W, b, A, B, 2.0, 0.0, None)
        if backward:
            L.lora_backward(torch.empty(M, N, dtype=dtype), x, W, A, B, S, 2.0, 0.0, None, True, True, True)
    e = torch.empty(0, dtype=dtype).element_size()
    out = []
    for c in calls:
        fl, by = _triton_cost(c, e)
        programs = _work_units(c, L) if c.grid else None  # a persistent launch: its tiles, whose last round pads
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
    backward dS = s·dY·B and dB = s·dYᵀ·S (the scale in the GEMMs' alpha: no launch of its own), dA = dSᵀ·x,
    dX = dS·A then += dY·W (addmm_)."""
    p = "torch"
    out = [_mm(p, "S = x·Aᵀ", M, R, K, e), _mm(p, "y = addmm(b, S, Bᵀ)", M, N, R, e, N * e if bias else 0),
           _mm(p, "y += x·Wᵀ (addmm_)", M, N, K, e, M * N * e)]
    if backward:
        out += [_mm(p, "dS = s·dY·B", M, R, N, e), _mm(p, "dB = s·dYᵀ·S", N, R, M, e), _mm(p, "dA = dSᵀ·x", R, K, M, e),
                _mm(p, "dX = dS·A", M, K, R, e), _mm(p, "dX += dY·W (addmm_)", M, K, N, e, M * K * e)]
    return out


# --------------------------------------------------------------------------------------------
# cases and report
# --------------------------------------------------------------------------------------------
LLAMA3_8B = {"q_proj": (4096, 4096), "mlp_up": (4096, 14336), "mlp_down": (14336, 4096)}  # (K, N)
TOKENS = (1, 16, 64, 4096)


def break_even_gemm_eff(launches: List[Launch], target_us: float, gpu: GPU) -> Optional[float]:
    """The rate of our Triton GEMM launches (``TRITON_GEMMS``, as a fraction of cuBLAS's) at which ``launches``
    take ``target_us`` in the model: what the fused GEMM must reach for fusion to win there. None when no rate up
    to 2× cuBLAS's would (the other launches alone take longer). Bisection; ``launches`` keep their modelling
    for ``gpu``."""
    def total(eff):
        g = dataclasses.replace(gpu, triton_gemm_eff=eff)
        return sum(copy.copy(la).model(g).modelled["us"] for la in launches)

    lo, hi = 0.01, 2.0
    if total(hi) > target_us:
        return None
    if total(lo) <= target_us:
        return lo
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if total(mid) <= target_us else (mid, hi)
    return hi


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
                # the GEMM rate at which the fused path would tie our torch path (what auto would then pick)
                even = break_even_gemm_eff(per["triton"], totals["torch"], gpu)
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
                                 "break_even_gemm_eff": even if prov == "triton" else None,
                                 "per_launch": [{"kernel": la.kernel, "programs": la.programs, "grid": list(la.grid),
                                                 "flops": la.flops, "bytes": la.bytes, **la.modelled}
                                                for la in launches]})
    return rows


# --------------------------------------------------------------------------------------------
# multi-adapter LoRA (one adapter per token): our Triton gather kernels against a per-adapter cuBLAS loop
# --------------------------------------------------------------------------------------------
def _multi_cost(launch, T: int, G: int, e: int) -> tuple:
    """(FLOPs, bytes) of one recorded multi-adapter launch: T active tokens in G segments (slots used); each
    used slot's weights read once; the fp32 rank-space buffers (S, dS) 4 bytes."""
    name, a = launch.kernel.__name__, launch.arg
    if name in ("_sgmv_shrink_kernel", "_bgmv_shrink_kernel"):
        KD, R = a("KD"), a("R")
        return 2.0 * T * KD * R, T * KD * e + G * R * KD * e + T * R * 4
    if name in ("_sgmv_expand_kernel", "_bgmv_expand_kernel"):  # out[perm] += ...: read and write the rows
        ND, R = a("ND"), a("R")
        return 2.0 * T * ND * R, T * R * 4 + G * ND * R * e + 2 * T * ND * e
    if name == "_seg_outer_kernel":
        I, J = a("I"), a("J")
        p_e = 4 if launch.args[0].dtype.is_floating_point and launch.args[0].element_size() == 4 else e
        q_e = 4 if launch.args[1].element_size() == 4 else e
        return 2.0 * T * I * J, T * I * p_e + T * J * q_e + G * I * J * e
    raise ValueError(f"no cost model for kernel {name}")


def triton_multi_launches(counts, K: int, N: int, R: int, dtype, gpu: GPU, backward: bool = True) -> tuple:
    """(path, launches) of one multi-adapter forward (+ backward) with ``counts[i]`` tokens on adapter i:
    the base GEMM(s) as library calls, then every launch the Triton launchers make (recorded, not run; the
    path chosen as ``ops.multi_lora.choose_path`` chooses it)."""
    import torch

    from ..kernels import aot
    from ..kernels import multi_lora as ML
    from ..ops.multi_lora import build_mapping, choose_path

    e = torch.empty(0, dtype=dtype).element_size()
    S, T = len(counts), sum(counts)
    ids = torch.repeat_interleave(torch.arange(S), torch.tensor(counts))
    m = build_mapping(ids, T, S)
    path = choose_path(m)
    kernels = [ML._sgmv_shrink_kernel, ML._sgmv_expand_kernel, ML._bgmv_shrink_kernel, ML._bgmv_expand_kernel,
               ML._seg_outer_kernel]
    with _sm_budget(gpu), aot.record_launches(kernels) as calls:
        x, y = torch.empty(T, K, dtype=dtype), torch.empty(T, N, dtype=dtype)
        A, B = torch.empty(S, R, K, dtype=dtype), torch.empty(S, N, R, dtype=dtype)
        scal, ranks = torch.ones(S), torch.full((S,), R, dtype=torch.int32)
        _, Sb = ML.multi_lora_forward(y, x, A, B, m, scal, ranks, path)
        if backward:
            ML.multi_lora_backward(torch.empty(T, N, dtype=dtype), x, torch.empty(T, K, dtype=dtype), A, B, Sb, m,
                                   scal, ranks, path, True, True)
    out = [_mm("triton", "base addmm (cuBLAS)", T, N, K, e, N * e)]
    if backward:
        out.append(_mm("triton", "dX = dY·W (cuBLAS)", T, K, N, e))
    for c in calls:
        fl, by = _multi_cost(c, T, m.num_segments, e)
        out.append(Launch("triton", c.kernel.__name__.strip("_").replace("_kernel", ""), fl, by, math.prod(c.grid),
                          c.grid))
    return path, out


def loop_multi_launches(counts, K: int, N: int, R: int, e: int, backward: bool = True) -> List[Launch]:
    """HF PEFT's mixed-batch forward: the base addmm, then per adapter its rows gathered, lora_A and lora_B
    GEMMs, the scaling and the rows added back (5 library calls per adapter); autograd's backward of that."""
    p = "loop"
    out = [_mm(p, "base addmm", sum(counts), N, K, e, N * e)]
    for c in counts:
        out += [_ew(p, "gather rows", c * K, e), _mm(p, "lora_A mm", c, R, K, e), _mm(p, "lora_B mm", c, N, R, e),
                _ew(p, "mul scaling", c * N, e), _ew(p, "index_add", c * N, e, reads=2)]
    if backward:
        out.append(_mm(p, "dx_base = dY·W", sum(counts), K, N, e))
        for c in counts:
            out += [_ew(p, "gather dY rows", c * N, e), _ew(p, "mul scaling (bwd)", c * N, e),
                    _mm(p, "dB = dYsᵀ·h", N, R, c, e), _mm(p, "dh = dYs·B", c, R, N, e), _mm(p, "dA = dhᵀ·x", R, K, c, e),
                    _mm(p, "dx_lora = dh·A", c, K, R, e), _ew(p, "index_add dx", c * K, e, reads=2)]
    return out


MULTI_BATCHES = {"distinct 32×128": [128] * 32, "skewed 3972+31×4": [3972] + [4] * 31, "decode 32×1": [1] * 32}


def model_multi_lora(gpu: GPU, batches=None, K: int = 4096, N: int = 4096, r: int = 16, dtype=None,
                     modes=("fwd", "fwd+bwd")) -> List[dict]:
    """One row per (batch, mode, provider) for 32 adapters on a 4096→4096 layer: our Triton path (the path
    ``choose_path`` picks) against the per-adapter cuBLAS loop; ratio to the loop's time."""
    import torch

    dtype = dtype or torch.bfloat16
    e = torch.empty(0, dtype=dtype).element_size()
    rows = []
    for bname, counts in (batches or MULTI_BATCHES).items():
        for mode in modes:
            bwd = mode == "fwd+bwd"
            path, tri = triton_multi_launches(counts, K, N, r, dtype, gpu, bwd)
            per = {"triton": tri, "loop": loop_multi_launches(counts, K, N, r, e, bwd)}
            totals = {prov: sum(la.model(gpu).modelled["us"] for la in launches) for prov, launches in per.items()}
            for prov, launches in per.items():
                under = [la.kernel for la in launches if la.programs is not None and la.programs < gpu.sms]
                rows.append({"model": "launch model (not a measurement)", "gpu": gpu.name, "sms": gpu.sms,
                             "op": "multi_lora", "shape": bname, "M": sum(counts), "K": K, "N": N, "r": r,
                             "adapters": len(counts), "mode": mode, "provider": prov,
                             "path": path if prov == "triton" else None, "modelled_us": totals[prov],
                             "vs_loop": totals[prov] / totals["loop"], "launches": len(launches),
                             "under_one_wave": under,
                             "per_launch": [{"kernel": la.kernel, "programs": la.programs, "grid": list(la.grid),
                                             "flops": la.flops, "bytes": la.bytes, **la.modelled} for la in launches]})
    return rows


def format_multi_model(rows: List[dict]) -> str:
    lines = ["MULTI-ADAPTER LAUNCH MODEL (a model, not a measurement): " + (rows[0]["gpu"] if rows else ""),
             f"{'batch':18s} {'mode':8s} {'provider':8s} {'model µs':>10s} {'× loop':>7s} {'launches':>8s}  "
             "Triton launches: kernel programs/waves (bound)"]
    for r in rows:
        detail = ""
        if r["provider"] == "triton":
            detail = f"  [{r['path']}] " + ", ".join(
                f"{p['kernel']} {p['programs']}/{p['waves']:.2f}{'*' if p['programs'] < r['sms'] else ''} ({p['bound'][0]})"
                for p in r["per_launch"] if p["programs"] is not None)
        lines.append(f"{r['shape']:18s} {r['mode']:8s} {r['provider']:8s} {r['modelled_us']:10.1f} {r['vs_loop']:7.3f} "
                     f"{r['launches']:8d}{detail}")
    under = sorted({(r["shape"], r["mode"], k) for r in rows for k in r["under_one_wave"]})
    lines.append(f"Triton launches under one wave: {len(under)}" +
                 ("" if not under else " — " + "; ".join(f"{s} {m}: {k}" for s, m, k in under)))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the other ops: programs and waves of every launch (no time model yet)
# --------------------------------------------------------------------------------------------
def other_op_waves(gpu: GPU, shapes=None, tokens=TOKENS, r: int = 16, dtype=None) -> List[dict]:
    """For DoRA (LoRA's kernels with the magnitude epilogue), the bottleneck adapter (its three placements,
    bottleneck r) and (IA)³ (both scalings), forward and backward at the Llama-3-8B shapes: every launch the
    Triton launchers make (recorded with the machine's SM count as the program budget) with its programs and
    waves. Not priced: these ops have no per-launch FLOP/byte model yet (``traffic.py`` has their op totals)."""
    import torch

    from ..kernels import aot
    from ..kernels import bottleneck as BN
    from ..kernels import ia3 as I
    from ..kernels import lora as L

    dtype = dtype or torch.bfloat16
    kernels = [L._shrink_kernel, L._fwd_gemm_kernel, L._bwd_dy_kernel, L._bwd_dx_kernel, L._bwd_da_kernel,
               L._fwd_gemm_tma_kernel, L._bwd_dx_tma_kernel, BN._adapter_shrink_kernel, BN._expand_kernel,
               BN._seq_fwd_kernel, BN._adapter_bwd_kernel, I._ia3_gemm_kernel]
    e = lambda *sz: torch.empty(*sz, dtype=dtype)  # noqa: E731
    rows = []
    with _sm_budget(gpu):
        for sname, (K, N) in (shapes or LLAMA3_8B).items():
            for M in tokens:
                x, W, b, dy = e(M, K), e(N, K), e(N), e(M, N)
                A, B = e(r, K), e(N, r)
                cases = {
                    "dora": lambda: (L.lora_forward(x, W, b, A, B, 2.0, 0.0, None, col_scale=torch.empty(N),
                                                    store_z=True),
                                     L.lora_backward(dy, x, W, A, B, torch.empty(M, r), 2.0, 0.0, None, True, True, True)),
                    "ia3 (output scaling)": lambda: (I.ia3_forward(x, W, b, e(N), False, True),
                                                     I.ia3_backward(dy, x, W, e(N), e(M, N), False, True, True)),
                    "ia3 (input scaling)": lambda: (I.ia3_forward(x, W, b, e(K), True, False),
                                                    I.ia3_backward(dy, x, W, e(K), None, True, True, True)),
                }
                D, U, db = e(r, K), e(N, r), e(r)
                cases["adapter parallel"] = lambda: (
                    BN.parallel_forward(x, W, b, D, db, U, "relu"),
                    BN.parallel_backward(dy, x, W, D, U, torch.empty(M, r), "relu", True, True, True, True))
                Ds = e(r, N)
                cases["adapter sequential"] = lambda: (
                    BN.sequential_forward(x, W, b, Ds, db, e(N, r), b, "relu"),
                    BN.adapter_backward(dy, e(M, N), Ds, e(N, r), torch.empty(M, r), "relu", True, True, True, True,
                                        True))
                for op, fn in cases.items():
                    with aot.record_launches(kernels) as calls:
                        fn()
                    launches = [{"kernel": c.kernel.__name__.strip("_").replace("_kernel", ""), "grid": list(c.grid),
                                 "programs": _work_units(c, L), "waves": _work_units(c, L) / gpu.sms} for c in calls]
                    rows.append({"model": "launch waves (no time model)", "gpu": gpu.name, "sms": gpu.sms, "op": op,
                                 "shape": sname, "M": M, "K": K, "N": N, "r": r, "launches": launches,
                                 "under_one_wave": [la["kernel"] for la in launches if la["programs"] < gpu.sms]})
    return rows


def format_waves(rows: List[dict]) -> str:
    lines = ["OTHER OPS, LAUNCH WAVES (fwd+bwd; programs/waves, * under one wave; no time model): "
             + (rows[0]["gpu"] if rows else "")]
    for r in rows:
        lines.append(f"{r['op']:20s} {r['shape']:9s} {r['M']:5d}  " + ", ".join(
            f"{la['kernel']} {la['programs']}/{la['waves']:.2f}{'*' if la['programs'] < r['sms'] else ''}"
            for la in r["launches"]))
    under = sorted({(r["op"], r["shape"], r["M"], k) for r in rows for k in r["under_one_wave"]})
    lines.append(f"launches under one wave: {len(under)}")
    return "\n".join(lines)


def write_model(out_dir: str, rows: List[dict], stem: str = "model") -> List[str]:
    """<stem>.json (every row with its launches) and <stem>.csv (one line per provider row), written atomically."""
    import csv
    import io
    import json
    import os
    import tempfile

    os.makedirs(out_dir, exist_ok=True)
    buf = io.StringIO()
    ratio = "vs_loop" if rows and "vs_loop" in rows[0] else "vs_peft"
    cols = ["model", "gpu", "op", "shape", "M", "K", "N", "r", "mode", "provider", "modelled_us", ratio, "launches",
            "under_one_wave"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "under_one_wave": " ".join(r["under_one_wave"])})
    paths = []
    for name, text in ((f"{stem}.json", json.dumps(rows, indent=1)), (f"{stem}.csv", buf.getvalue())):
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))
        paths.append(os.path.join(out_dir, name))
    return paths


def gpu_eff(row: dict) -> float:
    """The Triton GEMM rate the row was modelled with (its GPU's ``triton_gemm_eff``)."""
    return next(g.triton_gemm_eff for g in GPUS.values() if g.name == row["gpu"])


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
    even = [r for r in rows if r["provider"] == "triton" and r.get("break_even_gemm_eff")
            and r["break_even_gemm_eff"] > gpu_eff(r)]
    if even:
        lines.append("where the fused path loses to our torch path, the GEMM rate (× cuBLAS's; modelled now "
                     f"{gpu_eff(even[0]):.2f}) at which it would tie: " + "; ".join(
                         f"{r['shape']} M={r['M']} {r['mode']} {r['break_even_gemm_eff']:.2f}" for r in even))
    lines.append(f"Triton launches under one wave: {len(under)}" +
                 ("" if not under else " — " + "; ".join(f"{s} M={m}: {k}" for s, m, k in under)))
    return "\n".join(lines)
