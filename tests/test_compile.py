"""torch.compile(fullgraph=True) of a model with every fused layer runs on CPU with no graph breaks and
matches eager, forward and gradients. (Inductor compiles C++ here: one model, compiled once.)"""
import copy

import pytest
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
    """With dropout on (training), the compiled LoRA path is a custom op taking a seed drawn in the graph: still
    one graph, and its statistics are dropout's (about p of the LoRA input dropped, survivors scaled by 1/(1-p))."""
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


def _train_step(fn, x, ids=None):
    x = x.clone().requires_grad_()
    torch.manual_seed(123)  # the seed the dropout draws (in the graph under aot_eager: torch's eager RNG)
    y = fn(x) if ids is None else fn(x, ids)
    y.square().sum().backward()
    return y.detach(), x.grad


def test_compiled_dropout_keeps_the_regenerable_mask():
    """Under torch.compile, LoRA dropout and per-adapter multi-LoRA dropout run as custom ops that take the seed
    (issue #18): the compiled training step equals eager's (same seed, same mask, same gradients), with no graph
    break and no mask saved for backward."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    pk.inject_lora(net, ["0"], r=4, lora_alpha=8, lora_dropout=0.25, init_lora_weights=False)
    net[2] = pk.MultiLoRALinear.from_linear(net[2], max_adapters=3, max_rank=4, lora_dropout=0.3)
    g = torch.Generator().manual_seed(1)
    net[2].set_adapter(0, torch.randn(4, 32, generator=g), torch.randn(8, 4, generator=g), 0.5, dropout=0.5)
    net[2].set_adapter(2, torch.randn(2, 32, generator=g), torch.randn(8, 2, generator=g), 2.0)
    net.train()

    class Wrap(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def forward(self, x, ids):
            return self.n[2](self.n[1](self.n[0](x)), ids)

    model = Wrap(net)
    x = torch.randn(7, 16)
    ids = torch.tensor([0, 2, -1, 1, 0, 2, 0])
    explain = torch._dynamo.explain(model)(x, ids)
    assert explain.graph_break_count == 0, [str(b.reason)[:300] for b in explain.break_reasons]
    torch._dynamo.reset()
    y_e, dx_e = _train_step(model, x, ids)
    gA = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    y_c, dx_c = _train_step(torch.compile(model, backend="aot_eager", fullgraph=True), x, ids)
    gC = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    # the truth: the same step in fp64 with the same seed (the masks depend on the seed and indices only); compiled
    # within 4× eager fp32's error of it (the two sum in other orders)
    m64 = copy.deepcopy(model).double()
    m64.zero_grad()
    y64, dx64 = _train_step(m64, x.double(), ids)
    assert_close(y_c, y64, y_e, "y")
    assert_close(dx_c, dx64, dx_e, "dx")
    for n, p in m64.named_parameters():
        if p.requires_grad:
            assert_close(gC[n], p.grad, gA[n], n)
    # and the masks are dropout's: without the seed fixed, two compiled steps differ
    model.zero_grad()
    torch._dynamo.reset()
    cm = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert not torch.equal(cm(x, ids), cm(x, ids))


def test_compiled_with_eager_rng_draws_eager_dropout():
    """``torch.compile(model, options=EAGER_RNG)`` (the bench's and README's advice for a model's own ``nn.Dropout``
    under inductor): the compiled training step draws the same masks as eager, the model's dropout and our LoRA
    dropout's seed alike, so it equals eager (against fp64, within 4× eager fp32's error); inductor's default RNG
    draws other masks (this check can fail), and the option does not change inductor's global config."""
    import torch._inductor.config as inductor_config

    from peft_kernels.bench.model import EAGER_RNG

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.3), nn.ReLU(), nn.Linear(32, 8))
    pk.inject_lora(net, ["0", "3"], r=4, lora_alpha=8, lora_dropout=0.25, init_lora_weights=False)
    net.train()
    x = torch.randn(9, 16)
    y_e, dx_e = _train_step(net, x)
    g_e = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    net.zero_grad()
    torch._dynamo.reset()
    y_c, dx_c = _train_step(torch.compile(net, options=EAGER_RNG), x)
    g_c = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    assert inductor_config.fallback_random is False
    m64 = copy.deepcopy(net).double()
    m64.zero_grad()
    y64, dx64 = _train_step(m64, x.double())
    assert_close(y_c, y64, y_e, "y")
    assert_close(dx_c, dx64, dx_e, "dx")
    for n, p in m64.named_parameters():
        if p.requires_grad:
            assert_close(g_c[n], p.grad, g_e[n], n)
    torch._dynamo.reset()
    y_d, _ = _train_step(torch.compile(net), x)  # inductor's own RNG: other masks
    assert not torch.allclose(y_d, y_e)


def test_custom_ops_pass_opcheck():
    from peft_kernels.ops import _compiled as C

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g, requires_grad=True)
    W, b = torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    A = torch.randn(3, 8, generator=g, requires_grad=True)
    seed = torch.tensor([42])
    torch.library.opcheck(C.lora_dropout_shrink, (x, A, 0.2, seed))
    A3 = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    B3 = torch.randn(2, 5, 3, generator=g, requires_grad=True)
    args = (x, W, b, A3, B3, torch.tensor([1.0, 0.5]), torch.tensor([3, 2], dtype=torch.int32),
            torch.tensor([0, 1, -1, 1, 0, 0]), [0.1, 0.0], seed, "torch", "auto")
    torch.library.opcheck(C.multi_lora_fwd, args)
    torch.library.opcheck(C.multi_lora_fwd, args[:8] + ([], seed, "torch", "auto"))
    Ae = torch.randn(2, 3, 10, generator=g, requires_grad=True)
    Be = torch.randn(2, 4, 3, generator=g, requires_grad=True)
    ids = torch.randint(0, 10, (2, 3), generator=g)
    torch.library.opcheck(C.multi_lora_embedding_fwd, (ids, torch.randn(10, 4, generator=g), Ae, Be,
                                                       torch.tensor([1.0, 2.0], dtype=torch.float64),
                                                       torch.tensor([3, 1], dtype=torch.int32),
                                                       torch.tensor([[0, 1, -1], [1, 1, 0]]), 2))


def test_multi_lora_embedding_compiles_without_breaks():
    """MultiLoRAEmbedding under torch.compile is one custom op (its grouping's host reads stay inside): no graph
    break, and outputs and slot gradients equal eager's (padding rows included)."""
    torch.manual_seed(0)
    emb = pk.MultiLoRAEmbedding.from_embedding(nn.Embedding(20, 8, padding_idx=3), max_adapters=3, max_rank=4)
    g = torch.Generator().manual_seed(1)
    emb.set_adapter(0, torch.randn(4, 20, generator=g), torch.randn(8, 4, generator=g), 1.5)
    emb.set_adapter(2, torch.randn(2, 20, generator=g), torch.randn(8, 2, generator=g), 0.5)
    ids = torch.randint(0, 20, (3, 5), generator=g)
    ids[0, 1] = 3
    aid = torch.tensor([0, -1, 2])
    explain = torch._dynamo.explain(emb)(ids, aid)
    assert explain.graph_break_count == 0, [str(b.reason)[:300] for b in explain.break_reasons]
    torch._dynamo.reset()
    ye = emb(ids, aid)
    ye.square().sum().backward()
    ga, gb = emb.lora_A.grad.clone(), emb.lora_B.grad.clone()
    emb.zero_grad()
    yc = torch.compile(emb, fullgraph=True)(ids, aid)
    yc.square().sum().backward()
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(emb.lora_A.grad, ga)
    torch.testing.assert_close(emb.lora_B.grad, gb)
    assert ga[1].abs().sum() == 0 and ga[0, :, 3].abs().sum() == 0  # unused slot; the padding row


class _Served(nn.Module):
    """Two multi-adapter layers whose ids come from an adapter_ids block (as a transformers model's would)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = pk.MultiLoRALinear(24, 24, max_adapters=3, max_rank=4)
        self.b = pk.MultiLoRALinear(24, 16, max_adapters=3, max_rank=4)
        g = torch.Generator().manual_seed(1)
        for layer in (self.a, self.b):
            for s, r in ((0, 4), (1, 2), (2, 3)):
                layer.set_adapter(s, torch.randn(r, layer.in_features, generator=g),
                                  torch.randn(layer.out_features, r, generator=g), 0.5 + s)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _served_eager(model, x, ids):
    return model.b(torch.relu(model.a(x, ids)), ids)


def test_adapter_ids_block_compiles_without_graph_breaks_per_thread():
    """The ids of an ``adapter_ids`` block reach the compiled layers (no ContextVar read in the graph): no graph
    break, one compile for every block, the block's own ids in each thread, and a refusal outside any block."""
    import asyncio
    import threading

    from torch._dynamo.testing import CompileCounterWithBackend

    model = _Served().eval()
    x = torch.randn(4, 5, 24)
    all_ids = [torch.tensor([0, 2, -1, 1]), torch.tensor([2, 2, 0, 1]), torch.tensor([1, -1, -1, 0])]
    with torch.no_grad():
        want = [_served_eager(model, x, ids) for ids in all_ids]
        torch._dynamo.reset()
        with pk.adapter_ids(model, all_ids[0]):
            ex = torch._dynamo.explain(model)(x)
        assert ex.graph_break_count == 0, [str(b.reason)[:300] for b in ex.break_reasons]
        torch._dynamo.reset()
        cnt = CompileCounterWithBackend("eager")
        cm = torch.compile(model, backend=cnt, fullgraph=True)
        for ids, w in zip(all_ids, want):
            with pk.adapter_ids(model, ids):
                assert torch.equal(cm(x), w)
        assert cnt.frame_count == 1  # a new block is not a new graph
        # two threads, both blocks open at once: each sees its own ids
        got, barrier = {}, threading.Barrier(2)

        def serve(k):
            with torch.no_grad(), pk.adapter_ids(model, all_ids[k]):
                barrier.wait()
                got[k] = cm(x)
                barrier.wait()
        ts = [threading.Thread(target=serve, args=(k,)) for k in (1, 2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])

        # two asyncio tasks with blocks open at once on one thread: the compiled layers refuse, never mix ids
        async def task(k, started, go, out):
            with pk.adapter_ids(model, all_ids[k]):
                started.set()
                await go.wait()
                try:
                    out[k] = cm(x)
                except Exception as e:  # noqa: BLE001
                    out[k] = e

        async def main():
            s1, s2, go, out = asyncio.Event(), asyncio.Event(), asyncio.Event(), {}
            t1 = asyncio.create_task(task(1, s1, go, out))
            t2 = asyncio.create_task(task(2, s2, go, out))
            await s1.wait()
            await s2.wait()
            go.set()
            await asyncio.gather(t1, t2)
            return out
        out = asyncio.run(main())
        for k in (1, 2):
            assert isinstance(out[k], Exception) or torch.equal(out[k], want[k]), k
        assert isinstance(out[1], Exception)  # both blocks were open when task 1 ran
        # once the blocks are closed, a fresh block works again
        with pk.adapter_ids(model, all_ids[0]):
            assert torch.equal(cm(x), want[0])


def test_compiled_layers_refuse_without_an_adapter_ids_block():
    model = _Served().eval()
    torch._dynamo.reset()
    try:
        for fullgraph in (True, False):
            with torch.no_grad(), pytest.raises(Exception, match="adapter"):
                torch.compile(model, backend="eager", fullgraph=fullgraph)(torch.randn(2, 3, 24))
    finally:
        torch._dynamo.reset()
