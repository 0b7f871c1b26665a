"""LoRA on the 3-D expert weights of transformers' MoE models (HF PEFT's ``target_parameters``): ``LoRAExperts``.

``inject_lora(model, [], target_parameters=["experts.gate_up_proj", "experts.down_proj"], r=16)`` wraps each
matching experts module (Mixtral, Qwen3-MoE and the other fused ``gate_up_proj`` [E, 2I, H] / ``down_proj``
[E, H, I] experts of transformers 5) in a ``LoRAExperts``. Its forward groups the routed tokens by expert once
and runs both projections, each expert's frozen GEMM plus its own LoRA update, through ``ops.moe`` (forward and
backward per expert; no ``[E, out, in]`` delta is built).

Layout: ``lora_A[p]`` ``[E, r, in]``, ``lora_B[p]`` ``[E, out, r]`` for parameter ``p``. PEFT keeps one
``nn.Linear(in, r·E)`` / ``nn.Linear(r·E, out)`` pair per parameter: ``A_peft = A.reshape(E·r, in)``,
``B_peft = B.permute(1, 2, 0).reshape(out, r·E)``; its wrappers nest in the order the experts module registers the
parameters, the first innermost, so the first of two targeted parameters is saved under
``<experts>.base_layer.lora_A.weight`` and the second under ``<experts>.lora_A.weight``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..ops.moe import moe_experts_forward
from ._disabled import adapters_disabled
from .lora import _check_unmerged

PARAMS = ("gate_up_proj", "down_proj")


def unsupported_reason(m: nn.Module) -> Optional[str]:
    """Why ``m`` is not a fused-experts module ``LoRAExperts`` computes exactly (None when it is)."""
    import importlib.util

    try:  # the experts-implementation flags read below come from transformers 5's integrations.moe
        found = importlib.util.find_spec("transformers.integrations.moe") is not None
    except ImportError:
        found = False
    if not found:
        return "transformers with integrations.moe (5.x) is required"
    gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    if not isinstance(gu, nn.Parameter) or not isinstance(dn, nn.Parameter) or gu.dim() != 3 or dn.dim() != 3:
        return "no 3-D gate_up_proj and down_proj Parameters"
    flags = {"has_gate": True, "has_bias": False, "has_post_expert_norm": False, "is_transposed": False,
             "is_concatenated": True, "_is_expert_parallel": False}
    for k, want in flags.items():
        if getattr(m, k, None) is not want:
            return f"{k}={getattr(m, k, None)} (supported: {want})"
    E, twoI, H = gu.shape
    if tuple(dn.shape) != (E, H, twoI // 2) or twoI % 2:
        return f"gate_up_proj {tuple(gu.shape)} and down_proj {tuple(dn.shape)} are not [E, 2I, H] and [E, H, I]"
    if not hasattr(m, "_apply_gate"):
        return "no _apply_gate"
    return None


class LoRAExperts(nn.Module):
    """A transformers fused-experts module (``base_layer``) with LoRA on ``gate_up_proj`` and/or ``down_proj``.

    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`` as the experts module's. No
    dropout (PEFT refuses it on ``target_parameters`` too: x cannot be factored out of a weight update).
    ``backend``: the grouped op's (``ops.moe.grouped_lora_linear``): "auto", "torch" or "triton"."""

    def __init__(self, base: nn.Module, params: Sequence[str], r: int = 8, lora_alpha: float = 8,
                 use_rslora: bool = False, init_lora_weights=True, lora_dtype: Optional[torch.dtype] = None,
                 backend: str = "auto"):
        super().__init__()
        from .. import dispatch

        dispatch._check_name(backend, "backend")
        why = unsupported_reason(base)
        if why is not None:
            raise TypeError(f"LoRAExperts: {type(base).__name__} is not supported: {why}")
        params = [p for p in PARAMS if p in set(params)]
        bad = sorted(set(params) - set(PARAMS))
        if not params or bad:
            raise ValueError(f"params must name gate_up_proj and/or down_proj, got {list(params)}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
        self.base_layer = base
        self.backend = backend
        self.targets = params
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, bool(use_rslora)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False
        # what save_peft_adapter's config reader asks of every LoRA layer
        self.fan_in_fan_out, self.lora_bias, self.use_dora, self.lora_dropout = None, False, False, 0.0
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in params:
            W = getattr(base, name)
            E, N, K = W.shape
            dt = lora_dtype or W.dtype
            a = torch.empty(E * r, K, device=W.device, dtype=dt)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's nn.Linear(K, r·E) init
            b = torch.zeros(N, r * E, device=W.device, dtype=dt)
            if init_lora_weights is False:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(a.view(E, r, K))
            self.lora_B[name] = nn.Parameter(_b_from_peft(b, E))

    # ------------------------------------------------------------------------------------ forward
    def _lora(self, name: str):
        return (self.lora_A[name], self.lora_B[name], self.scaling) if name in self.lora_A else None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        base = self.base_layer
        if adapters_disabled(self) or self.merged:
            if adapters_disabled(self):
                _check_unmerged(self)
            return base(hidden_states, top_k_index, top_k_weights)
        return moe_experts_forward(hidden_states, top_k_index, top_k_weights, base.gate_up_proj, base.down_proj,
                                   gate_up_lora=self._lora("gate_up_proj"), down_lora=self._lora("down_proj"),
                                   apply_gate=base._apply_gate, backend=self.backend)

    # ------------------------------------------------------------------------------------ merge
    def delta(self, name: str) -> torch.Tensor:
        """``s·B_e·A_e`` for every expert, ``[E, out, in]`` in the weight's dtype (fp32 math)."""
        A, B = self.lora_A[name], self.lora_B[name]
        W = getattr(self.base_layer, name)
        dt = torch.promote_types(W.dtype, torch.float32)
        return (torch.bmm(B.to(dt), A.to(dt)) * self.scaling).to(W.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            for name in self.targets:
                getattr(self.base_layer, name).add_(self.delta(name))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            for name in self.targets:
                getattr(self.base_layer, name).sub_(self.delta(name))
            self.merged = False

    # ------------------------------------------------------------------------------------ PEFT layout
    def peft_tensors(self, prefix: str) -> Dict[str, torch.Tensor]:
        """This layer's LoRA under PEFT's keys (``prefix`` = the module's qualified name plus PEFT's prefix)."""
        out = {}
        n = len(self.targets)
        for j, name in enumerate(self.targets):
            A, B = self.lora_A[name].detach(), self.lora_B[name].detach()
            E, r, K = A.shape
            key = f"{prefix}.{'base_layer.' * (n - 1 - j)}"
            out[key + "lora_A.weight"] = A.reshape(E * r, K).to("cpu").contiguous()
            out[key + "lora_B.weight"] = B.permute(1, 2, 0).reshape(B.shape[1], r * E).to("cpu").contiguous()
        return out

    def extra_repr(self) -> str:
        return f"targets={self.targets}, r={self.r}, lora_alpha={self.lora_alpha}, experts={self.lora_A[self.targets[0]].shape[0]}"


def _b_from_peft(b: torch.Tensor, E: int) -> torch.Tensor:
    """PEFT's ``lora_B`` weight ``[out, r·E]`` as ``[E, out, r]``."""
    N = b.shape[0]
    return b.reshape(N, -1, E).permute(2, 0, 1).contiguous()


def find_expert_targets(model: nn.Module, target_parameters: Sequence[str]) -> Dict[str, List[str]]:
    """{experts module name: [targeted parameter names]}, PEFT's rule: ``<module>.<param>`` equals an entry or ends
    with ``.<entry>``. A matched module that ``LoRAExperts`` cannot compute, or a matched parameter it does not
    hold, is a TypeError/ValueError naming it."""
    if isinstance(target_parameters, str) or not isinstance(target_parameters, (list, tuple)) or \
            not all(isinstance(t, str) and t for t in target_parameters):
        raise TypeError(f"target_parameters must be a list of names, got {target_parameters!r}")
    out: Dict[str, List[str]] = {}
    for mname, m in model.named_modules():
        if isinstance(m, LoRAExperts):
            continue
        for pname, _ in m.named_parameters(recurse=False):
            key = f"{mname}.{pname}" if mname else pname
            if any(key == t or key.endswith("." + t) for t in target_parameters):
                why = unsupported_reason(m)
                if why is not None:
                    raise TypeError(f"target_parameters: {key!r} is in a {type(m).__name__}, which LoRAExperts "
                                    f"does not support: {why}")
                if pname not in PARAMS:
                    raise ValueError(f"target_parameters: {key!r}: only gate_up_proj and down_proj are supported")
                out.setdefault(mname, []).append(pname)
    if not out:
        raise ValueError(f"target_parameters {list(target_parameters)} matched no parameter of the model")
    return out


def plan_peft_load(model: nn.Module, cfg: dict, sd: Dict[str, torch.Tensor], prefix: str, src: str):
    """The LoRAExperts a PEFT config with ``target_parameters`` describes, validated against ``sd``: returns
    ({module name: (params, {param: (A [E, r, in], B [E, out, r])})}, the rest of ``sd``)."""
    from ..checkpoint import CheckpointError

    try:
        targets = find_expert_targets(model, list(cfg["target_parameters"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{src}: {e}") from None
    r = cfg.get("r")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CheckpointError(f"{src}: rank_pattern/alpha_pattern with target_parameters are not supported")
    if float(cfg.get("lora_dropout", 0.0) or 0.0) != 0.0:
        raise CheckpointError(f"{src}: lora_dropout must be 0 with target_parameters (PEFT refuses it too)")
    rest = dict(sd)
    plans = {}
    for mname, params in targets.items():
        m = model.get_submodule(mname)
        got = {}
        for j, p in enumerate(params):
            key = f"{prefix}{mname}.{'base_layer.' * (len(params) - 1 - j)}"
            A, B = rest.pop(key + "lora_A.weight", None), rest.pop(key + "lora_B.weight", None)
            if A is None or B is None:
                raise CheckpointError(f"{src}: {mname}.{p}: {key}lora_A.weight / lora_B.weight missing")
            E, N, K = getattr(m, p).shape
            if tuple(A.shape) != (E * r, K) or tuple(B.shape) != (N, E * r):
                raise CheckpointError(f"{src}: {mname}.{p}: LoRA shapes {tuple(A.shape)} / {tuple(B.shape)}, expected "
                                      f"{(E * r, K)} / {(N, E * r)} (E={E}, r={r})")
            got[p] = (A.reshape(E, r, K), _b_from_peft(B, E))
        plans[mname] = (params, got)
    stray = [k for k in rest if ".base_layer.lora_" in k and any(k.startswith(f"{prefix}{n}.") for n in targets)]
    if stray:
        raise CheckpointError(f"{src}: unexpected keys {stray[:4]} for the targeted experts")
    return plans, rest
