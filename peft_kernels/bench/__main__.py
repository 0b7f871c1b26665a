"""``python -m peft_kernels.bench``: the LoRA linear benchmark on the current device.

Defaults are the issue's CPU case: fp32, M=512, K=N=4096, r=16, p ∈ {0, 0.1}, forward and
forward+backward. ``--quick`` runs tiny shapes (a smoke test, seconds).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import lora

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peft_kernels.bench")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default fp32 on CPU, bf16 on CUDA")
    ap.add_argument("-M", type=int, default=512)
    ap.add_argument("-K", type=int, default=4096)
    ap.add_argument("-N", type=int, default=4096)
    ap.add_argument("-r", type=int, default=16)
    ap.add_argument("--p", type=float, action="append", help="dropout p (repeatable; default 0 and 0.1)")
    ap.add_argument("--mode", choices=["fwd", "fwd+bwd"], action="append")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds (smoke test)")
    a = ap.parse_args(argv)
    if a.quick:
        a.M, a.K, a.N, a.r, a.rounds, a.warmup = 64, 96, 80, 4, 3, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if a.device.startswith("cuda") else torch.float32)
    t0 = time.time()
    print(f"LoRA linear benchmark on {a.device}: {lora.environment()}")
    print(f"M={a.M} K={a.K} N={a.N} r={a.r} dtype={str(dtype).split('.')[-1]} rounds={a.rounds} "
          f"(× frozen: median over rounds of the time ratio to the frozen nn.Linear in the same round; IQR: spread of those ratios; the control row is the noise floor)\n")
    rows = lora.run(a.M, a.K, a.N, a.r, dtype, a.device, a.rounds, a.warmup, tuple(a.p or (0.0, 0.1)),
                    tuple(a.mode or ("fwd", "fwd+bwd")))
    print(lora.format_table(rows, a.M, a.K, a.r))
    if (a.M, a.K, a.N, a.r, dtype, a.device) == (512, 4096, 4096, 16, torch.float32, "cpu"):
        print("\nTargets (issue #2, CPU fp32 M=512 K=N=4096 r=16):")
        for line in lora.targets(rows, a.M, a.r):
            print("  " + line)
    else:
        print("\n(the issue's targets are for CPU fp32 M=512 K=N=4096 r=16; not checked for this run)")
    if a.json:
        lora.to_json(rows, a.json)
    print(f"\n({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
