"""Benchmark library: ``python -m peft_kernels.bench`` (``make bench``)."""
