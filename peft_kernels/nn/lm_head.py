"""The fused head loss for models: ``head_cross_entropy`` (any ``nn.Linear`` / ``LoRALinear`` head) and
``causal_lm_loss`` (a transformers causal LM's ``model(input_ids, labels=labels).loss`` without its logits)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.linear_ce import linear_cross_entropy
from ._disabled import adapters_disabled
from .lora import LoRALinear
from .saved import ModulesToSave


def head_arguments(head: nn.Module) -> dict:
    """The ``linear_cross_entropy`` arguments of an output head: an ``nn.Linear``, a ``LoRALinear`` (its update
    unless merged or disabled), or a ``ModulesToSave`` around one. Anything else is a TypeError: a quantized or
    DoRA head, or ``lora_bias``, would be computed differently from its forward."""
    if isinstance(head, ModulesToSave):
        head = head.active_module()
    if isinstance(head, LoRALinear):
        if head.use_dora or head.lora_bias or head.fan_in_fan_out:
            raise TypeError("head_cross_entropy: a LoRALinear head with DoRA, lora_bias or a Conv1D base is not "
                            "supported (its forward is not W·x + b + s·B·A·x)")
        base = dict(weight=head.base_weight(), bias=head.bias)
        if head.merged or adapters_disabled(head):
            return base
        return dict(base, lora_A=head.lora_A, lora_B=head.lora_B, scaling=head.scaling, dropout_p=head.lora_dropout,
                    training=head.training)
    if type(head) is nn.Linear:
        return dict(weight=head.weight, bias=head.bias)
    raise TypeError(f"head_cross_entropy: the head must be nn.Linear or LoRALinear (or ModulesToSave around one), "
                    f"got {type(head).__name__}")


def head_cross_entropy(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, **loss_kwargs) -> torch.Tensor:
    """``F.cross_entropy(head(hidden), labels)`` without the logits: ``linear_cross_entropy`` with the head's
    weight, bias and LoRA (``loss_kwargs``: ignore_index, label_smoothing, z_loss, reduction, chunk_size)."""
    return linear_cross_entropy(hidden, labels=labels, **head_arguments(head), **loss_kwargs)


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                   attention_mask: Optional[torch.Tensor] = None, ignore_index: int = -100,
                   label_smoothing: float = 0.0, z_loss: float = 0.0, chunk_size: Optional[int] = None,
                   num_items_in_batch=None, shift_labels: Optional[torch.Tensor] = None,
                   **model_kwargs) -> torch.Tensor:
    """A transformers causal LM's training loss, ``model(input_ids, labels=labels).loss``, with the head and the
    loss fused: the decoder runs, then ``linear_cross_entropy`` on its last hidden states and the shifted labels
    (transformers' rule: position i predicts label i + 1; the last position and ``ignore_index`` count nowhere;
    the mean is over the counted tokens). ``labels`` defaults to ``input_ids``.

    As transformers' loss: ``num_items_in_batch`` (an int or tensor; what its Trainer passes under gradient
    accumulation) makes it the sum over the counted tokens divided by that number instead of the mean;
    ``shift_labels`` (``input_ids``' shape) are used as given instead of shifting ``labels``; and an MoE model with
    ``output_router_logits`` on (its config's, or passed here) adds ``router_aux_loss_coef`` times its router
    load-balancing loss (the model module's own ``load_balancing_loss_func``; refused where there is none).

        loss = peft_kernels.causal_lm_loss(model, batch["input_ids"], batch["labels"],
                                           attention_mask=batch["attention_mask"])
        loss.backward()

    The head may carry a LoRA (``inject_lora(model, [..., "lm_head"])``). Models whose logits are transformed
    after the head (Gemma-2's ``final_logit_softcapping``, Cohere's ``logit_scale``) are refused: the fused loss
    would not be theirs."""
    if not isinstance(model, nn.Module) or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"causal_lm_loss: model must be a transformers causal LM, got {type(model).__name__}")
    cfg = getattr(model, "config", None)
    for attr, neutral in (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0)):
        v = getattr(cfg, attr, neutral)
        if v is not None and v != neutral:
            raise ValueError(f"causal_lm_loss: this model transforms its logits after the head ({attr}={v}); the fused "
                             "loss would differ from the model's")
    head = model.get_output_embeddings()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if head is None or decoder is None:
        raise TypeError(f"causal_lm_loss: {type(model).__name__} has no output head or decoder")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, seq] tensor, got {getattr(input_ids, 'shape', input_ids)}")
    labels = input_ids if labels is None else labels
    if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
        raise ValueError(f"labels must have input_ids' shape {list(input_ids.shape)}, got "
                         f"{list(getattr(labels, 'shape', []))}")
    if shift_labels is not None and (not isinstance(shift_labels, torch.Tensor) or
                                     shift_labels.shape != input_ids.shape):
        raise ValueError(f"shift_labels must have input_ids' shape {list(input_ids.shape)}, got "
                         f"{list(getattr(shift_labels, 'shape', []))}")
    aux = _router_aux_loss(model, cfg, model_kwargs.pop("output_router_logits", None))
    if aux is not None:
        model_kwargs["output_router_logits"] = True
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    shifted = F.pad(labels, (0, 1), value=ignore_index)[:, 1:] if shift_labels is None else shift_labels
    loss = head_cross_entropy(hidden, head, shifted, ignore_index=ignore_index, label_smoothing=label_smoothing,
                              z_loss=z_loss, chunk_size=chunk_size,
                              reduction="mean" if num_items_in_batch is None else "sum")
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                       else num_items_in_batch)
    if aux is not None:
        loss = loss + model.router_aux_loss_coef * aux(out.router_logits, model.num_experts, model.num_experts_per_tok,
                                                       attention_mask).to(loss.device)
    return loss


def _router_aux_loss(model: nn.Module, cfg, wanted: Optional[bool]):
    """The model module's ``load_balancing_loss_func`` when an MoE model's router loss is on (``wanted``, else its
    config's ``output_router_logits``), else None; ValueError when it is on and cannot be computed as the model
    does."""
    import sys

    on = bool(getattr(cfg, "output_router_logits", False)) if wanted is None else bool(wanted)
    if not on:
        return None
    fn = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    missing = [a for a in ("num_experts", "num_experts_per_tok", "router_aux_loss_coef") if not hasattr(model, a)]
    if fn is None or missing:
        raise ValueError(f"causal_lm_loss: output_router_logits is on, but {type(model).__name__} has no "
                         f"{'load_balancing_loss_func in its module' if fn is None else ', '.join(missing)}: its "
                         "router loss cannot be added as the model adds it (turn output_router_logits off)")
    return fn
