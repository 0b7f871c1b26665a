"""``python -m peft_kernels.gpucheck``: the proof the GPU path needs, in one command (``make gpu-check``).

It builds ``peft_kernels._C`` with CUDA for the GPU it runs on, checks every op × backend × dtype against an
fp64 reference on the GPU (LLM-sized shapes, tails, fp32 adapters on a bf16 base, TF32 through both APIs,
a case past 2³¹ output elements, determinism and concurrent streams, multi-adapter edge cases and a
CUDA-graph decode step, DoRA, IA3), times ours against a frozen ``nn.Linear`` and HF PEFT, and writes
``gpucheck.json`` and ``gpucheck.md`` to ``--out``. Every failure is reported with its case; the run goes on
to the end and exits non-zero if anything failed or did not run.

``--dry-run`` runs the same code on the CPU with tiny shapes under the Triton interpreter (the test suite
does this), so the script itself is proven without a GPU.

Layout: ``cases.py`` (the correctness groups and the speed table, shared with ``tests/test_gpu.py``),
``runner.py`` (build, worker processes, report).
"""
from .runner import main

__all__ = ["main"]
