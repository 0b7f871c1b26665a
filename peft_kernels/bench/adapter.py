"""Bottleneck-adapter benchmark: frozen nn.Linear vs the same adapter built unfused from nn modules
vs AdapterLinear, sequential and parallel, forward and forward+backward, with saved bytes.

FLOP floor (frozen base, trainable adapter): forward adds 2·b/K of the base work (down + up GEMMs
of M·N·b or M·K·b MACs each); backward adds dH, dU, dD and dP·D (4 GEMMs of the same size) to
the base dX GEMM. Forward+backward: ``1 + 3·b/K`` of the frozen layer (K = N here), e.g. 1.19 at
b=256, K=4096.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from ..nn import AdapterLinear
from ..reference import activation_ref
from .common import interleaved, saved_activation_bytes, timed_call

FROZEN = "nn.Linear (frozen)"
CONTROL = "nn.Linear (frozen, control)"
UNFUSED = "unfused nn modules"


class _Act(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def forward(self, x):
        return activation_ref(x, self.name)


class Unfused(nn.Module):
    """The same adapter as a user would write it from nn modules (AdapterHub's structure)."""

    def __init__(self, base: nn.Linear, ours: AdapterLinear):
        super().__init__()
        self.base = base
        self.mode = ours.mode
        self.adapter_down = nn.Sequential(ours.adapter_down, _Act(ours.activation))
        self.adapter_up = ours.adapter_up
        self.scale = ours._scaling()

    def forward(self, x):
        y = self.base(x)
        h = y if self.mode == "sequential" else x
        return y + self.adapter_up(self.adapter_down(h)) * self.scale


def flop_floor(K: int, N: int, b: int, mode: str, fwd_only: bool) -> float:
    """Modelled time of the fused op relative to the frozen linear (same-shape GEMM throughput)."""
    a_in = N if mode == "sequential" else K
    adapter_fwd = (a_in * b + b * N) / (K * N)           # down + up vs the base GEMM
    if fwd_only:
        return 1 + adapter_fwd
    adapter_bwd = (N * b + N * b + a_in * b + a_in * b) / (K * N)  # dH, dU, dD, dP·D
    return (2 + adapter_fwd + adapter_bwd) / 2           # base fwd + base dX


def run(M=512, K=4096, N=4096, b=256, activation="relu", dtype=torch.float32, device="cpu", rounds=20, warmup=2,
        modes_adapter=("sequential", "parallel")) -> List[dict]:
    device = torch.device(device)
    rows = []
    for amode in modes_adapter:
        torch.manual_seed(0)
        base = nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False)

        def sharing():
            lin = nn.Linear(K, N, device="meta")
            lin.weight, lin.bias = base.weight, base.bias
            return lin

        ours = AdapterLinear.from_linear(sharing(), bottleneck_size=b, activation=activation, mode=amode)
        ours.to(device)
        with torch.no_grad():  # a trained-looking adapter (not the near-zero init)
            ours.adapter_up.weight.normal_(0, 1 / b ** 0.5)
        mods: Dict[str, nn.Module] = {FROZEN: base, CONTROL: sharing(), UNFUSED: Unfused(sharing(), ours),
                                      "ours (AdapterLinear)": ours}
        params = [q for m in mods.values() for q in m.parameters()]
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, N, device=device, dtype=dtype)
        saved = {n: saved_activation_bytes(lambda m=m: m(x), params) for n, m in mods.items()}
        for mode in ("fwd", "fwd+bwd"):
            calls = {n: timed_call(lambda m=m: m(x), mode, x, dy, m.parameters()) for n, m in mods.items()}
            res = interleaved(calls, FROZEN, rounds, warmup, device)
            floor = flop_floor(K, N, b, amode, mode == "fwd")
            for n, r in res.items():
                rows.append(dict(op="adapter", adapter_mode=amode, provider=n, mode=mode, M=M, K=K, N=N, b=b,
                                 activation=activation, dtype=str(dtype).split(".")[-1], device=str(device),
                                 median_ms=r.median_ms, ratio_to_frozen=r.ratio, ratio_iqr=r.ratio_iqr,
                                 flop_floor=floor, ratio_to_floor=r.ratio / floor, saved_bytes=saved[n],
                                 rounds=rounds))
    return rows


def format_table(rows: List[dict]) -> str:
    hdr = (f"{'adapter':10s} {'provider':28s} {'mode':8s} {'median ms':>10s} {'× frozen':>9s} {'IQR':>6s} "
           f"{'FLOP floor':>10s} {'× floor':>8s} {'saved for bwd':>14s}")
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        lines.append(f"{r['adapter_mode']:10s} {r['provider']:28s} {r['mode']:8s} {r['median_ms']:10.2f} "
                     f"{r['ratio_to_frozen']:9.3f} {r['ratio_iqr']:6.3f} {r['flop_floor']:10.3f} "
                     f"{r['ratio_to_floor']:8.3f} {r['saved_bytes'] / 2 ** 20:10.2f} MiB")
    return "\n".join(lines)


def targets(rows: List[dict]) -> List[str]:
    """Issue #4's CPU targets: fwd+bwd within 1.05× of the FLOP floor; saved bytes ≤ one activation + M·b·4."""
    out = []
    for r in rows:
        if not r["provider"].startswith("ours"):
            continue
        if r["mode"] == "fwd+bwd":
            ok = r["ratio_to_floor"] <= 1.05
            out.append(f"{r['adapter_mode']}: fwd+bwd {r['ratio_to_frozen']:.3f}× frozen = {r['ratio_to_floor']:.3f}× "
                       f"the FLOP floor {r['flop_floor']:.3f} (target ≤ 1.05) {'MET' if ok else 'MISSED'}")
        else:
            one = r["M"] * (r["N"] if r["adapter_mode"] == "sequential" else r["K"]) * 4
            lim = one + r["M"] * r["b"] * 4
            out.append(f"{r['adapter_mode']}: saved {r['saved_bytes']} B vs ≤ {lim} B (one activation + M·b·4) "
                       f"{'MET' if r['saved_bytes'] <= lim else 'MISSED'}")
    return out
