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
