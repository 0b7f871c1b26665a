"""Thin wrapper: ``python benchmarks/lora_linear.py [args]`` == ``python -m peft_kernels.bench --op lora [args]``
(the same library code; see ``python -m peft_kernels.bench --help``)."""
import sys

from peft_kernels.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--op", "lora", *sys.argv[1:]]))
