"""LoRA linear benchmark: frozen nn.Linear vs HF PEFT LoRA vs the reference vs ours (per backend)."""
from __future__ import annotations

import json
import platform
from typing import Dict, List

import torch
import torch.nn as nn

from .. import dispatch
from ..nn import LoRALinear
from ..reference import lora_linear_ref
from .common import interleaved, saved_activation_bytes, timed_call

FROZEN = "nn.Linear (frozen)"
CONTROL = "nn.Linear (frozen, control)"


def _peft_layer(linear: nn.Linear, r: int, alpha: float, p: float):
    try:
        import peft
    except ImportError:
        return None, "peft not installed"
    holder = nn.Module()
    holder.fc = linear
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["fc"], init_lora_weights=False)
    pm = peft.get_peft_model(holder, cfg)
    return pm.base_model.model.fc, None


def build_providers(M, K, N, r, p, dtype, device, backends):
    torch.manual_seed(0)
    base = nn.Linear(K, N, device=device, dtype=dtype)
    base.requires_grad_(False)
    W, b = base.weight, base.bias  # one weight tensor shared by every provider

    def linear_sharing():
        lin = nn.Linear(K, N, device="meta")
        lin.weight, lin.bias = W, b
        lin.in_features, lin.out_features = K, N
        return lin

    mods: Dict[str, nn.Module] = {FROZEN: base, CONTROL: linear_sharing()}
    skipped: Dict[str, str] = {}
    peft_layer, why = _peft_layer(linear_sharing(), r, 2 * r, p)
    if peft_layer is None:
        skipped["PEFT LoRA"] = why
    else:
        mods["PEFT LoRA"] = peft_layer.to(device=device, dtype=dtype)
    A = (torch.randn(r, K, device=device, dtype=dtype) / K ** 0.5).requires_grad_()
    B = (torch.randn(N, r, device=device, dtype=dtype) / r ** 0.5).requires_grad_()

    class Ref(nn.Module):  # the spec as a naive user would write it: mask made and stored in forward
        def forward(self, x):
            m = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p) if p > 0 else None
            return lora_linear_ref(x, W, b, A, B, 2.0, m)

    mods["reference"] = Ref()
    for be in backends:
        why = dispatch.unavailable_reason(be, torch.device(device))
        if why:
            skipped[f"ours ({be})"] = why
            continue
        m = LoRALinear.from_linear(linear_sharing(), r=r, lora_alpha=2 * r, lora_dropout=p,
                                   init_lora_weights=False, backend=be)
        mods[f"ours ({be})"] = m
    for m in mods.values():
        m.train()
    return mods, skipped, [W, b, A, B]


def run(M=512, K=4096, N=4096, r=16, dtype=torch.float32, device="cpu", rounds=20, warmup=2,
        ps=(0.0, 0.1), modes=("fwd", "fwd+bwd"), backends=("torch", "triton"), out=print) -> List[dict]:
    device = torch.device(device)
    rows = []
    for p in ps:
        mods, skipped, shared = build_providers(M, K, N, r, p, dtype, device, backends)
        params = shared + [q for m in mods.values() for q in m.parameters()]
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, N, device=device, dtype=dtype)
        saved = {n: saved_activation_bytes(lambda m=m: m(x), params) for n, m in mods.items()}
        for mode in modes:
            calls = {n: timed_call(lambda m=m: m(x), mode, x, dy, m.parameters()) for n, m in mods.items()}
            res = interleaved(calls, FROZEN, rounds, warmup, device)
            for n, rsl in res.items():
                rows.append(dict(provider=n, mode=mode, p=p, M=M, K=K, N=N, r=r, dtype=str(dtype).split(".")[-1],
                                 device=str(device), median_ms=rsl.median_ms, ratio_to_frozen=rsl.ratio, ratio_iqr=rsl.ratio_iqr,
                                 saved_bytes=saved[n], rounds=rounds))
        for n, why in skipped.items():
            rows.append(dict(provider=n, p=p, skipped=why))
    return rows


def _x_bytes(row: dict) -> int:
    return row["M"] * row["K"] * {"float32": 4, "float16": 2, "bfloat16": 2}[row["dtype"]]


def format_table(rows: List[dict], M, K, r) -> str:
    x_bytes = None
    lines = []
    hdr = (f"{'provider':30s} {'mode':8s} {'p':>4s} {'median ms':>10s} {'× frozen':>9s} {'IQR':>6s} "
           f"{'saved for bwd':>14s}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for row in rows:
        if "skipped" in row:
            lines.append(f"{row['provider']:30s} p={row['p']}: skipped: {row['skipped']}")
            continue
        mib = row["saved_bytes"] / 2 ** 20
        lines.append(f"{row['provider']:30s} {row['mode']:8s} {row['p']:4.2f} {row['median_ms']:10.2f} "
                     f"{row['ratio_to_frozen']:9.3f} {row['ratio_iqr']:6.3f} {mib:11.2f} MiB")
        x_bytes = _x_bytes(row)
    if x_bytes:
        lines.append(f"(bytes(x) = {x_bytes / 2 ** 20:.2f} MiB; target for ours: ≤ bytes(x) + M·r·4 = "
                     f"{(x_bytes + M * r * 4) / 2 ** 20:.3f} MiB)")
    return "\n".join(lines)


def targets(rows: List[dict], M, r) -> List[str]:
    """The issue's CPU fp32 targets, checked against what was measured (a report, not a test)."""
    out = []
    for row in rows:
        if "skipped" in row or not row["provider"].startswith("ours"):
            continue
        lim = 1.02 if row["mode"] == "fwd" else 1.05
        ok = row["ratio_to_frozen"] <= lim
        out.append(f"{row['provider']} {row['mode']} p={row['p']}: {row['ratio_to_frozen']:.3f}× frozen "
                   f"(target ≤ {lim}) {'MET' if ok else 'MISSED'}")
        xb = _x_bytes(row)
        if row["mode"] == "fwd":
            okm = row["saved_bytes"] <= xb + M * r * 4
            out.append(f"{row['provider']} p={row['p']}: saved {row['saved_bytes']} B vs target ≤ "
                       f"{xb + M * r * 4} B {'MET' if okm else 'MISSED'}")
    return out


def environment() -> str:
    return (f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.machine()}, "
            f"{platform.processor() or platform.platform()}")


def to_json(rows, path):
    with open(path, "w") as f:
        json.dump({"environment": environment(), "rows": rows}, f, indent=1)
