"""The spec: plain PyTorch math for every op. Tests compare every backend against these.

Nothing here is on a hot path. Backward comes from autograd on these expressions.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y = x·Wᵀ + b + scaling · (drop(x)·Aᵀ)·Bᵀ``.

    Args:
        x: ``[..., K]`` input.
        weight: ``[N, K]`` frozen base weight (nn.Linear layout).
        bias: ``[N]`` or None.
        lora_A: ``[r, K]``; lora_B: ``[N, r]`` (HF PEFT layout).
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA).
        dropout_mask: multiplicative dropout factors broadcastable to ``x``, already carrying the
            inverted-dropout scale (each entry is 0 or ``1/(1-p)``), or None for no dropout.
            Dropout applies to the LoRA branch input only, as in HF PEFT.

    The LoRA branch is computed in the adapter's dtype (PEFT's ``autocast_adapter_dtype``: fp32
    adapters on a half-precision base compute the branch in fp32) and the sum is cast back to
    ``x.dtype``.
    """
    base = F.linear(x, weight, bias)
    xd = x if dropout_mask is None else x * dropout_mask.to(x.dtype)
    xd = xd.to(lora_A.dtype)
    lora = F.linear(F.linear(xd, lora_A), lora_B) * scaling
    return (base + lora).to(x.dtype)


def expand_adapter_ids(adapter_ids: torch.Tensor, x_shape) -> torch.Tensor:
    """Adapter ids per token (``[T]``, T = tokens of x flattened to ``(T, K)``) from ids given per
    token (any shape with T elements) or per batch row (``[B]`` for x of shape ``[B, L, K]``)."""
    T = 1
    for d in x_shape[:-1]:
        T *= int(d)
    ids = adapter_ids.reshape(-1)
    if ids.numel() == T:
        return ids
    if len(x_shape) == 3 and adapter_ids.dim() == 1 and ids.numel() == x_shape[0]:
        return ids.repeat_interleave(int(x_shape[1]))
    hint = ""
    if len(x_shape) == 3 and adapter_ids.dim() == 1 and 0 < ids.numel() < x_shape[0] and x_shape[0] % ids.numel() == 0:
        n = x_shape[0] // ids.numel()
        hint = (f" (the batch has {n}x as many rows as ids: generate() with num_beams or num_return_sequences repeats "
                f"each row; pass ids.repeat_interleave({n}))")
    raise ValueError(f"adapter_ids must hold one id per token ({T} for x of shape {tuple(x_shape)}) or, for "
                     f"x of shape [B, L, K], one per batch row (B ids); got shape {tuple(adapter_ids.shape)}{hint}")


def multi_lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: Optional[torch.Tensor] = None,
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mixed-batch LoRA, one token at a time: token t with adapter ``a = ids[t]`` gets
    ``x_t·Wᵀ + b + scalings[a] · B[a, :, :r_a]·(A[a, :r_a]·drop(x_t))``; ``a = -1`` gets the base only.
    ``dropout_mask``: ``[T, K]`` factors (0 or 1/(1-p_a), each row with its adapter's p) on the LoRA input,
    or None.

    Args:
        lora_A: ``[S, R, K]`` slot stack; lora_B: ``[S, N, R]``; scalings: ``[S]``.
        adapter_ids: one id in ``[-1, S)`` per token, or one per batch row for x ``[B, L, K]``.
        ranks: ``[S]`` true ranks ≤ R (None: all R). Columns past a slot's rank are ignored.

    The explicit ``a < 0`` test matters: ``lora_A[-1]`` would silently be the last slot.
    """
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    ids = expand_adapter_ids(adapter_ids, x.shape)
    base = F.linear(x2, weight, bias)
    rows = []
    for t in range(x2.shape[0]):
        a = int(ids[t])
        if a < 0:
            rows.append(base[t])
            continue
        r = lora_A.shape[1] if ranks is None else int(ranks[a])
        s = float(scalings[a])
        xt = x2[t] if dropout_mask is None else x2[t] * dropout_mask[t].to(x2.dtype)
        upd = (lora_B[a, :, :r] @ (lora_A[a, :r] @ xt.to(lora_A.dtype))) * s
        rows.append((base[t] + upd).to(x.dtype))
    y = torch.stack(rows) if rows else base
    return y.view(*x.shape[:-1], N)


# ------------------------------------------------------------------------------------------------
# bottleneck adapters (Houlsby / Pfeiffer / parallel)
# ------------------------------------------------------------------------------------------------
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swish", "tanh")


def activation_ref(p: torch.Tensor, name: str) -> torch.Tensor:
    """The adapter non-linearities: relu, gelu (exact), gelu_tanh (tanh approximation), silu = swish, tanh."""
    if name == "relu":
        return F.relu(p)
    if name == "gelu":
        return F.gelu(p)
    if name == "gelu_tanh":
        return F.gelu(p, approximate="tanh")
    if name in ("silu", "swish"):
        return F.silu(p)
    if name == "tanh":
        return torch.tanh(p)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def bottleneck_ref(h, down_w, down_b, up_w, up_b, activation: str, scaling) -> torch.Tensor:
    """``scaling · up(act(down(h)))``: down ``[b, H]`` (+ bias ``[b]``), up ``[H_out, b]`` (+ bias).

    ``scaling``: a float, a learned scalar tensor, or a learned per-channel vector ``[H_out]``.
    """
    return scaling * F.linear(activation_ref(F.linear(h, down_w, down_b), activation), up_w, up_b)


def adapter_linear_ref(x, weight, bias, down_w, down_b, up_w, up_b, activation: str, scaling,
                       mode: str = "sequential") -> torch.Tensor:
    """A frozen linear with a bottleneck adapter.

    sequential (Pfeiffer/Houlsby placement on the sublayer output): ``y = W·x + b; y + s·up(act(down(y)))``.
    parallel (He et al. 2022): ``W·x + b + s·up(act(down(x)))``.
    """
    y = F.linear(x, weight, bias)
    if mode == "sequential":
        return y + bottleneck_ref(y, down_w, down_b, up_w, up_b, activation, scaling)
    if mode == "parallel":
        return y + bottleneck_ref(x, down_w, down_b, up_w, up_b, activation, scaling)
    raise ValueError(f"mode must be 'sequential' or 'parallel', got {mode!r}")


def adapterhub_bottleneck_ref(hidden_states, residual_input, adapter_down_w, adapter_down_b, adapter_up_w,
                              adapter_up_b, non_linearity: str, scaling=1.0) -> torch.Tensor:
    """AdapterHub's ``Adapter.forward`` math for the Pfeiffer (``seq_bn``: relu) and Houlsby
    (``double_seq_bn``: swish) presets, written out: no layer norms inside the adapter
    (``ln_before = ln_after = False``), dropout off (eval), ``residual_before_ln=True`` so the residual
    is the adapter's input, and the up output scaled before the residual is added::

        down = non_linearity(adapter_down(hidden_states))   # adapter_down = Sequential(Linear, Activation)
        up = adapter_up(down) * scaling
        output = up + residual_input

    (Transcribed from the library's semantics; no dependency on the ``adapters`` package.)
    """
    act = {"relu": F.relu, "swish": F.silu, "silu": F.silu, "gelu": F.gelu, "tanh": torch.tanh}[non_linearity.lower()]
    down = act(F.linear(hidden_states, adapter_down_w, adapter_down_b))
    up = F.linear(down, adapter_up_w, adapter_up_b) * scaling
    return up + residual_input


# ------------------------------------------------------------------------------------------------
# DoRA and (IA)³
# ------------------------------------------------------------------------------------------------
def dora_linear_ref(x, weight, bias, lora_A, lora_B, scaling: float, magnitude, dropout_mask=None) -> torch.Tensor:
    """HF PEFT's DoRA, written out (B·A materialised): ``g = m / ‖W + s·B·A‖_row`` (norm detached);
    ``y = x·Wᵀ + b + (g − 1) ⊙ (x_d·Wᵀ) + g ⊙ s·(x_d·Aᵀ)·Bᵀ`` with x_d = x·mask (x without dropout), i.e.
    ``g ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b`` when there is no dropout."""
    norm = torch.linalg.norm(weight + scaling * (lora_B @ lora_A), dim=1).detach()
    g = magnitude / norm
    xd = x if dropout_mask is None else x * dropout_mask.to(x.dtype)
    base = F.linear(x, weight, bias)
    return base + (g - 1) * F.linear(xd, weight) + g * (F.linear(F.linear(xd, lora_A), lora_B) * scaling)


def ia3_linear_ref(x, weight, bias, ia3_l, feedforward: bool = False) -> torch.Tensor:
    """(IA)³ on a linear layer, HF PEFT's ``IA3Config`` semantics: ``(x·Wᵀ + b) ⊙ l`` with l [N] (attention
    k/v, the default), or ``(x ⊙ l)·Wᵀ + b`` with l [K] for ``feedforward`` modules. As PEFT: the product
    with l (which may be fp32 on a half base) is cast back to x's dtype."""
    l = ia3_l.reshape(-1)
    if feedforward:
        return F.linear((x * l).to(x.dtype), weight, bias)
    return (F.linear(x, weight, bias) * l).to(x.dtype)


def qlora_linear_ref(x, qbase, bias, lora_A, lora_B, scaling: float, dropout_mask=None,
                     dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """LoRA on a quantized frozen base (``peft_kernels.quant.QuantBase``): the weight dequantized to the
    compute dtype (``dtype``, default ``qbase.compute_dtype(x.dtype)``; tests pass float64), then
    :func:`lora_linear_ref` on x and the bias in that dtype; the result in x's dtype."""
    cdt = dtype if dtype is not None else qbase.compute_dtype(x.dtype)
    w = qbase.dequantize(torch.float32).to(cdt)  # the quantizer's values, exactly representable in fp32
    y = lora_linear_ref(x.to(cdt), w, None if bias is None else bias.to(cdt), lora_A, lora_B, scaling, dropout_mask)
    return y.to(x.dtype)


def lora_embedding_ref(ids: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                       scaling: float, padding_idx: Optional[int] = None) -> torch.Tensor:
    """``y = W[ids] + scaling · (Aᵀ[ids])·Bᵀ`` (HF PEFT's LoRA on nn.Embedding).

    ``weight`` [V, D] (frozen table), ``lora_A`` [r, V] (``lora_embedding_A``), ``lora_B`` [D, r]
    (``lora_embedding_B``). The update is computed in the adapter's dtype and the sum cast to the table's,
    as PEFT does. Rows of ``padding_idx`` get no gradient in the table nor in ``lora_A``."""
    base = F.embedding(ids, weight, padding_idx=padding_idx)
    upd = F.embedding(ids, lora_A.t(), padding_idx=padding_idx) @ lora_B.t() * scaling
    return (base.to(upd.dtype) + upd).to(weight.dtype) if upd.dtype != weight.dtype else base + upd


def dropout_ref(x: torch.Tensor, dropout_mask: torch.Tensor) -> torch.Tensor:
    """Inverted dropout with given factors (``ops.hash_dropout``): ``y = x ⊙ mask``, mask 0 or the keep scale."""
    return x * dropout_mask.to(x.dtype)


def sdpa_attention_ref(q, k, v, attn_mask=None, is_causal: bool = False, scale=None,
                       dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scaled dot-product attention with the dropout factors applied to the probabilities (``nn.dropout``'s
    attention function): ``softmax(q·kᵀ·scale + mask) ⊙ dropout_mask · v``. ``attn_mask``: bool (True = attend)
    or additive; a query row that a bool mask hides entirely gives zeros, as ``F.scaled_dot_product_attention``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    w = (q @ k.transpose(-2, -1)) * scale
    hidden = None
    if is_causal:
        hidden = ~torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    elif attn_mask is not None and attn_mask.dtype == torch.bool:
        hidden = ~attn_mask
    elif attn_mask is not None:
        w = w + attn_mask
    if hidden is not None:
        w = w.masked_fill(hidden, float("-inf"))
    p = torch.softmax(w, dim=-1)
    if hidden is not None:
        p = torch.nan_to_num(p, nan=0.0)
    if dropout_mask is not None:
        p = p * dropout_mask.to(p.dtype)
    return p @ v


def linear_cross_entropy_ref(hidden, weight, labels, bias=None, lora_A=None, lora_B=None, scaling: float = 1.0,
                             dropout_mask=None, ignore_index: int = -100, label_smoothing: float = 0.0,
                             z_loss: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """The unfused head loss (``ops.linear_ce``): the full logits, ``F.cross_entropy`` on them, plus
    ``z_loss · logsumexp²`` per non-ignored token; "mean" divides by the non-ignored count."""
    if lora_A is not None:
        logits = lora_linear_ref(hidden, weight, bias, lora_A, lora_B, scaling, dropout_mask)
    else:
        logits = F.linear(hidden, weight, bias)
    V = weight.shape[0]
    lg, t = logits.reshape(-1, V), labels.reshape(-1).long()
    tok = F.cross_entropy(lg, t, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    valid = t != ignore_index
    if z_loss:
        tok = tok + torch.where(valid, z_loss * torch.logsumexp(lg, dim=-1) ** 2, 0.0)
    if reduction == "none":
        return tok.view(labels.shape)
    return tok.sum() / valid.sum() if reduction == "mean" else tok.sum()


def moe_experts_ref(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, act, gate_up_lora=None,
                    down_lora=None) -> torch.Tensor:
    """transformers' fused-expert MLP with LoRA on its 3-D weights (``ops.moe``), one routed assignment at a time:
    for token t and its j-th expert e, ``W = W_e + s·B_e·A_e`` for each projection,
    ``out[t] += w[t, j] · down(act(gate) ⊙ up)``. Entries of ``top_k_index`` outside [0, E) count nowhere."""
    def eff(W, lora, e):
        if lora is None:
            return W[e]
        A, B, s = lora
        return W[e] + s * (B[e].to(W.dtype) @ A[e].to(W.dtype))
    E = gate_up_proj.shape[0]
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for j in range(top_k_index.shape[1]):
            e = int(top_k_index[t, j])
            if not 0 <= e < E:
                continue
            gate, up = F.linear(hidden[t], eff(gate_up_proj, gate_up_lora, e)).chunk(2, dim=-1)
            y = F.linear(act(gate) * up, eff(down_proj, down_lora, e))
            out[t] = out[t] + top_k_weights[t, j] * y
    return out
