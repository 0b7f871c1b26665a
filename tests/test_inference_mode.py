"""Every module under ``torch.inference_mode`` (the usual serving context), its inputs and adapter ids created
inside it (inference tensors, which have no version counter): the same outputs as under ``no_grad``, bit for bit.
Before, a multi-adapter ``adapter_ids`` block with ids made under inference_mode, and a fused sibling group fed an
inference tensor, raised "Inference tensors do not track version counter"."""
import copy

import pytest
import torch

import peft_kernels as pk

transformers = pytest.importorskip("transformers")


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _multi_linear():
    m = pk.MultiLoRALinear(16, 8, max_adapters=2, max_rank=4)
    g = torch.Generator().manual_seed(2)
    m.set_adapter(0, torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g), 1.0)
    m.set_adapter(1, torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g), 2.0)
    return m


def _multi_call(m):
    with pk.adapter_ids(m, torch.tensor([0, 1, -1])):  # ids made where the call runs (under inference_mode there)
        return m(_x(3, 16))


def _multi_embedding():
    m = pk.MultiLoRAEmbedding(20, 8, max_adapters=2, max_rank=4)
    m.set_adapter(0, torch.randn(4, 20, generator=torch.Generator().manual_seed(2)), torch.randn(8, 4), 1.0)
    return m


def _multi_embedding_call(m):
    with pk.adapter_ids(m, torch.tensor([0, -1])):
        return m(torch.tensor([[1, 2, 19], [3, 4, 5]]))


def _llama(inject):
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64))
    inject(m)
    return m


def _set_slots(m):
    g = torch.Generator().manual_seed(1)
    for lay in m.modules():
        if isinstance(lay, pk.MultiLoRALinear):
            lay.set_adapter(0, torch.randn(4, lay.in_features, generator=g) / 6,
                            torch.randn(lay.out_features, 4, generator=g), 1.0)


IDS = torch.randint(0, 120, (2, 7), generator=torch.Generator().manual_seed(3))
QKV = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
CASES = {
    "LoRALinear": (lambda: pk.LoRALinear(16, 8, r=4, init_lora_weights=False, lora_dropout=0.1),
                   lambda m: m(_x(3, 16))),
    "DoRA": (lambda: pk.LoRALinear(16, 8, r=4, init_lora_weights=False, use_dora=True), lambda m: m(_x(3, 16))),
    "MultiLoRALinear, adapter_ids block": (_multi_linear, _multi_call),
    "MultiLoRALinear, explicit ids": (_multi_linear, lambda m: m(_x(3, 16), adapter_ids=torch.tensor([0, 1, -1]))),
    "LoRAEmbedding": (lambda: pk.LoRAEmbedding(20, 8, r=4, init_lora_weights=False),
                      lambda m: m(torch.tensor([[1, 2, 19]]))),
    "MultiLoRAEmbedding": (_multi_embedding, _multi_embedding_call),
    "IA3Linear": (lambda: pk.IA3Linear(16, 8, init_ia3_weights=False), lambda m: m(_x(3, 16))),
    "BottleneckAdapter": (lambda: pk.BottleneckAdapter(16, 4), lambda m: m(_x(3, 16))),
    # (the hidden states are inference tensors there: the members run alone, so the reference is the unfused model)
    "Llama, fused siblings and a LoRA head": (
        lambda: _llama(lambda m: pk.inject_lora(m, QKV + ["lm_head"], r=4, init_lora_weights=False,
                                                fuse_siblings=True)),
        lambda m: m(input_ids=IDS).logits,
        lambda: _llama(lambda m: pk.inject_lora(m, QKV + ["lm_head"], r=4, init_lora_weights=False))),
    "Llama, causal_lm_loss": (
        lambda: _llama(lambda m: pk.inject_lora(m, QKV + ["lm_head"], r=4, init_lora_weights=False)),
        lambda m: pk.causal_lm_loss(m, IDS)),
    "Llama, multi-adapter fused siblings": (
        lambda: _llama(lambda m: (pk.inject_multi_lora(m, QKV, max_adapters=2, max_rank=4, fuse_siblings=True),
                                  _set_slots(m))),
        lambda m: _adapter_call(m)),
}


def _adapter_call(m):
    with pk.adapter_ids(m, torch.tensor([0, -1])):
        return m(input_ids=IDS).logits


@pytest.mark.parametrize("case", list(CASES))
def test_inference_mode_equals_no_grad(case):
    make, call, *ref = CASES[case]
    m = make().eval()
    with torch.no_grad():
        want = call(ref[0]().eval() if ref else m)
    with torch.inference_mode():
        got = call(m)
    assert got.is_inference() and torch.equal(got, want), case


def test_fused_group_under_inference_mode():
    """A fused q/k/v group under inference_mode: fed a normal tensor it runs fused (one buffer for the three
    outputs); fed an inference tensor (no version counter: an in-place change between the members' calls could not
    be seen) each member runs alone, and the outputs equal the unfused layers' bit for bit. The group stays on."""
    fused, plain = (_llama(lambda m, f=f: pk.inject_lora(m, QKV, r=4, init_lora_weights=False, fuse_siblings=f))
                    for f in (True, False))
    attn, ref = fused.model.layers[0].self_attn, plain.model.layers[0].self_attn
    x = _x(2, 5, 32)
    with torch.inference_mode():
        ys = [getattr(attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
        assert len({y.untyped_storage().data_ptr() for y in ys}) == 1  # one group call
        xi = x.clone()  # an inference tensor
        assert xi.is_inference()
        for n in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(getattr(attn, n)(xi), getattr(ref, n)(xi)), n
    assert attn.q_proj._siblings.enabled, attn.q_proj._siblings.why_off
