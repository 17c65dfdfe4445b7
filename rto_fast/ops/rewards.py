"""RTO token rewards: input checks, backend dispatch and custom ops.

    import rto_fast.ops as ops
    rewards = ops.token_rewards(logprobs, ref_logprobs, response_mask, mode="rto", dpo_logprobs=dpo_logprobs,
                                kl_coef=0.03, dpo_coef=0.1)
    # or straight from the three models' logits, one read of each:
    rewards, logprobs, ref_logprobs, dpo_logprobs = ops.token_rewards_from_logits(
        logits, ref_logits, labels, response_mask, dpo_logits=dpo_logits, temperature=1.0)

A trajectory is a row, or a packed sequence between `cu_seqlens` boundaries; its action tokens are its mask-True
positions (False positions inside it, such as tool output between turns, are not actions). Modes (docs/math.md §3):
`rto` = clamp(dpo_coef * (dpo - ref), +-dpo_clip) - kl_coef * k on every action token; `ppo` = -kl_coef * k;
`dppo` = -kl_coef * k plus dpo_coef * (sum over the trajectory's action tokens of (dpo - ref)) on its last action
token. `score` (one value per trajectory) adds score_coef * score at the trajectory's last action token. k is the
`kl_estimator` ("k1", "k2", "k3") of lp - ref. Rewards are float32 and 0 at non-action positions, whose inputs are
never read; NaN at an action token gives NaN where it is used.

Packed streams: `(N,)` or `(1, N)` tensors plus `cu_seqlens` (int32, `(S+1,)`).

Backends (`rto_fast.ops._common.backend_for`): the Triton kernels of `rto_fast.kernels.rewards` for CUDA tensors
(float64 inputs take the torch path, which keeps float64 precision); on CPU a vectorized torch path (each
trajectory's last action token from a max over positions, DPPO's per-trajectory sums by one float64 index_add;
logits in chunks of rows through log_softmax / gather); `reference` runs
`rto_fast.reference`. Both ops are `torch.library.custom_op`s (`rto_fast::token_rewards`,
`rto_fast::token_rewards_from_logits`) with fake implementations, so `torch.compile`d code calls them without graph
breaks. Nothing here is differentiable: the inputs are detached.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import reference
from .logprobs import _forward_torch as _logprobs_forward_torch
from ._common import (FLOAT_DTYPES, LABEL_DTYPES, backend_for, check_cu_seqlens, check_devices, check_labels,
                      check_mask, check_packed_layout, check_range, check_same_shape, check_tensor)

__all__ = ["token_rewards", "token_rewards_from_logits"]

MODES = reference.MODES
KL_ESTIMATORS = reference.KL_ESTIMATORS


def _kernels():
    from ..kernels import rewards as kernels  # imports triton: only when the Triton backend runs

    return kernels


def _compute_dtype(*tensors) -> torch.dtype:
    """float64 when any input is float64 (the oracle's precision), float32 otherwise."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _use_kernels(backend, *tensors) -> bool:
    # float64 keeps its precision on the torch path; the kernels compute in float32.
    return backend == "triton" and _compute_dtype(*tensors) != torch.float64


# ---------------------------------------------------------------------------------------------------------------
# Vectorized torch path
# ---------------------------------------------------------------------------------------------------------------


def _kl_penalty(log_ratio, kl_estimator):
    if kl_estimator == "k1":
        return log_ratio
    if kl_estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.exp(-log_ratio) - 1 + log_ratio


def _num_segments(mask, cu_seqlens):
    return cu_seqlens.numel() - 1 if cu_seqlens is not None else mask.numel() // max(mask.shape[-1], 1)


def _segment_of(positions, mask, cu_seqlens):
    """The segment (row, or packed sequence) of each flat position in `positions` (int64)."""
    if cu_seqlens is None:
        return positions // mask.shape[-1]
    offsets = cu_seqlens.to(device=mask.device, dtype=torch.int64)
    return torch.searchsorted(offsets, positions, right=True) - 1


def _last_valid_positions(valid, mask, cu_seqlens):
    """(positions, segments): the last True position of every segment that has one, and that segment's number."""
    if cu_seqlens is None:
        rows = valid.reshape(-1, mask.shape[-1])
        columns = torch.arange(rows.shape[1], device=valid.device)
        last = torch.where(rows, columns, -1).amax(1)
        segments = torch.nonzero(last >= 0).squeeze(1)
        return segments * rows.shape[1] + last[segments], segments
    # Running "last True position so far", read just before each sequence's end.
    positions = torch.arange(valid.numel(), device=valid.device)
    last_so_far = torch.cummax(torch.where(valid, positions, -1), 0).values
    offsets = cu_seqlens.to(device=valid.device, dtype=torch.int64)
    begins, ends = offsets[:-1], offsets[1:]
    last = last_so_far[(ends - 1).clamp(min=0)]
    segments = torch.nonzero((ends > begins) & (last >= begins)).squeeze(1)
    return last[segments], segments


def _token_rewards_torch(logprobs, ref_logprobs, mask, dpo_logprobs, score, cu_seqlens, mode, kl_coef, dpo_coef,
                         score_coef, dpo_clip, kl_estimator):
    dtype = _compute_dtype(logprobs, ref_logprobs, dpo_logprobs, score)
    numel = mask.numel()
    if numel == 0:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    valid = mask.reshape(-1)
    ref = ref_logprobs.reshape(-1).to(dtype)
    rewards = -kl_coef * _kl_penalty(logprobs.reshape(-1).to(dtype) - ref, kl_estimator)
    if mode == "rto":
        dense = dpo_coef * (dpo_logprobs.reshape(-1).to(dtype) - ref)
        if dpo_clip is not None:
            dense = dense.clamp_(-dpo_clip, dpo_clip)
        rewards += dense
    rewards = torch.where(valid, rewards, 0.0)
    if mode == "dppo" or score is not None:
        positions, segments = _last_valid_positions(valid, mask, cu_seqlens)
    if mode == "dppo":
        # Each trajectory's sum of (dpo - ref) over its action tokens, accumulated in float64 by one index_add
        # (not a difference of prefix sums: a NaN or inf in one trajectory must not reach the next one's sum).
        actions = torch.nonzero(valid).squeeze(1)
        dpo_log_ratio = dpo_logprobs.reshape(-1)[actions].to(torch.float64) - ref[actions].to(torch.float64)
        sums = torch.zeros(_num_segments(mask, cu_seqlens), dtype=torch.float64, device=mask.device)
        sums.index_add_(0, _segment_of(actions, mask, cu_seqlens), dpo_log_ratio)
        rewards.index_add_(0, positions, (dpo_coef * sums[segments]).to(dtype))
    if score is not None:
        rewards.index_add_(0, positions, score_coef * score.reshape(-1)[segments].to(dtype))
    return rewards.to(torch.float32).reshape(mask.shape)


def _logprobs_torch(logits, labels, temperature, ignore_index):
    """float32 log-probs of labels' shape through the chunked CPU path of token_logprobs (no fp32 copy of the
    whole logits, no backward statistics)."""
    vocab_size = logits.shape[-1]
    flat_labels = labels.reshape(-1)
    if flat_labels.numel() == 0:
        return torch.empty(labels.shape, dtype=torch.float32, device=labels.device)
    try:
        rows = [(logits.view(-1, vocab_size), flat_labels)]
    except RuntimeError:
        # A strided view such as logits[:, :-1]: walk it one (T, V) block at a time, never copying it whole.
        outer_logits = logits.reshape(-1, *logits.shape[-2:]) if logits.dim() != 3 else logits
        outer_labels = flat_labels.view(outer_logits.shape[0], -1)
        rows = list(zip(outer_logits.unbind(0), outer_labels.unbind(0)))
    pieces = [_logprobs_forward_torch(block, block_labels, temperature, ignore_index, False, need_stats=False)[0]
              for block, block_labels in rows]
    return torch.cat(pieces).reshape(labels.shape)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------


def _token_rewards_any(backend, logprobs, ref_logprobs, mask, dpo_logprobs, score, cu_seqlens, mode, kl_coef,
                       dpo_coef, score_coef, dpo_clip, kl_estimator):
    if backend == "reference":
        return reference.token_rewards(logprobs, ref_logprobs, mask, mode=mode, dpo_logprobs=dpo_logprobs,
                                       score=score, kl_coef=kl_coef, dpo_coef=dpo_coef, score_coef=score_coef,
                                       dpo_clip=dpo_clip, kl_estimator=kl_estimator,
                                       cu_seqlens=cu_seqlens).to(torch.float32)
    if _use_kernels(backend, logprobs, ref_logprobs, dpo_logprobs, score):
        return _kernels().token_rewards_forward(
            logprobs, ref_logprobs, mask, mode=mode, dpo_logprobs=dpo_logprobs, score=score, kl_coef=kl_coef,
            dpo_coef=dpo_coef, score_coef=score_coef, dpo_clip=dpo_clip, kl_estimator=kl_estimator,
            cu_seqlens=cu_seqlens)
    return _token_rewards_torch(logprobs, ref_logprobs, mask, dpo_logprobs, score, cu_seqlens, mode, kl_coef,
                                dpo_coef, score_coef, dpo_clip, kl_estimator)


def _three_logprobs_any(backend, logits, ref_logits, dpo_logits, labels, temperature, ignore_index):
    if backend == "reference":
        def one(tensor):
            return reference.token_logprobs(tensor, labels, temperature=temperature,
                                            ignore_index=ignore_index).to(torch.float32)
    elif _use_kernels(backend, logits, ref_logits, dpo_logits):
        return _kernels().three_logprobs_forward(logits, ref_logits, labels, dpo_logits=dpo_logits,
                                                 temperature=temperature, ignore_index=ignore_index)
    else:
        def one(tensor):
            return _logprobs_torch(tensor, labels, temperature, ignore_index)
    return one(logits), one(ref_logits), None if dpo_logits is None else one(dpo_logits)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("rto_fast::token_rewards", mutates_args=())
def _token_rewards_op(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                      dpo_logprobs: Optional[torch.Tensor], score: Optional[torch.Tensor],
                      cu_seqlens: Optional[torch.Tensor], mode: str, kl_coef: float, dpo_coef: float,
                      score_coef: float, dpo_clip: Optional[float], kl_estimator: str) -> torch.Tensor:
    return _token_rewards_any(backend_for(mask), logprobs, ref_logprobs, mask, dpo_logprobs, score, cu_seqlens,
                              mode, kl_coef, dpo_coef, score_coef, dpo_clip, kl_estimator)


@_token_rewards_op.register_fake
def _(logprobs, ref_logprobs, mask, dpo_logprobs, score, cu_seqlens, mode, kl_coef, dpo_coef, score_coef, dpo_clip,
      kl_estimator):
    return mask.new_empty(mask.shape, dtype=torch.float32)


@torch.library.custom_op("rto_fast::token_rewards_from_logits", mutates_args=())
def _token_rewards_from_logits_op(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                                  mask: torch.Tensor, dpo_logits: Optional[torch.Tensor],
                                  score: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                                  temperature: float, ignore_index: int, mode: str, kl_coef: float,
                                  dpo_coef: float, score_coef: float, dpo_clip: Optional[float],
                                  kl_estimator: str
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rewards, logprobs, ref_logprobs, dpo_logprobs or an empty tensor), all float32."""
    backend = backend_for(mask)
    logprobs, ref_logprobs, dpo_logprobs = _three_logprobs_any(backend, logits, ref_logits, dpo_logits, labels,
                                                               temperature, ignore_index)
    rewards = _token_rewards_any(backend, logprobs, ref_logprobs, mask, dpo_logprobs, score, cu_seqlens, mode,
                                 kl_coef, dpo_coef, score_coef, dpo_clip, kl_estimator)
    if dpo_logprobs is None:
        dpo_logprobs = mask.new_empty((0,), dtype=torch.float32)
    return rewards, logprobs, ref_logprobs, dpo_logprobs


@_token_rewards_from_logits_op.register_fake
def _(logits, ref_logits, labels, mask, dpo_logits, score, cu_seqlens, temperature, ignore_index, mode, kl_coef,
      dpo_coef, score_coef, dpo_clip, kl_estimator):
    def per_token():
        return mask.new_empty(mask.shape, dtype=torch.float32)

    dpo_logprobs = per_token() if dpo_logits is not None else mask.new_empty((0,), dtype=torch.float32)
    return per_token(), per_token(), per_token(), dpo_logprobs


# ---------------------------------------------------------------------------------------------------------------
# Public API: checks, then the custom ops
# ---------------------------------------------------------------------------------------------------------------


def _check_reward_arguments(mask, mode, score, kl_coef, dpo_coef, score_coef, dpo_clip, kl_estimator,
                            cu_seqlens):
    """Checks shared by both public functions, after the per-token float inputs have been checked."""
    if mode not in MODES:
        raise ValueError(f"mode: unknown mode {mode!r}; expected one of {MODES}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: unknown estimator {kl_estimator!r}; expected one of {KL_ESTIMATORS}")
    check_range("kl_coef", kl_coef, 0.0)
    check_range("dpo_coef", dpo_coef)
    check_range("score_coef", score_coef)
    check_range("dpo_clip", dpo_clip, 0.0, low_open=True, allow_none=True)  # None: no clamp
    if cu_seqlens is not None:
        check_packed_layout("mask", mask, cu_seqlens)
        if torch.compiler.is_compiling():
            # Value checks need a host sync, which would break the graph; the metadata checks still run.
            check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1)
        else:
            check_cu_seqlens(cu_seqlens, mask.numel(), mask.device)
    if score is not None:
        check_tensor("score", score, dtypes=FLOAT_DTYPES)
        if cu_seqlens is not None:
            expected = [(cu_seqlens.shape[0] - 1,)]
        else:
            rows = mask.numel() // mask.shape[-1] if mask.shape[-1] else 0
            expected = [tuple(mask.shape[:-1]), (rows,)]
        if tuple(score.shape) not in expected:
            raise ValueError(f"score: expected one value per segment, shape {expected[0]}, "
                             f"got {tuple(score.shape)}")


def _check_dpo_needed(mode, dpo, name):
    if mode in ("rto", "dppo") and dpo is None:
        raise ValueError(f"{name}: required for mode {mode!r}")


def _detach(tensor):
    return None if tensor is None else tensor.detach()


def token_rewards(logprobs, ref_logprobs, mask, *, mode="rto", dpo_logprobs=None, score=None, kl_coef=0.03,
                  dpo_coef=0.1, score_coef=1.0, dpo_clip=None, kl_estimator="k1", cu_seqlens=None):
    """Per-token RLHF rewards, float32 of mask's shape, 0 where mask is False. Not differentiable.

    logprobs, ref_logprobs, dpo_logprobs: per-token log-probs of the sampled tokens under the sampling policy, the
    reference and the DPO model (float, mask's shape). mask: bool, True on action tokens; a trajectory is a row (or
    a packed sequence) and may hold several turns with non-action holes between them. mode: "rto" (dense DPO reward, clamped to +-dpo_clip when given), "ppo" or "dppo"
    (summed DPO reward on the last token); the KL penalty kl_coef * k uses kl_estimator "k1", "k2" or "k3".
    score: one value per row (`(B,)`) or per packed sequence (`(S,)`), added times score_coef at the trajectory's
    last action token; dppo's summed term lands there too. Packed streams: `(N,)` / `(1, N)` inputs plus `cu_seqlens` (int32).
    """
    check_mask(mask)
    for name, tensor in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("dpo_logprobs", dpo_logprobs)):
        if tensor is not None or name != "dpo_logprobs":
            check_tensor(name, tensor, dtypes=FLOAT_DTYPES)
            check_same_shape(name, tensor, mask.shape, "mask")
    check_devices(("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("mask", mask),
                  ("dpo_logprobs", dpo_logprobs), ("score", score), ("cu_seqlens", cu_seqlens))
    if mode in MODES:
        _check_dpo_needed(mode, dpo_logprobs, "dpo_logprobs")
    _check_reward_arguments(mask, mode, score, kl_coef, dpo_coef, score_coef, dpo_clip,
                            kl_estimator, cu_seqlens)
    return torch.ops.rto_fast.token_rewards(
        logprobs.detach(), ref_logprobs.detach(), mask, _detach(dpo_logprobs), _detach(score), cu_seqlens, mode,
        float(kl_coef), float(dpo_coef), float(score_coef), None if dpo_clip is None else float(dpo_clip),
        kl_estimator)


def token_rewards_from_logits(logits, ref_logits, labels, mask, *, dpo_logits=None, temperature=1.0,
                              ignore_index=-100, mode="rto", score=None, kl_coef=0.03, dpo_coef=0.1, score_coef=1.0,
                              dpo_clip=None, kl_estimator="k1", cu_seqlens=None):
    """token_rewards of the log-probs of `labels` under the three models' logits, reading each logits tensor once.

    logits, ref_logits, dpo_logits: labels' shape plus a vocabulary dimension (any float dtype; `logits[:, :-1]`
    style strided views are read in place). Log-probs are log softmax(logits / temperature)[label], 0 where
    labels == ignore_index. Returns (rewards, logprobs, ref_logprobs, dpo_logprobs), all float32 of labels' shape;
    dpo_logprobs is None when dpo_logits is None. The reward keywords are token_rewards'. Not differentiable.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    check_devices(("logits", logits), ("ref_logits", ref_logits), ("labels", labels), ("mask", mask),
                  ("dpo_logits", dpo_logits), ("score", score), ("cu_seqlens", cu_seqlens))
    check_mask(mask)
    check_tensor("labels", labels)
    check_same_shape("mask", mask, labels.shape, "labels")
    if logits.dim() != labels.dim() + 1 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"logits: shape {tuple(logits.shape)} must be labels' shape {tuple(labels.shape)} plus a "
                         f"vocabulary dimension")
    if logits.shape[-1] < 1:
        raise ValueError("logits: the vocabulary dimension is empty")
    for name, tensor in (("ref_logits", ref_logits), ("dpo_logits", dpo_logits)):
        if tensor is not None or name != "dpo_logits":
            check_tensor(name, tensor, dtypes=FLOAT_DTYPES)
            check_same_shape(name, tensor, logits.shape, "logits")
    if mode in MODES:
        _check_dpo_needed(mode, dpo_logits, "dpo_logits")
    check_range("temperature", temperature, 0.0, low_open=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    _check_reward_arguments(mask, mode, score, kl_coef, dpo_coef, score_coef, dpo_clip,
                            kl_estimator, cu_seqlens)
    if torch.compiler.is_compiling():
        if labels.dtype not in LABEL_DTYPES:
            raise ValueError(f"labels: expected an integer dtype, got {str(labels.dtype).replace('torch.', '')}")
    else:
        check_labels(labels, logits.shape[-1], ignore_index)
    # int64 labels: narrower dtypes would wrap in comparisons with V or ignore_index (uint8 156 == -100).
    rewards, logprobs, ref_logprobs, dpo_logprobs = torch.ops.rto_fast.token_rewards_from_logits(
        logits.detach(), ref_logits.detach(), labels.long(), mask, _detach(dpo_logits), _detach(score), cu_seqlens,
        float(temperature), int(ignore_index), mode, float(kl_coef), float(dpo_coef), float(score_coef),
        None if dpo_clip is None else float(dpo_clip), kl_estimator)
    return rewards, logprobs, ref_logprobs, (dpo_logprobs if dpo_logits is not None else None)
