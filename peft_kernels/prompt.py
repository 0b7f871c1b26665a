"""Prompt tuning and prefix tuning for transformers models (HF PEFT semantics and checkpoints).

These complete the PEFT family in this library; **there is no kernel to fuse**: prompt tuning
prepends learned embeddings to the input (a concatenation), prefix tuning hands every attention layer
learned key/value prefixes through the model's KV cache. The transformer itself runs unchanged.

- :class:`PromptTuning` ``(model, num_virtual_tokens, init="random"|"text"|"vocab")`` prepends
  ``num_virtual_tokens`` learned embeddings (``prompt_embeddings`` [P, hidden]), extends the attention
  mask with ones and, for labels, with -100 (as PEFT's ``PeftModelForCausalLM``).
- :class:`PrefixTuning` ``(model, num_virtual_tokens, prefix_projection=False)`` learns
  ``[P, num_layers · 2 · kv_heads · head_dim]`` (directly, or as PEFT's ``prefix_projection`` MLP
  ``Linear(token_dim, encoder_hidden_size) → tanh → Linear(·, num_layers · 2 · token_dim)`` on a
  [P, token_dim] embedding), reshaped per layer into key/value prefixes [B, kv_heads, P, head_dim].

Both freeze the wrapped model and load/save PEFT prompt-learning checkpoints (``adapter_config.json``
+ ``adapter_model.safetensors`` holding ``prompt_embeddings``). PEFT saves a projected prefix already
projected, so a loaded :class:`PrefixTuning` holds the prefix directly (``prefix_projection=False``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, _adapter_dir, _read_weights, _write_folder, load_config_json

INITS = ("random", "text", "vocab")


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if not callable(getattr(model, "get_input_embeddings", None)) or getattr(model, "config", None) is None:
        raise TypeError(f"model must be a transformers PreTrainedModel (with get_input_embeddings() and .config), "
                        f"got {type(model).__name__}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("encoder-decoder models are not supported (PEFT's num_transformer_submodules=2)")


def _positive_int(v, name) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _prefix_mask(attention_mask, batch: int, P: int) -> Optional[torch.Tensor]:
    if attention_mask is None:
        return None
    ones = torch.ones(batch, P, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([ones, attention_mask], dim=1)


def _batch_of(input_ids, inputs_embeds) -> int:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    return (input_ids if input_ids is not None else inputs_embeds).shape[0]


class _PromptLearning(nn.Module):
    peft_type = ""

    def __init__(self, model: nn.Module, num_virtual_tokens: int):
        super().__init__()
        _check_model(model)
        self.model = model
        self.num_virtual_tokens = _positive_int(num_virtual_tokens, "num_virtual_tokens")
        for p in model.parameters():
            p.requires_grad_(False)

    def _config(self) -> dict:
        raise NotImplementedError

    def save_pretrained(self, path) -> None:
        """A PEFT ``save_pretrained`` folder (``PeftModel.from_pretrained(model, path)`` loads it)."""
        cfg = dict(self._config(), peft_type=self.peft_type, num_virtual_tokens=self.num_virtual_tokens,
                   num_transformer_submodules=1, inference_mode=True, base_model_name_or_path=None,
                   task_type="CAUSAL_LM" if _is_causal(self.model) else None)
        _write_folder(path, {"prompt_embeddings": self.prompt_embeddings().detach().to("cpu").contiguous()}, cfg)

    @classmethod
    def _read(cls, model, path, adapter_name):
        _check_model(model)
        d = _adapter_dir(path, adapter_name)
        f, cfg = load_config_json(d)
        if cfg.get("peft_type") != cls.peft_type:
            raise CheckpointError(f"{f!r}: peft_type must be {cls.peft_type!r}, got {cfg.get('peft_type')!r}")
        if cfg.get("num_transformer_submodules", 1) != 1:
            raise CheckpointError(f"{f!r}: num_transformer_submodules={cfg['num_transformer_submodules']} "
                                  "(encoder-decoder) is not supported")
        P = cfg.get("num_virtual_tokens")
        if isinstance(P, bool) or not isinstance(P, int) or P <= 0:
            raise CheckpointError(f"{f!r}: num_virtual_tokens must be a positive int, got {P!r}")
        sd = _read_weights(d)
        if set(sd) != {"prompt_embeddings"}:
            raise CheckpointError(f"{d!r}: expected exactly one tensor 'prompt_embeddings', got {sorted(sd)}")
        t = sd["prompt_embeddings"]
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise CheckpointError(f"{d!r}: prompt_embeddings must be finite floating-point values")
        return cfg, P, t


def _kv_dims(model):
    """(num_layers, kv_heads, head_dim) from a transformers config (GQA models: the key/value heads)."""
    c = model.config
    heads = int(c.num_attention_heads)
    kv = int(getattr(c, "num_key_value_heads", None) or heads)
    return int(c.num_hidden_layers), kv, int(getattr(c, "head_dim", None) or c.hidden_size // heads)


def _is_causal(model) -> bool:
    return type(model).__name__.endswith("ForCausalLM")


class PromptTuning(_PromptLearning):
    """Learned soft-prompt embeddings prepended to the input (Lester et al. 2021; PEFT ``PROMPT_TUNING``).

    ``init``: ``"random"`` (N(0, 1), PEFT's RANDOM), ``"text"`` (the word embeddings of ``init_text``
    tokenised by ``tokenizer``, repeated/truncated to ``num_virtual_tokens``; PEFT's TEXT), ``"vocab"``
    (embeddings of tokens sampled uniformly from the vocabulary; PEFT's SAMPLE_VOCAB).
    ``tokenizer``: a callable ``str -> {"input_ids": [...]}`` (a transformers tokenizer) or ``-> [ids]``.
    """
    peft_type = "PROMPT_TUNING"

    def __init__(self, model: nn.Module, num_virtual_tokens: int, init: str = "random", *,
                 init_text: Optional[str] = None, tokenizer: Optional[Callable] = None):
        super().__init__(model, num_virtual_tokens)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        emb = model.get_input_embeddings()
        hidden = emb.weight.shape[1]
        P = self.num_virtual_tokens
        self.prompt = nn.Embedding(P, hidden, device=emb.weight.device, dtype=torch.float32)
        with torch.no_grad():
            if init == "text":
                if not isinstance(init_text, str) or not init_text or tokenizer is None:
                    raise ValueError("init='text' needs init_text (a non-empty str) and tokenizer")
                ids = tokenizer(init_text)
                ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
                if not ids:
                    raise ValueError(f"tokenizer returned no tokens for init_text={init_text!r}")
                ids = (ids * math.ceil(P / len(ids)))[:P]
                self.prompt.weight.copy_(emb(torch.tensor(ids, device=emb.weight.device)).float())
            elif init == "vocab":
                idx = torch.randint(0, emb.weight.shape[0], (P,), device=emb.weight.device)
                self.prompt.weight.copy_(emb(idx).float())
        self.init = init

    def prompt_embeddings(self) -> torch.Tensor:
        """[num_virtual_tokens, hidden]: what PEFT saves as ``prompt_embeddings``."""
        return self.prompt.weight

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        B = _batch_of(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.model.get_input_embeddings()(input_ids)
        P = self.num_virtual_tokens
        prompts = self.prompt.weight.to(inputs_embeds.dtype).unsqueeze(0).expand(B, -1, -1)
        inputs_embeds = torch.cat([prompts, inputs_embeds], dim=1)
        if labels is not None:
            labels = torch.cat([torch.full((B, P), -100, dtype=labels.dtype, device=labels.device), labels], dim=1)
            kwargs["labels"] = labels
        return self.model(inputs_embeds=inputs_embeds, attention_mask=_prefix_mask(attention_mask, B, P),
                          **kwargs)

    def _config(self) -> dict:
        return {"token_dim": self.prompt.weight.shape[1], "prompt_tuning_init": {"random": "RANDOM", "text": "TEXT",
                                                                                  "vocab": "SAMPLE_VOCAB"}[self.init],
                "num_layers": getattr(self.model.config, "num_hidden_layers", None),
                "num_attention_heads": getattr(self.model.config, "num_attention_heads", None)}

    @classmethod
    def from_pretrained(cls, model: nn.Module, path, *, adapter_name: Optional[str] = None) -> "PromptTuning":
        """Load a PEFT prompt-tuning checkpoint for ``model``; validated before anything is built."""
        cfg, P, t = cls._read(model, path, adapter_name)
        hidden = model.get_input_embeddings().weight.shape[1]
        if tuple(t.shape) != (P, hidden):
            raise CheckpointError(f"{path!r}: prompt_embeddings has shape {tuple(t.shape)}, expected ({P}, {hidden}) "
                                  f"for {P} virtual tokens on a model with hidden size {hidden}")
        m = cls(model, P)
        with torch.no_grad():
            m.prompt.weight.copy_(t)
        return m


class PrefixTuning(_PromptLearning):
    """Learned per-layer key/value prefixes (Li & Liang 2021; PEFT ``PREFIX_TUNING``), passed to every
    attention layer through the model's KV cache (``transformers.DynamicCache``)."""
    peft_type = "PREFIX_TUNING"

    def __init__(self, model: nn.Module, num_virtual_tokens: int, prefix_projection: bool = False,
                 encoder_hidden_size: Optional[int] = None):
        super().__init__(model, num_virtual_tokens)
        self.num_layers, self.kv_heads, self.head_dim = _kv_dims(model)
        self.token_dim = self.kv_heads * self.head_dim
        if not isinstance(prefix_projection, bool):
            raise TypeError(f"prefix_projection must be a bool, got {prefix_projection!r}")
        self.prefix_projection = prefix_projection
        P, L2 = self.num_virtual_tokens, self.num_layers * 2
        dev = model.get_input_embeddings().weight.device
        if prefix_projection:
            self.encoder_hidden_size = _positive_int(encoder_hidden_size or self.token_dim, "encoder_hidden_size")
            self.embedding = nn.Embedding(P, self.token_dim, device=dev)
            self.transform = nn.Sequential(nn.Linear(self.token_dim, self.encoder_hidden_size, device=dev), nn.Tanh(),
                                           nn.Linear(self.encoder_hidden_size, L2 * self.token_dim, device=dev))
        else:
            self.encoder_hidden_size = encoder_hidden_size or self.token_dim
            self.embedding = nn.Embedding(P, L2 * self.token_dim, device=dev)

    def prompt_embeddings(self) -> torch.Tensor:
        """[P, num_layers · 2 · token_dim]: the prefix (through the MLP if projecting); what PEFT saves."""
        e = self.embedding.weight
        return self.transform(e) if self.prefix_projection else e

    def past_key_values(self, batch: int, dtype: torch.dtype):
        """A DynamicCache holding each layer's (key, value) prefix, [batch, kv_heads, P, head_dim] each."""
        from transformers import DynamicCache

        P = self.num_virtual_tokens
        kv = self.prompt_embeddings().to(dtype).view(1, P, self.num_layers * 2, self.kv_heads, self.head_dim)
        kv = kv.expand(batch, -1, -1, -1, -1).permute(2, 0, 3, 1, 4)  # [2L, B, H, P, D]
        cache = DynamicCache(config=self.model.config)
        pos = torch.arange(P, device=kv.device)
        for i in range(self.num_layers):
            cache.update(kv[2 * i], kv[2 * i + 1], i, cache_kwargs={"cache_position": pos})
        return cache

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        B = _batch_of(input_ids, inputs_embeds)
        dtype = self.model.get_input_embeddings().weight.dtype
        if kwargs.get("past_key_values") is not None:
            raise ValueError("PrefixTuning supplies past_key_values itself; do not pass them")
        return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                          attention_mask=_prefix_mask(attention_mask, B, self.num_virtual_tokens),
                          past_key_values=self.past_key_values(B, dtype), **kwargs)

    def _config(self) -> dict:
        return {"token_dim": self.token_dim, "num_layers": self.num_layers, "num_attention_heads": self.kv_heads,
                "encoder_hidden_size": self.encoder_hidden_size, "prefix_projection": False}

    @classmethod
    def from_pretrained(cls, model: nn.Module, path, *, adapter_name: Optional[str] = None) -> "PrefixTuning":
        """Load a PEFT prefix-tuning checkpoint (saved projected, so loaded as the prefix itself)."""
        cfg, P, t = cls._read(model, path, adapter_name)
        L, H, D = _kv_dims(model)
        for key, ours in (("num_layers", L), ("token_dim", H * D), ("num_attention_heads", H)):
            if cfg.get(key, ours) != ours:
                raise CheckpointError(f"{path!r}: {key}={cfg.get(key)!r} but the model has {ours}")
        want = (P, L * 2 * H * D)
        if tuple(t.shape) != want:
            raise CheckpointError(f"{path!r}: prompt_embeddings has shape {tuple(t.shape)}, expected {want}")
        m = cls(model, P)  # everything checked: only now is the model touched (frozen)
        with torch.no_grad():
            m.embedding.weight.copy_(t)
        return m


PromptLearning = Union[PromptTuning, PrefixTuning]
