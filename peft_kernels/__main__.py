"""``python -m peft_kernels info``: versions, what was built, and which backend runs where."""
from __future__ import annotations

import argparse
import importlib.util
import platform
import sys


def info() -> str:
    import torch

    from . import __version__, dispatch

    lines = [f"peft_kernels {__version__}", f"python {platform.python_version()}  torch {torch.__version__}"]
    tri = importlib.util.find_spec("triton")
    if tri is not None:
        import triton

        lines.append(f"triton {triton.__version__}  (interpreter {'on' if dispatch.interpreting() else 'off'})")
        from .kernels import _common

        lines.append(f"fp32 dots follow torch's fp32 matmul precision: {_common.torch_fp32_precision()} "
                     f"(fp32 adapters on a 16-bit base: {_common.f32_precision(torch.float32, torch.bfloat16)})")
        for dev in ["cpu"] + ([f"cuda:{torch.cuda.current_device()}"] if torch.cuda.is_available() else []):
            why = _common.tma_unavailable_reason(torch.device(dev))
            lines.append(f"persistent TMA GEMMs (16-bit LoRA/DoRA past decode) on {dev}: "
                         + ("used" if why is None else f"not used: {why}"))
    else:
        lines.append("triton not installed")
    lines.append(f"CUDA available: {torch.cuda.is_available()}")
    from . import _ext

    why = _ext.unavailable_reason()
    lines.append("compiled extension peft_kernels._C (csrc/: CPU ops for the LoRA dropout passes, multi-adapter "
                 "grouping and kernels, the BGMV/SGMV gathers; CUDA kernels when built with CUDA): "
                 + ("loaded" if why is None else f"not available: {why}"))
    if why is None:
        built = _ext.build_info()
        lines.append("  built with CUDA for archs " + built.split(" ", 1)[1] if built.startswith("cuda")
                     else "  built without CUDA (CPU kernels only; see the README for the CUDA build)")
        lines.append(f"  CPU fp32 micro-kernels: {_ext.ops().cpu_isa('')} variant")
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        lines.append(dispatch.explain("auto", dev, choices=False))
    lines.append(f"'auto' is measured on: {', '.join(dispatch.TUNER.devices)}; " + dispatch.describe_choices())
    from .ops.ia3 import SUPPORTED as IA3
    from .ops.multi_lora import SUPPORTED as MULTI
    from .ops.qlora import SUPPORTED as QLORA

    found = []
    for lib in ("bitsandbytes", "torchao"):
        if importlib.util.find_spec(lib) is None:
            found.append(f"{lib} not installed")
            continue
        try:
            from importlib.metadata import version

            found.append(f"{lib} {version(lib)}")
        except Exception:  # noqa: BLE001 - a broken install is reported, not fatal
            found.append(f"{lib} (version unknown)")
    from . import quant

    lines.append(f"quantized frozen bases (QLoRA; {'; '.join(found)}): {quant.SUPPORTED}")

    lines.append("ops and the backends they have kernels for:")
    for op, sup in (("lora_linear (LoRALinear)", dispatch.DEFAULT_SUPPORTED),
                    ("dora_linear (LoRALinear(use_dora=True); its LoRA part)", dispatch.DEFAULT_SUPPORTED),
                    ("multi_lora_linear (MultiLoRALinear)", MULTI),
                    ("bottleneck_adapter / adapter_linear", dispatch.DEFAULT_SUPPORTED),
                    ("ia3_linear (IA3Linear)", IA3),
                    ("qlora_linear (LoRALinear on a quantized base)", QLORA),
                    ("PromptTuning / PrefixTuning", ("none needed: plain torch",))):
        lines.append(f"  {op:58s} {', '.join(sup)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peft_kernels")
    ap.add_argument("command", choices=["info"], nargs="?", default="info")
    ap.parse_args(argv)
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
