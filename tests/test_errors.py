"""Bad inputs raise ValueError/TypeError that name the argument and what was expected."""
import pytest
import torch

import peft_kernels as pk


def good(**over):
    d = dict(x=torch.randn(4, 6), weight=torch.randn(5, 6), bias=torch.randn(5),
             lora_A=torch.randn(2, 6), lora_B=torch.randn(5, 2), scaling=1.0)
    d.update(over)
    return d


def call(**over):
    d = good(**over)
    kw = {k: d.pop(k) for k in ("dropout_p", "training", "backend") if k in d}
    return pk.lora_linear(d["x"], d["weight"], d["bias"], d["lora_A"], d["lora_B"], d["scaling"], **kw)


@pytest.mark.parametrize("over,exc,words", [
    (dict(x=torch.randn(4, 7)), ValueError, ["x", "in_features=6"]),
    (dict(lora_A=torch.randn(2, 5)), ValueError, ["lora_A", "[r, in_features=6]"]),
    (dict(lora_B=torch.randn(5, 3)), ValueError, ["lora_B", "r=2"]),
    (dict(lora_B=torch.randn(4, 2)), ValueError, ["lora_B", "out_features=5"]),
    (dict(lora_A=torch.randn(0, 6), lora_B=torch.randn(5, 0)), ValueError, ["rank", ">= 1"]),
    (dict(bias=torch.randn(4)), ValueError, ["bias", "(5,)"]),
    (dict(weight=torch.randn(5, 6, 1)), ValueError, ["weight", "2-D"]),
    (dict(dropout_p=1.0), ValueError, ["dropout_p", "[0, 1)"]),
    (dict(dropout_p=-0.1), ValueError, ["dropout_p", "[0, 1)"]),
    (dict(weight=torch.randn(5, 6, dtype=torch.float16)), TypeError, ["weight", "must match x"]),
    (dict(bias=torch.randn(5, dtype=torch.float64)), TypeError, ["bias", "must match x"]),
    (dict(lora_B=torch.randn(5, 2, dtype=torch.float16)), TypeError, ["lora_A", "lora_B", "same dtype"]),
    (dict(x=torch.randn(4, 6).half(), weight=torch.randn(5, 6).half(), bias=None,
          lora_A=torch.randn(2, 6).bfloat16(), lora_B=torch.randn(5, 2).bfloat16()),
     TypeError, ["lora_A", "float32", "x's dtype"]),
    (dict(x=torch.randint(0, 3, (4, 6))), TypeError, ["x", "float32, float16 or bfloat16"]),
    (dict(x=[1.0]), TypeError, ["x", "torch.Tensor"]),
    (dict(scaling="1"), TypeError, ["scaling"]),
    (dict(scaling=float("nan")), ValueError, ["scaling", "finite"]),
    (dict(backend="cuda-magic"), ValueError, ["backend", "'torch'"]),
    (dict(weight=torch.randn(5, 6, device="meta")), ValueError, ["weight", "meta", "one device"]),
])
def test_bad_inputs(over, exc, words):
    with pytest.raises(exc) as e:
        call(**over)
    msg = str(e.value)
    for w in words:
        assert w in msg, f"error message {msg!r} lacks {w!r}"


def test_fp64_rejected_by_triton_with_reason():
    with pytest.raises(pk.BackendUnavailable, match="float32/float16/bfloat16"):
        call(x=torch.randn(4, 6).double(), weight=torch.randn(5, 6).double(), bias=None,
             lora_A=torch.randn(2, 6).double(), lora_B=torch.randn(5, 2).double(), backend="triton")


def test_module_hparam_errors():
    with pytest.raises(ValueError, match="r must be a positive int"):
        pk.LoRALinear(4, 4, r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        pk.LoRALinear(4, 4, lora_dropout=1.5)
    with pytest.raises(ValueError, match="init_lora_weights"):
        pk.LoRALinear(4, 4, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="backend"):
        pk.LoRALinear(4, 4, backend="cuda-magic")
    with pytest.raises(TypeError, match="nn.Linear"):
        pk.LoRALinear.from_linear(torch.nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="in_features=4"):
        pk.LoRALinear(4, 3)(torch.randn(2, 5))
