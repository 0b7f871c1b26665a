"""The speed and memory part of gpu-check: medians of CUDA-event timings (wall clock in a dry run), bf16.

- ``linear``: frozen ``nn.Linear``, HF PEFT (its default fp32 adapters, and bf16 adapters), ours on each
  backend, interleaved round by round (``paired``; ratios are medians of per-round ratios); forward and
  forward+backward; prefill (M=4096) and decode (M=1, 16, 64); Llama-3-8B q_proj and
  MLP shapes; r=16, no dropout.
- ``gemm``: the Triton base GEMM alone (our fused GEMM kernels at rank 0: the cp.async one, and on sm_90 the
  persistent TMA one) against ``torch.mm``.
- ``memory``: the peak memory of one forward+backward at M=16384, K=4096, N=14336, r=64.
- ``dropout``: forward+backward of q_proj at prefill with ``lora_dropout=0.1`` against the same layer at
  0 (what the regenerated Philox mask costs), ours and PEFT.
- ``multi``: 32 adapters (r=16) on q_proj: our multi-adapter op on each backend against a per-adapter loop
  on cuBLAS (PEFT's mixed-batch forward: the base once, then gather, two matmuls and a scatter-add per
  adapter); all-distinct batches (prefill: 32 × 128 tokens; decode: 32 × 1) and a skewed one (one adapter
  with 3972 tokens, 31 with 4). The mapping (ours) and the per-adapter row indices (the loop) are built
  once per batch, outside the timing, as a server builds them once for every layer.
"""
from __future__ import annotations

import statistics
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import triton

SHAPES = {"q_proj": (4096, 4096), "mlp_up": (4096, 14336), "mlp_down": (14336, 4096)}  # (K, N)
TOKENS = (4096, 1, 16, 64)
# "auto" last: its first (warm-up) call in a bucket measures triton and torch, the timed calls run the winner
PROVIDERS = ("frozen", "peft", "peft-bf16", "triton", "torch", "auto")


def _timer(dev: torch.device, fn: Callable, reps: int, warmup: int) -> float:  # one provider alone (gemm, dropout)
    """Median seconds per call: CUDA events around each call on a GPU, perf_counter on the CPU (the
    measured dispatch's timers)."""
    from .. import dispatch

    timer = dispatch.cuda_timer if dev.type == "cuda" else dispatch.host_timer
    return timer(fn, dev, warmup=warmup, iters=reps) / 1e3


class _One(nn.Module):
    def __init__(self, K, N):
        super().__init__()
        self.proj = nn.Linear(K, N, bias=False)

    def forward(self, x):
        return self.proj(x)


def make_layer(provider: str, K: int, N: int, r: int, dev, dt, dropout: float = 0.0):
    """A module computing one LoRA'd linear (or the frozen base) for ``provider``, or a reason string."""
    import peft_kernels as pk

    torch.manual_seed(0)
    base = _One(K, N).to(dev, dt)
    base.requires_grad_(False)
    if provider == "frozen":
        return base
    if provider.startswith("peft"):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            return f"peft not importable: {e}"
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=dropout, init_lora_weights=False)
        return get_peft_model(base, cfg, autocast_adapter_dtype=provider == "peft")
    layer = pk.LoRALinear.from_linear(base.proj, r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                      init_lora_weights=False, backend=provider)
    return layer.train()


def paired(dev: torch.device, fns: Dict[str, Callable], reps: int, warmup: int) -> Dict[str, object]:
    """Interleaved timing: after ``warmup`` calls of each, ``reps`` rounds that time one call of every
    provider in turn (CUDA events on a GPU, the host clock on the CPU). Returns each provider's per-round
    seconds (a list), or the error string of a provider that failed. Interleaving puts every provider
    under the same clocks and host load round by round, so ratios are taken per round (paired)."""
    from .. import dispatch

    timer = dispatch.cuda_timer if dev.type == "cuda" else dispatch.host_timer
    out: Dict[str, object] = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            out[name] = []
        except Exception as e:  # noqa: BLE001 - a provider that fails is reported, the table goes on
            out[name] = f"{type(e).__name__}: {str(e)[:200]}"
    for _ in range(reps):
        for name, fn in fns.items():
            if isinstance(out[name], list):
                out[name].append(timer(fn, dev, name, warmup=0, iters=1) / 1e3)
    return out


def _median(v: List[float]) -> float:
    return statistics.median(v)


def paired_ratio(a: List[float], b: List[float]) -> float:
    """The median of per-round ratios a_i / b_i."""
    return _median([x / y for x, y in zip(a, b)])


def time_linear(dev, dt, shapes, tokens, providers, modes=("fwd", "fwd+bwd"), reps=20, warmup=3, r=16) -> List[dict]:
    """Every provider interleaved per (shape, M, mode) (``paired``): seconds = the median round, and
    vs_frozen / vs_peft / vs_best_ours = medians of per-round ratios."""
    rows = []
    for sname, (K, N) in shapes.items():
        layers = {p: make_layer(p, K, N, r, dev, dt) for p in providers}
        for M in tokens:
            x = torch.randn(M, K, device=dev, dtype=dt)
            for mode in modes:
                fns = {}
                for p in providers:
                    layer = layers[p]
                    if isinstance(layer, str):
                        continue
                    xg = x.detach().requires_grad_(mode != "fwd")

                    def fn(layer=layer, xg=xg):
                        if mode == "fwd":
                            with torch.no_grad():
                                return layer(xg)
                        y = layer(xg)
                        y.backward(torch.ones_like(y))
                        return y
                    fns[p] = fn
                res = paired(dev, fns, reps, warmup)
                ok = {p: v for p, v in res.items() if isinstance(v, list)}
                for p in providers:
                    row = {"shape": sname, "K": K, "N": N, "M": M, "mode": mode, "provider": p}
                    v = ok.get(p)
                    if v is None:
                        note = layers[p] if isinstance(layers[p], str) else res.get(p, "")
                        rows.append({**row, "seconds": None, "vs_frozen": None, "vs_peft": None, "note": note})
                        continue
                    row.update(seconds=_median(v), note="",
                               vs_frozen=paired_ratio(v, ok["frozen"]) if "frozen" in ok else None,
                               vs_peft=paired_ratio(v, ok["peft"]) if "peft" in ok else None)
                    if p == "auto" and ("triton" in ok or "torch" in ok):  # the measured dispatch vs our best
                        best = [min(ts) for ts in zip(*(ok[b] for b in ("triton", "torch") if b in ok))]
                        row["vs_best_ours"] = paired_ratio(v, best)
                    rows.append(row)
        del layers
    return rows


def base_gemm(x, w, tma: bool = False):
    """Our fused LoRA GEMM kernel with no low-rank term (rank 0): the Triton base GEMM alone; ``tma``: the
    persistent TMA kernel that sm_90 runs past the decode bucket (``lora.tma_gemm``), else the cp.async one."""
    from ..kernels import lora as L

    M, K = x.shape
    N = w.shape[0]
    cfg = L.configs(x.dtype, 16, L._aligned(x, w))
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    fl = L._flags(x, w)
    S = torch.empty((1, 1), dtype=torch.float32, device=x.device)  # never read at rank 0
    if tma:
        c = L._tma_config()
        progs = L._persistent_grid(triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n), x.device)
        L._fwd_gemm_tma_kernel[(progs,)](
            L._desc(x, (c.block_m, c.block_k)), L._desc(w, (c.block_n, c.block_k)), y, S, w, y, M, N, K, 0, 0, 0,
            y.stride(0), y.stride(1), 0.0, progs, HAS_BIAS=False, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
            BLOCK_K=c.block_k, BLOCK_R=cfg["gemm_block_r"], GROUP_M=8, num_warps=c.num_warps, num_stages=c.num_stages,
            **fl)
        return y
    c = cfg["gemm"]
    L._fwd_gemm_kernel[(triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n),)](
        x, w, y, S, w, y, M, N, K, 0, x.stride(0), x.stride(1), w.stride(0), w.stride(1), 0, 0, y.stride(0),
        y.stride(1), 0.0, HAS_BIAS=False, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        BLOCK_R=cfg["gemm_block_r"], GROUP_M=8, num_warps=c.num_warps, num_stages=c.num_stages, **fl)
    return y


def time_gemm(dev, dt, shapes, M, reps=20, warmup=3, force_tma: bool = False) -> List[dict]:
    """torch.mm, our cp.async GEMM and (where this device runs it, or ``force_tma`` in the dry run, in fp16 there)
    the persistent TMA GEMM, per shape; else the row says why not (``tma_note``)."""
    from ..kernels import _common as C
    from ..kernels import lora as L

    rows = []
    for sname, (K, N) in shapes.items():
        x = torch.randn(M, K, device=dev, dtype=dt)
        w = torch.randn(N, K, device=dev, dtype=dt)
        t_mm = _timer(dev, lambda: torch.mm(x, w.t()), reps, warmup)
        t_tr = _timer(dev, lambda: base_gemm(x, w), reps, warmup)
        err = (base_gemm(x, w).float() - torch.mm(x, w.t()).float()).abs().max().item()
        flops = 2.0 * M * K * N
        row = {"shape": sname, "M": M, "K": K, "N": N, "torch_mm_s": t_mm, "triton_s": t_tr,
               "triton_vs_mm": t_tr / t_mm, "triton_tflops": flops / t_tr / 1e12,
               "mm_tflops": flops / t_mm / 1e12, "max_abs_diff": err}
        with C.tma_override(True if force_tma else None):
            xt, wt = (x, w) if dt != torch.float32 else (x.half(), w.half())
            if L.tma_gemm(M, xt, wt):
                t_mm16 = t_mm if xt is x else _timer(dev, lambda: torch.mm(xt, wt.t()), reps, warmup)
                t_tma = _timer(dev, lambda: base_gemm(xt, wt, tma=True), reps, warmup)
                row.update(tma_s=t_tma, tma_vs_mm=t_tma / t_mm16, tma_tflops=flops / t_tma / 1e12,
                           tma_max_abs_diff=(base_gemm(xt, wt, tma=True).float()
                                             - torch.mm(xt, wt.t()).float()).abs().max().item())
            else:
                row["tma_note"] = C.tma_unavailable_reason(dev) or "operands not eligible (lora.tma_gemm)"
        rows.append(row)
    return rows


def peak_memory(dev, dt, M, K, N, r, providers) -> List[dict]:
    """Peak allocated bytes above the inputs and parameters during one forward+backward (CUDA only)."""
    rows = []
    for p in providers:
        layer = make_layer(p, K, N, r, dev, dt)
        if isinstance(layer, str):
            rows.append({"provider": p, "M": M, "K": K, "N": N, "r": r, "peak_bytes": None, "note": layer})
            continue
        x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        y = layer(x)
        y.backward(torch.ones_like(y))
        if dev.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
            rows.append({"provider": p, "M": M, "K": K, "N": N, "r": r, "peak_bytes": peak, "note": ""})
        else:
            rows.append({"provider": p, "M": M, "K": K, "N": N, "r": r, "peak_bytes": None,
                         "note": "no device memory statistics on the CPU (dry run)"})
        del layer, x, y
    return rows


def time_dropout(dev, dt, K, N, M, providers, p=0.1, reps=20, warmup=3, r=16) -> List[dict]:
    """Forward+backward with ``lora_dropout=p`` against the same provider at 0 (interleaved per provider)."""
    rows = []
    x = torch.randn(M, K, device=dev, dtype=dt)
    for prov in providers:
        ts = {}
        for q in (0.0, p):
            layer = make_layer(prov, K, N, r, dev, dt, dropout=q)
            if isinstance(layer, str):
                ts[q] = layer
                continue
            layer.train()
            xg = x.detach().requires_grad_(True)

            def fn(layer=layer, xg=xg):
                y = layer(xg)
                y.backward(torch.ones_like(y))
                return y
            try:
                ts[q] = _timer(dev, fn, reps, warmup)
            except Exception as e:  # noqa: BLE001
                ts[q] = f"{type(e).__name__}: {str(e)[:200]}"
            del layer
        ok = all(isinstance(v, float) for v in ts.values())
        rows.append({"provider": prov, "M": M, "K": K, "N": N, "p": p, "seconds_p0": ts[0.0] if ok else None,
                     "seconds": ts[p] if ok else None, "dropout_cost": ts[p] / ts[0.0] if ok else None,
                     "note": "" if ok else "; ".join(str(v) for v in ts.values() if not isinstance(v, float))})
    peft_t = next((r_["seconds"] for r_ in rows if r_["provider"] == "peft-bf16" and r_["seconds"]), None)
    for r_ in rows:
        r_["vs_peft_bf16"] = r_["seconds"] / peft_t if r_["seconds"] and peft_t else None
    return rows


def time_qlora(dev, dt, shapes, tokens, reps=20, warmup=3, r=16) -> List[dict]:
    """LoRA on an NF4 base (bitsandbytes' layout, built here: no bitsandbytes needed), forward and forward+backward,
    interleaved: ours (the Triton GEMMs dequantizing W in their mainloop), against the same LoRA on the dense weight
    already in ``dt`` (our torch path: cuBLAS with the LoRA expand as its C, the floor a dequantize-then-GEMM cannot
    beat), and PEFT's QLoRA layer on bitsandbytes' Linear4bit where bitsandbytes is importable."""
    from ..ops.qlora import QLoRACall, QLoRALinearFunction
    from .cases import _Operand, dequantize_operand, quant_operand

    import peft_kernels as pk

    rows = []
    g = torch.Generator(device=dev).manual_seed(5)
    for sname, (K, N) in shapes.items():
        op = quant_operand(g, dev, N, K, "nf4-dq")
        W = dequantize_operand(op).to(dt)
        A = (torch.randn(r, K, device=dev, dtype=dt) / K ** 0.5).requires_grad_()
        B = (torch.randn(N, r, device=dev, dtype=dt) / r ** 0.5).requires_grad_()
        fns_for = {"qlora-triton": lambda xg: QLoRALinearFunction.apply(xg, None, A, B,
                                                                       QLoRACall(_Operand(op), 2.0, 0.0, None, "triton")),
                   "dense-lora-torch": lambda xg: pk.lora_linear(xg, W, None, A, B, 2.0, backend="torch")}
        try:
            import bitsandbytes as bnb
            from peft import LoraConfig, get_peft_model

            q = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dt, quant_type="nf4", compress_statistics=True)
            q.load_state_dict({"weight": W.float().cpu()})
            holder = nn.Module()
            holder.proj = q.to(dev)
            pm = get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
            fns_for["peft-qlora-bnb"] = lambda xg: pm.base_model.model.proj(xg)
        except Exception as e:  # noqa: BLE001 - reported, the table goes on
            rows.append({"shape": sname, "K": K, "N": N, "provider": "peft-qlora-bnb", "M": None, "mode": "-",
                         "seconds": None, "vs_dense": None, "note": f"{type(e).__name__}: {str(e)[:160]}"})
        for M in tokens:
            x = torch.randn(M, K, device=dev, dtype=dt)
            for mode in ("fwd", "fwd+bwd"):
                fns = {}
                for name, f in fns_for.items():
                    def fn(f=f, mode=mode):
                        xg = x.detach().requires_grad_(mode != "fwd")
                        with torch.set_grad_enabled(mode != "fwd"):
                            y = f(xg)
                            if mode != "fwd":
                                y.backward(torch.ones_like(y))
                        return y
                    fns[name] = fn
                res = paired(dev, fns, reps, warmup)
                dense = res.get("dense-lora-torch")
                for name, v in res.items():
                    ok = isinstance(v, list)
                    rows.append({"shape": sname, "K": K, "N": N, "M": M, "mode": mode, "provider": name,
                                 "seconds": _median(v) if ok else None, "note": "" if ok else v,
                                 "vs_dense": paired_ratio(v, dense) if ok and isinstance(dense, list) else None})
    return rows


def _multi_batches(M: int, S: int, decode: int) -> Dict[str, torch.Tensor]:
    per = M // S
    distinct = torch.arange(S).repeat_interleave(per)
    small = 4
    skew = torch.cat([torch.zeros(M - small * (S - 1), dtype=torch.long), torch.arange(1, S).repeat_interleave(small)])
    return {f"distinct {S}x{per}": distinct, f"skewed {M - small * (S - 1)}+{S - 1}x{small}": skew,
            f"decode distinct {S}x1": torch.arange(S)[:decode]}


def time_multi(dev, dt, K, N, M, S, providers, r=16, reps=20, warmup=3) -> List[dict]:
    """Our multi-adapter op against a per-adapter loop on cuBLAS (see the module docstring)."""
    import peft_kernels as pk

    torch.manual_seed(0)
    W = torch.randn(N, K, device=dev, dtype=dt) * K ** -0.5
    A = (torch.randn(S, r, K, device=dev, dtype=dt) * K ** -0.5).requires_grad_(True)
    B = (torch.randn(S, N, r, device=dev, dtype=dt) * r ** -0.5).requires_grad_(True)
    scal = torch.full((S,), 2.0, device=dev)
    A_list = [A[s].detach().clone().requires_grad_(True) for s in range(S)]
    B_list = [B[s].detach().clone().requires_grad_(True) for s in range(S)]
    rows = []
    for bname, ids in _multi_batches(M, S, S).items():
        T = ids.numel()
        x = torch.randn(T, K, device=dev, dtype=dt)
        ids_d = ids.to(dev)
        idx = [(ids_d == s).nonzero().squeeze(1) for s in range(S)]
        idx = [(s, i) for s, i in enumerate(idx) if i.numel()]
        mapping = pk.build_mapping(ids_d, T, S, device=dev)
        for mode in ("fwd", "fwd+bwd"):
            fns = {}
            for prov in ("loop",) + tuple(providers):
                xg = x.detach().requires_grad_(mode != "fwd")
                if prov == "loop":
                    def call(xg=xg):
                        y = torch.nn.functional.linear(xg, W)
                        for s, i in idx:
                            sub = xg.index_select(0, i)
                            y = y.index_add(0, i, (sub @ A_list[s].t() @ B_list[s].t()) * 2.0)
                        return y
                else:
                    def call(xg=xg, prov=prov):
                        return pk.multi_lora_linear(xg, W, None, A, B, scal, mapping, backend=prov)

                def fn(call=call, mode=mode):
                    if mode == "fwd":
                        with torch.no_grad():
                            return call()
                    y = call()
                    y.backward(torch.ones_like(y))
                    return y
                fns[prov] = fn
            res = paired(dev, fns, reps, warmup)
            for prov, v in res.items():
                row = {"batch": bname, "T": T, "K": K, "N": N, "S": S, "r": r, "mode": mode, "provider": prov}
                if not isinstance(v, list):
                    rows.append({**row, "seconds": None, "vs_loop": None, "note": v})
                    continue
                lp = res.get("loop")
                rows.append({**row, "seconds": _median(v), "note": "",
                             "vs_loop": paired_ratio(v, lp) if isinstance(lp, list) else None})
    return rows


def run(dry: bool) -> Dict[str, list]:
    dev = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
    dt = torch.float32 if dry else torch.bfloat16
    if dry:
        shapes = {"q_proj": (48, 40), "mlp_up": (48, 72)}
        res = {"linear": time_linear(dev, dt, shapes, (24, 1), PROVIDERS, reps=2, warmup=1),
               "gemm": time_gemm(dev, dt, {"q_proj": (48, 40)}, 70, reps=2, warmup=1, force_tma=True),
               "memory": peak_memory(dev, dt, 24, 48, 40, 8, ("frozen", "peft", "triton", "torch")),
               "dropout": time_dropout(dev, dt, 48, 40, 24, ("peft-bf16", "triton", "torch"), reps=2, warmup=1),
               "multi": time_multi(dev, dt, 48, 40, 32, 4, ("triton", "torch", "auto"), reps=2, warmup=1),
               "qlora": time_qlora(dev, dt, {"q_proj": (64, 40)}, (24,), reps=2, warmup=1)}
    else:
        res = {"linear": time_linear(dev, dt, SHAPES, TOKENS, PROVIDERS),
               "gemm": time_gemm(dev, dt, SHAPES, 4096),
               "memory": peak_memory(dev, dt, 16384, 4096, 14336, 64, ("frozen", "peft", "triton", "torch")),
               "dropout": time_dropout(dev, dt, 4096, 4096, 4096, ("peft", "peft-bf16", "triton", "torch")),
               "multi": time_multi(dev, dt, 4096, 4096, 4096, 32, ("triton", "cuda", "torch", "auto")),
               "qlora": time_qlora(dev, dt, SHAPES, (16, 4096))}
    from .. import dispatch

    # what "auto" measured in this process: the timings behind each choice (the report's auto rows)
    res["tuner"] = [{"entry": k, **v} for k, v in dispatch.TUNER.choices().items()]
    return res
