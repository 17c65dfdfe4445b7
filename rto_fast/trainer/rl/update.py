"""The second half of an RL iteration: `rl.ppo_epochs` passes of PPO updates over the scored rollouts
(docs/math.md §5). Functions take the trained models' `Optimization`s as arguments.

Usage:
    stats = ppo_update(rollout, actor, critic, settings, context, iteration, nonfinite)

Each pass shuffles the rollouts (a generator seeded by (runtime.seed, iteration)) into mini-batches of
`rl.mini_batch_size` responses, each packed into micro-batches of `rl.micro_batch_tokens`: fused log-probs (+
entropy) of the policy, critic values, `ops.ppo_loss`. Gradients of a mini-batch add up over its micro-batches (each
weighted by its share of the mini-batch's tokens, or responses for seq-mean-token-mean), then clipping and one
optimizer step. The policy runs over all micro-batches of a mini-batch, then the critic (each loss reads only its own
model): one model's activations are alive at a time, and with separate optimizers the actor steps and frees its
gradients before the critic's exist. With one shared optimizer (rl.critic_optimizer shared) the loss is pg + vf_coef
* vf and both step together after the critic's pass.

Data parallel: every rank draws the same mini-batch, trains on its token-balanced share, and runs as many passes
(ZeRO collectives; missing ones repeat a batch with weight 0); statistics are summed over ranks.
"""

from __future__ import annotations

import numpy as np
import torch

from ... import ops
from ..config import RLConfig
from ..optim import NonFiniteSteps
from ..optimization import Optimization
from ..packing import PackedBatch, first_fit_decreasing, pack, sequence_sums
from ..profiling import phase
from ..run import RunContext, autocast
from ..scoring import packed_logprobs, packed_values
from .rollout import RolloutBatch, scatter_to_stream


def stream_inputs(rollout: RolloutBatch, batch: PackedBatch, chosen: list[int]) -> dict:
    """The rollout's per-token fields the losses read, on the micro-batch's stream (made once for both passes)."""
    return {name: scatter_to_stream(getattr(rollout, name), batch, chosen)
            for name in ("old_logprobs", "advantages", "values", "returns")}


def aggregate(per_token: torch.Tensor, batch: PackedBatch, agg: str) -> torch.Tensor:
    """Mean of a (1, N) per-token tensor over the response tokens, aggregated like the loss (rl.agg)."""
    mask = batch.response_mask
    masked = torch.where(mask, per_token, torch.zeros((), device=per_token.device))
    if agg == "token-mean":
        return masked.sum() / mask.sum().clamp_min(1)
    per_sequence = sequence_sums(masked, batch) / sequence_sums(mask.float(), batch).clamp_min(1)
    return per_sequence.mean()


def _clipping(settings: RLConfig, batch: PackedBatch) -> dict:
    return dict(clip_eps=settings.clip_eps, clip_eps_high=settings.clip_eps_high, value_clip=settings.value_clip,
                agg=settings.agg, cu_seqlens=batch.cu_seqlens)


def policy_pass(actor: Optimization, batch: PackedBatch, inputs: dict, settings: RLConfig, context: RunContext,
                share: float, boundary: bool = True, mismatch: bool = False) -> dict:
    """Forward and backward of the policy on one micro-batch (clipped surrogate, entropy bonus); its stats.
    `inputs`: `stream_inputs` of the batch. `mismatch`: also "mismatch", (sum of |log-prob - old log-prob| over the
    response tokens, their count)."""
    old_logprobs, advantages = inputs["old_logprobs"], inputs["advantages"]
    with autocast(context), phase("policy_forward"):
        logprobs, entropy = packed_logprobs(actor.model, batch, return_entropy=True, inplace_backward=True,
                                            fused_output_layer=context.config.model.fused_output_layer)
    with phase("policy_loss"):
        policy_loss, stats = ops.ppo_loss(logprobs, old_logprobs, advantages, batch.response_mask,
                                          **_clipping(settings, batch))
        mean_entropy = aggregate(entropy, batch, settings.agg)
        if settings.entropy_coef:
            policy_loss = policy_loss - settings.entropy_coef * mean_entropy
    with phase("policy_backward"):
        actor.backward(policy_loss * share, boundary)
    stats = {name: value.detach() for name, value in stats.items() if name not in ("vf_loss", "vf_clipfrac")}
    if mismatch:
        mask = batch.response_mask
        difference = torch.where(mask, (logprobs.detach() - old_logprobs).abs(), 0.0)
        stats["mismatch"] = torch.stack([difference.sum(), mask.sum().to(difference.dtype)])
    return {**stats, "entropy": mean_entropy.detach()}


def critic_pass(critic: Optimization, batch: PackedBatch, inputs: dict, settings: RLConfig, context: RunContext,
                share: float, vf_coef: float, boundary: bool = True) -> dict:
    """Forward and backward of the critic on one micro-batch (clipped value loss); its stats. The loss is the joint
    one with the rollout's log-probs in the policy's place: its policy term is a constant, so only the value loss
    has a gradient."""
    old_logprobs, advantages = inputs["old_logprobs"], inputs["advantages"]
    with autocast(context), phase("critic_forward"):
        values = packed_values(critic.model, batch)
    with phase("critic_loss"):
        critic_loss, stats = ops.ppo_loss(old_logprobs, old_logprobs, advantages, batch.response_mask,
                                          values=values.float(), old_values=inputs["values"],
                                          returns=inputs["returns"], vf_coef=vf_coef, **_clipping(settings, batch))
    with phase("critic_backward"):
        critic.backward(critic_loss * share, boundary)
    return {"vf_loss": stats["vf_loss"].detach(), "vf_clipfrac": stats["vf_clipfrac"].detach()}


class _Totals:
    """Statistics of an iteration's passes: device tensors summed with each micro-batch's share (read back once)."""

    def __init__(self):
        self.sums: dict = {}
        self.shares = 0.0  # 1 per mini-batch on one rank, split over ranks otherwise
        self.mismatch: list[torch.Tensor] = []

    def add(self, stats: dict, share: float, pass_weight: float) -> None:
        if pass_weight:
            for key, value in stats.items():
                self.sums[key] = self.sums.get(key, 0.0) + value * share

    def means(self, dist) -> dict:
        if self.mismatch:  # (sum, count) pairs
            self.sums["mismatch_sum"], self.sums["mismatch_count"] = torch.stack(self.mismatch).sum(0).unbind()
        keys = sorted(self.sums)
        values = [float(value) for value in torch.stack([self.sums[key].double() for key in keys])] if keys else []
        totals = dist.sum_dicts({**dict(zip(keys, values)), "count": self.shares})
        mini_batches = max(totals.pop("count", 1.0), 1e-9)  # the shares of each mini-batch add up to 1
        mismatch_sum, mismatch_count = totals.pop("mismatch_sum", 0.0), totals.pop("mismatch_count", 0.0)
        stats = {key: value / mini_batches for key, value in totals.items()}
        if mismatch_count:
            stats["logprob_mismatch"] = mismatch_sum / mismatch_count
        return stats


def ppo_update(rollout: RolloutBatch, actor: Optimization, critic: Optimization, settings: RLConfig,
               context: RunContext, iteration: int, nonfinite: NonFiniteSteps) -> dict:
    """`rl.ppo_epochs` passes over `rollout` (see the module docstring); the iteration's training statistics.
    `critic` is `Optimization.follower` when actor and critic share one optimizer."""
    where = f"iteration {iteration + 1}"
    skipped_before = nonfinite.skipped
    sequences = rollout.sequences()
    generator = torch.Generator().manual_seed(context.config.runtime.seed * 1_000_003 + 7919 * iteration)
    separate = critic.engine is not None or critic.optimizer is not None
    totals, norms = _Totals(), []
    for _ in range(settings.ppo_epochs):
        order = torch.randperm(len(sequences), generator=generator).tolist()
        for start in range(0, len(sequences), settings.mini_batch_size):
            members = order[start:start + settings.mini_batch_size]
            norms.append(_mini_batch(rollout, sequences, members, actor, critic, separate, settings, context,
                                     totals, where, nonfinite, first=not norms))
    stats = totals.means(context.dist)
    stats["grad_norm_actor"] = float(np.mean([float(actor_norm) for actor_norm, _ in norms]))
    stats["grad_norm_critic"] = float(np.mean([float(critic_norm) for _, critic_norm in norms]))
    stats["optimizer_steps"] = len(norms)
    if nonfinite.skipped > skipped_before:  # NaN / inf gradient norms: those updates were not applied
        stats["updates_skipped"] = nonfinite.skipped - skipped_before
    nonfinite.finish_unit(where, "iterations")
    return stats


def _mini_batch(rollout: RolloutBatch, sequences: list, members: list[int], actor: Optimization,
                critic: Optimization, separate: bool, settings: RLConfig, context: RunContext, totals: _Totals,
                where: str, nonfinite: NonFiniteSteps, first: bool) -> tuple[float, float]:
    """One optimizer step (of each model) on the responses `members`; (actor, critic) gradient norms. `first`: the
    iteration's first mini-batch, whose log-probs before any update are compared with the scoring pass's."""
    dist = context.dist
    lengths = [len(sequences[i].input_ids) for i in members]
    response_lengths = {i: len(rollout.rollouts[i].response_ids) for i in members}
    mini_tokens = sum(response_lengths.values())
    # Every rank draws the same mini-batch and trains on its token-balanced share.
    mine, weight = dist.share(members, lengths)
    bins = first_fit_decreasing([len(sequences[i].input_ids) for i in mine], settings.micro_batch_tokens)
    passes = [([mine[i] for i in bin_], weight) for bin_ in bins]
    # Every rank runs as many passes (ZeRO collectives); missing ones repeat a batch with weight 0.
    passes.extend([(passes[-1][0], 0.0)] * (dist.max(len(passes)) - len(passes)))
    actor.zero_grad()
    if separate:
        critic.zero_grad()
    micro_batches = []
    for chosen, pass_weight in passes:
        share = pass_weight * (sum(response_lengths[i] for i in chosen) / mini_tokens
                               if settings.agg == "token-mean" else len(chosen) / len(members))
        batch = pack(sequences, chosen).to(context.device)
        micro_batches.append((batch, stream_inputs(rollout, batch, chosen), share, pass_weight))
    # The policy over every micro-batch, then the critic: the clipped surrogate (and the entropy bonus) reads only the
    # policy and the value loss only the critic, so this gives the joint loss's gradients, one model's activations are
    # alive at a time, and with separate optimizers the actor steps and frees its gradients before the critic's exist.
    for index, (batch, inputs, share, pass_weight) in enumerate(micro_batches):
        stats = policy_pass(actor, batch, inputs, settings, context, share, boundary=index == len(passes) - 1,
                            mismatch=first and bool(pass_weight))
        if "mismatch" in stats:
            totals.mismatch.append(stats.pop("mismatch"))
        totals.add(stats, share, pass_weight)
        totals.shares += share if pass_weight else 0.0
    actor_norm = None
    if separate:
        with phase("optimizer_step"):
            actor_norm = actor.step(nonfinite, where)
            actor.zero_grad()  # free before the critic's gradients exist
    vf_coef = 1.0 if separate else settings.vf_coef
    for index, (batch, inputs, share, pass_weight) in enumerate(micro_batches):
        totals.add(critic_pass(critic, batch, inputs, settings, context, share, vf_coef,
                               boundary=index == len(passes) - 1), share, pass_weight)
    with phase("optimizer_step"):
        if separate:
            return actor_norm, critic.step(nonfinite, where)
        norm = actor.step(nonfinite, where)  # one optimizer over both models: one norm, one step
        return norm, norm


__all__ = ["ppo_update", "policy_pass", "critic_pass", "stream_inputs", "aggregate"]
