"""Build script for peft_kernels.

The package is pure Python + Triton and installs on any machine. When torch is importable and a
C++ compiler works, it also builds ``peft_kernels._C``: the C++ kernels in ``csrc/`` behind
``TORCH_LIBRARY`` ops. With a CPU torch that is a ``CppExtension`` (csrc/cpu); with a CUDA torch and
a CUDA toolkit, a ``CUDAExtension`` that adds csrc/cuda (the BGMV/SGMV gathers and the LoRA expand
epilogue). If the build fails the package still installs without it and the pure-torch path is used
(``python -m peft_kernels info`` says which).

Environment:
  PEFT_KERNELS_CPP=0        skip the compiled extension entirely
  PEFT_KERNELS_CUDA=0|1     force the CPU-only / the CUDA build (default: CUDA when torch has CUDA and a
                            toolkit is found); with 1 a failed CUDA build is an error, not a warning
  TORCH_CUDA_ARCH_LIST      CUDA archs (default: the GPUs visible now, e.g. "9.0" on an H100/H200; with none
                            visible "8.0;8.6;8.9;9.0+PTX")
  CUDA_HOME                 the toolkit root (the folder with bin/ptxas and include/cuda_runtime.h)
  MAX_JOBS                  parallel compile jobs (ninja; default: one per CPU core)
  PEFT_KERNELS_SANITIZE=1   a debug CPU build with AddressSanitizer and UBSan (`make asan-test`; load it with
                            libasan preloaded); a failed build is an error

The CUDA build uses whatever CUDA torch is installed (torch 2.11-2.14, CUDA 12.x or 13.x): its headers,
its C++ standard (C++20 from torch 2.14, C++17 before) and a toolkit whose major version matches
torch.version.cuda (torch's own check refuses a mismatch).

Install for development with the torch already in the environment (never let pip resolve a bare
``torch``: that is a multi-GB CUDA build):

    pip install --no-build-isolation -e .
    pip wheel . --no-build-isolation --no-deps -w dist      # a wheel
"""
import glob
import os
import platform
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _want_cuda(torch_cuda: bool) -> bool:
    flag = os.environ.get("PEFT_KERNELS_CUDA", "")
    if flag == "0":
        return False
    if not torch_cuda:
        if flag == "1":
            raise RuntimeError("PEFT_KERNELS_CUDA=1 but the installed torch has no CUDA (torch.version.cuda is None)")
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not os.path.isfile(os.path.join(CUDA_HOME, "bin", "ptxas")):
        if flag == "1":
            raise RuntimeError("PEFT_KERNELS_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the folder "
                               "with bin/ptxas and include/cuda_runtime.h")
        print("peft_kernels: torch has CUDA but no CUDA toolkit was found (CUDA_HOME); building the CPU "
              "extension only", file=sys.stderr)
        return False
    return True


def _visible_archs() -> str:
    """The archs of the GPUs visible now ("9.0" on an H100/H200), so a build on a GPU machine compiles for
    that GPU only (fast); "" when none is visible."""
    try:
        import torch

        if not torch.cuda.is_available():
            return ""
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps)
    except Exception:  # noqa: BLE001 - no driver, no devices: fall back to the default list
        return ""


def _ext_modules():
    if os.environ.get("PEFT_KERNELS_CPP", "1") == "0":
        print("peft_kernels: PEFT_KERNELS_CPP=0, skipping the C++ extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("peft_kernels: torch not importable at build time (use --no-build-isolation); "
              "installing without the C++ extension", file=sys.stderr)
        return [], {}
    cuda = _want_cuda(torch.version.cuda is not None)
    strict = (cuda and os.environ.get("PEFT_KERNELS_CUDA") == "1") or os.environ.get("PEFT_KERNELS_SANITIZE") == "1"
    # torch ≥ 2.14's headers need C++20 ("#error C++20 or later compatible compiler is required")
    tv = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    std = "-std=c++20" if tv >= (2, 14) else "-std=c++17"
    cxx = ["-O3", std]
    link = []
    sanitize = os.environ.get("PEFT_KERNELS_SANITIZE") == "1"
    if sanitize:  # make asan-test: every out-of-bounds access or undefined behaviour in csrc/cpu aborts
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        cxx = ["-O1", "-g", std] + san
        link += san
    if platform.system() == "Linux":
        cxx.append("-fopenmp")  # at::parallel_for; libgomp is the one torch already loaded
        link.append("-fopenmp")
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    sources += [os.path.join("csrc", "ops.cpp"), os.path.join("csrc", "python_module.cpp")]
    include = [os.path.join(ROOT, "csrc", "include")]
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    if cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or _visible_archs() or DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        # no quotes or ';' on a compiler command line: ops.cpp stringizes the comma-separated list
        defines = ["-DPK_WITH_CUDA", "-DPK_CUDA_ARCHS=" + archs.replace(";", ",").replace(" ", ",")]
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        ext = CUDAExtension("peft_kernels._C", sources, include_dirs=include, extra_link_args=link,
                            extra_compile_args={"cxx": cxx + defines, "nvcc": ["-O3", std]})
        print(f"peft_kernels: building the CUDA extension for TORCH_CUDA_ARCH_LIST={archs}", file=sys.stderr)
    else:
        ext = CppExtension("peft_kernels._C", sources, include_dirs=include, extra_compile_args={"cxx": cxx},
                           extra_link_args=link)

    class OptionalBuild(BuildExtension):
        """A failed C++ build is a warning, not an install failure: the torch path still works
        (except with PEFT_KERNELS_CUDA=1, where the CUDA build was asked for)."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # compiler missing or broken
                if strict:
                    raise
                print(f"peft_kernels: WARNING: C++ extension not built ({e}); the pure-torch path "
                      "will be used", file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:
                if strict:
                    raise
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
        "test": ["pytest", "peft==0.21.0", "ninja", "matplotlib", "tqdm"],
        "bench": ["peft==0.21.0", "matplotlib", "tqdm"],
    },
    zip_safe=False,
)
