"""Orchestration of gpu-check: build ``_C``, run the groups in worker processes, time, report.

Workers are separate processes (``python -m peft_kernels.gpucheck --worker GROUP ...``) that write one JSON
line per finished group, so a crash (an illegal address poisons its CUDA context) costs that group only and
is reported with the worker's exit code and last output. Correctness groups run several at a time (they
compile their Triton kernels in parallel; the file cache is shared); the speed run goes last, alone on the
GPU, after its kernels were compiled by a warm-up group.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import fnmatch
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEED = "speed"
SPEED_WARMUP = "speed-warmup"


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------
def _worker(groups: List[str], dry: bool, results: str) -> int:
    from . import cases

    for name in groups:
        t0 = time.perf_counter()
        if name in (SPEED, SPEED_WARMUP):
            from . import speed

            try:
                if name == SPEED_WARMUP:  # compile every kernel the speed run uses (one short pass)
                    speed.run(dry) if dry else _speed_warmup()
                    rec = {"group": name, "checks": [cases.fact("speed warm-up", True, "compiled")]}
                else:
                    rec = {"group": name, "speed": speed.run(dry), "checks": []}
            except Exception as e:  # noqa: BLE001
                import traceback

                rec = {"group": name, "checks": [cases.fact(name, False, f"{type(e).__name__}: {e}\n"
                                                                        f"{traceback.format_exc(limit=5)[-1500:]}")]}
        else:
            rec = {"group": name, "checks": cases.run_group(name, dry)}
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        with open(results, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
    return 0


def _speed_warmup() -> None:
    import torch

    from . import speed

    dev, dt = torch.device("cuda"), torch.bfloat16
    speed.time_linear(dev, dt, speed.SHAPES, speed.TOKENS, ("triton", "torch"), reps=1, warmup=0)
    speed.time_gemm(dev, dt, speed.SHAPES, 4096, reps=1, warmup=0)


# --------------------------------------------------------------------------------------------
# orchestrator side
# --------------------------------------------------------------------------------------------
def _env_for(dry: bool) -> dict:
    env = dict(os.environ)
    env.pop("PEFT_KERNELS_BACKEND", None)  # the cases choose backends explicitly
    if dry:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_worker(groups: List[str], dry: bool, timeout: float, workdir: str) -> Dict[str, dict]:
    fd, path = tempfile.mkstemp(prefix="gpucheck-", suffix=".jsonl", dir=workdir)
    os.close(fd)
    cmd = [sys.executable, "-m", "peft_kernels.gpucheck", "--worker", *groups, "--results", path] + \
        (["--dry-run"] if dry else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=_env_for(dry), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", f"worker killed after {timeout:.0f} s\n" + str((e.stdout or b"")[-1000:]) + \
            str((e.stderr or b"")[-2000:])
    done = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rec = json.loads(line)
                done[rec["group"]] = rec
    os.unlink(path)
    from .cases import fact

    for g in groups:  # groups the worker never finished: the crash (or timeout) is their failure
        if g not in done:
            done[g] = {"group": g, "seconds": round(time.perf_counter() - t0, 2), "checks": [
                fact("worker finished the group", False, f"worker exit code {rc} while running {g} "
                     f"(or before it); last output:\n{tail}")]}
            for c in done[g]["checks"]:
                c["group"] = g
    return done


def build_extension(log_path: str, dry: bool) -> dict:
    """Build peft_kernels._C in place with CUDA for this machine's GPU (ninja, one job per core)."""
    if dry:
        return {"ok": True, "seconds": 0.0, "note": "dry run: no CUDA build (the CPU extension is used as installed)"}
    import torch

    env = dict(os.environ)
    major, minor = torch.cuda.get_device_capability()
    env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    env["PEFT_KERNELS_CUDA"] = "1"
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    with open(log_path, "w") as f:
        f.write(proc.stdout + proc.stderr)
    ok = proc.returncode == 0
    return {"ok": ok, "seconds": round(time.perf_counter() - t0, 1),
            "note": f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} MAX_JOBS={env['MAX_JOBS']}" +
                    ("" if ok else f"; failed, exit {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")}


def source_hash(root: str = ROOT) -> str:
    """sha256 (12 hex) of the library's sources (peft_kernels/**/*.py, csrc/**), paths and contents: names the
    tree that ran even where the copy's .git is stale (the device machine's was, on 2026-12-01).
    ``python -m peft_kernels.gpucheck --source-hash`` prints it for a checkout."""
    import hashlib

    h = hashlib.sha256()
    for top, exts in (("peft_kernels", (".py",)), ("csrc", (".cpp", ".cu", ".h", ".cuh"))):
        base = os.path.join(root, top)
        files = []
        for d, _, names in os.walk(base):
            files += [os.path.join(d, n) for n in names if n.endswith(exts)]
        for f in sorted(files):
            h.update(os.path.relpath(f, root).replace(os.sep, "/").encode() + b"\0")
            with open(f, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:12]


def environment(dry: bool) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "dry_run": dry, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    if not dry and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gb=round(p.total_memory / 2 ** 30, 1))
    else:
        info["device"] = "cpu (dry run)"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip() or None
    except OSError:
        info["commit"] = None
    info["source_hash"] = source_hash()
    return info


def _fmt(v, spec=".3g"):
    return "—" if v is None else format(v, spec)


def write_report(out_dir: str, report: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for name, text in (("gpucheck.json", json.dumps(report, indent=1, default=str)), ("gpucheck.md", _markdown(report))):
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))  # atomic: a reader never sees half a report


def _markdown(rep: dict) -> str:
    env = rep["environment"]
    checks = rep["checks"]
    failed = [c for c in checks if not c["ok"]]
    skipped = [c for c in checks if c.get("skipped")]
    lines = [f"# gpu-check: {'PASS' if rep['ok'] else 'FAIL'}{' (dry run on the CPU)' if env.get('dry_run') else ''}", "",
             f"{env.get('device')} · torch {env.get('torch')} (CUDA {env.get('cuda')}) · triton {env.get('triton')} · "
             f"peft {env.get('peft')} · python {env.get('python')} · commit {env.get('commit')} · sources "
             f"{env.get('source_hash')} · {env.get('date')}",
             "", f"{len(checks)} checks, {len(failed)} failed, {len(skipped)} skipped; {rep['seconds']:.0f} s in all "
             f"(build {rep['build']['seconds']} s: {'ok' if rep['build']['ok'] else 'FAILED'}; {rep['build']['note'][:300]})",
             ""]
    if failed:
        lines += ["## Failures", "", "| group | case | error | bound | note |", "|---|---|---|---|---|"]
        for c in failed:
            note = str(c.get("note", "")).replace("\n", " ").replace("|", "\\|")[:600]
            lines.append(f"| {c['group']} | {c['case']} | {_fmt(c.get('err'))} | {_fmt(c.get('bound'))} | {note} |")
        lines.append("")
    lines += ["## Correctness", "", "Error = max |ours − fp64 reference|; bound = the limit × the error of PyTorch at "
              "the same precision on the same inputs.", "", "| group | case | ok | error | bound | note |",
              "|---|---|---|---|---|---|"]
    for c in checks:
        note = str(c.get("note", "")).replace("\n", " ").replace("|", "\\|")[:200]
        mark = "skipped" if c.get("skipped") else ("✓" if c["ok"] else "✗")
        lines.append(f"| {c['group']} | {c['case']} | {mark} | {_fmt(c.get('err'))} | "
                     f"{_fmt(c.get('bound'))} | {note} |")
    sp = rep.get("speed") or {}
    if sp.get("linear"):
        lines += ["", "## Speed (bf16, median of CUDA-event timings, r=16)" if not env.get("dry_run") else
                  "## Speed (dry run: fp32 on the CPU under the interpreter, wall clock: proves the script, measures "
                  "nothing)", "",
                  "| shape | M | mode | provider | µs | × frozen | × PEFT | note |", "|---|---|---|---|---|---|---|---|"]
        for r in sp["linear"]:
            us = None if r.get("seconds") is None else r["seconds"] * 1e6
            lines.append(f"| {r['shape']} ({r['K']}→{r['N']}) | {r['M']} | {r['mode']} | {r['provider']} | "
                         f"{_fmt(us, '.1f')} | {_fmt(r.get('vs_frozen'), '.3f')} | {_fmt(r.get('vs_peft'), '.3f')} | "
                         f"{r.get('note', '')} |")
        auto = [r for r in sp["linear"] if r["provider"] == "auto" and r.get("vs_best_ours")]
        if auto:
            lines += ["", "## \"auto\" (the measured dispatch) against the faster of triton and torch", "",
                      "| shape | M | mode | auto / best | × PEFT |", "|---|---|---|---|---|"]
            lines += [f"| {r['shape']} | {r['M']} | {r['mode']} | {r['vs_best_ours']:.3f} | {_fmt(r.get('vs_peft'), '.3f')} |"
                      for r in auto]
    if sp.get("gemm"):
        lines += ["", "## The Triton base GEMMs alone against torch.mm (cp.async; persistent TMA on sm_90)", "",
                  "| shape | M×K×N | torch.mm µs | cp.async µs | cp.async / mm | TMA µs | TMA / mm | "
                  "TFLOP/s (mm, cp.async, TMA) | max |Δ| (cp.async, TMA) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sp["gemm"]:
            tma = (f"{r['tma_s'] * 1e6:.1f} | {r['tma_vs_mm']:.3f}" if "tma_s" in r else f"– | {r.get('tma_note', '')}")
            lines.append(f"| {r['shape']} | {r['M']}×{r['K']}×{r['N']} | {r['torch_mm_s'] * 1e6:.1f} | "
                         f"{r['triton_s'] * 1e6:.1f} | {r['triton_vs_mm']:.3f} | {tma} | {r['mm_tflops']:.0f}, "
                         f"{r['triton_tflops']:.0f}, {_fmt(r.get('tma_tflops'), '.0f')} | {r['max_abs_diff']:.3g}, "
                         f"{_fmt(r.get('tma_max_abs_diff'), '.3g')} |")
    if sp.get("memory"):
        m0 = sp["memory"][0]
        lines += ["", f"## Peak memory of one forward+backward (M={m0.get('M')}, K={m0.get('K')}, N={m0.get('N')}, "
                  f"r={m0.get('r')})", "", "| provider | peak above inputs (MiB) | note |", "|---|---|---|"]
        for r in sp["memory"]:
            mib = None if r["peak_bytes"] is None else r["peak_bytes"] / 2 ** 20
            lines.append(f"| {r['provider']} | {_fmt(mib, '.1f')} | {r.get('note', '')} |")
    if sp.get("dropout"):
        d0 = sp["dropout"][0]
        lines += ["", f"## Dropout p={d0['p']}: forward+backward (M={d0['M']}, K={d0['K']}, N={d0['N']}, r=16)", "",
                  "| provider | µs at p=0 | µs at p | p / p=0 | × PEFT (bf16 adapters) | note |",
                  "|---|---|---|---|---|---|"]
        for r in sp["dropout"]:
            us0 = None if r.get("seconds_p0") is None else r["seconds_p0"] * 1e6
            us = None if r.get("seconds") is None else r["seconds"] * 1e6
            lines.append(f"| {r['provider']} | {_fmt(us0, '.1f')} | {_fmt(us, '.1f')} | {_fmt(r.get('dropout_cost'), '.3f')} "
                         f"| {_fmt(r.get('vs_peft_bf16'), '.3f')} | {r.get('note', '')} |")
    if sp.get("multi"):
        m0 = sp["multi"][0]
        lines += ["", f"## Multi-adapter: {m0['S']} adapters, r={m0['r']}, K={m0['K']}, N={m0['N']}, against a "
                  "per-adapter loop on cuBLAS", "", "| batch | T | mode | provider | µs | × loop | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in sp["multi"]:
            us = None if r.get("seconds") is None else r["seconds"] * 1e6
            lines.append(f"| {r['batch']} | {r['T']} | {r['mode']} | {r['provider']} | {_fmt(us, '.1f')} | "
                         f"{_fmt(r.get('vs_loop'), '.3f')} | {r.get('note', '')} |")
    if sp.get("qlora"):
        lines += ["", "## QLoRA (NF4, double quantization layout, r=16): the GEMMs dequantizing W in their mainloop against "
                  "LoRA on the dense weight (cuBLAS) and PEFT's QLoRA on bitsandbytes", "",
                  "| shape | M | mode | provider | µs | × dense LoRA | note |", "|---|---|---|---|---|---|---|"]
        for r in sp["qlora"]:
            us = None if r.get("seconds") is None else r["seconds"] * 1e6
            lines.append(f"| {r['shape']} | {r['M']} | {r['mode']} | {r['provider']} | {_fmt(us, '.1f')} | "
                         f"{_fmt(r.get('vs_dense'), '.3f')} | {r.get('note', '')} |")
    if sp.get("tuner"):
        lines += ["", "## What \"auto\" measured (its choice and the fastest round of each candidate, ms)", "",
                  "| bucket | choice | timings |", "|---|---|---|"]
        for r in sp["tuner"]:
            tm = ", ".join(f"{k} {v:.4g}" for k, v in sorted(r.get("timings_ms", {}).items(), key=lambda kv: kv[1]))
            lines.append(f"| {r['entry'].replace('|', ' ')} | {r.get('choice')} | {tm} |")
    lines += ["", "## Groups", "", "| group | seconds | checks | failed |", "|---|---|---|---|"]
    for g, rec in rep["groups"].items():
        n = len(rec.get("checks", []))
        nf = sum(not c["ok"] for c in rec.get("checks", []))
        lines.append(f"| {g} | {rec.get('seconds', '—')} | {n} | {nf} |")
    return "\n".join(lines) + "\n"


def orchestrate(args) -> int:
    from . import cases

    t_start = time.perf_counter()
    dry = args.dry_run
    os.makedirs(args.out, exist_ok=True)
    env = environment(dry)
    build = build_extension(os.path.join(args.out, "build.log"), dry) if args.build else \
        {"ok": True, "seconds": 0.0, "note": "not built by this run (--no-build)"}
    groups = [g for g in cases.correctness_groups() if any(fnmatch.fnmatch(g, p) for p in args.groups)]
    if args.selftest:
        groups += ["selftest/fail", "selftest/crash"]
    want_speed = not args.skip_speed
    parallel = groups + ([SPEED_WARMUP] if want_speed and not dry else [])
    jobs = args.jobs or (2 if dry else max(1, min(12, (os.cpu_count() or 2) - 2)))
    # a dry run packs the groups into `jobs` workers (each pays one import); on a GPU each group is its own worker
    chunks = [parallel[i::jobs] for i in range(jobs)] if dry else [[g] for g in parallel]
    results: Dict[str, dict] = {}
    deadline = t_start + args.budget
    with tempfile.TemporaryDirectory() as work, cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        futs = {}
        for ch in (c for c in chunks if c):
            futs[pool.submit(_run_worker, ch, dry, max(30.0, deadline - time.perf_counter()), work)] = ch
        for fut in cf.as_completed(futs):
            results.update(fut.result())
            done = sum(len(v.get("checks", [])) for v in results.values())
            print(f"[{time.perf_counter() - t_start:6.1f}s] {len(results)}/{len(parallel)} groups, {done} checks",
                  flush=True)
        speed_res = None
        if want_speed:
            left = deadline - time.perf_counter()
            if left < 20:
                results[SPEED] = {"group": SPEED, "seconds": 0, "checks": [cases.fact(
                    "speed table", False, f"not run: the {args.budget:.0f} s budget was spent")]}
            else:
                results.update(_run_worker([SPEED], dry, left, work))
                speed_res = results[SPEED].get("speed")
    checks = []
    for g in parallel + ([SPEED] if want_speed else []):
        for c in results.get(g, {}).get("checks", []):
            c.setdefault("group", g)
            checks.append(c)
    if not build["ok"]:
        checks.insert(0, {"group": "build", "case": "peft_kernels._C with CUDA", "ok": False, "err": None,
                          "bound": None, "note": build["note"]})
    ok = all(c["ok"] for c in checks) and bool(checks)
    report = {"ok": ok, "seconds": round(time.perf_counter() - t_start, 1), "environment": env, "build": build,
              "checks": checks, "speed": speed_res, "groups": results}
    write_report(args.out, report)
    nf = sum(not c["ok"] for c in checks)
    print(f"gpu-check: {len(checks)} checks, {nf} failed, {report['seconds']:.0f} s -> "
          f"{os.path.join(args.out, 'gpucheck.md')}")
    for c in checks:
        if not c["ok"]:
            print(f"  FAILED {c['group']}: {c['case']}: {str(c.get('note', ''))[:300]}")
    return 0 if ok else 1


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peft_kernels.gpucheck",
                                 description="Correctness against fp64 and speed of every op on this GPU "
                                             "(--dry-run: the same code on the CPU, tiny shapes, interpreter)")
    ap.add_argument("--out", default="gpucheck-out", help="folder for gpucheck.json, gpucheck.md, build.log")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    ap.add_argument("--no-build", dest="build", action="store_false",
                    help="do not build peft_kernels._C with CUDA first (use the one installed)")
    ap.add_argument("--jobs", type=int, default=0, help="worker processes at once (default: cores - 2, ≤ 12; 2 dry)")
    ap.add_argument("--groups", nargs="*", default=["*"], help="glob patterns of the groups to run (default all)")
    ap.add_argument("--skip-speed", action="store_true", help="correctness only")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    ap.add_argument("--list", action="store_true", help="list the groups and exit")
    ap.add_argument("--source-hash", action="store_true", help="print the hash of this tree's sources and exit")
    ap.add_argument("--selftest", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--results", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args.worker, args.dry_run, args.results)
    if args.source_hash:
        print(source_hash())
        return 0
    if args.list:
        from . import cases

        print("\n".join(cases.correctness_groups() + [SPEED_WARMUP, SPEED]))
        return 0
    if args.jobs < 0:
        ap.error("--jobs must be ≥ 0")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); use --dry-run to check the "
                  "script on the CPU", file=sys.stderr)
            return 2
    return orchestrate(args)
