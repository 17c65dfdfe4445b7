"""The stochastic-rounding AdamW step as one fused op (the bf16 optimizer of `rto_fast.trainer.optim` calls it).

    import rto_fast.ops as ops
    if ops.fused_adamw_available(weight):
        ops.stochastic_rounding_adamw_(weight, grad, exp_avg, exp_avg_sq, seed=seed, lr=1e-5, beta1=0.9, beta2=0.999,
                                       eps=1e-8, weight_decay=0.0, step=3)

One pass over bf16 weight, gradient and both states (14 bytes of traffic per parameter): the AdamW update in float32,
then the weight and both states written back with stochastic rounding, its random bits keyed by (seed, element), so a
step is a function of its seed. Triton only (CUDA tensors, or RTO_FAST_BACKEND=triton); the torch path of the same
step lives in the optimizer, which also owns the generator the seeds come from.
"""

from __future__ import annotations

import torch

from ._common import backend_for, check_tensor

__all__ = ["stochastic_rounding_adamw_", "fused_adamw_available"]


def fused_adamw_available(weight: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether the fused step serves these tensors: the Triton backend, contiguous bf16 tensors."""
    return backend_for(weight) == "triton" and all(tensor.dtype == torch.bfloat16 and tensor.is_contiguous()
                                                   for tensor in (weight, *tensors))


def stochastic_rounding_adamw_(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                               exp_avg_sq: torch.Tensor, *, seed: int, lr: float, beta1: float, beta2: float,
                               eps: float, weight_decay: float, step: int) -> None:
    """One AdamW step in place on contiguous bf16 tensors of one shape; `step` counts from 1."""
    for name, tensor in (("weight", weight), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_tensor(name, tensor, dtypes=(torch.bfloat16,), device=weight.device)
        if tensor.shape != weight.shape or not tensor.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor of weight's shape {tuple(weight.shape)}, got "
                             f"{tuple(tensor.shape)}{'' if tensor.is_contiguous() else ' (not contiguous)'}")
    if step < 1:
        raise ValueError(f"step: counts from 1, got {step}")
    from ..kernels import adamw as kernels  # imports triton: only when the Triton backend runs

    kernels.stochastic_rounding_adamw_(weight, grad, exp_avg, exp_avg_sq, seed=seed, lr=lr, beta1=beta1, beta2=beta2,
                                       eps=eps, weight_decay=weight_decay, step=step)
