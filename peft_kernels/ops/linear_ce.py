"""``linear_cross_entropy``: the loss of an output head (frozen weight, optional bias, optional LoRA on it) computed
from the hidden states in chunks of tokens, so the ``M × V`` logits never exist.

For each chunk of ``C`` tokens: ``logits = h·Wᵀ + b + s·(dropout(h)·Aᵀ)·Bᵀ`` in fp32 (``C × V``), the per-token
loss ``(1-ε)(lse - l_y) + ε(lse - mean_j l_j) + λ·lse²`` (ε label smoothing as ``F.cross_entropy`` defines it,
λ the z-loss), and, in the same pass, the logits' gradient in place of the logits,
``softmax·(1 + 2λ·lse) - (1-ε)·onehot(y) - ε/V`` times the token's weight (0 for ``ignore_index``), from which
the chunk's ``dh``, ``dA``, ``dB`` (and ``dW``, ``db`` when the head is trained) are taken before the next chunk.
Peak extra memory: one ``C × V`` fp32 block (plus its copy in the compute dtype for half types), whatever ``M``.

With ``reduction="mean"``/``"sum"`` the gradients are computed in the forward pass (the loss's gradient is a
scalar times them) and backward scales them; that is one pass over the head instead of two. With ``"none"``
backward runs the chunks again with each token's incoming gradient.
The reference is ``reference.linear_cross_entropy_ref`` (the unfused computation).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _amp, _torch_dropout
from ._autograd import first_order_only

REDUCTIONS = ("mean", "sum", "none")
DEFAULT_CHUNK_BYTES = 256 << 20  # one C × V fp32 block


def default_chunk(M: int, V: int) -> int:
    """Tokens per chunk: a 256 MiB fp32 logits block (512 tokens at V = 128k), at least 1, at most M."""
    return max(1, min(max(M, 1), DEFAULT_CHUNK_BYTES // (4 * max(V, 1))))


def _validate(hidden, weight, labels, bias, lora_A, lora_B, scaling, ignore_index, label_smoothing, z_loss,
              reduction, chunk_size, dropout_p):
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not hidden.is_floating_point() or hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16,
                                                                 torch.float64):
        raise TypeError(f"hidden must be float32/float16/bfloat16/float64, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-d tensor")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must have shape [V, {H}] (hidden's last dim), got {list(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    V = weight.shape[0]
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have hidden's leading shape {list(hidden.shape[:-1])}, got {list(labels.shape)}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} must be on hidden's device {hidden.device}, got {t.device}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (V,)):
        raise ValueError(f"bias must have shape [{V}], got {getattr(bias, 'shape', type(bias).__name__)}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must be given together")
    if lora_A is not None:
        if lora_A.dim() != 2 or lora_A.shape[1] != H or lora_A.shape[0] < 1:
            raise ValueError(f"lora_A must have shape [r, {H}], got {list(lora_A.shape)}")
        r = lora_A.shape[0]
        if tuple(lora_B.shape) != (V, r):
            raise ValueError(f"lora_B must have shape [{V}, {r}] (V, lora_A's rank), got {list(lora_B.shape)}")
        if lora_A.dtype not in (hidden.dtype, torch.float32) or lora_B.dtype != lora_A.dtype:
            raise TypeError(f"lora_A and lora_B must both have hidden's dtype or both float32, got {lora_A.dtype} "
                            f"and {lora_B.dtype}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite float, got {scaling!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    for name, v, hi in (("label_smoothing", label_smoothing, 1.0), ("z_loss", z_loss, math.inf),
                        ("dropout_p", dropout_p, 1.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= v <= hi) or math.isinf(v):
            raise ValueError(f"{name} must be a float in [0, {hi}], got {v!r}")
    if dropout_p >= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return V


def _run(h, t, W, b, A, B, s, factor, ignore_index, eps, zl, C, weight_tok, need):
    """One pass over the token chunks. ``weight_tok``: fp32 [M] (each token's loss weight, 0 when ignored) or None
    (loss only). ``need``: which of (dh, dW, db, dA, dB) to compute. Returns (loss [M] fp32, grads...)."""
    M, H = h.shape
    V = W.shape[0]
    cdt = h.dtype
    adt = torch.float64 if cdt == torch.float64 else torch.float32  # logits and accumulators
    valid = t != ignore_index
    tsafe = torch.where(valid, t, 0).to(torch.int64)
    loss = torch.zeros(M, dtype=adt, device=h.device)
    lora = A is not None
    grads = weight_tok is not None
    need_dh, need_dW, need_db, need_dA, need_dB = need if grads else (False,) * 5
    if lora:
        ldt = A.dtype  # the branch runs in the adapter's dtype (PEFT's autocast_adapter_dtype)
        xd = (h if factor is None else h * factor).to(ldt)  # the LoRA input (dropout)
        z = xd @ A.t()  # [M, r]
    dh = torch.empty_like(h) if need_dh else None
    f32 = dict(dtype=adt, device=h.device)
    dW = torch.zeros(V, H, **f32) if need_dW else None
    db = torch.zeros(V, **f32) if need_db else None
    dA = torch.zeros(A.shape, **f32) if lora and need_dA else None
    dB = torch.zeros(B.shape, **f32) if lora and need_dB else None
    for s0 in range(0, M, C):
        sl = slice(s0, min(M, s0 + C))
        hc = h[sl]
        logits = (hc @ W.t()).to(adt)
        if b is not None:
            logits += b.to(adt)
        if lora and ldt == adt:
            logits.addmm_(z[sl], B.t(), alpha=s)  # no C × V temporary
        elif lora:
            logits += s * (z[sl] @ B.t()).to(adt)
        lse = torch.logsumexp(logits, dim=-1)
        lt = logits.gather(1, tsafe[sl, None])[:, 0]
        tok = lse - lt
        if eps:
            tok = (1.0 - eps) * tok + eps * (lse - logits.mean(dim=-1))
        if zl:
            tok = tok + zl * lse * lse
        loss[sl] = torch.where(valid[sl], tok, 0.0)
        if not grads:
            continue
        w = torch.where(valid[sl], weight_tok[sl], 0.0)
        dl = logits.sub_(lse[:, None]).exp_()  # the logits block becomes the softmax, then the gradient
        dl.mul_(((1.0 + 2.0 * zl * lse) * w if zl else w)[:, None])
        dl.scatter_add_(1, tsafe[sl, None], (-(1.0 - eps) * w)[:, None])
        if eps:
            dl.sub_((eps / V) * w[:, None])
        dlc = dl if cdt == adt else dl.to(cdt)
        if lora and (need_dh or need_dA):
            u = dl.to(ldt) @ B  # [c, r]
        if need_dh:
            dhc = dlc @ W
            if lora:
                lo = (u * s) @ A
                dhc += (lo if factor is None else lo * factor[sl]).to(cdt)
            dh[sl] = dhc
        if need_dW:
            dW.addmm_(dl.t(), hc.to(adt))
        if need_db:
            db += dl.sum(0)
        if dB is not None:
            dB.addmm_(dl.t(), z[sl].to(adt), alpha=s)
        if dA is not None:
            dA.addmm_(u.to(adt).t(), xd[sl].to(adt), alpha=s)
    return loss, dh, dW, db, dA, dB


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, t, W, b, A, B, s, factor, ignore_index, eps, zl, reduction, C):
        need = tuple(ctx.needs_input_grad[i] and x is not None for i, x in ((0, h), (2, W), (3, b), (4, A), (5, B)))
        valid = t != ignore_index
        n = valid.sum().to(torch.float64 if h.dtype == torch.float64 else torch.float32)
        ctx.reduction, ctx.args = reduction, (s, ignore_index, eps, zl, C)
        ctx.dtypes = [x.dtype if x is not None else None for x in (h, W, b, A, B)]
        if reduction != "none" and any(need):
            wt = (torch.ones_like(n) / n if reduction == "mean" else torch.ones_like(n)).expand(h.shape[0])
            loss, *grads = _run(h, t, W, b, A, B, s, factor, ignore_index, eps, zl, C, wt, need)
            ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
            ctx.present = [g is not None for g in grads]
        else:
            loss = _run(h, t, W, b, A, B, s, factor, ignore_index, eps, zl, C, None, need)[0]
            ctx.save_for_backward(h, t, W, b, A, B, factor)
            ctx.need = need
        if reduction == "mean":
            return loss.sum() / n
        if reduction == "sum":
            return loss.sum()
        return loss

    @staticmethod
    @first_order_only("linear_cross_entropy", backend="torch")  # (the gradients are computed in forward)
    def backward(ctx, go):
        if ctx.reduction != "none":
            dh, dW, db, dA, dB = [g * go.to(g.dtype) if ok else None for g, ok in zip(ctx.saved_tensors, ctx.present)]
        else:
            h, t, W, b, A, B, factor = ctx.saved_tensors
            s, ignore_index, eps, zl, C = ctx.args
            _, dh, dW, db, dA, dB = _run(h, t, W, b, A, B, s, factor, ignore_index, eps, zl, C,
                                         go.to(torch.float64 if h.dtype == torch.float64 else torch.float32), ctx.need)
        dtypes = ctx.dtypes  # the fp32 accumulators back in each input's dtype
        dh, dW, db, dA, dB = [g.to(d) if g is not None else None for g, d in zip((dh, dW, db, dA, dB), dtypes)]
        return dh, None, dW, db, dA, dB, None, None, None, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                         lora_A: Optional[Tensor] = None, lora_B: Optional[Tensor] = None, scaling: float = 1.0,
                         dropout_p: float = 0.0, training: bool = False, ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean",
                         chunk_size: Optional[int] = None, check_labels: bool = True) -> Tensor:
    """Cross-entropy of ``hidden·weightᵀ + bias + scaling·(dropout(hidden)·lora_Aᵀ)·lora_Bᵀ`` against ``labels``,
    never materialising the ``[M, V]`` logits (see the module docstring).

    Args:
        hidden: ``[..., H]`` float32/float16/bfloat16/float64 (any strides). weight: ``[V, H]``, hidden's dtype (the
            head; trained when it requires grad). bias: ``[V]`` or None. lora_A ``[r, H]`` / lora_B ``[V, r]``: an
            optional LoRA on the head (hidden's dtype or float32), ``scaling`` its scale, ``dropout_p`` the dropout on
            its input when ``training`` (the hash mask; nothing stored).
        labels: ``hidden.shape[:-1]``, int64/int32; ``ignore_index`` entries count nowhere. Others must be in [0, V)
            (checked unless ``check_labels=False``, which skips a host sync).
        label_smoothing, z_loss: ``F.cross_entropy``'s ε, and λ·logsumexp² per token (PaLM's z-loss).
        reduction: "mean" (over non-ignored tokens; NaN when there are none, as ``F.cross_entropy``), "sum", "none".
        chunk_size: tokens per chunk (default: a 256 MiB fp32 logits block).
    Returns the loss (fp32; per token ``labels.shape`` for "none").

    Under ``torch.autocast`` the head (and its LoRA) computes in the autocast dtype, as the unfused head's
    ``F.linear`` would; the loss is fp32 either way (the logits are fp32 inside each chunk).
    """
    amp = _amp.autocast_dtype(hidden)
    if amp is not None:
        with _amp.disabled(hidden):
            hidden, weight, bias, lora_A, lora_B = _amp.cast(amp, hidden, weight, bias, lora_A, lora_B)
            return linear_cross_entropy(hidden, weight, labels, bias=bias, lora_A=lora_A, lora_B=lora_B,
                                        scaling=scaling, dropout_p=dropout_p, training=training,
                                        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                                        reduction=reduction, chunk_size=chunk_size, check_labels=check_labels)
    V = _validate(hidden, weight, labels, bias, lora_A, lora_B, scaling, ignore_index, label_smoothing, z_loss,
                  reduction, chunk_size, dropout_p)
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H)
    t = labels.reshape(-1)
    if check_labels and t.numel():
        bad = (t != ignore_index) & ((t < 0) | (t >= V))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels must be in [0, {V}) or ignore_index={ignore_index}; flat position {i} is "
                             f"{int(t[i])}")
    C = chunk_size or default_chunk(h.shape[0], V)
    factor = None
    if lora_A is not None and training and dropout_p > 0:
        seed = _torch_dropout.draw_seed(h.device)
        factor = _torch_dropout.dropout_mask(seed, tuple(h.shape), float(dropout_p), h.device)
    out = _LinearCE.apply(h, t, weight, bias, lora_A, lora_B, float(scaling), factor, ignore_index,
                          float(label_smoothing), float(z_loss), reduction, C)
    return out.view(labels.shape) if reduction == "none" else out
