"""Time the fused LoRA GEMMs under candidate tile configs on a GPU: the cp.async one
(``kernels.lora._fwd_gemm_kernel``) and the persistent TMA one sm_90 runs past decode (``_fwd_gemm_tma_kernel``).

For gpu-check's device run: bf16, Llama-3-8B q_proj / MLP shapes at M=4096, rank 0 (the base GEMM alone)
and rank 16 (the LoRA expand in the accumulator), each config against ``torch.mm`` (median of CUDA-event
timings, interleaved per shape). Prints one line per (shape, config) with the compiled kernel's registers
and spills, and writes JSON with ``--out``. ``--dry`` runs two configs at tiny shapes under the interpreter
(a check of the script).

    python3 tools/gemm_sweep.py --out sweep.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

DRY = "--dry" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

from peft_kernels import dispatch  # noqa: E402
from peft_kernels.kernels import lora as L  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); the first is the table's prefill entry
CONFIGS = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 4),
           (128, 128, 64, 4, 4), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4), (128, 64, 64, 4, 4),
           (256, 128, 64, 8, 4)]
# the persistent TMA kernel (sm_90 only): its shipped tile (lora.TMA_GEMM) first
TMA_CONFIGS = [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
               (256, 128, 64, 8, 3), (128, 128, 128, 8, 3)]
SHAPES = {"q_proj": (4096, 4096), "mlp_up": (4096, 14336), "mlp_down": (14336, 4096)}


def launch(x, w, S, B, y, R, cfg):
    bm, bn, bk, nw, ns = cfg
    M, K = x.shape
    N = w.shape[0]
    fl = L._flags(x, w)
    return L._fwd_gemm_kernel[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](
        x, w, y, S, B, y, M, N, K, R, x.stride(0), x.stride(1), w.stride(0), w.stride(1), B.stride(0), B.stride(1),
        y.stride(0), y.stride(1), 0.5, HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        BLOCK_R=max(16, triton.next_power_of_2(max(R, 1))), GROUP_M=8, num_warps=nw, num_stages=ns, **fl)


def launch_tma(x, w, S, B, y, R, cfg):
    bm, bn, bk, nw, ns = cfg
    M, K = x.shape
    N = w.shape[0]
    fl = L._flags(x, w)
    progs = L._persistent_grid(triton.cdiv(M, bm) * triton.cdiv(N, bn), x.device)
    return L._fwd_gemm_tma_kernel[(progs,)](
        L._desc(x, (bm, bk)), L._desc(w, (bn, bk)), y, S, B, y, M, N, K, R, B.stride(0), B.stride(1),
        y.stride(0), y.stride(1), 0.5, progs, HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        BLOCK_R=max(16, triton.next_power_of_2(max(R, 1))), GROUP_M=8, num_warps=nw, num_stages=ns, **fl)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--M", type=int, default=4096)
    args = ap.parse_args()
    dev = torch.device("cpu" if args.dry else "cuda")
    dt = torch.float32 if args.dry else torch.bfloat16
    shapes = {"tiny": (48, 40)} if args.dry else SHAPES
    configs = [(32, 32, 16, 4, 2), (16, 32, 32, 4, 2)] if args.dry else CONFIGS
    from peft_kernels.kernels._common import tma_unavailable_reason

    # the dry run's interpreter runs the descriptors (fp32 there); on a GPU only sm_90 has TMA
    tma_why = None if args.dry else tma_unavailable_reason(dev)
    kernels = [("cp.async", launch, c) for c in configs]
    kernels += [("tma", launch_tma, c) for c in ([(32, 32, 16, 4, 2)] if args.dry else TMA_CONFIGS)] if tma_why is None else []
    if tma_why is not None:
        print(json.dumps({"tma": f"not swept: {tma_why}"}), flush=True)
    M = 70 if args.dry else args.M
    timer = dispatch.host_timer if args.dry else dispatch.cuda_timer
    rows = []
    for sname, (K, N) in shapes.items():
        torch.manual_seed(0)
        x = torch.randn(M, K, device=dev, dtype=dt)
        w = torch.randn(N, K, device=dev, dtype=dt) * K ** -0.5
        for R in (0, 16):
            S = torch.randn(M, max(R, 1), device=dev, dtype=torch.float32)
            B = torch.randn(N, max(R, 1), device=dev, dtype=dt)
            ref = (x.float() @ w.float().t() + 0.5 * (S[:, :R] @ B[:, :R].float().t())).to(dt).float()
            y = torch.empty(M, N, device=dev, dtype=dt)
            mm_ms = timer(lambda: torch.mm(x, w.t()), dev, warmup=3, iters=20)
            for kind, fn, cfg in kernels:
                row = {"shape": sname, "M": M, "K": K, "N": N, "R": R, "kernel": kind, "config": list(cfg)}
                try:
                    k = fn(x, w, S, B, y, R, cfg)
                    err = (y.float() - ref).abs().max().item()
                    ms = timer(lambda: fn(x, w, S, B, y, R, cfg), dev, warmup=3, iters=20)
                    row.update(ms=ms, mm_ms=mm_ms, vs_mm=ms / mm_ms, tflops=2 * M * K * N / ms / 1e9,
                               max_err=err, regs=getattr(k, "n_regs", None), spills=getattr(k, "n_spills", None))
                except Exception as e:  # noqa: BLE001 - a config that fails (out of shared memory) is reported
                    row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
