"""multi_lora_linear, every backend and kernel path against the per-token reference loop:
forward and all gradients, adapter-popularity patterns, -1 rows, the last slot, mixed true ranks."""
import math

import pytest
import torch
import torch.nn.functional as F

import peft_kernels as pk
from peft_kernels import _ext, dispatch
from peft_kernels.ops.multi_lora import SUPPORTED, build_mapping, choose_path
from peft_kernels.reference import expand_adapter_ids, multi_lora_linear_ref

from helpers import (arg, assert_close, backend_params, cpu_isa, dtype_params, isa_params,  # noqa: F401
                     spy_triton_launches)


def variants():
    """(backend, path, use the C++ extension) for every way the op can run here."""
    out = []
    for p in backend_params(supported=SUPPORTED):
        name = p.values[0]
        if name == "torch":
            ext_marks = list(p.marks) + ([] if _ext.available() else
                                         [pytest.mark.skip(reason=f"extension: {_ext.unavailable_reason()}")])
            out.append(pytest.param(("torch", "auto", True), id="torch-ext", marks=ext_marks))
            out.append(pytest.param(("torch", "auto", False), id="torch-noext", marks=p.marks))
        else:
            out += [pytest.param((name, path, True), id=f"{name}-{path}", marks=p.marks) for path in ("bgmv", "sgmv")]
        if name == "torch":  # the "cuda" backend's Python side with the CPU twins of the CUDA kernels
            out += [pytest.param(("cuda-on-cpu", path, True), id=f"cuda-on-cpu-{path}", marks=ext_marks)
                    for path in ("bgmv", "sgmv")]
    return out


@pytest.fixture
def variant(request, monkeypatch):
    backend, path, ext = request.param
    if not ext:
        monkeypatch.setenv("PEFT_KERNELS_DISABLE_EXT", "1")
    if backend == "cuda-on-cpu":
        # dispatch lets "cuda" run on CPU tensors: the gather ops then run their csrc/cpu implementations,
        # so the backend's orchestration (and those kernels) is tested here; real CUDA runs as "cuda-*"
        monkeypatch.setattr(dispatch, "cuda_unavailable_reason", lambda device: None)
        backend = "cuda"
    return backend, path


def pattern_ids(name: str, T: int, S: int, g: torch.Generator) -> torch.Tensor:
    """Punica's adapter-popularity patterns (plus -1 rows)."""
    if name == "distinct":      # every token its own adapter (needs S ≥ T), the last slot included
        return torch.randperm(S, generator=g)[:T]
    if name == "uniform":       # ~√n adapters, uniformly
        k = max(1, int(math.isqrt(T)))
        return torch.randint(0, min(k, S), (T,), generator=g)
    if name == "zipf":          # zipf(1.5) popularity over the slots
        w = torch.tensor([1.0 / (i + 1) ** 1.5 for i in range(S)])
        return torch.multinomial(w, T, replacement=True, generator=g)
    if name == "identical":     # everyone on the last slot: it must not be confused with -1
        return torch.full((T,), S - 1)
    if name == "skewed":        # [1, T-1]
        ids = torch.full((T,), 1)
        ids[T // 2] = 0
        return ids
    if name == "all-base":
        return torch.full((T,), -1)
    if name == "mixed":         # random slots and -1 rows
        return torch.randint(-1, S, (T,), generator=g)
    if name == "long":          # segments of 200+ and 70 tokens (past the C++ kernels' 64-row chunks) and -1 rows
        ids = torch.cat([torch.zeros(T * 2 // 3, dtype=torch.long), torch.ones(T // 4, dtype=torch.long)])
        ids = torch.cat([ids, torch.full((T - ids.numel(),), -1)])
        return ids[torch.randperm(T, generator=g)]
    raise ValueError(name)


# (lead dims, K, N, ranks per slot (S = len), R, id pattern, bias, layout)
CASES = [
    pytest.param((37,), 45, 29, [20, 1, 7, 0, 16], 20, "mixed", True, "contig", id="mixed-ranks-minus1"),
    pytest.param((3, 7), 33, 21, [8, 3, 8], 8, "rows", False, "contig", id="3d-per-row-ids"),
    pytest.param((29,), 40, 24, [72, 65, 1], 72, "zipf", True, "contig", id="r72-zipf"),
    pytest.param((6,), 19, 23, [4, 2, 4, 1, 3, 4], 4, "distinct", True, "contig", id="all-distinct"),
    pytest.param((21,), 27, 35, [2, 5, 5], 5, "identical", False, "contig", id="identical-last-slot"),
    pytest.param((25,), 31, 17, [3, 6], 6, "skewed", True, "contig", id="skewed"),
    pytest.param((18,), 22, 26, [6, 6, 6, 6, 6], 6, "uniform", True, "strided", id="uniform-noncontig"),
    pytest.param((9,), 17, 13, [3, 3], 3, "all-base", True, "contig", id="all-minus1"),
    # wide enough for the C++ fp32 micro-kernels' vector blocks (16/64 columns) plus odd tails
    pytest.param((2, 15), 131, 97, [20, 5, 13, 7], 20, "mixed", True, "contig", id="wide-K131-N97"),
]
# segments longer than the C++ kernels' 64-row chunks, split over at::parallel_for's threads (one case: the
# interpreter runs it slowly)
LONG = pytest.param((310,), 24, 20, [8, 5], 8, "long", True, "contig", id="long-segments")


def make_inputs(lead, K, N, ranks, R, pattern, bias, layout, dtype, adapter_dtype=None):
    g = torch.Generator().manual_seed(4321)
    S = len(ranks)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(*lead, K, generator=g, **f64)
    W = torch.randn(N, K, generator=g, **f64) / math.sqrt(K)
    b = torch.randn(N, generator=g, **f64) if bias else None
    A = torch.randn(S, R, K, generator=g, **f64) / math.sqrt(K)
    B = torch.randn(S, N, R, generator=g, **f64) / math.sqrt(R)
    scal = torch.rand(S, generator=g) + 0.5
    dy = torch.randn(*lead, N, generator=g, **f64)
    T = math.prod(lead)
    if pattern == "rows":  # one id per batch row of a [B, L, K] input, -1 included
        ids = torch.tensor([2, -1, 0])[: lead[0]]
    else:
        ids = pattern_ids(pattern, T, S, g)
    adt = adapter_dtype or dtype
    xl = x.to(dtype)
    if layout == "strided":
        xl = torch.stack([xl, torch.zeros_like(xl)], dim=-1).flatten(-2)[..., ::2]
        assert not xl.is_contiguous()
    return dict(x=xl, W=W.to(dtype), b=None if b is None else b.to(dtype), A=A.to(adt), B=B.to(adt), scal=scal,
                ranks=torch.tensor(ranks, dtype=torch.int32), ids=ids, dy=dy.to(dtype))


def run_and_compare(backend, path, t, mult=4.0):
    x = t["x"].detach().requires_grad_()  # not clone(): a clone of a strided view is contiguous
    A = t["A"].detach().clone().requires_grad_()
    B = t["B"].detach().clone().requires_grad_()
    y = pk.multi_lora_linear(x, t["W"], t["b"], A, B, t["scal"], t["ids"], ranks=t["ranks"], backend=backend,
                             path=path)
    y.backward(t["dy"])

    def ref(dtype_of):
        ins = [v.detach().to(dtype_of(v)).requires_grad_() for v in (x, A, B)]
        out = multi_lora_linear_ref(ins[0], t["W"].to(dtype_of(x)), None if t["b"] is None else t["b"].to(dtype_of(x)),
                                    ins[1], ins[2], t["scal"], t["ids"], t["ranks"])
        out.backward(t["dy"].to(out.dtype))
        return out, ins

    y64, i64 = ref(lambda v: torch.float64)
    ylp, ilp = ref(lambda v: v.dtype)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], t["W"].shape[0])
    assert_close(y, y64, ylp, "y", mult)
    for name, got, r64, rlp in zip(("dx", "dA", "dB"), (x, A, B), i64, ilp):
        assert got.grad is not None and got.grad.dtype == got.dtype, name
        if r64.grad is None:  # no token uses an adapter: the reference never touched the stacks
            assert not got.grad.any(), f"{name}: nonzero gradient with no adapter in use"
            continue
        assert_close(got.grad, r64.grad, rlp.grad, name, mult)
    return y, x, A, B


@pytest.mark.parametrize("variant", variants(), indirect=True)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("lead,K,N,ranks,R,pattern,bias,layout", CASES)
def test_against_reference(variant, dtype, lead, K, N, ranks, R, pattern, bias, layout):
    backend, path = variant
    t = make_inputs(lead, K, N, ranks, R, pattern, bias, layout, dtype)
    y, x, A, B = run_and_compare(backend, path, t)
    ids = expand_adapter_ids(t["ids"], x.shape)
    # -1 rows are the base output, bit for bit; slots without tokens and columns past a slot's
    # rank get exactly zero gradient
    base = F.linear(t["x"].reshape(-1, K), t["W"], t["b"])
    minus = ids < 0
    assert torch.equal(y.detach().reshape(-1, N)[minus], base[minus])
    used = set(ids[ids >= 0].tolist())
    for a, r in enumerate(ranks):
        if a not in used or r == 0:
            assert not A.grad[a].any() and not B.grad[a].any(), f"slot {a} without tokens got a gradient"
        else:
            assert not A.grad[a, r:].any() and not B.grad[a, :, r:].any(), f"slot {a}: gradient past rank {r}"


@pytest.mark.parametrize("variant", variants(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp32_adapters_on_half_base(variant, dtype):
    backend, path = variant
    t = make_inputs((23,), 26, 19, [5, 2, 5, 3], 5, "mixed", True, "contig", dtype, adapter_dtype=torch.float32)
    if backend == "cuda":  # its kernels read the stacks in x's dtype; it says so instead of casting silently
        with pytest.raises(pk.BackendUnavailable, match="need lora_A/lora_B in x's dtype"):
            run_and_compare(backend, path, t)
        return
    run_and_compare(backend, path, t)


@pytest.mark.parametrize("variant", variants(), indirect=True)
def test_deterministic_gradients(variant):
    """Two identical backward passes give bit-identical per-slot gradients."""
    backend, path = variant
    t = make_inputs((41,), 30, 22, [6, 6, 6], 6, "zipf", True, "contig", torch.float32)
    grads = []
    for _ in range(2):
        A = t["A"].clone().requires_grad_()
        B = t["B"].clone().requires_grad_()
        y = pk.multi_lora_linear(t["x"], t["W"], t["b"], A, B, t["scal"], t["ids"], ranks=t["ranks"],
                                 backend=backend, path=path)
        y.backward(t["dy"])
        grads.append((A.grad, B.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("variant", variants(), indirect=True)
def test_empty_batch_and_only_some_grads(variant):
    backend, path = variant
    t = make_inputs((11,), 14, 9, [3, 3], 3, "mixed", True, "contig", torch.float32)
    x0 = t["x"][:0].clone().requires_grad_()
    y0 = pk.multi_lora_linear(x0, t["W"], t["b"], t["A"], t["B"], t["scal"], t["ids"][:0], backend=backend, path=path)
    assert y0.shape == (0, 9)
    y0.sum().backward()
    assert x0.grad.shape == (0, 14)
    # only lora_B wants a gradient: dX and dA are skipped, dB still right
    B = t["B"].clone().requires_grad_()
    pk.multi_lora_linear(t["x"], t["W"], t["b"], t["A"], B, t["scal"], t["ids"], ranks=t["ranks"],
                         backend=backend, path=path).backward(t["dy"])
    B64, Blp = t["B"].double().requires_grad_(), t["B"].clone().requires_grad_()
    multi_lora_linear_ref(t["x"].double(), t["W"].double(), t["b"].double(), t["A"].double(), B64, t["scal"],
                          t["ids"], t["ranks"]).backward(t["dy"].double())
    multi_lora_linear_ref(t["x"], t["W"], t["b"], t["A"], Blp, t["scal"], t["ids"], t["ranks"]).backward(t["dy"])
    assert_close(B.grad, B64.grad, Blp.grad, "dB only")


def test_gradcheck_fp64_torch_path():
    g = torch.Generator().manual_seed(3)
    S, R, K, N, T = 3, 4, 6, 5, 7
    x = torch.randn(T, K, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(N, K, dtype=torch.float64, generator=g)
    b = torch.randn(N, dtype=torch.float64, generator=g)
    A = torch.randn(S, R, K, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(S, N, R, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.tensor([0, 2, -1, 2, 1, 0, 2])
    ranks = torch.tensor([4, 2, 3], dtype=torch.int32)
    f = lambda x, A, B: pk.multi_lora_linear(x, W, b, A, B, [0.5, 2.0, 1.5], ids, ranks=ranks, backend="torch")
    assert torch.autograd.gradcheck(f, (x, A, B))


@pytest.mark.parametrize("ext", [pytest.param(True, id="cpp", marks=pytest.mark.skipif(
    not _ext.available(), reason=f"extension: {_ext.unavailable_reason()}")), pytest.param(False, id="torch")])
def test_mapping_groups_tokens(ext, monkeypatch):
    if not ext:
        monkeypatch.setenv("PEFT_KERNELS_DISABLE_EXT", "1")
    ids = torch.tensor([3, -1, 0, 3, 3, 1, -1, 0])
    m = build_mapping(ids, 8, 4)
    assert m.slots == (0, 1, 3) and m.starts == (0, 2, 3, 6)
    assert m.perm.tolist() == [2, 7, 5, 0, 3, 4]  # stable within each adapter
    assert m.pos_slots.tolist() == [0, 0, 1, 3, 3, 3]
    assert m.counts() == {0: 2, 1: 1, 3: 3} and m.max_count == 3 and m.num_active == 6
    assert choose_path(build_mapping(torch.arange(8), 8, 8)) == "bgmv"        # all distinct
    assert choose_path(build_mapping(torch.zeros(64, dtype=torch.long), 64, 8)) == "sgmv"  # all shared
    assert choose_path(m, "bgmv") == "bgmv"
    assert build_mapping(torch.full((5,), -1), 5, 3).num_active == 0
    assert build_mapping(ids[:0], 0, 3).num_segments == 0
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 4\).*\[-3, 4, 9\]"):
        build_mapping(torch.tensor([0, 9, -3, 4, 4]), 5, 4)
    # unchecked: out-of-range ids are simply left out of every segment
    assert build_mapping(torch.tensor([0, 9, -3, 4, 1]), 5, 4, check_ids=False).perm.tolist() == [0, 4]


def test_per_row_ids_expand():
    x = torch.zeros(2, 3, 4)
    assert expand_adapter_ids(torch.tensor([5, -1]), x.shape).tolist() == [5, 5, 5, -1, -1, -1]
    assert expand_adapter_ids(torch.tensor([[1, 2, 3], [4, 5, 6]]), x.shape).tolist() == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="adapter_ids must hold one id per token"):
        expand_adapter_ids(torch.tensor([1, 2, 3]), x.shape)


@pytest.mark.parametrize("variant", variants(), indirect=True)
def test_unchecked_bad_ids_never_read_out_of_bounds(variant):
    """check_ids=False skips the range check; ids outside [-1, S) then act as -1."""
    backend, path = variant
    t = make_inputs((10,), 12, 8, [2, 2], 2, "mixed", True, "contig", torch.float32)
    ids = torch.tensor([0, 1, 2, 7, -5, 1, 0, 2, -1, 99])
    y = pk.multi_lora_linear(t["x"], t["W"], t["b"], t["A"], t["B"], t["scal"], ids, backend=backend, path=path,
                             check_ids=False)
    clean = torch.where((ids >= 0) & (ids < 2), ids, -1)
    ref = multi_lora_linear_ref(t["x"], t["W"], t["b"], t["A"], t["B"], t["scal"], clean)
    ref64 = multi_lora_linear_ref(*(t[k].double() for k in ("x", "W", "b", "A", "B", "scal")), clean)
    assert_close(y, ref64, ref, "y")


@pytest.mark.parametrize("cpu_isa", isa_params(), indirect=True)
@pytest.mark.parametrize("case", ["wide-K131-N97", "mixed-ranks-minus1", "r72-zipf"])
def test_every_cpu_kernel_variant(cpu_isa, case):
    """The fp32 C++ micro-kernels are compiled for AVX-512, AVX2 and baseline x86-64; the CPU picks
    one. Pin each in turn so every variant is checked against the reference, forward and backward."""
    params = {p.id: p.values for p in CASES}[case]
    run_and_compare("torch", "auto", make_inputs(*params, torch.float32))


def test_cpu_isa_rejects_unknown_names():
    if not _ext.available():
        pytest.skip(f"extension: {_ext.unavailable_reason()}")
    with pytest.raises(RuntimeError, match="expected one of 'auto', 'avx512', 'avx2', 'base'"):
        _ext.ops().cpu_isa("sse9")


@pytest.mark.parametrize("path", ["bgmv", "sgmv"])
def test_strided_x_reaches_the_triton_kernels(monkeypatch, path):
    """A really strided x (last-dim stride 2) is gathered through its strides, forward (shrink) and in the dA
    reduction (run_and_compare's "uniform-noncontig" case checks the values)."""
    from peft_kernels.kernels import multi_lora as ML

    shrink = ML._sgmv_shrink_kernel if path == "sgmv" else ML._bgmv_shrink_kernel
    calls = spy_triton_launches(monkeypatch, [shrink, ML._seg_outer_kernel])
    t = make_inputs((18,), 22, 26, [6, 6, 6, 6, 6], 6, "uniform", True, "strided", torch.float32)
    x = t["x"].detach().requires_grad_()
    assert x.stride() == (44, 2)
    A, B = t["A"].clone().requires_grad_(), t["B"].clone().requires_grad_()
    pk.multi_lora_linear(x, t["W"], t["b"], A, B, t["scal"], t["ids"], ranks=t["ranks"], backend="triton",
                         path=path).backward(t["dy"])
    fwd = next(a for n, a in calls if n == shrink.__name__)
    assert arg(shrink, fwd, "stride_ik") == 2 and arg(shrink, fwd, "stride_it") == 44
    outer = [a for n, a in calls if n == "_seg_outer_kernel"]
    assert any(arg(ML._seg_outer_kernel, a, "stride_qj") == 2 for a in outer)  # dA = dSᵀ·x gathers x's rows


@pytest.mark.parametrize("variant", variants(), indirect=True)
@pytest.mark.parametrize("lead,K,N,ranks,R,pattern,bias,layout", [LONG])
def test_segments_longer_than_a_chunk(variant, lead, K, N, ranks, R, pattern, bias, layout):
    """206- and 77-token segments: the C++ kernels split them into 64-row chunks on several threads (the
    chunk boundaries and the threaded path), every other backend runs them too; fp32 and all gradients."""
    backend, path = variant
    t = make_inputs(lead, K, N, ranks, R, pattern, bias, layout, torch.float32)
    counts = torch.bincount(t["ids"][t["ids"] >= 0])
    assert counts.max() > 3 * 64 and (counts > 64).all()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        run_and_compare(backend, path, t)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("counts,block_m", [([4000] + [1] * 99, 32), ([0, 5, 0, 33, 1], 16), ([7], 8), ([], 16),
                                            ([16, 17, 15, 32, 1], 16)])
def test_row_blocks_flatten_the_sgmv_grid(counts, block_m):
    """One table entry per (segment, row block) that holds rows: exactly the blocks a per-segment loop walks,
    in order, none empty; a skewed batch gets Σ⌈count/block_m⌉ entries, not segments × ⌈max/block_m⌉."""
    ids = torch.cat([torch.full((c,), a, dtype=torch.int64) for a, c in enumerate(counts)] or
                    [torch.empty(0, dtype=torch.int64)])
    ids = ids[torch.randperm(ids.numel())]
    m = build_mapping(ids, ids.numel(), max(len(counts), 1))
    seg, row0 = m.row_blocks(block_m)
    want_seg, want_row0 = [], []
    for g, (s, e) in enumerate(zip(m.starts, m.starts[1:])):
        for p in range(s, e, block_m):
            want_seg.append(g)
            want_row0.append(p)
    assert seg.dtype == row0.dtype == torch.int32
    assert seg.tolist() == want_seg and row0.tolist() == want_row0 and m.num_row_blocks(block_m) == len(want_seg)
    assert m.row_blocks(block_m)[0] is seg  # cached per block size
    if counts == [4000] + [1] * 99:
        assert len(want_seg) == 125 + 99  # the unflattened grid had 100 × 125


def test_skewed_batch_launches_only_working_sgmv_programs(monkeypatch):
    """1 × 400 + 39 × 1 tokens: the SGMV shrink and expand grids have Σ⌈count/BLOCK_M⌉ row programs (no
    empty ones), and the result matches the reference (forward and gradients)."""
    if dispatch.unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip(dispatch.unavailable_reason("triton", torch.device("cpu")))
    from peft_kernels.kernels import multi_lora as ML

    grids = []
    for k in (ML._sgmv_shrink_kernel, ML._sgmv_expand_kernel):
        real = k.run

        def spying(*a, _real=real, _name=k.__name__, **kw):
            g = kw["grid"]
            grids.append((_name, tuple(g) if not callable(g) else g))
            return _real(*a, **kw)
        monkeypatch.setattr(k, "run", spying)
    counts = [400] + [1] * 39
    ids = torch.cat([torch.full((c,), a) for a, c in enumerate(counts)])
    ids = ids[torch.randperm(ids.numel())]
    T, K, N, S, R = ids.numel(), 24, 40, len(counts), 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, K, generator=g, requires_grad=True)
    W, A = torch.randn(N, K, generator=g), torch.randn(S, R, K, generator=g, requires_grad=True)
    B, scal = torch.randn(S, N, R, generator=g, requires_grad=True), torch.rand(S, generator=g) + 0.5
    y = pk.multi_lora_linear(x, W, None, A, B, scal, ids, backend="triton", path="sgmv")
    dy = torch.randn(y.shape, generator=g)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), dy)
    bm = ML.configs(A.dtype, R)["sgmv_shrink"].m
    nb = -(-400 // bm) + 39
    assert {gr[0] for _, gr in grids} == {nb} and len(grids) == 4  # fwd shrink+expand, bwd shrink+expand
    assert nb < S * -(-400 // bm)
    def ref(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, A, B)]
        out = multi_lora_linear_ref(leaves[0], W.to(dt), None, leaves[1], leaves[2], scal.to(dt), ids)
        return (out, *torch.autograd.grad(out, leaves, dy.to(dt)))
    want, same = ref(torch.float64), ref(torch.float32)  # fp64 truth; fp32 torch sets the bound
    for name, got, w, sp in zip(("y", "dx", "dA", "dB"), (y, dx, dA, dB), want, same):
        assert_close(got, w.detach(), sp.detach(), name)


# --------------------------------------------------------------------------------------------
# per-adapter dropout (issue #18): every backend applies the same regenerable mask, forward and backward
# --------------------------------------------------------------------------------------------
DROP_CASES = [c for c in CASES if c.id in ("mixed-ranks-minus1", "3d-per-row-ids", "uniform-noncontig")]


def _slot_mask(ps, ids, x_shape, seed_value):
    from peft_kernels.ops import _torch_dropout as D

    torch.manual_seed(seed_value)
    drop = D.SlotDropout.make(ps, D.draw_seed("cpu"), "cpu")
    return drop.full_mask(expand_adapter_ids(ids, x_shape), x_shape[-1])


@pytest.mark.parametrize("variant", variants(), indirect=True)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("lead,K,N,ranks,R,pattern,bias,layout", DROP_CASES)
def test_dropout_against_reference(variant, dtype, lead, K, N, ranks, R, pattern, bias, layout):
    """Forward and every gradient against the reference fed the same mask (each row with its adapter's p),
    so a backward that regenerated another mask, or applied none, fails dx and dA."""
    backend, path = variant
    t = make_inputs(lead, K, N, ranks, R, pattern, bias, layout, dtype)
    S = len(ranks)
    ps = [(0.1, 0.5, 0.0, 0.3, 0.7)[i % 5] for i in range(S)]
    x = t["x"].detach().requires_grad_()
    A = t["A"].detach().clone().requires_grad_()
    B = t["B"].detach().clone().requires_grad_()
    torch.manual_seed(11)
    y = pk.multi_lora_linear(x, t["W"], t["b"], A, B, t["scal"], t["ids"], ranks=t["ranks"], backend=backend,
                             path=path, dropout_p=ps, training=True)
    y.backward(t["dy"])
    mask = _slot_mask(ps, t["ids"], x.shape, 11)
    dropped = (mask == 0).sum().item()
    assert dropped > 0 or pattern == "all-base"

    def ref(dt):
        ins = [v.detach().to(dt(v)).requires_grad_() for v in (x, A, B)]
        out = multi_lora_linear_ref(ins[0], t["W"].to(dt(x)), None if t["b"] is None else t["b"].to(dt(x)), ins[1],
                                    ins[2], t["scal"], t["ids"], t["ranks"], dropout_mask=mask)
        out.backward(t["dy"].to(out.dtype))
        return out, ins

    y64, i64 = ref(lambda v: torch.float64)
    ylp, ilp = ref(lambda v: v.dtype)
    assert_close(y, y64, ylp, "y (dropout)")
    for name, got, r64, rlp in zip(("dx", "dA", "dB"), (x, A, B), i64, ilp):
        assert_close(got.grad, r64.grad, rlp.grad, f"{name} (dropout)")


def test_dropout_off_in_eval_and_checked():
    t = make_inputs((37,), 45, 29, [20, 1, 7, 0, 16], 20, "mixed", True, "contig", torch.float32)
    args = (t["x"], t["W"], t["b"], t["A"], t["B"], t["scal"], t["ids"])
    plain = pk.multi_lora_linear(*args, ranks=t["ranks"])
    assert torch.equal(pk.multi_lora_linear(*args, ranks=t["ranks"], dropout_p=0.5, training=False), plain)
    assert not torch.equal(pk.multi_lora_linear(*args, ranks=t["ranks"], dropout_p=0.5, training=True), plain)
    for bad, err in ((1.0, ValueError), ([0.1, 0.2], ValueError), ("0.1", TypeError), ([0.1, -0.1, 0, 0, 0], ValueError)):
        with pytest.raises(err, match="dropout_p"):
            pk.multi_lora_linear(*args, ranks=t["ranks"], dropout_p=bad, training=False)


def test_dropout_gradcheck_backward_uses_forwards_mask():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 6, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(5, 6, dtype=torch.float64, generator=g)
    A = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(2, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, 1, 0])

    def f(x, A, B):
        torch.manual_seed(4)  # the same seed, so the same mask, on every evaluation gradcheck makes
        return pk.multi_lora_linear(x, W, None, A, B, [1.5, 0.5], ids, dropout_p=[0.4, 0.6], training=True,
                                    backend="torch")
    assert (f(x, A, B) != pk.multi_lora_linear(x, W, None, A, B, [1.5, 0.5], ids, backend="torch")).any()
    assert torch.autograd.gradcheck(f, (x, A, B))


def test_dropout_keep_rate_per_slot_and_rows_independent():
    from peft_kernels.ops import _torch_dropout as D

    drop = D.SlotDropout.make((0.1, 0.5, 0.0), torch.tensor([123456789]), "cpu")
    ids = torch.randint(0, 3, (3000,), generator=torch.Generator().manual_seed(0))
    mask = drop.full_mask(ids, 256)
    for a, p in enumerate((0.1, 0.5, 0.0)):
        keep = (mask[ids == a] > 0).double().mean().item()
        assert abs(keep - (1 - p)) < 0.005, (a, keep)
        assert torch.allclose(mask[ids == a][mask[ids == a] > 0], torch.tensor(1 / (1 - p), dtype=torch.float64))
    rows = torch.nonzero(ids == 1).reshape(-1)[:50]
    alone = drop.rows_factor(rows, 1, 256, torch.float64)  # a row's mask does not depend on the other rows
    assert torch.equal(alone, mask[rows])


@pytest.mark.skipif(not _ext.available(), reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpp_op_into_strided_outputs_every_time(dtype):
    """The C++ op itself (not only the layer, which used to hand it a contiguous copy) adds the update into a
    row-strided y, and its backward into a row-strided dx, exactly as into contiguous ones, every time: its 16-bit
    path index_adds each segment from its own thread, and on a strided y that lost updates in about 2 calls of 5.
    A y or dx with a non-unit column stride is taken too (the 16-bit path) or refused by name (fp32)."""
    ops = _ext.ops()
    g = torch.Generator().manual_seed(1)
    for trial in range(8):
        T, K, N, S, R = 41, 40, 48, 3, 8
        x = torch.randn(T, K, generator=g).to(dtype)
        A, B = (torch.randn(S, R, K, generator=g) / 6).to(dtype), torch.randn(S, N, R, generator=g).to(dtype)
        ids = torch.randint(-1, S, (T,), generator=g)
        perm, _, seg_slots, seg_starts, _ = ops.group_by_adapter(ids, S)
        ranks, scal = torch.tensor([8, 5, 8], dtype=torch.int32), torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
        base = torch.randn(T, N, generator=g).to(dtype)
        y = base.clone()
        S_want = ops.multi_lora_fwd(y, x, A, B, perm, seg_slots, seg_starts, ranks, scal, None)
        wide = torch.zeros(T, N + 32, dtype=dtype)
        wide[:, 16:16 + N] = base
        S_got = ops.multi_lora_fwd(wide[:, 16:16 + N], x, A, B, perm, seg_slots, seg_starts, ranks, scal, None)
        assert torch.equal(S_got, S_want)
        assert torch.equal(wide[:, 16:16 + N], y), f"trial {trial}: {(wide[:, 16:16 + N] != y).sum()} outputs differ"
        assert not wide[:, :16].any() and not wide[:, 16 + N:].any(), "wrote outside the block"
        dy = torch.randn(T, N, generator=g).to(dtype)
        dx0 = torch.randn(T, K, generator=g).to(dtype)
        dx = dx0.clone()
        dA, dB = ops.multi_lora_bwd(dy, x, S_want, A, B, perm, seg_slots, seg_starts, ranks, scal, dx, True, True, None)
        wdx = torch.zeros(T, K + 24, dtype=dtype)
        wdx[:, 8:8 + K] = dx0
        dA2, dB2 = ops.multi_lora_bwd(dy, x, S_want, A, B, perm, seg_slots, seg_starts, ranks, scal, wdx[:, 8:8 + K],
                                      True, True, None)
        assert torch.equal(wdx[:, 8:8 + K], dx), f"trial {trial}: {(wdx[:, 8:8 + K] != dx).sum()} dx entries differ"
        assert torch.equal(dA2, dA) and torch.equal(dB2, dB)
        assert not wdx[:, :8].any() and not wdx[:, 8 + K:].any(), "wrote outside dx's block"
        # a y laid out column-major: the 16-bit path takes it, the fp32 micro-kernels refuse it by name
        yt = base.t().contiguous().t()
        if dtype == torch.float32:
            with pytest.raises(ValueError, match="y must have unit column stride"):
                ops.multi_lora_fwd(yt, x, A, B, perm, seg_slots, seg_starts, ranks, scal, None)
        else:
            ops.multi_lora_fwd(yt, x, A, B, perm, seg_slots, seg_starts, ranks, scal, None)
            assert torch.equal(yt, y)


@pytest.mark.skipif(not _ext.available(), reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpp_16bit_path_on_threads_loses_no_update(dtype):
    """The C++ op's 16-bit path on several threads, call after call: y and dx equal a one-thread run's bit for bit
    (and dA, dB too), and y is the fp64 reference within 4× what torch gets at that precision. Before, every segment
    index_add_'ed into the shared y (and dx) from its own thread, and updates were lost: on 2 threads, bf16 outputs
    off by up to 85 % in one call of three, at N from 1 to 12 (the strided-y test's N = 48 rarely showed it)."""
    ops = _ext.ops()
    threads = torch.get_num_threads()
    many = max(2, threads)
    g = torch.Generator().manual_seed(7)
    try:
        for trial in range(24):
            T, K, N, S, R = 6 + trial % 3 * 11, 24, (1, 8, 12, 33)[trial % 4], 3, 4
            x = torch.randn(T, K, generator=g).to(dtype)
            A, B = (torch.randn(S, R, K, generator=g) / 5).to(dtype), torch.randn(S, N, R, generator=g).to(dtype)
            ids = torch.arange(T) % S
            perm, _, seg_slots, seg_starts, _ = ops.group_by_adapter(ids, S)
            ranks, scal = torch.tensor([4, 3, 4], dtype=torch.int32), torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
            base = torch.randn(T, N, generator=g).to(dtype)
            dy, dx0 = torch.randn(T, N, generator=g).to(dtype), torch.randn(T, K, generator=g).to(dtype)
            runs = []
            for n in (many, 1):
                torch.set_num_threads(n)
                y, dx = base.clone(), dx0.clone()
                Sx = ops.multi_lora_fwd(y, x, A, B, perm, seg_slots, seg_starts, ranks, scal, None)
                dA, dB = ops.multi_lora_bwd(dy, x, Sx, A, B, perm, seg_slots, seg_starts, ranks, scal, dx, True, True,
                                            None)
                runs.append((y, dx, dA, dB))
            for name, a, b in zip(("y", "dx", "dA", "dB"), *runs):
                assert torch.equal(a, b), f"trial {trial} (N={N}): {name} on {many} threads != on 1 ({(a != b).sum()})"

            def ref(dt):
                out = base.to(dt).clone()
                for t in range(T):
                    a, r = int(ids[t]), int(ranks[ids[t]])
                    s = (x[t].to(dt) @ A[a, :r].to(dt).t()) * float(scal[a])
                    out[t] += s @ B[a, :, :r].to(dt).t()
                return out
            assert_close(runs[0][0], ref(torch.float64), ref(dtype), f"trial {trial} (N={N}) y")
    finally:
        torch.set_num_threads(threads)
