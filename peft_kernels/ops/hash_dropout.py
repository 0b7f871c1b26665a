"""``hash_dropout``: dropout for a model's own layers (hidden states, attention probabilities) with the keyed-hash
mask the LoRA ops use (``ops/_torch_dropout.py``): ``y = x · m``, ``m[i] = keep(i) ? 1/(1-p) : 0`` for the flat
index ``i`` of x in row-major order.

Why: on a CPU, torch's dropout draws its mask with ``bernoulli_`` (a Mersenne-twister draw per element). In a
LoRA training step of all-MiniLM-L6-v2 that draw is 22 % of the step, more than every LoRA layer together, and
``torch.compile``'s generated RNG is slower still (the compiled step was 1.14× the eager one; 0.96× with the
model's dropout off). The hash mask is generated in the same pass that applies it (the C++ kernel, about 3 ns an
element on one core), and backward regenerates it from the seed, so no mask is stored for backward (torch
stores a bool mask per element, 1 byte × every attention probability).

The seed is an int64 ``[1]`` tensor drawn from torch's generator of x's device per call (``torch.manual_seed``
makes a run reproducible). The op is a ``torch.library`` custom op, so a compiled graph calls the same kernel,
with no graph break; its backward is the same op on the gradient with the same seed.

Backends: the C++ kernel (``peft_kernels::hash_dropout``) on CPU when the extension is built; elsewhere the mask
from ``_torch_dropout.keep_mask`` (one Triton pass on a CUDA device, plain torch integer ops otherwise) times x.
All agree bit for bit (tested).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from . import _torch_dropout

_NS = "peft_kernels_py"


def check_p(p, name: str = "p") -> float:
    """``p`` as a float in [0, 1], or a ValueError/TypeError naming ``name``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")
    return p


def apply_mask(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """``x · m`` for the mask of ``seed`` and ``p`` (0 < p < 1), contiguous, in x's dtype; the product is taken in
    fp32 for half types (as torch computes ``x * m`` with an fp32 m)."""
    if x.device.type == "cpu" and _ext.available():
        return _ext.ops().hash_dropout(x, *_torch_dropout.keys(seed, p), _torch_dropout.keep_scale(p))
    factor = _torch_dropout.dropout_mask(seed, (x.numel(),), p, x.device)
    return (x.contiguous().reshape(-1) * factor).to(x.dtype).view(x.shape)


@torch.library.custom_op(f"{_NS}::hash_dropout", mutates_args=())
def _hash_dropout_op(x: Tensor, seed: Tensor, p: float) -> Tensor:
    return apply_mask(x, seed, p)


@_hash_dropout_op.register_fake
def _(x, seed, p):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    _x, seed, p = inputs
    ctx.save_for_backward(seed)  # the mask is regenerated from it: nothing the size of x is kept
    ctx.p = p


def _backward(ctx, dy):
    (seed,) = ctx.saved_tensors
    return _hash_dropout_op(dy, seed, ctx.p), None, None


_hash_dropout_op.register_autograd(_backward, setup_context=_setup)


def hash_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout of ``x`` with probability ``p``, the mask a keyed hash of each element's index (see the
    module docstring). Returns x itself when not training or ``p == 0``, and zeros when ``p == 1``, as
    ``F.dropout`` does. The keep probability is ``1 - round(p·2³²)/2³²`` and the scale its exact inverse."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    p = check_p(p)
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    return _hash_dropout_op(x, _torch_dropout.draw_seed(x.device), p)
