"""``LoRAEmbedding``: a drop-in ``nn.Embedding`` with a LoRA update (HF PEFT's ``lora.Embedding``)."""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dispatch
from ..ops.embedding import lora_embedding
from ._disabled import adapters_disabled
from .lora import load_unmerged
from .multi_lora import MultiLoRALinear


def check_embedding(emb: nn.Module, name: str = "embedding") -> None:
    """A plain nn.Embedding whose lookup the op reproduces; ValueError/TypeError naming what is not."""
    if not isinstance(emb, nn.Embedding) or type(emb).forward is not nn.Embedding.forward:
        raise TypeError(f"{name} must be an nn.Embedding (with nn.Embedding's forward), got {type(emb).__name__}")
    if emb.max_norm is not None:
        raise ValueError(f"{name}: max_norm={emb.max_norm} renormalises the table in place on every lookup, which "
                         "LoRA on embeddings does not support")
    if emb.sparse:
        raise ValueError(f"{name}: sparse=True (sparse gradients) is not supported; the table is frozen anyway")


class LoRAEmbedding(nn.Module):
    """Frozen ``nn.Embedding`` plus a trainable low-rank update, HF PEFT semantics:
    ``y = W[ids] + scaling · (lora_embedding_Aᵀ[ids])·lora_embedding_Bᵀ``.

    State: the frozen ``weight`` [V, D] (nn.Embedding's name), trainable ``lora_embedding_A`` [r, V] and
    ``lora_embedding_B`` [D, r] (PEFT's names and layouts; PEFT's checkpoint keys
    ``<module>.lora_embedding_A`` / ``_B``). ``init_lora_weights=True`` starts A at zero and B normal (PEFT's
    embedding init: the layer starts equal to the base); False makes both random (tests).
    ``padding_idx`` and ``scale_grad_by_freq`` act on the update's gradient as on the table's.
    ``lora_dropout`` is stored and not applied: PEFT applies no dropout to embedding lookups (ids).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 8, lora_alpha: float = 8,
                 use_rslora: bool = False, init_lora_weights: Union[bool, str] = True, padding_idx=None,
                 device=None, dtype=None, backend: str = "auto", lora_dtype: Optional[torch.dtype] = None,
                 lora_dropout: float = 0.0, *, _base: Optional[nn.Embedding] = None):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
            raise TypeError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        if backend not in dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {dispatch.BACKENDS}, got {backend!r}")
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
            raise ValueError(f"lora_dropout must be a float in [0, 1), got {lora_dropout!r}")
        if _base is None:
            _base = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device, dtype=dtype)
        check_embedding(_base, "the base embedding")
        object.__setattr__(self, "_original_base", _base)  # for peft_kernels.unload (not a submodule)
        self.weight = _base.weight
        self.weight.requires_grad_(False)
        self.num_embeddings, self.embedding_dim = _base.num_embeddings, _base.embedding_dim
        self.padding_idx, self.scale_grad_by_freq = _base.padding_idx, _base.scale_grad_by_freq
        self.bias = None
        self.fan_in_fan_out, self.lora_bias, self.use_dora = None, False, False  # (what the saver asks a LoRA layer)
        self.r, self.lora_alpha, self.use_rslora = int(r), lora_alpha, bool(use_rslora)
        self.lora_dropout = float(lora_dropout)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.backend = backend
        ldt = lora_dtype if lora_dtype is not None else self.weight.dtype
        if not ldt.is_floating_point:
            raise TypeError(f"lora_dtype must be a floating dtype, got {ldt}")
        dev = self.weight.device
        self.lora_embedding_A = nn.Parameter(torch.empty(self.r, self.num_embeddings, device=dev, dtype=ldt))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, self.r, device=dev, dtype=ldt))
        self.init_lora_weights = init_lora_weights
        self.merged = False
        self._merged_with = None
        self.reset_lora_parameters()

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, r: int = 8, lora_alpha: float = 8, use_rslora: bool = False,
                       init_lora_weights: Union[bool, str] = True, backend: str = "auto",
                       lora_dtype: Optional[torch.dtype] = None, use_dora: bool = False,
                       lora_dropout: float = 0.0) -> "LoRAEmbedding":
        """Wrap ``emb``: its weight Parameter is reused (no copy) and frozen."""
        if use_dora:
            raise ValueError("use_dora=True is not supported on nn.Embedding layers (LoRAEmbedding); target only "
                             "linear layers with DoRA")
        check_embedding(emb)
        return cls(emb.num_embeddings, emb.embedding_dim, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora,
                   init_lora_weights=init_lora_weights, backend=backend, lora_dtype=lora_dtype,
                   lora_dropout=lora_dropout, _base=emb)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        if self.init_lora_weights is False:
            self.lora_embedding_A.normal_()
            self.lora_embedding_B.normal_()
        else:  # PEFT: A zero, B ~ N(0, 1)
            self.lora_embedding_A.zero_()
            self.lora_embedding_B.normal_()

    # PEFT-style aliases, so code written against LoRALinear reads the same
    @property
    def lora_A(self) -> nn.Parameter:
        return self.lora_embedding_A

    @property
    def lora_B(self) -> nn.Parameter:
        return self.lora_embedding_B

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.merged or adapters_disabled(self):
            if self.merged and adapters_disabled(self):
                raise ValueError("LoRAEmbedding: adapters are disabled but this layer is merged; unmerge it first")
            return F.embedding(ids, self.weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq)
        return lora_embedding(ids, self.weight, self.lora_embedding_A, self.lora_embedding_B, self.scaling,
                              padding_idx=self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq,
                              backend=self.backend)

    # ------------------------------------------------------------------------------------ merge
    def delta_weight(self) -> torch.Tensor:
        """``scaling · (B·A)ᵀ`` [V, D] in fp32."""
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).t() * self.scaling

    def _merged_weight_fp32(self) -> torch.Tensor:
        return self.weight.float() + self.delta_weight()

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        if self.merged:
            raise RuntimeError("LoRAEmbedding.merge(): already merged; call unmerge() first")
        new = self._merged_weight_fp32()
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError("LoRAEmbedding.merge(safe_merge=True): merging would produce NaN/Inf weights; the layer "
                             "was left unmerged")
        self._merged_with = (self.lora_embedding_A.detach().clone(), self.lora_embedding_B.detach().clone(),
                             float(self.scaling))
        self.weight.copy_(new.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("LoRAEmbedding.unmerge(): the layer is not merged")
        self.weight.copy_(self._unmerged_weight())
        self.merged = False
        self._merged_with = None

    def _unmerged_weight(self) -> torch.Tensor:
        A, B, s = self._merged_with
        return (self.weight.float() - (B.float() @ A.float()).t() * s).to(self.weight.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # always the unmerged table (as LoRALinear)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + "weight"] = self._unmerged_weight()

    def _load_from_state_dict(self, *args):  # what is loaded is an unmerged table: a merged layer folds it back in
        load_unmerged(self, lambda: super(LoRAEmbedding, self)._load_from_state_dict(*args))

    @torch.no_grad()
    def to_embedding(self) -> nn.Embedding:
        """A new plain ``nn.Embedding`` with the update merged in (this layer is unchanged)."""
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           scale_grad_by_freq=self.scale_grad_by_freq, device=self.weight.device,
                           dtype=self.weight.dtype)
        emb.weight.copy_(self.weight if self.merged else self._merged_weight_fp32().to(self.weight.dtype))
        return emb

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"use_rslora={self.use_rslora}, padding_idx={self.padding_idx}, merged={self.merged}")


class MultiLoRAEmbedding(MultiLoRALinear):
    """Frozen ``nn.Embedding`` plus ``max_adapters`` embedding-LoRA slots; each token picks one (or none), set per
    call or for a whole model with ``peft_kernels.adapter_ids(model, ids)``, like :class:`MultiLoRALinear` (whose
    slot management it shares: ``set_adapter(slot, A [r, V], B [D, r], scaling)``, ``clear_adapter``,
    ``get_adapter``, the readers/writer lock, the per-slot checks).

    State: the frozen ``weight`` [V, D] (nn.Embedding's), ``lora_A`` [S, R, V] and ``lora_B`` [S, D, R] (slot ``a``
    holds PEFT's ``lora_embedding_A`` / ``lora_embedding_B``), buffers ``scalings`` and ``ranks``. No dropout (as
    PEFT's embedding LoRA). Op: ``peft_kernels.ops.embedding.multi_lora_embedding``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, max_adapters: int = 8, max_rank: int = 16,
                 padding_idx=None, device=None, dtype=None, lora_dtype: Optional[torch.dtype] = None,
                 check_ids: bool = True, *, _base: Optional[nn.Embedding] = None):
        self._emb_args = (padding_idx, device, dtype)
        super().__init__(num_embeddings, embedding_dim, max_adapters, max_rank, bias=False, lora_dtype=lora_dtype,
                         check_ids=check_ids, _base=_base)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, max_adapters: int = 8, max_rank: int = 16,
                       lora_dtype: Optional[torch.dtype] = None, check_ids: bool = True) -> "MultiLoRAEmbedding":
        """Wrap ``emb``: its weight Parameter is reused (no copy) and frozen. All slots start empty."""
        check_embedding(emb)
        return cls(emb.num_embeddings, emb.embedding_dim, max_adapters, max_rank, lora_dtype=lora_dtype,
                   check_ids=check_ids, _base=emb)

    def _adopt_base(self, base, in_features, out_features, bias, device, dtype) -> None:
        padding_idx, device, dtype = self.__dict__.pop("_emb_args")
        if base is None:
            base = nn.Embedding(in_features, out_features, padding_idx=padding_idx, device=device, dtype=dtype)
        check_embedding(base, "the base embedding")
        object.__setattr__(self, "_original_base", base)
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = None
        self.fan_in_fan_out = None
        self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.scale_grad_by_freq = base.padding_idx, base.scale_grad_by_freq
        if base.scale_grad_by_freq:
            raise ValueError("MultiLoRAEmbedding: scale_grad_by_freq=True is not supported on multi-adapter embeddings")

    def _base_forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)

    def forward(self, ids: torch.Tensor, adapter_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if adapters_disabled(self):
            return self._base_forward(ids)
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
        a_ids = self._resolve_ids(adapter_ids, (*ids.shape, 1), ids.device)  # one token per id
        with contextlib.nullcontext() if torch.compiler.is_compiling() else self._slots_lock.reading():
            return self._run_op(ids, a_ids)

    def _run_op(self, ids: torch.Tensor, a_ids) -> torch.Tensor:
        from ..ops.embedding import multi_lora_embedding

        if torch.compiler.is_compiling():  # one custom op: the grouping's host reads stay out of the graph
            from ..ops._compiled import multi_lora_embedding_fwd
            from ..reference import expand_adapter_ids

            a = expand_adapter_ids(a_ids, (*ids.shape, 1)).reshape(ids.shape).to(torch.int64)
            return multi_lora_embedding_fwd(ids.to(torch.int64), self.weight, self.lora_A, self.lora_B,
                                            self.scalings.to(torch.float64), self.ranks, a,
                                            -1 if self.padding_idx is None else int(self.padding_idx))
        return multi_lora_embedding(ids, self.weight, self.lora_A, self.lora_B, self.scalings, a_ids,
                                    ranks=self.ranks, padding_idx=self.padding_idx, check_ids=self.check_ids)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, max_adapters={self.max_adapters}, "
                f"max_rank={self.max_rank}, padding_idx={self.padding_idx}")
