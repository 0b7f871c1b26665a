"""``ModulesToSave``: a module trained in full beside the adapters (a classifier head, PEFT's ``modules_to_save``).

The original module is kept frozen and untouched as ``original_module``; a trainable copy lives in
``modules_to_save["default"]`` and runs the forward. That is PEFT's ``ModulesToSaveWrapper`` layout, so the
model's state-dict keys are PEFT's (``<name>.modules_to_save.default.weight``), a PEFT checkpoint's
``<name>.weight`` loads into the copy, and ``peft_kernels.unload(model)`` puts the original back."""
from __future__ import annotations

import copy

import torch.nn as nn

from ._disabled import adapters_disabled

ADAPTER_NAME = "default"


class ModulesToSave(nn.Module):
    """``original_module`` (frozen) plus its trainable copy ``modules_to_save["default"]``, which the forward
    runs (the original inside a ``peft_kernels.disable_adapters`` block). Attributes that are not the wrapper's
    (``weight``, ``in_features``, ...) read the copy's."""

    def __init__(self, module: nn.Module, trainable: bool = True, *, trained: nn.Module = None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(module, ModulesToSave):
            raise ValueError("module already is a ModulesToSave wrapper")
        self.original_module = module
        for p in module.parameters():
            p.requires_grad_(False)
        trained = copy.deepcopy(module) if trained is None else trained  # (from_peft: PEFT's own trained copy)
        for p in trained.parameters():
            p.requires_grad_(trainable)
        self.modules_to_save = nn.ModuleDict({ADAPTER_NAME: trained})

    @property
    def trained(self) -> nn.Module:
        """The trainable copy (what the forward runs and what checkpoints save)."""
        return self.modules_to_save[ADAPTER_NAME]

    def active_module(self) -> nn.Module:
        return self.original_module if adapters_disabled(self) else self.trained

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self.modules_to_save[ADAPTER_NAME], name)
