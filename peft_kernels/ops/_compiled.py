"""The ops as ``torch.library`` custom ops, for ``torch.compile``: a compiled graph calls our fused eager
kernels as opaque ops (with fake implementations for tracing) instead of tracing their Python, which holds host
reads a graph cannot (a dropout seed's round keys, the multi-adapter token grouping's segment bounds).

  * ``peft_kernels_py::lora_dropout_shrink`` / ``_bwd``: ``lora_linear``'s masked shrink ``drop(x)·Aᵀ`` with
    dropout. The seed is drawn in the graph (a captured RNG op) and passed in; the mask is regenerated in the
    backward op from it, never stored. The base GEMM and the expand around it are traced.
  * ``peft_kernels_py::multi_lora_fwd`` / ``_bwd``: ``multi_lora_linear``'s grouped path. The op groups the
    tokens itself (one counting sort) and returns S padded to ``[T, R]`` (a data-independent shape); the
    backward op groups again from the same ids (cheaper than carrying the grouping through the graph).
  * ``peft_kernels_py::multi_lora_embedding_fwd`` / ``_bwd``: ``MultiLoRAEmbedding``'s lookup, likewise.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

_NS = "peft_kernels_py"


# ------------------------------------------------------------------------------------ lora_linear + dropout
# Only the masked shrink S = drop(x)·Aᵀ is opaque (the C++ pass that makes, applies and consumes the mask on the
# CPU); the base GEMM, the expand and the gradients that need no mask stay traced, so the compiler fuses around
# them as it does without dropout.
@torch.library.custom_op(f"{_NS}::lora_dropout_shrink", mutates_args=())
def lora_dropout_shrink(x: Tensor, A: Tensor, p: float, seed: Tensor) -> Tensor:
    from .lora import shrink

    return shrink(x, A, p, seed)


@lora_dropout_shrink.register_fake
def _(x, A, p, seed):
    return x.new_empty((x.shape[0], A.shape[0]), dtype=A.dtype)


@torch.library.custom_op(f"{_NS}::lora_dropout_shrink_bwd", mutates_args=())
def lora_dropout_shrink_bwd(dS: Tensor, x: Tensor, A: Tensor, p: float, seed: Tensor, need_dx: bool,
                            need_da: bool) -> Tuple[Tensor, Tensor]:
    """(dx, dA) of the masked shrink for dS (an output not asked for: empty): the mask regenerated from ``seed``."""
    from .lora import shrink_backward

    dx, dA = shrink_backward(dS.to(A.dtype), x, A, p, seed, need_dx, need_da)  # (S carries no inverted-dropout scale)
    return (dx.to(x.dtype) if need_dx else x.new_empty(0)), (dA if need_da else A.new_empty(0))


@lora_dropout_shrink_bwd.register_fake
def _(dS, x, A, p, seed, need_dx, need_da):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            A.new_empty(A.shape) if need_da else A.new_empty(0))


def _shrink_setup(ctx, inputs, output):
    x, A, p, seed = inputs
    ctx.save_for_backward(x, A, seed)
    ctx.p = p


def _shrink_backward(ctx, dS):
    x, A, seed = ctx.saved_tensors
    need_x, need_a = ctx.needs_input_grad[:2]
    dx, dA = lora_dropout_shrink_bwd(dS, x, A, ctx.p, seed, need_x, need_a)
    return (dx if need_x else None), (dA if need_a else None), None, None


lora_dropout_shrink.register_autograd(_shrink_backward, setup_context=_shrink_setup)


def lora_linear_dropout(x2d, weight, bias, lora_A, lora_B, scaling: float, p: float) -> Tensor:
    """``lora_linear``'s torch backend with dropout under torch.compile (2-D x): the masked shrink as one custom op
    taking a seed drawn in the graph (the mask regenerated in its backward, never stored), the rest traced."""
    from . import _torch_dropout

    seed = _torch_dropout.draw_seed(x2d.device)
    S = lora_dropout_shrink(x2d, lora_A, float(p), seed)  # drop(x)·Aᵀ, without the inverted-dropout scale (``shrink``)
    lo = torch.nn.functional.linear(S, lora_B) * (scaling * _torch_dropout.keep_scale(p))
    return torch.nn.functional.linear(x2d, weight, bias) + lo.to(x2d.dtype)


# ------------------------------------------------------------------------------------ multi_lora_linear
def _call(x, A, scal, ranks, ids, ps, seed, backend: str, path: str):
    """The mapping and the MultiLoRACall of one custom-op call (built inside the op: host reads are fine here)."""
    from . import _torch_dropout
    from .multi_lora import MultiLoRACall, _build_mapping, _use_ext, choose_path

    S = A.shape[0]
    m, _ = _build_mapping(ids, ids.numel(), S, x.device, False)
    drop = _torch_dropout.SlotDropout.make(ps, seed, x.device) if ps else None
    ranks_h = tuple(ranks.tolist()) if backend == "torch" else ()
    ext = backend == "torch" and _use_ext(x) and drop is None
    scal_h = tuple(scal.tolist()) if backend == "torch" and not ext else ()
    chosen = "grouped" if backend == "torch" else choose_path(m, path)
    return MultiLoRACall(m, scal, ranks, scal_h, ranks_h, backend, chosen, ext, drop)


def _base(weight: Optional[Tensor], x: Tensor, lora_B: Tensor):
    """The frozen [N, K] weight, or (None: a quantized base, whose output the caller adds outside the op, its
    autograd its own) a zero base of lora_B's N."""
    from .multi_lora import NoBase

    return weight if weight is not None else NoBase(lora_B.shape[1], x.shape[1], x.dtype, x.device)


@torch.library.custom_op(f"{_NS}::multi_lora_fwd", mutates_args=())
def multi_lora_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                   scal: Tensor, ranks: Tensor, ids: Tensor, ps: List[float], seed: Tensor, backend: str,
                   path: str) -> Tuple[Tensor, Tensor]:
    from .multi_lora import _forward_2d

    call = _call(x, lora_A, scal, ranks, ids, ps, seed, backend, path)
    y, S = _forward_2d(x, _base(weight, x, lora_B), bias, lora_A, lora_B, call)
    Sp = S.new_zeros((x.shape[0], lora_A.shape[1]))
    Sp[:S.shape[0]] = S  # sorted order, padded to T rows: a shape the graph knows
    return y, Sp


@multi_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scal, ranks, ids, ps, seed, backend, path):
    sdt = lora_A.dtype if backend == "torch" else torch.float32
    return x.new_empty((x.shape[0], lora_B.shape[1])), x.new_empty((x.shape[0], lora_A.shape[1]), dtype=sdt)


@torch.library.custom_op(f"{_NS}::multi_lora_bwd", mutates_args=())
def multi_lora_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, Sp: Tensor,
                   scal: Tensor, ranks: Tensor, ids: Tensor, ps: List[float], seed: Tensor, backend: str, path: str,
                   need_dx: bool, need_da: bool, need_db: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from .multi_lora import _gather_backward, _torch_backward, _triton_backward

    c = _call(x, lora_A, scal, ranks, ids, ps, seed, backend, path)
    weight = _base(weight, x, lora_B)
    m = c.mapping
    S = Sp[:m.num_active]
    if backend == "torch":
        dx, dA, dB = _torch_backward(dy, x, weight, lora_A, lora_B, S, m, c.scalings, c.ranks, c.scal_h, c.ranks_h,
                                     c.ext, need_dx, need_da, need_db, c.drop)
    else:
        f = _gather_backward if backend == "cuda" else _triton_backward
        dx, dA, dB = f(dy, x, weight, lora_A, lora_B, S, m, c.scalings, c.ranks, c.path, need_dx, need_da, need_db,
                       c.drop)
    e = x.new_empty(0)
    return (dx if dx is not None else e), (dA if dA is not None else e), (dB if dB is not None else e)


@multi_lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, Sp, scal, ranks, ids, ps, seed, backend, path, need_dx, need_da, need_db):
    e = x.new_empty(0)
    return (x.new_empty(x.shape) if need_dx else e, lora_A.new_empty(lora_A.shape) if need_da else e,
            lora_B.new_empty(lora_B.shape) if need_db else e)


def _multi_setup(ctx, inputs, output):
    x, weight, bias, A, B, scal, ranks, ids, ps, seed, backend, path = inputs
    ctx.save_for_backward(x, weight, A, B, output[1], scal, ranks, ids, seed)
    ctx.ps, ctx.backend, ctx.path, ctx.has_bias = ps, backend, path, bias is not None


def _multi_backward(ctx, dy, _dS):
    x, weight, A, B, Sp, scal, ranks, ids, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    dx, dA, dB = multi_lora_bwd(dy, x, weight, A, B, Sp, scal, ranks, ids, ctx.ps, seed, ctx.backend, ctx.path,
                                need_x, need_a, need_bb)
    return (dx if need_x else None, dy.t() @ x if need_w else None, dy.sum(0) if need_b and ctx.has_bias else None,
            dA if need_a else None, dB if need_bb else None) + (None,) * 7


multi_lora_fwd.register_autograd(_multi_backward, setup_context=_multi_setup)


# ------------------------------------------------------------------------------------ multi_lora_embedding
@torch.library.custom_op(f"{_NS}::multi_lora_embedding_fwd", mutates_args=())
def multi_lora_embedding_fwd(ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scal: Tensor, ranks: Tensor,
                             adapter_ids: Tensor, padding_idx: int) -> Tensor:
    from .embedding import multi_lora_embedding

    return multi_lora_embedding(ids, weight, lora_A, lora_B, scal, adapter_ids, ranks=ranks,
                                padding_idx=None if padding_idx < 0 else padding_idx, check_ids=False).clone()


@multi_lora_embedding_fwd.register_fake
def _(ids, weight, lora_A, lora_B, scal, ranks, adapter_ids, padding_idx):
    return weight.new_empty((*ids.shape, weight.shape[1]))


@torch.library.custom_op(f"{_NS}::multi_lora_embedding_bwd", mutates_args=())
def multi_lora_embedding_bwd(dy: Tensor, ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scal: Tensor,
                             ranks: Tensor, adapter_ids: Tensor, padding_idx: int) -> Tuple[Tensor, Tensor]:
    """dA, dB per adapter (``ops.embedding.multi_lora_embedding_grads``; autograd does not run inside an op)."""
    from .embedding import multi_lora_embedding_grads

    return multi_lora_embedding_grads(dy, ids, lora_A, lora_B, scal, ranks, adapter_ids,
                                      None if padding_idx < 0 else padding_idx)


@multi_lora_embedding_bwd.register_fake
def _(dy, ids, weight, lora_A, lora_B, scal, ranks, adapter_ids, padding_idx):
    return lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _emb_setup(ctx, inputs, output):
    ids, weight, A, B, scal, ranks, a_ids, pad = inputs
    ctx.save_for_backward(ids, weight, A, B, scal, ranks, a_ids)
    ctx.pad = pad


def _emb_backward(ctx, dy):
    ids, weight, A, B, scal, ranks, a_ids = ctx.saved_tensors
    dA, dB = multi_lora_embedding_bwd(dy, ids, weight, A, B, scal, ranks, a_ids, ctx.pad)
    return (None, None, dA if ctx.needs_input_grad[2] else None, dB if ctx.needs_input_grad[3] else None,
            None, None, None, None)


multi_lora_embedding_fwd.register_autograd(_emb_backward, setup_context=_emb_setup)
