"""peft_kernels: fused kernels for parameter-efficient fine-tuning.

Public API:
    lora_linear(x, weight, bias, lora_A, lora_B, scaling, *, dropout_p=0.0, training=False, backend="auto")
    LoRALinear                     drop-in nn.Linear with a fused LoRA update
    reference.lora_linear_ref      the plain-PyTorch spec
    dispatch.explain(backend, device)  which backend runs and why
"""
from . import dispatch, reference
from .dispatch import BackendUnavailable
from .nn import LoRALinear
from .ops.lora import lora_linear

__version__ = "0.1.0"

__all__ = ["lora_linear", "LoRALinear", "reference", "dispatch", "BackendUnavailable", "__version__"]
