"""Per-slice LoRA on a packed projection (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``, a packed ``gate_up_proj``):
``PackedLoRALinear``.

The packed layer's output is the concatenation of its slices (q | k | v); each slice gets its own adapter (rank,
scale, dropout), so an adapter trained on separate q/k/v projections computes the same function here. The forward
is ``lora_siblings`` (``ops/siblings.py``) on the packed weight itself: one GEMM, one stacked shrink, per-slice
expands; backward likewise.

    pk.inject_packed_lora(model, {"c_attn": ["q", "k", "v"]}, r=8)                 # equal slices
    pk.inject_packed_lora(model, {"qkv_proj": {"q": 3072, "k": 1024, "v": 1024}}, r=8)  # GQA widths
    pk.load_peft_adapter(model, "llama_style_adapter/", packed={"qkv_proj": ["q_proj", "k_proj", "v_proj"]})

State: the base ``weight``/``bias`` (the packed layer's own Parameters, keys unchanged), ``lora_A.<slice>``
``[r_i, in]`` and ``lora_B.<slice>`` ``[out_i, r_i]``. ``save_peft_adapter`` writes each slice as the separate
projection ``<parent>.<slice>`` PEFT would have for an unpacked model (``to_separate``), or, for a model PEFT keeps
packed, ``peft_packed_tensors`` gives the exactly equivalent single LoRA on the packed layer (rank Σr_i, ``B``
block-diagonal with each slice's scale folded in, scaling 1).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Union

import torch
import torch.nn as nn

from ..ops.siblings import lora_siblings
from ._disabled import adapters_disabled
from .lora import _check_unmerged, adopt_frozen_base, base_features, is_conv1d


class PackedLoRALinear(nn.Module):
    def __init__(self, base: nn.Module, slices: Dict[str, int], r: Union[int, Dict[str, int]] = 8,
                 lora_alpha: Union[float, Dict[str, float]] = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights=True):
        super().__init__()
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            raise TypeError(f"PackedLoRALinear: the base must be nn.Linear or Conv1D, got {type(base).__name__}")
        K, N = base_features(base)
        if not isinstance(slices, dict) or len(slices) < 2 or not all(
                isinstance(k, str) and k and isinstance(v, int) and not isinstance(v, bool) and v > 0
                for k, v in slices.items()):
            raise ValueError(f"slices must map at least 2 slice names to positive widths, got {slices!r}")
        if sum(slices.values()) != N:
            raise ValueError(f"slices {slices} sum to {sum(slices.values())}, but the layer has {N} outputs")
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
            raise ValueError(f"lora_dropout must be a float in [0, 1), got {lora_dropout!r}")
        adopt_frozen_base(self, base, K, N, base.bias is not None, None, None)
        self.slices = dict(slices)
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.merged = False
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        dev, dt = self.weight.device, self.weight.dtype
        for name, n in self.slices.items():
            ri = r[name] if isinstance(r, dict) else r
            ai = lora_alpha[name] if isinstance(lora_alpha, dict) else lora_alpha
            if isinstance(ri, bool) or not isinstance(ri, int) or ri < 1:
                raise ValueError(f"r for slice {name!r} must be a positive int, got {ri!r}")
            if isinstance(ai, bool) or not isinstance(ai, (int, float)) or not math.isfinite(ai):
                raise ValueError(f"lora_alpha for slice {name!r} must be a finite number, got {ai!r}")
            self.r[name], self.lora_alpha[name] = ri, ai
            self.scaling[name] = ai / (math.sqrt(ri) if use_rslora else ri)
            a = torch.empty(ri, K, device=dev, dtype=dt)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b = torch.zeros(n, ri, device=dev, dtype=dt)
            if init_lora_weights is False:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            self.lora_A[name], self.lora_B[name] = nn.Parameter(a), nn.Parameter(b)

    def base_weight(self) -> torch.Tensor:
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if adapters_disabled(self) or self.merged:
            if adapters_disabled(self):
                _check_unmerged(self)
            return nn.functional.linear(x, self.base_weight(), self.bias)
        names = list(self.slices)
        return lora_siblings(x, self.base_weight(), self.bias, [self.lora_A[n] for n in names],
                             [self.lora_B[n] for n in names], [self.scaling[n] for n in names],
                             [self.lora_dropout] * len(names), training=self.training)

    # ------------------------------------------------------------------------------------ merge
    def delta_weight(self) -> torch.Tensor:
        """The packed update ``[out, in]``: each slice's ``s_i·B_i·A_i`` in its rows (fp32, fp64 for fp64 weights)."""
        dt = torch.promote_types(self.weight.dtype, torch.float32)
        return torch.cat([self.scaling[n] * (self.lora_B[n].to(dt) @ self.lora_A[n].to(dt)) for n in self.slices])

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            d = self.delta_weight().to(self.weight.dtype)
            self.weight.add_(d.t() if self.fan_in_fan_out else d)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            d = self.delta_weight().to(self.weight.dtype)
            self.weight.sub_(d.t() if self.fan_in_fan_out else d)
            self.merged = False

    # ------------------------------------------------------------------------------------ PEFT layouts
    def peft_packed_tensors(self, prefix: str) -> Dict[str, torch.Tensor]:
        """One LoRA on the packed layer equal to the per-slice ones: ``A = [A_1; …; A_n]`` ``[Σr, in]``,
        ``B = blockdiag(s_1·B_1, …, s_n·B_n)`` ``[out, Σr]``, to be saved with rank Σr and lora_alpha Σr (scaling 1)."""
        A = torch.cat([self.lora_A[n].detach() for n in self.slices])
        B = torch.block_diag(*[self.lora_B[n].detach() * self.scaling[n] for n in self.slices])
        return {f"{prefix}.lora_A.weight": A.to("cpu").contiguous(), f"{prefix}.lora_B.weight": B.to("cpu").contiguous()}

    def peft_view(self):
        """What ``save_peft_adapter`` writes: the equivalent single LoRA on the packed layer (rank Σr, scaling 1)."""
        return _PeftView(self)

    def extra_repr(self) -> str:
        return f"slices={self.slices}, r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}"


class _PeftView:
    """A PackedLoRALinear as one LoRA layer for the checkpoint writer: A = [A_i], B = blockdiag(s_i·B_i), rank Σr
    with lora_alpha chosen so that PEFT's scaling is 1."""

    def __init__(self, m: PackedLoRALinear):
        t = m.peft_packed_tensors("x")
        self.lora_A, self.lora_B = t["x.lora_A.weight"], t["x.lora_B.weight"]
        self.r = int(self.lora_A.shape[0])
        self.use_rslora = m.use_rslora
        self.lora_alpha = math.sqrt(self.r) if m.use_rslora else float(self.r)
        self.fan_in_fan_out, self.lora_dropout = m.fan_in_fan_out, m.lora_dropout
        self.lora_bias, self.use_dora = False, False


def _slices_for(base: nn.Module, spec) -> Dict[str, int]:
    if isinstance(spec, dict):
        return dict(spec)
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, str) for s in spec):
        _, N = base_features(base)
        if N % len(spec):
            raise ValueError(f"{N} outputs do not split evenly into slices {list(spec)}: give their widths")
        return {s: N // len(spec) for s in spec}
    raise ValueError(f"a packed layer's slices must be a list of names or a {{name: width}} dict, got {spec!r}")


def inject_packed_lora(model: nn.Module, packed: Dict[str, Union[Sequence[str], Dict[str, int]]], r=8,
                       lora_alpha=8, lora_dropout: float = 0.0, use_rslora: bool = False,
                       init_lora_weights=True) -> List[str]:
    """Replace every module whose name ends with a key of ``packed`` (nn.Linear or Conv1D) by a
    :class:`PackedLoRALinear` with those slices; returns the names. Everything is built before the model changes."""
    from ..inject import _replace

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(packed, dict) or not packed:
        raise ValueError(f"packed must map module names to slices, got {packed!r}")
    names = [n for n, m in model.named_modules() if n and any(n == k or n.endswith("." + k) for k in packed)]
    if not names:
        raise ValueError(f"packed {list(packed)} matched no module of the model")
    specs = {n: next(v for k, v in packed.items() if n == k or n.endswith("." + k)) for n in names}
    objs = {id(model.get_submodule(n)): n for n in names}

    def make(lin):
        n = objs[id(lin)]
        return PackedLoRALinear(lin, _slices_for(lin, specs[n]), r=r, lora_alpha=lora_alpha,
                                lora_dropout=lora_dropout, use_rslora=use_rslora, init_lora_weights=init_lora_weights)
    return _replace(model, names, make)


def plan_packed_load(model: nn.Module, cfg: dict, sd: Dict[str, torch.Tensor], packed, prefix: str, src: str):
    """The PackedLoRALinear layers a separate-projection adapter fills: for every model module whose name ends
    with a key of ``packed`` (e.g. ``qkv_proj``), the checkpoint's LoRA of its siblings ``<parent>.<part>`` (e.g.
    q_proj, k_proj, v_proj). Returns ({packed module: {part: (A, B, r, alpha)}}, the rest of ``sd``); raises
    CheckpointError naming what does not fit (a missing part, widths that do not add up, a bias or DoRA)."""
    from ..checkpoint import CheckpointError, _pattern_value

    if not isinstance(packed, dict) or not packed or not all(
            isinstance(k, str) and k and isinstance(v, (list, tuple)) and len(v) >= 2 and
            all(isinstance(p, str) and p for p in v) for k, v in packed.items()):
        raise CheckpointError(f"{src}: packed must map a packed module name to its separate projections' names "
                              f"(at least 2), got {packed!r}")
    r0, a0 = int(cfg["r"]), float(cfg["lora_alpha"])
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rest = dict(sd)
    plans: Dict[str, Dict[str, tuple]] = {}
    for n, m in model.named_modules():
        key = next((k for k in packed if n and (n == k or n.endswith("." + k))), None)
        if key is None:
            continue
        parent = n.rpartition(".")[0]
        full = {p: (f"{parent}.{p}" if parent else p) for p in packed[key]}
        have = {p: f for p, f in full.items() if f"{prefix}{f}.lora_A.weight" in rest}
        if not have:
            continue
        if len(have) != len(full):
            raise CheckpointError(f"{src}: {n!r} packs {list(full)}, but the adapter has LoRA for {list(have)} only")
        if not (isinstance(m, nn.Linear) or is_conv1d(m)):
            raise CheckpointError(f"{src}: {n!r} is a {type(m).__name__}, not a packed nn.Linear/Conv1D")
        K, N = base_features(m)
        got = {}
        for p, f in full.items():
            A, B = rest.pop(f"{prefix}{f}.lora_A.weight"), rest.pop(f"{prefix}{f}.lora_B.weight", None)
            extra = [k for k in rest if k.startswith(f"{prefix}{f}.")]
            if B is None or extra:
                raise CheckpointError(f"{src}: {f!r}: a packed slice takes lora_A/lora_B weights only (missing "
                                      f"lora_B or extra {extra[:3]})")
            r = _pattern_value(rp, f, r0)
            if A.dim() != 2 or B.dim() != 2 or tuple(A.shape) != (r, K) or B.shape[1] != r:
                raise CheckpointError(f"{src}: {f!r}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit "
                                      f"r={r} and {n!r}'s {K} inputs")
            got[p] = (A, B, r, _pattern_value(ap, f, a0))
        widths = [got[p][1].shape[0] for p in full]
        if sum(widths) != N:
            raise CheckpointError(f"{src}: {list(full)} have {widths} outputs, {sum(widths)} in all; {n!r} has {N}")
        plans[n] = got
    if not plans:
        raise CheckpointError(f"{src}: packed={packed!r} matched no packed module whose parts the adapter holds")
    return plans, rest
