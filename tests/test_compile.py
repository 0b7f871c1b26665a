"""torch.compile(fullgraph=True) of a model with every fused layer runs on CPU with no graph breaks and
matches eager, forward and gradients. (Inductor compiles C++ here: one model, compiled once.)"""
import torch
import torch.nn as nn

import peft_kernels as pk

from helpers import assert_close


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(24, 24)
        self.seq = nn.Linear(24, 24)
        self.par = nn.Linear(24, 24)
        self.ada = pk.BottleneckAdapter(24, bottleneck_size=5, activation="gelu", scaling="learned", init="mam")
        self.multi = nn.Linear(24, 16)

    def forward(self, x, ids):
        h = torch.relu(self.q(x))
        h = self.ada(self.par(self.seq(h)))
        return self.multi(h, ids)


def build():
    torch.manual_seed(0)
    net = Net()
    pk.inject_lora(net, ["q"], r=4, lora_alpha=8, init_lora_weights=False)
    net.seq = pk.AdapterLinear.from_linear(net.seq, bottleneck_size=4, activation="silu", mode="sequential",
                                           scaling="channel")
    net.par = pk.AdapterLinear.from_linear(net.par, bottleneck_size=3, activation="tanh", mode="parallel")
    net.multi = pk.MultiLoRALinear.from_linear(net.multi, max_adapters=3, max_rank=4)
    g = torch.Generator().manual_seed(1)
    for a, r in ((0, 4), (2, 2)):
        net.multi.set_adapter(a, torch.randn(r, 24, generator=g), torch.randn(16, r, generator=g), 0.5 + a)
    with torch.no_grad():  # padding past slot 2's rank that must count nowhere (not zeroed as set_adapter does)
        net.multi.lora_A[2, 2:] = 5.0
        net.multi.lora_B[2, :, 2:] = -3.0
    with torch.no_grad():
        for m in (net.seq, net.par, net.ada):
            up = m.adapter_up
            up.weight.normal_(generator=g)
    return net


def test_compiled_model_has_no_graph_breaks_and_matches_eager():
    x = torch.randn(2, 5, 24)
    ids = torch.tensor([[0, 2, -1, 1, 0], [2, 2, 0, -1, 1]])
    eager = build()
    ref = eager(x, ids)
    net64 = build().double()  # the same net in fp64: the truth
    ref64 = net64(x.double(), ids)
    ref64.square().mean().backward()
    ref.square().mean().backward()
    explain = torch._dynamo.explain(build())(x, ids)
    assert explain.graph_break_count == 0, [str(b.reason)[:300] for b in explain.break_reasons]
    torch._dynamo.reset()
    compiled_net = build()
    out = torch.compile(compiled_net, fullgraph=True)(x, ids)
    assert_close(out, ref64.detach(), ref, "compiled output (eager fp32 the baseline)")
    out.square().mean().backward()
    grads = {n: p.grad for n, p in compiled_net.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    truth = dict(net64.named_parameters())
    for n, p in eager.named_parameters():
        if p.requires_grad:
            assert_close(grads[n], truth[n].grad, p.grad, f"d{n} (eager fp32 the baseline)")


def test_lora_dropout_in_training_traces_without_breaks():
    """With dropout on (training), the compiled LoRA path uses in-graph dropout: still one graph, and its
    statistics are dropout's (about p of the LoRA input dropped, survivors scaled by 1/(1-p))."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    pk.inject_lora(net, ["0", "2"], r=4, lora_alpha=8, lora_dropout=0.25, init_lora_weights=False)
    net.train()
    explain = torch._dynamo.explain(net)(torch.randn(5, 16))
    assert explain.graph_break_count == 0, [str(b.reason)[:300] for b in explain.break_reasons]
    layer = net[0]
    x = torch.ones(4000, 16)
    with torch.no_grad():
        lora = torch.compile(lambda t: layer(t), backend="eager", fullgraph=True)(x) - nn.functional.linear(
            x, layer.weight, layer.bias)
    # with x = 1 the LoRA output is scaling·B·A·mask·1/(1-p): its mean over rows is the undropped value
    full = (layer.lora_B @ layer.lora_A @ torch.ones(16)) * layer.scaling
    assert torch.allclose(lora.mean(0), full, rtol=0.1, atol=0.05 * full.abs().max().item())
    assert not torch.allclose(lora[0], lora[1])  # rows get different masks
