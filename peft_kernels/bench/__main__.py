"""``python -m peft_kernels.bench``: benchmark every op on the current device (``make bench``).

Examples::

    python -m peft_kernels.bench                                  # the default CPU suite (< 5 min)
    python -m peft_kernels.bench --op lora --shapes llama3-8b --tokens 2048 --dtype bf16 --device cuda
    python -m peft_kernels.bench --op all --shapes 512,4096,4096,16 bert-base --modes fwd,full --out results/
    python -m peft_kernels.bench --quick --out /tmp/b             # tiny shapes: a smoke test, seconds
    python -m peft_kernels.bench --gpu-resources                  # registers/spills/smem/occupancy, no GPU

``--shapes`` takes presets (llama3-8b, mistral-7b, qwen2.5-7b, bert-base: every distinct projection of
one layer, M = --tokens, r = --rank; ``preset:proj`` for one) or explicit ``M,K,N,r``. For the adapter
op r is the bottleneck size (presets use --bottleneck). Without --shapes each op runs its issue case:
lora 512,4096,4096,16; multi_lora 256,1024,1024,16 (add --shapes 256,4096,4096,16 for the larger layer);
adapter 512,4096,4096,256;
dora 512,4096,4096,16; ia3 512,4096,4096 (r unused).
``--op model`` trains and serves all-MiniLM-L6-v2 end to end against HF PEFT (peft_kernels/bench/model.py).
``--op lm_head`` measures the fused head loss against the unfused logits (peft_kernels/bench/lm_head.py).
``--op siblings`` measures q/k/v as one sibling group against separate layers (peft_kernels/bench/siblings.py).
``--op moe`` measures LoRA on MoE expert weights against PEFT's target_parameters (peft_kernels/bench/moe.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List

import torch

from .. import dispatch
from . import report
from .cases import BUILDERS, MODES, Config
from .shapes import PRESETS, parse_shapes

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPS = tuple(BUILDERS)
DEFAULT_SHAPES = {"lora": ["512,4096,4096,16"], "multi_lora": ["256,1024,1024,16"],
                  "adapter": ["512,4096,4096,256"], "dora": ["512,4096,4096,16"], "ia3": ["512,4096,4096,1"],
                  "qlora": ["512,4096,4096,16"]}
QUICK_SHAPES = {"lora": ["40,48,56,4"], "multi_lora": ["24,40,48,4"], "adapter": ["40,48,48,8"],
                "dora": ["40,48,56,4"], "ia3": ["40,48,56,1"], "qlora": ["40,64,56,4"]}


def _csv_list(text: str, allowed, what: str) -> List[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what}: {', '.join(bad) or repr(text)} not in {', '.join(allowed)}")
    return items


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m peft_kernels.bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", choices=OPS + ("all", "meta", "model", "lm_head", "siblings", "moe"), default="all",
                    help="lora, multi_lora (mixed-batch adapters), adapter (bottleneck), dora, ia3, or all of these; "
                         "meta: the meta-learned LoRA comparison (peft_kernels.meta) and its batched inner-loop timing; "
                         "model: train and serve a real small transformer (all-MiniLM-L6-v2) against HF PEFT, eager "
                         "and compiled (several minutes); lm_head: the fused head + LoRA + cross-entropy against the "
                         "unfused computation (peak memory per token count, time); siblings: q/k/v as one sibling group "
                         "against three separate layers (ours and PEFT's); moe: LoRA on MoE expert weights against PEFT's "
                         "target_parameters")
    ap.add_argument("--no-compile", action="store_true", help="--op model: skip the torch.compile measurements")
    ap.add_argument("--processes", type=int, default=1,
                    help="--op model: run each compiled/eager pair and the serving case in this many fresh processes "
                         "and pool their rounds (the compile targets are checked on the worst process); --op siblings: "
                         "run the whole bench in this many fresh processes, pooled (default 1)")
    ap.add_argument("--shapes", nargs="+", action="extend", metavar="SHAPE",
                    help=f"presets ({', '.join(PRESETS)}; preset:proj) or M,K,N,r (default: each op's issue case)")
    ap.add_argument("--tokens", type=int, default=512, help="M for presets (default 512)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank for presets (default 16)")
    ap.add_argument("--bottleneck", type=int, default=64, help="adapter bottleneck for presets (default 64)")
    ap.add_argument("--adapters", default="1,8,32", help="multi_lora: adapter counts, comma list (default 1,8,32)")
    ap.add_argument("--placements", default="sequential,parallel", help="adapter placements (default both)")
    ap.add_argument("--ia3-scalings", default="output,input", help="ia3: output (k/v) and/or input (feed-forward)")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--device", default=None, help="default cuda when available, else cpu")
    ap.add_argument("--backends", default=None, help=f"our backends to time, comma list of "
                    f"{', '.join(b for b in dispatch.BACKENDS if b != 'auto')} (default: all; unavailable ones are "
                    f"reported with the reason)")
    ap.add_argument("--modes", default="fwd,bwd,full", help="fwd, bwd (backward alone), full (fwd+bwd); default all")
    ap.add_argument("--dropout", default="0,0.1", help="lora: dropout p values, comma list (default 0,0.1)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 10 CPU, 3 CUDA)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds per case before timing (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds (a smoke test: seconds)")
    ap.add_argument("--out", default=None, metavar="DIR", help="write bench.csv, bench.json and bench.png here")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    ap.add_argument("--gpu-resources", action="store_true",
                    help="registers/spills/shared memory/occupancy of every shipped kernel for sm_80/sm_90 (no GPU)")
    ap.add_argument("--arch", type=int, action="append", choices=[80, 90], help="--gpu-resources: arch (default both)")
    ap.add_argument("--ptxas-log", default=None, help="--gpu-resources: a CMake ptxas log (default: build it)")
    ap.add_argument("--no-cuda-kernels", action="store_true", help="--gpu-resources: Triton kernels only")
    ap.add_argument("--jobs", type=int, default=None, help="--gpu-resources: compile processes (default: CPUs)")
    ap.add_argument("--model", choices=["h200", "h100", "a100"], default=None,
                    help="GPU launch model of the LoRA linear at the Llama-3-8B shapes (programs, waves, FLOPs, "
                         "bytes, modelled time for our Triton kernels, our torch path and HF PEFT; no GPU needed), "
                         "and of 32 adapters in one batch against a per-adapter cuBLAS loop")
    ap.add_argument("--model-tokens", default="1,16,64,4096", help="--model: the M values (default 1,16,64,4096)")
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser()
    a = ap.parse_args(argv)
    if a.gpu_resources:
        return _gpu_resources(a, argv)
    if a.model:
        return _launch_model(a, argv)
    if a.op in ("model", "siblings") and a.processes < 1:
        raise SystemExit(f"--processes: must be >= 1, got {a.processes}")
    if a.op == "meta":
        return _meta(a)
    if a.op == "moe":
        from . import moe as moe_bench

        return moe_bench.main(a.rounds, a.quick, a.out)
    if a.op == "siblings":
        from . import siblings as siblings_bench

        return siblings_bench.main(a.rounds, a.quick, a.out, a.processes)
    if a.op == "lm_head":
        from . import lm_head as lm_head_bench

        return lm_head_bench.main(a.rounds, a.quick, a.out)
    if a.op == "model":
        from . import model as model_bench

        if a.threads:
            torch.set_num_threads(a.threads)
        return model_bench.main(a.rounds, a.quick, not a.no_compile, a.out, a.processes)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: torch.cuda.is_available() is False on this machine")
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    ops = OPS if a.op == "all" else (a.op,)
    try:
        modes = _csv_list(a.modes, MODES, "--modes")
        backends = _csv_list(a.backends, [b for b in dispatch.BACKENDS if b != "auto"], "--backends") \
            if a.backends else [b for b in dispatch.BACKENDS if b != "auto"]
        dropouts = [float(v) for v in a.dropout.split(",")]
        adapters = [int(v) for v in a.adapters.split(",")]
        placements = _csv_list(a.placements, ("sequential", "parallel"), "--placements")
        ia3_scalings = _csv_list(a.ia3_scalings, ("output", "input"), "--ia3-scalings")
    except (argparse.ArgumentTypeError, ValueError) as e:
        ap.error(str(e))
    if any(not 0 <= p < 1 for p in dropouts):
        ap.error(f"--dropout: each p must be in [0, 1), got {a.dropout}")
    if any(n < 1 for n in adapters):
        ap.error(f"--adapters: each count must be ≥ 1, got {a.adapters}")
    rounds = a.rounds or (3 if a.quick else (3 if device.type == "cuda" else 10))
    warmup = 1 if a.quick else a.warmup
    shapes = {}
    try:
        for op in ops:
            specs = a.shapes or (QUICK_SHAPES if a.quick else DEFAULT_SHAPES)[op]
            r_default = a.bottleneck if op == "adapter" else a.rank
            shapes[op] = parse_shapes(specs, a.tokens, r_default)
    except ValueError as e:
        ap.error(str(e))
    if a.quick and not a.shapes:
        adapters = [1, 5] if a.adapters == "1,8,32" else adapters
    cfg = Config(dtype=dtype, device=device, backends=backends, dropouts=dropouts, adapters=adapters,
                 placements=placements, ia3_scalings=ia3_scalings)
    meta = report.metadata(device, argv)
    print(f"peft_kernels benchmarks on {device} ({meta['device_name']}): torch {meta['torch']}, triton "
          f"{meta['triton']}, peft {meta['peft']}, {meta['cpu_threads']} CPU threads, commit {meta['git_commit']}")
    rows = _run(ops, shapes, cfg, modes, rounds, warmup, progress=not a.no_progress)
    print(report.format_table(rows))
    tg = report.targets(rows)
    if tg:
        print("\nIssue targets measured in this run (a report, not a test):")
        for line in tg:
            print("  " + line)
    if a.out:
        for p in report.write_outputs(a.out, rows, meta):
            print(f"wrote {p}")
    return 0


def _run(ops, shapes, cfg, modes, rounds, warmup, progress=True) -> List[dict]:
    from .runner import run_case

    t0 = time.time()
    n_cases = 0
    for op in ops:
        per_shape = {"lora": len(cfg.dropouts), "multi_lora": len(cfg.adapters), "adapter": len(cfg.placements),
                     "dora": 1, "ia3": len(cfg.ia3_scalings), "qlora": 1}[op]
        n_cases += per_shape * len(shapes[op])
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=n_cases * len(modes), unit="case", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            bar = None

    def step(label):
        if bar is not None:
            bar.set_description(label[:60])
            bar.update(0)

    rows: List[dict] = []
    for op in ops:
        for shape in shapes[op]:
            for case in BUILDERS[op](shape, cfg):
                rows += run_case(case, modes, rounds, warmup, progress=step)
                if bar is not None:
                    bar.update(len(modes))
                del case  # free its weights before the next case is built
    if bar is not None:
        bar.close()
    print(f"({n_cases} cases × {len(modes)} modes in {time.time() - t0:.0f} s, {rounds} rounds each)")
    return rows


def _meta(a) -> int:
    from .. import meta

    cfg = meta.Config.quick() if a.quick else meta.Config()
    meta.run(cfg)
    n = cfg.meta_batch
    t = meta.time_inner_loop(cfg, tasks_n=n, steps=cfg.inner_steps_train)
    print(f"\ninner loops of {n} tasks × {cfg.inner_steps_train} SGD steps (best of 3): one batched MultiLoRALinear pass "
          f"per step {t['batched'] * 1e3:.1f} ms, one task at a time {t['one task at a time'] * 1e3:.1f} ms "
          f"({t['one task at a time'] / t['batched']:.1f}× slower)")
    return 0


def _launch_model(a, argv) -> int:
    import os

    if os.environ.get("TRITON_INTERPRET"):  # the launchers must see the GPU configs, not the interpreter's
        from .gpu_resources import reexec_without_interpreter
        return reexec_without_interpreter(argv)
    from . import launch_model as LM

    dtype = DTYPES[a.dtype] if a.dtype else torch.bfloat16
    try:
        tokens = tuple(int(v) for v in a.model_tokens.split(","))
    except ValueError:
        raise SystemExit(f"--model-tokens: a comma list of ints, got {a.model_tokens!r}")
    if any(m < 1 for m in tokens):
        raise SystemExit(f"--model-tokens: each M must be ≥ 1, got {a.model_tokens!r}")
    rows = LM.model_lora(LM.GPUS[a.model], tokens=tokens, r=a.rank, dtype=dtype)
    print(LM.format_model(rows))
    multi = LM.model_multi_lora(LM.GPUS[a.model], r=a.rank, dtype=dtype)
    print()
    print(LM.format_multi_model(multi))
    waves = LM.other_op_waves(LM.GPUS[a.model], tokens=tokens, r=a.rank, dtype=dtype)
    print()
    print(LM.format_waves(waves))
    if a.out:
        for p in LM.write_model(a.out, rows) + LM.write_model(a.out, multi, "model_multi"):
            print(f"wrote {p}")
        import json
        path = os.path.join(a.out, "model_waves.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(waves, f, indent=1)
        os.replace(tmp, path)
        print(f"wrote {path}")
    return 0


def _gpu_resources(a, argv) -> int:
    import os

    if os.environ.get("TRITON_INTERPRET"):
        from .gpu_resources import reexec_without_interpreter
        return reexec_without_interpreter(argv)
    from . import gpu_resources as G

    archs = tuple(a.arch or (80, 90))
    ops = None if a.op == "all" else (a.op,)
    t0 = time.time()
    rows = G.triton_rows(archs, ops, quick=a.quick, jobs=a.jobs)
    cuda_note = None
    if not a.no_cuda_kernels and a.op in ("all", "multi_lora"):
        from .. import cuda_build
        why = None if a.ptxas_log else cuda_build.missing_tools()
        if why:
            cuda_note = f"CUDA C++ kernels not reported: {why}"
        else:
            rows += G.cuda_rows(a.ptxas_log, archs=archs)
    print(G.format_rows(rows))
    print()
    for line in G.summary(rows):
        print(line)
    if cuda_note:
        print(cuda_note)
    print(f"({time.time() - t0:.0f} s)")
    if a.out:
        import csv
        import json
        os.makedirs(a.out, exist_ok=True)
        data = [r.as_dict() for r in rows]
        with open(os.path.join(a.out, "gpu_resources.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0]))
            w.writeheader()
            w.writerows(data)
        with open(os.path.join(a.out, "gpu_resources.json"), "w") as f:
            json.dump({"metadata": report.metadata(torch.device("cpu"), argv), "rows": data}, f, indent=1)
        print(f"wrote {os.path.join(a.out, 'gpu_resources.csv')} and .json")
    bad = [r for r in rows if r.spills]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
