"""``python -m peft_kernels.bench``: the benchmarks on the current device.

``--op lora``: fused single-adapter LoRA. Defaults are issue #2's CPU case: fp32, M=512, K=N=4096,
r=16, p ∈ {0, 0.1}, forward and forward+backward.
``--op multi_lora``: the mixed multi-adapter batch (issue #3): T=256 tokens, r=16, 1/8/32
adapters, K=N ∈ {1024, 4096}, vs HF PEFT's ``adapter_names`` path and a frozen nn.Linear.
``--op adapter``: bottleneck adapters (issue #4): AdapterLinear vs the same adapter from unfused nn
modules vs a frozen nn.Linear, sequential and parallel, M=512, hidden 4096, bottleneck 256.
``--op all`` (the default) runs them all. ``--quick`` runs tiny shapes (a smoke test, seconds).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import adapter, lora, multi_lora

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peft_kernels.bench")
    ap.add_argument("--op", choices=["lora", "multi_lora", "adapter", "all"], default="all")
    ap.add_argument("--bottleneck", type=int, default=256, help="adapter: bottleneck size")
    ap.add_argument("--tokens", type=int, default=256, help="multi_lora: tokens per batch")
    ap.add_argument("--adapters", type=int, action="append", help="multi_lora: distinct adapters (repeatable; "
                    "default 1, 8, 32)")
    ap.add_argument("--hidden", type=int, action="append", help="multi_lora: K=N (repeatable; default 1024, 4096)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default fp32 on CPU, bf16 on CUDA")
    ap.add_argument("-M", type=int, default=512)
    ap.add_argument("-K", type=int, default=4096)
    ap.add_argument("-N", type=int, default=4096)
    ap.add_argument("-r", type=int, default=16)
    ap.add_argument("--p", type=float, action="append", help="dropout p (repeatable; default 0 and 0.1)")
    ap.add_argument("--mode", choices=["fwd", "fwd+bwd"], action="append")
    ap.add_argument("--rounds", type=int, default=None, help="default 40 (lora), 20 (multi_lora), 15 (adapter)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds (smoke test)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if a.device.startswith("cuda") else torch.float32)
    t0 = time.time()
    rows = []
    print(f"peft_kernels benchmarks on {a.device}: {lora.environment()}")
    if a.op in ("lora", "all"):
        rows += _lora(a, dtype)
    if a.op in ("multi_lora", "all"):
        rows += _multi(a, dtype)
    if a.op in ("adapter", "all"):
        rows += _adapter(a, dtype)
    if a.json:
        lora.to_json(rows, a.json)
    print(f"\n({time.time() - t0:.0f} s)")
    return 0


def _lora(a, dtype):
    M, K, N, r, rounds, warmup = a.M, a.K, a.N, a.r, a.rounds or 40, a.warmup
    if a.quick:
        M, K, N, r, rounds, warmup = 64, 96, 80, 4, 3, 1
    print(f"\n== LoRA linear: M={M} K={K} N={N} r={r} dtype={str(dtype).split('.')[-1]} rounds={rounds} "
          f"(× frozen: median over rounds of the time ratio to the frozen nn.Linear in the same round; IQR: spread "
          f"of those ratios; the control row is the noise floor)\n")
    rows = lora.run(M, K, N, r, dtype, a.device, rounds, warmup, tuple(a.p or (0.0, 0.1)),
                    tuple(a.mode or ("fwd", "fwd+bwd")))
    print(lora.format_table(rows, M, K, r))
    if (M, K, N, r, dtype, a.device) == (512, 4096, 4096, 16, torch.float32, "cpu"):
        print("\nTargets (issue #2, CPU fp32 M=512 K=N=4096 r=16):")
        for line in lora.targets(rows, M, r):
            print("  " + line)
    else:
        print("\n(issue #2's targets are for CPU fp32 M=512 K=N=4096 r=16; not checked for this run)")
    for row in rows:
        row.setdefault("op", "lora")
    return rows


def _multi(a, dtype):
    T, r, rounds, warmup = a.tokens, a.r, a.rounds or 20, a.warmup
    hidden = tuple(a.hidden or (1024, 4096))
    n_adapters = tuple(a.adapters or (1, 8, 32))
    if a.quick:
        T, r, rounds, warmup, hidden, n_adapters = 24, 4, 3, 1, (48,), (1, 5)
    print(f"\n== Multi-adapter mixed batch: T={T} tokens, r={r}, dtype={str(dtype).split('.')[-1]}, rounds={rounds}, "
          f"random adapter per token (LoRA part: time above the frozen nn.Linear in the same round, median over "
          f"rounds; fwd under no_grad, since PEFT's adapter_names is inference-only)\n")
    rows = []
    for h in hidden:
        rows += multi_lora.run(T, h, h, r, n_adapters, dtype, a.device, rounds, warmup)
    print(multi_lora.format_table(rows))
    tg = multi_lora.targets(rows)
    if tg and a.device == "cpu":
        print("\nTarget (issue #3, CPU):")
        for line in tg:
            print("  " + line)
    return rows


def _adapter(a, dtype):
    M, K, b, rounds, warmup = a.M, a.K, a.bottleneck, a.rounds or 15, a.warmup
    if a.quick:
        M, K, b, rounds, warmup = 48, 64, 8, 3, 1
    print(f"\n== Bottleneck adapter: M={M} hidden={K} bottleneck={b} relu dtype={str(dtype).split('.')[-1]} "
          f"rounds={rounds} (× floor: the ratio over the modelled FLOP floor 1 + 3b/K of the frozen layer)\n")
    rows = adapter.run(M, K, K, b, "relu", dtype, a.device, rounds, warmup)
    print(adapter.format_table(rows))
    if (M, K, b, dtype, a.device) == (512, 4096, 256, torch.float32, "cpu"):
        print("\nTargets (issue #4, CPU fp32 M=512 hidden=4096 bottleneck=256):")
        for line in adapter.targets(rows):
            print("  " + line)
    return rows


if __name__ == "__main__":
    sys.exit(main())
