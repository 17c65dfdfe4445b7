"""GAE and the clipped PPO loss: input checks, backend dispatch, custom ops and autograd.

    import rto_fast.ops as ops
    advantages, returns = ops.gae(rewards, values, response_mask, gamma=1.0, lam=0.95)
    loss, stats = ops.ppo_loss(new_logprobs, logprobs, advantages, response_mask,
                               values=new_values, old_values=values, returns=returns)
    loss.backward()                       # gradients for new_logprobs and new_values
    # or everything in the fewest passes, advantages whitened over all valid tokens:
    loss, stats, advantages, returns = ops.gae_ppo_loss(rewards, values, logprobs, new_logprobs, new_values,
                                                        response_mask)

A trajectory is a row, or a packed sequence: pass `(N,)` or `(1, N)` tensors and `cu_seqlens` (int32, `(S+1,)`). Its
action tokens are its mask-True positions; False positions inside it (prompt, padding, tool output between turns)
are skipped by GAE, not treated as ends, and `agg="seq-mean-token-mean"` averages per trajectory. NaN at an action
token propagates as in torch (the clamps and maxima keep NaN on every backend); inputs at non-action positions are
never read.

Backends (`rto_fast.ops._common.backend_for`): Triton kernels (`rto_fast.kernels.gae_ppo`) for CUDA tensors; on
CPU the C++ in `rto_fast._C` (`gae`, a segmented reverse scan, and `ppo_loss_fwd`, one pass with analytic
gradients; a vectorized torch version of the loss serves `RTO_FAST_BACKEND=torch` on other devices);
`reference` runs `rto_fast.reference`. Each op is a `torch.library.custom_op` (`rto_fast::gae`,
`rto_fast::ppo_loss_fwd`, `rto_fast::gae_ppo_loss_fwd`) with a fake implementation, so `torch.compile`d code calls
them without graph breaks. The forward of the loss computes d loss / d logprobs and d loss / d values, so the
backward is one multiply by the upstream gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _C
from . import reference
from ._common import (FLOAT_DTYPES, backend_for, check_cu_seqlens, check_devices, check_mask, check_packed_layout,
                      check_range, check_same_shape, check_tensor)

__all__ = ["gae", "ppo_loss", "gae_ppo_loss"]

STAT_NAMES = ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "vf_clipfrac")
AGGREGATIONS = reference.AGGREGATIONS
WHITEN_EPS = 1e-8  # reference.masked_whiten's eps

# Aggregation weight layouts (the same numbering as rto_fast/kernels/gae_ppo.py, which is imported lazily).
_WEIGHT_SCALAR, _WEIGHT_PER_ROW, _WEIGHT_PER_TOKEN = 0, 1, 2


def _kernels():
    from ..kernels import gae_ppo as kernels  # imports triton: only when the Triton backend runs

    return kernels


def _compute_dtype(*tensors) -> torch.dtype:
    """float64 when any input is float64 (the oracle's precision), float32 otherwise."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _row_length(mask: torch.Tensor) -> int:
    return mask.shape[-1] if mask.dim() else 1


# ---------------------------------------------------------------------------------------------------------------
# Segments and aggregation weights
# ---------------------------------------------------------------------------------------------------------------


def _segment_offsets_int64(mask: torch.Tensor, cu_seqlens) -> torch.Tensor:
    if cu_seqlens is not None:
        return cu_seqlens.to(device=mask.device, dtype=torch.int64).contiguous()
    row_length = _row_length(mask)
    return torch.arange(0, mask.numel() + 1, max(row_length, 1), dtype=torch.int64, device=mask.device)


def _segment_counts(mask: torch.Tensor, cu_seqlens) -> torch.Tensor:
    """Valid tokens per segment (rows of a padded batch, sequences of a packed stream), int64."""
    flat = mask.reshape(-1)
    if cu_seqlens is None:
        return flat.reshape(-1, max(_row_length(mask), 1)).sum(1)
    running = torch.cat([flat.new_zeros(1, dtype=torch.int64), flat.cumsum(0)])
    offsets = cu_seqlens.long()
    return running[offsets[1:]] - running[offsets[:-1]]


def _aggregation_weights(mask, cu_seqlens, agg, segment_counts=None):
    """(weights float64, layout) such that the aggregated statistic is sum over valid tokens of weight * x."""
    if agg == "token-mean":
        count = segment_counts.sum() if segment_counts is not None else mask.sum()
        return (1.0 / count.clamp(min=1).to(torch.float64)).reshape(1), _WEIGHT_SCALAR
    counts = (segment_counts if segment_counts is not None else _segment_counts(mask, cu_seqlens)).to(torch.float64)
    present = counts > 0
    num_present = present.sum().clamp(min=1)
    segment_weights = torch.where(present, 1.0 / (counts.clamp(min=1) * num_present), 0.0)
    if cu_seqlens is None:
        return segment_weights, _WEIGHT_PER_ROW
    positions = torch.arange(mask.numel(), device=mask.device, dtype=torch.int32)
    segment_ids = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
    return segment_weights[segment_ids], _WEIGHT_PER_TOKEN


def _expand_weights(weights, layout, mask):
    if layout == _WEIGHT_SCALAR:
        return weights.expand(mask.shape)
    if layout == _WEIGHT_PER_ROW:
        return weights[:, None].expand(-1, max(_row_length(mask), 1)).reshape(mask.shape)
    return weights.reshape(mask.shape)


# ---------------------------------------------------------------------------------------------------------------
# GAE implementations
# ---------------------------------------------------------------------------------------------------------------


def _gae_cpu(rewards, values, mask, cu_seqlens, gamma, lam):
    """The C++ scan (rto_fast._C.gae) on CPU buffers; returns advantages and returns in the compute dtype."""
    dtype = _compute_dtype(rewards, values)
    home = mask.device
    rewards = rewards.to(device="cpu", dtype=dtype).contiguous()
    values = values.to(device="cpu", dtype=dtype).contiguous()
    mask_cpu = mask.to("cpu").contiguous()
    advantages = torch.empty(mask.shape, dtype=dtype)
    returns = torch.empty(mask.shape, dtype=dtype)
    if mask.numel():
        offsets = _segment_offsets_int64(mask_cpu, None if cu_seqlens is None else cu_seqlens.cpu())
        _C.gae(rewards.data_ptr(), values.data_ptr(), mask_cpu.data_ptr(), offsets.data_ptr(), offsets.numel() - 1,
               float(gamma), float(lam), advantages.data_ptr(), returns.data_ptr(), str(dtype).replace("torch.", ""))
    return advantages.to(home), returns.to(home)


def _gae_any(backend, rewards, values, mask, cu_seqlens, gamma, lam):
    """(advantages, returns, whitening moments or None) on the chosen backend; moments = (count, mean, M2)."""
    if backend == "triton":
        advantages, returns, segment_stats = _kernels().gae_forward(
            rewards.contiguous(), values.contiguous(), mask.contiguous(), cu_seqlens=cu_seqlens,
            gamma=gamma, lam=lam)
        return advantages, returns, segment_stats
    if backend == "reference":
        advantages, returns = reference.gae(rewards, values, mask, gamma=gamma, lam=lam, cu_seqlens=cu_seqlens)
        return advantages, returns, None
    advantages, returns = _gae_cpu(rewards, values, mask, cu_seqlens, gamma, lam)
    return advantages, returns, None


def _whiten_params(advantages, mask, segment_stats=None):
    """float64 (2,) tensor (mean, 1/sqrt(var + eps)) over the valid tokens, unbiased variance as masked_whiten."""
    if segment_stats is not None:
        # Chan's combination of the per-segment (count, mean, M2) written by the GAE kernel.
        stats = segment_stats.to(torch.float64)
        counts, means, m2s = stats[:, 0], stats[:, 1], stats[:, 2]
        total = counts.sum()
        mean = (counts * means).sum() / total.clamp(min=1)
        m2 = m2s.sum() + (counts * (means - mean).square()).sum()
    else:
        values64 = advantages.to(torch.float64)
        total = mask.sum()
        mean = torch.where(mask, values64, 0.0).sum() / total.clamp(min=1)
        m2 = torch.where(mask, (values64 - mean).square(), 0.0).sum()
    variance = m2 / (total - 1).clamp(min=1)
    return torch.stack([mean, torch.rsqrt(variance + WHITEN_EPS)])


# ---------------------------------------------------------------------------------------------------------------
# PPO loss implementations
# ---------------------------------------------------------------------------------------------------------------


def _max_branch_grad(unclipped, clipped, grad_unclipped, grad_clipped):
    # d max(u, c): the larger branch's gradient, half of each on a tie (torch.maximum's backward).
    return torch.where(unclipped > clipped, grad_unclipped,
                       torch.where(clipped > unclipped, grad_clipped, 0.5 * (grad_unclipped + grad_clipped)))


def _ppo_torch(logprobs, old_logprobs, advantages, mask, weights, layout, values, old_values, returns,
               whiten_params, clip_eps, clip_eps_high, value_clip, vf_coef):
    """Vectorized eager version of the kernel: (loss, stats5, grad_logprobs, grad_values, whitened)."""
    dtype = _compute_dtype(logprobs, old_logprobs, advantages, values, old_values, returns)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    weight = torch.where(mask, _expand_weights(weights, layout, mask).to(dtype), zero)
    advantage = torch.where(mask, advantages.to(dtype), zero)
    whitened = None
    if whiten_params is not None:
        advantage = torch.where(mask, (advantage - whiten_params[0].to(dtype)) * whiten_params[1].to(dtype), zero)
        whitened = advantage.to(torch.float32)
    log_ratio = torch.where(mask, logprobs.to(dtype) - old_logprobs.to(dtype), zero)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantage * ratio
    pg_clipped = -advantage * ratio.clamp(1 - clip_eps, 1 + clip_eps_high)
    ratio_in_range = (ratio >= 1 - clip_eps) & (ratio <= 1 + clip_eps_high)
    grad_pg = _max_branch_grad(pg_unclipped, pg_clipped, pg_unclipped, torch.where(ratio_in_range, pg_unclipped, zero))
    stats = [(weight * torch.maximum(pg_unclipped, pg_clipped)).sum(), zero,
             (weight * (pg_clipped > pg_unclipped)).sum(), (weight * 0.5 * log_ratio.square()).sum(), zero]
    grad_logprobs = (weight * grad_pg).to(torch.float32)
    grad_values = None
    if values is not None:
        value = torch.where(mask, values.to(dtype), zero)
        old_value = torch.where(mask, old_values.to(dtype), zero)
        target = torch.where(mask, returns.to(dtype), zero)
        if value_clip is None:
            clipped_value, value_in_range = value, mask
        else:
            low, high = old_value - value_clip, old_value + value_clip
            clipped_value = torch.minimum(torch.maximum(value, low), high)
            value_in_range = (value >= low) & (value <= high)
        error, clipped_error = value - target, clipped_value - target
        vf_unclipped, vf_clipped = error.square(), clipped_error.square()
        grad_vf = _max_branch_grad(vf_unclipped, vf_clipped, error, torch.where(value_in_range, clipped_error, zero))
        stats[1] = (weight * 0.5 * torch.maximum(vf_unclipped, vf_clipped)).sum()
        stats[4] = (weight * (vf_clipped > vf_unclipped)).sum()
        grad_values = (weight * vf_coef * grad_vf).to(torch.float32)
    stats5 = torch.stack(stats)
    loss = stats5[0] + vf_coef * stats5[1] if values is not None else stats5[0].clone()  # custom ops: no aliases
    return loss.to(torch.float32), stats5.to(torch.float32), grad_logprobs, grad_values, whitened


def _ppo_cpu(logprobs, old_logprobs, advantages, mask, weights, layout, values, old_values, returns,
             whiten_params, clip_eps, clip_eps_high, value_clip, vf_coef):
    """The C++ loss (rto_fast._C.ppo_loss_fwd): one pass, double accumulation, fixed-order partial sums."""
    dtype = _compute_dtype(logprobs, old_logprobs, advantages, values, old_values, returns)
    name = str(dtype).replace("torch.", "")

    def prepared(tensor):
        return None if tensor is None else tensor.to(dtype).contiguous()

    inputs = [prepared(t) for t in (logprobs, old_logprobs, advantages, values, old_values, returns)]
    mask = mask.contiguous()
    weights = weights.to(torch.float64).contiguous()
    grad_logprobs = torch.empty(mask.shape, dtype=dtype)
    grad_values = torch.empty(mask.shape, dtype=dtype) if values is not None else None
    whitened = torch.empty(mask.shape, dtype=dtype) if whiten_params is not None else None
    num_chunks = -(-mask.numel() // 4096)
    partials = torch.zeros((num_chunks, 5), dtype=torch.float64)
    mean, rstd = whiten_params.tolist() if whiten_params is not None else (0.0, 1.0)

    def pointer(tensor):
        return 0 if tensor is None else tensor.data_ptr()

    if mask.numel():
        _C.ppo_loss_fwd(*(pointer(t) for t in inputs[:3]), mask.data_ptr(), *(pointer(t) for t in inputs[3:]),
                        weights.data_ptr(), layout, _row_length(mask), mask.numel(), whiten_params is not None,
                        float(mean), float(rstd), float(clip_eps), float(clip_eps_high), value_clip is not None,
                        0.0 if value_clip is None else float(value_clip), float(vf_coef), grad_logprobs.data_ptr(),
                        pointer(grad_values), pointer(whitened), partials.data_ptr(), name)
    stats5 = partials.sum(0)
    loss = stats5[0] + vf_coef * stats5[1] if values is not None else stats5[0].clone()
    return (loss.to(torch.float32), stats5.to(torch.float32), grad_logprobs.to(torch.float32),
            None if grad_values is None else grad_values.to(torch.float32),
            None if whitened is None else whitened.to(torch.float32))


def _ppo_any(backend, logprobs, old_logprobs, advantages, mask, values, old_values, returns, cu_seqlens,
             clip_eps, clip_eps_high, value_clip, vf_coef, agg, whiten_params=None, segment_counts=None):
    weights, layout = _aggregation_weights(mask, cu_seqlens, agg, segment_counts)
    if backend == "triton":
        contiguous = [None if t is None else t.contiguous()
                      for t in (logprobs, old_logprobs, advantages, mask, values, old_values, returns)]
        return _kernels().ppo_loss_forward(
            *contiguous[:4], weights.to(torch.float32).contiguous(), weight_mode=layout, values=contiguous[4],
            old_values=contiguous[5], returns=contiguous[6],
            whiten_params=None if whiten_params is None else whiten_params.to(torch.float32), clip_eps=clip_eps,
            clip_eps_high=clip_eps_high, value_clip=value_clip, vf_coef=vf_coef)
    if mask.device.type == "cpu":
        return _ppo_cpu(logprobs, old_logprobs, advantages, mask, weights, layout, values, old_values, returns,
                        whiten_params, clip_eps, clip_eps_high, value_clip, vf_coef)
    return _ppo_torch(logprobs, old_logprobs, advantages, mask, weights, layout, values, old_values, returns,
                      whiten_params, clip_eps, clip_eps_high, value_clip, vf_coef)


def _loss_backend(mask):
    # The public functions run the `reference` backend themselves (autograd through rto_fast.reference); inside
    # a custom op, reached only under torch.compile, it maps to the vectorized torch path.
    backend = backend_for(mask)
    return "torch" if backend == "reference" else backend


def _empty_like_missing(tensor, like):
    return tensor if tensor is not None else like.new_empty(0, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("rto_fast::gae", mutates_args=())
def _gae_op(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
            gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    advantages, returns, _ = _gae_any(backend_for(mask), rewards, values, mask, cu_seqlens, gamma, lam)
    return advantages.to(torch.float32), returns.to(torch.float32)


@_gae_op.register_fake
def _(rewards, values, mask, cu_seqlens, gamma, lam):
    return mask.new_empty(mask.shape, dtype=torch.float32), mask.new_empty(mask.shape, dtype=torch.float32)


@torch.library.custom_op("rto_fast::ppo_loss_fwd", mutates_args=())
def _ppo_loss_op(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 values: Optional[torch.Tensor], old_values: Optional[torch.Tensor], returns: Optional[torch.Tensor],
                 cu_seqlens: Optional[torch.Tensor], clip_eps: float, clip_eps_high: float,
                 value_clip: Optional[float], vf_coef: float, agg: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats5, d loss / d logprobs, d loss / d values or an empty tensor), all float32."""
    loss, stats5, grad_logprobs, grad_values, _ = _ppo_any(
        _loss_backend(mask), logprobs, old_logprobs, advantages, mask, values, old_values, returns, cu_seqlens,
        clip_eps, clip_eps_high, value_clip, vf_coef, agg)
    return loss, stats5, grad_logprobs, _empty_like_missing(grad_values, mask)


@_ppo_loss_op.register_fake
def _(logprobs, old_logprobs, advantages, mask, values, old_values, returns, cu_seqlens, clip_eps, clip_eps_high,
      value_clip, vf_coef, agg):
    scalar = mask.new_empty((), dtype=torch.float32)
    grad_values = mask.new_empty(mask.shape if values is not None else (0,), dtype=torch.float32)
    return scalar, mask.new_empty((5,), dtype=torch.float32), mask.new_empty(mask.shape, dtype=torch.float32), \
        grad_values


@torch.library.custom_op("rto_fast::gae_ppo_loss_fwd", mutates_args=())
def _gae_ppo_loss_op(rewards: torch.Tensor, old_values: torch.Tensor, old_logprobs: torch.Tensor,
                     logprobs: torch.Tensor, values: Optional[torch.Tensor], mask: torch.Tensor,
                     cu_seqlens: Optional[torch.Tensor], gamma: float, lam: float, whiten: bool, clip_eps: float,
                     clip_eps_high: float, value_clip: Optional[float], vf_coef: float, agg: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats5, advantages, returns, d loss / d logprobs, d loss / d values or an empty tensor)."""
    backend = _loss_backend(mask)
    advantages, returns, segment_stats = _gae_any(backend, rewards, old_values, mask, cu_seqlens, gamma, lam)
    whiten_params = _whiten_params(advantages, mask, segment_stats) if whiten else None
    # The GAE kernel's per-segment counts give the aggregation weights without another pass over the mask.
    segment_counts = segment_stats[:, 0].round().long() if segment_stats is not None else None
    loss, stats5, grad_logprobs, grad_values, whitened = _ppo_any(
        backend, logprobs, old_logprobs, advantages, mask, values, old_values, returns, cu_seqlens,
        clip_eps, clip_eps_high, value_clip, vf_coef, agg, whiten_params=whiten_params,
        segment_counts=segment_counts)
    if whitened is not None:
        advantages = whitened
    return (loss, stats5, advantages.to(torch.float32), returns.to(torch.float32), grad_logprobs,
            _empty_like_missing(grad_values, mask))


@_gae_ppo_loss_op.register_fake
def _(rewards, old_values, old_logprobs, logprobs, values, mask, cu_seqlens, gamma, lam, whiten, clip_eps,
      clip_eps_high, value_clip, vf_coef, agg):
    def per_token():
        return mask.new_empty(mask.shape, dtype=torch.float32)

    grad_values = per_token() if values is not None else mask.new_empty((0,), dtype=torch.float32)
    return (mask.new_empty((), dtype=torch.float32), mask.new_empty((5,), dtype=torch.float32), per_token(),
            per_token(), per_token(), grad_values)


def _scaled(grad_loss, grad, like):
    return None if like is None else (grad_loss * grad).to(like.dtype)


def _setup_ppo_context(ctx, inputs, output, logprobs_index, values_index):
    grad_logprobs, grad_values = output[-2], output[-1]
    ctx.save_for_backward(grad_logprobs, grad_values)
    ctx.dtypes = (inputs[logprobs_index].dtype,
                  inputs[values_index].dtype if inputs[values_index] is not None else None)
    ctx.num_inputs = len(inputs)
    ctx.indices = (logprobs_index, values_index)


def _ppo_backward(ctx, grad_loss, *unused_grads):
    grad_logprobs, grad_values = ctx.saved_tensors
    grads = [None] * ctx.num_inputs
    logprobs_index, values_index = ctx.indices
    logprobs_dtype, values_dtype = ctx.dtypes
    grads[logprobs_index] = (grad_loss * grad_logprobs).to(logprobs_dtype)
    if values_dtype is not None:
        grads[values_index] = (grad_loss * grad_values).to(values_dtype)
    return tuple(grads)


torch.library.register_autograd(
    "rto_fast::ppo_loss_fwd", _ppo_backward,
    setup_context=lambda ctx, inputs, output: _setup_ppo_context(ctx, inputs, output, 0, 4))
torch.library.register_autograd(
    "rto_fast::gae_ppo_loss_fwd", _ppo_backward,
    setup_context=lambda ctx, inputs, output: _setup_ppo_context(ctx, inputs, output, 3, 4))


# ---------------------------------------------------------------------------------------------------------------
# Public API: checks, then the custom ops
# ---------------------------------------------------------------------------------------------------------------


def _check_float(name, tensor, mask):
    check_tensor(name, tensor, dtypes=FLOAT_DTYPES)
    check_same_shape(name, tensor, mask.shape, "mask")


def _check_packing(cu_seqlens, mask, names):
    if cu_seqlens is None:
        return
    check_devices(("mask", mask), ("cu_seqlens", cu_seqlens))
    for name in names:
        check_packed_layout(name, mask, cu_seqlens)
    if torch.compiler.is_compiling():
        # Value checks need a host sync, which would break the graph; the metadata checks still run.
        check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1)
    else:
        check_cu_seqlens(cu_seqlens, mask.numel(), mask.device)


def _check_ppo_arguments(logprobs, old_logprobs, advantages, mask, values, old_values, returns, clip_eps,
                         clip_eps_high, value_clip, vf_coef, agg, advantages_name="advantages"):
    check_mask(mask)
    _check_float("logprobs", logprobs, mask)
    _check_float("old_logprobs", old_logprobs, mask)
    check_devices(("logprobs", logprobs), ("old_logprobs", old_logprobs), (advantages_name, advantages),
                  ("mask", mask), ("values", values), ("old_values", old_values), ("returns", returns))
    if advantages is not None:
        _check_float(advantages_name, advantages, mask)
    if values is not None:
        _check_float("values", values, mask)
        for name, tensor in (("old_values", old_values), ("returns", returns)):
            if tensor is None:
                raise ValueError(f"{name}: required when values is given")
            _check_float(name, tensor, mask)
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg: unknown aggregation {agg!r}; expected one of {AGGREGATIONS}")
    check_range("clip_eps", clip_eps, 0.0, 1.0)
    check_range("clip_eps_high", clip_eps_high, 0.0, allow_none=True)
    check_range("value_clip", value_clip, 0.0, allow_none=True)
    check_range("vf_coef", vf_coef, 0.0)


def _check_gae_arguments(rewards, values, mask, gamma, lam, values_name="values"):
    check_mask(mask)
    _check_float("rewards", rewards, mask)
    _check_float(values_name, values, mask)
    check_devices(("rewards", rewards), (values_name, values), ("mask", mask))
    check_range("gamma", gamma, 0.0, 1.0)
    check_range("lam", lam, 0.0, 1.0)


def _detach(tensor):
    return None if tensor is None else tensor.detach()


def _eager_reference(mask):
    return not torch.compiler.is_compiling() and backend_for(mask) == "reference"


def _stats_dict(stats5):
    stats5 = stats5.detach()
    return {name: stats5[index] for index, name in enumerate(STAT_NAMES)}


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95, cu_seqlens=None):
    """Generalized advantage estimation over each trajectory's action tokens; returns (advantages, returns), float32.

    rewards, values: float tensors of mask's shape; mask: bool, True on action tokens. A trajectory is a row (or a
    packed sequence: `(N,)` / `(1, N)` inputs plus `cu_seqlens`); False positions inside it (prompt, tool output
    between turns) are skipped: the next value of an action token is that of the next action token of the same
    trajectory, 0 after its last. Outputs are 0 where mask is False. gamma and lam in [0, 1]. Not differentiable.
    """
    _check_gae_arguments(rewards, values, mask, gamma, lam)
    _check_packing(cu_seqlens, mask, ("mask",))
    return torch.ops.rto_fast.gae(rewards.detach(), values.detach(), mask, cu_seqlens, float(gamma), float(lam))


def ppo_loss(logprobs, old_logprobs, advantages, mask, *, values=None, old_values=None, returns=None, clip_eps=0.2,
             clip_eps_high=None, value_clip=0.2, vf_coef=0.1, agg="token-mean", cu_seqlens=None):
    """Clipped PPO surrogate plus vf_coef times the clipped value loss (when `values` is given).

    Returns (loss, stats): loss is a float32 0-dim tensor differentiable in logprobs and values; stats holds
    detached float32 scalars pg_loss, vf_loss, clipfrac, approx_kl, vf_clipfrac (vf ones 0 without values).
    agg is "token-mean" or "seq-mean-token-mean" (per row, or per packed sequence with cu_seqlens).
    clip_eps_high (default clip_eps) is the upper ratio clip; value_clip=None disables value clipping.
    """
    _check_ppo_arguments(logprobs, old_logprobs, advantages, mask, values, old_values, returns, clip_eps,
                         clip_eps_high, value_clip, vf_coef, agg)
    _check_packing(cu_seqlens, mask, ("mask",))
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if _eager_reference(mask):
        loss, stats = reference.ppo_loss(
            logprobs, old_logprobs.detach(), advantages.detach(), mask, values=values,
            old_values=_detach(old_values), returns=_detach(returns), clip_eps=clip_eps,
            clip_eps_high=clip_eps_high, value_clip=value_clip, vf_coef=vf_coef, agg=agg, cu_seqlens=cu_seqlens)
        return loss.to(torch.float32), {name: stats[name].to(torch.float32) for name in STAT_NAMES}
    loss, stats5, _, _ = torch.ops.rto_fast.ppo_loss_fwd(
        logprobs, old_logprobs.detach(), advantages.detach(), mask, values, _detach(old_values), _detach(returns),
        cu_seqlens, float(clip_eps), float(clip_eps_high), None if value_clip is None else float(value_clip),
        float(vf_coef), agg)
    return loss, _stats_dict(stats5)


def gae_ppo_loss(rewards, old_values, old_logprobs, logprobs, values, mask, *, gamma=1.0, lam=0.95, whiten=True,
                 cu_seqlens=None, clip_eps=0.2, clip_eps_high=None, value_clip=0.2, vf_coef=0.1,
                 agg="token-mean"):
    """gae, then whitening of the advantages over all valid tokens (when `whiten`), then ppo_loss, fused.

    Returns (loss, stats, advantages, returns); advantages are the whitened ones when whiten=True. Equal to
    `gae` -> `reference.masked_whiten` -> `ppo_loss` with returns from gae and old_values as the value baseline.
    values=None gives the actor-only loss.
    """
    _check_gae_arguments(rewards, old_values, mask, gamma, lam, values_name="old_values")
    _check_ppo_arguments(logprobs, old_logprobs, None, mask, values, old_values, old_values, clip_eps,
                         clip_eps_high, value_clip, vf_coef, agg)
    check_devices(("rewards", rewards), ("logprobs", logprobs))
    _check_packing(cu_seqlens, mask, ("mask",))
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if _eager_reference(mask):
        loss, stats, advantages, returns = reference.gae_ppo_loss(
            rewards.detach(), old_values.detach(), old_logprobs.detach(), logprobs, values, mask, gamma=gamma,
            lam=lam, whiten=whiten, cu_seqlens=cu_seqlens, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
            value_clip=value_clip, vf_coef=vf_coef, agg=agg)
        return (loss.to(torch.float32), {name: stats[name].to(torch.float32) for name in STAT_NAMES},
                advantages.to(torch.float32), returns.to(torch.float32))
    loss, stats5, advantages, returns, _, _ = torch.ops.rto_fast.gae_ppo_loss_fwd(
        rewards.detach(), old_values.detach(), old_logprobs.detach(), logprobs, values, mask, cu_seqlens,
        float(gamma), float(lam), bool(whiten), float(clip_eps), float(clip_eps_high),
        None if value_clip is None else float(value_clip), float(vf_coef), agg)
    return loss, _stats_dict(stats5), advantages, returns
