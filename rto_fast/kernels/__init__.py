"""Triton kernels of rto_fast, installed as `rto_fast.kernels`.

Each module holds `@triton.jit` kernels and their Python launchers only; input checks, autograd and backend
dispatch live in `rto_fast.ops`. Modules import triton at import time, so import them lazily.
"""
