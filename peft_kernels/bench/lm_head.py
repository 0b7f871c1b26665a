"""``python -m peft_kernels.bench --op lm_head``: the fused head loss (``linear_cross_entropy``) against the unfused
computation (logits, then ``F.cross_entropy`` on their fp32 upcast, as a transformers training loop runs it).

A LoRA r = 16 on a head of H × V (default 512 × 32000, a CPU-sized Llama head), fp32:
  * peak extra resident memory of one forward + backward, each in a fresh process (Linux ``VmHWM`` after a reset
    through ``/proc/self/clear_refs``, minus the resident bytes before the call; glibc's mmap threshold fixed at
    128 KiB so that freed tensors leave the resident set), at several token counts M;
  * time of forward + backward, fused / unfused, paired medians over interleaved rounds.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, Optional

import torch

from .model import paired, ratio

_CHILD = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
from peft_kernels.bench import lm_head as B
print("RESULT", json.dumps(B._peak_child({which!r}, {M}, {H}, {V}, {chunk})))
"""


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def make(M: int, H: int, V: int, r: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, H, generator=g).requires_grad_()
    W = torch.randn(V, H, generator=g) / H ** 0.5
    A = (torch.randn(r, H, generator=g) / H ** 0.5).requires_grad_()
    B = (torch.randn(V, r, generator=g) * 0.01).requires_grad_()
    labels = torch.randint(0, V, (M,), generator=g)
    return h, W, A, B, labels


def step(which: str, h, W, A, B, labels, chunk: Optional[int] = None) -> float:
    import torch.nn.functional as F

    from ..ops.linear_ce import linear_cross_entropy

    t = time.perf_counter()
    if which == "fused":
        loss = linear_cross_entropy(h, W, labels, lora_A=A, lora_B=B, scaling=2.0, chunk_size=chunk)
    else:
        logits = F.linear(h, W) + 2.0 * F.linear(F.linear(h, A), B)
        loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    h.grad = A.grad = B.grad = None
    return time.perf_counter() - t


def _peak_child(which: str, M: int, H: int, V: int, chunk: Optional[int]) -> Dict[str, float]:
    torch.set_num_threads(1)
    args = make(M, H, V)
    step(which, *make(8, H, V), chunk=chunk)  # first-call costs (allocator, BLAS) outside the measurement
    rss0 = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    step(which, *args, chunk=chunk)
    return {"peak_extra_MiB": (_status_kib("VmHWM") - rss0) / 1024}


def peak_extra(which: str, M: int, H: int, V: int, chunk: Optional[int]) -> float:
    code = _CHILD.format(root=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         which=which, M=M, H=H, V=V, chunk=chunk)
    # large blocks straight from mmap and back to the system when freed (a fixed threshold turns off glibc's
    # adaptive one): the resident peak then follows the live tensors, not the allocator's reuse of freed chunks
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])["peak_extra_MiB"]
    raise RuntimeError(f"lm_head peak measurement ({which}, M={M}) failed: {(out.stdout + out.stderr)[-1500:]}")


def run(H: int = 512, V: int = 32000, tokens=(512, 2048, 4096), chunk: int = 256, rounds: int = 7,
        time_tokens: int = 1024, quick: bool = False) -> dict:
    if quick:
        H, V, tokens, chunk, rounds, time_tokens = 64, 2000, (128, 512), 32, 3, 256
    res: dict = {"H": H, "V": V, "r": 16, "chunk": chunk, "memory": [], "rounds": rounds}
    for M in tokens:
        f, u = peak_extra("fused", M, H, V, chunk), peak_extra("unfused", M, H, V, chunk)
        res["memory"].append({"M": M, "fused_MiB": f, "unfused_MiB": u, "logits_MiB": M * V * 4 / 2 ** 20})
    args = make(time_tokens, H, V)
    steps = {"fused": lambda: step("fused", *args, chunk=chunk), "unfused": lambda: step("unfused", *args)}
    times = paired(steps, rounds)
    res["time"] = {"M": time_tokens, "fused/unfused": ratio(times, "fused", "unfused"),
                   "fused_ms": 1e3 * statistics.median(times["fused"]),
                   "unfused_ms": 1e3 * statistics.median(times["unfused"])}
    return res


def format_report(res: dict) -> str:
    lines = [f"lm_head + LoRA (r={res['r']}) + cross-entropy, H={res['H']}, V={res['V']}, fp32, chunk "
             f"{res['chunk']} tokens; peak extra resident MiB of one forward + backward, fresh process each", "",
             "| tokens M | fused | unfused | unfused logits alone | saved |", "|---|---|---|---|---|"]
    for m in res["memory"]:
        lines.append(f"| {m['M']} | {m['fused_MiB']:.1f} | {m['unfused_MiB']:.1f} | {m['logits_MiB']:.1f} | "
                     f"{m['unfused_MiB'] - m['fused_MiB']:.1f} |")
    t = res["time"]
    lines += ["", f"forward + backward at M={t['M']}: fused / unfused {t['fused/unfused']:.3f}× "
              f"({t['fused_ms']:.0f} ms / {t['unfused_ms']:.0f} ms; paired medians over {res['rounds']} rounds)"]
    return "\n".join(lines)


def main(rounds: Optional[int], quick: bool, out: Optional[str]) -> int:
    res = run(rounds=rounds or 7, quick=quick)
    from .report import print_and_write

    return print_and_write(res, format_report(res), [], out, "lm_head.json")
