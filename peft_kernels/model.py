"""Model-level controls for a model that ``inject_lora`` / ``inject_ia3`` / ``inject_multi_lora`` /
``load_peft_adapter`` / ``from_peft`` put adapters into (HF PEFT's ``PeftModel`` methods, as functions):

    peft_kernels.print_trainable_parameters(model)      # PEFT's line: trainable params: ... || all params: ...
    with peft_kernels.disable_adapters(model):          # base-only outputs (no weight copy)
        base_logits = model(ids)
    model = peft_kernels.merge_and_unload(model)         # plain nn.Linear/Conv1D/nn.Embedding, merged weights
    model = peft_kernels.unload(model)                   # the original layers, without the update

and ``modules_to_save`` / ``task_type`` (trained heads): the named modules become trainable copies
(:class:`~peft_kernels.nn.saved.ModulesToSave`), saved and loaded with the adapter under PEFT's keys.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .nn import _disabled
from .nn.saved import ModulesToSave

# PEFT's task types, and the heads each one trains in full (PeftModelFor<Task> adds them to modules_to_save)
TASK_TYPE_MODULES: Dict[Optional[str], Tuple[str, ...]] = {
    None: (), "CAUSAL_LM": (), "SEQ_2_SEQ_LM": (), "FEATURE_EXTRACTION": (),
    "SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",),
}


def _adapter_types():
    from .inject import ADAPTER_TYPES, _embedding_types

    return ADAPTER_TYPES + _embedding_types()


def _check_model(model, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be a torch.nn.Module, got {type(model).__name__}")


# ------------------------------------------------------------------------------------ modules_to_save
def check_task_type(task_type) -> Optional[str]:
    if task_type is not None and not isinstance(task_type, str):
        raise TypeError(f"task_type must be a str or None, got {type(task_type).__name__}")
    key = task_type.upper() if isinstance(task_type, str) else None
    if key not in TASK_TYPE_MODULES:
        raise ValueError(f"task_type must be one of {[k for k in TASK_TYPE_MODULES if k]} or None, got {task_type!r}")
    return key


def save_rules(modules_to_save, task_type) -> Tuple[List[str], List[str]]:
    """(the user's names, the task type's default heads), validated. Names follow PEFT's rule: a module whose
    qualified name ends with the entry."""
    if modules_to_save is None:
        explicit: List[str] = []
    elif isinstance(modules_to_save, str) or not isinstance(modules_to_save, (list, tuple, set)) or not all(
            isinstance(n, str) and n for n in modules_to_save):
        raise TypeError(f"modules_to_save must be a list of module names (PEFT's rule: a module whose name ends with "
                        f"an entry), got {modules_to_save!r}")
    else:
        explicit = list(dict.fromkeys(modules_to_save))
    return explicit, [n for n in TASK_TYPE_MODULES[check_task_type(task_type)] if n not in explicit]


def find_modules_to_save(model: nn.Module, explicit: Sequence[str], defaults: Sequence[str] = (),
                         task_type: Optional[str] = None, what: str = "modules_to_save") -> List[str]:
    """Qualified names of the modules the rules select: outermost matches only, never the model itself nor a
    module inside an adapter layer. Every explicit entry must match; of the task type's defaults, one must."""
    adapters = _adapter_types()
    found: List[str] = []
    used = set()
    inside: List[str] = []  # prefixes whose modules are not taken (adapter layers, already chosen ones)
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(mod, adapters):
            inside.append(name)
            continue
        hit = [r for r in list(explicit) + list(defaults) if name.endswith(r)]
        if hit:
            used.update(hit)
            found.append(name)
            inside.append(name)
    missing = [r for r in explicit if r not in used]
    if missing:
        raise ValueError(f"{what} {missing} matched no module of the model (PEFT's rule: a module whose name ends "
                         "with the entry)")
    if defaults and not any(r in used for r in defaults) and not explicit:
        raise ValueError(f"task_type={task_type!r} trains the head {list(defaults)}, and the model has no module of "
                         "that name; pass modules_to_save=[...] naming its head")
    return found


def wrap_modules_to_save(model: nn.Module, names: Sequence[str]) -> List[str]:
    """Replace each named module by a :class:`ModulesToSave` (a trainable copy; the original kept frozen) under
    every name it has (tied modules stay tied). Already-wrapped modules are left as they are."""
    from .inject import _module_paths, _set_module, frozen_by_us

    paths = _module_paths(model)
    with frozen_by_us(model):
        for n in names:
            mod = model.get_submodule(n)
            if isinstance(mod, ModulesToSave):
                for p in mod.trained.parameters():
                    p.requires_grad_(True)
                continue
            new = ModulesToSave(mod)
            for alias in paths.get(id(mod), [n]):
                _set_module(model, alias, new)
    return list(names)


def saved_modules(model: nn.Module) -> List[Tuple[str, ModulesToSave]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]


def unsaved_trainable(model: nn.Module) -> List[str]:
    """Names of trainable parameters that no adapter checkpoint would hold (neither adapter parameters nor a
    ``ModulesToSave`` copy's)."""
    from .inject import adapter_parameter_ids

    keep = adapter_parameter_ids(model)
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in keep]


def warn_unsaved(model: nn.Module, what: str) -> None:
    lost = unsaved_trainable(model)
    if lost:
        heads = sorted({n.rsplit(".", 1)[0] for n in lost})
        warnings.warn(f"{what}: {len(lost)} trainable parameters are not part of the adapter and are NOT saved "
                      f"({lost[:6]}{' ...' if len(lost) > 6 else ''}); to save a trained head, inject with "
                      f"modules_to_save={heads[:4]} (or task_type=...)", UserWarning, stacklevel=3)


# ------------------------------------------------------------------------------------ controls
@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block, every adapter layer of ``model`` computes its base output only, and each
    ``modules_to_save`` module runs its original (PEFT's ``with model.disable_adapter():``). No weight is
    copied or changed; the block holds for the current thread and asyncio task only. A merged LoRA layer raises
    (its weight holds the update): unmerge it first."""
    _check_model(model, "disable_adapters")
    adapters = _adapter_types() + (ModulesToSave,)
    mods = [m for m in model.modules() if isinstance(m, adapters)]
    if not mods:
        raise ValueError("disable_adapters(): the model has no adapter layers")
    merged = [n for n, m in model.named_modules() if getattr(m, "merged", False) and isinstance(m, adapters)]
    if merged:
        raise ValueError(f"disable_adapters(): {merged[:4]} are merged (their weights hold the update); "
                         "peft_kernels.unmerge_lora(model) first")
    token = _disabled.push(mods)
    try:
        yield model
    finally:
        _disabled.pop(token)


def trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, all) parameter counts as PEFT's ``get_nb_trainable_parameters`` counts them (a bitsandbytes
    4-bit weight counts 2 per stored byte; the frozen original of a ``modules_to_save`` module counts too)."""
    _check_model(model, "trainable_parameters")
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            n = n * 2 * p.element_size()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's line: ``trainable params: 1,234 || all params: 56,789 || trainable%: 2.1730``."""
    t, a = trainable_parameters(model)
    print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a if a else 0.0:.4f}")


def check_untied(model: nn.Module, layers, what: str) -> None:
    """A merge writes into the layer's frozen weight; if another module of the model holds the same Parameter (tied
    input/output embeddings), that module's outputs would change too: ValueError naming both."""
    holders: Dict[int, List[str]] = {}
    for n, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            holders.setdefault(id(p), []).append((n, mod))
    for n, m in layers:
        others = sorted({on for on, om in holders.get(id(m.weight), [])
                         if om is not m and not on.startswith(n + ".")})  # (a quantized base_layer is the layer's own)
        if others:
            raise ValueError(f"{what}: the weight of {n!r} is tied to {others[:3]} (e.g. tie_word_embeddings), so "
                             "merging the update into it would change those too; nothing was merged. Untie them first "
                             "or leave the layer unmerged")


def _restore_frozen(model: nn.Module) -> None:
    params = {id(p) for p in model.parameters()}
    for p in model.__dict__.pop("_peft_kernels_frozen", []):
        if id(p) in params:
            p.requires_grad_(True)


def _swap_all(model: nn.Module, make) -> nn.Module:
    """Replace every adapter module / ModulesToSave (outermost first) by ``make(module)``, under all its names."""
    from .inject import _module_paths, _set_module

    adapters = _adapter_types() + (ModulesToSave,)
    todo = []
    skip: List[str] = []
    for n, m in model.named_modules():
        if not n or any(n.startswith(p + ".") for p in skip) or not isinstance(m, adapters):
            continue
        todo.append((n, m))
        skip.append(n)
    if isinstance(model, adapters):
        raise ValueError("the model itself is an adapter layer; call its to_linear() instead")
    from .nn.siblings import unfuse_siblings

    unfuse_siblings(model)  # each plain layer owns its weight again, not a block of a packed buffer
    new = {id(m): make(n, m) for n, m in todo}  # built first: a refusal changes nothing
    paths = _module_paths(model)
    for n, m in todo:
        for alias in paths.get(id(m), [n]):
            _set_module(model, alias, new[id(m)])
    _restore_frozen(model)
    return model


def _original(n: str, m: nn.Module) -> nn.Module:
    """The module an adapter layer wraps, carrying the layer's current frozen parameters."""
    base = getattr(m, "base_layer", None)
    if isinstance(base, nn.Module) and not isinstance(base, ModulesToSave):
        return base  # a quantized base, kept whole
    orig = m.__dict__.get("_original_base")
    if orig is None:
        raise ValueError(f"{n!r} ({type(m).__name__}) does not know the layer it wraps")
    orig.weight = m.weight
    if hasattr(orig, "bias") or m.bias is not None:
        orig.bias = m.bias
    return orig


def unload(model: nn.Module) -> nn.Module:
    """Put the original layers back, without the update: every adapter layer becomes the layer it wrapped (its
    own weight Parameters; a merged layer is unmerged first), every ``modules_to_save`` module its untouched
    original, and the parameters the injection froze are trainable again. Returns ``model`` (changed in place)."""
    _check_model(model, "unload")

    def make(n, m):
        if isinstance(m, ModulesToSave):
            return m.original_module
        if getattr(m, "merged", False):
            m.unmerge()
        return _original(n, m)
    return _swap_all(model, make)


@torch.no_grad()
def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Fold every adapter into its layer and put plain layers back: ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding``
    (a quantized base: the base layer, requantized as PEFT does) carrying the merged weights, and each
    ``modules_to_save`` module's trained copy in its place. The result has the original architecture, so
    transformers' ``save_pretrained`` / ``from_pretrained`` take it with no unexpected keys. The frozen weights
    are updated in place (as PEFT's merge does). With ``safe_merge`` every merge is checked for NaN/Inf first
    and nothing changes if one fails. A MultiLoRALinear (several adapters) cannot merge: use :func:`unload`."""
    _check_model(model, "merge_and_unload")
    from .nn.embedding import LoRAEmbedding
    from .nn.ia3 import IA3Linear
    from .nn.lora import LoRALinear
    from .nn.multi_lora import MultiLoRALinear

    multi = [n for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)]
    if multi:
        raise ValueError(f"merge_and_unload(): {multi[:4]} hold several adapters chosen per token, which one weight "
                         "cannot; save a slot (save_peft_adapter(model, path, slot=i)) or unload(model)")
    check_untied(model, [(n, m) for n, m in model.named_modules()
                         if isinstance(m, (LoRALinear, LoRAEmbedding, IA3Linear)) and not getattr(m, "merged", False)
                         and isinstance(getattr(m, "weight", None), nn.Parameter)], "merge_and_unload()")
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear) and m.lora_bias and not m.merged and (m.bias is None or hasattr(m, "base_layer")):
            raise ValueError(f"merge_and_unload(): {n!r} has a lora_bias with no float base bias to merge it into; "
                             "nothing was merged")
    if safe_merge:
        for n, m in model.named_modules():
            w = None
            if isinstance(m, LoRALinear) and not m.merged:
                w = m._merged_weight_fp32()
            elif isinstance(m, IA3Linear):
                w = m._scaled()[0]
            elif isinstance(m, LoRAEmbedding) and not m.merged:
                w = m._merged_weight_fp32()
            if w is not None and not torch.isfinite(w).all():
                raise ValueError(f"merge_and_unload(safe_merge=True): merging {n!r} would produce NaN/Inf weights; "
                                 "nothing was merged")

    def make(n, m):
        if isinstance(m, ModulesToSave):
            return m.trained
        if isinstance(m, IA3Linear):
            W, b = m._scaled()
            if hasattr(m, "_requantize"):
                m._requantize(W)
            else:
                m.weight.copy_((W.t() if m.fan_in_fan_out else W).to(m.weight.dtype))
            if b is not None:
                m.bias.copy_(b.to(m.bias.dtype))
            return _original(n, m)
        if not m.merged:
            m.merge()
        return _original(n, m)
    return _swap_all(model, make)


# ------------------------------------------------------------------------------------ the model's own dropout
def use_hash_dropout(model: nn.Module, enable: bool = True) -> Dict[str, object]:
    """Swap the model's own dropout for the keyed-hash dropout (``ops/hash_dropout.py``), or back (``enable=False``).

    * every ``nn.Dropout`` (the exact class; subclasses and ``Dropout1d/2d`` are left alone) becomes a
      :class:`~peft_kernels.nn.dropout.HashDropout` with the same p and training mode;
    * a transformers model on the ``"sdpa"`` attention implementation switches to ``"peft_kernels_sdpa"``, which
      is ``sdpa`` except that the attention-probability dropout uses the hash mask (other implementations are
      left as they are; the result says which).

    The distribution is the same (each element kept with probability 1 - p, scaled by the inverse); the random
    stream differs from torch's, so a fixed ``torch.manual_seed`` gives other masks than with ``nn.Dropout``. On a
    CPU this is the largest cost a LoRA training step has left (torch's ``bernoulli_`` was 22 % of an
    all-MiniLM-L6-v2 step); under ``torch.compile`` the op stays one opaque kernel. Parameters, state dicts and
    evaluation outputs are unchanged. Returns ``{"dropout_layers": n swapped, "attention": the model's attention
    implementation after the call (None for a model without one)}``."""
    from .nn.dropout import ATTENTION, HashDropout, register_attention

    _check_model(model, "use_hash_dropout")
    if not isinstance(enable, bool):
        raise TypeError(f"use_hash_dropout: enable must be a bool, got {type(enable).__name__}")
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    switch_to = None
    if impl is not None and hasattr(model, "set_attn_implementation"):
        if enable and impl == "sdpa":
            register_attention()
            switch_to = ATTENTION
        elif not enable and impl == ATTENTION:
            switch_to = "sdpa"
    if switch_to is not None:
        model.set_attn_implementation(switch_to)  # first: a refusal here leaves the layers as they were
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if enable and type(child) is nn.Dropout:
                new = HashDropout(child.p, child.inplace)
            elif not enable and type(child) is HashDropout:
                new = nn.Dropout(child.p, child.inplace)
            else:
                continue
            new.train(child.training)
            setattr(parent, name, new)
            n += 1
    return {"dropout_layers": n, "attention": getattr(cfg, "_attn_implementation", None)}
