"""Runs the cases: every provider × mode, interleaved rounds, and one row of metrics per provider.

Row fields (CSV/JSON columns):
  op, shape, M, K, N, r, variant fields (p / adapters / placement), dtype, device, mode, provider;
  p20_ms, p50_ms, p80_ms   time per call (CPU: over rounds; CUDA: do_bench's quantiles);
  ratio_to_frozen, ratio_iqr   median over rounds of time / frozen nn.Linear's time in the same round;
  ratio_to_peft            the same against HF PEFT (when PEFT runs this case and mode);
  adapter_part_ms          median over rounds of (time - frozen time): the cost of the adapter itself;
  peft_part_over_ours      PEFT's adapter part / this provider's (for ours);
  flop_floor, ratio_to_floor   the op's modelled FLOPs over the frozen layer's, and the measured ratio over it;
  saved_bytes              activation bytes autograd keeps for backward (parameters excluded);
  launches, launched_ops   kernels per call (ATen/custom ops that do work + Triton launches), and which
                           (in order; as counts per op when there are more than 40);
  counted_bytes            bytes those ATen ops read+write (the eager graph's one-kernel-per-op traffic);
  model_flops, model_bytes_fused, model_bytes_unfused, traffic_ratio   the traffic model (traffic.py);
  tflops, gbps             model FLOPs and fused-model bytes over p50 (reported for our fused providers);
  max_abs_diff             max |output - reference output| (fwd; None where dropout makes them differ);
  skipped                  why a provider did not run (then no timing fields).
"""
from __future__ import annotations

import statistics
from typing import Callable, Dict, Iterable, List, Optional

import torch

from .cases import CONTROL, FROZEN, PEFT, Case
from .common import count_launches, interleaved, saved_activation_bytes, timed_call


def case_fields(case: Case) -> dict:
    s = case.shape
    return dict(op=case.op, shape=s.name, M=s.M, K=s.K, N=s.N, r=s.r, **case.variant,
                dtype=str(case.x.dtype).split(".")[-1], device=str(case.x.device))


def run_case(case: Case, modes: Iterable[str], rounds: int, warmup: int,
             progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    rows: List[dict] = []
    base = case_fields(case)
    all_params = [q for p in case.providers.values() for q in p.params]
    diffs = _output_diffs(case)
    saved = {}
    for name, p in case.providers.items():
        if any(q.requires_grad for q in p.params) or name in (FROZEN, CONTROL):
            saved[name] = saved_activation_bytes(p.fn, all_params + case.frozen_weights)
    for mode in modes:
        if progress:
            progress(f"{case.label} {mode}")
        calls = {}
        for name, p in case.providers.items():
            if mode not in p.modes:
                rows.append(dict(base, mode=mode, provider=name, skipped=p.why_not))
                continue
            calls[name] = timed_call(p.fn, mode, case.x, case.dy, p.params, no_grad_fwd=case.fwd_no_grad)
        launches = {n: count_launches(c) for n, c in calls.items()}
        res = interleaved(calls, FROZEN, rounds, warmup, case.x.device)
        cost, fcost = case.costs[mode], case.frozen_costs[mode]
        floor = cost.flops / fcost.flops
        frozen_t = res[FROZEN].times
        peft = res.get(PEFT)
        peft_part = statistics.median([t - f for t, f in zip(peft.times, frozen_t)]) if peft else None
        for name, r in res.items():
            part = statistics.median([t - f for t, f in zip(r.times, frozen_t)])
            p50 = r.percentile(0.5)
            row = dict(base, mode=mode, provider=name, p20_ms=r.percentile(0.2) * 1e3, p50_ms=p50 * 1e3,
                       p80_ms=r.percentile(0.8) * 1e3, ratio_to_frozen=r.ratio, ratio_iqr=r.ratio_iqr,
                       ratio_to_peft=(statistics.median([t / q for t, q in zip(r.times, peft.times)])
                                      if peft else None),
                       adapter_part_ms=part * 1e3,
                       peft_part_over_ours=(peft_part / part if peft_part is not None and name.startswith("ours")
                                            and part > 0 else None),
                       flop_floor=floor, ratio_to_floor=r.ratio / floor,
                       saved_bytes=saved.get(name) if mode != "bwd" else None,
                       launches=launches[name][0], launched_ops=summarize_ops(launches[name][1]),
                       counted_bytes=launches[name][2],
                       model_flops=cost.flops, model_bytes_fused=cost.fused_bytes,
                       model_bytes_unfused=cost.unfused_bytes, traffic_ratio=cost.traffic_ratio,
                       tflops=None, gbps=None, max_abs_diff=diffs.get(name) if mode == "fwd" else None,
                       rounds=rounds)
            if name.startswith("ours") and p50 > 0:
                row["tflops"] = cost.flops / p50 / 1e12
                row["gbps"] = cost.fused_bytes / p50 / 1e9
            rows.append(row)
    for name, why in case.skipped.items():
        rows.append(dict(base, mode="*", provider=name, skipped=why))
    return rows


def summarize_ops(ops: List[str], limit: int = 40) -> str:
    """The launched ops in order; past ``limit`` (a per-token loop, say) as counts per op name instead."""
    if len(ops) <= limit:
        return " ".join(ops)
    counts: Dict[str, int] = {}
    for o in ops:
        counts[o] = counts.get(o, 0) + 1
    return "counts: " + " ".join(f"{o}×{n}" for o, n in counts.items())


def _output_diffs(case: Case) -> Dict[str, float]:
    if case.compare_to is None or case.compare_to not in case.providers:
        return {}
    with torch.no_grad():
        ref = case.providers[case.compare_to].fn().float()
        out = {}
        for name, p in case.providers.items():
            if name in (FROZEN, CONTROL):
                continue
            out[name] = (p.fn().float() - ref).abs().max().item()
    return out
