"""Thin wrapper: ``python benchmarks/meta_lora.py [--quick]`` == ``python -m peft_kernels.bench --op meta``:
the meta-learned LoRA comparison and the batched-vs-per-task inner-loop timing."""
import sys

from peft_kernels.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--op", "meta", *sys.argv[1:]]))
