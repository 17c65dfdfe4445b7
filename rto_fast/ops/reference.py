"""Plain PyTorch definitions of every op in `rto_fast.ops`: the specification and the test oracle.

Usage (what the tests do)::

    from rto_fast import reference
    expected = reference.token_logprobs(logits.double(), labels)

Nothing here is fast and nothing here is clever: each function is the math of docs/math.md written as directly as
PyTorch allows. Inputs in float64 give float64 outputs (the oracle); any lower precision is computed in float32.
The fast paths (`rto_fast.ops`) must agree with these functions; when they disagree, this file is right.

Shared conventions (docs/ops.md, "What a trajectory is"):
- A trajectory is a row of a padded `(B, T)` batch, or one sequence `cu_seqlens[s]:cu_seqlens[s+1]` of a packed
  `(N,)` / `(1, N)` stream (both are called segments here).
- `mask` is bool: its True positions are the trajectory's action tokens (the tokens the policy sampled). False
  positions inside a trajectory (prompt, padding, environment or tool output between turns) are not actions: their
  inputs are never read and every output there is 0.
- The score and DPPO's summed DPO term go on the trajectory's last action token. GAE runs over the action tokens
  as if the holes were removed: the next value of an action token is the value of the next action token of the
  same trajectory, 0 after its last.
- NaN or inf at an action token propagates as torch propagates it (NaN in, NaN out); a softmax over a row whose
  logits are all -inf is NaN, as torch.log_softmax gives.
"""

from __future__ import annotations

import torch

__all__ = [
    "token_logprobs",
    "linear_token_logprobs",
    "token_rewards",
    "token_rewards_from_logits",
    "gae",
    "masked_whiten",
    "ppo_loss",
    "gae_ppo_loss",
    "kl_penalty",
    "segment_starts",
    "segment_ids",
    "last_action_flags",
]

MODES = ("rto", "ppo", "dppo")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (the oracle); everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Log-probs and entropy
# ---------------------------------------------------------------------------------------------------------------


def token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """log softmax(logits / temperature)[label] per position; entropy of the same distribution if asked.

    Positions whose label is `ignore_index` give log-prob 0 and entropy 0.
    """
    z = logits.to(_compute_dtype(logits.dtype)) / temperature
    valid = labels != ignore_index
    if bool(((labels < 0) | (labels >= logits.shape[-1]))[valid].any()):
        raise ValueError("labels: a label outside [0, vocab_size) that is not ignore_index")
    log_p = torch.log_softmax(z, dim=-1)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    logprobs = log_p.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(valid, logprobs, torch.zeros_like(logprobs))
    if not return_entropy:
        return logprobs
    # p log p is 0 where p = 0 (a -inf logit, e.g. a masked vocabulary); log p is replaced there before the product so
    # that neither the value nor the gradient sees 0 * -inf.
    finite_log_p = torch.where(log_p == float("-inf"), torch.zeros_like(log_p), log_p)
    entropy = -(log_p.exp() * finite_log_p).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logprobs, entropy


def linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False):
    """token_logprobs of the logits hidden @ weight.T + bias, computed in the compute dtype."""
    dtype = _compute_dtype(hidden.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                          return_entropy=return_entropy)


# ---------------------------------------------------------------------------------------------------------------
# Response runs and segments
# ---------------------------------------------------------------------------------------------------------------


def segment_starts(shape, cu_seqlens=None, device=None) -> torch.Tensor:
    """Flat bool tensor over prod(shape) positions: True where a segment (row or packed sequence) starts."""
    numel = 1
    for size in shape:
        numel *= size
    starts = torch.zeros(numel, dtype=torch.bool, device=device)
    if cu_seqlens is None:
        row_length = shape[-1] if len(shape) else 1
        if numel:
            starts[::row_length] = True
    else:
        begins = cu_seqlens[:-1].long()
        begins = begins[begins < numel]
        starts[begins.to(starts.device)] = True
    return starts


def segment_ids(shape, cu_seqlens=None, device=None) -> torch.Tensor:
    """Flat int64 tensor over prod(shape) positions: the number of the segment (trajectory) each position is in."""
    numel = 1
    for size in shape:
        numel *= size
    positions = torch.arange(numel, device=device)
    if cu_seqlens is None:
        row_length = shape[-1] if len(shape) else 1
        return positions // max(row_length, 1)
    # Empty sequences (repeated cu_seqlens entries) keep their numbers: the segment of position p is the last s
    # with cu_seqlens[s] <= p.
    offsets = cu_seqlens.to(device=device, dtype=torch.int64)
    return torch.searchsorted(offsets, positions, right=True) - 1


def last_action_flags(mask, cu_seqlens=None) -> torch.Tensor:
    """Flat bool over the positions of `mask`: True at the last action token (last True position) of every
    trajectory that has one."""
    flat = mask.reshape(-1).tolist()
    segments = segment_ids(mask.shape, cu_seqlens, device=mask.device).tolist()
    last = {}
    for position, (is_action, segment) in enumerate(zip(flat, segments)):
        if is_action:
            last[segment] = position
    flags = torch.zeros(len(flat), dtype=torch.bool, device=mask.device)
    flags[list(last.values())] = True
    return flags


# ---------------------------------------------------------------------------------------------------------------
# Token rewards (docs/math.md §3)
# ---------------------------------------------------------------------------------------------------------------


def kl_penalty(logprobs, ref_logprobs, kl_estimator="k1"):
    """The per-token KL estimate k(lp, lp_ref) of docs/math.md §3."""
    log_ratio = logprobs - ref_logprobs
    if kl_estimator == "k1":
        return log_ratio
    if kl_estimator == "k2":
        return 0.5 * log_ratio.square()
    if kl_estimator == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"kl_estimator: unknown estimator {kl_estimator!r}; expected one of {KL_ESTIMATORS}")


def token_rewards(logprobs, ref_logprobs, mask, *, mode="rto", dpo_logprobs=None, score=None, kl_coef=0.03,
                  dpo_coef=0.1, score_coef=1.0, dpo_clip=None, kl_estimator="k1", cu_seqlens=None):
    """Per-token rewards on the action tokens (mask True), 0 elsewhere.

    - rto:  clamp(dpo_coef * (dpo - ref), +-dpo_clip) - kl_coef * k on every action token,
            plus score_coef * score at the trajectory's last action token when `score` is given.
    - ppo:  -kl_coef * k, plus score_coef * score at the trajectory's last action token.
    - dppo: -kl_coef * k, plus dpo_coef * (sum over the trajectory's action tokens of (dpo - ref)) at its last
            action token, plus score_coef * score there when `score` is given.

    `score` holds one value per trajectory: `(B,)` for a padded `(B, T)` batch, `(S,)` for a packed stream.
    """
    if mode not in MODES:
        raise ValueError(f"mode: unknown mode {mode!r}; expected one of {MODES}")
    if mode in ("rto", "dppo") and dpo_logprobs is None:
        raise ValueError(f"dpo_logprobs: required for mode {mode!r}")
    dtype = _compute_dtype(logprobs.dtype)
    actions = mask.reshape(-1)
    segments = segment_ids(mask.shape, cu_seqlens, device=mask.device)
    last = last_action_flags(mask, cu_seqlens)
    ref = ref_logprobs.to(dtype).reshape(-1)
    rewards = -kl_coef * kl_penalty(logprobs.to(dtype).reshape(-1), ref, kl_estimator)
    if mode == "rto":
        dense = dpo_coef * (dpo_logprobs.to(dtype).reshape(-1) - ref)
        rewards = rewards + (dense.clamp(-dpo_clip, dpo_clip) if dpo_clip is not None else dense)
    num_segments = int(segments.max()) + 1 if segments.numel() else 0
    if mode == "dppo":
        # The sum of (dpo - ref) over each trajectory's action tokens, on its last action token.
        log_ratio = torch.where(actions, dpo_logprobs.to(dtype).reshape(-1) - ref, 0.0)
        sums = torch.zeros(num_segments, dtype=dtype, device=mask.device).index_add_(0, segments, log_ratio)
        rewards = rewards + torch.where(last, dpo_coef * sums[segments], 0.0)
    if score is not None:
        rewards = rewards + torch.where(last, score_coef * score.to(dtype).reshape(-1)[segments], 0.0)
    return torch.where(actions, rewards, 0.0).reshape(mask.shape)


def token_rewards_from_logits(logits, ref_logits, labels, mask, *, dpo_logits=None, temperature=1.0,
                              ignore_index=-100, **reward_kwargs):
    """The three log-probs from their logits, then token_rewards. Returns (rewards, lp, ref_lp, dpo_lp)."""
    logprobs = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index)
    ref_logprobs = token_logprobs(ref_logits, labels, temperature=temperature, ignore_index=ignore_index)
    dpo_logprobs = None
    if dpo_logits is not None:
        dpo_logprobs = token_logprobs(dpo_logits, labels, temperature=temperature, ignore_index=ignore_index)
    rewards = token_rewards(logprobs, ref_logprobs, mask, dpo_logprobs=dpo_logprobs, **reward_kwargs)
    return rewards, logprobs, ref_logprobs, dpo_logprobs


# ---------------------------------------------------------------------------------------------------------------
# GAE (docs/math.md §4)
# ---------------------------------------------------------------------------------------------------------------


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95, cu_seqlens=None):
    """Generalized advantage estimation over each trajectory's action tokens; returns (advantages, returns), 0 at
    every non-action position.

    For the action tokens h of one trajectory in order, with h' the next action token of the same trajectory:
    delta_h = r_h + gamma * V_{h'} - V_h, A_h = delta_h + gamma * lam * A_{h'} (V and A after the last action token
    are 0); R_h = A_h + V_h. Holes (False positions) are skipped, not treated as ends. A plain reverse loop over
    Python floats: the definition, not a fast path.
    """
    dtype = _compute_dtype(rewards.dtype)
    segments = segment_ids(mask.shape, cu_seqlens).tolist()
    r = rewards.to(dtype).reshape(-1).tolist()
    v = values.to(dtype).reshape(-1).tolist()
    actions = mask.reshape(-1).tolist()
    advantages = [0.0] * len(r)
    returns = [0.0] * len(r)
    next_value, next_advantage, next_segment = 0.0, 0.0, None
    for t in reversed(range(len(r))):
        if not actions[t]:
            continue
        if segments[t] != next_segment:  # the last action token of its trajectory
            next_value, next_advantage, next_segment = 0.0, 0.0, segments[t]
        delta = r[t] + gamma * next_value - v[t]
        next_advantage = delta + gamma * lam * next_advantage
        next_value = v[t]
        advantages[t] = next_advantage
        returns[t] = next_advantage + v[t]
    shape = mask.shape
    return (torch.tensor(advantages, dtype=dtype, device=rewards.device).reshape(shape),
            torch.tensor(returns, dtype=dtype, device=rewards.device).reshape(shape))


def masked_whiten(x, mask, *, shift_mean=True, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over the True positions of mask (unbiased variance, as TRL); 0 outside.
    Positions outside the mask are never read."""
    dtype = _compute_dtype(x.dtype)
    x = torch.where(mask, x.to(dtype), 0.0)
    count = mask.sum()
    mean = x.sum() / count
    var = torch.where(mask, (x - mean).square(), 0.0).sum() / count
    if count > 1:
        var = var * count / (count - 1)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


# ---------------------------------------------------------------------------------------------------------------
# PPO loss (docs/math.md §5)
# ---------------------------------------------------------------------------------------------------------------


def _aggregate(per_token, mask, agg, cu_seqlens=None):
    """token-mean: mean over all action tokens; seq-mean-token-mean: mean over trajectories with at least one
    action token of the per-trajectory token mean. Non-action positions are never read."""
    per_token = torch.where(mask, per_token, 0.0)
    if agg == "token-mean":
        return per_token.sum() / mask.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        segment_id = segment_ids(mask.shape, cu_seqlens, device=mask.device)
        flat_mask = mask.reshape(-1)
        num_segments = int(segment_id.max()) + 1 if segment_id.numel() else 0
        sums = torch.zeros(num_segments, dtype=per_token.dtype, device=per_token.device)
        counts = torch.zeros(num_segments, dtype=per_token.dtype, device=per_token.device)
        sums.index_add_(0, segment_id, per_token.reshape(-1))
        counts.index_add_(0, segment_id, flat_mask.to(per_token.dtype))
        present = counts > 0
        if not bool(present.any()):
            return per_token.new_zeros(())
        return (sums[present] / counts[present]).mean()
    raise ValueError(f"agg: unknown aggregation {agg!r}; expected one of {AGGREGATIONS}")


def ppo_loss(logprobs, old_logprobs, advantages, mask, *, values=None, old_values=None, returns=None,
             clip_eps=0.2, clip_eps_high=None, value_clip=0.2, vf_coef=0.1, agg="token-mean", cu_seqlens=None):
    """Clipped PPO surrogate plus (when `values` is given) vf_coef times the clipped value loss.

    Returns (loss, stats). stats: pg_loss, vf_loss, clipfrac, approx_kl, vf_clipfrac, each aggregated with `agg`
    (vf_loss and vf_clipfrac are 0 without values). clip_eps_high (default clip_eps) is the upper ratio clip;
    value_clip=None disables value clipping. cu_seqlens gives the sequences of a packed stream for
    seq-mean-token-mean (rows of a padded batch otherwise).
    """
    dtype = _compute_dtype(logprobs.dtype)
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    lp, old, adv = logprobs.to(dtype), old_logprobs.to(dtype), advantages.to(dtype)
    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps_high)
    pg = torch.maximum(unclipped, clipped)
    stats = {
        "pg_loss": _aggregate(pg, mask, agg, cu_seqlens),
        "clipfrac": _aggregate((clipped > unclipped).to(dtype), mask, agg, cu_seqlens),
        "approx_kl": _aggregate(0.5 * log_ratio.square(), mask, agg, cu_seqlens),
    }
    loss = stats["pg_loss"]
    if values is not None:
        if old_values is None or returns is None:
            raise ValueError("old_values, returns: required when values is given")
        v, old_v, ret = values.to(dtype), old_values.to(dtype), returns.to(dtype)
        if value_clip is None:
            v_clipped = v
        else:
            # clamp(v, old - c, old + c) rather than old + clamp(v - old, -c, c): mathematically the same, but
            # exactly v inside the range, so rounding never counts an unclipped token in vf_clipfrac.
            v_clipped = torch.clamp(v, old_v - value_clip, old_v + value_clip)
        loss_unclipped = (v - ret).square()
        loss_clipped = (v_clipped - ret).square()
        vf = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
        stats["vf_loss"] = _aggregate(vf, mask, agg, cu_seqlens)
        stats["vf_clipfrac"] = _aggregate((loss_clipped > loss_unclipped).to(dtype), mask, agg, cu_seqlens)
        loss = loss + vf_coef * stats["vf_loss"]
    else:
        stats["vf_loss"] = loss.new_zeros(())
        stats["vf_clipfrac"] = loss.new_zeros(())
    stats = {name: value.detach() for name, value in stats.items()}
    return loss, stats


def gae_ppo_loss(rewards, old_values, old_logprobs, logprobs, values, mask, *, gamma=1.0, lam=0.95, whiten=True,
                 cu_seqlens=None, **ppo_kwargs):
    """gae, then (optionally) whitening of the advantages over all valid tokens, then ppo_loss.

    Returns (loss, stats, advantages, returns); advantages are the whitened ones when whiten=True.
    """
    advantages, returns = gae(rewards, old_values, mask, gamma=gamma, lam=lam, cu_seqlens=cu_seqlens)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    loss, stats = ppo_loss(logprobs, old_logprobs, advantages, mask, values=values, old_values=old_values,
                           returns=returns, cu_seqlens=cu_seqlens, **ppo_kwargs)
    return loss, stats, advantages, returns
