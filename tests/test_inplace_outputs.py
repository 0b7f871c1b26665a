"""Every layer's output may be modified in place, as ``nn.Linear``'s / ``nn.Embedding``'s may (``out += residual``,
``nn.ReLU(inplace=True)``, ``q *= scale``, a slice update), and the gradients then equal those of the same edit
made out of place. autograd forbids modifying in place a view made inside a custom Function; our Functions used to
return ``y2d.view(...)`` and every LoRA layer raised on ``y.mul_(2)``. And an empty batch works as it does for
``nn.Linear``."""
import pytest
import torch
import torch.nn as nn

import peft_kernels as pk


def _lin(K=24, N=20, bias=True):
    torch.manual_seed(0)
    return nn.Linear(K, N, bias=bias)


def _lora(**kw):
    return pk.LoRALinear.from_linear(_lin(), r=4, init_lora_weights=False, **kw)


def _multi(backend):
    m = pk.MultiLoRALinear.from_linear(_lin(), max_adapters=2, max_rank=4, backend=backend)
    g = torch.Generator().manual_seed(1)
    for s in range(2):
        m.set_adapter(s, torch.randn(4, 24, generator=g) / 5, torch.randn(20, 4, generator=g), 0.5 + s)
    return m


def _embedding(multi: bool):
    torch.manual_seed(0)
    emb = nn.Embedding(30, 20)
    if not multi:
        return pk.LoRAEmbedding.from_embedding(emb, r=4, init_lora_weights=False)
    m = pk.MultiLoRAEmbedding.from_embedding(emb, max_adapters=2, max_rank=4)
    g = torch.Generator().manual_seed(1)
    for s in range(2):
        m.set_adapter(s, torch.randn(4, 30, generator=g), torch.randn(20, 4, generator=g), 0.5 + s)
    return m


def _quantized():
    bnb = pytest.importorskip("bitsandbytes")
    lin = _lin()
    q = bnb.nn.Linear4bit(24, 20, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    return q.to("cpu")


LAYERS = {
    "lora torch": lambda: _lora(backend="torch"),
    "lora torch dropout": lambda: _lora(backend="torch", lora_dropout=0.2),
    "lora triton": lambda: _lora(backend="triton"),
    "dora torch": lambda: _lora(backend="torch", use_dora=True),
    "dora triton": lambda: _lora(backend="triton", use_dora=True),
    "ia3 torch": lambda: pk.IA3Linear.from_linear(_lin(), init_ia3_weights=False, backend="torch"),
    "ia3 triton": lambda: pk.IA3Linear.from_linear(_lin(), init_ia3_weights=False, backend="triton"),
    "adapter sequential": lambda: pk.AdapterLinear.from_linear(_lin(), bottleneck_size=6, mode="sequential"),
    "adapter parallel triton": lambda: pk.AdapterLinear.from_linear(_lin(), bottleneck_size=6, mode="parallel",
                                                                    backend="triton"),
    "bottleneck": lambda: pk.BottleneckAdapter(24, bottleneck_size=6),
    "packed": lambda: pk.PackedLoRALinear(_lin(), {"q": 12, "v": 8}, r=4, init_lora_weights=False),
    "multi torch": lambda: _multi("torch"),
    "multi triton": lambda: _multi("triton"),
    "qlora": lambda: pk.LoRALinear.from_linear(_quantized(), r=4, init_lora_weights=False),
    "qlora dropout": lambda: pk.LoRALinear.from_linear(_quantized(), r=4, lora_dropout=0.2, init_lora_weights=False),
    "qia3": lambda: pk.IA3Linear.from_linear(_quantized(), init_ia3_weights=False),
    "qmulti": lambda: _qmulti(),
    "embedding": lambda: _embedding(False),
    "multi embedding": lambda: _embedding(True),
}


def _qmulti():
    m = pk.MultiLoRALinear.from_linear(_quantized(), max_adapters=2, max_rank=4)
    g = torch.Generator().manual_seed(1)
    for s in range(2):
        m.set_adapter(s, torch.randn(4, 24, generator=g) / 5, torch.randn(20, 4, generator=g), 0.5 + s)
    return m


def _run(m, x, edit: str, inplace: bool):
    """Forward, the edit (in place or not), backward against a fixed dY; returns the output and every gradient."""
    torch.manual_seed(7)  # the same dropout seed in both runs
    xx = x.detach().clone().requires_grad_(x.is_floating_point())
    multi = isinstance(m, (pk.MultiLoRALinear, pk.MultiLoRAEmbedding))
    y = m(xx, adapter_ids=torch.tensor([1, 0, -1, 1, 0][: xx.shape[0]])) if multi else m(xx)
    if edit == "scale":
        y = y.mul_(2.0) if inplace else y * 2.0
    elif edit == "slice":
        if inplace:
            y[..., :3] += 1.0
        else:
            y = torch.cat([y[..., :3] + 1.0, y[..., 3:]], dim=-1)
    else:  # relu, as nn.ReLU(inplace=True)
        y = torch.relu_(y) if inplace else torch.relu(y)
    params = [p for p in m.parameters() if p.requires_grad]
    ins = ([xx] if xx.requires_grad else []) + params
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)
    return [y.detach()] + list(torch.autograd.grad(y, ins, gy))


@pytest.mark.parametrize("edit", ["scale", "slice", "relu"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_output_modified_in_place_has_the_out_of_place_gradients(layer, edit):
    m = LAYERS[layer]().train()
    if "embedding" in layer:
        x = torch.randint(0, 30, (5, 3))
    else:  # 3-D and strided: a column slice of a wider buffer
        x = torch.randn(5, 3, 40, generator=torch.Generator().manual_seed(2))[..., 4:28]
    want = _run(m, x, edit, inplace=False)
    got = _run(m, x, edit, inplace=True)
    assert len(got) == len(want) >= 3  # the output, and the gradients of x and/or the adapter's parameters
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda s: f"{layer}, tensor {i}: {s}")


@pytest.mark.parametrize("shape", [(0,), (2, 0)], ids=["0 tokens", "2x0 tokens"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_empty_batch_as_nn_linear(layer, shape):
    """No tokens is a valid batch, as for nn.Linear / nn.Embedding: an empty output of the right shape, and a
    backward that gives zero gradients (LoRAEmbedding's backward used to fail on it)."""
    m = LAYERS[layer]().train()
    if "embedding" in layer:
        x = torch.randint(0, 30, shape)
        n = m.embedding_dim
    else:
        x = torch.randn(*shape, 24, requires_grad=True)
        n = m.out_features if hasattr(m, "out_features") else 24
    multi = isinstance(m, (pk.MultiLoRALinear, pk.MultiLoRAEmbedding))
    y = m(x, adapter_ids=torch.zeros(shape[0], dtype=torch.long)) if multi else m(x)
    assert tuple(y.shape) == (*shape, n)
    params = [p for p in m.parameters() if p.requires_grad]
    if y.requires_grad:  # (a frozen table with no adapter rows: no graph, as nn.Embedding's)
        ins = ([x] if x.requires_grad else []) + params
        for g, t in zip(torch.autograd.grad(y.sum(), ins, allow_unused=True), ins):
            assert g is None or (g.shape == t.shape and not g.any())
