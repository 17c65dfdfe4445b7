"""The first half of an RL iteration: sample responses, score them with every model, turn the scores into token
rewards and advantages. Functions take the models as arguments; `rto_fast.trainer.rl.stage` owns them.

Usage:
    rollouts = sample(policy, prompts, sampling, tokenizer)
    batch, dpo_offset = score(models, prompts, rollouts, rewards, context, frozen_on_device)
    batch = gather(batch, context.dist, whiten_advantages=True)        # every rank's rollouts, advantages whitened
    metrics = rollout_metrics(batch, rewards, tokenizer)

Scoring runs on packed prompt + response streams, in inference mode, model by model over the micro-batches (no
model's logits are held beyond one micro-batch): policy (old log-probs), reference, DPO model (rto and dppo; and for
the DPO implicit-reward metric whenever a DPO model exists), critic (values), reward model (score at the last token:
the eos when there is one; never a padding position, there is none). Rewards are `ops.token_rewards` in mode rto /
ppo / dppo (docs/math.md §3; with rl.true_reward the known r* per token or per response instead), the missing-eos
penalty, then `ops.gae` per packed micro-batch (the recursion restarts at every sequence; docs/math.md §4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ... import ops
from ...tasks import Task, token_true_rewards, true_rewards
from .. import distributed
from ..config import RLConfig
from ..generation import Rollout, SamplingSettings, generate
from ..packing import PackedBatch, build_micro_batches, sequence_sums
from ..profiling import phase
from ..run import RunContext, autocast
from ..scoring import implicit_dpo_rewards, last_token_scores, packed_logprobs, packed_values, response_sequence

WHITEN_EPS = 1e-8


# ------------------------------------------------------------------------------------------------ what is scored

@dataclass
class Models:
    """The models an RL iteration scores with (bare models: under DeepSpeed the engines' modules, whole); any of
    dpo_model and reward_model may be None."""

    policy: torch.nn.Module
    critic: torch.nn.Module
    reference: object  # a model, or a lora.SharedReference (the policy with its adapters off)
    dpo_model: torch.nn.Module | None
    reward_model: torch.nn.Module | None


@dataclass
class RewardSpec:
    """How one RL stage makes its token rewards (docs/math.md §3): its mode, the KL coefficient in force, the `rl`
    settings, whether the reward model's score is added, and the bundled task whose r* the oracles use."""

    mode: str
    kl_coef: float
    settings: RLConfig
    use_reward_model: bool
    task: Task | None = None

    def arguments(self) -> dict:
        """The keywords of ops.token_rewards."""
        settings = self.settings
        return dict(mode=self.mode, kl_coef=self.kl_coef, dpo_coef=settings.dpo_coef,
                    score_coef=settings.score_coef, dpo_clip=settings.dpo_clip, kl_estimator=settings.kl_estimator)


@dataclass
class RolloutBatch:
    """One iteration's samples. Per-token fields are lists (one float32 CPU tensor per response, one entry per
    response token, the eos included); per-response fields are float32 tensors (R,)."""

    prompts: list  # PromptExample per response
    rollouts: list[Rollout]
    old_logprobs: list[torch.Tensor]
    ref_logprobs: list[torch.Tensor]
    values: list[torch.Tensor]
    rewards: list[torch.Tensor]
    advantages: list[torch.Tensor]
    returns: list[torch.Tensor]
    dpo_rewards: torch.Tensor | None  # beta1 * sum(lp_dpo - lp_ref) per response
    scores: torch.Tensor | None  # reward-model score per response (before clipping)

    def __len__(self) -> int:
        return len(self.rollouts)

    def sequences(self) -> list:
        return [response_sequence(rollout.prompt_ids, rollout.response_ids) for rollout in self.rollouts]

    @staticmethod
    def concatenate(parts: list["RolloutBatch"]) -> "RolloutBatch":
        """One batch from per-rank parts, in the order given."""
        if len(parts) == 1:
            return parts[0]
        joined = {name: [item for part in parts for item in getattr(part, name)]
                  for name in ("prompts", "rollouts", "old_logprobs", "ref_logprobs", "values", "rewards",
                               "advantages", "returns")}
        for name in ("dpo_rewards", "scores"):
            joined[name] = None if parts[0].__dict__[name] is None else torch.cat([getattr(p, name) for p in parts])
        return RolloutBatch(**joined)


def split_per_sequence(values: torch.Tensor, batch: PackedBatch) -> list[torch.Tensor]:
    """Response-token values of a packed (1, N) tensor, one CPU tensor per packed sequence (packed order)."""
    mask = batch.response_mask.reshape(-1)
    flat = values.reshape(-1)[mask].float().cpu()
    counts = torch.zeros(batch.num_sequences, dtype=torch.long)
    segment_of_token = torch.repeat_interleave(torch.arange(batch.num_sequences), batch.seqlens.cpu())
    counts.index_add_(0, segment_of_token[mask.cpu()], torch.ones(int(mask.sum()), dtype=torch.long))
    return list(torch.split(flat, counts.tolist()))


def scatter_to_stream(per_sequence: list[torch.Tensor], batch: PackedBatch, order: list[int]) -> torch.Tensor:
    """(1, N) float32 stream holding per_sequence[order[s]] at the response positions of packed sequence s, on the
    batch's device (masked_scatter_ needs no host round trip of the mask, unlike boolean indexing)."""
    mask = batch.response_mask.reshape(-1)
    values = torch.cat([per_sequence[index] for index in order]).to(mask.device, non_blocking=True)
    out = torch.zeros(batch.num_tokens, dtype=torch.float32, device=mask.device)
    return out.masked_scatter_(mask, values)[None]


def whiten(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """(x - mean) / sqrt(var + 1e-8) over every entry of every tensor (unbiased variance, as TRL and OpenRLHF)."""
    flat = torch.cat(tensors).double()
    if flat.numel() < 2:
        return [tensor - flat.mean().float() for tensor in tensors]
    variance, mean = torch.var_mean(flat)
    scale = torch.rsqrt(variance + WHITEN_EPS)
    return [((tensor.double() - mean) * scale).float() for tensor in tensors]


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): how much of the returns the critic predicts (1 is perfect)."""
    variance = float(returns.double().var()) if returns.numel() > 1 else 0.0
    if variance == 0.0:
        return float("nan")
    return 1.0 - float((returns.double() - values.double()).var()) / variance


# ------------------------------------------------------------------------------------------------ sample

def sample(policy, prompts: list, sampling: SamplingSettings, tokenizer) -> list[Rollout]:
    """One response per prompt (PromptExample) from `policy`."""
    return generate(policy, [prompt.prompt_ids for prompt in prompts], sampling, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)


# ------------------------------------------------------------------------------------------------ score

def score(models: Models, prompts: list, rollouts: list[Rollout], spec: RewardSpec, context: RunContext,
          frozen_on_device) -> tuple[RolloutBatch, float | None]:
    """(log-probs, values, rewards and not yet whitened advantages of this rank's rollouts; the mean DPO token reward
    subtracted with rl.dpo_center, else None). `frozen_on_device(model)`: a context giving the model on the device
    for its pass (rto_fast.trainer.offload)."""
    settings = spec.settings
    host_batches = build_micro_batches([response_sequence(r.prompt_ids, r.response_ids) for r in rollouts],
                                       settings.micro_batch_tokens)
    orders = [batch.sequence_index.tolist() for batch in host_batches]  # read on the host: no device sync
    batches = [batch.to(context.device) for batch in host_batches]
    passes = _model_passes(models, batches, context, frozen_on_device)
    true_tokens = None
    if spec.settings.true_reward is not None:
        true_tokens = [torch.tensor(token_true_rewards(spec.task, prompt.prompt, rollout.response_ids,
                                                       rollout.finished, context.tokenizer), dtype=torch.float32)
                       for prompt, rollout in zip(prompts, rollouts)]
    reward_dpo, offset = passes["dpo"], None
    if settings.dpo_center and spec.mode == "rto" and settings.true_reward is None:
        reward_dpo, offset = _centred(batches, passes["dpo"], passes["reference"], settings.dpo_coef, context.dist)
    count = len(rollouts)
    fields = {name: [None] * count for name in ("old_logprobs", "ref_logprobs", "values", "rewards", "advantages",
                                                 "returns")}
    dpo_rewards = torch.zeros(count) if models.dpo_model is not None else None
    scores = torch.zeros(count) if models.reward_model is not None else None
    for index, (batch, order) in enumerate(zip(batches, orders)):
        with phase("rewards_gae"):
            finished = torch.tensor([rollouts[i].finished for i in order], device=context.device)
            stream = None if true_tokens is None else scatter_to_stream(true_tokens, batch, order)
            rewards, advantages, returns = rewards_and_advantages(
                spec, batch, passes["policy"][index], passes["reference"][index], reward_dpo[index],
                passes["critic"][index], passes["reward"][index], finished, stream)
        for name, tensor in (("old_logprobs", passes["policy"][index]), ("ref_logprobs", passes["reference"][index]),
                             ("values", passes["critic"][index]), ("rewards", rewards), ("advantages", advantages),
                             ("returns", returns)):
            for sequence, piece in zip(order, split_per_sequence(tensor, batch)):
                fields[name][sequence] = piece
        if dpo_rewards is not None:
            dpo_rewards[order] = implicit_dpo_rewards(passes["dpo"][index], passes["reference"][index], batch,
                                                      settings.dpo_coef).cpu()
        if scores is not None:
            scores[order] = passes["reward"][index].float().cpu()
    return RolloutBatch(prompts=prompts, rollouts=rollouts, dpo_rewards=dpo_rewards, scores=scores, **fields), offset


def _model_passes(models: Models, batches: list[PackedBatch], context: RunContext, frozen_on_device) -> dict:
    """Per model, its per-micro-batch results (None entries for a model that is not there). Model by model over all
    micro-batches (the per-token results are small): an offloaded frozen model is on the device for its one pass
    only. Partitioned frozen models (ZeRO-3) gather their weights in every forward: every rank runs as many passes
    through them; the extra ones repeat the last batch and are dropped."""
    dist = context.dist
    frozen_passes = dist.max(len(batches)) if distributed.zero_stage(dist) == 3 else len(batches)
    fused = context.config.model.fused_output_layer

    def logprobs_of(model, batch):
        return packed_logprobs(model, batch, fused_output_layer=fused)

    def each_batch(name: str, model, score_of, passes: int = len(batches)) -> list:
        if model is None:
            return [None] * len(batches)
        results = []
        with phase(name), frozen_on_device(model) as model, autocast(context):
            for index in range(passes):
                result = score_of(model, batches[min(index, len(batches) - 1)])
                if index < len(batches):
                    results.append(result)
        return results

    return {"policy": each_batch("policy_logprobs", models.policy, logprobs_of),
            "reference": each_batch("reference_logprobs", models.reference, logprobs_of, frozen_passes),
            "dpo": each_batch("dpo_logprobs", models.dpo_model, logprobs_of, frozen_passes),
            "critic": each_batch("critic_values", models.critic, packed_values),
            "reward": each_batch("reward_model_scores", models.reward_model, last_token_scores, frozen_passes)}


def _centred(batches, dpo_logprobs, ref_logprobs, dpo_coef: float, dist) -> tuple[list, float]:
    """rl.dpo_center: the DPO log-probs shifted by the batch's mean log-ratio per response token (all ranks), so the
    dense reward dpo_coef * (dpo - shift - ref) has mean 0 over the rollout batch; and that mean reward."""
    total, count = dist.sum([
        sum(float(torch.where(batch.response_mask, dpo - ref, 0.0).sum())
            for batch, dpo, ref in zip(batches, dpo_logprobs, ref_logprobs)),
        sum(float(batch.response_mask.sum()) for batch in batches)])
    shift = total / max(count, 1.0)
    return [dpo - shift for dpo in dpo_logprobs], dpo_coef * shift


def rewards_and_advantages(spec: RewardSpec, batch: PackedBatch, logprobs, ref_logprobs, dpo_logprobs, values,
                           scores, finished, true_rewards_stream=None):
    """(rewards, advantages, returns) of one packed micro-batch: ops.token_rewards, missing-eos penalty, ops.gae.
    `scores` (S,) are the reward model's raw scores (used only when the stage adds them); `finished` (S,) bool;
    `true_rewards_stream` (1, N): r* per response token, with rl.true_reward."""
    settings = spec.settings
    mask = batch.response_mask
    reward_score = None
    if spec.use_reward_model:
        reward_score = scores.float()
        if settings.score_clip is not None:
            reward_score = reward_score.clamp(-settings.score_clip, settings.score_clip)
    if settings.true_reward is None:
        rewards = ops.token_rewards(logprobs, ref_logprobs, mask, dpo_logprobs=dpo_logprobs, score=reward_score,
                                    cu_seqlens=batch.cu_seqlens, **spec.arguments())
    else:  # the oracles: the KL penalty of mode ppo, plus r* per token (dense) or r* of the response (sparse)
        arguments = {**spec.arguments(), "mode": "ppo", "score_coef": 1.0}
        if settings.true_reward == "sparse":
            reward_score = sequence_sums(true_rewards_stream, batch)
        rewards = ops.token_rewards(logprobs, ref_logprobs, mask, score=reward_score, cu_seqlens=batch.cu_seqlens,
                                    **arguments)
        if settings.true_reward == "dense":
            rewards = rewards + true_rewards_stream
    if settings.missing_eos_penalty:
        last = batch.cu_seqlens[1:].long() - 2  # the position that predicts each response's last token
        penalty = torch.where(finished, 0.0, settings.missing_eos_penalty).to(rewards.dtype)
        rewards = rewards.clone()
        rewards[0, last] -= penalty
    advantages, returns = ops.gae(rewards, values.float(), mask, gamma=settings.gamma, lam=settings.lam,
                                  cu_seqlens=batch.cu_seqlens)
    return rewards, advantages, returns


def gather(rollout: RolloutBatch, dist, whiten_advantages: bool) -> RolloutBatch:
    """Every rank's rollouts on every rank (rank order, which is the order of the prompts), advantages whitened over
    all of them."""
    rollout = RolloutBatch.concatenate(dist.gather(rollout))
    if whiten_advantages:
        rollout.advantages = whiten(rollout.advantages)
    return rollout


# ------------------------------------------------------------------------------------------------ metrics

def rollout_metrics(rollout: RolloutBatch, spec: RewardSpec, tokenizer) -> dict:
    """Means over the rollout batch of what the samples earned and cost."""
    lengths = torch.tensor([len(r.response_ids) for r in rollout.rollouts], dtype=torch.float64)
    rewards = torch.cat(rollout.rewards).double()
    kl = torch.stack([(lp - ref).double().sum() for lp, ref in zip(rollout.old_logprobs, rollout.ref_logprobs)])
    returns = torch.cat(rollout.returns)
    values = torch.cat(rollout.values)
    metrics = {
        "response_length": float(lengths.mean()),
        "eos_fraction": float(np.mean([r.finished for r in rollout.rollouts])),
        "token_reward": float(rewards.mean()),
        "sequence_reward": float(torch.stack([r.double().sum() for r in rollout.rewards]).mean()),
        "kl": float(kl.mean()),
        "kl_coef": spec.kl_coef,
        "value_mean": float(values.double().mean()),
        "return_mean": float(returns.double().mean()),
        "explained_variance": explained_variance(values, returns),
    }
    if rollout.dpo_rewards is not None:
        metrics["dpo_reward"] = float(rollout.dpo_rewards.double().mean())
    if rollout.scores is not None:
        metrics["rm_score"] = float(rollout.scores.double().mean())
    if spec.task is not None:
        metrics["true_reward"] = float(true_rewards(spec.task, rollout.prompts, rollout.rollouts, tokenizer).mean())
    return metrics


__all__ = ["Models", "RewardSpec", "RolloutBatch", "sample", "score", "gather", "rewards_and_advantages",
           "rollout_metrics", "whiten", "explained_variance", "scatter_to_stream", "split_per_sequence"]
