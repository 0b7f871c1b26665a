"""HF PEFT LoRA checkpoints, both ways: ``load_peft_adapter`` and ``save_peft_adapter``.

A PEFT ``save_pretrained`` directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
(keys ``base_model.model.<module>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r]); a named
adapter other than the first lives in a subfolder of that name.

Loading reads and validates everything (config fields, every key, every shape, the target modules'
types) before the model is touched: a bad file raises and the model is unchanged. Files are never
unpickled: safetensors, or a legacy ``adapter_model.bin`` only through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from . import model as model_mod
from .inject import _finish_saved, _replace
from .model import TASK_TYPE_MODULES
from .nn.lora import LoRALinear, base_features, is_conv1d
from .nn.multi_lora import MultiLoRALinear

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
LEGACY_WEIGHTS = "adapter_model.bin"
PREFIX = "base_model.model."
# config fields whose non-default values this loader cannot honour
_UNSUPPORTED = {"layers_to_transform": None, "layer_replication": None,
                "trainable_token_indices": None}
_SUFFIX = re.compile(r"^(?P<mod>.+)\.(?:(?P<ab>lora_A|lora_B)\.(?P<what>weight|bias)|(?P<mag>lora_magnitude_vector)"
                     r"|lora_embedding_(?P<eab>A|B)|(?P<table>base_layer\.weight))$")
_IA3_SUFFIX = re.compile(r"^(?P<mod>.+)\.ia3_l$")


class CheckpointError(ValueError):
    """A PEFT checkpoint that cannot be loaded (missing/bad files, keys, shapes, unsupported options)."""


def _adapter_dir(path: str, adapter_name: Optional[str]) -> str:
    """``path``, or its ``adapter_name`` subfolder (PEFT saves a named adapter other than the first there). The
    name is one folder name: it cannot escape ``path`` (``..``, separators, absolute paths, links out), and a
    missing subfolder is an error, never a fall back to the root adapter."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is not a directory (expected a PEFT save_pretrained folder)")
    if adapter_name is None:
        return path
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a str or None, got {type(adapter_name).__name__}")
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    if adapter_name in ("", ".", "..") or any(c in adapter_name for c in seps) or "\0" in adapter_name \
            or os.path.isabs(adapter_name):
        raise CheckpointError(f"adapter_name must name one subfolder of {path!r}, got {adapter_name!r}")
    sub = os.path.join(path, adapter_name)
    root = os.path.realpath(path)
    if os.path.commonpath([root, os.path.realpath(sub)]) != root:
        raise CheckpointError(f"adapter_name {adapter_name!r} leads out of {path!r} (a link)")
    if not os.path.isfile(os.path.join(sub, CONFIG)):
        raise CheckpointError(f"no adapter named {adapter_name!r} in {path!r}: {os.path.join(sub, CONFIG)!r} is "
                              "missing (the root adapter is loaded with adapter_name=None)")
    return sub


def load_config_json(d: str) -> Tuple[str, dict]:
    """(path, object) of ``d``/adapter_config.json; CheckpointError if missing, not JSON or not an object."""
    f = os.path.join(d, CONFIG)
    if not os.path.isfile(f):
        raise CheckpointError(f"{f!r} is missing")
    try:
        with open(f, encoding="utf-8") as fh:
            cfg = json.load(fh)  # NaN/Infinity parse as floats; the field checks refuse them by name
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{f!r} is not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{f!r} is nested too deeply to be an adapter config") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f!r} must hold a JSON object")
    return f, cfg


def _bool_field(cfg: dict, key: str, f: str) -> bool:
    v = cfg.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):  # "false" is a non-empty string: bool("false") would turn the option on
        raise CheckpointError(f"{f!r}: {key} must be true or false, got {v!r}")
    return v


def _number(v, key: str, f: str, *, integer: bool = False, low: float = 0.0, low_open: bool = True,
            high: Optional[float] = None):
    """A finite JSON number in range; integers for ``integer``; representable in float32 (scalings are)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise CheckpointError(f"{f!r}: {key} must be a number, got {v!r}")
    if integer:
        if isinstance(v, float) and not v.is_integer():
            raise CheckpointError(f"{f!r}: {key} must be an integer, got {v!r}")
        if not -2 ** 31 < v < 2 ** 31:
            raise CheckpointError(f"{f!r}: {key} is out of range, got {v!r}")
        v = int(v)
    elif not (math.isfinite(v) and abs(v) < 3.0e38):  # 1e40 is finite in Python but inf as a float32 scaling
        raise CheckpointError(f"{f!r}: {key} must be a finite number (within float32), got {v!r}")
    if (v <= low if low_open else v < low) or (high is not None and v >= high):
        rng = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'})"
        raise CheckpointError(f"{f!r}: {key} must be in {rng}, got {v!r}")
    return v


def _targets_field(cfg: dict, key: str, f: str) -> None:
    """None, a regex (PEFT full-matches it), or a list of module names."""
    v = cfg.get(key)
    if v is None:
        return
    if isinstance(v, str):
        _regex(v, key, f)
    elif not (isinstance(v, list) and all(isinstance(t, str) and t for t in v)):
        raise CheckpointError(f"{f!r}: {key} must be a regex string or a list of module names, got {v!r}")


def _regex(pattern: str, key: str, f: str) -> None:
    if len(pattern) > 4096:
        raise CheckpointError(f"{f!r}: a {key} regex is longer than 4096 characters")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise CheckpointError(f"{f!r}: {key} holds an invalid regex {pattern!r}: {e}") from None


def _validate_lora_config(cfg: dict, f: str) -> None:
    """Every LoRA config field this loader reads, checked: a bad value is a CheckpointError naming it."""
    cfg["r"] = _number(cfg.get("r"), "r", f, integer=True)
    cfg["lora_alpha"] = _number(cfg.get("lora_alpha"), "lora_alpha", f)
    drop = cfg.get("lora_dropout", 0.0)
    cfg["lora_dropout"] = 0.0 if drop is None else _number(drop, "lora_dropout", f, low_open=False, high=1.0)
    for key in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out"):
        cfg[key] = _bool_field(cfg, key, f)
    if not isinstance(cfg.get("inference_mode", False), (bool, type(None))):
        raise CheckpointError(f"{f!r}: inference_mode must be true or false, got {cfg['inference_mode']!r}")
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pat = {} if cfg.get(key) is None else cfg[key]
        if not isinstance(pat, dict):
            raise CheckpointError(f"{f!r}: {key} must be an object, got {pat!r}")
        for k, v in pat.items():
            _regex(k, key, f)
            pat[k] = _number(v, f"{key}[{k!r}]", f, integer=integer)
        cfg[key] = pat
    _targets_field(cfg, "target_modules", f)
    _targets_field(cfg, "exclude_modules", f)
    tp = cfg.get("target_parameters")
    if tp is not None and not (isinstance(tp, list) and all(isinstance(t, str) and t for t in tp)):
        raise CheckpointError(f"{f!r}: target_parameters must be a list of parameter names, got {tp!r}")


def _read_config(d: str) -> dict:
    f, cfg = load_config_json(d)
    ptype = cfg.get("peft_type")
    if ptype not in ("LORA", "IA3"):
        raise CheckpointError(f"unsupported PEFT type (peft_type) {ptype!r} in {f!r}: LORA (incl. DoRA) and IA3 adapters load "
                              "into peft_kernels (prompt learning: peft_kernels.prompt)")
    for key, default in _UNSUPPORTED.items():
        if cfg.get(key, default) not in (default, [], {}):
            raise CheckpointError(f"unsupported {ptype} option in {f!r}: {key}={cfg[key]!r}")
    mts = cfg.get("modules_to_save")
    if mts is not None and not (isinstance(mts, list) and all(isinstance(t, str) and t for t in mts)):
        raise CheckpointError(f"{f!r}: modules_to_save must be a list of module names, got {mts!r}")
    tt = cfg.get("task_type")
    if isinstance(tt, str) and tt.upper() not in TASK_TYPE_MODULES or not isinstance(tt, (str, type(None))):
        raise CheckpointError(f"{f!r}: task_type must be one of {[k for k in TASK_TYPE_MODULES if k]} or null, got {tt!r}")
    if ptype == "IA3":
        cfg["fan_in_fan_out"] = _bool_field(cfg, "fan_in_fan_out", f)
        for key in ("target_modules", "exclude_modules", "feedforward_modules"):
            _targets_field(cfg, key, f)
        return cfg
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"unsupported LoRA option in {f!r}: bias={cfg['bias']!r} (trained base biases)")
    _validate_lora_config(cfg, f)
    return cfg


def _read_weights(d: str) -> Dict[str, torch.Tensor]:
    st = os.path.join(d, WEIGHTS)
    if os.path.isfile(st):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(st)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{st!r} could not be read (truncated or not safetensors): {e}") from None
    legacy = os.path.join(d, LEGACY_WEIGHTS)
    if os.path.isfile(legacy):
        try:  # never unpickle arbitrary objects: tensors and plain containers only
            sd = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (the unpickler raises many kinds)
            raise CheckpointError(f"{legacy!r} was refused by torch.load(weights_only=True) (it is not a plain "
                                  f"tensor state dict; convert it to safetensors): {e}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{legacy!r} is not a state dict of tensors")
        return sd
    raise CheckpointError(f"no {WEIGHTS} (or {LEGACY_WEIGHTS}) in {d!r}")


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank/alpha_pattern lookup: the first key that matches the end of the module's name."""
    for key, val in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return val
    return default


@dataclass
class _Layer:
    name: str       # module path in the model
    A: torch.Tensor
    B: torch.Tensor
    r: int
    alpha: float
    bias: Optional[torch.Tensor] = None
    magnitude: Optional[torch.Tensor] = None
    table: Optional[torch.Tensor] = None  # an embedding's saved table (PEFT saves it beside embedding LoRA)
    kind: str = "linear"  # or "embedding" (lora_embedding_A [r, V] / lora_embedding_B [D, r])


def _check_targeted(cfg: dict, mod: str, src: str) -> None:
    """The weights' modules must be ones the config targets (PEFT's matching rules), and not excluded."""
    from .inject import _matches

    tm, ex = cfg.get("target_modules"), cfg.get("exclude_modules")
    if tm is not None and tm != "all-linear" and not _matches(mod, tm):
        raise CheckpointError(f"{src}: the weights hold {mod!r}, which target_modules {tm!r} does not select")
    if ex is not None and _matches(mod, ex):
        raise CheckpointError(f"{src}: the weights hold {mod!r}, which exclude_modules {ex!r} excludes")


def _submodule(model: nn.Module, mod: str, src: str) -> nn.Module:
    """The checkpoint's module ``mod`` in ``model``; CheckpointError when the model has none."""
    try:
        return model.get_submodule(mod)
    except AttributeError:
        raise CheckpointError(f"{src}: the model has no module {mod!r}") from None


def _no_aliases(model: nn.Module, names, src: str) -> None:
    """Two names of the checkpoint that reach one module object would load two adapters into one layer."""
    seen: Dict[int, str] = {}
    for n in names:
        i = id(model.get_submodule(n))
        if i in seen:
            raise CheckpointError(f"{src}: {seen[i]!r} and {n!r} are the same module (aliased); the checkpoint holds "
                                  "an adapter for each, which one layer cannot take")
        seen[i] = n


def _plan(model: nn.Module, cfg: dict, sd: Dict[str, torch.Tensor], slot: Optional[int], src: str) -> List[_Layer]:
    """Every layer to load, validated against the model; raises CheckpointError on any mismatch."""
    groups: Dict[str, dict] = {}
    for key, t in sd.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _SUFFIX.match(k)
        if m is None:
            raise CheckpointError(f"{src}: unexpected key {key!r} (not a LoRA A/B tensor or DoRA magnitude)")
        if m["what"] == "bias" and m["ab"] == "lora_A":
            raise CheckpointError(f"{src}: unexpected key {key!r}")
        if m["mag"] and not cfg.get("use_dora", False):
            raise CheckpointError(f"{src}: {key!r} is a DoRA magnitude but the config says use_dora=False")
        slot_key = ("mag" if m["mag"] else "e" + m["eab"] if m["eab"] else "table" if m["table"]
                    else "B_bias" if m["what"] == "bias" else m["ab"][-1])
        _check_targeted(cfg, m["mod"], src)
        groups.setdefault(m["mod"], {})[slot_key] = t
    if not groups:
        raise CheckpointError(f"{src}: no LoRA tensors")
    r0, a0 = int(cfg["r"]), float(cfg["lora_alpha"])
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    layers = []
    for mod, g in sorted(groups.items()):
        if "eA" in g or "eB" in g or "table" in g:
            layers.append(_plan_embedding(model, mod, g, slot, _pattern_value(rp, mod, r0), _pattern_value(ap, mod, a0),
                                          src))
            continue
        if "A" not in g or "B" not in g:
            raise CheckpointError(f"{src}: {mod!r} has lora_{'A' if 'A' not in g else 'B'}.weight missing")
        if "B_bias" in g and not cfg.get("lora_bias", False):
            raise CheckpointError(f"{src}: {mod!r} has lora_B.bias but the config says lora_bias=False")
        if cfg.get("lora_bias", False) and "B_bias" not in g:
            raise CheckpointError(f"{src}: {mod!r} has no lora_B.bias but the config says lora_bias=True")
        if cfg.get("use_dora", False) and "mag" not in g:
            raise CheckpointError(f"{src}: {mod!r} has no lora_magnitude_vector but the config says use_dora=True")
        target = _submodule(model, mod, src)
        if isinstance(target, MultiLoRALinear):
            if slot is None:
                raise CheckpointError(f"{mod!r} is a MultiLoRALinear: pass slot=<index> to load into one of its slots")
            in_f, out_f = target.in_features, target.out_features
        elif isinstance(target, LoRALinear):
            raise CheckpointError(f"{mod!r} already has a LoRA adapter (a LoRALinear): load into the plain model, "
                                  "or into MultiLoRALinear slots")
        elif isinstance(target, nn.Linear) or is_conv1d(target):
            if slot is not None:
                raise CheckpointError(f"slot={slot} was given but {mod!r} is a plain {type(target).__name__}, not a "
                                      "MultiLoRALinear (inject_multi_lora first)")
            in_f, out_f = base_features(target)
        else:
            raise CheckpointError(f"{src}: {mod!r} is a {type(target).__name__}, not a linear layer")
        r = int(_pattern_value(rp, mod, r0))
        alpha = float(_pattern_value(ap, mod, a0))
        A, B = g["A"], g["B"]
        if tuple(A.shape) != (r, in_f) or tuple(B.shape) != (out_f, r):
            raise CheckpointError(f"{src}: {mod!r}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit a "
                                  f"rank-{r} adapter on a [{out_f}, {in_f}] layer (expected [{r}, {in_f}] / [{out_f}, {r}])")
        if "mag" in g and (tuple(g["mag"].shape) != (out_f,) or not g["mag"].is_floating_point()
                           or not torch.isfinite(g["mag"]).all()):
            raise CheckpointError(f"{src}: {mod!r}: lora_magnitude_vector must be ({out_f},) finite floats, got "
                                  f"{tuple(g['mag'].shape)} {g['mag'].dtype}")
        if "B_bias" in g and tuple(g["B_bias"].shape) != (out_f,):
            raise CheckpointError(f"{src}: {mod!r}: lora_B.bias has shape {tuple(g['B_bias'].shape)}, expected ({out_f},)")
        for nm, t in (("lora_A", A), ("lora_B", B)):
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise CheckpointError(f"{src}: {mod!r}: {nm} must be finite floating-point values")
        if isinstance(target, MultiLoRALinear):
            if not 0 <= slot < target.max_adapters:
                raise CheckpointError(f"slot must be in [0, {target.max_adapters}) for {mod!r}, got {slot}")
            if r > target.max_rank:
                raise CheckpointError(f"{mod!r}: rank {r} > the MultiLoRALinear's max_rank {target.max_rank}")
            if "B_bias" in g:
                raise CheckpointError(f"{mod!r}: lora_bias adapters cannot load into MultiLoRALinear slots")
            if "mag" in g:
                raise CheckpointError(f"{mod!r}: DoRA adapters cannot load into MultiLoRALinear slots (their "
                                      "per-slot weight norms are not supported)")
        layers.append(_Layer(mod, A, B, r, alpha, g.get("B_bias"), g.get("mag")))
    _no_aliases(model, [L.name for L in layers], src)
    return layers


def _plan_embedding(model, mod: str, g: dict, slot, r, alpha, src: str) -> _Layer:
    """An embedding's LoRA (``lora_embedding_A`` [r, V], ``lora_embedding_B`` [D, r], and the table PEFT saves
    beside them), validated against the model's nn.Embedding."""
    from .nn.embedding import check_embedding

    other = sorted(set(g) - {"eA", "eB", "table"})
    if other or "eA" not in g or "eB" not in g:
        raise CheckpointError(f"{src}: {mod!r} must have lora_embedding_A and lora_embedding_B (and nothing of a "
                              f"linear layer's LoRA), got {sorted(g)}")
    from .nn.embedding import MultiLoRAEmbedding

    target = _submodule(model, mod, src)
    if isinstance(target, MultiLoRAEmbedding):
        if slot is None:
            raise CheckpointError(f"{mod!r} is a MultiLoRAEmbedding: pass slot=<index> to load into one of its slots")
        if not 0 <= slot < target.max_adapters or int(r) > target.max_rank:
            raise CheckpointError(f"{mod!r}: slot {slot} / rank {r} do not fit the MultiLoRAEmbedding "
                                  f"(max_adapters={target.max_adapters}, max_rank={target.max_rank})")
    else:
        if slot is not None:
            raise CheckpointError(f"slot={slot} was given but {mod!r} is a plain {type(target).__name__}, not a "
                                  "MultiLoRAEmbedding (inject_multi_lora first)")
        try:
            check_embedding(target, f"{src}: {mod!r}")
        except (TypeError, ValueError) as e:
            raise CheckpointError(str(e)) from None
    V, D = target.num_embeddings, target.embedding_dim
    A, B, r = g["eA"], g["eB"], int(r)
    if tuple(A.shape) != (r, V) or tuple(B.shape) != (D, r):
        raise CheckpointError(f"{src}: {mod!r}: lora_embedding_A {tuple(A.shape)} / lora_embedding_B {tuple(B.shape)} "
                              f"do not fit a rank-{r} adapter on a [{V}, {D}] embedding (expected [{r}, {V}] / [{D}, {r}])")
    table = g.get("table")
    if table is not None and tuple(table.shape) != (V, D):
        raise CheckpointError(f"{src}: {mod!r}: base_layer.weight has shape {tuple(table.shape)}, the model's table is "
                              f"[{V}, {D}] (a resized vocabulary must be resized in the model first)")
    for nm, t in (("lora_embedding_A", A), ("lora_embedding_B", B)) + ((("base_layer.weight", table),) if table is not None else ()):
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise CheckpointError(f"{src}: {mod!r}: {nm} must be finite floating-point values")
    return _Layer(mod, A, B, r, float(alpha), table=table, kind="embedding")


def _plan_saved(model: nn.Module, cfg: dict, sd: Dict[str, torch.Tensor], src: str):
    """The checkpoint's ``modules_to_save`` tensors (PEFT's keys: ``<module>.<param>``, for the modules the
    config's ``modules_to_save`` and ``task_type`` name): {module name: a trained copy holding them}, and the
    rest of ``sd``. Each copy is built and loaded here (strict: every key of the module, right shapes), so a
    bad file fails before the model changes."""
    import copy

    from .nn.saved import ModulesToSave

    explicit, defaults = model_mod.save_rules(cfg.get("modules_to_save"), (cfg.get("task_type") or None) and
                                              cfg["task_type"].upper())
    if not explicit and not defaults:
        return {}, sd
    keys = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): k for k in sd}
    candidates: List[str] = []
    for name, mod in model.named_modules():
        if name and any(name.endswith(r) for r in explicit + defaults) and not any(
                name.startswith(c + ".") for c in candidates):
            candidates.append(name)
    plan, used = {}, set()
    for name in candidates:
        mod = model.get_submodule(name)
        wrapped = isinstance(mod, ModulesToSave)
        mine = {k[len(name) + 1:]: full for k, full in keys.items() if k.startswith(name + ".")}
        if wrapped:  # already trained in full: the checkpoint's tensors go into its copy
            mine = {k: v for k, v in mine.items() if not k.startswith(("original_module.", "modules_to_save."))}
        if not mine:
            continue
        copy_ = copy.deepcopy(mod.trained if wrapped else mod)
        try:
            copy_.load_state_dict({k: sd[full] for k, full in mine.items()}, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{src}: modules_to_save {name!r}: the checkpoint's tensors do not fit the model's "
                                  f"module: {' '.join(str(e).split())[:400]}") from None
        plan[name] = copy_
        used.update(mine.values())
    if explicit and not plan:  # (PEFT lists both "classifier" and "score" for SEQ_CLS: one of them is enough)
        raise CheckpointError(f"{src}: modules_to_save names {explicit}, and the checkpoint holds no tensors for a "
                              "module of the model with such a name")
    return plan, {k: v for k, v in sd.items() if k not in used}


def _apply_saved(model: nn.Module, plan: Dict[str, nn.Module], cfg: dict) -> None:
    """Wrap each planned module as a ModulesToSave whose trainable copy holds the checkpoint's tensors."""
    from .nn.saved import ModulesToSave

    if cfg.get("task_type"):
        model.__dict__["_peft_kernels_task_type"] = cfg["task_type"].upper()
    todo = [n for n in plan if not isinstance(model.get_submodule(n), ModulesToSave)]
    _finish_saved(model, todo)
    for n, copy_ in plan.items():
        model.get_submodule(n).trained.load_state_dict(copy_.state_dict())


def load_peft_adapter(model: nn.Module, path, *, adapter_name: Optional[str] = None, slot: Optional[int] = None,
                      backend: str = "auto", packed: Optional[dict] = None) -> List[str]:
    """Load a PEFT LoRA adapter into ``model``; returns the module names it was applied to.

    Plain nn.Linear / Conv1D targets become :class:`LoRALinear` (r, lora_alpha, use_rslora, rank_pattern,
    alpha_pattern, lora_bias, fan_in_fan_out from the config; the weights from the file). Targets that
    already are :class:`MultiLoRALinear` get the adapter in ``slot``. ``adapter_name`` picks a named
    adapter's subfolder. ``packed`` (e.g. ``{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}``) serves an adapter
    trained on separate projections on a model that packs them: each packed layer becomes a
    :class:`~peft_kernels.nn.packed.PackedLoRALinear` with one slice per projection. Everything is validated first:
    on any error the model is unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if slot is not None and (isinstance(slot, bool) or not isinstance(slot, int)):
        raise TypeError(f"slot must be an int or None, got {slot!r}")
    d = _adapter_dir(path, adapter_name)
    cfg = _read_config(d)
    sd = _read_weights(d)
    saved, sd = _plan_saved(model, cfg, sd, d)
    if saved and slot is not None:
        raise CheckpointError(f"{d!r} trains modules in full (modules_to_save {sorted(saved)}), which MultiLoRALinear "
                              "slots cannot hold per adapter; load it into the plain model")
    if cfg["peft_type"] == "IA3":
        if slot is not None:
            raise CheckpointError(f"{d!r} is an IA3 adapter: slot= applies to LoRA adapters only")
        names = _load_ia3(model, cfg, sd, d, backend)
        _apply_saved(model, saved, cfg)
        return names
    experts: dict = {}
    if cfg.get("target_parameters"):  # LoRA on MoE expert weights (nn/experts.py)
        if slot is not None:
            raise CheckpointError(f"{d!r} adapts expert weights (target_parameters): load it into the plain model, "
                                  "not into MultiLoRALinear slots")
        from .nn.experts import plan_peft_load

        experts, sd = plan_peft_load(model, cfg, sd, PREFIX, d)
    packs: dict = {}
    if packed is not None:
        if slot is not None:
            raise CheckpointError(f"{d!r}: packed= loads into the plain model, not into MultiLoRALinear slots")
        from .nn.packed import plan_packed_load

        packs, sd = plan_packed_load(model, cfg, sd, packed, PREFIX, d)
    layers = _plan(model, cfg, sd, slot, d) if not (experts or packs) or any(_SUFFIX.match(k) for k in sd) else []
    rslora = bool(cfg.get("use_rslora", False))
    dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)
    if slot is not None:
        _load_slots(model, layers, slot, rslora, d, dropout)
        return [L.name for L in layers]
    by_name = {L.name: L for L in layers}

    def make(lin):
        if name_of[id(lin)] in packs:
            from .nn.packed import PackedLoRALinear

            got = packs[name_of[id(lin)]]
            new = PackedLoRALinear(lin, {p: B.shape[0] for p, (A, B, r, a) in got.items()},
                                   r={p: r for p, (A, B, r, a) in got.items()},
                                   lora_alpha={p: a for p, (A, B, r, a) in got.items()}, lora_dropout=dropout,
                                   use_rslora=rslora)
            with torch.no_grad():
                for p, (A, B, r, a) in got.items():
                    new.lora_A[p].copy_(A)
                    new.lora_B[p].copy_(B)
            return new
        if name_of[id(lin)] in experts:
            from .nn.experts import LoRAExperts

            params, got = experts[name_of[id(lin)]]
            new = LoRAExperts(lin, params, r=cfg["r"], lora_alpha=cfg["lora_alpha"], use_rslora=rslora)
            with torch.no_grad():
                for p, (A, B) in got.items():
                    new.lora_A[p].copy_(A)
                    new.lora_B[p].copy_(B)
            return new
        L = by_name[name_of[id(lin)]]
        if L.kind == "embedding":
            from .nn.embedding import LoRAEmbedding

            new = LoRAEmbedding.from_embedding(lin, r=L.r, lora_alpha=L.alpha, use_rslora=rslora, backend=backend,
                                               lora_dropout=dropout)
            with torch.no_grad():
                new.lora_embedding_A.copy_(L.A)
                new.lora_embedding_B.copy_(L.B)
            return new
        new = LoRALinear.from_linear(lin, r=L.r, lora_alpha=L.alpha, lora_dropout=dropout, use_rslora=rslora,
                                     backend=backend, lora_bias=L.bias is not None,
                                     use_dora=L.magnitude is not None)
        with torch.no_grad():
            new.lora_A.copy_(L.A)
            new.lora_B.copy_(L.B)
            if L.bias is not None:
                new.lora_B_bias.copy_(L.bias)
            if L.magnitude is not None:
                new.lora_magnitude_vector.copy_(L.magnitude)
        return new

    name_of = {id(model.get_submodule(n)): n for n in list(by_name) + list(experts) + list(packs)}
    names = _replace(model, sorted(by_name) + sorted(experts) + sorted(packs), make)
    with torch.no_grad():  # PEFT loads the embedding table it saved beside an embedding LoRA (new tokens' rows)
        for L in layers:
            if L.table is not None:
                w = model.get_submodule(L.name).weight
                if not torch.equal(w, L.table.to(w)):
                    w.copy_(L.table)
    _apply_saved(model, saved, cfg)
    return names


def _load_slots(model: nn.Module, layers: List[_Layer], slot: int, rslora: bool, src: str,
                dropout: float = 0.0) -> None:
    """Every layer's slot, or none: each scaling is checked first, then the slots are written; if a write
    still fails, the slots already written get their previous adapters back."""
    plan = []
    for L in layers:
        m = model.get_submodule(L.name)
        scaling = L.alpha / (math.sqrt(L.r) if rslora else L.r)
        if not math.isfinite(torch.tensor(scaling, dtype=m.scalings.dtype).item()):
            raise CheckpointError(f"{src}: {L.name!r}: the scaling lora_alpha / r = {scaling!r} is not finite in "
                                  f"{m.scalings.dtype}")
        plan.append((m, L, scaling))
    done = []
    try:
        for m, L, scaling in plan:
            A, B, s = m.get_adapter(slot)
            prev = (A.detach().clone(), B.detach().clone(), s, m.lora_dropout[slot])
            m.set_adapter(slot, L.A, L.B, scaling, dropout=dropout)
            done.append((m, prev))
    except Exception:
        for m, (A, B, s, p) in reversed(done):
            if A.shape[0]:
                m.set_adapter(slot, A, B, s, dropout=p)
            else:
                m.clear_adapter(slot)
        raise


def _load_ia3(model: nn.Module, cfg: dict, sd: Dict[str, torch.Tensor], src: str, backend: str) -> List[str]:
    """IA3: every ``<module>.ia3_l`` becomes an IA3Linear on that module; input scaling where the module
    matches the config's ``feedforward_modules`` (PEFT's matching rules). All checked before any change."""
    from .inject import _matches
    from .nn.ia3 import IA3Linear

    ff_rule = cfg.get("feedforward_modules")
    plan = {}
    for key, t in sd.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _IA3_SUFFIX.match(k)
        if m is None:
            raise CheckpointError(f"{src}: unexpected key {key!r} (not an IA3 ia3_l tensor)")
        mod = m["mod"]
        _check_targeted(cfg, mod, src)
        target = _submodule(model, mod, src)
        if not (isinstance(target, nn.Linear) or is_conv1d(target)) or isinstance(target, (LoRALinear,)):
            raise CheckpointError(f"{src}: {mod!r} is a {type(target).__name__}, not a plain linear layer")
        in_f, out_f = base_features(target)
        ff = ff_rule is not None and _matches(mod, ff_rule)
        want = (1, in_f) if ff else (out_f, 1)
        if tuple(t.shape) != want:
            raise CheckpointError(f"{src}: {mod!r}: ia3_l has shape {tuple(t.shape)}, expected {want} "
                                  f"({'input' if ff else 'output'} scaling of a [{out_f}, {in_f}] layer)")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise CheckpointError(f"{src}: {mod!r}: ia3_l must be finite floating-point values")
        plan[mod] = (t, ff)
    if not plan:
        raise CheckpointError(f"{src}: no IA3 tensors")
    _no_aliases(model, list(plan), src)

    def make(lin):
        t, ff = plan[name_of[id(lin)]]
        new = IA3Linear.from_linear(lin, feedforward=ff, backend=backend)
        with torch.no_grad():
            new.ia3_l.copy_(t)
        return new

    name_of = {id(model.get_submodule(n)): n for n in plan}
    return _replace(model, sorted(plan), make)


def _layer_config(layers: List[Tuple[str, LoRALinear]]) -> dict:
    ranks = [m.r for _, m in layers]
    r0 = max(set(ranks), key=ranks.count)
    alphas = [m.lora_alpha for _, m in layers]
    a0 = max(set(alphas), key=alphas.count)
    rslora = {m.use_rslora for _, m in layers}
    if len(rslora) > 1:
        raise ValueError("save_peft_adapter: layers mix use_rslora=True and False, which one PEFT config cannot say")
    fan = {m.fan_in_fan_out for _, m in layers if m.fan_in_fan_out is not None} or {False}  # (embeddings: None)
    if len(fan) > 1:
        raise ValueError("save_peft_adapter: layers mix nn.Linear and Conv1D bases (fan_in_fan_out), which one PEFT "
                         "config cannot say")
    lbias = {m.lora_bias for _, m in layers}
    if len(lbias) > 1:
        raise ValueError("save_peft_adapter: layers mix lora_bias=True and False")
    drop = {m.lora_dropout for _, m in layers if m.fan_in_fan_out is not None}  # (embeddings take no dropout)
    dora = {bool(getattr(m, "use_dora", False)) for _, m in layers}
    if len(dora) > 1:
        raise ValueError("save_peft_adapter: layers mix use_dora=True and False")
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": r0, "lora_alpha": a0, "lora_dropout": drop.pop() if len(drop) == 1 else 0.0,
        "use_rslora": rslora.pop(), "fan_in_fan_out": fan.pop(), "lora_bias": lbias.pop(), "bias": "none",
        "target_modules": sorted({n for n, _ in layers}),
        "rank_pattern": {f"^{re.escape(n)}": m.r for n, m in layers if m.r != r0},
        "alpha_pattern": {f"^{re.escape(n)}": m.lora_alpha for n, m in layers if m.lora_alpha != a0},
        "use_dora": dora.pop(), "init_lora_weights": True, "modules_to_save": None,
    }


def save_peft_adapter(model: nn.Module, path, *, slot: Optional[int] = None) -> List[str]:
    """Write ``model``'s LoRA (incl. DoRA) or IA3 layers as a PEFT ``save_pretrained`` folder
    (``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base,
    path)`` loads. With ``slot``, the adapter in that slot of every MultiLoRALinear. Returns the module
    names written."""
    from .nn.ia3 import IA3Linear

    ia3 = [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Linear)]
    if ia3 and slot is None:
        if any(isinstance(m, (LoRALinear, MultiLoRALinear)) for m in model.modules()):
            raise ValueError("save_peft_adapter: the model has both IA3 and LoRA layers, which one PEFT config "
                             "cannot hold")
        if len({m.fan_in_fan_out for _, m in ia3}) > 1:
            raise ValueError("save_peft_adapter: layers mix nn.Linear and Conv1D bases (fan_in_fan_out)")
        cfg = {"peft_type": "IA3", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
               "target_modules": sorted(n for n, _ in ia3),
               "feedforward_modules": sorted(n for n, m in ia3 if m.feedforward),
               "fan_in_fan_out": ia3[0][1].fan_in_fan_out, "init_ia3_weights": True, "modules_to_save": None}
        sd = {f"{PREFIX}{n}.ia3_l": m.ia3_l.detach().to("cpu").contiguous() for n, m in ia3}
        _add_saved(model, sd, cfg)
        _write_folder(path, sd, cfg)
        return [n for n, _ in ia3]
    from .nn.embedding import LoRAEmbedding

    from .nn.experts import LoRAExperts
    from .nn.packed import PackedLoRALinear

    if slot is None:  # a PackedLoRALinear as its equivalent single LoRA on the packed layer (PEFT loads it there)
        layers = [(n, m.peft_view() if isinstance(m, PackedLoRALinear) else m) for n, m in model.named_modules()
                  if isinstance(m, (LoRALinear, LoRAEmbedding, LoRAExperts, PackedLoRALinear))]
    else:
        layers = []
        for n, m in model.named_modules():
            if isinstance(m, MultiLoRALinear):
                A, B, s = m.get_adapter(slot)
                if A.shape[0] == 0:
                    continue
                layers.append((n, _SlotView(m, A, B, s, slot)))
    if not layers:
        raise ValueError("save_peft_adapter: the model has no LoRA layers" + (f" with slot {slot} set" if slot is not None else ""))
    cfg = _layer_config(layers)
    # target_modules as full names: PEFT matches them exactly (a name equal to the module's)
    experts = [(n, m) for n, m in layers if isinstance(m, LoRAExperts)]
    if experts:
        if {f"^{re.escape(n)}" for n, _ in experts} & (set(cfg["rank_pattern"]) | set(cfg["alpha_pattern"])):
            raise ValueError("save_peft_adapter: expert LoRA (target_parameters) must use the config's r and lora_alpha")
        cfg["target_modules"] = [n for n in cfg["target_modules"] if n not in {e for e, _ in experts}] or None
        cfg["target_parameters"] = sorted(f"{n}.{p}" for n, m in experts for p in m.targets)
    sd = {}
    for n, m in layers:
        if isinstance(m, LoRAExperts):
            sd.update(m.peft_tensors(f"{PREFIX}{n}"))
            continue
        if isinstance(m, LoRAEmbedding) or getattr(m, "embedding", False):
            sd[f"{PREFIX}{n}.lora_embedding_A"] = m.lora_A.detach().to("cpu").contiguous()
            sd[f"{PREFIX}{n}.lora_embedding_B"] = m.lora_B.detach().to("cpu").contiguous()
            continue
        sd[f"{PREFIX}{n}.lora_A.weight"] = m.lora_A.detach().to("cpu").contiguous()
        sd[f"{PREFIX}{n}.lora_B.weight"] = m.lora_B.detach().to("cpu").contiguous()
        if m.lora_bias:
            sd[f"{PREFIX}{n}.lora_B.bias"] = m.lora_B_bias.detach().to("cpu").contiguous()
        if getattr(m, "use_dora", False):
            sd[f"{PREFIX}{n}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach().to("cpu").contiguous()
    if slot is None:
        _add_saved(model, sd, cfg)
    _write_folder(path, sd, cfg)
    return [n for n, _ in layers]


def _add_saved(model: nn.Module, sd: Dict[str, torch.Tensor], cfg: dict) -> None:
    """The ``modules_to_save`` copies under PEFT's keys (``<module>.<param>``) and names in the config; the task
    type the model was injected with; a warning for trainable parameters that no checkpoint would hold."""
    saved = model_mod.saved_modules(model)
    for n, w in saved:
        for k, v in w.trained.state_dict().items():
            sd[f"{PREFIX}{n}.{k}"] = v.detach().to("cpu").contiguous()
    cfg["modules_to_save"] = sorted(n for n, _ in saved) or None
    cfg["task_type"] = model.__dict__.get("_peft_kernels_task_type")
    model_mod.warn_unsaved(model, "save_peft_adapter")


_OURS = {CONFIG, WEIGHTS, LEGACY_WEIGHTS}
_CARRIED = {"README.md"}  # PEFT's save_pretrained writes one next to the adapter: kept across a re-save


def _write_folder(path, tensors: Dict[str, torch.Tensor], cfg: dict) -> None:
    """Atomic: the new adapter is written (and fsynced) into a temporary sibling folder, which then takes the
    place of ``path`` in one rename (an exchange with the previous folder where the OS has one). A crash or
    error at any point leaves the previous checkpoint whole: never new weights with an old config."""
    from safetensors.torch import save_file

    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    existing = None
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise ValueError(f"save_peft_adapter: {path!r} exists and is not a folder")
        existing = os.listdir(path)
        other = sorted(e for e in existing if e not in _OURS | _CARRIED)
        if other:
            raise ValueError(f"save_peft_adapter: {path!r} holds {other[:5]} besides an adapter; save into a new or "
                             "empty folder, or over a previous adapter folder (it is replaced as a whole)")
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as fh:
            json.dump(cfg, fh, indent=2, sort_keys=True, allow_nan=False)
        for e in existing or ():
            if e in _CARRIED:
                shutil.copy2(os.path.join(path, e), os.path.join(tmp, e))
        for name in os.listdir(tmp):
            _fsync(os.path.join(tmp, name))
        _fsync(tmp)
        if existing is None:
            os.rename(tmp, path)
        else:
            _exchange(tmp, path)  # tmp now holds the previous adapter
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(p: str) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> None:
    """Swap two folders: renameat2(RENAME_EXCHANGE) on Linux (atomic); elsewhere two renames, the previous
    folder kept under a sibling name until the new one is in place."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        AT_FDCWD, RENAME_EXCHANGE = -100, 2
        if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
            return
    except (OSError, AttributeError):
        pass
    old = a + ".previous"
    os.rename(b, old)
    os.rename(a, b)
    os.rename(old, a)


class _SlotView:
    """A MultiLoRALinear slot seen as a LoRALinear by the saver (r, alpha = scaling·r, tensors)."""

    def __init__(self, m: MultiLoRALinear, A, B, scaling: float, slot: int):
        self.lora_A, self.lora_B = A, B
        self.r = int(A.shape[0])
        self.lora_alpha = scaling * self.r
        self.use_rslora = False
        self.fan_in_fan_out = m.fan_in_fan_out
        self.use_dora = False
        self.lora_bias = False
        self.lora_dropout = m.lora_dropout[slot]
        self.embedding = m.fan_in_fan_out is None  # a MultiLoRAEmbedding slot: PEFT's lora_embedding_A/B keys


def from_peft(peft_model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replace the HF PEFT adapter layers of ``peft_model`` in place with fused modules carrying the same
    weights, and return the underlying (unwrapped) model.

    LoRA, one adapter: :class:`LoRALinear` per linear layer (r, alpha, rsLoRA, dropout, lora_bias, DoRA as
    configured) and :class:`LoRAEmbedding` per embedding. Several LoRA adapters: :class:`MultiLoRALinear` with
    one slot per adapter, in ``peft_model.peft_config`` order; ``model.peft_kernels_slots`` maps adapter names
    to slots and :func:`adapter_names_to_ids` turns PEFT's mixed-batch ``adapter_names`` (``"__base__"`` = no
    adapter) into ``adapter_ids``. IA3 (one adapter): :class:`IA3Linear`. ``modules_to_save`` modules (a
    trained head) become :class:`ModulesToSave` holding PEFT's trained copy.
    Everything is checked before the first layer is replaced: other PEFT types, merged layers, several IA3
    adapters, and what slots cannot hold (DoRA, lora_bias, embeddings, trained heads) raise ValueError and
    leave the model as it was.
    """
    try:
        from peft.tuners.ia3 import IA3Layer
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    except ImportError as e:  # pragma: no cover (peft is a test dependency)
        raise ImportError("from_peft needs the `peft` package") from e
    from .nn.embedding import LoRAEmbedding, MultiLoRAEmbedding, check_embedding
    from .nn.ia3 import IA3Linear
    from .nn.saved import ModulesToSave

    cfgs = getattr(peft_model, "peft_config", None)
    get_base = getattr(peft_model, "get_base_model", None)
    if not isinstance(cfgs, dict) or not callable(get_base):
        raise TypeError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}")
    names = list(cfgs)
    kinds = {a: str(getattr(c, "peft_type", "")).split(".")[-1] for a, c in cfgs.items()}
    for a, k in kinds.items():
        if k not in ("LORA", "IA3"):
            raise ValueError(f"adapter {a!r} is {cfgs[a].peft_type}: from_peft converts LoRA and IA3 adapters")
    if "IA3" in kinds.values() and len(names) > 1:
        raise ValueError(f"from_peft converts one IA3 adapter alone, got adapters {kinds}")
    multi = len(names) > 1
    for a, c in cfgs.items():
        if getattr(c, "use_dora", False) and multi:
            raise ValueError(f"adapter {a!r} uses DoRA: a DoRA adapter converts alone (to LoRALinear(use_dora=True)), "
                             "not into MultiLoRALinear slots")
    base = get_base()
    plans, heads = {}, {}
    for n, m in base.named_modules():
        if isinstance(m, ModulesToSaveWrapper):
            if multi:
                raise ValueError(f"{n!r} is a modules_to_save module of several adapters; MultiLoRALinear slots "
                                 "cannot hold a trained head per adapter (convert one adapter at a time)")
            a = names[0]
            if a not in m.modules_to_save:
                raise ValueError(f"{n!r}: modules_to_save holds no copy for adapter {a!r}")
            heads[n] = m
            continue
        if isinstance(m, AuxiliaryTrainingWrapper):
            raise ValueError(f"{n!r} is a PEFT {type(m).__name__} (e.g. trainable_token_indices), which from_peft "
                             "does not convert")
        if not isinstance(m, BaseTunerLayer):
            continue
        if not isinstance(m, (LoraLayer, IA3Layer)):
            raise ValueError(f"layer {n!r} is a PEFT {type(m).__name__}: from_peft converts LoRA and IA3 layers")
        if m.merged:
            raise ValueError(f"layer {n!r} has merged adapters {m.merged_adapters}: unmerge before from_peft")
        lin = m.get_base_layer()
        if isinstance(m, LoraLayer) and isinstance(lin, nn.Embedding):
            check_embedding(lin, f"layer {n!r}")
            plans[n] = ("embedding", m, lin, [a for a in names if a in m.lora_embedding_A])
            continue
        if not isinstance(lin, nn.Linear) and not is_conv1d(lin):
            hint = (" (LoRA on expert weights, target_parameters: save it with save_pretrained and load the folder "
                    "with peft_kernels.load_peft_adapter)" if type(m).__name__ == "ParamWrapper" else "")
            raise ValueError(f"layer {n!r} wraps a {type(lin).__name__}; only Linear/Conv1D (and nn.Embedding LoRA) "
                             f"layers convert{hint}")
        if isinstance(m, IA3Layer):
            plans[n] = ("ia3", m, lin, [a for a in names if a in m.ia3_l])
            continue
        present = [a for a in names if a in m.lora_A]
        for a in present:
            if m.lora_B[a].bias is not None and multi:
                raise ValueError(f"layer {n!r}: lora_bias adapters cannot share a MultiLoRALinear")
        plans[n] = ("lora", m, lin, present)
    if not plans:
        raise ValueError("peft_model has no LoRA or IA3 layers")

    def make(kind, m, lin, present):
        if kind == "ia3":
            new = IA3Linear.from_linear(lin, feedforward=bool(m.is_feedforward), backend=backend)
            with torch.no_grad():
                new.ia3_l.copy_(m.ia3_l[present[0]])
            return new
        if kind == "embedding" and multi:
            new = MultiLoRAEmbedding.from_embedding(lin, max_adapters=len(names),
                                                    max_rank=max([m.r[a] for a in present] or [1]),
                                                    lora_dtype=m.lora_embedding_A[present[0]].dtype if present else None)
            for a in present:
                new.set_adapter(names.index(a), m.lora_embedding_A[a].detach(), m.lora_embedding_B[a].detach(),
                                float(m.scaling[a]))
            return new
        if kind == "embedding":
            a = present[0]
            new = LoRAEmbedding.from_embedding(lin, r=m.r[a], lora_alpha=m.lora_alpha[a], backend=backend,
                                               lora_dtype=m.lora_embedding_A[a].dtype)
            new.scaling = float(m.scaling[a])
            with torch.no_grad():
                new.lora_embedding_A.copy_(m.lora_embedding_A[a])
                new.lora_embedding_B.copy_(m.lora_embedding_B[a])
            return new
        if not multi:
            a = present[0]
            drop = m.lora_dropout[a]
            new = LoRALinear.from_linear(lin, r=m.r[a], lora_alpha=m.lora_alpha[a],
                                         lora_dropout=float(getattr(drop, "p", 0.0)),
                                         use_rslora=bool(cfgs[a].use_rslora), backend=backend,
                                         lora_dtype=m.lora_A[a].weight.dtype, lora_bias=m.lora_B[a].bias is not None,
                                         use_dora=bool(m.use_dora.get(a, False)))
            new.scaling = float(m.scaling[a])  # PEFT's own value (rank/alpha patterns and rsLoRA included)
            with torch.no_grad():
                new.lora_A.copy_(m.lora_A[a].weight)
                new.lora_B.copy_(m.lora_B[a].weight)
                if new.use_dora:
                    new.lora_magnitude_vector.copy_(m.lora_magnitude_vector[a].weight)
                if new.lora_bias:
                    new.lora_B_bias.copy_(m.lora_B[a].bias)
            return new
        max_rank = max(m.r[a] for a in present) if present else 1
        new = MultiLoRALinear.from_linear(lin, max_adapters=len(names), max_rank=max_rank, backend=backend,
                                          lora_dtype=m.lora_A[present[0]].weight.dtype if present else None)
        for a in present:
            new.set_adapter(names.index(a), m.lora_A[a].weight.detach(), m.lora_B[a].weight.detach(),
                            float(m.scaling[a]), dropout=float(getattr(m.lora_dropout[a], "p", 0.0)))
        return new

    new = {n: make(*p) for n, p in plans.items()}
    saved = {}
    for n, w in heads.items():
        saved[n] = ModulesToSave(w.original_module, trained=w.modules_to_save[names[0]])
    for n, mod in list(new.items()) + list(saved.items()):
        parent, _, child = n.rpartition(".")
        setattr(base.get_submodule(parent) if parent else base, child, mod)
    base.peft_kernels_slots = {a: i for i, a in enumerate(names)}
    tt = getattr(cfgs[names[0]], "task_type", None)
    if tt is not None and not multi:
        base.__dict__["_peft_kernels_task_type"] = str(getattr(tt, "value", tt))
    return base


def adapter_names_to_ids(model: nn.Module, adapter_names) -> torch.Tensor:
    """PEFT's mixed-batch ``adapter_names`` (one per batch row; ``"__base__"`` = no adapter) as the
    ``adapter_ids`` of a model converted by :func:`from_peft`."""
    slots = getattr(model, "peft_kernels_slots", None)
    if slots is None:
        raise ValueError("model was not converted by peft_kernels.from_peft (no peft_kernels_slots)")
    out = []
    for a in adapter_names:
        if a == "__base__":
            out.append(-1)
        elif a in slots:
            out.append(slots[a])
        else:
            raise ValueError(f"unknown adapter name {a!r}; this model has {sorted(slots)} and '__base__'")
    return torch.tensor(out, dtype=torch.long)
