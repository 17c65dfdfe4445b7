"""Triton kernel of the stochastic-rounding AdamW step (`rto_fast.optim.StochasticRoundingAdamW`), with its launcher.

    from rto_fast.kernels import adamw as K
    K.stochastic_rounding_adamw_(weight, grad, exp_avg, exp_avg_sq, seed=..., lr=..., beta1=..., beta2=..., eps=...,
                                 weight_decay=..., step=...)

One pass over bf16 weight, gradient and both states (14 bytes of traffic per parameter, against about ten passes of
the torch path): the AdamW update in float32, then the weight and both states written back with stochastic rounding.
The random bits are Philox draws keyed by (seed, element index): a step is a function of its seed, with no generator
state on the device. Callers check dtypes, shapes and contiguity.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _round_to_bf16(value, random_bits):
    """float32 -> bf16, up or down in magnitude with the probabilities that make it exact on average: add 16 random
    bits below the bf16 mantissa, truncate (the int32 view of a negative float is -2^31 + its magnitude bits, so
    the sign survives the mask and negative values round in magnitude too)."""
    bits = value.to(tl.int32, bitcast=True)
    noise = (random_bits & 0xFFFF).to(tl.int32)
    return ((bits + noise) & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _stochastic_rounding_adamw_kernel(weight_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, n_elements, seed, decay,
                                      step_size, beta1, beta2, bias_correction2, eps, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n_elements
    grad = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    exp_avg = exp_avg + (1.0 - beta1) * (grad - exp_avg)  # torch's lerp for weights below 0.5
    exp_avg_sq = exp_avg_sq * beta2 + (1.0 - beta2) * grad * grad
    denominator = tl.sqrt(exp_avg_sq / bias_correction2) + eps
    weight = weight * decay - step_size * (exp_avg / denominator)
    bits_weight, bits_exp_avg, bits_exp_avg_sq, _ = tl.randint4x(seed, offsets.to(tl.uint32))
    tl.store(weight_ptr + offsets, _round_to_bf16(weight, bits_weight), mask=inside)
    tl.store(exp_avg_ptr + offsets, _round_to_bf16(exp_avg, bits_exp_avg), mask=inside)
    tl.store(exp_avg_sq_ptr + offsets, _round_to_bf16(exp_avg_sq, bits_exp_avg_sq), mask=inside)


def stochastic_rounding_adamw_(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                               exp_avg_sq: torch.Tensor, *, seed: int, lr: float, beta1: float, beta2: float,
                               eps: float, weight_decay: float, step: int) -> None:
    """One AdamW step in place on contiguous bf16 tensors of one shape; `step` counts from 1."""
    n_elements = weight.numel()
    if n_elements == 0:
        return
    grid = (triton.cdiv(n_elements, BLOCK),)
    _stochastic_rounding_adamw_kernel[grid](
        weight, grad, exp_avg, exp_avg_sq, n_elements, seed, 1.0 - lr * weight_decay, lr / (1.0 - beta1**step),
        beta1, beta2, 1.0 - beta2**step, eps, BLOCK=BLOCK, num_warps=4)
