"""Thin wrapper: ``python benchmarks/lora_linear.py [args]`` == ``python -m peft_kernels.bench [args]``."""
import sys

from peft_kernels.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
