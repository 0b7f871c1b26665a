"""The cases of ``python -m peft_kernels.gpucheck`` (and of ``tests/test_gpu.py``, which runs the same groups).

A *group* is one unit of work for one worker process: ``run_group(name, dry)`` returns a list of check
results (dicts). Groups are isolated so that a crash (an illegal address poisons a CUDA context) costs one
group, not the run. ``dry=True`` runs each group at tiny shapes on the CPU under the Triton interpreter
(the CPU cannot capture graphs, run streams or measure GPU memory; those checks then say so).

Every numeric check compares against an fp64 reference computed on the GPU from the same (rounded) inputs:
the error of ours must be at most ``mult`` × the error of plain PyTorch at the same precision on the same
inputs (max-abs over the tensor, no absolute floor).
"""
from __future__ import annotations

import contextlib
import math
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# shapes: Llama-3-8B at full scale, tiny in a dry run
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    dry: bool

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.dry else torch.device("cuda", torch.cuda.current_device())

    def qproj(self):  # (M, K, N)
        return (70, 48, 40) if self.dry else (4096, 4096, 4096)

    def tail(self):
        return (33, 45, 31) if self.dry else (4095, 4095, 4097)

    def decode(self):  # the fused decode path (M ≤ 64): aligned, and odd sizes at M = 1
        # The dry run's interpreter converts fp32 to bf16 by truncation, not to nearest: at M = 1 each dB element
        # is one product of two such conversions (S, then the output), a one-signed error of up to 4.3× torch's
        # rounding (45→31, r=16, p=0.1: the same in the fused and unfused kernels). A GPU rounds to nearest; the dry
        # run takes M = 3 there.
        return ((5, 48, 40), (3, 45, 31)) if self.dry else ((16, 4096, 4096), (1, 4095, 4097))

    def ranks(self):
        return (4, 20, 72) if self.dry else (16, 64, 200)

    def tail_ranks(self):
        return (7, 24)


# --------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------
def _err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    return (a.detach().double() - ref64.detach().double()).abs().max().item() if a.numel() else 0.0


def compare(case: str, got, ref64, same_prec, mult: float = 4.0) -> dict:
    """ok when max|got − ref64| ≤ mult · max|same_prec − ref64|. A same-precision error of exactly 0 (a
    tensor torch gets exactly) leaves a bound of 0: ours must be exact too."""
    if got is None or tuple(got.shape) != tuple(ref64.shape):
        return {"case": case, "ok": False, "err": None, "bound": None,
                "note": f"shape {None if got is None else tuple(got.shape)} != reference {tuple(ref64.shape)}"}
    if not torch.isfinite(got.detach().float()).all():
        return {"case": case, "ok": False, "err": None, "bound": None, "note": "non-finite values"}
    err = _err(got, ref64)
    base = _err(same_prec, ref64) if same_prec is not None else 0.0
    bound = mult * base
    scale = ref64.detach().abs().max().item() if ref64.numel() else 0.0
    return {"case": case, "ok": err <= bound, "err": err, "bound": bound,
            "note": f"torch same-precision error {base:.3g}, |ref| max {scale:.3g}, ratio "
                    f"{err / base if base else float('inf') if err else 0.0:.2f} (limit {mult:g})"}


def fact(case: str, ok: bool, note: str, err=None, bound=None) -> dict:
    return {"case": case, "ok": bool(ok), "err": err, "bound": bound, "note": note}


def skip(case: str, why: str) -> dict:
    """A check this machine cannot make (the CPU of a dry run has no graphs, streams or device memory)."""
    return dict(fact(case, True, f"skipped: {why}"), skipped=True)


def _no_host_sync(case: str, fn) -> dict:
    """Run ``fn`` once (compiles its kernels), then again under the host-sync spy: no sync may happen."""
    from ..testing import HostSyncSpy

    fn()
    with HostSyncSpy() as spy:
        fn()
    return fact(case, spy.calls == [], f"syncs: {spy.calls}")


def _capture(fn):
    """Warm ``fn`` up on a side stream (as CUDA-graph capture asks), then capture one call: (graph, output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _gen(dev, seed: int) -> torch.Generator:
    return torch.Generator(device=dev).manual_seed(seed)


def _randn(g, *shape, dev, scale=1.0):
    return torch.randn(*shape, generator=g, device=dev, dtype=torch.float64) * scale


def _leaf(t, grad=True):
    return t.detach().clone().requires_grad_(grad)


@contextlib.contextmanager
def fp32_setting(how: Optional[str]):
    """torch's fp32 matmul precision set one of four ways (None: leave it): "legacy-on"/"legacy-off" through
    ``allow_tf32``, "new-tf32"/"new-ieee" through ``fp32_precision``."""
    mm = torch.backends.cuda.matmul
    if how is None:
        yield
        return
    if how.startswith("legacy"):
        old = mm.allow_tf32
        mm.allow_tf32 = how == "legacy-on"
        try:
            yield
        finally:
            mm.allow_tf32 = old
    else:
        mm.fp32_precision = "tf32" if how == "new-tf32" else "ieee"
        try:
            yield
        finally:
            mm.fp32_precision = "none"


# --------------------------------------------------------------------------------------------
# LoRA (and its dropout)
# --------------------------------------------------------------------------------------------
def _lora_check(sc: Scale, tag: str, backend: str, dt, adt, M, K, N, r, p, tf32=None, mult=4.0,
                grad_mult=None) -> List[dict]:
    import peft_kernels as pk
    from ..ops import lora as LO
    from ..reference import lora_linear_ref

    dev = sc.device
    g = _gen(dev, 1000 + M + 7 * K + 13 * N + r)
    x64, W64 = _randn(g, M, K, dev=dev), _randn(g, N, K, dev=dev, scale=1 / math.sqrt(K))
    b64 = _randn(g, N, dev=dev)
    A64, B64 = _randn(g, r, K, dev=dev, scale=1 / math.sqrt(K)), _randn(g, N, r, dev=dev, scale=1 / math.sqrt(r))
    dy64 = _randn(g, M, N, dev=dev)
    x, W, b, dy = x64.to(dt), W64.to(dt), b64.to(dt), dy64.to(dt)
    A, B = A64.to(adt), B64.to(adt)
    s = 2.0
    out = []
    with fp32_setting(tf32):
        xg, Ag, Bg = _leaf(x), _leaf(A), _leaf(B)
        torch.manual_seed(4242)
        y = pk.lora_linear(xg, W, b, Ag, Bg, s, dropout_p=p, training=True, backend=backend)
        y.backward(dy)
        mask = None
        if p > 0:
            torch.manual_seed(4242)
            seed = LO._draw_seed(dev)
            mask = LO.dropout_mask(backend, seed, (M, K), p, dev)
        ins64 = [_leaf(v.double()) for v in (x, A, B)]
        ref = lora_linear_ref(ins64[0], W.double(), b.double(), ins64[1], ins64[2], s,
                              None if mask is None else mask.double())
        ref.backward(dy.double())
        insl = [_leaf(v) for v in (x, A, B)]
        lp = lora_linear_ref(insl[0], W, b, insl[1], insl[2], s, mask)
        lp.backward(dy)
    gm = grad_mult or mult
    out.append(compare(f"{tag} y", y, ref, lp, mult))
    for nm, got, r64, rl in (("dx", xg, ins64[0], insl[0]), ("dA", Ag, ins64[1], insl[1]), ("dB", Bg, ins64[2], insl[2])):
        out.append(compare(f"{tag} {nm}", got.grad, r64.grad, rl.grad, mult if nm == "dx" else gm))
    if p > 0:
        kept = (mask > 0).double().mean().item()
        sigma = math.sqrt(p * (1 - p) / mask.numel())
        out.append(fact(f"{tag} keep rate", abs(kept - (1 - p)) < 5 * sigma,
                        f"kept {kept:.5f}, expected {1 - p} ± {5 * sigma:.1e} (5σ)"))
        # S as the backend's own forward keeps it for backward: drop(x)·Aᵀ/(1-p) on Triton (its shrink applies the
        # scale), drop(x)·Aᵀ on torch (the scale rides in the alpha of the GEMMs that read S: ops.lora.shrink)
        smask = mask if backend == "triton" else (mask > 0).to(mask.dtype)
        with fp32_setting(tf32):
            fwd = LO._BACKENDS[backend][0]
            S = fwd(x, W, b, A, B, s, p, seed)[1]
            S64 = (x.double() * smask.double()) @ A.double().t()
            Slp = ((x * smask.to(dt)).to(adt) @ A.t())
        out.append(compare(f"{tag} S", S, S64, Slp, gm))
    return out


def _dtypes(dname: str):
    """(base dtype, adapter dtype) of a group's dtype name: "bf16", or "bf16+fp32" for fp32 adapters."""
    base, _, adt_name = dname.partition("+")
    return DTYPES[base], DTYPES[adt_name or base]


def _lora_group(backend: str, dname: str) -> Callable:
    def run(sc: Scale) -> List[dict]:
        dt, adt = _dtypes(dname)
        mixed = adt != dt
        # fp32 adapters on a half base: the fp32 gradients come from 3×TF32 dots (products ≤ 2⁻²² relative)
        gm = 8.0 if mixed and backend == "triton" else None
        out = []
        M, K, N = sc.qproj()
        for r in sc.ranks():
            for p in (0.0, 0.1):
                out += _lora_check(sc, f"qproj r={r} p={p}", backend, dt, adt, M, K, N, r, p, grad_mult=gm)
        M, K, N = sc.tail()
        for r in sc.tail_ranks():
            for p in (0.0, 0.1):
                out += _lora_check(sc, f"tail {M}x{K}->{N} r={r} p={p}", backend, dt, adt, M, K, N, r, p, grad_mult=gm)
        for M, K, N in sc.decode():  # rank 64 is the largest the fused decode path takes
            for r in (1, 16, 64):
                for p in (0.0, 0.1):
                    out += _lora_check(sc, f"decode {M}x{K}->{N} r={r} p={p}", backend, dt, adt, M, K, N, r, p,
                                       grad_mult=gm)
        if dt == torch.float32 and not sc.dry:  # TF32 on and off, through the legacy and the new API
            M, K, N = sc.qproj()
            for how in ("legacy-off", "legacy-on", "new-ieee", "new-tf32"):
                out += _lora_check(sc, f"fp32 {how} r=16", backend, dt, adt, M, K, N, 16, 0.0, tf32=how)
        return out
    return run


def _lora_tma(sc: Scale) -> List[dict]:
    """The LoRA op past the decode bucket through each base GEMM this machine has: the persistent TMA kernels
    (``_fwd_gemm_tma_kernel``/``_bwd_dx_tma_kernel``: an sm_90 GPU, and the dry run, whose interpreter runs
    the descriptors) and the cp.async ones (what ``PEFT_KERNELS_TMA=0`` and sm_80 run), bf16 and fp16, rank 1,
    16 and the largest rank (several rank tiles), with and without dropout, at the q_proj shape (each
    persistent program walks several output tiles). A fact checks that the kernels meant ran."""
    from ..kernels import _common as C
    from ..kernels import lora as KL

    M, K, N = sc.qproj()
    out = []
    for tma in (True, False):
        name = "tma" if tma else "cp.async"
        why = None if sc.dry or not tma else C.tma_unavailable_reason(sc.device)
        if why is not None:
            out.append(skip(f"{name} GEMMs", why))
            continue
        ran: List[str] = []
        kernels = (KL._fwd_gemm_tma_kernel, KL._bwd_dx_tma_kernel, KL._fwd_gemm_kernel, KL._bwd_dx_kernel)
        saved = {k: k.run for k in kernels}
        for k in kernels:
            k.run = lambda *a, _r=k.run, _n=k.__name__, **kw: ran.append(_n) or _r(*a, **kw)
        try:
            with C.tma_override(True if tma and sc.dry else (None if tma else False)):
                for dname in ("bf16", "fp16"):
                    for r in (1, 16, sc.ranks()[-1]):
                        for p in (0.0, 0.1):
                            out += _lora_check(sc, f"{name} {dname} r={r} p={p}", "triton", DTYPES[dname],
                                               DTYPES[dname], M, K, N, r, p)
        finally:
            for k, run in saved.items():
                k.run = run
        want = {"_fwd_gemm_tma_kernel", "_bwd_dx_tma_kernel"} if tma else {"_fwd_gemm_kernel", "_bwd_dx_kernel"}
        out.append(fact(f"{name} GEMMs ran", set(ran) == want, f"launched {sorted(set(ran))}, expected {sorted(want)}"))
    return out


def _lora_past_2g(sc: Scale) -> List[dict]:
    """M·N ≥ 2³¹ output elements (an lm_head with a 128k vocabulary at 16.4k tokens): the forward on the
    Triton kernels, then the first rows, the rows around the 2³¹ boundary and the last rows against fp64."""
    import peft_kernels as pk

    dev = sc.device
    M, K, N, r = (40, 32, 24, 8) if sc.dry else (16416, 4096, 131072, 16)
    g = _gen(dev, 7)
    x = torch.randn(M, K, generator=g, device=dev, dtype=torch.float32).to(torch.bfloat16)
    W = (torch.randn(N, K, generator=g, device=dev, dtype=torch.float32) / math.sqrt(K)).to(torch.bfloat16)
    A = (torch.randn(r, K, generator=g, device=dev, dtype=torch.float32) / math.sqrt(K)).to(torch.bfloat16)
    B = (torch.randn(N, r, generator=g, device=dev, dtype=torch.float32) / math.sqrt(r)).to(torch.bfloat16)
    with torch.no_grad():
        y = pk.lora_linear(x, W, None, A, B, 2.0, backend="triton")
    edge = (2 ** 31) // N
    rows = sorted({*range(0, 4), *range(max(0, edge - 2), min(M, edge + 2)), *range(M - 4, M)})
    idx = torch.tensor(rows, device=dev)
    xs = x[idx]
    ref = xs.double() @ W.double().t() + 2.0 * (xs.double() @ A.double().t()) @ B.double().t()
    lp = xs @ W.t() + 2.0 * ((xs @ A.t()) @ B.t())
    out = [compare(f"{M}x{K}->{N} ({M * N / 2 ** 31:.3f}·2³¹ outputs) rows {rows[0]}..{rows[-1]}", y[idx], ref, lp)]
    del y
    return out


# --------------------------------------------------------------------------------------------
# DoRA, IA3
# --------------------------------------------------------------------------------------------
def _dora_group(backend: str, dname: str) -> Callable:
    def run(sc: Scale) -> List[dict]:
        import peft_kernels as pk
        from ..reference import dora_linear_ref

        dt, dev, out = DTYPES[dname], sc.device, []
        for tag, (M, K, N), r in (("qproj", sc.qproj(), 16), ("tail", sc.tail(), 7)):
            g = _gen(dev, 11 + M + r)
            x, W, b = _randn(g, M, K, dev=dev).to(dt), _randn(g, N, K, dev=dev, scale=K ** -0.5).to(dt), \
                _randn(g, N, dev=dev).to(dt)
            A, B = _randn(g, r, K, dev=dev, scale=K ** -0.5).to(dt), _randn(g, N, r, dev=dev, scale=r ** -0.5).to(dt)
            m = (1.0 + 0.1 * _randn(g, N, dev=dev)).to(dt)
            dy = _randn(g, M, N, dev=dev).to(dt)
            xg, Ag, Bg, mg = (_leaf(v) for v in (x, A, B, m))
            y = pk.dora_linear(xg, W, b, Ag, Bg, 1.5, mg, backend=backend)
            y.backward(dy)
            r64 = [_leaf(v.double()) for v in (x, A, B, m)]
            ref = dora_linear_ref(r64[0], W.double(), b.double(), r64[1], r64[2], 1.5, r64[3])
            ref.backward(dy.double())
            rl = [_leaf(v) for v in (x, A, B, m)]
            lp = dora_linear_ref(rl[0], W, b, rl[1], rl[2], 1.5, rl[3])
            lp.backward(dy)
            out.append(compare(f"{tag} r={r} y", y, ref, lp))
            for nm, gt, a, c in zip(("dx", "dA", "dB", "dm"), (xg, Ag, Bg, mg), r64, rl):
                out.append(compare(f"{tag} r={r} {nm}", gt.grad, a.grad, c.grad))
        return out
    return run


def _ia3_group(backend: str, dname: str) -> Callable:
    def run(sc: Scale) -> List[dict]:
        import peft_kernels as pk
        from ..reference import ia3_linear_ref

        dt, dev, out = DTYPES[dname], sc.device, []
        for tag, (M, K, N) in (("qproj", sc.qproj()), ("tail", sc.tail())):
            for ff in (False, True):
                g = _gen(dev, 21 + M + ff)
                x, W, b = _randn(g, M, K, dev=dev).to(dt), _randn(g, N, K, dev=dev, scale=K ** -0.5).to(dt), \
                    _randn(g, N, dev=dev).to(dt)
                l = (1.0 + 0.2 * _randn(g, K if ff else N, dev=dev)).float()  # PEFT keeps ia3_l in fp32
                dy = _randn(g, M, N, dev=dev).to(dt)
                xg, lg = _leaf(x), _leaf(l)
                y = pk.ia3_linear(xg, W, b, lg, feedforward=ff, backend=backend)
                y.backward(dy)
                x64, l64 = _leaf(x.double()), _leaf(l.double())
                ref = ia3_linear_ref(x64, W.double(), b.double(), l64, ff)
                ref.backward(dy.double())
                xl, ll = _leaf(x), _leaf(l)
                lp = ia3_linear_ref(xl, W, b, ll, ff)
                lp.backward(dy)
                name = f"{tag} {'input' if ff else 'output'} scaling"
                out += [compare(f"{name} y", y, ref, lp), compare(f"{name} dx", xg.grad, x64.grad, xl.grad),
                        compare(f"{name} dl", lg.grad, l64.grad, ll.grad)]
        return out
    return run


# --------------------------------------------------------------------------------------------
# QLoRA: the GEMMs dequantizing a quantized W in their mainloop (no bitsandbytes needed: the operand is built
# here in bitsandbytes' NF4 layout, with and without double quantization, as int8 with a row scale, and as int8
# with per-group zero points)
# --------------------------------------------------------------------------------------------
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


QUANT_KINDS = ("nf4", "nf4-dq", "int8-row", "int8-zp")


def quant_operand(g, dev, N: int, K: int, kind: str):
    """A random ``QuantOperand`` [N, K] of ``kind`` (``QUANT_KINDS``: NF4 in blocks of 64, with its absmax fp32 or
    double-quantized as bitsandbytes stores it; int8 with a row scale; int8 with zero points in groups of 32), its
    values O(1/sqrt(K))."""
    from ..kernels.lora import QuantOperand

    ri = lambda lo, hi, n, dt: torch.randint(lo, hi, (n,), generator=g, device=dev, dtype=torch.int64).to(dt)  # noqa: E731
    if kind.startswith("nf4"):
        nb = -(-(N * K) // 64)
        packed, code = ri(0, 256, (N * K + 1) // 2, torch.uint8), torch.tensor(NF4, device=dev)
        if kind == "nf4":
            return QuantOperand(1, packed, (torch.rand(nb, generator=g, device=dev) + 0.5) * 2 / math.sqrt(K), 64, N, K,
                                code=code)
        code2 = torch.sort(torch.rand(256, generator=g, device=dev) * 2 - 1).values
        return QuantOperand(1, packed, ri(0, 256, nb, torch.uint8), 64, N, K, code=code, absmax_code=code2,
                            absmax2=torch.rand(-(-nb // 256), generator=g, device=dev) / math.sqrt(K),
                            absmax_offset=2.0 / math.sqrt(K), block2=256)
    if kind == "int8-row":
        return QuantOperand(2, ri(-127, 128, N * K, torch.int8), torch.rand(N, generator=g, device=dev) / (64 * math.sqrt(K)),
                            K, N, K, row_scale=True)
    nb = -(-(N * K) // 32)
    return QuantOperand(3, ri(-8, 8, N * K, torch.int8), torch.rand(nb, generator=g, device=dev) / (4 * math.sqrt(K)), 32,
                        N, K, zero=ri(-2, 3, nb, torch.int8))


def dequantize_operand(op) -> torch.Tensor:
    """The fp32 [N, K] weight a ``QuantOperand`` holds, by the kernels' formula written in torch."""
    e = torch.arange(op.N * op.K, device=op.data.device)
    blk = e // (op.K if op.row_scale else op.block)
    if op.wq == 1:
        byte = op.data[e // 2].to(torch.int64)
        v = op.code[torch.where(e % 2 == 0, byte >> 4, byte & 15)]
    elif op.wq == 2:
        v = op.data.float()
    else:
        v = (op.data.to(torch.int32) - op.zero[blk].to(torch.int32)).float()
    scale = op.scale[blk]
    if op.absmax_code is not None:  # double quantization: the absmax is a uint8 code
        scale = op.absmax_code[scale.long()] * op.absmax2[blk // op.block2] + op.absmax_offset
    return (v * scale).reshape(op.N, op.K)


class _Operand:
    """What ``ops.qlora`` asks of a quantized base on the Triton path: its kernel operand."""

    def __init__(self, op):
        self.op = op

    def kernel_operand(self):
        return self.op


def _qlora_check(sc: Scale, tag: str, dt, adt, kind: str, M, K, N, r, p) -> List[dict]:
    from ..ops import lora as LO
    from ..ops.qlora import QLoRACall, QLoRALinearFunction
    from ..reference import lora_linear_ref

    dev = sc.device
    g = _gen(dev, 77 + M + 3 * K + N + QUANT_KINDS.index(kind))
    op = quant_operand(g, dev, N, K, kind)
    W = dequantize_operand(op).to(dt)  # the reference's weight: dequantized to the compute dtype
    x, b, dy = _randn(g, M, K, dev=dev).to(dt), _randn(g, N, dev=dev).to(dt), _randn(g, M, N, dev=dev).to(dt)
    A, B = _randn(g, r, K, dev=dev, scale=K ** -0.5).to(adt), _randn(g, N, r, dev=dev, scale=r ** -0.5).to(adt)
    seed = LO._draw_seed(dev) if p > 0 else None
    xg, Ag, Bg = _leaf(x), _leaf(A), _leaf(B)
    y = QLoRALinearFunction.apply(xg, b, Ag, Bg, QLoRACall(_Operand(op), 2.0, p, seed, "triton"))
    y.backward(dy)
    mask = LO.dropout_mask("triton", seed, (M, K), p, dev) if p > 0 else None
    ins64 = [_leaf(v.double()) for v in (x, A, B)]
    ref = lora_linear_ref(ins64[0], W.double(), b.double(), ins64[1], ins64[2], 2.0,
                          None if mask is None else mask.double())
    ref.backward(dy.double())
    insl = [_leaf(v) for v in (x, A, B)]
    lp = lora_linear_ref(insl[0], W, b, insl[1], insl[2], 2.0, mask)
    lp.backward(dy)
    # The dry run's interpreter converts each dequantized fp32 W element to bf16 by truncation (one-signed, summed over
    # K or N: up to 4.7x torch's rounding at these sizes); a GPU rounds to nearest, and is held to 4x
    mult = 8.0 if sc.dry and dt == torch.bfloat16 else 4.0
    gm = 8.0 if adt != dt else mult
    out = [compare(f"{tag} y", y, ref, lp, mult)]
    for nm, got, r64, rl in (("dx", xg, ins64[0], insl[0]), ("dA", Ag, ins64[1], insl[1]), ("dB", Bg, ins64[2], insl[2])):
        out.append(compare(f"{tag} {nm}", got.grad, r64.grad, rl.grad, mult if nm == "dx" else gm))
    return out


def _qlora_group(dname: str) -> Callable:
    def run(sc: Scale) -> List[dict]:
        dt, adt = _dtypes(dname)
        out = []
        shapes = [("qproj", *sc.qproj()), ("tail", *sc.tail())] + [("decode", *d) for d in sc.decode()]
        for kind in QUANT_KINDS:
            for tag, M, K, N in shapes:
                for r, p in ((16, 0.0), (16, 0.1)):
                    out += _qlora_check(sc, f"{kind} {tag} {M}x{K}->{N} r={r} p={p}", dt, adt, kind, M, K, N, r, p)
        return out
    return run


# --------------------------------------------------------------------------------------------
# bottleneck adapters
# --------------------------------------------------------------------------------------------
def _adapter_params(g, dev, H_in, H_out, b, dt):
    return dict(down_w=_randn(g, b, H_in, dev=dev, scale=H_in ** -0.5).to(dt), down_b=_randn(g, b, dev=dev).to(dt),
                up_w=_randn(g, H_out, b, dev=dev, scale=b ** -0.5).to(dt), up_b=_randn(g, H_out, dev=dev).to(dt),
                scaling=(1.0 + 0.1 * _randn(g, H_out, dev=dev)).to(dt))


def _bottleneck_group(backend: str, dname: str) -> Callable:
    def run(sc: Scale) -> List[dict]:
        import peft_kernels as pk
        from ..reference import adapter_linear_ref, bottleneck_ref

        dt, dev, out = DTYPES[dname], sc.device, []
        # q_proj, and a decode step at bottleneck 16 (the split-K down projection and the dY launch's N split,
        # each summed by its last split to arrive)
        for (M, K, N), bsz, place in [(sc.qproj(), 16 if sc.dry else 64, p) for p in ("standalone", "sequential",
                                                                                      "parallel")] + \
                [(sc.decode()[0], 16, p) for p in ("decode standalone", "decode sequential", "decode parallel")]:
            tag, place = place, place.split()[-1]
            g = _gen(dev, 31 + len(tag))
            x = _randn(g, M, K, dev=dev).to(dt)
            W, bias = _randn(g, N, K, dev=dev, scale=K ** -0.5).to(dt), _randn(g, N, dev=dev).to(dt)
            H_in = N if place == "sequential" else K
            H_out = K if place == "standalone" else N
            prm = _adapter_params(g, dev, H_in, H_out, bsz, dt)
            dy = _randn(g, M, H_out, dev=dev).to(dt)
            names = ["x", "down_w", "down_b", "up_w", "up_b", "scaling"]

            def call(fn, vals):
                xv, dw, db, uw, ub, s = vals
                if place == "standalone":
                    return fn(xv, dw, db, uw, ub, s)
                return fn(xv, W if xv.dtype == dt else W.double(), bias if xv.dtype == dt else bias.double(),
                          dw, db, uw, ub, s)

            base_vals = [x] + [prm[n] for n in names[1:]]
            ours = [_leaf(v) for v in base_vals]
            if place == "standalone":
                y = pk.bottleneck_adapter(*ours, activation="gelu", backend=backend)
                ref_fn = lambda h, dw, db, uw, ub, s: h + bottleneck_ref(h, dw, db, uw, ub, "gelu", s)  # noqa: E731
            else:
                y = pk.adapter_linear(ours[0], W, bias, *ours[1:], activation="gelu", mode=place, backend=backend)
                ref_fn = lambda xv, Wv, bv, dw, db, uw, ub, s: adapter_linear_ref(  # noqa: E731
                    xv, Wv, bv, dw, db, uw, ub, "gelu", s, place)
            y.backward(dy)
            r64 = [_leaf(v.double()) for v in base_vals]
            ref = call(ref_fn, r64)
            ref.backward(dy.double())
            rl = [_leaf(v) for v in base_vals]
            lp = call(ref_fn, rl)
            lp.backward(dy)
            out.append(compare(f"{tag} y", y, ref, lp))
            for nm, gt, a, c in zip(names, ours, r64, rl):
                out.append(compare(f"{tag} d{nm}", gt.grad, a.grad, c.grad))
        return out
    return run


def _decode_adapter_determinism(sc: Scale, W, bias) -> List[dict]:
    """A decode step of the parallel adapter at bottleneck 16, forward and backward: the split-K down projection
    and the dY launch's N split are summed by their last split to arrive (arrival counters), so repeated runs
    must be bitwise identical, and so must two streams at once (each has its own counters)."""
    import peft_kernels as pk

    dev, dt = sc.device, W.dtype
    (M, _, _), (N, K) = sc.decode()[0], W.shape
    g = _gen(dev, 43)
    prm = _adapter_params(g, dev, K, N, 16, dt)
    params = [_leaf(prm[n]) for n in ("down_w", "down_b", "up_w", "up_b", "scaling")]
    xs = [_randn(g, M, K, dev=dev).to(dt) for _ in range(2)]
    dy = _randn(g, M, N, dev=dev).to(dt)

    def f(x):
        xl = _leaf(x)
        y = pk.adapter_linear(xl, W, bias, *params, activation="gelu", mode="parallel", backend="triton")
        return torch.cat([t.reshape(-1).float() for t in (y, *torch.autograd.grad(y, [xl, *params], dy))])

    first, ref2 = f(xs[0]), f(xs[1])
    runs = 5 if sc.dry else 50
    same = sum(int(torch.equal(f(xs[0]), first)) for _ in range(runs))
    out = [fact(f"parallel adapter at decode, {runs} forward+backward bitwise identical", same == runs,
                f"{same}/{runs} identical")]
    if dev.type != "cuda":
        return out + [skip("decode adapter on two streams at once", "no CUDA streams on the CPU (dry run)")]
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    ok = 0
    for _ in range(20):
        with torch.cuda.stream(s1):
            a = f(xs[0])
        with torch.cuda.stream(s2):
            b = f(xs[1])
        torch.cuda.synchronize()
        ok += int(torch.equal(a, first) and torch.equal(b, ref2))
    return out + [fact("decode adapter on two streams at once, bitwise equal to one stream", ok == 20, f"{ok}/20")]


def _bottleneck_determinism(sc: Scale) -> List[dict]:
    """The sequential adapter's forward reduces per-tile partials through an arrival counter (the last tile of
    a row block sums them in tile order): 50 runs must be bitwise identical, and two streams running it at
    once (each has its own counters) must each match their single-stream result bitwise."""
    import peft_kernels as pk

    dev, dt = sc.device, torch.bfloat16
    M, K, N = sc.qproj()
    g = _gen(dev, 41)
    W, bias = _randn(g, N, K, dev=dev, scale=K ** -0.5).to(dt), _randn(g, N, dev=dev).to(dt)
    prm = _adapter_params(g, dev, N, N, 16 if sc.dry else 64, dt)
    args = [prm[n] for n in ("down_w", "down_b", "up_w", "up_b", "scaling")]
    xs = [_randn(g, M, K, dev=dev).to(dt) for _ in range(2)]

    def f(x):
        return pk.adapter_linear(x, W, bias, *args, activation="silu", mode="sequential", backend="triton")

    out = _decode_adapter_determinism(sc, W, bias)
    with torch.no_grad():
        first = f(xs[0])
        runs = 5 if sc.dry else 50
        same = sum(int(torch.equal(f(xs[0]), first)) for _ in range(runs))
        out.append(fact(f"sequential adapter, {runs} forwards bitwise identical", same == runs,
                        f"{same}/{runs} identical"))
        ref2 = f(xs[1])
        if dev.type != "cuda":
            out.append(skip("two streams at once", "no CUDA streams on the CPU (dry run)"))
            return out
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
        torch.cuda.synchronize()
        ok1 = ok2 = 0
        rounds = 20
        for _ in range(rounds):
            with torch.cuda.stream(s1):
                y1 = f(xs[0])
            with torch.cuda.stream(s2):
                y2 = f(xs[1])
            torch.cuda.synchronize()
            ok1 += int(torch.equal(y1, first))
            ok2 += int(torch.equal(y2, ref2))
        out.append(fact("two streams at once, bitwise equal to one stream", ok1 == rounds and ok2 == rounds,
                        f"stream 1: {ok1}/{rounds}, stream 2: {ok2}/{rounds}"))
    return out


# --------------------------------------------------------------------------------------------
# multi-adapter
# --------------------------------------------------------------------------------------------
def _multi_inputs(sc: Scale, dt, adt, T, K, N, S, R, ranks, ids, seed):
    dev = sc.device
    g = _gen(dev, seed)
    x, W, b = _randn(g, T, K, dev=dev).to(dt), _randn(g, N, K, dev=dev, scale=K ** -0.5).to(dt), \
        _randn(g, N, dev=dev).to(dt)
    A = _randn(g, S, R, K, dev=dev, scale=K ** -0.5).to(adt)
    B = _randn(g, S, N, R, dev=dev, scale=R ** -0.5).to(adt)
    scal = (0.5 + _randn(g, S, dev=dev).abs()).float()
    dy = _randn(g, T, N, dev=dev).to(dt)
    return x, W, b, A, B, scal, torch.tensor(ranks, dtype=torch.int32, device=dev), ids.to(dev), dy


def _multi_check(sc, tag, backend, path, dt, ins, mult=4.0) -> List[dict]:
    import peft_kernels as pk
    from ..reference import multi_lora_linear_ref

    x, W, b, A, B, scal, ranks, ids, dy = ins
    xg, Ag, Bg = _leaf(x), _leaf(A), _leaf(B)
    y = pk.multi_lora_linear(xg, W, b, Ag, Bg, scal, ids, ranks=ranks, backend=backend, path=path)
    y.backward(dy)
    r64 = [_leaf(v.double()) for v in (x, A, B)]
    ref = multi_lora_linear_ref(r64[0], W.double(), b.double(), r64[1], r64[2], scal.double(), ids, ranks)
    ref.backward(dy.double())
    rl = [_leaf(v) for v in (x, A, B)]
    lp = multi_lora_linear_ref(rl[0], W, b, rl[1], rl[2], scal, ids, ranks)
    lp.backward(dy)
    out = [compare(f"{tag} {path} y", y, ref, lp, mult)]
    for nm, gt, a, c in zip(("dx", "dA", "dB"), (xg, Ag, Bg), r64, rl):
        out.append(compare(f"{tag} {path} {nm}", gt.grad, a.grad, c.grad, mult))
    base_rows = ids < 0
    out.append(fact(f"{tag} {path} id -1 rows are the base output bit for bit",
                    torch.equal(y.detach()[base_rows], torch.nn.functional.linear(x, W, b)[base_rows]),
                    f"{int(base_rows.sum())} rows"))
    return out


def _multi_group(backend: str, dname: str) -> Callable:
    def run(sc: Scale) -> List[dict]:
        dt, adt = _dtypes(dname)
        S, R = 8, 64
        ranks = [16, 64, 0, 7, 33, 64, 1, 24]  # slot 2 is empty (rank 0); the last slot is used
        T, K, N = (60, 40, 36) if sc.dry else (4096, 4096, 4096)
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(-1, S, (T,), generator=g)
        ids[:3] = torch.tensor([-1, 2, S - 1])
        ins = _multi_inputs(sc, dt, adt, T, K, N, S, R, ranks, ids, 51)
        out = []
        for path in ("bgmv", "sgmv"):
            out += _multi_check(sc, f"T={T} slots={S} R={R} (-1, rank-0, last slot)", backend, path, dt, ins,
                                mult=8.0 if adt != dt and backend == "triton" else 4.0)
        return out
    return run


def _multi_skew(backend: str) -> Callable:
    def run(sc: Scale) -> List[dict]:
        """1 adapter with 4000 tokens + 99 adapters with 1 token each: SGMV against BGMV (and the reference)."""
        import peft_kernels as pk

        dt = torch.bfloat16
        big, small = (40, 9) if sc.dry else (4000, 99)
        S, R = small + 1, 16
        T, K, N = big + small, *((32, 24) if sc.dry else (4096, 4096))
        ids = torch.cat([torch.zeros(big, dtype=torch.long), torch.arange(1, small + 1)])
        ids = ids[torch.randperm(T, generator=torch.Generator().manual_seed(3))]
        ins = _multi_inputs(sc, dt, dt, T, K, N, S, R, [R] * S, ids, 61)
        out = _multi_check(sc, f"skewed {big}+{small}x1", backend, "sgmv", dt, ins)
        out += _multi_check(sc, f"skewed {big}+{small}x1", backend, "bgmv", dt, ins)
        x, W, b, A, B, scal, ranks, ids_d, _ = ins
        with torch.no_grad():
            ys = pk.multi_lora_linear(x, W, b, A, B, scal, ids_d, ranks=ranks, backend=backend, path="sgmv")
            yb = pk.multi_lora_linear(x, W, b, A, B, scal, ids_d, ranks=ranks, backend=backend, path="bgmv")
        d = (ys.float() - yb.float()).abs().max().item()
        lim = 2 * torch.finfo(dt).eps * max(ys.float().abs().max().item(), 1.0)
        out.append(fact("skewed: SGMV and BGMV agree", d <= lim, f"max |SGMV − BGMV| = {d:.3g} (≤ {lim:.3g})", d, lim))
        return out
    return run


def _decode_model(sc: Scale, backend: str, dt):
    import peft_kernels as pk

    dev = sc.device
    H = 32 if sc.dry else 4096
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(H, H, bias=False), nn.SiLU(), nn.Linear(H, H)).to(dev, dt)
    for i in (0, 2):
        model[i] = pk.MultiLoRALinear.from_linear(model[i], max_adapters=8, max_rank=16, backend=backend)
        for slot, r in ((0, 16), (3, 8), (7, 4)):
            model[i].set_adapter(slot, torch.randn(r, H, device=dev, dtype=dt) / H ** 0.5,
                                 torch.randn(H, r, device=dev, dtype=dt) / r ** 0.5, 0.5 + slot)
    return model, H


def _multi_graph(backend: str) -> Callable:
    def run(sc: Scale) -> List[dict]:
        """A decode step of a model with two MultiLoRALinear layers, the mapping built once: no host sync in the
        layer calls, captured in a CUDA graph and replayed with new inputs; each replay equals eager."""
        import peft_kernels as pk

        dt = torch.float32 if sc.dry else torch.bfloat16
        model, H = _decode_model(sc, backend, dt)
        dev, T = sc.device, 16 if sc.dry else 64
        ids = torch.tensor([0, 3, -1, 7] * (T // 4), device=dev)
        mapping = pk.build_mapping(ids, T, 8, device=dev)  # the batch's one host sync, before capture
        static_x = torch.randn(T, H, device=dev, dtype=dt)
        out = []
        with torch.no_grad(), pk.adapter_ids(model, mapping):
            out.append(_no_host_sync("decode step: no host sync in the layer calls", lambda: model(static_x)))
            if dev.type != "cuda":
                out.append(skip("CUDA-graph capture and replay", "no CUDA graphs on the CPU (dry run)"))
                return out
            graph, static_y = _capture(lambda: model(static_x))
            ok = 0
            for _ in range(3):
                new = torch.randn(T, H, device=dev, dtype=dt)
                static_x.copy_(new)
                graph.replay()
                ok += int(torch.equal(static_y, model(new)))
            out.append(fact("CUDA-graph capture, 3 replays with new inputs equal eager bitwise", ok == 3,
                            f"{ok}/3 equal"))
        return out
    return run


def _dropout_graph(backend: str) -> Callable:
    def run(sc: Scale) -> List[dict]:
        """A LoRALinear with dropout in training, its forward captured in a CUDA graph: every replay draws a
        fresh seed on the device (different masks), and the seed never reaches the host."""
        import peft_kernels as pk

        dev = sc.device
        dt = torch.float32 if sc.dry else torch.bfloat16
        H, T = (32, 16) if sc.dry else (4096, 256)
        torch.manual_seed(0)
        layer = pk.LoRALinear(H, H, r=16, lora_alpha=16, lora_dropout=0.3, init_lora_weights=False,
                              backend=backend).to(dev, dt).train()
        x = torch.randn(T, H, device=dev, dtype=dt)
        out = []
        with torch.no_grad():
            if dev.type == "cpu" and backend == "torch":
                out.append(skip("dropout forward: no host sync", "on the CPU the C++ kernels take the seed's round "
                                "keys as host ints (on a GPU they are device tensors)"))
            else:
                out.append(_no_host_sync("dropout forward: no host sync", lambda: layer(x)))
            if dev.type != "cuda":
                out.append(skip("dropout under CUDA-graph replay", "no CUDA graphs on the CPU (dry run)"))
                return out
            graph, y = _capture(lambda: layer(x))
            reps = []
            for _ in range(3):
                graph.replay()
                reps.append(y.clone())
            distinct = len({tuple(r[0, :8].float().tolist()) for r in reps})
            out.append(fact("dropout under CUDA-graph replay: a fresh mask each replay", distinct == 3,
                            f"{distinct}/3 distinct outputs over 3 replays"))
        return out
    return run


def _dropout_hash(sc: Scale) -> List[dict]:
    """The torch backend's mask on the device: the one-launch Triton kernel (round keys derived in-kernel)
    against the torch-op definition (both on this device), bit for bit, across the 2^32 index word and for
    thresholds above 2^31."""
    from ..kernels import _common
    from ..ops import _torch_dropout as D

    out = []
    n = 3000 if sc.dry else 1 << 22
    for p, offset in ((0.1, 0), (0.75, 0), (0.1, 2 ** 32 - n // 2)):
        seed = D.draw_seed(sc.device)
        got = _common.hash_keep_mask(seed, D.threshold(p), n, offset, sc.device)
        want = D.keep_mask_ops(seed, n, p, sc.device, offset)
        same = torch.equal(got, want)
        out.append(fact(f"p={p} offset={offset}: Triton mask = torch-op mask", same,
                        f"{n} elements, {int((got != want).sum())} differ; kept {got.float().mean().item():.4f}"))
    return out


# --------------------------------------------------------------------------------------------
# the whole-model and modern-architecture ops (hash dropout, fused head loss, siblings, MoE experts)
# --------------------------------------------------------------------------------------------
def _hash_dropout_device(sc: Scale) -> List[dict]:
    """``hash_dropout`` on the device (the one-pass Triton mask times x) against the torch-op mask's definition,
    bit for bit, forward and backward, fp32 and bf16."""
    from ..ops import _torch_dropout as D
    from ..ops.hash_dropout import hash_dropout

    out = []
    n = (37, 129) if sc.dry else (2048, 4099)
    for dt in (torch.float32, torch.bfloat16):
        g = _gen(sc.device, 11)
        x = _randn(g, *n, dev=sc.device).to(dt).requires_grad_()
        torch.manual_seed(5)
        seed = D.draw_seed(sc.device)
        torch.manual_seed(5)
        y = hash_dropout(x, 0.3)
        keep = D.keep_mask_ops(seed, x.numel(), 0.3, sc.device).view(x.shape)
        fac = keep.to(torch.float32) * D.keep_scale(0.3)
        gy = torch.ones_like(y)
        (dx,) = torch.autograd.grad(y, x, gy)
        ok = torch.equal(y, (x * fac).to(dt)) and torch.equal(dx, (gy * fac).to(dt))
        out.append(fact(f"{dt}: forward and backward = x·mask by definition", ok,
                        f"{x.numel()} elements, kept {keep.float().mean().item():.4f}"))
    return out


def _linear_ce_group(dname: str) -> Callable:
    def run(sc: Scale) -> List[dict]:
        """The fused head loss (+ LoRA) against the fp64 unfused reference, loss and every gradient, within 4× the
        unfused computation at the same precision; and on a GPU its peak extra memory against the unfused one's."""
        from .. import reference as R
        from ..ops.linear_ce import linear_cross_entropy

        dt = DTYPES[dname]
        M, H, V, r = (40, 24, 97, 4) if sc.dry else (4096, 4096, 32000, 16)
        g = _gen(sc.device, 12)
        t = {"hidden": _randn(g, M, H, dev=sc.device), "weight": _randn(g, V, H, dev=sc.device, scale=H ** -0.5),
             "lora_A": _randn(g, r, H, dev=sc.device, scale=H ** -0.5), "lora_B": _randn(g, V, r, dev=sc.device,
                                                                                       scale=0.1)}
        labels = torch.randint(0, V, (M,), generator=g, device=sc.device)
        labels[::7] = -100
        names = list(t)

        def run_one(which, dtype):
            ts = {k: _leaf(v.to(dtype)) for k, v in t.items()}
            if which == "fused":
                loss = linear_cross_entropy(ts["hidden"], ts["weight"], labels, lora_A=ts["lora_A"],
                                            lora_B=ts["lora_B"], scaling=2.0, label_smoothing=0.1, chunk_size=M // 3)
            else:
                logits = R.lora_linear_ref(ts["hidden"], ts["weight"], None, ts["lora_A"], ts["lora_B"], 2.0)
                loss = R.linear_cross_entropy_ref(logits.float() if dtype != torch.float64 else logits,
                                                  torch.eye(V, device=sc.device, dtype=torch.float32 if dtype !=
                                                            torch.float64 else dtype), labels, label_smoothing=0.1)
            return loss, torch.autograd.grad(loss, [ts[k] for k in names])
        ref = run_one("ref", torch.float64)
        same = run_one("ref", dt)
        if not sc.dry:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            m0 = torch.cuda.memory_allocated()
        got = run_one("fused", dt)
        out = [compare(f"{dname} loss", got[0], ref[0], same[0])]
        out += [compare(f"{dname} d{k}", a, b, c) for k, a, b, c in zip(names, got[1], ref[1], same[1])]
        if not sc.dry:
            fused_peak = torch.cuda.max_memory_allocated() - m0
            logits = M * V * 4
            out.append(fact(f"{dname} peak extra memory below the fp32 logits' size", fused_peak < logits,
                            f"fused peak {fused_peak / 2 ** 20:.0f} MiB; M×V fp32 logits {logits / 2 ** 20:.0f} MiB"))
        return out
    return run


def _siblings_group(dname: str) -> Callable:
    def run(sc: Scale) -> List[dict]:
        """q/k/v as one ``lora_siblings`` op against each projection's fp64 reference (Llama-3-8B's q/k/v)."""
        from .. import reference as R
        from ..ops.siblings import lora_siblings

        dt = DTYPES[dname]
        M, K, widths, r = (33, 48, (40, 16, 16), 4) if sc.dry else (4096, 4096, (4096, 1024, 1024), 16)
        g = _gen(sc.device, 13)
        x = _randn(g, M, K, dev=sc.device)
        Ws = [_randn(g, n, K, dev=sc.device, scale=K ** -0.5) for n in widths]
        As = [_randn(g, r, K, dev=sc.device, scale=K ** -0.5) for _ in widths]
        Bs = [_randn(g, n, r, dev=sc.device, scale=0.1) for n in widths]
        gy = _randn(g, M, sum(widths), dev=sc.device)

        def run_one(fused, dtype):
            xx, a, b = _leaf(x.to(dtype)), [_leaf(v.to(dtype)) for v in As], [_leaf(v.to(dtype)) for v in Bs]
            if fused:
                y = lora_siblings(xx, torch.cat(Ws).to(dtype), None, a, b, [2.0] * 3)
            else:
                y = torch.cat([R.lora_linear_ref(xx, w.to(dtype), None, ai, bi, 2.0) for w, ai, bi in zip(Ws, a, b)],
                              -1)
            return [y] + list(torch.autograd.grad(y, [xx] + a + b, gy.to(dtype)))
        ref, same, got = run_one(False, torch.float64), run_one(False, dt), run_one(True, dt)
        names = ["y", "dx"] + [f"dA{i}" for i in range(3)] + [f"dB{i}" for i in range(3)]
        return [compare(f"{dname} {n}", a, b, c) for n, a, b, c in zip(names, got, ref, same)]
    return run


def _moe_group(be: str, dname: str) -> Callable:
    def run(sc: Scale) -> List[dict]:
        """The experts' grouped GEMMs + LoRA (``ops.moe``, backend ``be``) against the per-assignment fp64
        reference; one expert gets no token (its gradients must be exactly zero)."""
        import torch.nn.functional as F

        from .. import reference as R
        from ..ops.moe import moe_experts_forward

        dt = DTYPES[dname]
        T, H, I, E, k, r = (20, 16, 12, 5, 2, 3) if sc.dry else (256, 1024, 384, 16, 4, 16)
        g = _gen(sc.device, 14)
        idx = torch.stack([torch.randperm(E - 1, generator=g, device=sc.device)[:k] for _ in range(T)])
        t = {"h": _randn(g, T, H, dev=sc.device), "w": torch.rand(T, k, generator=g, device=sc.device,
                                                                 dtype=torch.float64),
             "Wgu": _randn(g, E, 2 * I, H, dev=sc.device, scale=H ** -0.5),
             "Wd": _randn(g, E, H, I, dev=sc.device, scale=I ** -0.5),
             "Agu": _randn(g, E, r, H, dev=sc.device, scale=H ** -0.5), "Bgu": _randn(g, E, 2 * I, r, dev=sc.device,
                                                                                     scale=0.1),
             "Ad": _randn(g, E, r, I, dev=sc.device, scale=I ** -0.5), "Bd": _randn(g, E, H, r, dev=sc.device,
                                                                                   scale=0.1)}
        gy = _randn(g, T, H, dev=sc.device)
        names = ["h", "Agu", "Bgu", "Ad", "Bd"]

        def run_one(fused, dtype):
            c = {n: _leaf(v.to(dtype), n in names) for n, v in t.items()}
            args = (c["h"], idx, c["w"], c["Wgu"], c["Wd"])
            if fused:
                y = moe_experts_forward(*args, act=F.silu, gate_up_lora=(c["Agu"], c["Bgu"], 0.5),
                                        down_lora=(c["Ad"], c["Bd"], 2.0), backend=be)
            else:
                y = R.moe_experts_ref(*args, F.silu, (c["Agu"], c["Bgu"], 0.5), (c["Ad"], c["Bd"], 2.0))
            return [y] + list(torch.autograd.grad(y, [c[n] for n in names], gy.to(dtype)))
        ref, same, got = run_one(False, torch.float64), run_one(False, dt), run_one(True, dt)
        out = [compare(f"{dname} {n}", a, b, c) for n, a, b, c in zip(["y"] + [f"d{n}" for n in names], got, ref,
                                                                         same)]
        idle = sum(int(torch.count_nonzero(gr[-1])) for gr in got[2:])
        out.append(fact(f"{dname} idle expert's gradients are zero", idle == 0, f"{idle} nonzero entries"))
        return out
    return run


# --------------------------------------------------------------------------------------------
# the group table
# --------------------------------------------------------------------------------------------
def _groups() -> Dict[str, Callable]:
    g: Dict[str, Callable] = {}
    for be in ("triton", "torch"):
        for d in ("fp32", "fp16", "bf16", "fp16+fp32", "bf16+fp32"):
            g[f"lora/{be}/{d}"] = _lora_group(be, d)
        for d in ("fp32", "fp16", "bf16"):
            g[f"dora/{be}/{d}"] = _dora_group(be, d)
            g[f"ia3/{be}/{d}"] = _ia3_group(be, d)
            g[f"bottleneck/{be}/{d}"] = _bottleneck_group(be, d)
        g[f"lora-dropout-graph/{be}"] = _dropout_graph(be)
    for be in ("triton", "cuda", "torch"):
        for d in ("fp32", "fp16", "bf16") + (("bf16+fp32",) if be != "cuda" else ()):
            g[f"multi/{be}/{d}"] = _multi_group(be, d)
        g[f"multi-skew/{be}"] = _multi_skew(be)
    for be in ("triton", "cuda"):
        g[f"multi-graph/{be}"] = _multi_graph(be)
    for d in ("fp16", "bf16", "fp32", "bf16+fp32"):
        g[f"qlora/triton/{d}"] = _qlora_group(d)
    g["lora-tma/triton"] = _lora_tma
    g["lora-past-2^31/triton"] = _lora_past_2g
    g["bottleneck-determinism/triton"] = _bottleneck_determinism
    g["dropout-hash/triton"] = _dropout_hash
    g["hash-dropout/torch"] = _hash_dropout_device
    for d in ("fp32", "bf16"):
        g[f"linear-ce/torch/{d}"] = _linear_ce_group(d)
        g[f"siblings/torch/{d}"] = _siblings_group(d)
        g[f"moe/torch/{d}"] = _moe_group("torch", d)
    for d in ("fp32", "fp16", "bf16"):
        g[f"moe/triton/{d}"] = _moe_group("triton", d)
    return g


def _selftest_fail(sc: Scale) -> List[dict]:
    """A planted 3% error: the comparison must fail it (``--selftest``)."""
    ref = torch.linspace(1.0, 2.0, 64, dtype=torch.float64)
    lp = ref.float()
    return [compare("planted 3% error", ref * 1.03, ref, lp), compare("exact copy", lp, ref, lp)]


def _selftest_crash(sc: Scale) -> List[dict]:
    """A worker that dies mid-group (``--selftest``): the orchestrator must report it and go on."""
    import os

    os._exit(3)


SELFTEST = {"selftest/fail": _selftest_fail, "selftest/crash": _selftest_crash}


GROUPS = _groups()


def correctness_groups() -> List[str]:
    return list(GROUPS)


def backend_of(group: str) -> str:
    return group.split("/")[1]


def unavailable(group: str, dry: bool) -> Optional[str]:
    """Why ``group`` cannot run here (None when it can): its backend's reason from dispatch."""
    from .. import dispatch

    if group in SELFTEST:
        return None
    dev = torch.device("cpu") if dry else torch.device("cuda")
    be = backend_of(group)
    if not dry and not torch.cuda.is_available():
        return "no CUDA GPU"
    return dispatch.unavailable_reason(be, dev)


def run_group(name: str, dry: bool) -> List[dict]:
    """Run one group; each check's exception becomes a failed check naming it (the group goes on)."""
    sc = Scale(dry)
    t0 = time.perf_counter()
    why = unavailable(name, dry)
    if why is not None:
        if dry:  # the CPU has no CUDA build: reported, not failed (on a GPU it is a failure)
            return [skip(f"{name}: backend available", f"in the dry run: {why}") | {"group": name}]
        return [fact(f"{name}: backend available", False, why) | {"group": name}]
    try:
        res = (SELFTEST.get(name) or GROUPS[name])(sc)
    except Exception as e:  # noqa: BLE001 - reported with its traceback, the run goes on
        tb = traceback.format_exc(limit=6)
        res = [fact("raised", False, f"{type(e).__name__}: {str(e)[:400]}\n{tb[-1500:]}")]
    for r in res:
        r["group"] = name
    if res:
        res[-1]["group_seconds"] = round(time.perf_counter() - t0, 2)
    return res
