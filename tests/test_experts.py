"""LoRA on MoE expert weights (``target_parameters``): the grouped op against the per-assignment fp64 reference
(forward and every gradient, fp32/fp16/bf16, fp32 adapters on half weights, ranks 1 and 80, experts with no
tokens, dropped assignments), determinism, and transformers MoE models (Mixtral, Qwen3-MoE) against HF PEFT's
``target_parameters`` LoRA: outputs, gradients, AdamW steps, checkpoints both ways, merge / unload / disable,
errors that change nothing."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peft_kernels as pk
from peft_kernels import reference
from peft_kernels.nn.experts import LoRAExperts
from peft_kernels.ops.moe import grouped_lora_linear, moe_experts_forward

from helpers import assert_close, check_controls

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TP = ["experts.gate_up_proj", "experts.down_proj"]


def _routing(T, E, k, g):
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])  # expert E-1 gets no token
    idx[2, 1] = E  # transformers' "no expert" sentinel: counts nowhere
    w = torch.rand(T, k, generator=g)
    return idx, w / w.sum(-1, keepdim=True)


def _case(dtype, T=24, H=16, I=12, E=5, k=2, r=3, lora_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ldt = lora_dtype or dtype
    idx, w = _routing(T, E, k, g)
    t = dict(h=torch.randn(T, H, generator=g), w=w, Wgu=torch.randn(E, 2 * I, H, generator=g) / H ** 0.5,
             Wd=torch.randn(E, H, I, generator=g) / I ** 0.5,
             Agu=torch.randn(E, r, H, generator=g) / H ** 0.5, Bgu=torch.randn(E, 2 * I, r, generator=g) * 0.3,
             Ad=torch.randn(E, r, I, generator=g) / I ** 0.5, Bd=torch.randn(E, H, r, generator=g) * 0.3)
    out = {k_: (v.to(ldt) if k_[0] in "AB" else v.to(dtype)) for k_, v in t.items()}
    return out, idx


def _run(t, idx, dt, fn, gout):
    c = {k: (v.to(dt) if dt == torch.float64 else v).detach().clone().requires_grad_(k in ("h", "Agu", "Bgu",
                                                                                           "Ad", "Bd"))
         for k, v in t.items()}
    y = fn(c["h"], idx, c["w"], c["Wgu"], c["Wd"], F.silu, (c["Agu"], c["Bgu"], 0.75), (c["Ad"], c["Bd"], 2.0))
    names = ["h", "Agu", "Bgu", "Ad", "Bd"]
    return y.detach(), dict(zip(names, torch.autograd.grad(y, [c[n] for n in names], gout.to(y.dtype))))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,ranks,ldt", [
    pytest.param(d, r, l, id=f"{d}-r{r}-{'fp32 adapters' if l else 'same'}")
    for d in DTYPES for r in (1, 3, 80) for l in (None, torch.float32) if not (l and d == torch.float32)])
def test_experts_op_against_the_per_assignment_reference(dtype, ranks, ldt, backend):
    t, idx = _case(dtype, r=ranks, lora_dtype=ldt)
    gout = torch.randn(t["h"].shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref_y, ref_g = _run(t, idx, torch.float64, reference.moe_experts_ref, gout)
    same_y, same_g = _run(t, idx, dtype, reference.moe_experts_ref, gout)
    got_y, got_g = _run(t, idx, dtype, lambda *a: moe_experts_forward(*a[:5], act=a[5], gate_up_lora=a[6],
                                                                      down_lora=a[7], backend=backend), gout)
    # Triton's interpreter truncates fp32 → bf16 where a GPU rounds (helpers.assert_close): the bf16 gate_up
    # output and dH stored by one grouped GEMM feed the next, so their doubled rounding error compounds; 8× there
    # (the single-GEMM test below keeps 4×)
    mult = 8.0 if backend == "triton" and dtype == torch.bfloat16 else 4.0
    assert_close(got_y, ref_y, same_y, "y", mult)
    for n in ref_g:
        assert_close(got_g[n], ref_g[n], same_g[n], f"d{n}", mult)
    for n in ("Agu", "Bgu", "Ad", "Bd"):  # expert E-1 got no token: exactly zero gradient
        assert torch.count_nonzero(got_g[n][-1]) == 0


def test_experts_op_under_autocast():
    """Under CPU bf16 autocast the op computes as transformers' experts do there: each projection in bf16 (their
    ``F.linear``'s casts), the routed outputs summed into hidden's fp32. Output and every gradient against the fp64
    reference of the bf16-rounded inputs, within 4× the reference run in bf16; fp32 output and gradients. Before,
    it ran every GEMM in fp32 under autocast."""
    t, idx = _case(torch.float32)
    t["w"] = t["w"].to(torch.bfloat16).float()  # transformers' routing weights are bf16 under autocast
    gout = torch.randn(t["h"].shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rounded = {k: v.to(torch.bfloat16) for k, v in t.items()}
    ref_y, ref_g = _run(rounded, idx, torch.float64, reference.moe_experts_ref, gout)
    same_y, same_g = _run(rounded, idx, torch.bfloat16, reference.moe_experts_ref, gout)

    from torch.utils._python_dispatch import TorchDispatchMode

    gemm_dtypes = set()

    class Gemms(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                gemm_dtypes.add(args[-2].dtype if func.overloadpacket is torch.ops.aten.addmm else args[0].dtype)
            return func(*args, **(kwargs or {}))

    def amp(*a):
        with torch.autocast("cpu", dtype=torch.bfloat16), Gemms():
            return moe_experts_forward(*a[:5], act=a[5], gate_up_lora=a[6], down_lora=a[7], backend="torch")
    got_y, got_g = _run(t, idx, torch.float32, amp, gout)
    assert gemm_dtypes == {torch.bfloat16}, gemm_dtypes  # the forward's GEMMs (before: float32)
    assert got_y.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got_g.values())
    assert_close(got_y, ref_y, same_y, "y")
    for n in ref_g:
        assert_close(got_g[n], ref_g[n], same_g[n], f"d{n}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_grouped_gemm_on_strided_operands(dtype):
    """The Triton grouped GEMM reads every operand through its strides: x a column slice of a wider buffer, the
    expert stack stored [E, K, N] and viewed [E, N, K], A and B transposed views; rows past starts[-1] (dropped
    assignments) get a zero gradient; no LoRA (the frozen experts alone) too."""
    g = torch.Generator().manual_seed(7)
    E, K, N, r, M = 4, 37, 45, 5, 61
    starts = [0, 17, 17, 40, 58]  # expert 1 has no rows, rows 58..60 belong to none
    wide = torch.randn(M, 2 * K + 3, generator=g, dtype=torch.float64)
    Wt = torch.randn(E, K, N, generator=g, dtype=torch.float64) / 6
    At = torch.randn(E, K, r, generator=g, dtype=torch.float64) / 6
    Bt = torch.randn(E, r, N, generator=g, dtype=torch.float64)
    gy = torch.randn(M, N, generator=g, dtype=torch.float64)
    gy[58:] = 0

    def run(be, dt, lora=True):
        xw = wide.to(dt).requires_grad_()
        x = xw[:, 3:3 + 2 * K:2]  # stride (2K + 3, 2)
        A = At.to(dt).requires_grad_()
        B = Bt.to(dt).requires_grad_()
        args = (A.transpose(1, 2), B.transpose(1, 2), 0.6) if lora else ()
        y = grouped_lora_linear(x, starts, Wt.to(dt).transpose(1, 2), *args, backend=be)
        grads = torch.autograd.grad(y[:58], [xw, A, B] if lora else [xw], gy[:58].to(dt))
        return [y[:58].detach()] + list(grads)

    for lora in (True, False):
        ref, same, got = run("torch", torch.float64, lora), run("torch", dtype, lora), run("triton", dtype, lora)
        for n, a, b, c in zip(["y", "dx", "dA", "dB"], got, ref, same):
            assert_close(a, b, c, f"{n} lora={lora}")
        assert torch.count_nonzero(got[1][58:]) == 0
        if lora:
            assert torch.count_nonzero(got[2][1]) == 0 and torch.count_nonzero(got[3][1]) == 0


def test_grouped_op_is_deterministic_and_validates():
    t, idx = _case(torch.float32)
    outs = []
    for _ in range(2):
        _, g = _run(t, idx, torch.float32, lambda *a: moe_experts_forward(*a[:5], act=a[5], gate_up_lora=a[6],
                                                                         down_lora=a[7]), torch.ones(24, 16))
        outs.append(g)
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    x = torch.randn(6, 16)
    W, A, B = t["Wgu"], t["Agu"], t["Bgu"]
    with pytest.raises(ValueError, match="starts must be"):
        grouped_lora_linear(x, [0, 2, 1, 6, 6, 6], W, A, B)
    with pytest.raises(ValueError, match="starts must be"):
        grouped_lora_linear(x, [0, 2, 4, 6, 6, 9], W, A, B)
    with pytest.raises(ValueError, match="weight must be"):
        grouped_lora_linear(x, [0] * 6, W[:, :, :3], A, B)
    with pytest.raises(ValueError, match="lora_B must be"):
        grouped_lora_linear(x, [0] * 6, W, A, B[:, :, :1])
    with pytest.raises(ValueError, match="together"):
        grouped_lora_linear(x, [0] * 6, W, A, None)
    with pytest.raises(ValueError, match="exactly one of act"):
        moe_experts_forward(x, idx[:6], t["w"][:6], W, t["Wd"])


# ------------------------------------------------------------------------------------ models
def _model(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=6,
                                         num_experts_per_tok=2)
        return transformers.MixtralForCausalLM(cfg)
    cfg = transformers.Qwen3MoeConfig(vocab_size=100, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                      num_experts_per_tok=3, head_dim=8, decoder_sparse_step=1)
    return transformers.Qwen3MoeForCausalLM(cfg)


def _pair(kind, extra_modules=()):
    peft = pytest.importorskip("peft")
    base = _model(kind)
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(extra_modules),
                                                                  target_parameters=TP, init_lora_weights=False))
    return base, pm


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_peft_target_parameters_parity(kind, tmp_path):
    """A PEFT ``target_parameters`` adapter loaded into ours gives PEFT's outputs, gradients and AdamW steps; ours
    saved loads in PEFT with the same outputs."""
    base, pm = _pair(kind, extra_modules=["q_proj"])
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = copy.deepcopy(base)
    names = pk.load_peft_adapter(ours, str(tmp_path / "peft"))
    assert sum(isinstance(m, LoRAExperts) for m in ours.modules()) == 2 and len(names) == 4
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(7))
    pm.train()
    ours.train()
    pp = [p for p in pm.parameters() if p.requires_grad]
    po = [p for p in ours.parameters() if p.requires_grad]
    assert sum(p.numel() for p in pp) == sum(p.numel() for p in po)
    opt_p, opt_o = torch.optim.AdamW(pp, lr=1e-2), torch.optim.AdamW(po, lr=1e-2)
    for step in range(3):
        lp = pm(input_ids=ids, labels=ids).loss
        lo = ours(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-6)
        lp.backward()
        lo.backward()
        if step == 0:  # every expert gradient, in PEFT's layout
            for i in range(2):
                e = ours.model.layers[i].mlp.experts
                w = pm.base_model.model.model.layers[i].mlp.experts
                for name, wrapper in (("down_proj", w), ("gate_up_proj", w.base_layer)):
                    peft_like = e.peft_tensors("x")
                    nest = "" if name == "down_proj" else "base_layer."
                    gA = e.lora_A[name].grad.reshape(peft_like[f"x.{nest}lora_A.weight"].shape)
                    E = e.lora_A[name].shape[0]
                    gB = e.lora_B[name].grad.permute(1, 2, 0).reshape(e.lora_B[name].shape[1], -1)
                    torch.testing.assert_close(gA, wrapper.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
                    torch.testing.assert_close(gB, wrapper.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
                    assert E == e.base_layer.gate_up_proj.shape[0]
        opt_p.step()
        opt_o.step()
        opt_p.zero_grad()
        opt_o.zero_grad()
    pk.save_peft_adapter(ours, str(tmp_path / "ours"))
    peft = pytest.importorskip("peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    ours.eval()
    pm.eval()
    torch.testing.assert_close(back(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pm(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_inject_merge_unload_disable():
    base = _model("mixtral").eval()
    m = copy.deepcopy(base)
    torch.manual_seed(5)
    pk.inject_lora(m, [], target_parameters=TP, r=4, lora_alpha=8, init_lora_weights=False)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.mlp.experts.lora_{ab}.{p}" for i in (0, 1) for ab in "AB" for p in ("gate_up_proj",
                                                                                              "down_proj")}
    check_controls(m, base, torch.randint(0, 100, (2, 8)), LoRAExperts)


def test_module_on_the_triton_backend():
    """A Qwen3-MoE model injected with backend="triton" (the grouped GEMM kernels, under the interpreter): its loss
    and every LoRA gradient against the same model in fp64 (torch backend), bounded by the fp32 torch backend's
    error; backend is checked at construction."""
    base = _model("qwen3_moe")
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2))

    def run(dt, be):
        m = copy.deepcopy(base).to(dt)
        torch.manual_seed(5)
        pk.inject_lora(m, [], target_parameters=TP, r=4, lora_alpha=8, init_lora_weights=False, backend=be)
        assert all(e.backend == be for e in m.modules() if isinstance(e, LoRAExperts))
        loss = m(input_ids=ids, labels=ids).loss
        ps = [p for n, p in sorted(m.named_parameters()) if p.requires_grad]
        return [loss.detach()] + list(torch.autograd.grad(loss, ps))

    ref, same, got = run(torch.float64, "torch"), run(torch.float32, "torch"), run(torch.float32, "triton")
    assert len(got) == 9
    for i, (a, b, c) in enumerate(zip(got, ref, same)):
        assert_close(a, b, c, f"tensor {i}")
    with pytest.raises(ValueError, match="backend"):
        LoRAExperts(copy.deepcopy(base).model.layers[0].mlp.experts, ["gate_up_proj"], backend="gpu")


class _TransposedExperts(nn.Module):
    """An experts module whose layout LoRAExperts does not compute (GPT-OSS-style transposed weights)."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(2, 8, 12))
        self.down_proj = nn.Parameter(torch.zeros(2, 6, 8))
        self.is_transposed, self.has_gate, self.has_bias, self.is_concatenated = True, True, False, True
        self.has_post_expert_norm, self._is_expert_parallel = False, False


def test_errors_change_nothing(tmp_path):
    m = _model("mixtral")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="matched no parameter"):
        pk.inject_lora(m, [], target_parameters=["experts.nothing"])
    with pytest.raises(ValueError, match="lora_dropout"):
        pk.inject_lora(m, [], target_parameters=TP, lora_dropout=0.1)
    with pytest.raises(TypeError, match="target_parameters must be a list"):
        pk.inject_lora(m, [], target_parameters="experts.gate_up_proj")
    holder = nn.Module()
    holder.experts = _TransposedExperts()
    with pytest.raises(TypeError, match="is_transposed"):
        pk.inject_lora(holder, [], target_parameters=TP)
    assert all(not isinstance(x, LoRAExperts) for x in m.modules())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    # a PEFT checkpoint whose expert LoRA has the wrong shape: refused before anything changes
    base, pm = _pair("mixtral")
    pm.save_pretrained(str(tmp_path / "a"))
    from safetensors.torch import load_file, save_file

    f = tmp_path / "a" / "adapter_model.safetensors"
    sd = load_file(str(f))
    k = next(k for k in sd if k.endswith("experts.lora_A.weight"))
    sd[k] = sd[k][:-1]
    save_file(sd, str(f))
    target = copy.deepcopy(base)
    with pytest.raises(pk.CheckpointError, match="LoRA shapes"):
        pk.load_peft_adapter(target, str(tmp_path / "a"))
    assert not any(isinstance(x, LoRAExperts) for x in target.modules())
    with pytest.raises(ValueError, match="load_peft_adapter"):  # from_peft names the way that works
        pk.from_peft(pm)
