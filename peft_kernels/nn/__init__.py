"""Drop-in torch.nn modules."""
from .bottleneck import AdapterLinear, BottleneckAdapter
from .dropout import HashDropout
from .ia3 import IA3Linear
from .embedding import LoRAEmbedding, MultiLoRAEmbedding
from .lora import LoRALinear
from .multi_lora import MultiLoRALinear, adapter_ids
from .saved import ModulesToSave

__all__ = ["LoRALinear", "MultiLoRALinear", "adapter_ids", "BottleneckAdapter", "AdapterLinear", "IA3Linear", "LoRAEmbedding", "MultiLoRAEmbedding", "ModulesToSave", "HashDropout"]
