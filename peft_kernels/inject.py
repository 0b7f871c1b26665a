"""Swap fused LoRA layers into an existing model in place, with HF PEFT's ``target_modules`` rules.

    names = peft_kernels.inject_lora(model, ["q_proj", "v_proj"], r=16, lora_alpha=32)
    names = peft_kernels.inject_multi_lora(model, "all-linear", max_adapters=8, max_rank=16)
    peft_kernels.merge_lora(model); peft_kernels.unmerge_lora(model)
    torch.save(peft_kernels.lora_state_dict(model), ...)   # only the trainable LoRA tensors

Matching (PEFT's ``check_target_module_exists``): a ``str`` is a regex that must ``re.fullmatch`` the
module's qualified name; a list matches a name equal to an entry or ending in ``"." + entry``;
``"all-linear"`` is every nn.Linear / Conv1D except the output head (``model.get_output_embeddings()``,
or a module named ``lm_head`` when the model has no such method). ``exclude_modules`` uses the same rules.
Every match is checked before anything is replaced: a module of another type, or nothing matched, raises
and leaves the model as it was. After injection only LoRA parameters are trainable (as PEFT's
``get_peft_model`` leaves a model).
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import quant
from .nn.ia3 import IA3Linear
from .nn.lora import LoRALinear, is_conv1d
from .nn.multi_lora import MultiLoRALinear

Targets = Union[str, Sequence[str]]
LORA_TYPES = (LoRALinear, MultiLoRALinear)
ADAPTER_TYPES = (LoRALinear, MultiLoRALinear, IA3Linear)
ADAPTER_PARAMS = ("lora_A", "lora_B", "lora_B_bias", "lora_magnitude_vector", "ia3_l")  # trainable: all else frozen


def _check_targets(targets, what: str, allow_none: bool = False):
    if targets is None and allow_none:
        return None
    if isinstance(targets, str):
        if targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as e:
                raise ValueError(f"{what} is not a valid regex ({e}): {targets!r}") from None
        return targets
    if isinstance(targets, Iterable):
        out = list(targets)
        if not out or not all(isinstance(t, str) and t for t in out):
            raise TypeError(f"{what} must be a regex string, 'all-linear', or a non-empty list of module names, "
                            f"got {targets!r}")
        return out
    raise TypeError(f"{what} must be a regex string, 'all-linear', or a list of module names, got "
                    f"{type(targets).__name__}")


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _is_linear(m: nn.Module) -> bool:
    return (isinstance(m, nn.Linear) or is_conv1d(m)) and not isinstance(m, ADAPTER_TYPES)


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module):
            return head
    return getattr(model, "lm_head", None) if isinstance(getattr(model, "lm_head", None), nn.Module) else None


def find_targets(model: nn.Module, target_modules: Targets, exclude_modules: Optional[Targets] = None) -> List[str]:
    """Qualified names of the layers ``target_modules`` selects (validated: every one is an nn.Linear or
    Conv1D). Raises ValueError when nothing matches or a match is another kind of module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = _check_targets(target_modules, "target_modules")
    exclude = _check_targets(exclude_modules, "exclude_modules", allow_none=True)
    head = _output_head(model) if targets == "all-linear" else None
    names = []
    for name, mod in model.named_modules():
        if not name or (exclude is not None and _matches(name, exclude)):
            continue
        if targets == "all-linear":
            if _is_linear(mod) and mod is not head:
                quant.check_layer(mod, name)
                names.append(name)
            continue
        if not _matches(name, targets):
            continue
        if isinstance(mod, ADAPTER_TYPES):
            raise ValueError(f"module {name!r} already is a {type(mod).__name__}: an adapter is injected once")
        if quant.is_other_quantized(mod):
            raise quant.UnsupportedQuantization(f"module {name!r} is a {type(mod).__name__}, a quantized layer type "
                                                f"peft_kernels does not support; supported: {quant.SUPPORTED}")
        quant.check_layer(mod, name)
        if not _is_linear(mod):
            raise ValueError(f"target module {name!r} is a {type(mod).__name__}; only nn.Linear and transformers' "
                             f"Conv1D can take LoRA (narrow target_modules)")
        names.append(name)
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear/Conv1D in the model")
    return names


def _replace(model: nn.Module, names: List[str], make: Callable[[nn.Module], nn.Module]) -> List[str]:
    """Swap in the new layers, then freeze every parameter that is not LoRA (PEFT's
    ``mark_only_lora_as_trainable``)."""
    new = {n: make(model.get_submodule(n)) for n in names}  # build all first: a failure changes nothing
    # a layer reachable under several names (aliased, e.g. tied) is replaced under every one of them by the
    # same new module, so the model stays tied
    paths: Dict[int, List[str]] = {}
    for n, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(n)
    ids = {n: id(model.get_submodule(n)) for n in new}
    for n, m in new.items():
        for alias in paths.get(ids[n], [n]):
            parent, _, child = alias.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m)
    lora = {id(p) for m in model.modules() if isinstance(m, ADAPTER_TYPES)
            for p in (getattr(m, k, None) for k in ADAPTER_PARAMS) if p is not None}
    for p in model.parameters():
        if id(p) not in lora:
            p.requires_grad_(False)
    return names


def inject_lora(model: nn.Module, target_modules: Targets, r: int = 8, lora_alpha: float = 8,
                lora_dropout: float = 0.0, use_rslora: bool = False, exclude_modules: Optional[Targets] = None,
                backend: str = "auto", init_lora_weights: Union[bool, str] = True,
                lora_dtype: Optional[torch.dtype] = None, use_dora: bool = False) -> List[str]:
    """Replace the matching nn.Linear / Conv1D layers of ``model`` with :class:`LoRALinear` (the same frozen
    weight Parameters, fresh LoRA parameters; DoRA with ``use_dora=True``) in place; returns their
    qualified names."""
    names = find_targets(model, target_modules, exclude_modules)
    return _replace(model, names, lambda lin: LoRALinear.from_linear(
        lin, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
        init_lora_weights=init_lora_weights, backend=backend, lora_dtype=lora_dtype, use_dora=use_dora))


def inject_ia3(model: nn.Module, target_modules: Targets, feedforward_modules: Optional[Targets] = None,
               exclude_modules: Optional[Targets] = None, backend: str = "auto") -> List[str]:
    """Replace the matching linear layers with :class:`IA3Linear` (PEFT ``IA3Config`` rules: a target that
    also matches ``feedforward_modules`` scales its input, the others their output); returns the names."""
    names = find_targets(model, target_modules, exclude_modules)
    if feedforward_modules is not None:
        _check_targets(feedforward_modules, "feedforward_modules")
    ff = {id(model.get_submodule(n)) for n in names
          if feedforward_modules is not None and _matches(n, feedforward_modules)}
    return _replace(model, names, lambda lin: IA3Linear.from_linear(lin, feedforward=id(lin) in ff, backend=backend))


def inject_multi_lora(model: nn.Module, target_modules: Targets, max_adapters: int = 8, max_rank: int = 16,
                      exclude_modules: Optional[Targets] = None, backend: str = "auto",
                      lora_dtype: Optional[torch.dtype] = None) -> List[str]:
    """Replace the matching layers with :class:`MultiLoRALinear` (all slots empty); returns their names.
    Set the ids for a whole forward with ``peft_kernels.adapter_ids(model, ids)``."""
    names = find_targets(model, target_modules, exclude_modules)
    return _replace(model, names, lambda lin: MultiLoRALinear.from_linear(
        lin, max_adapters=max_adapters, max_rank=max_rank, backend=backend, lora_dtype=lora_dtype))


def _lora_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module, safe_merge: bool = False) -> List[str]:
    """Fold every unmerged LoRALinear's update into its weight; returns the layers merged. With
    ``safe_merge`` all merges are checked for NaN/Inf first, and none happens if one would fail."""
    todo = [(n, m) for n, m in _lora_layers(model) if not m.merged]
    if safe_merge:
        for n, m in todo:
            if not torch.isfinite(m._merged_weight_fp32()).all():  # DoRA: the rescaled weight
                raise ValueError(f"merge_lora(safe_merge=True): merging {n!r} would produce NaN/Inf weights; "
                                 "nothing was merged")
    for _, m in todo:
        m.merge()
    return [n for n, _ in todo]


def unmerge_lora(model: nn.Module) -> List[str]:
    """Undo :func:`merge_lora` on every merged LoRALinear; returns the layers unmerged."""
    todo = [(n, m) for n, m in _lora_layers(model) if m.merged]
    for _, m in todo:
        m.unmerge()
    return [n for n, _ in todo]


def lora_state_dict(model: nn.Module) -> dict:
    """The trainable LoRA tensors only (``<layer>.lora_A`` / ``<layer>.lora_B`` of every LoRALinear and
    MultiLoRALinear, plus MultiLoRALinear's ``scalings``/``ranks`` buffers), detached, under the keys of
    ``model.state_dict()``."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LORA_TYPES):
            pre = f"{name}." if name else ""
            keys = ("lora_A", "lora_B") + (("lora_B_bias",) if getattr(m, "lora_bias", False) else ()) + (
                ("lora_magnitude_vector",) if getattr(m, "use_dora", False) else ()) + (
                ("scalings", "ranks") if isinstance(m, MultiLoRALinear) else ())
            for key in keys:
                out[pre + key] = getattr(m, key).detach()
    return out
