"""The RL stages: RTO, PPO and DPPO in one loop (paper Algorithm 2; SPEC.md sections 2-5).

Usage (the CLI runs this for every RL stage a config lists: `stages: [sft, dpo, rto]`):
    output_folder = run_rl_stage("rto", context)     # run_dir/rto/model (policy) and run_dir/rto/critic

One iteration:
1. rollouts: `rl.rollout_batch_size` prompts (each `rl.samples_per_prompt` times), sampled from the policy with the
   KV cache (rto_fast.generation); a response stops at eos or is cut at `max_new_tokens` (then it has no eos, its
   last token is the last generated one, and `rl.missing_eos_penalty` can charge for it);
2. scoring passes on packed prompt + response streams, in inference mode, model by model over the micro-batches (no
   model's logits are held beyond one micro-batch): policy (old log-probs), reference, DPO model (rto and dppo; and
   for the DPO implicit-reward metric whenever a DPO model exists), critic (values), reward model (score at the last
   token: the eos when there is one; never a padding position, there is none); with `rl.offload_frozen_models` the
   frozen models live in host memory and each is copied to the GPU for its pass only (rto_fast.offload);
3. `ops.token_rewards` (mode rto / ppo / dppo), `ops.gae` per packed micro-batch (the recursion restarts at every
   sequence), then advantage whitening over all response tokens of the rollout batch;
4. `rl.ppo_epochs` passes over the rollouts in shuffled mini-batches of `rl.mini_batch_size` responses, each packed
   into micro-batches of `rl.micro_batch_tokens`: fused log-probs (+ entropy) of the policy, critic values,
   `ops.ppo_loss`; gradients of a mini-batch add up over its micro-batches (each weighted by its share of the
   mini-batch's tokens, or responses for seq-mean-token-mean), then clipping and one optimizer step. The policy runs
   over all micro-batches of a mini-batch, then the critic (each loss reads only its own model): one model's
   activations are alive at a time, and with separate optimizers the actor steps and frees its gradients before the
   critic's exist.

Actor and critic: separate Adam optimizers and learning rates (`rl.critic_optimizer: separate`, the official RTO
code's choice; the loss is pg + vf, each model gets its own gradient), or one optimizer over both with the loss
pg + vf_coef * vf (`shared`, TRL's choice). The critic starts from `model.critic_path`, else the reward model or
the SFT model (`rl.critic_init`). The KL coefficient is fixed or adapted towards `rl.kl_target` (the proportional
controller of Ziegler et al. 2019, as in TRL / OpenRLHF).

Log-probs are always those of the models themselves (temperature 1): the ratio, the KL and the DPO reward are about
pi, pi_ref and pi_dpo; `rl.temperature` only shapes the sampling.

Each iteration logs (metrics.jsonl, stage = the mode, step = iteration): the DPO implicit reward of the samples
(`dpo_reward`, the paper's Figure 3 curve), the RM score, the true reward r* on a bundled task, the mean token
reward and return, KL, entropy, response length, eos fraction, clip fractions, approx KL, value loss, explained
variance, kl_coef, the time split (generate / score / train), tokens/s and prompts seen. Every `rl.eval_every`
iterations (and at the end) the policy samples the first `rl.eval_prompts` test prompts with the eval stage's
sampling settings and logs `eval_*` means of the same judges (without disturbing the training RNG).

Checkpoints (every `runtime.checkpoint_every` iterations and at the end) hold policy, critic, both optimizers and
schedulers, the RNG states, kl_coef and the iteration; a resumed run repeats exactly what the uninterrupted run does.

Data parallel (`runtime.deepspeed`, several processes): policy and critic each run under a DeepSpeed engine
(separate optimizers); each rank samples and scores its slice of the rollout prompts, the rollouts are gathered on
every rank and advantages whitened over all of them, and each PPO mini-batch is split over the ranks by tokens.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from . import checkpoint as ckpt
from . import ops
from .config import PAPER_KL_COEF
from .generation import Rollout, SamplingSettings, generate
from .lora import LoraSettings, SharedReference, check_checkpoint, frozen_view, load_adapters
from .models import TINY, ValueHeadModel, load_causal_lm, trainable_copy
from .offload import HostResident, offload_saves_memory, on_device
from .optim import NonFiniteSteps, adamw
from .packing import PackedBatch, build_micro_batches, first_fit_decreasing, pack, sequence_sums
from .profiling import phase, profiled_step, reset_step_peak, step_peak_mb
from .run_log import ProgressBar
from .scoring import implicit_dpo_rewards, last_token_scores, packed_logprobs, packed_values, response_sequence
from . import distributed
from .distributed import EngineTrainer
from .stages import (CHECKPOINT_DIR, MODEL_DIR, STAGE_SEED_OFFSET, DataPlan, RunContext, _autocast,
                     lr_factor, resume_point, seed_everything, split_even, stage_init_path, stage_output)
from .stopping import checkpoint_or_stop
from .tasks import prompt_task, token_true_rewards, true_rewards

logger = logging.getLogger(__name__)

CRITIC_DIR = "critic"
WHITEN_EPS = 1e-8


# ------------------------------------------------------------------------------------------------ rollout data

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


def _split_per_sequence(values: torch.Tensor, batch: PackedBatch) -> list[torch.Tensor]:
    """Response-token values of a packed (1, N) tensor, one CPU tensor per packed sequence (packed order)."""
    mask = batch.response_mask.reshape(-1)
    flat = values.reshape(-1)[mask].float().cpu()
    counts = torch.zeros(batch.num_sequences, dtype=torch.long)
    segment_of_token = torch.repeat_interleave(torch.arange(batch.num_sequences), batch.seqlens.cpu())
    counts.index_add_(0, segment_of_token[mask.cpu()], torch.ones(int(mask.sum()), dtype=torch.long))
    return list(torch.split(flat, counts.tolist()))


def _scatter_to_stream(per_sequence: list[torch.Tensor], batch: PackedBatch, order: list[int]) -> torch.Tensor:
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


# ------------------------------------------------------------------------------------------------ KL controller

class AdaptiveKLController:
    """kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * responses / horizon (Ziegler et al. 2019)."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value = kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, kl_per_response: float, num_responses: int) -> None:
        error = float(np.clip(kl_per_response / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * num_responses / self.horizon


# ------------------------------------------------------------------------------------------------ the trainer

class RLTrainer:
    """The models, optimizers and one-iteration logic of an RL stage (`mode` rto, ppo or dppo)."""

    def __init__(self, mode: str, context: RunContext):
        self.mode = mode
        self.context = context
        self.config = context.config
        self.settings = context.config.rl
        self.device = context.device
        settings = self.settings
        self.kl_coef = settings.kl_coef if settings.kl_coef is not None else PAPER_KL_COEF[mode]
        # rl.true_reward (bundled tasks): r* per token in place of the DPO token reward (dense, mode rto), or r* of
        # the response in place of the reward model's score (sparse, mode ppo): the oracle bounds.
        self.true_reward = settings.true_reward
        self.dpo_offset = None  # rl.dpo_center: the mean DPO token reward subtracted in the last rollout batch
        self.use_reward_model = (settings.reward_model if settings.reward_model is not None
                                 else mode == "ppo" and self.true_reward != "sparse")
        self.tokenizer = context.tokenizer
        self.sampling = SamplingSettings(
            max_new_tokens=settings.max_new_tokens or self.config.data.max_response_length,
            temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
            batch_size=settings.generation_batch_size, ban_eos=settings.ban_eos,
            engine=settings.generation_engine, cuda_graph=settings.generation_cuda_graph,
            kv_cache=settings.generation_cache,
            # A static cache pays off only when shapes repeat: pad every batch's prompts to one width.
            prompt_width=self.config.data.max_prompt_length if settings.generation_cache == "static" else 0)
        self.task = prompt_task(self.config)  # a bundled task: its true reward r* is known
        self.dist = context.dist
        # Under DeepSpeed: the engines of policy and critic (self.policy / self.critic are then the engines, which
        # training passes go through; sampling and scoring use the bare models inside EngineTrainer.whole_model).
        self.actor_engine: EngineTrainer | None = None
        self.critic_engine: EngineTrainer | None = None
        # Optimizer steps with a NaN / inf gradient norm are skipped (runtime.max_nonfinite_steps iterations in a row
        # with one: an error); `where` names the current iteration in its messages.
        self.nonfinite = NonFiniteSteps(mode, self.config.runtime.max_nonfinite_steps)
        self.where = "iteration 1"

    # --- models
    def model_paths(self) -> dict[str, str | None]:
        """Where each model comes from; raises ValueError naming the missing one."""
        model_cfg = self.config.model
        context = self.context
        init = stage_init_path(self.mode, context)
        reward = stage_output("rm", context)
        dpo = stage_output("dpo", context)
        if self.mode in ("rto", "dppo") and dpo is None and self.true_reward != "dense":
            raise ValueError(f"stage {self.mode} needs the DPO model: list the dpo stage before it or set "
                             "model.dpo_path")
        if self.use_reward_model and reward is None:
            raise ValueError(f"stage {self.mode} uses the reward model's score (rl.reward_model): list the rm stage "
                             "before it or set model.reward_path")
        critic = model_cfg.critic_path
        if critic is None:
            init_choice = self.settings.critic_init
            if init_choice == "rm" and reward is None:
                raise ValueError("rl.critic_init: rm, but there is no reward model (rm stage or model.reward_path)")
            critic = str(reward) if init_choice == "rm" or (init_choice == "auto" and reward is not None) else init
        return {"policy": init, "reference": model_cfg.ref_path or init, "dpo": None if dpo is None else str(dpo),
                "reward": None if reward is None else str(reward), "critic": str(critic)}

    def build(self, resume_from: Path | None) -> None:
        config = self.config
        if self.settings.offload_frozen_models and distributed.zero_stage(self.dist) == 3:
            raise ValueError("rl.offload_frozen_models: under ZeRO-3 the frozen models are partitioned; offload "
                             "them with runtime.deepspeed.zero_optimization.offload_param instead")
        paths = self.model_paths()
        self.paths = paths
        seed = config.runtime.seed + STAGE_SEED_OFFSET[self.mode]
        dtype = config.model.dtype
        checkpointing = config.model.gradient_checkpointing
        # Frozen models first, in a fixed order, so a fresh and a resumed run draw the same random numbers; straight
        # into host memory when they are offloaded.
        offload = self.settings.offload_frozen_models and offload_saves_memory(self.device)
        frozen_device = torch.device("cpu") if offload else self.device
        lora = LoraSettings.from_config(config.model, self.mode)
        settings = self.settings
        # With LoRA, a reference that is where the policy starts is the policy with its adapters off (no copy).
        share_reference = lora is not None and paths["reference"] == paths["policy"]
        if paths["reference"] == TINY:
            torch.manual_seed(seed)
        if share_reference:
            self.policy = self._load_trained(paths["policy"], settings.actor_lr, lambda: load_causal_lm(
                paths["policy"], dtype=dtype, trainable=True, gradient_checkpointing=checkpointing,
                keep_dropout=config.model.keep_dropout, lora=lora, tokenizer=self.tokenizer))
            self.reference = SharedReference(self.policy)
        else:
            self.reference = self._load_frozen(paths["reference"], lambda path: load_causal_lm(
                path, dtype=dtype, trainable=False, tokenizer=self.tokenizer), frozen_device)
        self.dpo_model = (self._load_frozen(paths["dpo"], lambda path: load_causal_lm(path, dtype=dtype,
                                                                                     trainable=False), frozen_device)
                          if paths["dpo"] else None)
        self.reward_model = (self._load_frozen(paths["reward"], lambda path: ValueHeadModel.from_pretrained(
            path, dtype=dtype, trainable=False), frozen_device) if paths["reward"] else None)
        # Resuming full fine-tuning loads the checkpoint's weights; LoRA loads its adapters onto the starting models.
        resumed = resume_from is not None and lora is None
        policy_source = str(resume_from / MODEL_DIR) if resumed else paths["policy"]
        if not share_reference and resume_from is None and policy_source == paths["reference"] == TINY:
            # pi_0 = pi_ref with random 'tiny' weights: a copy of the frozen reference.
            self.policy = trainable_copy(self.reference, self.device, checkpointing, config.model.keep_dropout)
        elif not share_reference:
            self.policy = self._load_trained(policy_source, settings.actor_lr, lambda: load_causal_lm(
                policy_source, dtype=dtype, trainable=True, gradient_checkpointing=checkpointing,
                keep_dropout=config.model.keep_dropout, lora=lora, tokenizer=self.tokenizer))
        critic_source = str(resume_from / CRITIC_DIR / MODEL_DIR) if resumed else paths["critic"]
        if critic_source == TINY:
            torch.manual_seed(seed + 1)
        self.critic = self._load_trained(critic_source, settings.critic_lr, lambda: ValueHeadModel.from_pretrained(
            critic_source, dtype=dtype, trainable=True, gradient_checkpointing=checkpointing,
            keep_dropout=config.model.keep_dropout, lora=lora, tokenizer=self.tokenizer))
        if lora is not None and resume_from is not None:
            load_adapters(self.policy, resume_from / MODEL_DIR)
            load_adapters(self.critic, resume_from / CRITIC_DIR / MODEL_DIR)
        self.residents: dict[int, HostResident] = {}
        if settings.offload_frozen_models:
            self._offload_frozen_models()

    def _offload_frozen_models(self) -> None:
        """rl.offload_frozen_models: reference, DPO and reward model into host memory (after the policy may have
        been copied from the reference)."""
        if not offload_saves_memory(self.device):
            logger.info("rl.offload_frozen_models: no effect on a %s device (nothing to offload to)",
                        self.device.type)
            return
        for model in (self.reference, self.dpo_model, self.reward_model):
            if isinstance(model, torch.nn.Module):  # not a SharedReference: that one is the policy
                self.residents[id(model)] = HostResident(model, self.device)
        moved = sum(resident.nbytes for resident in self.residents.values()) / 2**20
        logger.info("rl.offload_frozen_models: %d frozen model(s), %.0f MiB, kept in host memory", len(self.residents),
                    moved)

    def frozen_on_device(self, model):
        """Context: `model` with its weights on the device (a copy when it is offloaded, else the model itself); a
        SharedReference is the policy with its adapters off."""
        if isinstance(model, SharedReference):
            return frozen_view(model)
        return on_device(self.residents.get(id(model)), model)

    def _optimizer_settings(self, lr: float) -> SimpleNamespace:
        settings = self.settings
        return SimpleNamespace(lr=lr, weight_decay=settings.weight_decay, adam_beta1=settings.adam_beta1,
                               adam_beta2=settings.adam_beta2, max_grad_norm=settings.max_grad_norm)

    def _load_frozen(self, path: str, load, device: torch.device):
        """A frozen model: straight into ZeRO-3 partitions under ZeRO-3 (build_optimizers then wraps it in an engine;
        not the random tiny model, which the policy copies whole), else whole on `device`."""
        return distributed.load_model(lambda: load(path), self.dist, device, enabled=path != TINY)

    def _load_trained(self, path: str, lr: float, load):
        """A model this stage trains: straight into ZeRO-3 partitions under ZeRO-3 (not the random tiny model, see
        Stage.load_trained), else whole on the device."""
        return distributed.load_model(load, self.dist, self.device, self._optimizer_settings(lr),
                                      enabled=path != TINY)

    def build_optimizers(self, total_steps: int) -> None:
        settings = self.settings

        def schedule(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, settings))

        if self.dist.engine:
            def engine(model, lr):
                return EngineTrainer(model, self._optimizer_settings(lr),
                                     lambda step: lr_factor(step, total_steps, settings), self.dist, self.device.type)

            self.actor_engine = engine(self.policy, settings.actor_lr)
            self.critic_engine = engine(self.critic, settings.critic_lr)
            # Under ZeRO-3 the frozen models are partitioned too; their forwards are then collective.
            if not isinstance(self.reference, SharedReference):  # that one is the policy, in its own engine
                self.reference = distributed.frozen_engine(self.reference, self.dist, "reference")
            if self.dpo_model is not None:
                self.dpo_model = distributed.frozen_engine(self.dpo_model, self.dist, "DPO model")
            if self.reward_model is not None:
                self.reward_model = distributed.frozen_engine(self.reward_model, self.dist, "reward model")
            self.policy, self.critic = self.actor_engine.engine, self.critic_engine.engine
            self.actor_optimizer = self.critic_optimizer = None
            self.actor_scheduler, self.critic_scheduler = self.actor_engine.scheduler, self.critic_engine.scheduler
            return
        actor_parameters = [p for p in self.policy.parameters() if p.requires_grad]
        critic_parameters = [p for p in self.critic.parameters() if p.requires_grad]
        self.actor_parameters, self.critic_parameters = actor_parameters, critic_parameters
        bf16_optimizer = self.config.model.bf16_optimizer
        if settings.critic_optimizer == "shared":
            self.actor_optimizer = adamw(actor_parameters + critic_parameters, settings.actor_lr, settings,
                                         bf16_optimizer)
            self.critic_optimizer = None
        else:
            self.actor_optimizer = adamw(actor_parameters, settings.actor_lr, settings, bf16_optimizer)
            self.critic_optimizer = adamw(critic_parameters, settings.critic_lr, settings, bf16_optimizer)
        self.actor_scheduler = schedule(self.actor_optimizer)
        self.critic_scheduler = schedule(self.critic_optimizer) if self.critic_optimizer is not None else None

    def steps_per_iteration(self, num_responses: int) -> int:
        return self.settings.ppo_epochs * math.ceil(num_responses / self.settings.mini_batch_size)

    @contextlib.contextmanager
    def whole_models(self):
        """(policy, critic) as bare models for scoring (see EngineTrainer.whole_model)."""
        if self.actor_engine is None:
            yield self.policy, self.critic
            return
        with self.actor_engine.whole_model() as policy, self.critic_engine.whole_model() as critic:
            yield policy, critic

    @contextlib.contextmanager
    def whole_policy(self):
        """The policy as a bare model for sampling (under ZeRO-3 only its parameters are gathered)."""
        if self.actor_engine is None:
            yield self.policy
            return
        with self.actor_engine.whole_model() as policy:
            yield policy

    # --- 1. rollouts
    def sample(self, prompts: list) -> list[Rollout]:
        with self.whole_policy() as policy:
            return generate(policy, [prompt.prompt_ids for prompt in prompts], self.sampling,
                            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)

    # --- 2. and 3. scoring, rewards, advantages
    def reward_arguments(self) -> dict:
        settings = self.settings
        return dict(mode=self.mode, kl_coef=self.kl_coef, dpo_coef=settings.dpo_coef, score_coef=settings.score_coef,
                    dpo_clip=settings.dpo_clip, kl_estimator=settings.kl_estimator)

    def score(self, prompts: list, rollouts: list[Rollout]) -> RolloutBatch:
        """Log-probs, values, rewards and (not yet whitened) advantages of this rank's rollouts."""
        with self.whole_models() as (policy, critic), torch.inference_mode():
            return self._score(policy, critic, prompts, rollouts)

    def gather(self, rollout: RolloutBatch) -> RolloutBatch:
        """Every rank's rollouts on every rank (rank order, which is the order of the prompts), advantages whitened
        over all of them."""
        rollout = RolloutBatch.concatenate(self.dist.gather(rollout))
        if self.settings.whiten_advantages:
            rollout.advantages = whiten(rollout.advantages)
        return rollout

    def _score(self, policy, critic, prompts: list, rollouts: list[Rollout]) -> RolloutBatch:
        settings = self.settings
        sequences = [response_sequence(r.prompt_ids, r.response_ids) for r in rollouts]
        count = len(sequences)
        fields = {name: [None] * count for name in ("old_logprobs", "ref_logprobs", "values", "rewards",
                                                      "advantages", "returns")}
        dpo_rewards = torch.zeros(count) if self.dpo_model is not None else None
        scores = torch.zeros(count) if self.reward_model is not None else None
        host_batches = build_micro_batches(sequences, settings.micro_batch_tokens)
        orders = [batch.sequence_index.tolist() for batch in host_batches]  # read on the host: no device sync
        batches = [batch.to(self.device) for batch in host_batches]
        # Model by model over all micro-batches (the per-token results are small): an offloaded frozen model is on
        # the device for its one pass only. Partitioned frozen models (ZeRO-3) gather their weights in every forward:
        # every rank runs as many passes through them; the extra ones repeat the last batch and are dropped.
        frozen_passes = self.dist.max(len(batches)) if distributed.zero_stage(self.dist) == 3 else len(batches)
        fused = self.config.model.fused_output_layer

        def each_batch(name: str, model, score, passes: int = len(batches)) -> list:
            if model is None:
                return [None] * len(batches)
            results = []
            with phase(name), self.frozen_on_device(model) as model, _autocast(self.context):
                for index in range(passes):
                    result = score(model, batches[min(index, len(batches) - 1)])
                    if index < len(batches):
                        results.append(result)
            return results

        def logprobs_of(model, batch):
            return packed_logprobs(model, batch, fused_output_layer=fused)

        true_tokens = None
        if self.true_reward is not None:
            true_tokens = [torch.tensor(token_true_rewards(self.task, prompt.prompt, rollout.response_ids,
                                                           rollout.finished, self.tokenizer), dtype=torch.float32)
                           for prompt, rollout in zip(prompts, rollouts)]
        logprobs = each_batch("policy_logprobs", policy, logprobs_of)
        ref_logprobs = each_batch("reference_logprobs", self.reference, logprobs_of, frozen_passes)
        dpo_logprobs = each_batch("dpo_logprobs", self.dpo_model, logprobs_of, frozen_passes)
        values = each_batch("critic_values", critic, packed_values)
        batch_scores = each_batch("reward_model_scores", self.reward_model, last_token_scores, frozen_passes)
        reward_dpo_logprobs = dpo_logprobs
        if settings.dpo_center and self.mode == "rto" and self.true_reward is None:
            # Shift the DPO log-probs by the batch's mean log-ratio per response token: the dense reward
            # dpo_coef * (dpo - shift - ref) then has mean 0 over the rollout batch (all ranks).
            total, count = self.dist.sum([
                sum(float(torch.where(batch.response_mask, dpo - ref, 0.0).sum())
                    for batch, dpo, ref in zip(batches, dpo_logprobs, ref_logprobs)),
                sum(float(batch.response_mask.sum()) for batch in batches)])
            shift = total / max(count, 1.0)
            self.dpo_offset = settings.dpo_coef * shift
            reward_dpo_logprobs = [dpo - shift for dpo in dpo_logprobs]
        for index, (batch, order) in enumerate(zip(batches, orders)):
            with phase("rewards_gae"):
                rewards, advantages, returns = self.rewards_and_advantages(
                    batch, logprobs[index], ref_logprobs[index], reward_dpo_logprobs[index], values[index],
                    batch_scores[index], finished=torch.tensor([rollouts[i].finished for i in order],
                                                               device=self.device),
                    true_rewards=None if true_tokens is None else _scatter_to_stream(true_tokens, batch, order))
            for name, tensor in (("old_logprobs", logprobs[index]), ("ref_logprobs", ref_logprobs[index]),
                                 ("values", values[index]), ("rewards", rewards), ("advantages", advantages),
                                 ("returns", returns)):
                for sequence, piece in zip(order, _split_per_sequence(tensor, batch)):
                    fields[name][sequence] = piece
            if dpo_rewards is not None:
                dpo_rewards[order] = implicit_dpo_rewards(dpo_logprobs[index], ref_logprobs[index], batch,
                                                          settings.dpo_coef).cpu()
            if scores is not None:
                scores[order] = batch_scores[index].float().cpu()
        return RolloutBatch(prompts=prompts, rollouts=rollouts, dpo_rewards=dpo_rewards, scores=scores, **fields)

    def rewards_and_advantages(self, batch, logprobs, ref_logprobs, dpo_logprobs, values, scores, finished,
                               true_rewards=None):
        """(rewards, advantages, returns) of one packed micro-batch: ops.token_rewards, missing-eos penalty, ops.gae.
        `scores` (S,) are the reward model's raw scores (used only when rl.reward_model is on); `finished` (S,) bool;
        `true_rewards` (1, N): r* per response token, with rl.true_reward."""
        settings = self.settings
        mask = batch.response_mask
        reward_score = None
        if self.use_reward_model:
            reward_score = scores.float()
            if settings.score_clip is not None:
                reward_score = reward_score.clamp(-settings.score_clip, settings.score_clip)
        if self.true_reward is None:
            rewards = ops.token_rewards(logprobs, ref_logprobs, mask, dpo_logprobs=dpo_logprobs, score=reward_score,
                                        cu_seqlens=batch.cu_seqlens, **self.reward_arguments())
        else:  # the oracles: the KL penalty of mode ppo, plus r* per token (dense) or r* of the response (sparse)
            arguments = {**self.reward_arguments(), "mode": "ppo", "score_coef": 1.0}
            if self.true_reward == "sparse":
                reward_score = sequence_sums(true_rewards, batch)
            rewards = ops.token_rewards(logprobs, ref_logprobs, mask, score=reward_score,
                                        cu_seqlens=batch.cu_seqlens, **arguments)
            if self.true_reward == "dense":
                rewards = rewards + true_rewards
        if settings.missing_eos_penalty:
            last = batch.cu_seqlens[1:].long() - 2  # the position that predicts each response's last token
            penalty = torch.where(finished, 0.0, settings.missing_eos_penalty).to(rewards.dtype)
            rewards = rewards.clone()
            rewards[0, last] -= penalty
        advantages, returns = ops.gae(rewards, values.float(), mask, gamma=settings.gamma, lam=settings.lam,
                                      cu_seqlens=batch.cu_seqlens)
        return rewards, advantages, returns

    # --- 4. PPO updates
    def train(self, rollout: RolloutBatch, iteration: int) -> dict:
        settings = self.settings
        self.where = f"iteration {iteration + 1}"
        skipped_before = self.nonfinite.skipped
        sequences = rollout.sequences()
        count = len(sequences)
        lengths = [len(sequence.input_ids) for sequence in sequences]
        response_lengths = [len(r.response_ids) for r in rollout.rollouts]
        totals: dict = {}
        shares = 0.0  # sum of the micro-batch shares: 1 per mini-batch on one rank, split over ranks otherwise
        norms: list[tuple] = []
        generator = torch.Generator().manual_seed(self.config.runtime.seed * 1_000_003 + 7919 * iteration)
        engines = self.actor_engine is not None
        separate = engines or self.critic_optimizer is not None
        vf_coef = 1.0 if separate else settings.vf_coef
        dist = self.dist
        # |log-prob now - log-prob at scoring| over the first mini-batch's response tokens, before any update: 0 when
        # the training forward computes what scoring computed (a diagnostic of kernels, dropout, batch layout).
        mismatch: list[torch.Tensor] = []
        for _ in range(settings.ppo_epochs):
            order = torch.randperm(count, generator=generator).tolist()
            for start in range(0, count, settings.mini_batch_size):
                members = order[start:start + settings.mini_batch_size]
                mini_tokens = sum(response_lengths[i] for i in members)
                # Every rank draws the same mini-batch and trains on its token-balanced share.
                mine, weight = dist.share(members, [lengths[i] for i in members])
                bins = first_fit_decreasing([lengths[i] for i in mine], settings.micro_batch_tokens)
                passes = [([mine[i] for i in bin_], weight) for bin_ in bins]
                # Every rank runs as many passes (ZeRO collectives); missing ones repeat a batch with weight 0.
                passes.extend([(passes[-1][0], 0.0)] * (dist.max(len(passes)) - len(passes)))
                if not engines:
                    self.actor_optimizer.zero_grad(set_to_none=True)
                    if separate:
                        self.critic_optimizer.zero_grad(set_to_none=True)
                micro_batches = []
                for chosen, pass_weight in passes:
                    share = pass_weight * (sum(response_lengths[i] for i in chosen) / mini_tokens
                                           if settings.agg == "token-mean" else len(chosen) / len(members))
                    batch = pack(sequences, chosen).to(self.device)
                    micro_batches.append((batch, self._stream_inputs(rollout, batch, chosen), share, pass_weight))

                def accumulate(stats, share, pass_weight):
                    if pass_weight:  # device tensors: read back once, after the last pass
                        for key, value in stats.items():
                            totals[key] = totals.get(key, 0.0) + value * share

                # The policy over every micro-batch, then the critic: the clipped surrogate (and the entropy bonus)
                # reads only the policy and the value loss only the critic, so this gives the joint loss's gradients,
                # one model's activations are alive at a time, and with separate optimizers the actor steps and
                # frees its gradients before the critic's exist.
                first = not norms  # no optimizer step yet in this iteration
                for index, (batch, inputs, share, pass_weight) in enumerate(micro_batches):
                    stats = self._policy_pass(batch, inputs, share, boundary=index == len(passes) - 1,
                                              mismatch=first and bool(pass_weight))
                    if "mismatch" in stats:
                        mismatch.append(stats.pop("mismatch"))
                    accumulate(stats, share, pass_weight)
                    shares += share if pass_weight else 0.0
                actor_norm = self._step_actor() if separate else None
                for index, (batch, inputs, share, pass_weight) in enumerate(micro_batches):
                    accumulate(self._critic_pass(batch, inputs, share, vf_coef, boundary=index == len(passes) - 1),
                               share, pass_weight)
                norms.append(self._step_critic(actor_norm) if separate else self._step_shared())
        if mismatch:  # (sum, count) pairs
            totals["mismatch_sum"], totals["mismatch_count"] = torch.stack(mismatch).sum(0).unbind()
        keys = sorted(totals)
        values = [float(value) for value in torch.stack([totals[key].double() for key in keys])] if keys else []
        totals = dist.sum_dicts({**dict(zip(keys, values)), "count": shares})
        mini_batches = max(totals.pop("count", 1.0), 1e-9)  # the shares of each mini-batch add up to 1
        mismatch_sum, mismatch_count = totals.pop("mismatch_sum", 0.0), totals.pop("mismatch_count", 0.0)
        stats = {key: value / mini_batches for key, value in totals.items()}
        if mismatch_count:
            stats["logprob_mismatch"] = mismatch_sum / mismatch_count
        stats["grad_norm_actor"] = float(np.mean([float(actor) for actor, _ in norms]))
        stats["grad_norm_critic"] = float(np.mean([float(critic) for _, critic in norms]))
        stats["optimizer_steps"] = len(norms)
        if self.nonfinite.skipped > skipped_before:  # NaN / inf gradient norms: those updates were not applied
            stats["updates_skipped"] = self.nonfinite.skipped - skipped_before
        self.nonfinite.finish_unit(self.where, "iterations")
        return stats

    @staticmethod
    def _stream_inputs(rollout: RolloutBatch, batch: PackedBatch, chosen: list[int]) -> dict:
        """The rollout's per-token fields the losses read, on the micro-batch's stream (made once for both passes)."""
        return {name: _scatter_to_stream(getattr(rollout, name), batch, chosen)
                for name in ("old_logprobs", "advantages", "values", "returns")}

    def _clipping(self, batch: PackedBatch) -> dict:
        settings = self.settings
        return dict(clip_eps=settings.clip_eps, clip_eps_high=settings.clip_eps_high, value_clip=settings.value_clip,
                    agg=settings.agg, cu_seqlens=batch.cu_seqlens)

    def _policy_pass(self, batch: PackedBatch, inputs: dict, share: float, boundary: bool = True,
                     mismatch: bool = False) -> dict:
        """Forward and backward of the policy on one micro-batch (clipped surrogate, entropy bonus); its stats.
        `inputs`: `_stream_inputs` of the batch. `mismatch`: also "mismatch", (sum of |log-prob - old log-prob| over
        the response tokens, their count)."""
        settings = self.settings
        old_logprobs, advantages = inputs["old_logprobs"], inputs["advantages"]
        with _autocast(self.context), phase("policy_forward"):
            logprobs, entropy = packed_logprobs(self.policy, batch, return_entropy=True, inplace_backward=True,
                                                fused_output_layer=self.config.model.fused_output_layer)
        with phase("policy_loss"):
            policy_loss, stats = ops.ppo_loss(logprobs, old_logprobs, advantages, batch.response_mask,
                                              **self._clipping(batch))
            mean_entropy = self._aggregate(entropy, batch)
            if settings.entropy_coef:
                policy_loss = policy_loss - settings.entropy_coef * mean_entropy
        with phase("policy_backward"):
            self._backward(self.actor_engine, policy_loss * share, boundary)
        stats = {name: value.detach() for name, value in stats.items() if name not in ("vf_loss", "vf_clipfrac")}
        if mismatch:
            mask = batch.response_mask
            difference = torch.where(mask, (logprobs.detach() - old_logprobs).abs(), 0.0)
            stats["mismatch"] = torch.stack([difference.sum(), mask.sum().to(difference.dtype)])
        return {**stats, "entropy": mean_entropy.detach()}

    def _critic_pass(self, batch: PackedBatch, inputs: dict, share: float, vf_coef: float,
                     boundary: bool = True) -> dict:
        """Forward and backward of the critic on one micro-batch (clipped value loss); its stats. The loss is the
        joint one with the rollout's log-probs in the policy's place: its policy term is a constant, so only the
        value loss has a gradient."""
        old_logprobs, advantages = inputs["old_logprobs"], inputs["advantages"]
        with _autocast(self.context), phase("critic_forward"):
            values = packed_values(self.critic, batch)
        with phase("critic_loss"):
            critic_loss, stats = ops.ppo_loss(old_logprobs, old_logprobs, advantages, batch.response_mask,
                                              values=values.float(), old_values=inputs["values"],
                                              returns=inputs["returns"],
                                              vf_coef=vf_coef, **self._clipping(batch))
        with phase("critic_backward"):
            self._backward(self.critic_engine, critic_loss * share, boundary)
        return {"vf_loss": stats["vf_loss"].detach(), "vf_clipfrac": stats["vf_clipfrac"].detach()}

    # Each step below checks its gradient norm on the host (one read back per optimizer step): a NaN / inf norm skips
    # the update (self.nonfinite), so one bad batch cannot write NaN into the weights and every later checkpoint.
    def _step_actor(self) -> float:
        """Clip and step the actor (separate optimizers), then free its gradients; returns the norm before clipping."""
        with phase("optimizer_step"):
            if self.actor_engine is not None:
                norm = self.actor_engine.step()
                self.nonfinite.allows(norm, self.where, "policy", applied=True)
                return norm
            norm = float(self._clip_gradients(self.actor_parameters))
            if self.nonfinite.allows(norm, self.where, "policy"):
                self.actor_optimizer.step()
            self.actor_scheduler.step()
            self.actor_optimizer.zero_grad(set_to_none=True)  # free before the critic's gradients exist
            return norm

    def _step_critic(self, actor_norm) -> tuple:
        with phase("optimizer_step"):
            if self.critic_engine is not None:
                norm = self.critic_engine.step()
                self.nonfinite.allows(norm, self.where, "critic", applied=True)
                return actor_norm, norm
            norm = float(self._clip_gradients(self.critic_parameters))
            if self.nonfinite.allows(norm, self.where, "critic"):
                self.critic_optimizer.step()
            self.critic_scheduler.step()
            return actor_norm, norm

    def _step_shared(self) -> tuple:
        """One optimizer over actor and critic: one norm over both (clipped together), one step."""
        with phase("optimizer_step"):
            norm = float(self._clip_gradients(self.actor_parameters + self.critic_parameters))
            if self.nonfinite.allows(norm, self.where, "policy and critic"):
                self.actor_optimizer.step()
            self.actor_scheduler.step()
            return norm, norm

    @staticmethod
    def _backward(engine, loss: torch.Tensor, boundary: bool) -> None:
        if engine is not None:
            engine.backward(loss, boundary)
        else:
            loss.backward()

    def _aggregate(self, per_token: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Mean of a (1, N) per-token tensor over the response tokens, aggregated like the loss (rl.agg)."""
        mask = batch.response_mask
        masked = torch.where(mask, per_token, torch.zeros((), device=per_token.device))
        if self.settings.agg == "token-mean":
            return masked.sum() / mask.sum().clamp_min(1)

        per_sequence = sequence_sums(masked, batch) / sequence_sums(mask.float(), batch).clamp_min(1)
        return per_sequence.mean()

    def _clip_gradients(self, parameters: list) -> torch.Tensor:
        """Clip the gradients of `parameters` to rl.max_grad_norm; returns their norm before clipping."""
        clip = self.settings.max_grad_norm if self.settings.max_grad_norm is not None else float("inf")
        return torch.nn.utils.clip_grad_norm_(parameters, clip)

    # --- checkpoints
    def save(self, folder: Path) -> None:
        ckpt.save_model(self.policy, folder / MODEL_DIR, self.tokenizer)
        ckpt.save_model(self.critic, folder / CRITIC_DIR, None)


# ------------------------------------------------------------------------------------------------ metrics

def rollout_metrics(trainer: RLTrainer, rollout: RolloutBatch) -> dict:
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
        "kl_coef": trainer.kl_coef,
        "value_mean": float(values.double().mean()),
        "return_mean": float(returns.double().mean()),
        "explained_variance": explained_variance(values, returns),
    }
    if rollout.dpo_rewards is not None:
        metrics["dpo_reward"] = float(rollout.dpo_rewards.double().mean())
    if trainer.dpo_offset is not None:
        metrics["dpo_offset"] = trainer.dpo_offset
    if rollout.scores is not None:
        metrics["rm_score"] = float(rollout.scores.double().mean())
    if trainer.task is not None:
        metrics["true_reward"] = float(true_rewards(trainer.task, rollout.prompts, rollout.rollouts,
                                                    trainer.tokenizer).mean())
    return metrics


def evaluate_policy(trainer: RLTrainer, prompts: list) -> dict:
    """eval_* means of the policy's samples on `prompts` (the eval stage's sampling settings and seed), under a
    forked RNG so that training draws the same random numbers with or without evaluation."""
    from .evaluation import Judges, score_rollouts

    config = trainer.config
    sampling = SamplingSettings(max_new_tokens=trainer.sampling.max_new_tokens, temperature=config.eval.temperature,
                                top_p=config.eval.top_p, batch_size=config.eval.batch_size,
                                engine=config.eval.generation_engine,
                                cuda_graph=config.eval.generation_cuda_graph)
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.eval.seed)
        with trainer.whole_policy() as policy:
            rollouts = generate(policy, [prompt.prompt_ids for prompt in prompts], sampling,
                                eos_token_id=trainer.tokenizer.eos_token_id,
                                pad_token_id=trainer.tokenizer.pad_token_id)
    with (trainer.frozen_on_device(trainer.reward_model) as reward_model,
          trainer.frozen_on_device(trainer.dpo_model) as dpo_model,
          trainer.frozen_on_device(trainer.reference) as ref_model):
        judges = Judges(reward_model=reward_model, dpo_model=dpo_model, ref_model=ref_model,
                        beta=trainer.settings.dpo_coef, task=trainer.task,
                        fused_output_layer=trainer.config.model.fused_output_layer)
        scores = score_rollouts(judges, prompts, rollouts, trainer.tokenizer, trainer.settings.micro_batch_tokens,
                                dist=trainer.dist if distributed.zero_stage(trainer.dist) == 3 else None)
    names = {"truth": "eval_true_reward", "dpo": "eval_dpo_reward", "rm": "eval_rm_score", "length": "eval_length",
             "finished": "eval_eos_fraction"}
    return {names.get(key, f"eval_{key}"): float(np.mean(values)) for key, values in scores.items()}


# ------------------------------------------------------------------------------------------------ the stage

def run_rl_stage(mode: str, context: RunContext) -> Path:
    """Train RL stage `mode` (rto, ppo or dppo), resuming when allowed; returns its policy's model folder."""
    config = context.config
    settings = config.rl
    runtime = config.runtime
    stage_dir = context.run_dir / mode
    output_dir = stage_dir / MODEL_DIR
    finished, resume_from = resume_point(mode, context)
    if finished:
        return output_dir
    if resume_from is not None:  # before any model loads: a checkpoint this launch cannot continue is an error
        distributed.check_resumable(resume_from, context.dist)
        for part in (Path(MODEL_DIR), Path(CRITIC_DIR) / MODEL_DIR):
            check_checkpoint(resume_from / part, LoraSettings.from_config(config.model, mode))
    if not context.train_prompts:
        raise ValueError(f"stage {mode}: no training prompts (data.source / rl.prompts)")

    seed = runtime.seed + STAGE_SEED_OFFSET[mode]
    seed_everything(seed)
    trainer = RLTrainer(mode, context)
    plan_settings = SimpleNamespace(batch_size=settings.rollout_batch_size, batch_unit="sequences",
                                    max_steps=settings.iterations, epochs=settings.epochs)
    plan = DataPlan([len(prompt.prompt_ids) for prompt in context.train_prompts], plan_settings, seed)
    iterations = plan.total_steps
    responses_per_iteration = settings.rollout_batch_size * settings.samples_per_prompt
    total_steps = iterations * trainer.steps_per_iteration(responses_per_iteration)
    logger.info("%s: %d iterations of %d prompts x %d samples over %d training prompts%s", mode, iterations,
                settings.rollout_batch_size, settings.samples_per_prompt, len(context.train_prompts),
                f", resuming from {resume_from}" if resume_from else "")
    trainer.build(resume_from)
    logger.info("%s: models %s; kl_coef %.4g, reward model score %s", mode, trainer.paths, trainer.kl_coef,
                "on" if trainer.use_reward_model else "off")
    sampling = trainer.sampling
    if sampling.engine == "transformers":
        sampler = "model.generate" + (" (static cache)" if sampling.kv_cache == "static" else "")
    else:
        graph = sampling.cuda_graph and trainer.device.type == "cuda"
        sampler = "rto_fast's decode loop" + (" (the decode step as a CUDA graph)" if graph else "")
    logger.info("%s: sampling with %s", mode, sampler)
    trainer.build_optimizers(total_steps)
    dist = context.dist
    if dist.parallel:  # ranks sample different prompts: they must not draw the same random numbers
        torch.manual_seed(seed * 1_000_003 + dist.rank)
    engines = {"": trainer.actor_engine, CRITIC_DIR: trainer.critic_engine} if trainer.actor_engine else None
    controller = AdaptiveKLController(trainer.kl_coef, settings.kl_target, settings.kl_horizon) \
        if settings.adaptive_kl else None

    state = {"stage": mode, "tokens_seen": 0, "prompts_seen": 0, "elapsed_s": 0.0, "kl_coef": trainer.kl_coef,
             "evaluated_at": -1}
    iteration = 0
    if resume_from is not None:
        if engines is not None:
            saved = distributed.load_checkpoint(resume_from, engines, dist)
        else:
            extra = {CRITIC_DIR: (trainer.critic_optimizer, trainer.critic_scheduler)}
            saved = ckpt.load_training_state(resume_from, trainer.actor_optimizer, trainer.actor_scheduler,
                                             extra=extra)
        iteration = int(saved["step"])
        state.update({key: saved[key] for key in state if key in saved})
        trainer.kl_coef = float(state["kl_coef"])
        if controller is not None:
            controller.value = trainer.kl_coef
    if dist.main:
        context.metrics.truncate(mode, after_step=iteration)

    eval_prompts = context.eval_prompts[:settings.eval_prompts] if settings.eval_prompts else []

    def save_checkpoint(at_iteration: int) -> None:
        if engines is not None:
            distributed.save_checkpoint(stage_dir / CHECKPOINT_DIR, at_iteration, engines,
                                        {**state, "total_steps": iterations}, context.tokenizer, runtime.keep_last,
                                        dist)
            return
        extra = {CRITIC_DIR: (trainer.critic, trainer.critic_optimizer, trainer.critic_scheduler)}
        ckpt.save_checkpoint(stage_dir / CHECKPOINT_DIR, at_iteration, trainer.policy, trainer.actor_optimizer,
                             trainer.actor_scheduler, {**state, "total_steps": iterations},
                             tokenizer=context.tokenizer, keep_last=runtime.keep_last, extra=extra)

    bar = ProgressBar(iterations, initial=iteration, desc=mode, enabled=runtime.progress_bar and dist.main)
    try:
        while iteration < iterations:
            with profiled_step(iteration + 1, context, stage_dir):
                record = run_iteration(trainer, plan, iteration, controller)
            iteration += 1
            state["tokens_seen"] += record["tokens"]
            state["prompts_seen"] += record["prompts"]
            state["elapsed_s"] += record["time_s"]
            state["kl_coef"] = trainer.kl_coef
            record.update({"stage": mode, "step": iteration, "tokens_seen": state["tokens_seen"],
                           "prompts_seen": state["prompts_seen"], "elapsed_s": round(state["elapsed_s"], 3)})
            last = iteration == iterations
            if eval_prompts and ((settings.eval_every and iteration % settings.eval_every == 0) or last):
                started = time.perf_counter()
                record.update(evaluate_policy(trainer, eval_prompts))
                record["time_eval_s"] = time.perf_counter() - started
                state["evaluated_at"] = iteration
            if dist.main and (iteration % runtime.log_every == 0 or last or "eval_length" in record):
                context.metrics.write(record)
            bar.update(iteration, record["tokens"], reward=record.get("true_reward", record.get("dpo_reward")))
            checkpoint_or_stop(iteration, last, runtime.checkpoint_every, save_checkpoint, dist, mode)
    finally:
        bar.close()

    if engines is not None:
        trainer.actor_engine.export(output_dir, context.tokenizer, atomic=True)
        trainer.critic_engine.export(stage_dir / CRITIC_DIR, atomic=True)
        dist.barrier()
    else:
        ckpt.write_atomic_folder(output_dir, lambda folder: ckpt.save_model(trainer.policy, folder,
                                                                            context.tokenizer))
        ckpt.write_atomic_folder(stage_dir / CRITIC_DIR, lambda folder: ckpt.save_model(trainer.critic, folder))
    logger.info("%s: finished after %d iterations; policy in %s, critic in %s", mode, iteration, output_dir,
                stage_dir / CRITIC_DIR)
    context.outputs[mode] = output_dir
    return output_dir


def run_iteration(trainer: RLTrainer, plan: DataPlan, iteration: int, controller) -> dict:
    """Sample, score and train on one rollout batch; returns the iteration's metrics."""
    settings = trainer.settings
    indices, epoch = plan.batch(iteration)
    prompts = [trainer.context.train_prompts[i] for i in indices for _ in range(settings.samples_per_prompt)]
    started = time.perf_counter()
    reset_step_peak(trainer.device)
    dist = trainer.dist
    if dist.parallel:  # this rank samples and scores its slice of the prompts; all slices are gathered after
        prompts = split_even(prompts, dist.world_size)[dist.rank]
    with phase("generate"):
        rollouts = trainer.sample(prompts)
    generated = time.perf_counter()
    with phase("score"):
        rollout = trainer.gather(trainer.score(prompts, rollouts))
    scored = time.perf_counter()
    lrs = {"lr_actor": trainer.actor_scheduler.get_last_lr()[0]}
    if trainer.critic_scheduler is not None:
        lrs["lr_critic"] = trainer.critic_scheduler.get_last_lr()[0]
    with phase("train"):
        train_stats = trainer.train(rollout, iteration)
    finished = time.perf_counter()
    metrics = rollout_metrics(trainer, rollout)
    if controller is not None:
        controller.update(metrics["kl"], len(rollout))
        trainer.kl_coef = controller.value
    response_tokens = sum(len(r.response_ids) for r in rollout.rollouts)
    tokens = response_tokens + sum(len(r.prompt_ids) for r in rollout.rollouts)
    elapsed = finished - started
    peak = step_peak_mb(trainer.device)
    memory = {} if peak is None else {"peak_memory_mb": dist.max(int(round(peak)))}  # the largest rank's
    return {"epoch": round(epoch, 4), "prompts": len(indices), **lrs, **metrics, **train_stats,
            "time_generate_s": generated - started, "time_score_s": scored - generated,
            "time_train_s": finished - scored, "time_s": elapsed, "tokens": tokens,
            "response_tokens": response_tokens, "tokens_per_s": tokens / max(elapsed, 1e-9), **memory}


__all__ = ["run_rl_stage", "RLTrainer", "RolloutBatch", "AdaptiveKLController", "whiten", "explained_variance"]
