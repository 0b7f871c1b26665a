"""The model's own dropout with the hash mask (``ops/hash_dropout.py``): ``HashDropout`` for ``nn.Dropout`` layers,
and an attention function for transformers models whose attention applies dropout inside SDPA.

``peft_kernels.use_hash_dropout(model)`` (``model.py``) installs both; this file holds the pieces.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.hash_dropout import hash_dropout

ATTENTION = "peft_kernels_sdpa"


class HashDropout(nn.Dropout):
    """``nn.Dropout`` with the keyed-hash mask: the same distribution (each element kept with probability 1 - p,
    scaled by the inverse), a mask generated where it is applied and regenerated in backward (nothing stored), and
    a custom op under ``torch.compile``. A subclass of ``nn.Dropout``, so code that reads ``.p`` (transformers'
    attention does) or checks the type still works. ``inplace`` is accepted and ignored (the output is new)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return hash_dropout(input, self.p, self.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", mask=hash"


def _sdpa():
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    return sdpa_attention_forward, repeat_kv


def hash_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """transformers' ``sdpa`` attention, with the attention-probability dropout done by ``hash_dropout``.

    Registered as the attention implementation ``"peft_kernels_sdpa"`` (with SDPA's mask function, so it receives
    what ``sdpa`` would). Without dropout (``dropout=0``: transformers passes 0 in evaluation) it is
    ``sdpa_attention_forward`` itself. With dropout it computes SDPA's math path: scores, mask (bool, additive, or
    causal when no mask is given, decided as ``sdpa_attention_forward`` decides), softmax (in fp32 for half
    types), the hash dropout, and the product with V; a query row that a bool mask hides entirely gives zeros, as
    SDPA's does. Inputs this path does not handle
    (``position_bias``, ``softcap``, attention sinks, ``output_attentions``) go to ``sdpa_attention_forward`` with
    torch's own dropout: correct, not faster."""
    sdpa_forward, repeat_kv = _sdpa()
    if not dropout > 0 or any(kwargs.get(k) is not None and kwargs.get(k) is not False for k in
                                                    ("position_bias", "softcap", "s_aux", "output_attentions")):
        return sdpa_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            is_causal=is_causal, **kwargs)
    n_rep = getattr(module, "num_key_value_groups", 1)
    if n_rep > 1:
        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_len > 1 and attention_mask is None and is_causal
    if is_causal and kv_len > q_len:  # as sdpa_attention_forward: prefill into an empty static cache
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        kv_len = q_len
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    w = torch.matmul(query, key.transpose(-2, -1)) * scale
    hidden = None
    if is_causal:
        hidden = ~torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
    elif attention_mask is not None and attention_mask.dtype == torch.bool:
        hidden = ~attention_mask
    elif attention_mask is not None:
        w = w + attention_mask
    if hidden is not None:
        w = w.masked_fill(hidden, float("-inf"))
    w = torch.softmax(w, dim=-1, dtype=torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype)
    if hidden is not None and not is_causal:  # a fully hidden row: 0, not NaN (SDPA's safe softmax)
        w = w.masked_fill(hidden.all(-1, keepdim=True), 0.0)
    w = hash_dropout(w.to(query.dtype), dropout)
    out = torch.matmul(w, value)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register ``"peft_kernels_sdpa"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, hash_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
