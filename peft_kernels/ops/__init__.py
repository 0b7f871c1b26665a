"""Ops: one file per op family, each with its autograd.Function and per-backend launch."""
