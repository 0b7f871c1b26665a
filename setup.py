"""Build script for peft_kernels.

The package is pure Python + Triton and installs on any machine. The compiled extension
(csrc/: CPU C++ and CUDA kernels behind TORCH_LIBRARY ops) is a later milestone; csrc/ holds
only its skeleton today, so nothing here needs a compiler, a GPU or a CUDA torch.

Install for development with the CPU torch already in the environment:

    pip install --no-build-isolation -e .
"""
from setuptools import find_packages, setup

setup(
    name="peft_kernels",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for parameter-efficient fine-tuning (LoRA and friends)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["peft_kernels", "peft_kernels.*"]),
    python_requires=">=3.9",
    # torch is not pinned here on purpose: pip must never resolve a bare `torch` (multi-GB CUDA build).
    install_requires=["numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "peft==0.21.0", "ninja"],
        "bench": ["peft==0.21.0"],
    },
)
