"""Whole-model PEFT parity (issue #18): trained heads (modules_to_save / task_type), model-level controls
(merge_and_unload, unload, disable_adapters, trainable-parameter counts), from_peft of IA3 and of trained
heads. Checked against HF PEFT 0.21 on small transformers models."""
import copy
import json
import warnings

import pytest
import torch

import peft_kernels as pk

from helpers import assert_close

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from test_inject import IDS, bert, gpt2, llama  # noqa: E402


def logits(m, ids=IDS):
    with torch.no_grad():
        return m(ids).logits


def logits64(m, ids=IDS):
    with torch.no_grad():
        return copy.deepcopy(m).double()(ids).logits


def train_head(m, seed=5):
    """Change every trainable parameter (as a few optimiser steps would): the heads then differ from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def token_cls(seed=0):
    return bert(seed, transformers.BertForTokenClassification, num_labels=5)


# ------------------------------------------------------------------------------------ trained heads
@pytest.mark.parametrize("task,make", [("SEQ_CLS", bert), ("TOKEN_CLS", token_cls)])
def test_peft_task_adapter_loads_with_its_head_and_gives_peft_logits(tmp_path, task, make):
    torch.manual_seed(3)
    pm = peft.get_peft_model(make(), peft.LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=["query", "value"],
                                                     init_lora_weights=False)).eval()
    train_head(pm)
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier", "score"] and cfg["task_type"] == task
    ours = make()
    base_ref = logits(ours)
    pk.load_peft_adapter(ours, tmp_path)
    assert isinstance(ours.classifier, pk.ModulesToSave)
    got, ref = logits(ours), logits(pm)
    assert (ref - base_ref).abs().max() > 0.05  # the head matters: losing it would show
    assert_close(got, logits64(pm), ref, f"{task}: ours vs PEFT")


def test_our_trained_head_saves_and_peft_loads_it(tmp_path):
    ours = bert()
    pk.inject_lora(ours, ["query", "value"], r=4, lora_alpha=8, init_lora_weights=False, task_type="SEQ_CLS")
    assert ours.classifier.trained.weight.requires_grad and not ours.classifier.original_module.weight.requires_grad
    train_head(ours)
    ours.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing trainable is left out, so no warning
        pk.save_peft_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    pm = peft.PeftModel.from_pretrained(bert(), tmp_path).eval()
    assert_close(logits(pm), logits64(ours), logits(ours), "PEFT loads our head")
    # and back: our loader reads our folder
    again = bert()
    pk.load_peft_adapter(again, tmp_path)
    assert torch.equal(logits(again), logits(ours))


def test_lora_state_dict_holds_the_head_and_original_is_untouched():
    m = bert()
    orig = m.classifier.weight.detach().clone()
    pk.inject_lora(m, ["query"], r=2, modules_to_save=["classifier"])
    train_head(m)
    sd = pk.lora_state_dict(m)
    assert "classifier.modules_to_save.default.weight" in sd and "classifier.modules_to_save.default.bias" in sd
    assert torch.equal(m.classifier.original_module.weight, orig)
    fresh = bert()
    pk.inject_lora(fresh, ["query"], r=2, modules_to_save=["classifier"])
    fresh.load_state_dict(sd, strict=False)
    assert torch.equal(logits(fresh), logits(m))


def test_unsaved_trainable_head_warns_at_save(tmp_path):
    m = bert()
    pk.inject_lora(m, ["query"], r=2)
    m.classifier.weight.requires_grad_(True)  # trained, but not declared
    with pytest.warns(UserWarning, match=r"NOT saved.*classifier"):
        pk.save_peft_adapter(m, tmp_path)


def test_modules_to_save_errors_change_nothing():
    m = bert()
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    kinds = [type(x) for x in m.modules()]
    with pytest.raises(ValueError, match="modules_to_save.*matched no module"):
        pk.inject_lora(m, ["query"], modules_to_save=["nohead"])
    with pytest.raises(ValueError, match="task_type"):
        pk.inject_lora(m, ["query"], task_type="SEQ_CLASSIFY")
    with pytest.raises(TypeError, match="modules_to_save must be a list"):
        pk.inject_lora(m, ["query"], modules_to_save="classifier")
    with pytest.raises(ValueError, match="cannot be both"):
        pk.inject_lora(m, ["query", "classifier"], task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="has no module of that name"):
        pk.inject_lora(llama(), ["q_proj"], task_type="SEQ_CLS")
    assert [type(x) for x in m.modules()] == kinds
    assert all(torch.equal(snap[k], v) for k, v in m.state_dict().items())


def test_all_linear_leaves_the_trained_head_to_modules_to_save():
    m = bert()
    names = pk.inject_lora(m, "all-linear", r=2, task_type="SEQ_CLS")
    assert "classifier" not in names and isinstance(m.classifier, pk.ModulesToSave)
    assert isinstance(m.classifier.trained, torch.nn.Linear)


def test_checkpoint_head_with_wrong_shape_is_refused_and_model_unchanged(tmp_path):
    pm = peft.get_peft_model(bert(), peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    f = tmp_path / "adapter_model.safetensors"
    sd = load_file(f)
    sd["base_model.model.classifier.weight"] = torch.zeros(7, 32)
    save_file(sd, f)
    m = bert()
    kinds = [type(x) for x in m.modules()]
    with pytest.raises(pk.CheckpointError, match="modules_to_save 'classifier'"):
        pk.load_peft_adapter(m, tmp_path)
    assert [type(x) for x in m.modules()] == kinds


# ------------------------------------------------------------------------------------ controls
def test_print_trainable_parameters_matches_peft(capsys):
    torch.manual_seed(0)
    pm = peft.get_peft_model(bert(), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    pm.print_trainable_parameters()
    theirs = capsys.readouterr().out
    m = bert()
    pk.inject_lora(m, ["query", "value"], r=4, task_type="SEQ_CLS")
    pk.print_trainable_parameters(m)
    assert capsys.readouterr().out == theirs
    assert pk.trainable_parameters(m) == pm.get_nb_trainable_parameters()


def test_controls_on_a_4bit_model_count_merge_and_unload_as_peft():
    pytest.importorskip("bitsandbytes")
    from test_qlora import Tiny

    torch.manual_seed(0)
    pm = peft.get_peft_model(Tiny("nf4"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
    ours = pk.from_peft(copy.deepcopy(pm))
    assert pk.trainable_parameters(ours) == pm.get_nb_trainable_parameters()
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = ours(x)
        with pk.disable_adapters(ours):
            base = ours(x)
        with pm.disable_adapter():
            assert torch.allclose(pm(x), base, rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match="requantizes"):
        pk.merge_and_unload(ours)
    # Linear4bit layers again (PEFT's merge on a CPU bitsandbytes layer fails, so the requantization itself is
    # checked against bitsandbytes in test_qlora.test_merge_requantizes_as_peft_does)
    assert [type(m) for m in ours.modules()] == [type(m) for m in Tiny("nf4").modules()]
    with torch.no_grad():
        got = ours(x)
    assert (got - want).abs().max() < (base - want).abs().max()  # the update is in, up to requantization


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_merge_and_unload_gives_plain_layers_that_transformers_saves(tmp_path, arch):
    make = {"llama": llama, "gpt2": gpt2, "bert": bert}[arch]
    targets = {"llama": ["q_proj", "v_proj", "embed_tokens"], "gpt2": ["c_attn", "c_fc"],
               "bert": ["query", "value", "position_embeddings"]}[arch]
    m = make()
    kinds = [type(x) for x in m.modules()]
    pk.inject_lora(m, targets, r=4, lora_alpha=8, init_lora_weights=False,
                   task_type="SEQ_CLS" if arch == "bert" else None)
    train_head(m)
    want, want64 = logits(m), logits64(m)
    out = pk.merge_and_unload(m)
    assert out is m and [type(x) for x in m.modules()] == kinds  # the original architecture
    assert_close(logits(m), want64, want, f"{arch}: merged", mult=8)
    m.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back, info = type(m).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    assert_close(logits(back.eval()), want64, want, f"{arch}: saved and loaded by transformers", mult=8)


def test_merging_a_tied_embedding_is_refused():
    m = gpt2()  # wte is tied to lm_head
    pk.inject_lora(m, ["wte", "c_attn"], r=2, init_lora_weights=False)
    want = logits(m)
    with pytest.raises(ValueError, match="tied to .*lm_head"):
        pk.merge_and_unload(m)
    with pytest.raises(ValueError, match="tied"):
        pk.merge_lora(m)
    assert torch.equal(logits(m), want) and not any(getattr(x, "merged", False) for x in m.modules())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_unload_restores_the_original_model(arch):
    make = {"llama": llama, "gpt2": gpt2, "bert": bert}[arch]
    m = make()
    want = logits(m)
    kinds = [type(x) for x in m.modules()]
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    pk.inject_lora(m, "all-linear", r=4, init_lora_weights=False, task_type="SEQ_CLS" if arch == "bert" else None)
    train_head(m)
    assert not torch.equal(logits(m), want)
    pk.merge_lora(m)  # a merged layer is unmerged on the way out
    pk.unload(m)
    assert [type(x) for x in m.modules()] == kinds
    assert {n for n, p in m.named_parameters() if p.requires_grad} == trainable
    assert_close(logits(m), logits64(m), want, f"{arch}: unloaded")
    assert sd.keys() == m.state_dict().keys()


def test_disable_adapters_gives_base_outputs_without_copies():
    m = bert()
    base = logits(m)
    pk.inject_lora(m, ["query", "value", "embeddings.word_embeddings"], r=4, init_lora_weights=False,
                   task_type="SEQ_CLS")
    train_head(m)
    adapted = logits(m)
    ptrs = {n: p.data_ptr() for n, p in m.named_parameters()}
    with pk.disable_adapters(m):
        off = logits(m)
    assert torch.equal(off, base) and not torch.equal(adapted, base)
    assert torch.equal(logits(m), adapted)
    assert ptrs == {n: p.data_ptr() for n, p in m.named_parameters()}
    pk.merge_lora(m)
    with pytest.raises(ValueError, match="merged"):
        with pk.disable_adapters(m):
            pass


def test_disable_adapters_is_per_thread():
    import threading

    m = llama()
    pk.inject_lora(m, ["q_proj"], r=2, init_lora_weights=False)
    adapted = logits(m)
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait()
        seen["other"] = logits(m)
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with pk.disable_adapters(m):
        inside.set()
        done.wait()
        seen["mine"] = logits(m)
    t.join()
    assert torch.equal(seen["other"], adapted) and not torch.equal(seen["mine"], adapted)


def test_disable_adapters_matches_peft_on_ia3_and_multi():
    m = llama()
    base = logits(m)
    pk.inject_ia3(m, ["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    train_head(m)
    with pk.disable_adapters(m):
        assert torch.equal(logits(m), base)
    m2 = llama()
    pk.inject_multi_lora(m2, ["q_proj"], max_adapters=2, max_rank=2)
    for mod in m2.modules():
        if isinstance(mod, pk.MultiLoRALinear):
            mod.set_adapter(0, torch.randn(2, 32), torch.randn(32, 2), 1.0)
    with pk.disable_adapters(m2):
        assert torch.equal(logits(m2), base)  # no adapter_ids needed: the base runs


# ------------------------------------------------------------------------------------ from_peft
def test_from_peft_converts_ia3():
    torch.manual_seed(0)
    pm = peft.get_peft_model(llama(), peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                     feedforward_modules=["down_proj"])).eval()
    train_head(pm)
    ref, ref64 = logits(pm), logits64(pm)
    ours = pk.from_peft(pm)
    kinds = {type(x) for x in ours.modules()}
    assert pk.IA3Linear in kinds and not any("IA3" in k.__name__ and k is not pk.IA3Linear for k in kinds)
    assert ours.model.layers[0].mlp.down_proj.feedforward and not ours.model.layers[0].self_attn.k_proj.feedforward
    assert_close(logits(ours), ref64, ref, "from_peft IA3")


def test_from_peft_converts_trained_head_and_embedding_lora():
    torch.manual_seed(0)
    pm = peft.get_peft_model(bert(), peft.LoraConfig(task_type="SEQ_CLS", r=4, init_lora_weights=False,
                                                     target_modules=["query", "word_embeddings"])).eval()
    train_head(pm)
    ref, ref64 = logits(pm), logits64(pm)
    ours = pk.from_peft(pm)
    assert isinstance(ours.classifier, pk.ModulesToSave)
    assert isinstance(ours.bert.embeddings.word_embeddings, pk.LoRAEmbedding)
    assert_close(logits(ours), ref64, ref, "from_peft SEQ_CLS + embedding")


def test_from_peft_refuses_other_types_before_changing_anything():
    pm = peft.get_peft_model(llama(), peft.LoHaConfig(target_modules=["q_proj"]))
    kinds = [type(x) for x in pm.modules()]
    with pytest.raises(ValueError, match="LOHA"):
        pk.from_peft(pm)
    assert [type(x) for x in pm.modules()] == kinds
    pm = peft.get_peft_model(llama(), peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]),
                             adapter_name="a")
    pm.add_adapter("b", peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="one IA3 adapter"):
        pk.from_peft(pm)
