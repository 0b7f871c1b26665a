"""Thin wrapper: ``python benchmarks/multi_lora.py [args]`` == ``python -m peft_kernels.bench --op multi_lora [args]``
(the same library code; see ``python -m peft_kernels.bench --help``)."""
import sys

from peft_kernels.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--op", "multi_lora", *sys.argv[1:]]))
