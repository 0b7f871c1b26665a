"""Thin wrapper: ``python benchmarks/ia3.py [args]`` == ``python -m peft_kernels.bench --op ia3 [args]``
(the same library code; see ``python -m peft_kernels.bench --help``)."""
import sys

from peft_kernels.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--op", "ia3", *sys.argv[1:]]))
