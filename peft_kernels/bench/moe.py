"""``python -m peft_kernels.bench --op moe``: LoRA on MoE expert weights, ours (``LoRAExperts``) against HF PEFT's
``target_parameters`` LoRA (which adds ``s·B·A`` to the whole expert stack with a ``baddbmm`` on every forward).

PEFT published its case on an H100: 128 experts, hidden 2048, r = 16, 4096 tokens (forward + backward 4.97 →
2.56 ms after its baddbmm change). Here at CPU scale: 128 experts, hidden 512, expert intermediate 192 (Qwen3-MoE's
ratio), top-8 routing, 1024 tokens, r = 16, fp32; one Qwen3-MoE experts module (both ``gate_up_proj`` and
``down_proj`` adapted; transformers' ``grouped_mm`` experts implementation under PEFT, its default for a model),
forward + backward, paired medians over interleaved rounds; the frozen experts alone for scale.

Also a roofline model of the same call on an H200 at the published shape (bf16): each step's FLOPs and bytes,
timed as ``max(FLOPs / peak, bytes / bandwidth)`` and summed; the GEMMs every provider runs on the routed tokens
count the same on both sides. A model, not a measurement.
"""
from __future__ import annotations

import copy
import statistics
from typing import Optional

import torch

from .model import paired, ratio

TP = ["experts.gate_up_proj", "experts.down_proj"]


def _experts(E, H, I, k):
    import transformers

    cfg = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      vocab_size=100, intermediate_size=4 * H)
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg._experts_implementation = "grouped_mm"  # what a model transformers builds uses (its eager loop: 30× slower here)
    torch.manual_seed(0)
    ex = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, H ** -0.5)
        ex.down_proj.normal_(0, I ** -0.5)
    return ex


def build(E=128, H=512, I=192, k=8, r=16):
    import peft
    import torch.nn as nn

    import peft_kernels as pk

    holder = nn.Module()
    holder.experts = _experts(E, H, I, k)
    frozen = copy.deepcopy(holder)
    ours = copy.deepcopy(holder)
    torch.manual_seed(1)
    pk.inject_lora(ours, [], target_parameters=TP, r=r, lora_alpha=2 * r, init_lora_weights=False)
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(holder), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=[],
                                                                    target_parameters=TP, init_lora_weights=False))
    return {"ours": ours.experts, "PEFT": pm.base_model.model.experts, "frozen experts": frozen.experts}


def _step(mod, h, idx, w, gy, train_base: bool = False):
    def f() -> float:
        import time

        t = time.perf_counter()
        x = h.detach().requires_grad_()
        y = mod(x, idx, w)
        y.backward(gy)
        for p in mod.parameters():
            p.grad = None
        return time.perf_counter() - t
    return f


def gpu_model(E=128, H=2048, I=768, k=8, T=4096, r=16, bw=4.8e12, peak=989e12, elt=2) -> dict:
    """Modelled forward + backward milliseconds on an H200 (bf16) of the experts with LoRA: the frozen grouped GEMMs
    both providers run on the routed tokens, plus what each one's LoRA adds."""
    def t(flops, bytes_):
        return max(flops / peak, bytes_ / bw)
    A = T * k  # routed assignments
    shapes = [(2 * I, H), (H, I)]  # (out, in) of gate_up_proj and down_proj
    peft = ours = base = 0.0
    for out, inn in shapes:
        stack = E * out * inn
        # both: the frozen grouped GEMM forward and its dx GEMM backward over the routed tokens
        base += 2 * t(2 * A * out * inn, elt * (A * (out + inn) + stack))
        # PEFT: W' = W + s·B·A (baddbmm over the stack), the experts read W' instead of W; backward: the grouped GEMM
        # writes dW' (the stack), then dA = Bᵀ·dW', dB = dW'·Aᵀ (bmm over the stack)
        peft += t(2 * stack * r, elt * (2 * stack + E * r * (out + inn)))          # baddbmm forward
        peft += t(2 * A * out * inn, elt * (A * (out + inn) + stack))              # dW' grouped GEMM (extra)
        peft += 2 * t(2 * stack * r, elt * (stack + E * r * (out + inn)))          # dA, dB from dW'
        # ours: per routed token, shrink and expand forward; dS, dx-part, dA, dB backward
        ours += t(2 * A * r * (inn + out), elt * (A * (inn + out + 2 * r) + E * r * (inn + out)))
        ours += t(6 * A * r * (inn + out), elt * (2 * A * (inn + out + 2 * r) + 2 * E * r * (inn + out)))
    return {"shape": dict(E=E, H=H, I=I, k=k, T=T, r=r), "base_ms": 1e3 * base, "peft_ms": 1e3 * (base + peft),
            "ours_ms": 1e3 * (base + ours), "ours/peft": (base + ours) / (base + peft),
            "lora_part_ours/peft": ours / peft}


def run(E=128, H=512, I=192, k=8, T=1024, r=16, rounds: int = 7, quick: bool = False) -> dict:
    if quick:
        E, H, I, k, T, rounds = 8, 32, 16, 2, 64, 3
    mods = build(E, H, I, k, r)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    w, idx = torch.topk(logits.softmax(-1), k, dim=-1)
    gy = torch.randn(T, H, generator=g)
    with torch.no_grad():  # the same function on both sides before timing it
        a, b = mods["ours"](h, idx, w), mods["PEFT"](h, idx, w)
        err = ((a - b).abs().max() / b.abs().max()).item()
    steps = {k_: _step(m, h, idx, w, gy) for k_, m in mods.items()}
    times = paired(steps, rounds)
    return {"shape": dict(E=E, H=H, I=I, k=k, T=T, r=r), "rounds": rounds, "max_rel_diff": err,
            "ours/PEFT": ratio(times, "ours", "PEFT"), "frozen/PEFT": ratio(times, "frozen experts", "PEFT"),
            "ms": {k_: 1e3 * statistics.median(v) for k_, v in times.items()}, "gpu_model": gpu_model()}


def format_report(res: dict) -> str:
    s, ms, gm = res["shape"], res["ms"], res["gpu_model"]
    return "\n".join([
        f"LoRA on MoE experts (gate_up_proj + down_proj), {s['E']} experts, hidden {s['H']}, intermediate {s['I']}, "
        f"top-{s['k']}, {s['T']} tokens, r={s['r']}, fp32, forward + backward; paired medians over {res['rounds']} "
        f"rounds (outputs agree to {res['max_rel_diff']:.1e} relative)", "",
        "| provider | ms | / PEFT |", "|---|---|---|",
        f"| ours (LoRAExperts) | {ms['ours']:.1f} | {res['ours/PEFT']:.3f}× |",
        f"| PEFT target_parameters | {ms['PEFT']:.1f} | 1.000× |",
        f"| frozen experts, no LoRA | {ms['frozen experts']:.1f} | {res['frozen/PEFT']:.3f}× |", "",
        f"H200 roofline model, PEFT's published shape ({gm['shape']}), bf16, forward + backward of the experts with "
        f"LoRA: ours {gm['ours_ms']:.3f} ms, PEFT {gm['peft_ms']:.3f} ms: {gm['ours/peft']:.3f}× (the frozen GEMMs "
        f"alone {gm['base_ms']:.3f} ms; the LoRA parts alone {gm['lora_part_ours/peft']:.3f}×)"])


def targets(res: dict):
    v, m = res["ours/PEFT"], res["gpu_model"]["ours/peft"]
    return [f"#19 MoE LoRA forward+backward on CPU: {v:.3f}× PEFT (target ≤ 0.7: {'met' if v <= 0.7 else 'MISSED'})",
            f"#19 MoE LoRA modelled H200 time: {m:.3f}× PEFT's baddbmm path (target ≤ 0.7: "
            f"{'met' if m <= 0.7 else 'MISSED'}; a model)"]


def main(rounds: Optional[int], quick: bool, out: Optional[str]) -> int:
    from .report import print_and_write

    res = run(rounds=rounds or 7, quick=quick)
    return print_and_write(res, format_report(res), targets(res), out, "moe.json")
