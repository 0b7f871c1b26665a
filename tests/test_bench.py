"""The benchmark suite: the CLI end to end in --quick mode (every output file), its inputs (shape presets
against the real models' layers), its traffic model against the bytes an eager graph really moves,
its launch counting, occupancy arithmetic and the GPU-resources report.

No timing assertions here: speed targets live in the benchmark report, never in tests.
"""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from peft_kernels.bench import traffic
from peft_kernels.bench.__main__ import main
from peft_kernels.bench.common import count_launches, saved_activation_bytes, timed_call
from peft_kernels.bench.gpu_resources import occupancy
from peft_kernels.bench.shapes import PRESETS, parse_shapes, projections
from peft_kernels.reference import adapter_linear_ref, lora_linear_ref

from helpers import real_jit_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # the Triton backend runs too (conftest sets TRITON_INTERPRET=1): its launches are counted
    rc = main(["--quick", "--no-progress", "--out", str(out), "--backends", "torch,triton,cuda"])
    return rc, out


def _rows(out):
    with open(out / "bench.csv") as f:
        return list(csv.DictReader(f))


def test_cli_quick_writes_every_output(quick_run):
    rc, out = quick_run
    assert rc == 0
    assert sorted(os.listdir(out)) == ["bench.csv", "bench.json", "bench.png"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "bench.json").read_text())["metadata"]
    for k in ("device", "device_name", "torch", "triton", "peft", "git_commit", "timestamp", "argv"):
        assert meta.get(k), k
    rows = _rows(out)
    timed = [r for r in rows if not r["skipped"]]
    assert {r["op"] for r in timed} == {"lora", "multi_lora", "adapter", "dora", "ia3", "qlora"}
    for op in ("lora", "multi_lora", "adapter", "dora", "ia3", "qlora"):
        assert {r["mode"] for r in timed if r["op"] == op} == {"fwd", "bwd", "full"}, op
        provs = {r["provider"] for r in timed if r["op"] == op}
        assert {"nn.Linear (frozen)", "nn.Linear (frozen, control)", "reference", "ours (torch)"} <= provs, (op, provs)
        assert ("ours (triton)" in provs) == (op != "qlora"), (op, provs)
    for op in ("lora", "multi_lora", "dora", "ia3", "qlora"):
        assert "HF PEFT" in {r["provider"] for r in timed if r["op"] == op}, op
    for r in timed:
        p20, p50, p80 = float(r["p20_ms"]), float(r["p50_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= p50 <= p80, r
        assert int(r["launches"]) >= 1 and float(r["traffic_ratio"]) > 1
    # PEFT's mixed batch is inference-only, and HF PEFT has no bottleneck adapters: said, not hidden
    skipped = {(r["op"], r["provider"], r["mode"]): r["skipped"] for r in rows if r["skipped"]}
    assert "inference-only" in skipped[("multi_lora", "HF PEFT", "full")]
    assert "no bottleneck" in skipped[("adapter", "HF PEFT", "*")]
    assert "no cuda kernels" in skipped[("lora", "ours (cuda)", "*")]
    assert "no triton kernels" in skipped[("qlora", "ours (triton)", "*")]


def test_cli_quick_outputs_are_checked_results(quick_run):
    """Ours agrees with the reference, saves what it should and launches what the kernels' docs say."""
    _, out = quick_run
    rows = [r for r in _rows(out) if not r["skipped"]]
    by = {(r["op"], r["provider"], r["mode"], r["p"] or r["adapters"] or r["placement"] or r["scaling"]): r
          for r in rows}
    for prov in ("ours (torch)", "ours (triton)", "HF PEFT"):
        assert float(by[("lora", prov, "fwd", "0.0")]["max_abs_diff"]) < 1e-5
    # fused LoRA forward on Triton: shrink + GEMM; backward: dY, dX, dA kernels
    assert by[("lora", "ours (triton)", "fwd", "0.0")]["launched_ops"].split() == [
        "triton::_shrink_kernel", "triton::_fwd_gemm_kernel"]
    assert by[("lora", "ours (triton)", "bwd", "0.0")]["launched_ops"].split() == [
        "triton::_bwd_dy_kernel", "triton::_bwd_dx_kernel", "triton::_bwd_da_kernel"]
    # with dropout the same kernels, plus the draw of the Philox seed on x's device (one RNG op the kernels read
    # from memory: no host copy, and a CUDA-graph replay draws it again)
    assert by[("lora", "ours (triton)", "fwd", "0.1")]["launched_ops"].split() == [
        "aten::randint", "triton::_shrink_kernel", "triton::_fwd_gemm_kernel"]
    # the eager reference runs one op per step: addmm, mm, mm, mul, add (+ the dropout mask's ops at p > 0)
    assert by[("lora", "reference", "fwd", "0.0")]["launched_ops"].split() == [
        "aten::addmm", "aten::mm", "aten::mm", "aten::mul", "aten::add"]
    M, K, r = 40, 48, 4
    for p in ("0.0", "0.1"):
        assert int(by[("lora", "ours (torch)", "fwd", p)]["saved_bytes"]) == M * K * 4 + M * r * 4
    assert int(by[("lora", "nn.Linear (frozen)", "fwd", "0.0")]["saved_bytes"]) == 0
    assert int(by[("lora", "HF PEFT", "fwd", "0.1")]["saved_bytes"]) >= 2 * M * K * 4
    for n in ("1", "5"):
        assert float(by[("multi_lora", "ours (torch)", "fwd", n)]["max_abs_diff"]) < 1e-5
    for pl in ("sequential", "parallel"):
        assert float(by[("adapter", "ours (triton)", "fwd", pl)]["max_abs_diff"]) < 1e-5
    for sc in ("output", "input"):
        for prov in ("ours (torch)", "ours (triton)", "HF PEFT"):
            assert float(by[("ia3", prov, "fwd", sc)]["max_abs_diff"]) < 1e-5
        # the fused IA3 GEMM: one launch forward, one backward (+ the fixed-order sum of dl partials for input)
        assert by[("ia3", "ours (triton)", "fwd", sc)]["launched_ops"].split() == ["triton::_ia3_gemm_kernel"]
    for prov in ("ours (torch)", "ours (triton)", "HF PEFT"):
        assert float(by[("dora", prov, "fwd", "")]["max_abs_diff"]) < 1e-5
    # QLoRA: ours and PEFT's QLoRA layer against the reference (dequantize, then LoRA) on the same NF4 layer;
    # ours saves x and S only (no dequantized weight)
    for prov in ("ours (torch)", "HF PEFT"):
        assert float(by[("qlora", prov, "fwd", "")]["max_abs_diff"]) < 1e-5
    assert int(by[("qlora", "ours (torch)", "fwd", "")]["saved_bytes"]) == 40 * 64 * 4 + 40 * 4 * 4


def test_cli_rejects_bad_arguments(capsys):
    for argv, msg in ((["--modes", "fwd,sideways"], "--modes"), (["--shapes", "1,2,3"], "M,K,N,r"),
                      (["--shapes", "gpt5"], "unknown preset"), (["--dropout", "1.5"], "--dropout"),
                      (["--backends", "tpu"], "--backends"), (["--shapes", "llama3-8b:lm_head"], "no projection")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err, argv


def _layer0_linears(model):
    return sorted({(m.in_features, m.out_features) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".0." in n})


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_the_real_models_projections(preset):
    """Each preset's (K, N) pairs are exactly the nn.Linear shapes of layer 0 of the transformers model
    built with those dimensions (on the meta device: no memory)."""
    transformers = pytest.importorskip("transformers")
    d = PRESETS[preset]
    common = dict(hidden_size=d.hidden, intermediate_size=d.intermediate, num_attention_heads=d.heads,
                  num_hidden_layers=1, vocab_size=64)
    if preset == "bert-base":
        cfg, cls = transformers.BertConfig(**common), transformers.BertModel
    else:
        name = {"llama3-8b": "Llama", "mistral-7b": "Mistral", "qwen2.5-7b": "Qwen2"}[preset]
        cfg = getattr(transformers, f"{name}Config")(num_key_value_heads=d.kv_heads, head_dim=d.head_dim, **common)
        cls = getattr(transformers, f"{name}ForCausalLM")
    with torch.device("meta"):
        model = cls(cfg)
    assert sorted((k, n) for _, k, n in projections(d)) == _layer0_linears(model)


def test_parse_shapes():
    s = parse_shapes(["512,4096,4096,16", "qwen2.5-7b:k"], tokens=7, rank=3)
    assert [(x.M, x.K, x.N, x.r) for x in s] == [(512, 4096, 4096, 16), (7, 3584, 512, 3)]
    assert s[1].name == "qwen2.5-7b.k,v"
    # q,o share (4096, 4096), k,v (4096, 1024), gate,up (4096, 14336); down (14336, 4096)
    assert [x.name for x in parse_shapes(["Llama-3-8B"], 1, 1)] == [
        "llama3-8b.q,o", "llama3-8b.k,v", "llama3-8b.gate,up", "llama3-8b.down"]


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
def test_lora_unfused_traffic_is_what_the_eager_graph_moves(mode):
    M, K, N, r = 13, 21, 17, 3
    x = torch.randn(M, K, requires_grad=True)
    W, b = torch.randn(N, K), torch.randn(N)
    A, B = torch.randn(r, K, requires_grad=True), torch.randn(N, r, requires_grad=True)
    call = timed_call(lambda: lora_linear_ref(x, W, b, A, B, 2.0), mode, x, torch.randn(M, N), [A, B])
    _, ops, counted = count_launches(call)
    assert counted == traffic.lora(M, K, N, r, 4)[mode].unfused_bytes, ops


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_adapter_unfused_forward_traffic_is_what_the_eager_graph_moves(placement):
    M, K, N, bsz = 11, 19, 23, 5
    x = torch.randn(M, K)
    W, bias = torch.randn(N, K), torch.randn(N)
    a = N if placement == "sequential" else K
    D, c, U, d = torch.randn(bsz, a), torch.randn(bsz), torch.randn(N, bsz), torch.randn(N)
    call = timed_call(lambda: adapter_linear_ref(x, W, bias, D, c, U, d, "relu", 0.5, placement), "fwd", x, None, [])
    _, ops, counted = count_launches(call)
    assert counted == traffic.adapter(M, K, N, bsz, 4, placement)["fwd"].unfused_bytes, ops


@pytest.mark.parametrize("ff", [False, True], ids=["output", "input"])
def test_ia3_unfused_forward_traffic_is_what_the_eager_graph_moves(ff):
    from peft_kernels.reference import ia3_linear_ref

    M, K, N = 11, 19, 23
    x, W, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    l = torch.randn(K if ff else N)
    _, ops, counted = count_launches(timed_call(lambda: ia3_linear_ref(x, W, b, l, ff), "fwd", x, None, []))
    assert counted == traffic.ia3(M, K, N, 4, ff)["fwd"].unfused_bytes, ops


def test_traffic_model_favours_fusion_and_flops_floor():
    for costs in (traffic.lora(512, 4096, 4096, 16, 2, 0.1), traffic.multi_lora(256, 4096, 4096, 16, 32, 2),
                  traffic.adapter(512, 4096, 4096, 64, 2, "sequential"), traffic.adapter(512, 4096, 4096, 64, 2, "parallel"),
                  traffic.ia3(512, 4096, 4096, 2, False), traffic.ia3(512, 4096, 4096, 2, True),
                  traffic.dora(512, 4096, 4096, 16, 2)):
        for m in ("fwd", "bwd", "full"):
            assert costs[m].fused_bytes < costs[m].unfused_bytes
            assert costs["full"].flops == costs["fwd"].flops + costs["bwd"].flops
    fr = traffic.frozen(512, 4096, 4096, 4)
    ad = traffic.adapter(512, 4096, 4096, 256, 4, "sequential")
    assert abs(ad["full"].flops / fr["full"].flops - (1 + 3 * 256 / 4096)) < 1e-12


def test_qlora_traffic_swaps_the_weight_bytes():
    """The fused QLoRA GEMM reads the packed weight (q bytes per weight) where LoRA's reads e; the unsloth-style
    unfused path adds a dequantize kernel (read q, write e) in forward and again for dX."""
    M, K, N, r, e = 512, 4096, 4096, 16, 2
    q = traffic.nf4_bytes_per_weight(64, True)
    assert q == 0.5 + (1 + 4 / 256) / 64 and traffic.nf4_bytes_per_weight(64, False) == 0.5 + 4 / 64
    lo, ql = traffic.lora(M, K, N, r, e), traffic.qlora(M, K, N, r, e, q)
    for m, n in (("fwd", 1), ("bwd", 1), ("full", 2)):
        assert ql[m].flops == lo[m].flops
        assert ql[m].fused_bytes == pytest.approx(lo[m].fused_bytes - n * N * K * (e - q))
        assert ql[m].unfused_bytes == pytest.approx(lo[m].unfused_bytes + n * N * K * (q + e))
        assert ql[m].fused_bytes < ql[m].unfused_bytes


def test_saved_bytes_dedups_views_and_skips_params():
    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    # x is saved twice through views; w is a parameter
    n = saved_activation_bytes(lambda: (x[:2] * x[2:]).sum() + (x @ w).sum(), [w])
    assert n == x.numel() * 4


def test_occupancy_matches_the_cuda_occupancy_calculator():
    # 64 regs × 128 threads: 2048 regs per warp -> 32 warps per SM by registers = 50 %
    assert occupancy(80, 64, 128, 0) == dict(blocks=8, warps=32, occupancy=0.5, limiter="registers")
    assert occupancy(80, 32, 256, 0)["occupancy"] == 1.0
    # 255 regs -> 8192 per warp (256-register units) -> 8 warps -> two 4-warp blocks
    assert occupancy(90, 255, 128, 0)["occupancy"] == 0.125
    # 48 KiB + 1 KiB reserved per block: 3 blocks in A100's 164 KiB, 4 in H100's 228 KiB
    assert occupancy(80, 32, 128, 48 * 1024) == dict(blocks=3, warps=12, occupancy=0.1875, limiter="shared memory")
    assert occupancy(90, 32, 128, 48 * 1024)["blocks"] == 4
    # 1024-thread blocks: warp slots limit to 2 blocks
    assert occupancy(80, 16, 1024, 0) == dict(blocks=2, warps=64, occupancy=1.0, limiter="warps")
    with pytest.raises(ValueError, match="arch"):
        occupancy(70, 32, 128, 0)


def test_gpu_resources_report(tmp_path):
    """--gpu-resources --quick: the first config of each multi-adapter Triton kernel and every CUDA C++ kernel
    (CMake ptxas log + launch bounds from the PTX) for sm_80 and sm_90, with occupancy."""
    from peft_kernels import cuda_build

    why = cuda_build.missing_tools()
    if why:
        if os.environ.get("PEFT_KERNELS_REQUIRE_CUDA_TOOLKIT") == "1":
            pytest.fail(f"PEFT_KERNELS_REQUIRE_CUDA_TOOLKIT=1 but {why}")
        pytest.skip(why)
    p = subprocess.run([sys.executable, "-m", "peft_kernels.bench", "--gpu-resources", "--quick", "--op", "multi_lora",
                        "--out", str(tmp_path)], env=real_jit_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    with open(tmp_path / "gpu_resources.csv") as f:
        rows = list(csv.DictReader(f))
    kinds = {(r["kind"], r["arch"], r["kernel"]) for r in rows}
    for arch in ("80", "90"):
        for k in ("_sgmv_shrink_kernel", "_sgmv_expand_kernel", "_bgmv_shrink_kernel", "_bgmv_expand_kernel"):
            assert ("triton", arch, k) in kinds
        for k in ("bgmv_shrink_kernel", "bgmv_expand_kernel", "sgmv_shrink_kernel", "sgmv_expand_kernel",
                  "lora_expand_kernel"):
            assert ("cuda", arch, k) in kinds
    for r in rows:
        assert int(r["spill_bytes"]) == 0 and int(r["threads"]) % 32 == 0
        # the row's occupancy is the calculator's for its own resources
        assert float(r["occupancy"]) == occupancy(int(r["arch"]), int(r["registers"]), int(r["threads"]),
                                                  int(r["smem_bytes"]))["occupancy"]
        assert 0 < float(r["occupancy"]) <= 1
    assert "occupancy" in p.stdout and "sm_90" in p.stdout


def test_model_bench_quick_runs_end_to_end():
    """``--op model`` (issue #18) on the packaged all-MiniLM-L6-v2, quick and without compiling: it trains ours,
    PEFT and the frozen model, serves 8 adapters, and reports every number (finite, positive)."""
    pytest.importorskip("peft")
    from peft_kernels.bench import model as mb

    res = mb.run(quick=True, compile_=False)
    assert "all-MiniLM-L6-v2" in res["model"] or "random weights" in res["model"]
    for t in ("q,v", "all-linear"):
        r = res["train"][t]
        assert all(0 < r[k] < 100 for k in ("ours/peft", "ours+hash/peft", "frozen/peft")), r
        sv = res["saved_MiB"][t]
        assert 0 < sv["ours"] < sv["peft"], sv  # ours saves less than PEFT for backward
        assert 0 < sv["ours+hash"] < sv["ours"], sv  # the hash dropout stores no mask
    assert 0 < res["serve"]["ours/peft"] < 100
    text = mb.format_report(res)
    assert "| q,v |" in text and "multi-adapter serving, 8 adapters" in text
    assert len(mb.targets(res)) == 4 and all("#18" in line for line in mb.targets(res))


def test_model_bench_pools_processes_and_checks_the_worst():
    """``--op model --processes N``: a compiled/eager row pooled from N fresh processes is the median over every
    round of every process, each process's median kept; "never slower" is checked on the worst process, so one
    process above 1.0 makes the row MISSED even when the pooled median is below."""
    from peft_kernels.bench import model as mb

    runs = [{"compiled/eager": 0.95, "compiled/eager rounds": [0.90, 0.95, 0.97], "cold_s": 60.0, "graph_breaks": 0},
            {"compiled/eager": 1.02, "compiled/eager rounds": [0.94, 1.02, 1.03], "cold_s": 70.0, "graph_breaks": 0},
            {"compiled/eager": 0.96, "compiled/eager rounds": [0.93, 0.96, 0.99], "cold_s": 80.0, "graph_breaks": 0}]
    v = mb.pooled(runs)
    assert v["compiled/eager"] == 0.96  # the median of the nine rounds, not of the three medians' mean (0.977)
    assert v["compiled/eager per process"] == [0.95, 1.02, 0.96] and v["compiled/eager worst process"] == 1.02
    assert v["cold_s"] == 70.0 and v["graph_breaks"] == 0 and v["processes"] == 3
    assert "compiled/eager rounds" not in v
    assert "MISSED" in mb._never_slower(v) and "worst of 3 processes 1.020" in mb._never_slower(v)
    assert "met" in mb._never_slower(mb.pooled([runs[0], runs[2]]))
    assert mb._spread(v) == " (processes: 0.950, 1.020, 0.960)" and mb._spread(mb.pooled(runs[:1])) == ""
    assert "met" in mb._never_slower(mb.pooled(runs[:1])) and "MISSED" in mb._never_slower(mb.pooled(runs[1:2]))
    with pytest.raises(ValueError, match="no results"):
        mb.pooled([])
    with pytest.raises(ValueError, match="processes must be an int >= 1"):
        mb.run(quick=True, compile_=False, processes=0)


def test_lm_head_bench_quick_reports_memory_and_time():
    """``--op lm_head --quick``: every number present and finite; the fused head's peak extra memory is below the
    unfused one's at the larger M (which grows with M, the fused one does not need to)."""
    from peft_kernels.bench import lm_head as lb

    res = lb.run(quick=True)
    assert [m["M"] for m in res["memory"]] == [128, 512]
    for m in res["memory"]:
        assert m["unfused_MiB"] > 0 and m["fused_MiB"] >= 0, m
    big = res["memory"][-1]
    assert big["fused_MiB"] < big["unfused_MiB"], big
    assert 0 < res["time"]["fused/unfused"] < 100
    text = lb.format_report(res)
    assert "| 512 |" in text and "fused / unfused" in text


def test_siblings_bench_quick_reports_every_provider():
    pytest.importorskip("peft")
    from peft_kernels.bench import siblings as sb

    res = sb.run(quick=True)
    assert len(res["cases"]) == 4
    for case in res["cases"].values():
        assert set(case) == {"fused", "ours separate", "PEFT separate", "frozen base", "frozen stacked", "floor",
                             "bound"}
        assert case["fused"]["still fused"]  # the group ran fused, not its fallback
        assert case["fused"]["launches"] < case["ours separate"]["launches"]
        # the floors run the frozen GEMMs alone: fewer ops than any LoRA provider, the stacked one fewest
        assert case["frozen stacked"]["launches"] < case["frozen base"]["launches"] < case["fused"]["launches"]
        rows = [v for v in case.values() if isinstance(v, dict)]
        assert all(v["ms"] > 0 and 0 < v["vs PEFT"] < 100 for v in rows)
        assert case["floor"] == min(case["frozen base"]["vs separate"], case["frozen stacked"]["vs separate"])
        assert case["bound"] == case["floor"] * (1 + sb.lora_flop_share(128, (128, 32, 32), 16))
    assert set(res["multi"]) == {"M=16", "M=64"}
    for c in res["multi"].values():  # multi-adapter serving: the group ran fused and agreed with the separate layers
        assert c["still fused"] and c["max_rel_diff"] < 1e-5 and c["fused"]["ms"] > 0 and c["separate"]["ms"] > 0
    assert len(sb.targets(res)) == 6 and "Multi-adapter" in sb.format_report(res)
    # the bench shape (K 1024, q 1024, k/v 256, r 16): LoRA FLOPs per token 3·1024·48 + 3·1536·16 = 221184 over the
    # frozen GEMMs' 2·1024·1536 = 3145728, counted by hand
    assert abs(sb.lora_flop_share(1024, (1024, 256, 256), 16) - 0.0703125) < 1e-12


def test_siblings_bench_pools_fresh_processes():
    """``--op siblings --processes N``: every ratio is the median over all rounds of all processes, each process's
    ratio kept beside it; floor and bound come from the pooled ratios; two real quick runs in fresh processes."""
    pytest.importorskip("peft")
    import statistics

    from peft_kernels.bench import siblings as sb

    res = sb.run_in_processes(2, rounds=3, quick=True)
    assert res["processes"] == 2 and len(res["cases"]) == 4 and set(res["multi"]) == {"M=16", "M=64"}
    parts = []
    for _ in range(2):  # the same structure from two more in-process runs, pooled here against a hand median
        parts.append(sb.run(quick=True, rounds=3))
    pooled = sb.pool(parts)
    for ck, case in pooled["cases"].items():
        for k in ("fused", "ours separate", "PEFT separate", "frozen base", "frozen stacked"):
            rounds = parts[0]["cases"][ck][k]["vs separate rounds"] + parts[1]["cases"][ck][k]["vs separate rounds"]
            assert len(rounds) == 6 and case[k]["vs separate"] == statistics.median(rounds)
            assert case[k]["vs separate per process"] == [p["cases"][ck][k]["vs separate"] for p in parts]
        assert case["ours separate"]["vs separate"] == 1.0
        assert case["floor"] == min(case["frozen base"]["vs separate"], case["frozen stacked"]["vs separate"])
        assert case["fused"]["still fused"]
    for mk, c in pooled["multi"].items():
        rounds = parts[0]["multi"][mk]["fused/separate rounds"] + parts[1]["multi"][mk]["fused/separate rounds"]
        assert c["fused/separate"] == statistics.median(rounds) and len(c["fused/separate per process"]) == 2
    text = sb.format_report(pooled)
    assert "in each of 2 fresh processes" in text and len(sb.targets(pooled)) == 6
    with pytest.raises(ValueError, match="no results"):
        sb.pool([])
    with pytest.raises(ValueError, match="processes must be an int >= 1"):
        sb.main(None, True, None, processes=0)


def test_moe_bench_quick_reports_against_peft():
    pytest.importorskip("peft")
    from peft_kernels.bench import moe as mb

    res = mb.run(quick=True)
    assert res["max_rel_diff"] < 1e-4  # ours and PEFT compute the same function before they are timed
    assert 0 < res["ours/PEFT"] < 100 and set(res["ms"]) == {"ours", "PEFT", "frozen experts"}
    gm = res["gpu_model"]
    assert 0 < gm["base_ms"] < gm["ours_ms"] < gm["peft_ms"]
    assert len(mb.targets(res)) == 2 and "roofline" in mb.format_report(res)
