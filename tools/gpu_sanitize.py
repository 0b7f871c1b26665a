"""Every compiled GPU kernel once, at small odd shapes, for ``compute-sanitizer`` (memcheck, racecheck).

Run on a CUDA machine after ``peft_kernels._C`` was built with CUDA (``make gpu-check`` builds it)::

    compute-sanitizer --tool memcheck --error-exitcode 3 python3 tools/gpu_sanitize.py

The shapes are not multiples of any block size (every tile has a masked tail), x is a strided view, the
ranks are 1, odd and > 64, and the multi-adapter batches hold id -1, empty slots, rank-0 slots and a skewed
segment, so a kernel that reads or writes one element past its tensor is reported by the sanitizer. The
script itself prints one line per case and exits non-zero if a case raised. ``--cpu`` runs the same cases
on the CPU under the Triton interpreter (the CUDA backend's cases are skipped): a check of the script.
"""
from __future__ import annotations

import os
import sys
import traceback

CPU = "--cpu" in sys.argv
if CPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

import peft_kernels as pk  # noqa: E402


def _cases(dev):
    g = torch.Generator(device=dev).manual_seed(0)

    def rn(*shape, dt=torch.float16, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dt)

    def strided(M, K, dt):  # every other column of a wider buffer: really strided, not a clone
        return rn(M, 2 * K, dt=dt)[:, ::2].requires_grad_(True)

    for dt in (torch.float32, torch.bfloat16):
        for M, K, N, r, p in ((33, 45, 31, 7, 0.25), (1, 4097, 4095, 16, 0.0), (70, 130, 66, 72, 0.25),
                              (3, 200, 129, 1, 0.0)):
            def lora(M=M, K=K, N=N, r=r, dt=dt, p=p):
                x = strided(M, K, dt)
                A, B = rn(r, K, dt=dt, scale=K ** -0.5).requires_grad_(), rn(N, r, dt=dt).requires_grad_()
                y = pk.lora_linear(x, rn(N, K, dt=dt, scale=K ** -0.5), rn(N, dt=dt), A, B, 0.5, dropout_p=p,
                                   training=True, backend="triton")
                y.backward(torch.ones_like(y))
            yield f"lora triton {dt} M={M} K={K} N={N} r={r} p={p}", lora
    # the persistent TMA GEMMs (sm_90; forced under the interpreter): x a row-strided view (TMA needs a unit inner
    # stride), odd M, N a multiple of 8 (dX by TMA too) or not (dX on the cp.async kernel)
    from peft_kernels.kernels._common import tma_override

    for dt in (torch.float16, torch.bfloat16):
        for M, K, N, r, p in ((70, 136, 72, 72, 0.25), (129, 64, 200, 1, 0.0), (97, 136, 66, 7, 0.0)):
            def lora_tma(M=M, K=K, N=N, r=r, dt=dt, p=p):
                x = rn(M, K + 8, dt=dt)[:, :K].requires_grad_(True)
                A, B = rn(r, K, dt=dt, scale=K ** -0.5).requires_grad_(), rn(N, r, dt=dt).requires_grad_()
                with tma_override(True if CPU else None):
                    y = pk.lora_linear(x, rn(N, K, dt=dt, scale=K ** -0.5), rn(N, dt=dt), A, B, 0.5, dropout_p=p,
                                       training=True, backend="triton")
                    y.backward(torch.ones_like(y))
            yield f"lora triton (TMA GEMMs on sm_90) {dt} M={M} K={K} N={N} r={r} p={p}", lora_tma
    # the GEMMs dequantizing a quantized W (NF4 blocks spanning rows at K=45, int8 row scales, zero points)
    from peft_kernels.gpucheck.cases import QUANT_KINDS, _Operand, quant_operand
    from peft_kernels.ops.qlora import QLoRACall, QLoRALinearFunction

    for dt in (torch.float32, torch.bfloat16):
        for kind in QUANT_KINDS:
            for M, K, N, r, p in ((33, 45, 31, 7, 0.25), (1, 128, 200, 16, 0.0), (70, 130, 66, 72, 0.25)):
                def qlora(M=M, K=K, N=N, r=r, dt=dt, p=p, kind=kind):
                    x = strided(M, K, dt)
                    A, B = rn(r, K, dt=dt, scale=K ** -0.5).requires_grad_(), rn(N, r, dt=dt).requires_grad_()
                    seed = torch.zeros(1, dtype=torch.int64, device=dev) + 7
                    call = QLoRACall(_Operand(quant_operand(g, dev, N, K, kind)), 0.5, p, seed if p else None, "triton")
                    y = QLoRALinearFunction.apply(x, rn(N, dt=dt), A, B, call)
                    y.backward(torch.ones_like(y))
                yield f"qlora triton {kind} {dt} M={M} K={K} N={N} r={r} p={p}", qlora
    for dt in (torch.float32, torch.bfloat16):
        for backend in ("triton",) if CPU else ("triton", "cuda"):
            for path in ("bgmv", "sgmv"):
                def multi(dt=dt, backend=backend, path=path):
                    T, K, N, S, R = 75, 45, 31, 6, 72
                    ranks = torch.tensor([72, 1, 0, 7, 33, 72], dtype=torch.int32, device=dev)
                    ids = torch.cat([torch.zeros(50, dtype=torch.long), torch.tensor([-1, 1, 2, 3, 4, 5, -1] * 3),
                                     torch.tensor([5, 5, 3, 1])]).to(dev)
                    x = strided(T, K, dt)
                    A, B = rn(S, R, K, dt=dt).requires_grad_(), rn(S, N, R, dt=dt).requires_grad_()
                    scal = torch.rand(S, device=dev) + 0.5
                    y = pk.multi_lora_linear(x, rn(N, K, dt=dt), rn(N, dt=dt), A, B, scal, ids, ranks=ranks,
                                             backend=backend, path=path)
                    y.backward(torch.ones_like(y))
                yield f"multi {backend} {path} {dt}", multi
    for dt in (torch.bfloat16,):
        def dora(dt=dt):
            M, K, N, r = 33, 45, 31, 7
            x = strided(M, K, dt)
            A, B = rn(r, K, dt=dt).requires_grad_(), rn(N, r, dt=dt).requires_grad_()
            mag = rn(N, dt=torch.float32).abs().add(0.5).requires_grad_()
            y = pk.dora_linear(x, rn(N, K, dt=dt), rn(N, dt=dt), A, B, 0.5, mag, dropout_p=0.1, training=True,
                               backend="triton")
            y.backward(torch.ones_like(y))
        yield f"dora triton {dt}", dora

        for ff in (False, True):
            def ia3(dt=dt, ff=ff):
                M, K, N = 33, 45, 31
                x = strided(M, K, dt)
                lvec = rn(K if ff else N, dt=dt).requires_grad_()
                y = pk.ia3_linear(x, rn(N, K, dt=dt), rn(N, dt=dt), lvec, feedforward=ff, backend="triton")
                y.backward(torch.ones_like(y))
            yield f"ia3 triton {dt} feedforward={ff}", ia3

        def bottleneck(dt=dt):
            M, H, b = 33, 45, 7
            h = strided(M, H, dt)
            dw, db = rn(b, H, dt=dt).requires_grad_(), rn(b, dt=dt).requires_grad_()
            uw, ub = rn(H, b, dt=dt).requires_grad_(), rn(H, dt=dt).requires_grad_()
            y = pk.bottleneck_adapter(h, dw, db, uw, ub, 0.5, activation="gelu", backend="triton")
            y.backward(torch.ones_like(y))
        yield f"bottleneck triton {dt}", bottleneck


def main() -> int:
    if not CPU and not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA GPU (--cpu checks the script on the CPU)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if CPU else "cuda")
    failed = 0
    for name, fn in _cases(dev):
        try:
            fn()
            if not CPU:
                torch.cuda.synchronize()
            print(f"ok      {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - every case runs; the failures are counted
            failed += 1
            print(f"FAILED  {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc(limit=3)
    print(f"gpu_sanitize: {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
