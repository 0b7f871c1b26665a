"""python -m peft_kernels.gpucheck: the script proven on the CPU (--dry-run: the same code, tiny shapes, the
Triton interpreter), its report, and that it reports failures and crashes instead of hiding them."""
import json
import os
import subprocess
import sys

import pytest
import torch

from peft_kernels.gpucheck import cases

from helpers import real_jit_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=1500):
    return subprocess.run([sys.executable, "-m", "peft_kernels.gpucheck", *args], cwd=ROOT, env=real_jit_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_end_to_end():
    """Every group and the speed table run on the CPU; gpucheck.json and gpucheck.md are written; exit 0."""
    import pathlib

    import background

    out, folder = background.run("gpucheck-dry", timeout=1500)  # started at collection (tests/background.py)
    tmp_path = pathlib.Path(folder)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    rep = json.loads((tmp_path / "gpucheck.json").read_text())
    md = (tmp_path / "gpucheck.md").read_text()
    assert rep["ok"] and rep["environment"]["dry_run"] and md.startswith("# gpu-check: PASS")
    groups = set(rep["groups"])
    assert set(cases.correctness_groups()) <= groups and "speed" in groups, groups ^ set(cases.correctness_groups())
    checks = rep["checks"]
    assert len(checks) > 500 and all(c["ok"] for c in checks)
    ran = {c["group"] for c in checks if not c.get("skipped")}
    # skipped, each with its reason: the cuda backend (no CUDA build on the CPU), and what a CPU cannot do
    skipped = [c for c in checks if c.get("skipped")]
    cpu_cannot = ("CUDA graphs", "CUDA streams", "host ints")
    assert {c["group"] for c in skipped if "built without CUDA" in c["note"]} == {g for g in groups if "/cuda" in g}
    assert all("built without CUDA" in c["note"] or any(w in c["note"] for w in cpu_cannot) for c in skipped)
    assert len(skipped) <= 11, [c["case"] for c in skipped]  # + the decode adapter on two streams
    for fam in ("lora/", "dora/", "ia3/", "bottleneck/", "multi/", "multi-skew/", "multi-graph/triton",
                "lora-dropout-graph/", "lora-past-2^31/", "bottleneck-determinism/"):
        assert any(g.startswith(fam) for g in ran), fam
    numeric = [c for c in checks if c.get("err") is not None]
    assert len(numeric) > 400 and all(c["err"] <= c["bound"] for c in numeric)
    sp = rep["speed"]
    assert {r["provider"] for r in sp["linear"]} == {"frozen", "peft", "peft-bf16", "triton", "torch", "auto"}
    assert all(r["vs_best_ours"] > 0 for r in sp["linear"] if r["provider"] == "auto")
    assert "## \"auto\" (the measured dispatch)" in md
    assert all(r["seconds"] and r["seconds"] > 0 for r in sp["linear"]), [r for r in sp["linear"] if not r["seconds"]]
    assert sp["gemm"] and sp["gemm"][0]["max_abs_diff"] < 1e-4
    assert "## Speed" in md and "## The Triton base GEMM" in md and "## Peak memory" in md


def test_failures_and_crashes_are_reported_and_the_run_goes_on(tmp_path):
    """A planted 3% error and a worker that dies mid-group are both reported with their case, the other
    groups still run and pass, and the exit code is non-zero."""
    out = _run("--dry-run", "--out", str(tmp_path), "--groups", "ia3/torch/fp32", "--selftest", "--skip-speed",
               "--jobs", "3")
    assert out.returncode == 1, out.stdout + out.stderr
    rep = json.loads((tmp_path / "gpucheck.json").read_text())
    bad = {(c["group"], c["case"]) for c in rep["checks"] if not c["ok"]}
    assert bad == {("selftest/fail", "planted 3% error"), ("selftest/crash", "worker finished the group")}, bad
    assert "worker exit code 3" in next(c["note"] for c in rep["checks"] if c["group"] == "selftest/crash")
    assert any(c["group"] == "ia3/torch/fp32" and c["ok"] for c in rep["checks"])
    md = (tmp_path / "gpucheck.md").read_text()
    assert md.startswith("# gpu-check: FAIL") and "## Failures" in md and "planted 3% error" in md
    assert "FAILED selftest/fail" in out.stdout


def test_compare_has_no_floor_that_hides_an_error():
    ref = torch.linspace(1.0, 2.0, 100, dtype=torch.float64)
    lp = ref.float()
    assert not cases.compare("3% off", ref * 1.03, ref, lp)["ok"]
    assert cases.compare("same as torch", lp, ref, lp)["ok"]
    exact = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert not cases.compare("torch exact, ours not", exact.float() + 1e-6, exact, exact.float())["ok"]
    assert not cases.compare("shape", ref[:5], ref, lp)["ok"]
    assert not cases.compare("nan", lp.clone().fill_(float("nan")), ref, lp)["ok"]


def test_without_a_gpu_the_real_run_says_so():
    if torch.cuda.is_available():
        pytest.skip("this check is for machines without CUDA")
    out = _run("--out", "/tmp/never", timeout=120)
    assert out.returncode == 2 and "no CUDA GPU here" in out.stderr and "--dry-run" in out.stderr


def test_group_list_covers_every_op_backend_and_dtype():
    g = set(cases.correctness_groups())
    for be in ("triton", "torch"):
        for op in ("lora", "dora", "ia3", "bottleneck"):
            assert {f"{op}/{be}/{d}" for d in ("fp32", "fp16", "bf16")} <= g
        assert {f"lora/{be}/bf16+fp32", f"lora/{be}/fp16+fp32"} <= g
    assert {f"multi/{be}/{d}" for be in ("triton", "cuda", "torch") for d in ("fp32", "fp16", "bf16")} <= g
    assert {"multi-graph/triton", "multi-graph/cuda", "lora-past-2^31/triton", "bottleneck-determinism/triton",
            "multi-skew/triton", "multi-skew/cuda"} <= g
    assert {f"moe/{be}/{d}" for be in ("triton", "torch") for d in ("fp32", "bf16")} <= g


def test_source_hash_names_the_tree(tmp_path):
    """The report names the sources that ran by content (the device copy's .git can be stale): equal trees
    hash equal, one changed byte (or a renamed file) changes the hash."""
    import shutil

    from peft_kernels.gpucheck import runner

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    a = tmp_path / "a"
    for top in ("peft_kernels", "csrc"):
        shutil.copytree(os.path.join(root, top), a / top, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    h = runner.source_hash(str(a))
    assert h == runner.source_hash(root) and len(h) == 12
    f = a / "csrc" / "ops.cpp"
    f.write_bytes(f.read_bytes() + b" ")
    assert runner.source_hash(str(a)) != h
    f.write_bytes(f.read_bytes()[:-1])
    assert runner.source_hash(str(a)) == h
    (a / "peft_kernels" / "dispatch.py").rename(a / "peft_kernels" / "dispatch2.py")
    assert runner.source_hash(str(a)) != h
