"""Triton kernels for GAE and the clipped PPO loss, with their launchers.

    from rto_fast.kernels import gae_ppo as K
    advantages, returns, segment_stats = K.gae_forward(rewards, values, mask, cu_seqlens=None, gamma=1.0, lam=0.95)
    loss, stats5, grad_logprobs, grad_values, whitened = K.ppo_loss_forward(logprobs, old_logprobs, advantages,
                                                                             mask, weights, weight_mode=0, ...)

Callers are `rto_fast.ops.gae_ppo` (input checks, autograd, dispatch); nothing here validates arguments.

GAE: one program per trajectory (a row of a padded batch or one packed sequence) walks its positions backwards in
blocks of BLOCK. The recursion runs over action tokens only, holes (mask False) skipped: with s = (A, V) of the
next action token, an action token t maps s to (r_t - V_t + gamma V' + gamma lam A', V_t) and a hole leaves s
alone. Those maps are affine with an upper-triangular 2 x 2 matrix, so a block is one `tl.associative_scan` over
their five coefficients, loaded in reversed position order (reversed index math, so the scan runs forwards and no
`reverse=` / `tl.flip` is needed). The state at the earliest position of a block is carried into the next block. Each program also writes
(count, mean, M2) of its advantages so the whitening statistics need no further pass over the data.
`method="loop"` selects the simple alternative: one lane per segment, all lanes stepping backwards together.

PPO: one program per BLOCK tokens computes ratio, clipped surrogate, clipped value loss, clip flags and the
approx-KL term, writes d loss / d logprobs and d loss / d values (already scaled by the aggregation weights, so the
backward is a multiply by the upstream gradient) and one row of per-block partial sums; a tiny torch sum over the
blocks finishes the reduction (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .segments import segment_bounds

# Order of the statistics in the per-block partial sums and in the `stats5` vector.
STAT_NAMES = ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "vf_clipfrac")
_PARTIAL_STRIDE = 8

# Aggregation weight layouts of the PPO kernel.
WEIGHT_SCALAR = 0  # weights[0] for every valid token (token-mean)
WEIGHT_PER_ROW = 1  # weights[t // row_length] (seq-mean-token-mean over the rows of a padded batch)
WEIGHT_PER_TOKEN = 2  # weights[t] (seq-mean-token-mean over packed sequences)


# ---------------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _compose_affine(l11, l12, l22, l1, l2, c11, c12, c22, c1, c2):
    # Each element is the affine map s -> M s + b of the state s = (A, V) of the next action token, with M upper
    # triangular (m11, m12, m22) and b = (b1, b2). The scan runs over positions in decreasing order, so the left
    # operand holds the later positions already folded: apply it first, then the current position's map.
    return (c11 * l11, c11 * l12 + c12 * l22, c22 * l22,
            c11 * l1 + c12 * l2 + c1, c22 * l2 + c2)


@triton.jit
def _gae_scan_kernel(rewards_ptr, values_ptr, mask_ptr, offsets_ptr, advantages_ptr, returns_ptr, stats_ptr,
                     row_length, gamma, gamma_lam,
                     PACKED: tl.constexpr, BLOCK: tl.constexpr):
    segment = tl.program_id(0).to(tl.int64)
    begin, end = segment_bounds(offsets_ptr, segment, row_length, PACKED)
    lanes = tl.arange(0, BLOCK)
    zeros = tl.zeros([BLOCK], dtype=tl.float32)
    ones = zeros + 1.0
    # (A, V) of the next action token after this block (0, 0 after the trajectory's last one).
    carry_advantage = tl.sum(zeros, axis=0)
    carry_value = tl.sum(zeros, axis=0)
    count = tl.sum(zeros, axis=0)
    mean = tl.sum(zeros, axis=0)
    m2 = tl.sum(zeros, axis=0)
    num_blocks = tl.cdiv(end - begin, BLOCK)
    for block in range(0, num_blocks):
        positions = end - 1 - block * BLOCK - lanes  # lane 0 = latest position of the block
        inside = positions >= begin
        valid = tl.load(mask_ptr + positions, mask=inside, other=0) != 0
        reward = tl.load(rewards_ptr + positions, mask=valid, other=0.0).to(tl.float32)
        value = tl.load(values_ptr + positions, mask=valid, other=0.0).to(tl.float32)
        # An action token maps (A', V') to (r - V + gamma V' + gamma lam A', V); anything else (a hole, or a lane
        # past the trajectory's start) is the identity, so the recursion carries over it.
        m11 = tl.where(valid, zeros + gamma_lam, ones)
        m12 = tl.where(valid, zeros + gamma, zeros)
        m22 = tl.where(valid, zeros, ones)
        b1 = tl.where(valid, reward - value, zeros)
        b2 = tl.where(valid, value, zeros)
        m11, m12, m22, b1, b2 = tl.associative_scan((m11, m12, m22, b1, b2), 0, _compose_affine)
        state_advantage = m11 * carry_advantage + m12 * carry_value + b1
        state_value = m22 * carry_value + b2
        advantage = tl.where(valid, state_advantage, 0.0)
        tl.store(advantages_ptr + positions, advantage, mask=inside)
        tl.store(returns_ptr + positions, tl.where(valid, state_advantage + value, 0.0), mask=inside)
        carry_advantage = tl.sum(tl.where(lanes == BLOCK - 1, state_advantage, 0.0), axis=0)
        carry_value = tl.sum(tl.where(lanes == BLOCK - 1, state_value, 0.0), axis=0)
        # Chan's parallel update of (count, mean, M2): numerically stable whitening statistics.
        block_count = tl.sum(valid.to(tl.float32), axis=0)
        block_mean = tl.sum(advantage, axis=0) / tl.maximum(block_count, 1.0)
        deviation = tl.where(valid, advantage - block_mean, 0.0)
        block_m2 = tl.sum(deviation * deviation, axis=0)
        new_count = count + block_count
        shift = block_mean - mean
        share = block_count / tl.maximum(new_count, 1.0)
        mean = mean + shift * share
        m2 = m2 + block_m2 + shift * shift * count * share
        count = new_count
    tl.store(stats_ptr + segment * 3, count)
    tl.store(stats_ptr + segment * 3 + 1, mean)
    tl.store(stats_ptr + segment * 3 + 2, m2)


@triton.jit
def _gae_loop_kernel(rewards_ptr, values_ptr, mask_ptr, offsets_ptr, advantages_ptr, returns_ptr,
                     num_segments, row_length, max_length, gamma, gamma_lam,
                     PACKED: tl.constexpr, BLOCK_S: tl.constexpr):
    segments = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    live = segments < num_segments
    if PACKED:
        begin = tl.load(offsets_ptr + segments, mask=live, other=0).to(tl.int64)
        end = tl.load(offsets_ptr + segments + 1, mask=live, other=0).to(tl.int64)
    else:
        begin = segments * row_length
        end = tl.where(live, begin + row_length, begin)
    next_value = tl.zeros([BLOCK_S], dtype=tl.float32)
    next_advantage = tl.zeros([BLOCK_S], dtype=tl.float32)
    for step in range(0, max_length):
        positions = end - 1 - step
        inside = positions >= begin
        valid = tl.load(mask_ptr + positions, mask=inside, other=0) != 0
        reward = tl.load(rewards_ptr + positions, mask=valid, other=0.0).to(tl.float32)
        value = tl.load(values_ptr + positions, mask=valid, other=0.0).to(tl.float32)
        advantage = reward + gamma * next_value - value + gamma_lam * next_advantage
        tl.store(advantages_ptr + positions, tl.where(valid, advantage, 0.0), mask=inside)
        tl.store(returns_ptr + positions, tl.where(valid, advantage + value, 0.0), mask=inside)
        # Non-action positions (holes between turns) leave the recursion as it is.
        next_value = tl.where(valid, value, next_value)
        next_advantage = tl.where(valid, advantage, next_advantage)


def gae_forward(rewards, values, mask, *, cu_seqlens=None, gamma=1.0, lam=0.95, method="scan", block=None,
                advantages=None, returns=None):
    """Advantages and returns (float32, mask's shape) for contiguous inputs on one device.

    Returns (advantages, returns, segment_stats): segment_stats is (S, 3) float32 (count, mean, M2 of the
    advantages of each segment) for method="scan", None for method="loop". `advantages` / `returns` may be given
    as preallocated float32 output buffers. `block` overrides the scan block size (a power of 2).
    """
    numel = mask.numel()
    row_length = mask.shape[-1] if mask.dim() else 1
    packed = cu_seqlens is not None
    num_segments = cu_seqlens.numel() - 1 if packed else (numel // row_length if row_length else 0)
    if advantages is None:
        advantages = torch.empty(mask.shape, dtype=torch.float32, device=mask.device)
    if returns is None:
        returns = torch.empty(mask.shape, dtype=torch.float32, device=mask.device)
    mask_bytes = mask.view(torch.uint8)
    offsets = cu_seqlens if packed else mask_bytes  # unused when not packed
    gamma_lam = float(gamma) * float(lam)
    if method == "loop":
        if num_segments and numel:
            max_length = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if packed else row_length
            block_s = 32
            grid = (triton.cdiv(num_segments, block_s),)
            _gae_loop_kernel[grid](rewards, values, mask_bytes, offsets, advantages, returns,
                                   num_segments, row_length, max_length, float(gamma), gamma_lam,
                                   PACKED=packed, BLOCK_S=block_s, num_warps=1)
        return advantages, returns, None
    if method != "scan":
        raise ValueError(f"method: expected 'scan' or 'loop', got {method!r}")
    segment_stats = torch.empty((num_segments, 3), dtype=torch.float32, device=mask.device)
    if block is None:
        # Padded rows: one block per row up to 1024 positions; packed sequences are usually shorter.
        block = min(1024, triton.next_power_of_2(max(row_length, 16))) if not packed else 512
    if num_segments and numel:
        _gae_scan_kernel[(num_segments,)](rewards, values, mask_bytes, offsets, advantages, returns, segment_stats,
                                          row_length, float(gamma), gamma_lam,
                                          PACKED=packed, BLOCK=block, num_warps=4 if block >= 512 else 1)
    else:
        segment_stats.zero_()
    return advantages, returns, segment_stats


# ---------------------------------------------------------------------------------------------------------------
# PPO loss
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _nan_max(a, b):
    # torch.maximum's NaN semantics: tl.maximum's default (max-num, like the GPU instruction and the interpreter's
    # np.fmax) would return the other operand and hide a NaN input behind a finite loss.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _nan_min(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_branch_grad(unclipped, clipped, grad_unclipped, grad_clipped):
    # d max(u, c): the larger branch's gradient; half of each on a tie (what torch.maximum's backward does).
    return tl.where(unclipped > clipped, grad_unclipped,
                    tl.where(clipped > unclipped, grad_clipped, 0.5 * (grad_unclipped + grad_clipped)))


@triton.jit
def _ppo_loss_fwd_kernel(logprobs_ptr, old_logprobs_ptr, advantages_ptr, mask_ptr,
                         values_ptr, old_values_ptr, returns_ptr, weights_ptr, whiten_ptr,
                         grad_logprobs_ptr, grad_values_ptr, whitened_ptr, partials_ptr,
                         num_tokens, row_length, clip_low, clip_high, value_clip, vf_coef,
                         HAS_VALUES: tl.constexpr, CLIP_VALUES: tl.constexpr, WEIGHT_MODE: tl.constexpr,
                         WHITEN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < num_tokens
    valid = (tl.load(mask_ptr + offsets, mask=inside, other=0) != 0) & inside
    if WEIGHT_MODE == 0:
        weight = tl.load(weights_ptr)
    elif WEIGHT_MODE == 1:
        weight = tl.load(weights_ptr + offsets // row_length, mask=inside, other=0.0)
    else:
        weight = tl.load(weights_ptr + offsets, mask=inside, other=0.0)
    weight = tl.where(valid, weight, 0.0)
    logprob = tl.load(logprobs_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    old_logprob = tl.load(old_logprobs_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    advantage = tl.load(advantages_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    if WHITEN:
        mean = tl.load(whiten_ptr)
        rstd = tl.load(whiten_ptr + 1)
        advantage = tl.where(valid, (advantage - mean) * rstd, 0.0)
        tl.store(whitened_ptr + offsets, advantage, mask=inside)

    log_ratio = logprob - old_logprob
    ratio = tl.exp(log_ratio)
    clamped_ratio = _nan_min(_nan_max(ratio, 1.0 - clip_low), 1.0 + clip_high)
    pg_unclipped = -advantage * ratio
    pg_clipped = -advantage * clamped_ratio
    pg = _nan_max(pg_unclipped, pg_clipped)
    ratio_in_range = (ratio >= 1.0 - clip_low) & (ratio <= 1.0 + clip_high)
    grad_pg = _max_branch_grad(pg_unclipped, pg_clipped, pg_unclipped, tl.where(ratio_in_range, pg_unclipped, 0.0))
    tl.store(grad_logprobs_ptr + offsets, tl.where(valid, weight * grad_pg, 0.0), mask=inside)
    pg_clip_flag = (pg_clipped > pg_unclipped).to(tl.float32)
    tl.store(partials_ptr + pid * 8 + 0, tl.sum(tl.where(valid, weight * pg, 0.0), axis=0))
    tl.store(partials_ptr + pid * 8 + 2, tl.sum(weight * pg_clip_flag, axis=0))
    tl.store(partials_ptr + pid * 8 + 3, tl.sum(weight * 0.5 * log_ratio * log_ratio, axis=0))

    if HAS_VALUES:
        value = tl.load(values_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        target = tl.load(returns_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        error = value - target
        if CLIP_VALUES:
            old_value = tl.load(old_values_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
            # clamp(v, old - c, old + c): equal to v exactly inside the range (old + clamp(v - old) is not).
            low = old_value - value_clip
            high = old_value + value_clip
            clipped_value = _nan_min(_nan_max(value, low), high)
            value_in_range = (value >= low) & (value <= high)
            clipped_error = clipped_value - target
            vf_unclipped = error * error
            vf_clipped = clipped_error * clipped_error
            vf = 0.5 * _nan_max(vf_unclipped, vf_clipped)
            grad_vf = _max_branch_grad(vf_unclipped, vf_clipped, error,
                                       tl.where(value_in_range, clipped_error, 0.0))
            vf_clip_flag = (vf_clipped > vf_unclipped).to(tl.float32)
            tl.store(partials_ptr + pid * 8 + 4, tl.sum(weight * vf_clip_flag, axis=0))
        else:
            # Both branches are the plain squared error, and the clip fraction stays 0 (partials start zeroed).
            # Written out rather than as a max of equal terms: Triton 3.6's ptxas spilled a register on that form.
            vf = 0.5 * error * error
            grad_vf = error
        tl.store(grad_values_ptr + offsets, tl.where(valid, (weight * vf_coef) * grad_vf, 0.0), mask=inside)
        tl.store(partials_ptr + pid * 8 + 1, tl.sum(tl.where(valid, weight * vf, 0.0), axis=0))


def ppo_loss_forward(logprobs, old_logprobs, advantages, mask, weights, *, weight_mode=WEIGHT_SCALAR,
                     values=None, old_values=None, returns=None, whiten_params=None, clip_eps=0.2,
                     clip_eps_high=None, value_clip=0.2, vf_coef=0.1, block=1024):
    """One pass of the clipped PPO loss over contiguous inputs of one shape on one device.

    `weights` (float32) holds the aggregation weight of each valid token, laid out as `weight_mode` says.
    `whiten_params` (float32 (2,) = mean, 1/std), when given, whitens the advantages on the fly and the whitened
    advantages are returned. Returns (loss, stats5, grad_logprobs, grad_values, whitened): loss and stats5 (in
    STAT_NAMES order) are float32 tensors; grad_values is None without values, whitened None without whitening.
    """
    device = mask.device
    num_tokens = mask.numel()
    row_length = mask.shape[-1] if mask.dim() and mask.shape[-1] else 1
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    has_values = values is not None
    whiten = whiten_params is not None
    grad_logprobs = torch.empty(mask.shape, dtype=torch.float32, device=device)
    grad_values = torch.empty(mask.shape, dtype=torch.float32, device=device) if has_values else None
    whitened = torch.empty(mask.shape, dtype=torch.float32, device=device) if whiten else None
    num_blocks = triton.cdiv(num_tokens, block)
    # Zeroed: without values the kernel leaves the vf columns alone.
    partials = torch.zeros((num_blocks, _PARTIAL_STRIDE), dtype=torch.float32, device=device)
    if num_blocks:
        placeholder = grad_logprobs  # stands in for absent optional pointers; never read or written
        _ppo_loss_fwd_kernel[(num_blocks,)](
            logprobs, old_logprobs, advantages, mask.view(torch.uint8),
            values if has_values else placeholder, old_values if has_values else placeholder,
            returns if has_values else placeholder, weights, whiten_params if whiten else placeholder,
            grad_logprobs, grad_values if has_values else placeholder, whitened if whiten else placeholder,
            partials, num_tokens, row_length, float(clip_eps), float(clip_eps_high),
            float(value_clip) if value_clip is not None else 0.0, float(vf_coef),
            HAS_VALUES=has_values, CLIP_VALUES=value_clip is not None, WEIGHT_MODE=weight_mode, WHITEN=whiten,
            BLOCK=block, num_warps=4)
    stats5 = partials[:, :5].sum(0)
    loss = stats5[0] + vf_coef * stats5[1] if has_values else stats5[0].clone()
    return loss, stats5, grad_logprobs, grad_values, whitened
