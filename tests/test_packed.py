"""Per-slice LoRA on packed projections (``PackedLoRALinear``): the layer against per-slice references (nn.Linear
and GPT-2's Conv1D), a PEFT adapter trained on a Llama's separate q/k/v and gate/up served on the same weights
packed as a Phi-3 (equal logits and gradients), the packed adapter saved as PEFT's single equivalent LoRA (PEFT
loads it), merge / unload / disable, and errors that change nothing."""
import copy
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peft_kernels as pk
from peft_kernels import reference
from peft_kernels.nn.packed import PackedLoRALinear

from helpers import check_controls

KW = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
          tie_word_embeddings=False)
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _slices_ref(x, W, b, layer):
    """Each slice as its own LoRA'd projection (the reference), concatenated."""
    outs, off = [], 0
    for n, w in layer.slices.items():
        outs.append(reference.lora_linear_ref(x, W[off:off + w], None if b is None else b[off:off + w],
                                              layer.lora_A[n], layer.lora_B[n], layer.scaling[n]))
        off += w
    return torch.cat(outs, -1)


@pytest.mark.parametrize("unfrozen", [False, True], ids=["frozen", "unfrozen-base"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_against_the_slices(kind, unfrozen):
    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Linear(24, 40).double()
    else:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(40, 24).double()
        nn.init.normal_(base.weight)
    layer = PackedLoRALinear(base, {"q": 24, "k": 8, "v": 8}, r={"q": 4, "k": 1, "v": 80}, lora_alpha=8,
                             init_lora_weights=False)
    layer.weight.requires_grad_(unfrozen)  # an unfrozen base gets its gradients too
    layer.bias.requires_grad_(unfrozen)
    W = layer.base_weight()
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    ref = _slices_ref(x, W, layer.bias, layer)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    ps = [x] + list(layer.lora_A.values()) + list(layer.lora_B.values()) + ([layer.weight, layer.bias] if unfrozen
                                                                           else [])
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, ps, g), torch.autograd.grad(ref, ps, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        layer.merge()
        torch.testing.assert_close(F.linear(x, layer.base_weight(), layer.bias), ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)
        layer.unmerge()
        torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_under_autocast(kind):
    """Under CPU bf16 autocast the packed layer computes as the slices' ``F.linear`` would: a bf16 output equal to
    the fp64 reference of the bf16-rounded inputs within what bf16 torch gets, and fp32 gradients for x and the
    factors against the same references. Before: with x requiring grad, backward raised a dtype error."""
    from helpers import assert_close

    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Linear(24, 40)
    else:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(40, 24)
        nn.init.normal_(base.weight, std=0.2)
    layer = PackedLoRALinear(base, {"q": 24, "k": 8, "v": 8}, r={"q": 4, "k": 1, "v": 12}, lora_alpha=8,
                             init_lora_weights=False)
    x = torch.randn(3, 5, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    g = torch.randn(y.shape)
    y.float().backward(g)
    ps = [x, *layer.lora_A.values(), *layer.lora_B.values()]
    assert all(p.grad.dtype == torch.float32 for p in ps)
    refs = []
    for dt in (torch.float64, torch.bfloat16):
        c = [p.detach().to(torch.bfloat16).to(dt).requires_grad_() for p in ps]
        ref_layer = types.SimpleNamespace(slices=layer.slices, scaling=layer.scaling, lora_A=dict(zip(
            layer.slices, c[1:4])), lora_B=dict(zip(layer.slices, c[4:])))
        W, b = (t.detach().to(torch.bfloat16).to(dt) for t in (layer.base_weight(), layer.bias))
        ref = _slices_ref(c[0], W, b, ref_layer)
        refs.append((ref, torch.autograd.grad(ref, c, g.to(torch.bfloat16).to(dt))))
    assert_close(y, refs[0][0], refs[1][0], "y")
    for i, p in enumerate(ps):
        assert_close(p.grad, refs[0][1][i], refs[1][1][i], f"grad {i}")


def _llama_and_phi3():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ll = transformers.LlamaForCausalLM(transformers.LlamaConfig(**KW))
    ph = transformers.Phi3ForCausalLM(transformers.Phi3Config(**KW, pad_token_id=0))
    sd, new = ll.state_dict(), {}
    for k, v in sd.items():
        if "q_proj" in k:
            new[k.replace("q_proj", "qkv_proj")] = torch.cat([v, sd[k.replace("q_proj", "k_proj")],
                                                              sd[k.replace("q_proj", "v_proj")]])
        elif "gate_proj" in k:
            new[k.replace("gate_proj", "gate_up_proj")] = torch.cat([v, sd[k.replace("gate_proj", "up_proj")]])
        elif not any(p in k for p in ("k_proj", "v_proj", "up_proj")):
            new[k] = v
    ph.load_state_dict(new)
    return ll, ph


def test_separate_projection_adapter_served_on_the_packed_model(tmp_path):
    peft = pytest.importorskip("peft")
    ll, ph = _llama_and_phi3()
    torch.manual_seed(2)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
                                                             "o_proj"], rank_pattern={"k_proj": 2},
                          init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(ll), cfg)
    pm.save_pretrained(str(tmp_path / "sep"))
    names = pk.load_peft_adapter(ph, str(tmp_path / "sep"), packed=PACKED)
    assert sorted(names) == sorted([f"model.layers.{i}.{m}" for i in (0, 1) for m in
                                    ("self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj")])
    qkv = ph.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, PackedLoRALinear) and qkv.r == {"q_proj": 4, "k_proj": 2, "v_proj": 4}
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    pm.train()
    ph.train()
    lp, lo = pm(input_ids=ids, labels=ids).loss, ph(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-6)
    lp.backward()
    lo.backward()
    peft_attn = pm.base_model.model.model.layers[1].self_attn
    ours = ph.model.layers[1].self_attn.qkv_proj
    for part in ("q_proj", "k_proj", "v_proj"):
        for ab in ("A", "B"):
            want = getattr(getattr(peft_attn, part), f"lora_{ab}")["default"].weight.grad
            torch.testing.assert_close(getattr(ours, f"lora_{ab}")[part].grad, want, rtol=1e-4, atol=1e-6)
    # saved from the packed model: PEFT's single equivalent LoRA on qkv_proj / gate_up_proj, loaded by PEFT
    pk.save_peft_adapter(ph, str(tmp_path / "packed"))
    ph.eval()
    back = peft.PeftModel.from_pretrained(copy.deepcopy(_llama_and_phi3()[1]), str(tmp_path / "packed")).eval()
    torch.testing.assert_close(back(input_ids=ids).logits, ph(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_inject_merge_unload_disable_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4)).eval()
    m = copy.deepcopy(base)
    names = pk.inject_packed_lora(m, {"c_attn": ["q", "k", "v"]}, r=4, lora_alpha=8, init_lora_weights=False)
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        f"transformer.h.{i}.attn.c_attn.lora_{ab}.{s}" for i in (0, 1) for ab in "AB" for s in "qkv"}
    merged = pk.merge_and_unload(copy.deepcopy(m))
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    check_controls(m, base, torch.randint(0, 100, (2, 7)), PackedLoRALinear)


def test_errors_change_nothing(tmp_path):
    peft = pytest.importorskip("peft")
    ll, ph = _llama_and_phi3()
    with pytest.raises(ValueError, match="sum to"):
        PackedLoRALinear(nn.Linear(8, 10), {"q": 4, "k": 4})
    with pytest.raises(ValueError, match="at least 2"):
        PackedLoRALinear(nn.Linear(8, 10), {"q": 10})
    with pytest.raises(ValueError, match="split evenly"):
        pk.inject_packed_lora(nn.Sequential(nn.Linear(8, 10)), {"0": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="matched no module"):
        pk.inject_packed_lora(ph, {"nothing": ["a", "b"]})
    pm = peft.get_peft_model(copy.deepcopy(ll), peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj"]))
    pm.save_pretrained(str(tmp_path / "qk"))
    before = {k: v.clone() for k, v in ph.state_dict().items()}
    with pytest.raises(pk.CheckpointError, match="has LoRA for"):
        pk.load_peft_adapter(ph, str(tmp_path / "qk"), packed={"qkv_proj": ["q_proj", "k_proj", "v_proj"]})
    with pytest.raises(pk.CheckpointError, match="outputs"):
        pk.load_peft_adapter(ph, str(tmp_path / "qk"), packed={"qkv_proj": ["q_proj", "k_proj"]})
    with pytest.raises(pk.CheckpointError, match="packed must map"):
        pk.load_peft_adapter(ph, str(tmp_path / "qk"), packed={"qkv_proj": "q_proj"})
    assert not any(isinstance(x, PackedLoRALinear) for x in ph.modules())
    assert all(torch.equal(v, before[k]) for k, v in ph.state_dict().items())
