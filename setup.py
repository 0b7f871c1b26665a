"""Build script for peft_kernels.

The package is pure Python + Triton and installs on any machine. When torch is importable and a
C++ compiler works, it also builds ``peft_kernels._C``: the CPU C++ kernels in ``csrc/`` behind
``TORCH_LIBRARY`` ops (the fast CPU path for LoRA with dropout). If that build fails, or
``PEFT_KERNELS_CPP=0``, the package installs without it and the pure-torch path is used
(``python -m peft_kernels info`` says which).

Install for development with the CPU torch already in the environment:

    pip install --no-build-isolation -e .

The CUDA kernels (``csrc/cuda``, ``PEFT_KERNELS_CUDA``) are a later milestone.
"""
import glob
import os
import platform
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _ext_modules():
    if os.environ.get("PEFT_KERNELS_CPP", "1") == "0":
        print("peft_kernels: PEFT_KERNELS_CPP=0, skipping the C++ extension", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("peft_kernels: torch not importable at build time (use --no-build-isolation); "
              "installing without the C++ extension", file=sys.stderr)
        return [], {}
    cxx = ["-O3", "-std=c++17"]
    link = []
    if platform.system() == "Linux":
        cxx.append("-fopenmp")  # at::parallel_for; libgomp is the one torch already loaded
        link.append("-fopenmp")
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    sources += [os.path.join("csrc", "ops.cpp"), os.path.join("csrc", "python_module.cpp")]
    ext = CppExtension("peft_kernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc", "include")],
                       extra_compile_args={"cxx": cxx}, extra_link_args=link)

    class OptionalBuild(BuildExtension):
        """A failed C++ build is a warning, not an install failure: the torch path still works."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # compiler missing or broken
                print(f"peft_kernels: WARNING: C++ extension not built ({e}); the pure-torch path "
                      "will be used", file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:
                print(f"peft_kernels: WARNING: building {ext.name} failed ({e}); the pure-torch path "
                      "will be used", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()

setup(
    name="peft_kernels",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for parameter-efficient fine-tuning (LoRA and friends)",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["peft_kernels", "peft_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    # torch is not listed on purpose: pip must never resolve a bare `torch` (a multi-GB CUDA
    # build); install the torch you want first.
    install_requires=["numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "peft==0.21.0", "ninja"],
        "bench": ["peft==0.21.0"],
    },
    zip_safe=False,
)
