"""HF PEFT LoRA checkpoints both ways, on small transformers models (Llama-style, GPT-2 Conv1D):
PEFT save → our load and our save → PEFT load give PEFT's logits; rank/alpha patterns, rsLoRA,
lora_bias, named adapters, MultiLoRALinear slots; bad files raise and leave the model unchanged;
nothing is unpickled."""
import copy
import json
import os
import pickle

import pytest
import torch

import peft_kernels as pk

from helpers import assert_close

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from test_inject import IDS, bert, gpt2, llama  # noqa: E402


def peft_model(make, seed=1, name=None, **kw):
    kw.setdefault("init_lora_weights", False)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(make(), peft.LoraConfig(**kw)).eval()
    return pm


def logits(m, **kw):
    with torch.no_grad():
        return m(IDS, **kw).logits


def logits64(m, ids=None, **kw):
    """The same model's logits in fp64 (a deep copy): the truth the fp32 runs are measured against."""
    with torch.no_grad():
        return copy.deepcopy(m).double()(IDS if ids is None else ids, **kw).logits


def same_model(m, sd, kinds):
    assert [type(x) for x in m.modules()] == kinds
    return all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


LLAMA_CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 2},
                 alpha_pattern={"up_proj": 3}, use_rslora=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "llama-lora-bias"])
def test_peft_save_then_our_load(tmp_path, arch):
    if arch == "bert":
        make, kw = bert, dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"])
    elif arch == "gpt2":
        make, kw = gpt2, dict(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    elif arch == "llama":
        make, kw = llama, LLAMA_CFG
    else:
        make, kw = llama, dict(r=2, lora_alpha=4, target_modules=["o_proj"], lora_bias=True)
    pm = peft_model(make, **kw)
    if arch == "llama-lora-bias":
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if n.endswith("lora_B.default.bias"):
                    p.normal_()
    pm.save_pretrained(tmp_path)
    ours = make()
    names = pk.load_peft_adapter(ours, tmp_path)
    assert names and all(isinstance(ours.get_submodule(n), pk.LoRALinear) for n in names)
    ref = logits(pm)
    assert_close(logits(ours), logits64(pm), ref, f"{arch}: ours vs PEFT")
    if arch == "llama":
        v = ours.get_submodule("model.layers.0.self_attn.v_proj")
        up = ours.get_submodule("model.layers.1.mlp.up_proj")
        assert (v.r, v.lora_alpha, v.use_rslora) == (2, 8, True) and (up.r, up.lora_alpha) == (4, 3)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_our_save_then_peft_load(tmp_path, arch):
    make = {"llama": llama, "gpt2": gpt2, "bert": bert}[arch]
    ours = make()
    targets = {"llama": ["q_proj", "o_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "key"]}[arch]
    names = pk.inject_lora(ours, targets, r=3, lora_alpha=7, init_lora_weights=False)
    ours.get_submodule(names[0]).r  # noqa: B018
    assert pk.save_peft_adapter(ours, tmp_path) == names
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    ref = logits(ours)
    assert_close(logits(loaded), logits64(ours), ref, f"{arch}: PEFT loading ours")
    back = make()
    pk.load_peft_adapter(back, tmp_path)  # and round trip
    assert torch.equal(logits(back), ref)


def test_named_adapters_and_multi_lora_slots(tmp_path):
    """Two PEFT adapters (the second in its subfolder) into two MultiLoRALinear slots: a mixed batch
    matches PEFT's adapter_names."""
    pm = peft_model(llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    assert os.path.isdir(tmp_path / "other")
    m = llama()
    pk.inject_multi_lora(m, ["q_proj", "v_proj"], max_adapters=2, max_rank=4)
    pk.load_peft_adapter(m, tmp_path, slot=0)
    pk.load_peft_adapter(m, tmp_path, adapter_name="other", slot=1)
    ids = torch.tensor([[3, 17, 5], [60, 9, 1]])
    with torch.no_grad():
        ref = pm(ids, adapter_names=["default", "other"]).logits
        with pk.adapter_ids(m, torch.tensor([0, 1])):
            got = m(ids).logits
    assert_close(got, logits64(pm, ids, adapter_names=["default", "other"]), ref, "slots vs adapter_names")
    with pytest.raises(pk.CheckpointError, match="pass slot="):
        pk.load_peft_adapter(m, tmp_path)


def _corrupt(d, how):
    cfg_f, w_f = d / "adapter_config.json", d / "adapter_model.safetensors"
    if how == "bad json":
        cfg_f.write_text("{ not json")
    elif how == "dora":
        c = json.loads(cfg_f.read_text()); c["use_dora"] = True; cfg_f.write_text(json.dumps(c))  # noqa: E702
    elif how == "ia3":
        c = json.loads(cfg_f.read_text()); c["peft_type"] = "IA3"; cfg_f.write_text(json.dumps(c))  # noqa: E702
    elif how == "truncated":
        data = w_f.read_bytes()
        w_f.write_bytes(data[: len(data) // 2])
    else:
        from safetensors.torch import load_file, save_file

        sd = load_file(w_f)
        k = sorted(sd)[-1]
        if how == "missing key":
            del sd[k]
        elif how == "wrong shape":
            sd[k] = torch.zeros(sd[k].shape[0] + 1, *sd[k].shape[1:])
        elif how == "unknown module":
            for ab in ("A", "B"):
                sd[f"base_model.model.model.layers.9.self_attn.q_proj.lora_{ab}.weight"] = sd[k].clone()
        elif how == "nan":
            sd[k] = torch.full_like(sd[k], float("nan"))
        save_file(sd, w_f)


@pytest.mark.parametrize("how,match", [
    ("bad json", "not valid JSON"), ("dora", "no lora_magnitude_vector"), ("ia3", "not an IA3 ia3_l tensor"),
    ("truncated", "could not be read"), ("missing key", "missing"), ("wrong shape", "do not fit"),
    ("unknown module", "has no module"), ("nan", "finite")])
def test_bad_checkpoint_raises_and_changes_nothing(tmp_path, how, match):
    pm = peft_model(llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm.save_pretrained(tmp_path)
    _corrupt(tmp_path, how)
    m = llama()
    sd, kinds = copy.deepcopy(m.state_dict()), [type(x) for x in m.modules()]
    with pytest.raises(pk.CheckpointError, match=match):
        pk.load_peft_adapter(m, tmp_path)
    assert same_model(m, sd, kinds)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_bin_checkpoints_never_unpickle(tmp_path):
    pm = peft_model(llama, r=4, lora_alpha=8, target_modules=["q_proj"])
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    m = llama()
    pk.load_peft_adapter(m, tmp_path)  # a plain tensor dict loads through weights_only=True
    ref = logits(pm)
    assert_close(logits(m), logits64(pm), ref, "from .bin")
    with open(tmp_path / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    m2 = llama()
    with pytest.raises(pk.CheckpointError, match="weights_only=True"):
        pk.load_peft_adapter(m2, tmp_path)


def test_errors(tmp_path):
    with pytest.raises(pk.CheckpointError, match="not a directory"):
        pk.load_peft_adapter(llama(), tmp_path / "nope")
    with pytest.raises(TypeError, match="model must be"):
        pk.load_peft_adapter("model", tmp_path)
    with pytest.raises(ValueError, match="no LoRA layers"):
        pk.save_peft_adapter(llama(), tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_from_peft_single_adapter(arch):
    make = llama if arch == "llama" else gpt2
    kw = LLAMA_CFG if arch == "llama" else dict(r=3, lora_alpha=5, target_modules=["c_attn"], fan_in_fan_out=True)
    pm = peft_model(make, **kw)
    ref, ref64 = logits(pm), logits64(pm)
    model = pk.from_peft(pm)
    assert not any(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in model.modules())
    fused = [m for m in model.modules() if isinstance(m, pk.LoRALinear)]
    assert fused and model.peft_kernels_slots == {"default": 0}
    assert_close(logits(model), ref64, ref, f"{arch}: from_peft")


def test_from_peft_several_adapters_mixed_batch():
    pm = peft_model(llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], init_lora_weights=False))
    names = ["other", "__base__", "default"]
    ids = torch.tensor([[3, 17, 5], [60, 9, 1], [2, 2, 7]])
    with torch.no_grad():
        ref = pm(ids, adapter_names=names).logits
    ref64 = logits64(pm, ids, adapter_names=names)
    model = pk.from_peft(pm)
    assert any(isinstance(m, pk.MultiLoRALinear) for m in model.modules())
    with torch.no_grad(), pk.adapter_ids(model, pk.adapter_names_to_ids(model, names)):
        got = model(ids).logits
    assert_close(got, ref64, ref, "from_peft mixed batch")
    with pytest.raises(ValueError, match="unknown adapter name 'nope'"):
        pk.adapter_names_to_ids(model, ["nope"])


def test_from_peft_converts_dora_and_refuses_dora_in_slots():
    pm = peft_model(llama, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.1)
    ref, ref64 = logits(pm), logits64(pm)
    model = pk.from_peft(pm)
    assert model.model.layers[0].self_attn.q_proj.use_dora
    got = logits(model)
    assert_close(got, ref64, ref, "from_peft DoRA")
    pm = peft_model(llama, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    pm.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    kinds = [type(x) for x in pm.modules()]
    with pytest.raises(ValueError, match="DoRA"):
        pk.from_peft(pm)
    assert [type(x) for x in pm.modules()] == kinds


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_training_steps_follow_peft_loss_curve(arch):
    """Same base, same LoRA init, p=0: a few AdamW steps give PEFT's loss curve (and the same LoRA weights)."""
    make = {"llama": llama, "gpt2": gpt2, "bert": bert}[arch]
    targets = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}[arch]
    kw = dict(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=arch == "gpt2", lora_dropout=0.0)
    pm = peft_model(make, **kw).train()
    ours = pk.from_peft(peft_model(make, **kw)).train()
    labels = torch.tensor([2]) if arch == "bert" else IDS.clone()
    curves = []
    for model in (pm, ours):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for _ in range(5):
            opt.zero_grad()
            loss = model(IDS, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][-1] < curves[0][0]  # it trains
    for a, b in zip(*curves):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), curves


def test_patterns_survive_our_save(tmp_path):
    """Per-layer ranks/alphas (PEFT rank_pattern/alpha_pattern + rsLoRA) → our model → our save → PEFT load."""
    pm = peft_model(llama, **LLAMA_CFG)
    pm.save_pretrained(tmp_path / "a")
    ours = llama()
    pk.load_peft_adapter(ours, tmp_path / "a")
    pk.save_peft_adapter(ours, tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["alpha_pattern"] and cfg["use_rslora"]
    back = peft.PeftModel.from_pretrained(llama(), tmp_path / "b").eval()
    ref = logits(pm)
    assert_close(logits(back), logits64(pm), ref, "patterns round trip")
