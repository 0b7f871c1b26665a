"""Drop-in torch.nn modules."""
from .lora import LoRALinear

__all__ = ["LoRALinear"]
