"""Use HF PEFT LoRA adapters with peft_kernels, on CPU, with a small Llama-style model built here.

1. Train nothing: create two PEFT adapters with random weights and save them (PEFT's save_pretrained).
2. Load the first into a fresh model with peft_kernels.load_peft_adapter: same logits as PEFT.
3. Convert a PeftModel holding both adapters with peft_kernels.from_peft and serve a mixed batch
   (PEFT's adapter_names -> adapter_ids): same logits as PEFT's mixed-batch forward.
4. Save with peft_kernels.save_peft_adapter and load it back with PEFT: same logits.
Prints the largest logit differences and exits non-zero if any is above 1e-4.

    python examples/peft_adapters.py
"""
import sys
import tempfile

import peft
import torch
import transformers

import peft_kernels as pk


def base():
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def main() -> int:
    ids = torch.randint(0, 101, (3, 12), generator=torch.Generator().manual_seed(1))
    worst = 0.0
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(2)
        pm = peft.get_peft_model(base(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False)).eval()
        pm.add_adapter("chat", peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                               init_lora_weights=False))
        pm.save_pretrained(d)
        with torch.no_grad():
            ref_default = pm(ids).logits
            ref_mixed = pm(ids, adapter_names=["default", "chat", "__base__"]).logits

        # 2. load a saved adapter into a plain model
        m = base()
        names = pk.load_peft_adapter(m, d)
        with torch.no_grad():
            diff = (m(ids).logits - ref_default).abs().max().item()
        print(f"load_peft_adapter: {len(names)} layers, max |ours - PEFT| = {diff:.2e}")
        worst = max(worst, diff)

        # 3. convert the PeftModel (both adapters) and serve a mixed batch
        model = pk.from_peft(pm)
        with torch.no_grad(), pk.adapter_ids(model, pk.adapter_names_to_ids(model, ["default", "chat", "__base__"])):
            diff = (model(ids).logits - ref_mixed).abs().max().item()
        print(f"from_peft mixed batch (default, chat, base): max |ours - PEFT| = {diff:.2e}")
        worst = max(worst, diff)

        # 4. our save -> PEFT load
        d2 = tempfile.mkdtemp()
        pk.save_peft_adapter(m, d2)
        back = peft.PeftModel.from_pretrained(base(), d2).eval()
        with torch.no_grad():
            diff = (back(ids).logits - ref_default).abs().max().item()
        print(f"save_peft_adapter -> PeftModel.from_pretrained: max |PEFT - reference| = {diff:.2e}")
        worst = max(worst, diff)
    ok = worst <= 1e-4
    print("MATCH" if ok else "MISMATCH", f"(largest difference {worst:.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
