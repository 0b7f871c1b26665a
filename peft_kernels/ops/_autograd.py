"""Second-order gradients, shared by the ops' autograd Functions.

A backward that computes its gradients with fused kernels (or in place) is first-order only: its gradients
would look like constants to autograd and silently drop the second-order terms of MAML's inner step or of a
gradient penalty. So such a backward, called with ``create_graph=True`` (grad mode on inside backward) while
some input needs a gradient, raises instead (:func:`first_order_only`). The torch backend of ``lora_linear``
and ``multi_lora_linear`` computes its gradients with differentiable torch ops in that case instead
(gradgradcheck in tests/test_meta.py).
"""
from __future__ import annotations

import functools

import torch


def second_order_message(op: str, backend: str, supported: bool = False) -> str:
    how = ("use backend='torch', which supports double backward" if supported else
           "no backend of this op supports double backward; use peft_kernels.reference for second-order MAML")
    return (f"peft_kernels.{op}: second-order gradients (backward with create_graph=True) are not supported by "
            f"the {backend!r} backend: {how}")


def first_order_only(op: str, supported_on_torch: bool = False, backend: str = "triton"):
    """Decorator for an autograd.Function ``backward(ctx, *grad_outputs)``: raises a RuntimeError naming ``op``
    and the backend (``ctx.call.backend``, else ``ctx.backend``, else ``backend``) under ``create_graph=True``;
    otherwise runs it."""
    default = backend

    def deco(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            if torch.is_grad_enabled() and any(ctx.needs_input_grad):
                backend = (getattr(getattr(ctx, "call", None), "backend", None) or getattr(ctx, "backend", None)
                           or default)
                raise RuntimeError(second_order_message(op, backend, supported_on_torch))
            return backward(ctx, *grad_outputs)
        return wrapper
    return deco


def torch_backend_double_backward(op: str, differentiable):
    """Decorator for the backward of a Function whose torch backend supports double backward: under
    ``create_graph=True`` with ``ctx.call.backend == "torch"`` it runs ``differentiable(ctx, *grads)`` (torch
    ops autograd can differentiate); any other backend raises there (:func:`first_order_only`); otherwise the
    decorated first-order backward runs."""
    def deco(backward):
        first = first_order_only(op, supported_on_torch=True)(backward)

        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            if torch.is_grad_enabled() and ctx.call.backend == "torch":
                return differentiable(ctx, *grad_outputs)
            return first(ctx, *grad_outputs)
        return wrapper
    return deco


def unviewed(t: torch.Tensor) -> torch.Tensor:
    """A tensor over ``t``'s memory with ``t``'s shape and strides that autograd does not see as a view of anything
    (``set_``), with a version counter of its own: what a custom Function returns for a block of a buffer it wrote
    (autograd forbids modifying in place a view a custom Function returns). Only for memory nothing else reads
    through autograd (the blocks are disjoint, and no Function saves them)."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def own_shape(y2d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A Function's 2-D output ``[T, N]`` with ``x``'s leading dims, reshaped outside the Function and, as
    ``nn.Linear``'s output is, not a view (``aten._unsafe_view``, what ``matmul`` returns; the 2-D tensor itself
    for 2-D x). Our Functions return their outputs unshaped: autograd forbids modifying in place a view made inside
    a custom Function, a layer's output may be modified in place (``out += residual``, ``nn.ReLU(inplace=True)``),
    and FSDP2 warns on a module that returns a view (an in-place op on it would skip its pre-backward hook)."""
    shape = (*x.shape[:-1], y2d.shape[-1])
    if tuple(y2d.shape) == shape:
        return y2d
    return torch.ops.aten._unsafe_view(y2d, shape) if y2d.is_contiguous() else y2d.view(shape)
