"""Every LoRA launch fills the machine (#16 item 2): the fused decode path (S inside the forward GEMM, dS inside
dX, dB inside the dA launch), the dY launch's N split, and the decode-tile and dA-tile rules. Values against the
fp64 reference (forward and every gradient), grids and launch lists from the launchers themselves."""
import pytest
import torch

import peft_kernels as pk
from peft_kernels import dispatch
from peft_kernels.reference import lora_linear_ref

from helpers import assert_close, count_launches
from test_lora_op import make_inputs, run_and_compare

pytestmark = pytest.mark.skipif(dispatch.unavailable_reason("triton", torch.device("cpu")) is not None,
                                reason=str(dispatch.unavailable_reason("triton", torch.device("cpu"))))

LORA = ["_shrink_kernel", "_fwd_gemm_kernel", "_bwd_dy_kernel", "_bwd_dx_kernel", "_bwd_da_kernel"]
HALF = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
# decode-bucket cases (M ≤ 64) the fused path takes: rank 1 and the largest rank tile (64), 3-D, really strided
# and transposed x, bias and none, odd sizes
FUSED = [
    pytest.param((1,), 37, 29, 1, True, "contig", id="M1-r1"),
    pytest.param((3, 11), 45, 31, 8, False, "strided", id="3d-strided-nobias"),
    pytest.param((5, 7), 33, 21, 4, True, "transposed", id="3d-transposed"),
    pytest.param((64,), 40, 70, 64, True, "contig", id="M64-r64"),
]


def _kernels():
    from peft_kernels.kernels import lora as KL

    return KL, [getattr(KL, n) for n in LORA]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("lead,K,N,r,bias,layout", FUSED)
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
def test_fused_decode_path(monkeypatch, dtype, lead, K, N, r, bias, layout, p):
    """Decode: 1 forward launch (2 with dropout: the shrink draws the mask) and 2 backward launches, and the
    output and every gradient match the fp64 reference."""
    KL, kernels = _kernels()
    t = make_inputs(lead, K, N, r, bias, layout, dtype)
    assert KL.fused_decode(t["x"].numel() // K, t["x"], t["A"], r, KL.configs(dtype, r))
    launches = count_launches(monkeypatch, kernels)
    run_and_compare("triton", t, scaling=0.75, p=p)
    fwd = ["_fwd_gemm_kernel"] if p == 0 else ["_shrink_kernel", "_fwd_gemm_kernel"]
    assert launches == fwd + ["_bwd_dx_kernel", "_bwd_da_kernel"], launches


@pytest.mark.parametrize("dtype", HALF)
def test_fused_decode_without_dx(monkeypatch, dtype):
    """x needs no grad: dS comes from the dY launch again, unsplit (only dX sums split partials); dA and dB right."""
    KL, kernels = _kernels()
    monkeypatch.setattr(KL, "program_budget", lambda device: 8)  # 1 row block: dX would have taken 5 splits
    t = make_inputs((9,), 41, 150, 6, True, "contig", dtype)
    A, B = t["A"].clone().requires_grad_(), t["B"].clone().requires_grad_()
    grids = []
    real = KL._bwd_dy_kernel.run
    monkeypatch.setattr(KL._bwd_dy_kernel, "run", lambda *a, **kw: grids.append(tuple(kw["grid"])) or real(*a, **kw))
    launches = count_launches(monkeypatch, kernels)
    pk.lora_linear(t["x"], t["W"], t["b"], A, B, 0.75, backend="triton").backward(t["dy"])
    assert launches == ["_fwd_gemm_kernel", "_bwd_dy_kernel", "_bwd_da_kernel"], launches
    assert grids == [(1, 1, 1)]  # without dX the dY launch does not split N (dA would sum the partials)

    def ref(dt):
        a, b = t["A"].to(dt).requires_grad_(), t["B"].to(dt).requires_grad_()
        lora_linear_ref(t["x"].to(dt), t["W"].to(dt), t["b"].to(dt), a, b, 0.75).backward(t["dy"].to(dt))
        return a.grad, b.grad

    (a64, b64), (alp, blp) = ref(torch.float64), ref(dtype)
    assert_close(A.grad, a64, alp, "dA", 4.0)
    assert_close(B.grad, b64, blp, "dB", 4.0)


@pytest.mark.parametrize("dtype", HALF + [pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("need_dx", [True, False], ids=["dx", "no-dx"])
def test_dy_launch_splits_n(monkeypatch, dtype, need_dx):
    """Fewer dY row programs than the machine's (3 row blocks, a budget of 8): the dY launch splits N (⌈8/3⌉ = 3
    wanted; 4 column blocks in equal spans of 2 → 2 partials of dS), which dX sums and stores for dA; without
    dX, or on an fp32 base, it does not split.
    Every gradient matches the fp64 reference."""
    KL, _ = _kernels()
    monkeypatch.setattr(KL, "program_budget", lambda device: 8)
    grids = []
    real = KL._bwd_dy_kernel.run
    monkeypatch.setattr(KL._bwd_dy_kernel, "run", lambda *a, **kw: grids.append(tuple(kw["grid"])) or real(*a, **kw))
    t = make_inputs((70,), 45, 100, 5, True, "strided", dtype)
    if need_dx:
        run_and_compare("triton", t, scaling=0.75, p=0.2)
    else:
        A, B = t["A"].clone().requires_grad_(), t["B"].clone().requires_grad_()
        pk.lora_linear(t["x"], t["W"], t["b"], A, B, 0.75, backend="triton").backward(t["dy"])
        for dt in (torch.float64, dtype):
            a, b = t["A"].to(dt).requires_grad_(), t["B"].to(dt).requires_grad_()
            lora_linear_ref(t["x"].to(dt), t["W"].to(dt), t["b"].to(dt), a, b, 0.75).backward(t["dy"].to(dt))
            if dt == torch.float64:
                a64, b64 = a.grad, b.grad
        assert_close(A.grad, a64, a.grad, "dA", 4.0)
        assert_close(B.grad, b64, b.grad, "dB", 4.0)
    assert grids == [(3, 1, 2 if need_dx and dtype != torch.float32 else 1)], grids


def test_rules_on_a_gpu_sized_machine(monkeypatch):
    """With 132 programs to fill: the fused-path truth table, the decode tile's columns, the dA tile and the dY
    N split at the Llama-3-8B shapes."""
    KL, _ = _kernels()
    monkeypatch.setattr(KL, "program_budget", lambda device: 132)
    dev = torch.device("cpu")
    bf = torch.bfloat16

    def fused(M, dt=bf, adt=None, r=16):
        cfg = KL.configs(dt, r, interpreted=False, adapter_dtype=adt, M=M)
        return KL.fused_decode(M, torch.empty(0, dtype=dt), torch.empty(0, dtype=adt or dt), r, cfg)

    assert fused(1) and fused(64) and fused(64, torch.float16) and fused(16, r=64)
    assert not fused(0) and not fused(65) and not fused(16, torch.float32) and not fused(16, adt=torch.float32)
    assert not fused(16, r=65)  # a rank above the GEMM's rank tile keeps the shrink and dY launches
    gemm = KL.configs(bf, 16, interpreted=False, M=1)["gemm"]
    assert (gemm.block_m, gemm.block_n) == (16, 32)
    assert KL._fill_cols(gemm, 1, 4096, dev).block_n == 16     # 128 programs at 32 wide → 256 at 16
    assert KL._fill_cols(gemm, 1, 14336, dev).block_n == 32    # 448 programs already
    assert KL._fill_cols(gemm, 64, 4096, dev).block_n == 32    # 4 row blocks × 128
    prefill = KL.configs(bf, 16, interpreted=False, M=4096)["gemm"]
    assert KL._fill_cols(prefill, 4096, 256, dev) == prefill   # 64 programs, but only decode tiles change
    da = KL.configs(bf, 16, interpreted=False)["da"]
    assert da.block_k == 64
    assert KL._fill_da(da, 4096, 4096, True, True, 1, dev).block_k == 32   # 64 + 64 → 128 + 64 programs
    assert KL._fill_da(da, 4096, 14336, True, True, 1, dev).block_k == 64  # 64 + 224 programs
    assert KL._fill_da(da, 64, 64, True, True, 1, dev).block_k == 16       # never below 16
    dy = KL.configs(bf, 16, interpreted=False)["dy"]
    P = KL.dy_programs(dev, 4096, dy.block_m, 1)
    # 64 × 3 = 192 programs: 64 column blocks in spans of ⌈64/3⌉ = 22 (1408 columns)
    assert P == 64 and KL.dy_splits(dev, 4096, 4096, P, dy.block_n, 1, bf) == (3, 1408)
    assert KL.dy_splits(dev, 4096, 4096, P, dy.block_n, 1, torch.float32) == (1, 4096)
    assert KL.dy_splits(dev, 16384, 4096, 132, dy.block_n, 1, bf) == (1, 4096)  # the row programs fill it
    assert KL.dy_splits(dev, 1, 4096, 1, dy.block_n, 1, bf) == (KL.MAX_DY_SPLITS, 256)
    assert KL.dy_splits(dev, 1, 100, 1, dy.block_n, 1, bf) == (2, 64)           # at most one per column block
    assert KL.dy_splits(dev, 0, 100, 0, dy.block_n, 1, bf) == (1, 100)
    for N in range(1, 300, 7):  # no empty split, and N covered
        splits, n_per = KL.dy_splits(dev, 64, N, 1, 16, 1, bf)
        assert (splits - 1) * n_per < N <= splits * n_per and n_per % 16 == 0


@pytest.mark.parametrize("dtype", HALF + [pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("path", ["bgmv", "sgmv"])
def test_multi_adapter_shrink_fills_the_machine(monkeypatch, dtype, path):
    """A budget of 64 programs: the BGMV shrink narrows its rank tile to 2 (6 tokens × 2 rank blocks), and the
    forward and every gradient still match the per-token reference (mixed ranks, -1 rows)."""
    import test_multi_lora_op as TM
    from peft_kernels.kernels import multi_lora as ML

    monkeypatch.setattr(ML, "program_budget", lambda device: 64)
    grids = []
    real = ML._bgmv_shrink_kernel.run
    monkeypatch.setattr(ML._bgmv_shrink_kernel, "run",
                        lambda *a, **kw: grids.append((tuple(kw["grid"]), kw["BLOCK_R"], kw["BLOCK_K"])) or real(*a, **kw))
    t = TM.make_inputs((6,), 45, 29, [4, 1, 3, 0, 4], 4, "mixed", True, "strided", dtype)
    TM.run_and_compare("triton", path, t)
    if path == "bgmv":
        active = int((t["ids"] >= 0).sum())
        assert grids and all(g == ((active, 2), 2, 256) for g in grids), grids  # 16 → 2 wide, K step 32 → 256


def test_multi_adapter_tile_rules_on_a_gpu_sized_machine(monkeypatch):
    """132 programs to fill: 32 adapters × 128 tokens take 16-row SGMV blocks (256 programs, not 128); a decode
    step of 32 tokens takes BGMV rank tile 2 (256 programs); batches that fill it keep their tiles."""
    from peft_kernels.kernels import multi_lora as ML
    from peft_kernels.ops.multi_lora import build_mapping

    monkeypatch.setattr(ML, "program_budget", lambda device: 132)
    cfg = ML.configs(torch.bfloat16, 16, interpreted=False)
    dev = torch.device("cpu")

    def mapping(counts):
        ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        return build_mapping(ids, ids.numel(), len(counts))

    assert cfg["sgmv_shrink"].m == 32 and cfg["bgmv_shrink"].r == 16
    assert ML.fill_shrink("sgmv", cfg["sgmv_shrink"], mapping([128] * 32), 16, dev).m == 16
    assert ML.fill_shrink("sgmv", cfg["sgmv_shrink"], mapping([256] * 32), 16, dev).m == 32  # 256 programs
    assert ML.fill_shrink("sgmv", cfg["sgmv_shrink"], mapping([8] * 4), 16, dev).m == 16      # never below 16
    c = ML.fill_shrink("bgmv", cfg["bgmv_shrink"], mapping([1] * 32), 16, dev)
    assert (c.r, c.k) == (2, 2048)
    assert ML.fill_shrink("bgmv", cfg["bgmv_shrink"], mapping([1] * 200), 16, dev) == cfg["bgmv_shrink"]


def test_ia3_decode_tile(monkeypatch):
    """(IA)³ at M ≤ 64 (16-bit) takes the decode tile: 16×32×128, narrowed to 16 columns where 32 leave fewer
    programs than 132 SMs; fp32 and prefill keep their tiles."""
    from peft_kernels.kernels import ia3 as I
    from peft_kernels.kernels import lora as KL

    monkeypatch.setattr(I, "INTERPRETED", False)
    monkeypatch.setattr(KL, "program_budget", lambda device: 132)  # (IA)³ takes LoRA's decode tile and fill rule
    bf = torch.bfloat16
    assert I._config(bf, False, False, 1, 4096) == (16, 16, 128, 2, 3)     # 128 programs at 32 → 256 at 16
    assert I._config(bf, True, False, 64, 4096) == (16, 32, 128, 2, 3)     # 4 row blocks × 128
    assert I._config(bf, False, True, 16, 14336) == (16, 32, 128, 2, 3)    # 448 programs
    assert I._config(bf, False, False, 65, 4096) == (128, 128, 32, 8, 3)   # mid: the prefill tile
    assert I._config(torch.float32, False, False, 1, 4096) == (32, 64, 32, 8, 3)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("activation", ["gelu_tanh", "silu"])
def test_parallel_adapter_dy_launch_splits_n(monkeypatch, dtype, activation):
    """The parallel bottleneck adapter with dX: its dY launch splits N (3 row blocks, a budget of 8 → 2 partials
    of dP, each with act' applied), its dX GEMM sums them and stores dP for the dD programs; the output and every
    gradient (x, D, b_d, U, b_u, a learned scale) match the fp64 reference."""
    import test_bottleneck as TB
    from peft_kernels.kernels import lora as KL
    from peft_kernels.reference import adapter_linear_ref

    monkeypatch.setattr(KL, "program_budget", lambda device: 8)
    grids = []
    real = KL._bwd_dy_kernel.run
    monkeypatch.setattr(KL._bwd_dy_kernel, "run", lambda *a, **kw: grids.append(tuple(kw["grid"])) or real(*a, **kw))
    t = TB.make((70,), 45, 100, 6, "parallel", "learned", dtype)
    names = ["x", "D", "db", "U", "ub", "s"]

    def fn(v):
        return pk.adapter_linear(v["x"], t["W"], t["bias"], v["D"], v["db"], v["U"], v["ub"], v["s"],
                                 activation=activation, mode="parallel", backend="triton")

    def ref(v, dt):
        return adapter_linear_ref(v["x"], t["W"].to(dt), t["bias"].to(dt), v["D"], v["db"], v["U"], v["ub"],
                                  activation, v["s"], "parallel")

    TB.run(fn, ref, t, names, dtype, mult=8.0, triton=True)
    assert grids == [(3, 1, 2)], grids


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode,lead,b", [("parallel", (9,), 6), ("sequential", (9,), 6), ("standalone", (3, 3), 6),
                                         ("sequential", (70,), 6), ("parallel", (9,), 130)],
                         ids=["parallel-decode", "sequential-decode", "standalone-decode", "sequential-mid",
                              "parallel-decode-b130"])
def test_adapter_launches_fill_the_machine(monkeypatch, dtype, mode, lead, b):
    """A budget of 8 programs. The adapter's shrink at decode splits K (1 row program → 2 partials of x·Dᵀ) and its
    last split to arrive sums them in order before b_d and the activation; the dY launch splits N (partials of dP)
    and its last split to arrive sums them into dP (REDUCE) for every reader. A bottleneck of 130 (rank tiles of
    128) keeps one split in both. Output and every gradient (x, D, b_d,
    U, b_u, a learned scale) against the fp64 reference; the arrival counters are back at 0; a second call is
    bitwise equal (a fixed order)."""
    import test_bottleneck as TB
    from peft_kernels.kernels import bottleneck as BN
    from peft_kernels.kernels import lora as KL
    from peft_kernels.reference import adapter_linear_ref, bottleneck_ref

    monkeypatch.setattr(KL, "program_budget", lambda device: 8)
    seen = {}
    for k in (BN._adapter_shrink_kernel, KL._bwd_dy_kernel):
        real = k.run
        monkeypatch.setattr(k, "run", lambda *a, _r=real, _n=k.__name__, **kw:
                            seen.setdefault(_n, []).append((tuple(kw["grid"]), kw.get("REDUCE", kw.get("SPLIT_K"))))
                            or _r(*a, **kw))
    K, N = (45, 45) if mode == "standalone" else (45, 100)
    t = TB.make(lead, K, N, b, "parallel" if mode == "standalone" else mode, "learned", dtype)
    names = ["x", "D", "db", "U", "ub", "s"]

    def fn(v):
        if mode == "standalone":
            return pk.bottleneck_adapter(v["x"], v["D"], v["db"], v["U"], v["ub"], v["s"], activation="gelu",
                                         residual=True, backend="triton")
        return pk.adapter_linear(v["x"], t["W"], t["bias"], v["D"], v["db"], v["U"], v["ub"], v["s"],
                                 activation="gelu", mode=mode, backend="triton")

    def ref(v, dt):
        if mode == "standalone":
            return v["x"] + bottleneck_ref(v["x"], v["D"], v["db"], v["U"], v["ub"], "gelu", v["s"])
        return adapter_linear_ref(v["x"], t["W"].to(dt), t["bias"].to(dt), v["D"], v["db"], v["U"], v["ub"],
                                  "gelu", v["s"], mode)

    TB.run(fn, ref, t, names, dtype, mult=8.0, triton=True)
    rows = -(-t["x"].numel() // K // 32)  # the interpreter's 32-row tiles
    if b > 32:  # rank tiles above 32 keep one split (their split variants spilled registers)
        assert seen == {"_adapter_shrink_kernel": [((rows, 2, 1), False)], "_bwd_dy_kernel": [((rows, 2, 1), False)]}
    else:
        if mode != "sequential":  # the shrink (the sequential down projection is inside its GEMM)
            assert (rows, 1, 2) in [g for g, split in seen["_adapter_shrink_kernel"] if split], seen
        assert [(g[:2], g[2] > 1, red) for g, red in seen["_bwd_dy_kernel"]][-1] == ((rows, 1), True, True), seen
    assert not BN._COUNTERS[("cpu", 0)].any()
    leaves = {k: t[k].clone().requires_grad_() for k in names}
    outs = []
    for _ in range(2):
        y = fn(leaves)
        outs.append([y.detach(), *torch.autograd.grad(y, list(leaves.values()), t["dy"])])
    assert all(torch.equal(a, b) for a, b in zip(*outs))
