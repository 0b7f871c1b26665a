"""``python -m peft_kernels.bench --op siblings``: q/k/v with LoRA as one sibling group against three separate
layers (ours, and HF PEFT's).

The shape: a Llama-3-8B attention block's q/k/v (hidden 4096, q 4096, k/v 1024 with GQA) at CPU scale (÷ 4: in
1024, q 1024, k/v 256), 64 and 1024 tokens, LoRA r = 16 on each, fp32, with and without dropout (0.05). Measured:
forward + backward time (paired medians over interleaved rounds) and the ATen/custom ops each one launches
(``common.OpCounter``: one kernel per op on CPU) and the bytes those ops move. Two floors run in the same rounds:
the frozen q/k/v alone (three GEMMs, and one stacked GEMM; forward and dX, no LoRA), what any implementation pays
for the base with this GEMM library, so fused / separate cannot go below floor / separate.

Multi-adapter (``inject_multi_lora(fuse_siblings=True)`` against the same layers unfused): 8 adapters in slots,
each token's adapter drawn at random, serving (forward, no grad) at the same shapes.
"""
from __future__ import annotations

import copy
import statistics
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .common import OpCounter
from .model import check_processes, fresh_result, paired, pool_ratio, ratio


class QKV(nn.Module):
    def __init__(self, K: int, widths):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(K, n) for n in widths)

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class StackedQKV(nn.Module):
    """The frozen base alone as one stacked GEMM (the floor of the fused op: its base GEMM, nothing else)."""

    def __init__(self, base: QKV):
        super().__init__()
        lins = (base.q_proj, base.k_proj, base.v_proj)
        self.widths = [lin.out_features for lin in lins]
        self.qkv = nn.Linear(lins[0].in_features, sum(self.widths))
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([lin.weight for lin in lins]))
            self.qkv.bias.copy_(torch.cat([lin.bias for lin in lins]))

    def forward(self, x):
        return self.qkv(x).split(self.widths, dim=-1)


def build(K: int = 1024, widths=(1024, 256, 256), r: int = 16, dropout: float = 0.0):
    import peft

    import peft_kernels as pk

    torch.manual_seed(0)
    base = QKV(K, widths)
    targets = ["q_proj", "k_proj", "v_proj"]
    out = {}
    for name, fuse in (("fused", True), ("ours separate", False)):
        m = copy.deepcopy(base)
        torch.manual_seed(1)
        pk.inject_lora(m, targets, r=r, lora_alpha=2 * r, lora_dropout=dropout, init_lora_weights=False,
                       fuse_siblings=fuse)
        out[name] = m.train()
    torch.manual_seed(1)
    out["PEFT separate"] = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets, init_lora_weights=False)).train()
    # floors: the frozen GEMMs alone (forward and dX), with no LoRA: what any implementation pays on this GEMM library
    for name, m in (("frozen base", copy.deepcopy(base)), ("frozen stacked", StackedQKV(base))):
        out[name] = m.train().requires_grad_(False)
    return out


def build_multi(K: int = 1024, widths=(1024, 256, 256), r: int = 16, slots: int = 8):
    import peft_kernels as pk

    torch.manual_seed(0)
    base = QKV(K, widths)
    out = {}
    for name, fuse in (("fused", True), ("separate", False)):
        m = copy.deepcopy(base)
        pk.inject_multi_lora(m, ["q_proj", "k_proj", "v_proj"], max_adapters=slots, max_rank=r, fuse_siblings=fuse)
        g = torch.Generator().manual_seed(1)
        for lay in (m.q_proj, m.k_proj, m.v_proj):
            for s in range(slots):
                lay.set_adapter(s, torch.randn(r, K, generator=g) / K ** 0.5, torch.randn(lay.out_features, r,
                                                                                          generator=g) * 0.1, 2.0)
        out[name] = m.eval()
    return out


def _serve(m, x, ids):
    def f() -> float:
        import time

        import peft_kernels as pk

        t = time.perf_counter()
        with torch.no_grad(), pk.adapter_ids(m, ids):
            m(x)
        return time.perf_counter() - t
    return f


def run_multi(tokens=(64, 1024), K: int = 1024, widths=(1024, 256, 256), r: int = 16, slots: int = 8,
              rounds: int = 9) -> dict:
    models = build_multi(K, widths, r, slots)
    res = {}
    for M in tokens:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(M, K, generator=g)
        ids = torch.randint(0, slots, (M,), generator=g)
        with torch.no_grad():
            import peft_kernels as pk

            outs = {}
            for k, m in models.items():
                with pk.adapter_ids(m, ids):
                    outs[k] = m(x)
            err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(outs["fused"], outs["separate"]))
        steps = {k: _serve(m, x, ids) for k, m in models.items()}
        t = paired(steps, rounds)
        case = {}
        for k, m in models.items():
            with OpCounter() as oc:
                steps[k]()
            case[k] = {"ms": 1e3 * statistics.median(t[k]), "launches": len(oc.ops), "MiB_moved": oc.bytes / 2 ** 20}
        case["fused/separate"] = ratio(t, "fused", "separate")
        case["fused/separate rounds"] = [a / b for a, b in zip(t["fused"], t["separate"])]
        case["max_rel_diff"] = err
        case["still fused"] = bool(models["fused"].q_proj._siblings.enabled)
        res[f"M={M}"] = case
    return res


def lora_flop_share(K: int, widths, r: int) -> float:
    """The LoRA GEMMs' FLOPs over the frozen GEMMs' in one forward + backward of q/k/v (any M): shrink
    (M·K·R, R = r per member), expand (M·r·N), dS (M·N·r), dX's dS·A term (M·R·K), dA (R·M·K), dB (N·M·r), against
    x·Wᵀ and dY·W (2·M·K·N). A fusion that keeps the LoRA math keeps these FLOPs."""
    N, R = sum(widths), r * len(widths)
    return (3 * K * R + 3 * N * r) / (2 * K * N)


def _step(m, x, gys):
    def f() -> float:
        import time

        t = time.perf_counter()
        xx = x.detach().requires_grad_()
        ys = m(xx)
        torch.autograd.backward(ys, gys)
        for p in m.parameters():
            p.grad = None
        return time.perf_counter() - t
    return f


def run(tokens=(64, 1024), K: int = 1024, widths=(1024, 256, 256), r: int = 16, rounds: int = 9,
        quick: bool = False) -> dict:
    if quick:
        tokens, K, widths, rounds = (16, 64), 128, (128, 32, 32), 3
    res: dict = {"tokens": list(tokens), "K": K, "widths": list(widths), "r": r, "rounds": rounds, "cases": {}}
    for M, dropout in ((M, d) for M in tokens for d in (0.0, 0.05)):
        g = torch.Generator().manual_seed(2)
        x = torch.randn(M, K, generator=g)
        gys = [torch.randn(M, n, generator=g) for n in widths]
        models = build(K, widths, r, dropout)
        steps = {k: _step(m, x, gys) for k, m in models.items()}
        t = paired(steps, rounds)
        case: Dict[str, dict] = {}
        for k, m in models.items():
            with OpCounter() as oc:
                steps[k]()
            case[k] = {"ms": 1e3 * statistics.median(t[k]), "launches": len(oc.ops), "MiB_moved": oc.bytes / 2 ** 20,
                       "vs separate": ratio(t, k, "ours separate"), "vs PEFT": ratio(t, k, "PEFT separate"),
                       "vs separate rounds": [a / b for a, b in zip(t[k], t["ours separate"])],
                       "vs PEFT rounds": [a / b for a, b in zip(t[k], t["PEFT separate"])]}
        group = models["fused"].q_proj._siblings
        case["fused"]["still fused"] = bool(group.enabled)
        case["floor"] = min(case["frozen base"]["vs separate"], case["frozen stacked"]["vs separate"])
        # the floor plus the LoRA FLOPs at the frozen GEMMs' rate (the big GEMMs run fastest per FLOP): what any
        # fusion of the same math takes at least, with this GEMM library
        case["bound"] = case["floor"] * (1 + lora_flop_share(K, widths, r))
        res["cases"][f"M={M}, dropout {dropout}"] = case
    res["multi"] = run_multi(tokens, K, widths, r, rounds=rounds) if not quick else \
        run_multi(tokens, K, widths, r, slots=4, rounds=rounds)
    return res


def pool(results: List[dict]) -> dict:
    """One result from ``run`` repeated in several fresh processes (``--processes``): each ratio the median over
    every round of every process (the spread between processes, several percent here, is larger than within one),
    each process's median kept beside it; times the median over processes; launches and bytes as measured (the
    same in every process)."""
    if not results:
        raise ValueError("pool: no results")
    res = {k: v for k, v in results[0].items() if k not in ("cases", "multi")}
    res["processes"], res["cases"], res["multi"] = len(results), {}, {}
    for ck, case0 in results[0]["cases"].items():
        case: dict = {}
        for k, v0 in case0.items():
            if not isinstance(v0, dict):
                continue
            parts = [r["cases"][ck][k] for r in results]
            v = {"ms": statistics.median(p["ms"] for p in parts), "launches": v0["launches"],
                 "MiB_moved": v0["MiB_moved"]}
            for key in ("vs separate", "vs PEFT"):
                pool_ratio(v, parts, key)
            if "still fused" in v0:
                v["still fused"] = all(p["still fused"] for p in parts)
            case[k] = v
        case["floor"] = min(case["frozen base"]["vs separate"], case["frozen stacked"]["vs separate"])
        case["bound"] = case["floor"] * (1 + lora_flop_share(res["K"], res["widths"], res["r"]))
        res["cases"][ck] = case
    for mk, c0 in results[0].get("multi", {}).items():
        parts = [r["multi"][mk] for r in results]
        c = {k: v for k, v in c0.items() if k not in ("fused/separate", "fused/separate rounds")}
        c["max_rel_diff"] = max(p["max_rel_diff"] for p in parts)
        c["still fused"] = all(p["still fused"] for p in parts)
        pool_ratio(c, parts, "fused/separate")
        res["multi"][mk] = c
    return res


def run_in_processes(processes: int, rounds: int, quick: bool = False) -> dict:
    """``run`` in ``processes`` fresh Python processes, pooled (``pool``)."""
    code = ("import json\nfrom peft_kernels.bench import siblings as sb\n"
            f"print('RESULT ' + json.dumps(sb.run(rounds={rounds}, quick={quick})))\n")
    return pool([fresh_result(code, "bench siblings: a process") for _ in range(processes)])


def _per_process(v: dict, key: str) -> str:
    per = v.get(key + " per process") or []
    return f" ({', '.join(f'{x:.3f}' for x in per)})" if len(per) > 1 else ""


def format_report(res: dict) -> str:
    w = res["widths"]
    lines = [f"q/k/v with LoRA r={res['r']}: in {res['K']}, outputs {w[0]}/{w[1]}/{w[2]}, fp32, forward + backward; "
             f"paired medians over {res['rounds']} rounds"
             + (f" in each of {res['processes']} fresh processes, pooled (each process's ratio in brackets)"
                if res.get("processes", 1) > 1 else ""), "",
             "| case | provider | ms | / ours separate | / PEFT separate | launches | MiB moved |",
             "|---|---|---|---|---|---|---|"]
    for dk, case in res["cases"].items():
        for k, v in ((k, v) for k, v in case.items() if isinstance(v, dict)):
            lines.append(f"| {dk} | {k} | {v['ms']:.1f} | {v['vs separate']:.3f}×{_per_process(v, 'vs separate')} | "
                         f"{v['vs PEFT']:.3f}× | "
                         f"{v['launches']} | {v['MiB_moved']:.1f} |")
    if res.get("multi"):
        lines += ["", "Multi-adapter q/k/v (8 adapters in slots, random ids per token), serving (forward, no grad):", "",
                  "| case | fused ms | separate ms | fused / separate | launches fused / separate | max rel diff |",
                  "|---|---|---|---|---|---|"]
        for dk, c in res["multi"].items():
            lines.append(f"| {dk} | {c['fused']['ms']:.2f} | {c['separate']['ms']:.2f} | {c['fused/separate']:.3f}×"
                         f"{_per_process(c, 'fused/separate')} | "
                         f"{c['fused']['launches']} / {c['separate']['launches']} | {c['max_rel_diff']:.1e} |")
    return "\n".join(lines)


def targets(res: dict):
    out = []
    for dk, case in res["cases"].items():
        v = case["fused"]["vs separate"]
        out.append(f"#19 fused q/k/v, {dk}: {v:.3f}×{_per_process(case['fused'], 'vs separate')} three separate "
                   "LoRALinears (target ≤ 0.9: "
                   f"{'met' if v <= 0.9 else 'MISSED'}); launches {case['fused']['launches']} vs "
                   f"{case['ours separate']['launches']}; the frozen GEMMs alone (no LoRA) take "
                   f"{case['floor']:.3f}×, and with the LoRA FLOPs at their rate {case['bound']:.3f}× (the lower "
                   f"bound of any fusion of the same math on this GEMM library"
                   f"{': the target is below it' if case['bound'] > 0.9 else ''})")
    for dk, c in res.get("multi", {}).items():
        out.append(f"#19 multi-adapter fused q/k/v serving, {dk}: {c['fused/separate']:.3f}× the separate layers "
                   f"(launches {c['fused']['launches']} vs {c['separate']['launches']}; group still fused: "
                   f"{c['still fused']})")
    return out


def main(rounds: Optional[int], quick: bool, out: Optional[str], processes: int = 1) -> int:
    check_processes(processes)
    res = run(rounds=rounds or 9, quick=quick) if processes == 1 else run_in_processes(processes, rounds or 9, quick)
    from .report import print_and_write

    return print_and_write(res, format_report(res), targets(res), out, 'siblings.json')
