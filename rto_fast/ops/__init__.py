"""Fused RLHF ops: per-token log-probs, RTO token rewards, GAE and the clipped PPO loss.

    import rto_fast.ops as ops
    logprobs = ops.token_logprobs(logits, labels)                       # (B, T) float32, never a fp32 log-softmax
    logps = ops.selective_log_softmax(logits, index)                    # TRL's function: its dtype, (..., K) index
    rewards = ops.token_rewards(logprobs, ref_logprobs, response_mask,
                                mode="rto", dpo_logprobs=dpo_logprobs)  # dense RTO rewards
    advantages, returns = ops.gae(rewards, values, response_mask)
    loss, stats = ops.ppo_loss(new_logprobs, logprobs, advantages, response_mask,
                               values=new_values, old_values=values, returns=returns)

CUDA tensors run Triton kernels; CPU tensors run a vectorized torch / C++ path; RTO_FAST_BACKEND=triton|torch|reference
forces a backend. The math is `rto_fast.ops.reference`; the contract is docs/ops.md.
"""

from .adamw import fused_adamw_available, stochastic_rounding_adamw_
from .drop_in import selective_log_softmax
from .gae_ppo import gae, gae_ppo_loss, ppo_loss
from .logprobs import linear_token_logprobs, token_logprobs
from .rewards import token_rewards, token_rewards_from_logits

__all__ = [
    "token_logprobs",
    "linear_token_logprobs",
    "selective_log_softmax",
    "token_rewards",
    "token_rewards_from_logits",
    "gae",
    "ppo_loss",
    "gae_ppo_loss",
    "stochastic_rounding_adamw_",
    "fused_adamw_available",
]
