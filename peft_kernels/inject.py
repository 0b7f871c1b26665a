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

import contextlib
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
ADAPTER_PARAMS = ("lora_A", "lora_B", "lora_B_bias", "lora_magnitude_vector", "ia3_l", "lora_embedding_A",
                  "lora_embedding_B")  # trainable: all else frozen


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


def find_targets(model: nn.Module, target_modules: Targets, exclude_modules: Optional[Targets] = None, *,
                 embeddings: bool = False) -> List[str]:
    """Qualified names of the layers ``target_modules`` selects (validated: every one is an nn.Linear or
    Conv1D, or with ``embeddings`` an nn.Embedding named explicitly). Raises ValueError when nothing matches or
    a match is another kind of module. Modules inside a ``modules_to_save`` wrapper are never targets."""
    from .nn.saved import ModulesToSave

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = _check_targets(target_modules, "target_modules")
    exclude = _check_targets(exclude_modules, "exclude_modules", allow_none=True)
    head = _output_head(model) if targets == "all-linear" else None
    names: List[str] = []
    saved = [n for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
    for name, mod in model.named_modules():
        if not name or (exclude is not None and _matches(name, exclude)):
            continue
        if any(name == s or name.startswith(s + ".") for s in saved):
            continue
        if targets == "all-linear":
            if _is_linear(mod) and mod is not head:
                quant.check_layer(mod, name)
                names.append(name)
            continue
        if not _matches(name, targets):
            continue
        if isinstance(mod, ADAPTER_TYPES + _embedding_types()):
            raise ValueError(f"module {name!r} already is a {type(mod).__name__}: an adapter is injected once")
        if quant.is_other_quantized(mod):
            raise quant.UnsupportedQuantization(f"module {name!r} is a {type(mod).__name__}, a quantized layer type "
                                                f"peft_kernels does not support; supported: {quant.SUPPORTED}")
        quant.check_layer(mod, name)
        if embeddings and isinstance(mod, nn.Embedding):
            from .nn.embedding import check_embedding

            check_embedding(mod, f"target module {name!r}")
            names.append(name)
            continue
        if not _is_linear(mod):
            raise ValueError(f"target module {name!r} is a {type(mod).__name__}; only nn.Linear, transformers' "
                             f"Conv1D{' and nn.Embedding' if embeddings else ''} can take LoRA (narrow target_modules)")
        names.append(name)
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear/Conv1D in the model")
    return names


def _module_paths(model: nn.Module) -> Dict[int, List[str]]:
    """id(module) -> every qualified name it has (a module reachable under several names: aliased, tied)."""
    paths: Dict[int, List[str]] = {}
    for n, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(n)
    return paths


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def adapter_parameter_ids(model: nn.Module) -> set:
    """ids of the parameters an adapter checkpoint holds: the adapter layers' own, and the trainable copies of
    ``modules_to_save`` modules."""
    from .nn.saved import ModulesToSave

    keep = {id(p) for m in model.modules() if isinstance(m, ADAPTER_TYPES + _embedding_types())
            for p in (getattr(m, k, None) for k in ADAPTER_PARAMS) if isinstance(p, torch.Tensor)}
    keep |= {id(p) for m in model.modules() if isinstance(m, ModulesToSave) for p in m.trained.parameters()}
    keep |= {id(p) for m in model.modules() if isinstance(getattr(m, "lora_A", None), nn.ParameterDict)
             and isinstance(m, _embedding_types()) for p in (*m.lora_A.values(), *m.lora_B.values())}
    return keep


def _embedding_types():
    """The adapter layers defined outside this file (imported late): embeddings and experts."""
    from .nn.embedding import LoRAEmbedding
    from .nn.experts import LoRAExperts
    from .nn.packed import PackedLoRALinear

    return (LoRAEmbedding, LoRAExperts, PackedLoRALinear)


@contextlib.contextmanager
def frozen_by_us(model: nn.Module):
    """Remember the parameters that the block turns from trainable to frozen, so ``peft_kernels.unload`` turns
    them back on; if the block raises, they are trainable again (a failed injection changes nothing)."""
    before = [p for p in model.parameters() if p.requires_grad]
    try:
        yield
    except BaseException:
        for p in before:  # (building a layer freezes its base)
            p.requires_grad_(True)
        raise
    froze = model.__dict__.setdefault("_peft_kernels_frozen", [])
    seen = {id(p) for p in froze}
    froze.extend(p for p in before if not p.requires_grad and id(p) not in seen)


def _freeze_rest(model: nn.Module) -> None:
    """Freeze every parameter that is not an adapter's (PEFT's ``mark_only_lora_as_trainable``)."""
    keep = adapter_parameter_ids(model)
    for p in model.parameters():
        if id(p) not in keep and p.requires_grad:
            p.requires_grad_(False)


def _replace(model: nn.Module, names: List[str], make: Callable[[nn.Module], nn.Module],
             fuse_siblings=False) -> List[str]:
    """Swap in the new layers, then freeze every parameter that is not an adapter's. ``fuse_siblings``: the sibling
    groups to make among them (``inject_lora``'s argument), planned and checked on the new layers before the model
    changes, and made once they are in."""
    from .nn import siblings

    with frozen_by_us(model):
        new = {n: make(model.get_submodule(n)) for n in names}  # build all first: a failure changes nothing
        plan = siblings.plan_sibling_groups(new, fuse_siblings) if fuse_siblings is not False else []  # (may raise)
        _swap_in(model, new)
        _freeze_rest(model)
    siblings.make_sibling_groups(new, plan)
    return names


def _swap_in(model: nn.Module, new: Dict[str, nn.Module]) -> None:
    """Put each new layer at its name. A layer reachable under several names (aliased, e.g. tied) is replaced under
    every one of them by the same new module, so the model stays tied."""
    paths = _module_paths(model)
    ids = {n: id(model.get_submodule(n)) for n in new}
    for n, m in new.items():
        for alias in paths.get(ids[n], [n]):
            _set_module(model, alias, m)


def _with_saved(model: nn.Module, target_modules, exclude_modules, modules_to_save, task_type, find=None):
    """(targets, modules to save): PEFT's precedence (``all-linear`` leaves the saved modules out; a target the
    user named explicitly inside one is an error). Checked before anything changes."""
    saved = _with_saved_only(model, modules_to_save, task_type)
    names = (find or find_targets)(model, target_modules, exclude_modules)
    clash = [n for n in names for s in saved if n == s or n.startswith(s + ".")]
    if clash and _check_targets(target_modules, "target_modules") != "all-linear":
        raise ValueError(f"target_modules selects {clash[:4]}, which modules_to_save/task_type trains in full; a "
                         "layer cannot be both (narrow one of them)")
    names = [n for n in names if n not in clash]
    if not names:
        raise ValueError(f"target_modules {target_modules!r} selects only modules that modules_to_save trains in full")
    return names, saved


def _with_saved_only(model: nn.Module, modules_to_save, task_type) -> List[str]:
    """The modules ``modules_to_save`` / ``task_type`` name (alone: when only expert weights are targeted)."""
    from . import model as model_mod

    explicit, defaults = model_mod.save_rules(modules_to_save, task_type)
    return model_mod.find_modules_to_save(model, explicit, defaults, task_type) if explicit or defaults else []


def _finish_saved(model: nn.Module, saved: List[str], task_type: Optional[str] = None) -> None:
    if task_type is not None:
        from .model import check_task_type

        model.__dict__["_peft_kernels_task_type"] = check_task_type(task_type)
    if saved:
        from . import model as model_mod

        model_mod.wrap_modules_to_save(model, saved)


def inject_lora(model: nn.Module, target_modules: Targets, r: int = 8, lora_alpha: float = 8,
                lora_dropout: float = 0.0, use_rslora: bool = False, exclude_modules: Optional[Targets] = None,
                backend: str = "auto", init_lora_weights: Union[bool, str] = True,
                lora_dtype: Optional[torch.dtype] = None, use_dora: bool = False,
                modules_to_save: Optional[Sequence[str]] = None, task_type: Optional[str] = None,
                fuse_siblings=False, target_parameters: Optional[Sequence[str]] = None) -> List[str]:
    """Replace the matching nn.Linear / Conv1D layers of ``model`` with :class:`LoRALinear` (the same frozen
    weight Parameters, fresh LoRA parameters; DoRA with ``use_dora=True``), and the matching nn.Embedding
    layers with :class:`LoRAEmbedding`, in place; returns their qualified names.

    ``modules_to_save`` (PEFT's rule: module names ending with an entry) and ``task_type`` (PEFT's defaults:
    ``"SEQ_CLS"``/``"TOKEN_CLS"`` train ``classifier``/``score``, ``"QUESTION_ANS"`` ``qa_outputs``) name
    modules trained in full beside the adapter: each becomes a trainable copy (``ModulesToSave``), saved
    with the adapter; the original stays untouched.

    ``fuse_siblings``: True groups the new layers that share their input (children of one module named
    q_proj/k_proj/v_proj, query/key/value, gate_proj/up_proj, …; ``nn/siblings.py``) so that each group runs as
    one op; or a list of groups of child names. Parameters and state-dict keys stay per layer.

    ``target_parameters`` (PEFT's): 3-D expert weights of transformers' MoE models, e.g.
    ``["experts.gate_up_proj", "experts.down_proj"]``; each matching experts module becomes a
    :class:`~peft_kernels.nn.experts.LoRAExperts` (``target_modules`` may then be empty). No dropout, DoRA or
    lora_dtype other than the weight's on experts (PEFT refuses dropout and DoRA there too)."""
    from .nn.embedding import LoRAEmbedding
    from .nn.siblings import check_groups_arg

    check_groups_arg(fuse_siblings)
    experts = {}
    if target_parameters is not None:
        from .nn.experts import find_expert_targets

        if lora_dropout or use_dora:
            raise ValueError("target_parameters: lora_dropout and use_dora are not supported on expert weights (x "
                             "cannot be factored out of a weight update; PEFT refuses them too)")
        experts = find_expert_targets(model, target_parameters)
    if experts and not target_modules:
        names, saved = [], _with_saved_only(model, modules_to_save, task_type)
    else:
        names, saved = _with_saved(model, target_modules, exclude_modules, modules_to_save, task_type,
                                   lambda m, t, e: find_targets(m, t, e, embeddings=True))
    clash = [n for n in names if any(n == e or n.startswith(e + ".") for e in experts)]
    if clash:
        raise ValueError(f"target_modules selects {clash[:4]} inside experts that target_parameters adapts")

    def make(lin):
        if isinstance(lin, nn.Embedding):
            return LoRAEmbedding.from_embedding(lin, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora,
                                                init_lora_weights=init_lora_weights, backend=backend,
                                                lora_dtype=lora_dtype, use_dora=use_dora, lora_dropout=lora_dropout)
        return LoRALinear.from_linear(lin, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                      use_rslora=use_rslora, init_lora_weights=init_lora_weights, backend=backend,
                                      lora_dtype=lora_dtype, use_dora=use_dora)
    if experts:
        from .nn.experts import LoRAExperts

        def make_any(mod):
            n = name_of[id(mod)]
            if n in experts:
                return LoRAExperts(mod, experts[n], r=r, lora_alpha=lora_alpha, use_rslora=use_rslora,
                                   init_lora_weights=init_lora_weights, lora_dtype=lora_dtype, backend=backend)
            return make(mod)
        name_of = {id(model.get_submodule(n)): n for n in list(names) + list(experts)}
        out = _replace(model, list(names) + list(experts), make_any, fuse_siblings)
    else:
        out = _replace(model, names, make, fuse_siblings)
    _finish_saved(model, saved, task_type)
    return out


def inject_ia3(model: nn.Module, target_modules: Targets, feedforward_modules: Optional[Targets] = None,
               exclude_modules: Optional[Targets] = None, backend: str = "auto",
               modules_to_save: Optional[Sequence[str]] = None, task_type: Optional[str] = None) -> List[str]:
    """Replace the matching linear layers with :class:`IA3Linear` (PEFT ``IA3Config`` rules: a target that
    also matches ``feedforward_modules`` scales its input, the others their output); returns the names.
    ``modules_to_save`` / ``task_type``: as :func:`inject_lora`."""
    names, saved = _with_saved(model, target_modules, exclude_modules, modules_to_save, task_type)
    if feedforward_modules is not None:
        _check_targets(feedforward_modules, "feedforward_modules")
    ff = {id(model.get_submodule(n)) for n in names
          if feedforward_modules is not None and _matches(n, feedforward_modules)}
    out = _replace(model, names, lambda lin: IA3Linear.from_linear(lin, feedforward=id(lin) in ff, backend=backend))
    _finish_saved(model, saved, task_type)
    return out


def inject_multi_lora(model: nn.Module, target_modules: Targets, max_adapters: int = 8, max_rank: int = 16,
                      exclude_modules: Optional[Targets] = None, backend: str = "auto",
                      lora_dtype: Optional[torch.dtype] = None, lora_dropout: float = 0.0,
                      fuse_siblings=False) -> List[str]:
    """Replace the matching layers with :class:`MultiLoRALinear` (all slots empty); returns their names.
    Set the ids for a whole forward with ``peft_kernels.adapter_ids(model, ids)``. ``lora_dropout``: every
    slot's dropout p in training unless the adapter loaded into it says otherwise (``set_adapter(...,
    dropout=p)``; ``load_peft_adapter(..., slot=i)`` takes the checkpoint's ``lora_dropout``). Embeddings named
    in ``target_modules`` become :class:`MultiLoRAEmbedding` (no dropout, as PEFT's embedding LoRA).
    ``fuse_siblings``: as :func:`inject_lora`'s; a multi-adapter group runs its stacked base GEMM once and each
    member's per-token update on its block (``nn/siblings.py``)."""
    from .nn.embedding import MultiLoRAEmbedding
    from .nn.siblings import check_groups_arg

    check_groups_arg(fuse_siblings)

    names = find_targets(model, target_modules, exclude_modules, embeddings=True)

    def make(lin):
        if isinstance(lin, nn.Embedding):
            return MultiLoRAEmbedding.from_embedding(lin, max_adapters=max_adapters, max_rank=max_rank,
                                                     lora_dtype=lora_dtype)
        return MultiLoRALinear.from_linear(lin, max_adapters=max_adapters, max_rank=max_rank, backend=backend,
                                           lora_dtype=lora_dtype, lora_dropout=lora_dropout)
    return _replace(model, names, make, fuse_siblings)


def _lora_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear,) + _embedding_types())]


def merge_lora(model: nn.Module, safe_merge: bool = False) -> List[str]:
    """Fold every unmerged LoRALinear's update into its weight; returns the layers merged. With
    ``safe_merge`` all merges are checked for NaN/Inf first, and none happens if one would fail."""
    todo = [(n, m) for n, m in _lora_layers(model) if not m.merged]
    from .model import check_untied

    check_untied(model, [(n, m) for n, m in todo if isinstance(m.weight, nn.Parameter)], "merge_lora()")
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
    """The trainable adapter tensors only, detached, under the keys of ``model.state_dict()``: ``lora_A`` /
    ``lora_B`` (and ``lora_B_bias``, ``lora_magnitude_vector``) of every LoRALinear and MultiLoRALinear, plus
    MultiLoRALinear's ``scalings``/``ranks`` buffers, LoRAEmbedding's ``lora_embedding_A``/``_B``, LoRAExperts'
    ``lora_A.<param>``/``lora_B.<param>`` and PackedLoRALinear's ``lora_A.<slice>``/``lora_B.<slice>``, and the whole
    state of every ``modules_to_save`` copy (``<name>.modules_to_save.default.*``)."""
    from .nn.saved import ModulesToSave

    out = {}
    for name, m in model.named_modules():
        pre = f"{name}." if name else ""
        if isinstance(m, LORA_TYPES):
            keys = ("lora_A", "lora_B") + (("lora_B_bias",) if getattr(m, "lora_bias", False) else ()) + (
                ("lora_magnitude_vector",) if getattr(m, "use_dora", False) else ()) + (
                ("scalings", "ranks") if isinstance(m, MultiLoRALinear) else ())
        elif isinstance(m, _embedding_types()) and isinstance(getattr(m, "lora_A", None), nn.ParameterDict):
            for d in ("lora_A", "lora_B"):
                for p, v in getattr(m, d).items():
                    out[f"{pre}{d}.{p}"] = v.detach()
            continue
        elif isinstance(m, _embedding_types()):
            keys = ("lora_embedding_A", "lora_embedding_B")
        elif isinstance(m, ModulesToSave):
            for k, v in m.trained.state_dict().items():
                out[f"{pre}modules_to_save.default.{k}"] = v.detach()
            continue
        else:
            continue
        for key in keys:
            out[pre + key] = getattr(m, key).detach()
    return out
