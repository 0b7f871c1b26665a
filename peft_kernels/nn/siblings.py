"""Sibling projections: ``LoRALinear`` layers that read the same input (q/k/v, gate/up) run as one op
(``ops/siblings.py``) while staying separate modules, so parameter names, state dicts and checkpoints do not change.

How: the members' frozen weights are packed once into one ``[Σ out, in]`` buffer, and each member's ``weight`` (and
``bias``) Parameter is re-pointed at its block (``p.data = view``; the same Parameter objects, so the original
layers ``unload`` puts back share them, and no second copy exists). The first member a model calls with some
``x`` computes every member's output in one call and leaves the others' outputs for them (per thread); a
sibling called with the same ``x`` (the same tensor object, not modified since) takes its output, unless it is
called under another grad, inference or autocast mode (then it runs alone, as its output would differ). An inference
tensor x (created under ``torch.inference_mode``) has no version counter, so its members run alone. If a sibling is
called with another input instead, the group does not share its input (e.g. cross-attention): it turns itself
off for good and every member runs alone. A member whose weight was re-bound (``load_state_dict(assign=True)``,
``p.data = …``, a deep copy) is packed again at the next call.

Not fused (each member runs alone): under ``torch.compile`` (the hand-off between calls is Python state), inside
``disable_adapters``, when a member is merged, while a member's base weight or bias requires grad (unfrozen: the
packed buffer carries no gradient), and for DoRA / ``lora_bias`` / Conv1D / quantized members (refused when the group
is built).

Multi-adapter groups (``MultiLoRALinear`` members, ``inject_multi_lora(fuse_siblings=...)``): the stacked frozen
GEMM runs once for the group (x read once, one launch instead of one per member), then each member adds its own
per-token LoRA update (``ops.multi_lora.multi_lora_delta``: its slots, ranks, scalings and per-slot dropout, read
at the call under the member's slot lock) to its column block. The token grouping is the ``adapter_ids`` block's,
built once for all of them. A member called with ``adapter_ids=`` passed explicitly runs alone.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

import torch.nn.functional as F

from ..ops._amp import autocast_dtype
from ..ops.multi_lora import multi_lora_delta
from ..ops.siblings import column_blocks, lora_siblings
from ._disabled import adapters_disabled

# sibling names a model's structure gives (members are the LoRA'd ones among them, children of one module)
KNOWN_GROUPS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("gate_proj", "up_proj"),
                ("wq", "wk", "wv"), ("w1", "w3"), ("q", "k", "v"))


class _Pending:
    """The outputs left for the members not called yet, of the group's call on ``x`` (at ``version``) under
    ``mode``."""
    __slots__ = ("x", "version", "mode", "left")

    def __init__(self, x, version, mode, left):
        self.x, self.version, self.mode, self.left = x, version, mode, left


def _mode(x: torch.Tensor) -> tuple:
    """What a separate layer's output depends on besides its input and parameters: grad mode (a graph or not),
    inference mode, and the autocast dtype on x's device."""
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast_dtype(x)


def _member_problem(n: str, m: nn.Module, first: nn.Module, first_name: str) -> Optional[Exception]:
    """Why ``m`` (named ``n``) cannot be in a group whose first member is ``first``, or None."""
    from .lora import LoRALinear
    from .multi_lora import MultiLoRALinear

    multi = type(first) is MultiLoRALinear
    kind = MultiLoRALinear if multi else LoRALinear
    if (type(m) is not MultiLoRALinear) if multi else not isinstance(m, LoRALinear):
        return TypeError(f"sibling {n!r} must be a {kind.__name__} (all members of one kind; a quantized "
                         f"multi-adapter base is not fused), got {type(m).__name__}")
    if multi:
        if m.fan_in_fan_out:
            return ValueError(f"sibling {n!r}: Conv1D bases are not fused")
        if m.max_adapters != first.max_adapters:
            return ValueError(f"sibling {n!r}: max_adapters {m.max_adapters} differs from {first_name!r}'s "
                              f"{first.max_adapters} (the members share the token grouping)")
    elif m.use_dora or m.lora_bias or m.fan_in_fan_out or m.merged:
        return ValueError(f"sibling {n!r}: DoRA, lora_bias, Conv1D bases and merged layers are not fused")
    if type(m.weight) is not nn.Parameter or not m.weight.is_floating_point():
        return TypeError(f"sibling {n!r}: a quantized base is not fused")
    if getattr(m, "_siblings", None) is not None:
        return ValueError(f"sibling {n!r} is already in a group")
    return None


class SiblingGroup:
    """Members (all ``LoRALinear`` or all ``MultiLoRALinear``) that share their input; see the module docstring."""

    def __init__(self, members: Sequence[nn.Module], names: Sequence[str] = ()):
        from .multi_lora import MultiLoRALinear

        members = list(members)
        self.names = list(names) or [f"member{i}" for i in range(len(members))]
        err = SiblingGroup.problem(members, self.names)
        if err is not None:
            raise err
        self.multi = type(members[0]) is MultiLoRALinear
        self.members = members
        self.enabled = True
        self.why_off: Optional[str] = None
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._pack()
        for m in members:
            object.__setattr__(m, "_siblings", self)

    @staticmethod
    def problem(members: Sequence[nn.Module], names: Sequence[str]) -> Optional[Exception]:
        """Why ``members`` cannot form a group (the ValueError / TypeError the constructor raises), or None. Changes
        nothing: callers check every group before making any."""
        if len(members) < 2:
            return ValueError(f"a sibling group needs at least 2 members, got {len(members)}")
        for n, m in zip(names, members):
            err = _member_problem(n, m, members[0], names[0])
            if err is not None:
                return err
        first = members[0]
        for n, m in zip(names[1:], members[1:]):
            if (m.in_features, m.weight.dtype, m.weight.device) != (first.in_features, first.weight.dtype,
                                                                    first.weight.device):
                return ValueError(f"sibling {n!r}: in_features, dtype and device must equal {names[0]!r}'s")
        return None

    def __deepcopy__(self, memo):
        import copy

        new = object.__new__(SiblingGroup)
        memo[id(self)] = new
        new.__setstate__({k: copy.deepcopy(v, memo) for k, v in self.__getstate__().items()})
        return new

    def __getstate__(self):  # the per-thread hand-off and the lock are not state
        return {k: v for k, v in self.__dict__.items() if k not in ("_tls", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tls = threading.local()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ packing
    def _unpackable(self) -> Optional[str]:
        """Why the members' current weights cannot be packed into one buffer (None when they can): every weight
        and bias must share the first member's dtype and device (packing would otherwise cast a member's weight,
        e.g. back from the half precision one member was moved to)."""
        first = self.members[0].weight
        for n, m in zip(self.names, self.members):
            for p in (m.weight, m.bias):
                if p is not None and (p.dtype, p.device) != (first.dtype, first.device):
                    return (f"sibling {n!r}'s weights are {p.dtype} on {p.device}, {self.names[0]!r}'s "
                            f"{first.dtype} on {first.device}: they cannot be packed together")
        return None

    def _pack(self) -> None:
        ms = self.members
        with torch.no_grad():
            W = torch.cat([m.weight.detach() for m in ms])
            has_bias = any(m.bias is not None for m in ms)
            b = torch.cat([m.bias.detach() if m.bias is not None else
                           torch.zeros(m.out_features, dtype=W.dtype, device=W.device) for m in ms]) if has_bias else None
            off = 0
            for m in ms:
                n = m.out_features
                m.weight.data = W[off:off + n]
                if m.bias is not None:
                    m.bias.data = b[off:off + n]
                off += n
        self.W, self.b = W, b

    def packed(self) -> bool:
        """Whether every member's weight and bias are still their blocks of the packed buffers."""
        off = 0
        es = self.W.element_size()
        for m in self.members:
            n = m.out_features
            w = m.weight
            if (w.untyped_storage().data_ptr() != self.W.untyped_storage().data_ptr() or w.shape != (n, m.in_features)
                    or w.stride() != (m.in_features, 1)
                    or w.data_ptr() != self.W.data_ptr() + off * m.in_features * es):
                return False
            if m.bias is not None and (self.b is None or m.bias.untyped_storage().data_ptr() !=
                                       self.b.untyped_storage().data_ptr() or m.bias.data_ptr() !=
                                       self.b.data_ptr() + off * es or m.bias.shape != (n,)):
                return False
            off += n
        return True

    def dissolve(self) -> None:
        """Give every member its own weight and bias again (copies) and leave the group."""
        with torch.no_grad():
            for m in self.members:
                m.weight.data = m.weight.data.clone()
                if m.bias is not None:
                    m.bias.data = m.bias.data.clone()
                object.__setattr__(m, "_siblings", None)
        self.enabled = False
        self.why_off = "dissolved"

    # ------------------------------------------------------------------------------------ forward
    def turn_off(self, why: str) -> None:
        self.enabled = False
        self.why_off = why
        self._tls.pending = None

    def member_forward(self, member: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``member``'s output from the group (computing every member's, or taking the one left for it), or None
        when the member must run alone."""
        if x.is_inference():  # no version counter: an in-place change to x between the members' calls (inside
            return None  # inference_mode) could not be seen, so each member runs alone
        tls = self._tls
        pend: Optional[_Pending] = getattr(tls, "pending", None)
        if pend is not None:
            tls.pending = None
            if id(member) in pend.left:
                if pend.x is x and pend.version == x._version:
                    out = pend.left.pop(id(member))
                    if pend.left:
                        tls.pending = pend
                    # called under another grad, inference or autocast mode than the call that computed it: the
                    # output would not be this call's (no graph, or another dtype), so the member runs alone
                    return out if pend.mode == _mode(x) else None
                # a sibling whose output is waiting was called with another input: they do not share it
                self.turn_off(f"{type(member).__name__} siblings were called with different inputs")
                return None
            # the member that computed the pending outputs is called again: a new forward (the last one stopped
            # before its siblings ran, e.g. it raised); the stale outputs are dropped
        ms = self.members
        if any(adapters_disabled(m) or getattr(m, "merged", False) for m in ms):
            return None
        if torch.is_grad_enabled() and any(p is not None and p.requires_grad for m in ms for p in (m.weight, m.bias)):
            return None  # an unfrozen base trains through its own Parameter, which the packed buffer is not
        if not self.packed():
            with self._lock:
                if not self.packed():
                    why = self._unpackable()
                    if why is not None:  # e.g. one member moved to another dtype: each runs alone, as it is
                        self.turn_off(why)
                        return None
                    self._pack()
        if self.multi:
            outs = self._multi_outputs(x)
        else:
            outs = lora_siblings(x, self.W, self.b, [m.lora_A for m in ms], [m.lora_B for m in ms],
                                 [m.scaling for m in ms], [m.lora_dropout if m.training else 0.0 for m in ms],
                                 training=any(m.training for m in ms), split=True)
        left: Dict[int, torch.Tensor] = {id(m): o for m, o in zip(ms, outs) if m is not member}
        tls.pending = _Pending(x, x._version, _mode(x), left)
        return outs[ms.index(member)]

    def _multi_outputs(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Multi-adapter members: the stacked base GEMM once, each member's per-token LoRA update on its block."""
        ms = self.members
        ids = ms[0]._resolve_ids(None, x.shape, x.device)  # the adapter_ids block's grouping (raises without one)
        with torch.no_grad():  # the base's dX comes from each member's op (base_weight): no graph through it
            y = F.linear(x.reshape(-1, x.shape[-1]), self.W, self.b)
        outs = []  # each member's update added in place into its column block of the one base output (no copies)
        for m, yb in zip(ms, column_blocks(y, [m.out_features for m in ms])):
            with m._slots_lock.reading():
                outs.append(multi_lora_delta(x, m.lora_A, m.lora_B, m.scalings, ids,
                                             yb.view(*x.shape[:-1], m.out_features), m.weight, ranks=m.ranks,
                                             backend=m.backend, path=m.path, check_ids=m.check_ids,
                                             dropout_p=tuple(m.lora_dropout) if m.training else None,
                                             training=m.training))
        return outs


def find_sibling_groups(names: Sequence[str], groups=True) -> List[List[str]]:
    """Qualified names of the LoRA'd layers (``names``) that form sibling groups by name: children of one module
    named as one of ``KNOWN_GROUPS`` (``groups=True``) or of the given groups of child names; groups of fewer than 2
    LoRA'd members are dropped."""
    spec = KNOWN_GROUPS if groups is True else tuple(tuple(g) for g in groups)
    chosen = set(names)
    by_parent: Dict[str, List[str]] = {}
    for n in names:
        parent, _, child = n.rpartition(".")
        by_parent.setdefault(parent, []).append(child)
    out = []
    for parent, children in by_parent.items():
        for g in spec:
            members = [c for c in g if c in children and (f"{parent}.{c}" if parent else c) in chosen]
            if len(members) >= 2:
                out.append([f"{parent}.{c}" if parent else c for c in members])
    return out


def check_groups_arg(groups) -> None:
    if groups is True or groups is False:
        return
    ok = isinstance(groups, (list, tuple)) and groups and all(
        isinstance(g, (list, tuple)) and len(g) >= 2 and all(isinstance(c, str) and c for c in g) for g in groups)
    if not ok:
        raise ValueError("fuse_siblings must be True, False, or a list of groups of child names (each at least 2), "
                         f"e.g. [['q_proj', 'k_proj', 'v_proj'], ['gate_proj', 'up_proj']]; got {groups!r}")


def fuse_siblings(model: nn.Module, groups=True) -> List[List[str]]:
    """Group the model's ``LoRALinear`` siblings, and its ``MultiLoRALinear`` siblings (see the module docstring);
    returns the groups made, by qualified name. ``groups``: True (the names in ``KNOWN_GROUPS``) or a list of groups
    of child names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_siblings: model must be an nn.Module, got {type(model).__name__}")
    check_groups_arg(groups)
    if groups is False:
        return []
    return group_siblings(model, [n for n, _ in model.named_modules()], groups)


def plan_sibling_groups(layers: Dict[str, nn.Module], groups=True) -> List[List[str]]:
    """The groups ``group_siblings`` makes among ``layers`` (qualified name → layer, not in a group yet:
    ``LoRALinear`` without DoRA or ``lora_bias``, and ``MultiLoRALinear``, each kind among its own), all checked and
    nothing changed. With ``groups=True`` (names from the model's structure) each set of siblings by name keeps the
    members that can share one op (same in_features, dtype and device; not quantized, merged or Conv1D), and a set
    with fewer than 2 of them is left out: grouping by structure never fails (e.g. cross-attention's q reads another
    width than k and v: k and v form the group). Groups the caller names must be valid as named: the first that is
    not raises its ValueError / TypeError, before anything is grouped."""
    from .lora import LoRALinear
    from .multi_lora import MultiLoRALinear

    out: List[List[str]] = []
    for ok in (lambda m: isinstance(m, LoRALinear) and not m.use_dora and not m.lora_bias,
               lambda m: type(m) is MultiLoRALinear):
        kind = [n for n, m in layers.items() if ok(m) and getattr(m, "_siblings", None) is None]
        for g in find_sibling_groups(kind, groups):
            if groups is True:
                buckets: Dict[tuple, List[str]] = {}
                for n in g:
                    m = layers[n]
                    if _member_problem(n, m, m, n) is None:
                        key = (m.in_features, m.weight.dtype, m.weight.device, getattr(m, "max_adapters", None))
                        buckets.setdefault(key, []).append(n)
                out += [b for b in buckets.values() if len(b) >= 2]
                continue
            err = SiblingGroup.problem([layers[n] for n in g], g)
            if err is not None:
                raise err
            out.append(g)
    seen: Dict[str, int] = {}
    for i, g in enumerate(out):
        for n in g:
            if n in seen:
                raise ValueError(f"fuse_siblings: {n!r} is named in two groups ({out[seen[n]]} and {g})")
            seen[n] = i
    return out


def make_sibling_groups(layers: Dict[str, nn.Module], plan: List[List[str]]) -> List[List[str]]:
    """Make the groups ``plan_sibling_groups`` planned among ``layers``; returns the plan. With it, the one place
    ``fuse_siblings``, ``inject_lora`` and ``inject_multi_lora`` group layers."""
    for g in plan:
        SiblingGroup([layers[n] for n in g], g)
    return plan


def group_siblings(model: nn.Module, names: Sequence[str], groups=True) -> List[List[str]]:
    """Make the sibling groups among the layers ``names`` (qualified names in ``model``) that are not in one yet
    (``plan_sibling_groups``: every group is checked before any is made); returns them."""
    layers = {n: model.get_submodule(n) for n in names}
    return make_sibling_groups(layers, plan_sibling_groups(layers, groups))


def unfuse_siblings(model: nn.Module) -> int:
    """Dissolve every sibling group in ``model`` (each member gets its own weight again); returns how many."""
    seen = {}
    for m in model.modules():
        g = getattr(m, "_siblings", None)
        if g is not None:
            seen[id(g)] = g
    for g in seen.values():
        g.dissolve()
    return len(seen)
