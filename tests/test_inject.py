"""inject_lora / inject_multi_lora / merge_lora / unmerge_lora / lora_state_dict on real model shapes:
PEFT's target_modules rules, GPT-2's Conv1D (fan_in_fan_out), PEFT parity of the injected layers,
errors that leave the model untouched."""
import copy

import pytest
import torch

import peft_kernels as pk
from peft_kernels.inject import find_targets

from helpers import assert_close

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2(seed=0):
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=61, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def bert(seed=0, cls=None, num_labels=3):
    cfg = transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=32, num_labels=num_labels,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return (cls or transformers.BertForSequenceClassification)(cfg).eval()


IDS = torch.tensor([[3, 17, 5, 60, 9, 1, 22]])


def test_target_rules():
    m = llama()
    assert find_targets(m, ["q_proj", "v_proj"]) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1)
                                                    for p in ("q_proj", "v_proj")]
    assert find_targets(m, r"model\.layers\.1\.mlp\.(up|down)_proj") == ["model.layers.1.mlp.up_proj",
                                                                        "model.layers.1.mlp.down_proj"]
    every = find_targets(m, "all-linear")
    assert len(every) == 2 * 7 and "lm_head" not in every  # the output head is left alone
    assert find_targets(m, "all-linear", exclude_modules=["o_proj"]) == [n for n in every if not n.endswith("o_proj")]
    with pytest.raises(ValueError, match="matched no"):  # a list entry matches whole name parts only
        find_targets(m, ["proj"])
    with pytest.raises(ValueError, match="is a LlamaAttention"):
        find_targets(m, ["self_attn"])
    with pytest.raises(TypeError, match="target_modules must be"):
        find_targets(m, 3)
    with pytest.raises(ValueError, match="not a valid regex"):
        find_targets(m, "q_proj(")


def test_inject_keeps_outputs_and_trains_only_lora():
    m = llama()
    ref = m(IDS).logits
    names = pk.inject_lora(m, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    assert len(names) == 4 and all(isinstance(m.get_submodule(n), pk.LoRALinear) for n in names)
    assert torch.equal(m(IDS).logits, ref)  # B = 0: the injected model is the base model exactly
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    sd = pk.lora_state_dict(m)
    assert set(sd) == trainable and all(not t.requires_grad for t in sd.values())
    with pytest.raises(ValueError, match="already is a LoRALinear"):
        pk.inject_lora(m, ["q_proj"])


def test_failed_inject_changes_nothing():
    m = llama()
    before = copy.deepcopy(m.state_dict())
    kinds = [type(x) for x in m.modules()]
    with pytest.raises(ValueError):
        pk.inject_lora(m, ["q_proj", "self_attn"])  # q_proj is fine, self_attn is not: nothing is replaced
    assert [type(x) for x in m.modules()] == kinds
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_merge_unmerge_roundtrip():
    m = llama()
    pk.inject_lora(m, "all-linear", r=3, lora_alpha=6, init_lora_weights=False)
    out = m(IDS).logits
    with torch.no_grad():
        out64 = copy.deepcopy(m).double()(IDS).logits
    merged = pk.merge_lora(m)
    assert len(merged) == 14 and pk.merge_lora(m) == []
    # merging rounds each W + s·B·A to fp32 once more than the unmerged layers: a few times their error
    assert_close(m(IDS).logits, out64, out, "merged logits", mult=8.0)
    assert pk.unmerge_lora(m) == merged
    assert_close(m(IDS).logits, out64, out, "unmerged logits", mult=8.0)
    layer = m.get_submodule(merged[0])
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    with pytest.raises(ValueError, match="nothing was merged"):
        pk.merge_lora(m, safe_merge=True)
    assert not any(x.merged for x in m.modules() if isinstance(x, pk.LoRALinear))


def _copy_from_peft(ours, pm, names, prefix="base_model.model."):
    for n in names:
        pl = pm.get_submodule(prefix + n)
        with torch.no_grad():
            ours.get_submodule(n).lora_A.copy_(pl.lora_A["default"].weight)
            ours.get_submodule(n).lora_B.copy_(pl.lora_B["default"].weight)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_injected_model_matches_peft(arch):
    """Same base, same LoRA weights: our injected model's logits equal PEFT's (GPT-2: Conv1D, fan_in_fan_out)."""
    make = llama if arch == "llama" else gpt2
    targets = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                          fan_in_fan_out=arch == "gpt2")
    pm = peft.get_peft_model(make(), cfg).eval()
    ours = make()
    names = pk.inject_lora(ours, targets, r=4, lora_alpha=8)
    assert all(ours.get_submodule(n).fan_in_fan_out == (arch == "gpt2") for n in names)
    _copy_from_peft(ours, pm, names)
    with torch.no_grad():
        ref = pm(IDS).logits
        got = ours(IDS).logits
        ref64 = copy.deepcopy(pm).double()(IDS).logits  # the truth: PEFT's math in fp64
    assert_close(got, ref64, ref, f"{arch} logits vs PEFT (fp64 truth, fp32 PEFT the baseline)")
    # the Conv1D's own weight stays [in, out] under its own name: checkpoints keep their keys and shapes
    base_keys = set(make().state_dict())
    assert base_keys <= set(ours.state_dict())
    assert all(ours.state_dict()[k].shape == v.shape for k, v in make().state_dict().items())


def test_gpt2_conv1d_merge_and_training_step():
    m = gpt2()
    pk.inject_lora(m, ["c_attn"], r=2, lora_alpha=4, init_lora_weights=False)
    out = m(IDS).logits
    with torch.no_grad():
        out64 = copy.deepcopy(m).double()(IDS).logits  # the unmerged model in fp64: the truth
    pk.merge_lora(m)
    # merging rounds W + s·B·A to fp32 once more than the unmerged path: a few times its error
    assert_close(m(IDS).logits, out64, out, "merged Conv1D", mult=8.0)
    pk.unmerge_lora(m)
    m.train()
    loss = m(IDS, labels=IDS).loss
    loss.backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)


def test_inject_multi_lora_matches_single_adapter():
    """A MultiLoRALinear slot holding the same adapter gives the same logits as LoRALinear."""
    single, multi = gpt2(), gpt2()
    names = pk.inject_lora(single, ["c_attn", "c_proj"], r=3, lora_alpha=6, init_lora_weights=False)
    assert pk.inject_multi_lora(multi, ["c_attn", "c_proj"], max_adapters=2, max_rank=4) == names
    for n in names:
        s = single.get_submodule(n)
        multi.get_submodule(n).set_adapter(1, s.lora_A, s.lora_B, s.scaling)
    with torch.no_grad(), pk.adapter_ids(multi, torch.ones(IDS.shape[0], dtype=torch.long)):
        got = multi(IDS).logits
    ref = single(IDS).logits.detach()
    with torch.no_grad():
        ref64 = copy.deepcopy(single).double()(IDS).logits
    assert_close(got, ref64, ref, "multi vs single (fp64 single as the truth)")
    assert {k.rsplit(".", 1)[-1] for k in pk.lora_state_dict(multi)} == {"lora_A", "lora_B", "scalings", "ranks"}
