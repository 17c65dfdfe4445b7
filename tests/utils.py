"""Helpers shared by the tests: error budgets derived from data, poisoned buffers, fresh random inputs."""

from __future__ import annotations

import torch

EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def assert_within_budget(actual, expected64, baseline=None, *, dtype=torch.float32, name="output", slack=2.0):
    """Fail unless |actual - expected64| <= slack * (|baseline - expected64| + eps(dtype) * max|expected64|).

    `expected64` is the float64 reference; `baseline` is what plain PyTorch computes at the same input precision
    (for example `reference.token_logprobs(logits)` on the bf16 logits, which runs in float32). The budget is the
    error plain PyTorch makes plus one rounding step of the input dtype, times `slack` (attention-gym's rule).
    """
    expected64 = expected64.double()
    actual = actual.double()
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = expected64.abs().max().item() if expected64.numel() else 0.0
    baseline_error = (baseline.double() - expected64).abs().max().item() if baseline is not None else 0.0
    budget = slack * (baseline_error + EPS[dtype] * max(scale, 1.0))
    error = (actual - expected64).abs().max().item() if actual.numel() else 0.0
    assert error <= budget, f"{name}: max error {error:.3e} exceeds budget {budget:.3e} (baseline {baseline_error:.3e})"


def poison_like(tensor: torch.Tensor) -> torch.Tensor:
    """An uninitialised-looking buffer full of NaN: a kernel that skips an element leaves it visible."""
    return torch.full_like(tensor, float("nan"))


def cpu_isas() -> list[str]:
    """The instruction-set copies of rto_fast._C's vectorized CPU code that this CPU runs (baseline first)."""
    from rto_fast import _C

    names = ["baseline", "avx2", "avx512"]
    return names[: names.index(_C.cpu_isa()) + 1]


def storage_pointers(model) -> list[int]:
    """Where each parameter and buffer of `model` lives (to tell host tensors from device copies)."""
    return [tensor.data_ptr() for tensor in [*model.parameters(), *model.buffers()]]
