"""Thin wrapper: ``python benchmarks/adapter.py [args]`` == ``python -m peft_kernels.bench --op adapter [args]``
(the same library code; see ``python -m peft_kernels.bench --help``)."""
import sys

from peft_kernels.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--op", "adapter", *sys.argv[1:]]))
