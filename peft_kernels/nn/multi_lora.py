"""``MultiLoRALinear``: a drop-in ``nn.Linear`` carrying many LoRA adapters, one chosen per token,
and ``adapter_ids(model, ids)``, which sets the ids once for every such layer in a model."""
from __future__ import annotations

import contextlib
import contextvars
import math
import threading
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from .. import dispatch, quant
from ..ops.multi_lora import PATHS, AdapterMapping, build_mapping, multi_lora_linear
from ..reference import expand_adapter_ids
from ._disabled import adapters_disabled
from .lora import adopt_frozen_base, base_features


def _check_dropout(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"lora_dropout must be a float in [0, 1), got {p!r}")
    return float(p)


class AdapterIds:
    """The adapter ids of one batch, shared by every MultiLoRALinear in a model.

    The token grouping (:class:`AdapterMapping`) is built by the first layer that needs it and
    reused by every later layer with the same token count and slot count (and by backward): one host
    sync per batch. Given a prebuilt :class:`AdapterMapping` instead of ids, no layer builds anything
    (no host sync at all: what a CUDA-graph capture needs).
    """

    def __init__(self, ids, check_ids: bool = True):
        if isinstance(ids, AdapterMapping):
            self.ids = None
            self.prebuilt = ids
        else:
            if not isinstance(ids, torch.Tensor):
                raise TypeError(f"adapter ids must be a torch.Tensor of int32/int64 or an AdapterMapping, got "
                                f"{type(ids).__name__}")
            if ids.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"adapter ids must be int32 or int64, got {ids.dtype}")
            self.ids = ids
            self.prebuilt = None
        self.check_ids = bool(check_ids)
        self._cache: Dict[Tuple, AdapterMapping] = {}

    def _new_forward(self) -> None:
        """The model's forward starts: group the ids afresh (they may have been changed in place since)."""
        self._cache.clear()

    @property
    def builds(self) -> int:
        """How many distinct groupings were built (1 for a model whose layers all see the same tokens)."""
        return len(self._cache)

    def mapping(self, x_shape, num_slots: int, device) -> AdapterMapping:
        if self.prebuilt is not None:
            return self.prebuilt  # the op checks its token count, slot count and device against the layer
        # ids._version: an in-place write to the ids between two layers of one forward is seen too (writes
        # through .data, and to ids created under inference_mode, which have no version counter, are seen at the
        # model's next forward, when the cache is cleared)
        key = (tuple(x_shape[:-1]), num_slots, torch.device(device),
               None if self.ids.is_inference() else self.ids._version)
        m = self._cache.get(key)
        if m is None:
            ids = expand_adapter_ids(self.ids, x_shape)
            m = build_mapping(ids, ids.numel(), num_slots, device=device, check_ids=self.check_ids)
            self._cache[key] = m
        return m


class _SlotsLock:
    """Many readers (forwards launching their kernels) or one writer (a slot update); a waiting writer goes
    before new readers. On CUDA the writer also waits for the kernels already queued on every stream, and
    its own copies finish before any reader launches again, so streams other than the writer's are safe."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def reading(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self, device: torch.device):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            yield
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# The ids set by adapter_ids() blocks, per thread and per asyncio task: id(layer) -> (layer, AdapterIds), and
# id(model) -> (model, AdapterIds) for the models the blocks were opened on. A ContextVar, so two threads (or
# tasks) serving one model each see their own ids.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("peft_kernels_adapter_ids", default={})


# The same blocks as seen by compiled graphs (dynamo cannot trace ContextVar.get; it traces a threading.local, and
# its guards read it in the calling thread): per thread, a stack of (asyncio task or None, {id(layer): ids}).
# ``_COMPILED.ids`` is the innermost block's map, or None while blocks opened by different asyncio tasks are open
# at once on this thread: a compiled layer then refuses (no ids) rather than read another task's ids.
_COMPILED = threading.local()


def _current_task():
    import asyncio

    try:
        return asyncio.current_task()
    except RuntimeError:  # no running event loop
        return None


def _sync_compiled() -> None:
    stack = _COMPILED.stack
    _COMPILED.ids = None if not stack or len({id(t) for t, _ in stack}) > 1 else stack[-1][1]


def _active_ids(module: nn.Module) -> Optional[AdapterIds]:
    e = _ACTIVE.get().get(id(module))
    return e[1] if e is not None and e[0] is module else None


def _compiled_ids(module: nn.Module) -> Optional[torch.Tensor]:
    """The id tensor of ``module``'s innermost ``adapter_ids`` block on this thread (what a graph reads)."""
    d = getattr(_COMPILED, "ids", None)
    return d.get(id(module)) if d is not None else None


def _start_of_forward(model: nn.Module, args) -> None:
    """Forward pre-hook left on a model once adapter_ids() was used on it (one fixed hook, so a compiled model
    is not re-guarded per block): each forward of the model groups the current ids afresh."""
    if torch.compiler.is_compiling():  # a graph groups inside the op; the ids come from _compiled_ids
        return
    st = _active_ids(model)
    if st is not None:
        st._new_forward()


@contextlib.contextmanager
def adapter_ids(model: nn.Module, ids, *, check_ids: bool = True):
    """Within the block, every MultiLoRALinear in ``model`` uses ``ids`` (one per token, or one per
    batch row for ``[B, L, K]`` inputs; -1 = base only). The grouping of tokens by adapter is built
    once per forward of ``model`` and shared by all its layers.

        with peft_kernels.adapter_ids(model, torch.tensor([0, 3, -1, 3])):
            logits = model(input_ids)

    The ids hold for the current thread and asyncio task only (a ``contextvars`` context): threads or tasks
    serving one model concurrently each use their own. Changing ``ids`` in place inside the block takes
    effect at the model's next forward.

    ``ids`` may also be an :class:`AdapterMapping` built beforehand with :func:`build_mapping` (for the
    model's flattened token count): then the layers make no host sync at all, so the block can be
    captured in a CUDA graph (README: "CUDA graphs").
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    if not layers:
        raise ValueError("adapter_ids(): the model has no MultiLoRALinear layers")
    state = AdapterIds(ids, check_ids)
    if not getattr(model, "_peft_kernels_ids_hook", False):
        model.register_forward_pre_hook(_start_of_forward)
        model._peft_kernels_ids_hook = True
    active = dict(_ACTIVE.get())
    active[id(model)] = (model, state)
    for m in layers:
        active[id(m)] = (m, state)
    token = _ACTIVE.set(active)
    if not hasattr(_COMPILED, "stack"):
        _COMPILED.stack = []
    prev = _COMPILED.stack[-1][1] if _COMPILED.stack else {}
    entry = (_current_task(), {**prev, **{id(m): state.ids for m in layers}})
    _COMPILED.stack.append(entry)
    _sync_compiled()
    try:
        yield state
    finally:
        _ACTIVE.reset(token)
        _COMPILED.stack = [e for e in _COMPILED.stack if e is not entry]
        _sync_compiled()


def checkpoint_context():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the ``adapter_ids`` blocks
    open when the checkpointed region runs forward are open again when backward recomputes it (backward usually
    runs after the block has closed, and the recompute would find no ids). With transformers::

        model.activation_checkpointing_enable(activation_checkpointing_kwargs={   # gradient_checkpointing_enable(
            "use_reentrant": False, "context_fn": peft_kernels.checkpoint_context})  # gradient_checkpointing_kwargs=)

    Each checkpointed call captures the ids of its own forward, so several forwards before one backward (gradient
    accumulation) each recompute with theirs. The reentrant checkpoint takes no context_fn: run its backward
    inside the block."""
    state = _ACTIVE.get()  # the blocks' map is replaced, never changed in place, when a block opens or closes

    @contextlib.contextmanager
    def recompute():
        token = _ACTIVE.set(state)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
    return contextlib.nullcontext(), recompute()


def _in_backward() -> bool:
    f = getattr(torch._C, "_current_graph_task_id", None)
    return f is not None and f() != -1


class MultiLoRALinear(nn.Module):
    """Frozen ``nn.Linear`` plus ``max_adapters`` LoRA slots; each token picks one (or none).

    State: frozen ``weight`` [out, in] and ``bias`` [out] (nn.Linear's names), parameters ``lora_A``
    [S, R, in] and ``lora_B`` [S, out, R] (S = max_adapters, R = max_rank; slot ``a`` holds PEFT's
    ``lora_A.weight`` in ``lora_A[a, :r]`` and ``lora_B.weight`` in ``lora_B[a, :, :r]``, zero-padded),
    buffers ``scalings`` [S] (fp32) and ``ranks`` [S] (int32; 0 = empty slot).

    ``forward(x, adapter_ids=None)``: ids per token or per batch row, -1 = base only; when None, the
    ids set by ``peft_kernels.adapter_ids(model, ids)`` are used. Gradients reach only the slots
    that have tokens in the batch, each from its own tokens, so several adapters train in one pass.

    ``check_ids`` (default True) raises on ids outside [-1, S); False skips the check on a hot path
    (bad ids then act as -1, never as an out-of-bounds read). ``path``: "auto" | "bgmv" | "sgmv"
    (the Triton kernel shape; the torch backend always groups per segment).
    """

    def __init__(self, in_features: int, out_features: int, max_adapters: int = 8, max_rank: int = 16,
                 bias: bool = True, device=None, dtype=None, backend: str = "auto",
                 lora_dtype: Optional[torch.dtype] = None, path: str = "auto", check_ids: bool = True,
                 lora_dropout: float = 0.0, *, _base: Optional[nn.Linear] = None):
        super().__init__()
        _check_dropout(lora_dropout)
        for name, v in (("max_adapters", max_adapters), ("max_rank", max_rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if backend not in dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {dispatch.BACKENDS}, got {backend!r}")
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self._adopt_base(_base, in_features, out_features, bias, device, dtype)
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.backend = backend
        self.path = path
        self.check_ids = bool(check_ids)
        dev = self.weight.device
        ldt = lora_dtype if lora_dtype is not None else self._default_lora_dtype()
        S, R = max_adapters, max_rank
        self.lora_A = nn.Parameter(torch.zeros(S, R, self.in_features, device=dev, dtype=ldt))
        self.lora_B = nn.Parameter(torch.zeros(S, self.out_features, R, device=dev, dtype=ldt))
        # float64 for a float64 layer (kept end to end), float32 otherwise
        sdt = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        self.register_buffer("scalings", torch.zeros(S, device=dev, dtype=sdt))
        self.register_buffer("ranks", torch.zeros(S, device=dev, dtype=torch.int32))
        # each slot's dropout p on its LoRA input in training (PEFT's per-adapter lora_dropout); like
        # LoRALinear.lora_dropout a setting, not state: set_adapter sets it, the default is lora_dropout
        self.default_dropout = float(lora_dropout)
        self.lora_dropout = [float(lora_dropout)] * S
        # set_adapter/clear_adapter/load_state_dict write the slots while no forward reads them: a forward sees
        # the old adapter or the new one, never a torn mix (hot swap while serving)
        self._slots_lock = _SlotsLock()

    @classmethod
    def from_linear(cls, linear: nn.Module, max_adapters: int = 8, max_rank: int = 16, backend: str = "auto",
                    lora_dtype: Optional[torch.dtype] = None, path: str = "auto",
                    check_ids: bool = True, lora_dropout: float = 0.0) -> "MultiLoRALinear":
        """Wrap ``linear`` (an nn.Linear, or a GPT-2-style Conv1D): its own weight/bias Parameters are reused
        (no copy) and frozen. All slots start empty."""
        in_f, out_f = base_features(linear)
        if cls is MultiLoRALinear and quant.kind_of(linear) is not None:
            from .qlora import QMultiLoRALinear  # a quantized frozen base (bitsandbytes, torchao)

            cls = QMultiLoRALinear
        return cls(in_f, out_f, max_adapters, max_rank, backend=backend,
                   lora_dtype=lora_dtype, path=path, check_ids=check_ids, lora_dropout=lora_dropout, _base=linear)

    def _adopt_base(self, base, in_features, out_features, bias, device, dtype) -> None:
        adopt_frozen_base(self, base, in_features, out_features, bias, device, dtype)

    def _default_lora_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self._op_weight(), self.bias)

    def _op_weight(self):
        """The frozen base as ``multi_lora_linear`` takes it: [out, in] (a view for a Conv1D base)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    # ------------------------------------------------------------------------------ slots
    def _check_slot(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise TypeError(f"slot must be an int, got {type(slot).__name__}")
        if not 0 <= slot < self.max_adapters:
            raise ValueError(f"slot must be in [0, {self.max_adapters}) (max_adapters={self.max_adapters}), got {slot}")
        return slot

    @torch.no_grad()
    def set_adapter(self, slot: int, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    dropout: Optional[float] = None) -> None:
        """Load one adapter into ``slot``: ``lora_A`` [r, in], ``lora_B`` [out, r] (PEFT layouts) with
        1 ≤ r ≤ max_rank, zero-padded to max_rank; ``scaling`` = lora_alpha / r (or / √r for rsLoRA);
        ``dropout``: the slot's dropout p in training (PEFT's ``lora_dropout``; None: the layer's default)."""
        slot = self._check_slot(slot)
        p = self.default_dropout if dropout is None else _check_dropout(dropout)
        for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if lora_A.dim() != 2 or lora_A.shape[1] != self.in_features:
            raise ValueError(f"lora_A must have shape [r, in_features={self.in_features}], got {tuple(lora_A.shape)}")
        r = lora_A.shape[0]
        if not 1 <= r <= self.max_rank:
            raise ValueError(f"adapter rank r={r} (lora_A.shape[0]) must be in [1, max_rank={self.max_rank}]")
        if tuple(lora_B.shape) != (self.out_features, r):
            raise ValueError(f"lora_B must have shape [out_features={self.out_features}, r={r}], got {tuple(lora_B.shape)}")
        if isinstance(scaling, torch.Tensor) and scaling.numel() == 1:
            scaling = float(scaling)
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise ValueError(f"scaling must be a finite float, got {scaling!r}")
        if not math.isfinite(torch.tensor(float(scaling), dtype=self.scalings.dtype).item()):
            raise ValueError(f"scaling must be finite in {self.scalings.dtype} (the scalings buffer), got {scaling!r}")
        # staged in full first: nothing below can fail half way, so a bad call leaves the slot as it was
        A = torch.zeros_like(self.lora_A[slot])
        A[:r].copy_(lora_A)
        B = torch.zeros_like(self.lora_B[slot])
        B[:, :r].copy_(lora_B)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"lora_A and lora_B must be finite (in {self.lora_A.dtype}); slot {slot} left as it was")
        self._write_slot(slot, A, B, float(scaling), r)
        self.lora_dropout[slot] = p

    @torch.no_grad()
    def clear_adapter(self, slot: int) -> None:
        """Empty ``slot``: tokens that still name it get the base output only."""
        slot = self._check_slot(slot)
        self._write_slot(slot, None, None, 0.0, 0)
        self.lora_dropout[slot] = self.default_dropout

    @torch.no_grad()
    def _write_slot(self, slot: int, A, B, scaling: float, r: int) -> None:
        with self._slots_lock.writing(self.lora_A.device):
            if A is None:
                self.lora_A[slot].zero_()
                self.lora_B[slot].zero_()
            else:
                self.lora_A[slot].copy_(A)
                self.lora_B[slot].copy_(B)
            self.scalings[slot] = scaling
            self.ranks[slot] = r

    def get_adapter(self, slot: int):
        """(lora_A [r, in], lora_B [out, r], scaling) of ``slot`` (views; r = 0 for an empty slot)."""
        slot = self._check_slot(slot)
        r = int(self.ranks[slot])
        return self.lora_A[slot, :r], self.lora_B[slot, :, :r], float(self.scalings[slot])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A checkpoint's ``ranks`` must lie in [0, max_rank] and its ``scalings`` be finite: the ops trust
        the module's ranks (they are checked when written, never per call)."""
        bad = []
        rk = state_dict.get(prefix + "ranks")
        if isinstance(rk, torch.Tensor) and rk.numel():
            lo, hi = int(rk.min()), int(rk.max())
            if lo < 0 or hi > self.max_rank:
                bad.append(f"{prefix}ranks must be in [0, max_rank={self.max_rank}], got min {lo}, max {hi}")
        sc = state_dict.get(prefix + "scalings")
        if isinstance(sc, torch.Tensor) and sc.is_floating_point() and not torch.isfinite(sc).all():
            bad.append(f"{prefix}scalings must be finite")
        if bad:  # reported by load_state_dict; this layer's tensors are left as they were
            error_msgs.extend(bad)
            return
        with self._slots_lock.writing(self.lora_A.device):
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)

    # ---------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, adapter_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if adapters_disabled(self):
            return self._base_forward(x)
        group = self.__dict__.get("_siblings")  # nn/siblings.py: q/k/v-style layers, the base GEMM stacked
        if adapter_ids is None and group is not None and group.enabled and not torch.compiler.is_compiling():
            out = group.member_forward(self, x)
            if out is not None:
                return out
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError(f"x must be a torch.Tensor with at least 1 dim, got {type(x).__name__}")
        ids = self._resolve_ids(adapter_ids, x.shape, x.device)
        # a graph cannot take the lock: under torch.compile, swap adapters between compiled calls
        with contextlib.nullcontext() if torch.compiler.is_compiling() else self._slots_lock.reading():
            return self._run_op(x, ids)

    def _resolve_ids(self, adapter_ids, x_shape, device):
        """The call's ids, or those set by ``adapter_ids(model, ids)`` (as the shared grouping when eager)."""
        if adapter_ids is not None:
            return adapter_ids
        if torch.compiler.is_compiling():  # a graph takes the ids, not the host-side grouping
            ids = _compiled_ids(self)
            if ids is None:
                raise ValueError(f"{type(self).__name__}.forward under torch.compile: no adapter ids. Pass "
                                 "adapter_ids=, or set them with `with peft_kernels.adapter_ids(model, ids):` around the "
                                 "call, on this thread, with an id tensor (not a prebuilt AdapterMapping), and with "
                                 "no other asyncio task's adapter_ids block open on this thread")
            return ids
        active = _active_ids(self)
        if active is None and _in_backward():  # a checkpointed region recomputed after its block closed
            raise ValueError(f"{type(self).__name__}.forward ran in backward (activation checkpointing recomputing "
                             "it) with no adapter ids: the adapter_ids block had closed. Pass context_fn="
                             "peft_kernels.checkpoint_context to torch.utils.checkpoint (use_reentrant=False; with "
                             "transformers, in activation_checkpointing_kwargs / gradient_checkpointing_kwargs), or "
                             "run backward inside the block")
        if active is None:
            raise ValueError(f"{type(self).__name__}.forward: adapter_ids is required (pass it, or set it for the whole "
                             "model with `with peft_kernels.adapter_ids(model, ids): ...`)")
        return active.mapping(x_shape, self.max_adapters, device)

    def _run_op(self, x: torch.Tensor, ids) -> torch.Tensor:
        return multi_lora_linear(x, self._op_weight(), self.bias, self.lora_A, self.lora_B, self.scalings, ids,
                                 ranks=self.ranks, backend=self.backend, path=self.path, check_ids=self.check_ids,
                                 dropout_p=tuple(self.lora_dropout) if self.training else None,
                                 training=self.training)

    def __getstate__(self):  # deepcopy / pickle: a lock does not copy; the copy gets its own
        state = self.__dict__.copy()
        state.pop("_slots_lock", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._slots_lock = _SlotsLock()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"max_adapters={self.max_adapters}, max_rank={self.max_rank}, backend={self.backend!r}, "
                f"path={self.path!r}" + (f", lora_dropout={self.lora_dropout}" if any(self.lora_dropout) else ""))
