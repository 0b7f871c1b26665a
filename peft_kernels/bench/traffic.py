"""Traffic model: FLOPs and bytes moved to/from memory (HBM on a GPU) for each op, fused vs unfused.

The model, stated once:
- every kernel reads each operand it needs once and writes each output once (perfect on-chip reuse
  inside a kernel, none across kernels); e = bytes per element of the input dtype; the fp32
  intermediates our kernels keep (S, dS, P, H, partial sums) cost 4 bytes per element;
- **unfused** = one kernel per PyTorch op of the eager graph a user (or HF PEFT) would write:
  base ``addmm``, dropout, ``mm`` for each low-rank factor, ``mul`` by the scale, ``add``; backward =
  the ops autograd runs for that graph. For the LoRA forward at p=0 and the bottleneck adapters'
  forward this is exactly what a ``TorchDispatchMode`` counts on the reference graph
  (``tests/test_bench.py`` checks it);
- **fused** = the kernels this library launches on a GPU (the Triton kernels; the multi-adapter
  ones match the CUDA kernels), with the base GEMM counted where it is fused in;
- FLOPs count multiply-adds as 2; biases, activations and scalings are not counted;
- the frozen base weight gets no gradient; x, the adapter weights and biases do.

Per op (M rows, K in, N out, r rank, b bottleneck, n active adapters, P = ⌈M/64⌉ row blocks of
partial sums), forward (fwd), backward (bwd); "full" = fwd + bwd:

LoRA ``y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ``
  FLOPs fwd 2MNK + 2MKr + 2MNr; bwd 2MNK + 4MNr + 4MKr.
  fused fwd (shrink, GEMM+epilogue): 2MKe + NKe + rKe + Nre + Ne + MNe + 2·4Mr.
  unfused fwd: addmm (MKe+NKe+Ne+MNe) + [dropout 2MKe + MK mask bytes] + mm (MKe+rKe+Mre)
    + mm (Mre+Nre+MNe) + mul (2MNe) + add (3MNe).
Multi-LoRA (T = M tokens over n adapters, rank r each; PEFT's ``adapter_names`` loop is the unfused form)
  FLOPs as LoRA. fused fwd: base GEMM + SGMV shrink (TKe + n·rKe + 4Tr) + expand in place (4Tr + n·Nre + 2TNe).
  unfused fwd per adapter over its T_a rows: gather x rows (2T_aKe), mm, mm, mul, gather/add/scatter y rows.
Bottleneck adapter (a = N sequential [on the layer output], K parallel [on its input])
  FLOPs fwd 2MNK + 2Mab + 2MbN; bwd 2MNK + 4MNb + 4Mab.
See each function for its terms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class Cost:
    flops: float
    fused_bytes: float
    unfused_bytes: float

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(self.flops + o.flops, self.fused_bytes + o.fused_bytes, self.unfused_bytes + o.unfused_bytes)

    @property
    def traffic_ratio(self) -> float:
        """Unfused bytes over fused bytes: how much less memory traffic fusion needs."""
        return self.unfused_bytes / self.fused_bytes


def _with_full(fwd: Cost, bwd: Cost) -> Dict[str, Cost]:
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}


def frozen(M: int, K: int, N: int, e: int) -> Dict[str, Cost]:
    """nn.Linear with a frozen weight: forward addmm; backward dX = dY·W only."""
    f = Cost(2 * M * N * K, M * K * e + N * K * e + N * e + M * N * e, 0)
    f = Cost(f.flops, f.fused_bytes, f.fused_bytes)
    b = 2 * M * N * K, M * N * e + N * K * e + M * K * e
    return _with_full(f, Cost(b[0], b[1], b[1]))


def _row_blocks(M: int) -> int:
    """Row blocks of the dY kernel. Its dB partials cost 8·N·r bytes per row block either way: each block's
    share is written once and read once (read back in place by its program's next block, or by the final
    fixed-order reduction over the ≤ SM-count programs' partials)."""
    return -(-M // 64)


def lora(M: int, K: int, N: int, r: int, e: int, p: float = 0.0) -> Dict[str, Cost]:
    drop = p > 0
    flops_f = 2 * M * N * K + 2 * M * K * r + 2 * M * N * r
    fused_f = (M * K * e + r * K * e + 4 * M * r                          # shrink: x, A -> S (fp32)
               + M * K * e + N * K * e + 4 * M * r + N * r * e + N * e + M * N * e)  # GEMM + LoRA epilogue
    unf_f = (M * K * e + N * K * e + N * e + M * N * e                    # addmm
             + (2 * M * K * e + M * K if drop else 0)                     # dropout: x -> x_drop, bool mask
             + M * K * e + r * K * e + M * r * e                          # mm A
             + M * r * e + N * r * e + M * N * e                          # mm B
             + 2 * M * N * e + 3 * M * N * e)                             # mul s, add
    flops_b = 2 * M * N * K + 4 * M * N * r + 4 * M * K * r
    P = _row_blocks(M)
    fused_b = (M * N * e + N * r * e + 4 * M * r + 4 * M * r + 4 * P * N * r          # dY kernel: dS, dB partials
               + M * N * e + N * K * e + 4 * M * r + r * K * e + M * K * e          # dX = dY·W + dS·A
               + 4 * M * r + M * K * e + r * K * e + 4 * P * N * r + N * r * e)     # dA, dB reduction
    unf_b = (2 * M * N * e                                                # mul backward
             + M * N * e + N * r * e + M * r * e                          # dT = dU·B
             + M * N * e + M * r * e + N * r * e                          # dB = dUᵀ·T
             + M * r * e + r * K * e + M * K * e                          # dXd = dT·A
             + M * r * e + M * K * e + r * K * e                          # dA = dTᵀ·x_drop
             + (2 * M * K * e + M * K if drop else 0)                     # dropout backward
             + M * N * e + N * K * e + M * K * e                          # base dX = dY·W
             + 3 * M * K * e)                                             # dX accumulation
    return _with_full(Cost(flops_f, fused_f, unf_f), Cost(flops_b, fused_b, unf_b))


def multi_lora(T: int, K: int, N: int, r: int, n: int, e: int) -> Dict[str, Cost]:
    """n active adapters of rank r over T tokens (the LoRA FLOPs do not depend on n; the bytes of the
    adapter weights do)."""
    base_f = T * K * e + N * K * e + N * e + T * N * e
    flops_f = 2 * T * N * K + 2 * T * K * r + 2 * T * N * r
    fused_f = base_f + (T * K * e + n * r * K * e + 4 * T * r) + (4 * T * r + n * N * r * e + 2 * T * N * e)
    unf_f = base_f + (2 * T * K * e                                       # gather x rows per adapter
                      + T * K * e + n * r * K * e + T * r * e             # mm A
                      + T * r * e + n * N * r * e + T * N * e             # mm B
                      + 2 * T * N * e                                     # mul s
                      + 2 * T * N * e + 3 * T * N * e + 2 * T * N * e)    # gather y rows, add, scatter back
    flops_b = 2 * T * N * K + 4 * T * N * r + 4 * T * K * r
    base_b = T * N * e + N * K * e + T * K * e
    fused_b = base_b + (T * N * e + n * N * r * e + 4 * T * r                  # dS = gather(dY)·B
                        + 4 * T * r + n * r * K * e + 2 * T * K * e            # dX += dS·A in place
                        + 4 * T * r + T * K * e + n * r * K * e                # dA per segment
                        + T * N * e + 4 * T * r + n * N * r * e)               # dB per segment
    lora_b = lora(T, K, N, r, e)["bwd"].unfused_bytes - base_b - 3 * T * K * e  # per-adapter LoRA backward
    unf_b = base_b + lora_b + (n - 1) * (N * r * e + r * K * e) * 2 + 2 * T * N * e + 3 * T * K * e
    return _with_full(Cost(flops_f, fused_f, unf_f), Cost(flops_b, fused_b, unf_b))


def adapter(M: int, K: int, N: int, b: int, e: int, placement: str) -> Dict[str, Cost]:
    """AdapterLinear: sequential ``y + s·U·act(D·y + c) + s·d`` on y = W·x + bias, or parallel
    ``y + s·U·act(D·x + c) + s·d``."""
    a = N if placement == "sequential" else K
    flops_f = 2 * M * N * K + 2 * M * a * b + 2 * M * b * N
    tiles_n = -(-N // 128)
    if placement == "sequential":
        fused_f = (M * K * e + N * K * e + N * e + b * N * e + M * N * e    # base tile + its slice of D·y
                   + 4 * M * b * tiles_n * 2 + 4 * M * b * 2                # partials written/read; P, H
                   + M * N * e + 4 * M * b + N * b * e + N * e + M * N * e)  # expand: y + H·Uᵀ
    else:
        fused_f = (M * K * e + b * K * e + b * e + 4 * M * b * 2            # shrink: P, H
                   + M * K * e + N * K * e + N * e + 4 * M * b + N * b * e + N * e + M * N * e)  # GEMM + H·Uᵀ
    unf_f = (M * K * e + N * K * e + N * e + M * N * e                      # base addmm
             + M * a * e + b * a * e + b * e + M * b * e                    # down addmm
             + 2 * M * b * e                                                # activation
             + M * b * e + N * b * e + N * e + M * N * e                    # up addmm
             + 2 * M * N * e + 3 * M * N * e)                               # mul s, add
    flops_b = 2 * M * N * K + 4 * M * N * b + 4 * M * a * b
    P = _row_blocks(M)
    fused_b = (M * N * e + N * b * e + 4 * M * b + 4 * M * b + 4 * P * N * b         # dY kernel: dP, dU partials
               + 4 * M * b + M * a * e + b * a * e + 4 * P * N * b + N * b * e)      # dD, dU reduction
    if placement == "sequential":
        fused_b += (M * N * e + 4 * M * b + b * N * e + M * N * e                    # dY + dP·D
                    + M * N * e + N * K * e + M * K * e)                             # dX GEMM
    else:
        fused_b += M * N * e + N * K * e + 4 * M * b + b * K * e + M * K * e        # dX = dY·W + dP·D
    unf_b = (2 * M * N * e                                                  # mul backward
             + M * N * e + N * b * e + M * b * e                            # dH = dZ·U
             + M * N * e + M * b * e + N * b * e + M * N * e + N * e        # dU, d(up bias)
             + 3 * M * b * e                                                # activation backward
             + M * b * e + b * a * e + M * a * e                            # dIn = dP·D
             + M * b * e + M * a * e + b * a * e + M * b * e + b * e        # dD, d(down bias)
             + M * N * e + N * K * e + M * K * e)                           # base dX
    unf_b += 3 * M * N * e if placement == "sequential" else 3 * M * K * e  # dY + dIn, or dX + dIn
    return _with_full(Cost(flops_f, fused_f, unf_f), Cost(flops_b, fused_b, unf_b))


def ia3(M: int, K: int, N: int, e: int, feedforward: bool) -> Dict[str, Cost]:
    """IA3Linear, training (l needs a grad). Output scaling ``(x·Wᵀ + b) ⊙ l``: the fused GEMM also stores
    y₀ = x·Wᵀ + b for dl; input scaling ``(x ⊙ l)·Wᵀ + b``: l applied to the loaded x tiles. FLOPs: the GEMMs."""
    flops = 2 * M * N * K
    base = M * K * e + N * K * e + N * e + M * N * e
    if feedforward:
        fused_f = base + K * e
        unf_f = (2 * M * K * e + K * e) + base                              # mul, addmm
        P = _row_blocks(M)
        fused_b = M * N * e + N * K * e + M * K * e + K * e + M * K * e + 4 * P * K + 4 * P * K + K * e
        unf_b = (M * N * e + N * K * e + M * K * e                          # dXs = dY·W
                 + 2 * M * K * e + K * e                                    # dX = dXs ⊙ l
                 + 3 * M * K * e + M * K * e + K * e)                       # dl = Σ dXs ⊙ x
    else:
        fused_f = base + N * e + M * N * e                                  # + l, + y₀
        unf_f = base + 2 * M * N * e + N * e                                # addmm, mul
        fused_b = M * N * e + N * e + N * K * e + M * K * e + 2 * M * N * e + N * e  # dX = (dY ⊙ l)·W; dl
        unf_b = (2 * M * N * e + N * e                                      # dY ⊙ l
                 + 3 * M * N * e + M * N * e + N * e                        # dl = Σ dY ⊙ y₀
                 + M * N * e + N * K * e + M * K * e)                       # dX
    return _with_full(Cost(flops, fused_f, unf_f), Cost(flops, fused_b, unf_b))


def dora(M: int, K: int, N: int, r: int, e: int) -> Dict[str, Cost]:
    """DoRA (no dropout). Fused = our LoRA kernels + the weight norm without B·A (W·Aᵀ: read W, A, B)
    + one rescale pass (y = g ⊙ z + b); backward adds dZ = dY ⊙ g and dm = Σ dY ⊙ z / ‖·‖ (2 passes).
    Unfused = HF PEFT's DoRA layer: B·A materialised through an identity matrix (K×K), W + s·B·A, its
    row norms, then (g − 1) ⊙ base + g ⊙ s·lora over M×N passes. FLOPs: ours (the GEMMs)."""
    lo = lora(M, K, N, r, e)
    norm = N * K * e + r * K * e + N * r * e + 4 * N
    fused_f = lo["fwd"].fused_bytes + norm + (2 * M * N * e + 2 * N * e)
    fused_b = lo["bwd"].fused_bytes + 2 * M * N * e + N * e + 3 * M * N * e + N * e
    unf_f = (M * K * e + N * K * e + N * e + M * N * e                         # base addmm
             + K * K * e + (K * K * e + r * K * e + K * r * e) + (K * r * e + N * r * e + K * N * e)  # eye, B(A(I))
             + 2 * N * K * e + 3 * N * K * e + N * K * e + N * e + 3 * N * e   # s·BA, W + ·, norm, m / norm
             + (M * K * e + r * K * e + M * r * e) + (M * r * e + N * r * e + M * N * e)  # lora_B(lora_A(x))
             + 2 * M * N * e + N * e                                          # base - bias
             + 2 * N * e + 2 * M * N * e + N * e + 2 * M * N * e + N * e      # (g-1)·base, g·lora
             + 2 * M * N * e + 3 * M * N * e + 3 * M * N * e)                 # ·s, +, result +
    unf_b = (lo["bwd"].unfused_bytes + 6 * M * N * e + 2 * N * e             # LoRA path's backward; g·, (g-1)· muls
             + 3 * M * N * e + 3 * M * N * e + 2 * N * e)                     # dm: Σ dY ⊙ base, Σ dY ⊙ lora
    flops_f = lo["fwd"].flops + 2 * N * K * r  # + the norm's W·Aᵀ (PEFT's B·A·I costs 2K²r + 2KrN instead)
    return _with_full(Cost(flops_f, fused_f, unf_f), Cost(lo["bwd"].flops, fused_b, unf_b))


def nf4_bytes_per_weight(blocksize: int = 64, double_quant: bool = True) -> float:
    """Stored bytes per weight of a bitsandbytes NF4 weight: 0.5 (the 4-bit codes) + its absmax scales (fp32 per
    block, or uint8 per block plus an fp32 per 256 blocks with double quantization)."""
    return 0.5 + ((1 + 4 / 256) / blocksize if double_quant else 4 / blocksize)


def qlora(M: int, K: int, N: int, r: int, e: int, q: float) -> Dict[str, Cost]:
    """LoRA on a 4-bit frozen base, ``q`` stored bytes per weight (:func:`nf4_bytes_per_weight`).
    Fused = the LoRA kernels with the GEMM dequantizing W inside its mainloop (reads N·K·q instead of N·K·e),
    forward and dX. Unfused = unsloth's QLoRA: a dequantize kernel writes W in the compute dtype (reads N·K·q,
    writes N·K·e), then the unfused LoRA graph on that W (which reads N·K·e), in forward and again for dX."""
    lo = lora(M, K, N, r, e)
    swap = N * K * (e - q)           # the GEMM reads the packed weight instead of the dequantized one
    deq = N * K * q + N * K * e      # unsloth's dequantize kernel
    f, b = lo["fwd"], lo["bwd"]
    return _with_full(Cost(f.flops, f.fused_bytes - swap, f.unfused_bytes + deq),
                      Cost(b.flops, b.fused_bytes - swap, b.unfused_bytes + deq))
