"""Prompt tuning and prefix tuning: HF PEFT parity (logits and loss, with a padded batch), checkpoints
both ways, the init modes, what trains, and bad input."""
import copy
import json

import pytest
import torch

from peft_kernels import CheckpointError
from peft_kernels.prompt import PrefixTuning, PromptTuning

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=50)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row
    return ids, mask


CONFIGS = {
    "prompt": (lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), PromptTuning),
    "prefix": (lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), PrefixTuning),
    "prefix_projection": (lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                          prefix_projection=True, encoder_hidden_size=16), PrefixTuning),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_peft_checkpoint_parity_both_ways(llama, kind, tmp_path):
    make_cfg, cls = CONFIGS[kind]
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(llama), make_cfg()).eval()
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.normal_()
    ids, mask = _batch()
    ref = pm(input_ids=ids, attention_mask=mask, labels=ids)
    pm.save_pretrained(tmp_path / "peft")
    ours = cls.from_pretrained(copy.deepcopy(llama), tmp_path / "peft").eval()
    out = ours(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "ours").eval()
    torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_prefix_projection_trains_like_peft(llama):
    """The reparameterising MLP: same forward and the same gradients as PEFT's prefix encoder."""
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(llama), CONFIGS["prefix_projection"][0]())
    enc = pm.prompt_encoder["default"]
    ours = PrefixTuning(copy.deepcopy(llama), 5, prefix_projection=True, encoder_hidden_size=16)
    ours.embedding.load_state_dict(enc.embedding.state_dict())
    ours.transform.load_state_dict(enc.transform.state_dict())
    ids, mask = _batch()
    ref = pm(input_ids=ids, attention_mask=mask, labels=ids).loss
    out = ours(input_ids=ids, attention_mask=mask, labels=ids).loss
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    ref.backward()
    out.backward()
    torch.testing.assert_close(ours.embedding.weight.grad, enc.embedding.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.transform[2].weight.grad, enc.transform[2].weight.grad, rtol=1e-4, atol=1e-6)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {"embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight",
                         "transform.2.bias"}


def test_prompt_tuning_inits_and_training(llama):
    emb = llama.get_input_embeddings().weight
    tok = lambda text: {"input_ids": [ord(c) % 50 for c in text]}  # noqa: E731  (a stand-in tokenizer)
    pt = PromptTuning(copy.deepcopy(llama), 7, init="text", init_text="abc", tokenizer=tok)
    want = emb[[ord(c) % 50 for c in "abcabca"]]
    torch.testing.assert_close(pt.prompt_embeddings(), want)  # repeated to 7 tokens, as PEFT does
    torch.manual_seed(0)
    pv = PromptTuning(copy.deepcopy(llama), 4, init="vocab")
    for row in pv.prompt_embeddings():
        assert (emb == row).all(1).any()  # every row is some token's embedding
    # only the prompt trains; a step changes the loss
    pr = PromptTuning(copy.deepcopy(llama), 3)
    assert [n for n, p in pr.named_parameters() if p.requires_grad] == ["prompt.weight"]
    ids, mask = _batch()
    opt = torch.optim.SGD(pr.parameters(), lr=1.0)
    l0 = pr(input_ids=ids, attention_mask=mask, labels=ids).loss
    l0.backward()
    opt.step()
    assert pr(input_ids=ids, attention_mask=mask, labels=ids).loss < l0


def test_prompt_tuning_on_an_encoder():
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                                  vocab_size=60)
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg).eval()
    pt = PromptTuning(bert, 4)
    ids, mask = _batch()
    out = pt(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.shape == (2, 4 + 7, 32)
    # the same as feeding the concatenation by hand
    embeds = torch.cat([pt.prompt_embeddings().unsqueeze(0).expand(2, -1, -1), bert.get_input_embeddings()(ids)], 1)
    hand = bert(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, 4, dtype=torch.long), mask], 1))
    torch.testing.assert_close(out, hand.last_hidden_state)


def test_bad_checkpoints_and_arguments(llama, tmp_path):
    pm = peft.get_peft_model(copy.deepcopy(llama), CONFIGS["prefix"][0]())
    pm.save_pretrained(tmp_path)
    model = copy.deepcopy(llama)
    flags = [p.requires_grad for p in model.parameters()]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(cfg, num_layers=3)))
    with pytest.raises(CheckpointError, match="num_layers"):
        PrefixTuning.from_pretrained(model, tmp_path)
    with pytest.raises(CheckpointError, match="peft_type must be 'PROMPT_TUNING'"):
        PromptTuning.from_pretrained(model, tmp_path)
    assert [p.requires_grad for p in model.parameters()] == flags  # nothing was touched
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(cfg, num_virtual_tokens=6)))
    with pytest.raises(CheckpointError, match="prompt_embeddings has shape"):
        PrefixTuning.from_pretrained(model, tmp_path)
    assert [p.requires_grad for p in model.parameters()] == flags
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int"):
        PromptTuning(model, 0)
    with pytest.raises(ValueError, match="init must be one of"):
        PromptTuning(model, 2, init="zeros")
    with pytest.raises(ValueError, match="init_text"):
        PromptTuning(model, 2, init="text")
    pt = PromptTuning(model, 2)
    ids, _ = _batch()
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        pt(input_ids=ids, inputs_embeds=torch.zeros(2, 7, 32))
    with pytest.raises(TypeError, match="transformers PreTrainedModel"):
        PromptTuning(torch.nn.Linear(2, 2), 2)
