"""Thin wrapper: ``python benchmarks/gpu_resources.py [args]`` == ``python -m peft_kernels.bench --gpu-resources [args]``:
registers, spills, shared memory and theoretical occupancy of every shipped kernel on sm_80/sm_90, no GPU needed."""
import sys

from peft_kernels.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--gpu-resources", *sys.argv[1:]]))
