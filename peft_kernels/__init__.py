"""peft_kernels: fused kernels for parameter-efficient fine-tuning.

Public API:
    lora_linear(x, weight, bias, lora_A, lora_B, scaling, *, dropout_p=0.0, training=False, backend="auto")
    LoRALinear                     drop-in nn.Linear with a fused LoRA update
    multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, *, ranks=None, backend="auto")
    MultiLoRALinear, adapter_ids   many adapters in one layer, one per token (serving and batched training)
    checkpoint_context             context_fn for activation checkpointing inside adapter_ids blocks
    build_mapping, AdapterMapping  the token grouping, built once per batch and reused across layers
    bottleneck_adapter, adapter_linear, BottleneckAdapter, AdapterLinear   bottleneck adapters (torch, Triton)
    inject_lora, inject_multi_lora, merge_lora, unmerge_lora, lora_state_dict   swap fused layers into a model
    load_peft_adapter, save_peft_adapter   HF PEFT LoRA checkpoints, both ways
    from_peft, adapter_names_to_ids        convert a PeftModel's LoRA / IA3 layers (and trained heads) in place
    LoRAEmbedding, lora_embedding  LoRA on nn.Embedding (PEFT's lora_embedding_A/B); MultiLoRAEmbedding: per-token slots
    merge_and_unload, unload, disable_adapters, print_trainable_parameters, trainable_parameters
                                   model-level controls (PEFT's PeftModel methods, as functions)
    ModulesToSave                  a trained head (modules_to_save= / task_type= on inject_lora, inject_ia3)
    reference.lora_linear_ref      the plain-PyTorch spec
    dispatch.explain(backend, device)  which backend runs and why
"""
from . import dispatch, reference
from .dispatch import BackendUnavailable
from .checkpoint import CheckpointError, adapter_names_to_ids, from_peft, load_peft_adapter, save_peft_adapter
from .inject import inject_ia3, inject_lora, inject_multi_lora, lora_state_dict, merge_lora, unmerge_lora
from .model import (disable_adapters, merge_and_unload, print_trainable_parameters, trainable_parameters, unload,
                    use_hash_dropout)
from .nn import (AdapterLinear, BottleneckAdapter, IA3Linear, LoRAEmbedding, LoRALinear, ModulesToSave, MultiLoRAEmbedding,
                 MultiLoRALinear, adapter_ids)
from .ops.embedding import lora_embedding
from .ops.hash_dropout import hash_dropout
from .ops.linear_ce import linear_cross_entropy
from .nn.lm_head import causal_lm_loss, head_cross_entropy
from .nn.siblings import SiblingGroup, fuse_siblings, unfuse_siblings
from .nn.packed import PackedLoRALinear, inject_packed_lora
from .nn.experts import LoRAExperts
from .nn.multi_lora import checkpoint_context
from .ops.siblings import lora_siblings
from .ops.bottleneck import adapter_linear, bottleneck_adapter
from .ops.dora import dora_linear
from .ops.ia3 import ia3_linear
from .ops.lora import lora_linear
from .ops.multi_lora import AdapterMapping, build_mapping, multi_lora_linear
from .prompt import PrefixTuning, PromptTuning

__version__ = "0.1.0"

# Load the compiled CPU ops (if built) now, not lazily inside the first call: a model compiled with
# torch.compile before its first eager call would otherwise trace the loader (a graph break).
# PEFT_KERNELS_DISABLE_EXT=1 leaves it unloaded (e.g. to load a CMake-built copy of the same ops).
from . import _ext as _ext_mod  # noqa: E402

if not _ext_mod.disabled():
    _ext_mod._load()

__all__ = ["PromptTuning", "PrefixTuning", "inject_ia3", "ia3_linear", "IA3Linear", "dora_linear", "lora_linear", "LoRALinear", "multi_lora_linear", "MultiLoRALinear", "adapter_ids", "AdapterMapping",
           "build_mapping", "bottleneck_adapter", "adapter_linear", "BottleneckAdapter", "AdapterLinear", "reference", "dispatch", "BackendUnavailable", "__version__",
           "inject_lora", "inject_multi_lora", "merge_lora", "unmerge_lora", "lora_state_dict", "load_peft_adapter",
           "save_peft_adapter", "CheckpointError", "from_peft", "adapter_names_to_ids", "LoRAEmbedding", "MultiLoRAEmbedding", "lora_embedding",
           "ModulesToSave", "merge_and_unload", "unload", "disable_adapters", "trainable_parameters",
           "print_trainable_parameters", "use_hash_dropout", "hash_dropout", "HashDropout",
           "linear_cross_entropy", "head_cross_entropy", "causal_lm_loss",
           "fuse_siblings", "unfuse_siblings", "SiblingGroup", "lora_siblings", "PackedLoRALinear",
           "inject_packed_lora", "LoRAExperts", "checkpoint_context"]
