"""An RL stage (RTO, PPO or DPPO; the paper's Algorithm 2, docs/math.md §2-5) as a `StageRun` of the one training
loop: its models, and one iteration per loop step.

Usage (the CLI runs this for every RL stage a config lists: `stages: [sft, dpo, rto]`):
    output_folder = run_stage(RLStage("rto", context), context)     # run_dir/rto/model (policy), run_dir/rto/critic

One iteration: `rl.rollout_batch_size` prompts (each `rl.samples_per_prompt` times) are sampled from the policy
(a response stops at eos or is cut at `max_new_tokens`), scored and turned into rewards and advantages
(rto_fast.trainer.rl.rollout), then trained on for `rl.ppo_epochs` passes (rto_fast.trainer.rl.update).

Models (which ones: rto_fast.trainer.pipeline): the frozen reference, DPO model and reward model load first, in a
fixed order (so a fresh and a resumed run draw the same random numbers), straight into host memory when
`rl.offload_frozen_models` keeps them there between their scoring passes (rto_fast.trainer.offload). With LoRA, a
reference that is where the policy starts is the policy with its adapters off. Actor and critic: separate Adam
optimizers and learning rates (`rl.critic_optimizer: separate`, the official RTO code's choice; each model gets its
own loss), or one optimizer over both with the loss pg + vf_coef * vf (`shared`, TRL's choice). The KL coefficient
is fixed or adapted towards `rl.kl_target` (the proportional controller of Ziegler et al. 2019, as in TRL /
OpenRLHF). Log-probs are always those of the models themselves (temperature 1): the ratio, the KL and the DPO reward
are about pi, pi_ref and pi_dpo; `rl.temperature` only shapes the sampling.

Each iteration logs (metrics.jsonl, stage = the mode, step = iteration): the DPO implicit reward of the samples
(`dpo_reward`, the paper's Figure 3 curve), the RM score, the true reward r* on a bundled task, the mean token reward
and return, KL, entropy, response length, eos fraction, clip fractions, approx KL, value loss, explained variance,
kl_coef, the time split (generate / score / train), tokens/s and prompts seen. Before the first iteration (logged
as iteration 0: the starting policy, the baseline), every `rl.eval_every` iterations and at the end, the policy
samples the first `rl.eval_prompts` test prompts with the eval stage's sampling settings and logs `eval_*` means of
the same judges (without disturbing the training RNG).

Checkpoints hold policy, critic, both optimizers and schedules, the RNG states, kl_coef and the iteration; a resumed
run repeats exactly what the uninterrupted run does. Data parallel (`runtime.deepspeed`, several processes): policy
and critic each run under a DeepSpeed engine; each rank samples and scores its slice of the prompts, the rollouts are
gathered on every rank and advantages whitened over all of them, and each PPO mini-batch is split over the ranks by
tokens.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from ...tasks import prompt_task
from .. import distributed
from ..evaluation import Judges, score_rollouts
from ..generation import SamplingSettings, generate
from ..layout import CRITIC_DIR, MODEL_DIR
from ..loading import causal_lm, frozen, trained, value_model
from ..lora import LoraSettings, SharedReference, check_checkpoint, frozen_view, load_adapters
from ..loop import STAGE_SEED_OFFSET, StageRun
from ..models import TINY, trainable_copy
from ..offload import HostResident, offload_saves_memory, on_device
from ..optim import NonFiniteSteps
from ..optimization import Optimization
from ..pipeline import Wiring, uses_reward_model
from ..profiling import phase
from ..run import DataPlan, RunContext, rank_share
from . import rollout as rollouts
from .update import ppo_update

logger = logging.getLogger(__name__)

EVAL_METRICS = {"truth": "eval_true_reward", "dpo": "eval_dpo_reward", "rm": "eval_rm_score", "length": "eval_length",
                "finished": "eval_eos_fraction"}


class AdaptiveKLController:
    """kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * responses / horizon (Ziegler et al. 2019)."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value = kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, kl_per_response: float, num_responses: int) -> None:
        error = float(np.clip(kl_per_response / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * num_responses / self.horizon


def sampling_settings(config, settings) -> SamplingSettings:
    """How an RL stage samples its rollouts."""
    return SamplingSettings(
        max_new_tokens=settings.max_new_tokens or config.data.max_response_length,
        temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
        batch_size=settings.generation_batch_size, ban_eos=settings.ban_eos, engine=settings.generation_engine,
        cuda_graph=settings.generation_cuda_graph, kv_cache=settings.generation_cache,
        # A static cache pays off only when shapes repeat: pad every batch's prompts to one width.
        prompt_width=config.data.max_prompt_length if settings.generation_cache == "static" else 0)


class RLStage(StageRun):
    """RL stage `mode` (rto, ppo or dppo): see the module docstring."""

    unit = "iterations"
    eval_at_start = True  # iteration 0: the policy before RL, the baseline the eval curve is read against

    def __init__(self, mode: str, context: RunContext):
        self.name = self.mode = mode
        self.context = context
        self.config = context.config
        self.settings = context.config.rl
        self.eval_every = self.settings.eval_every
        self.tokenizer = context.tokenizer
        self.dist = context.dist
        self.kl_coef = self.settings.kl_coef_for(mode)
        self.use_reward_model = uses_reward_model(self.config, mode)
        self.task = prompt_task(self.config)  # a bundled task: its true reward r* is known
        self.sampling = sampling_settings(self.config, self.settings)
        # Optimizer steps with a NaN / inf gradient norm are skipped (runtime.max_nonfinite_steps iterations in a row
        # with one: an error).
        self.nonfinite = NonFiniteSteps(mode, self.config.runtime.max_nonfinite_steps)
        self.dpo_offset = None  # rl.dpo_center: the mean DPO token reward subtracted in the last rollout batch
        self.prompts_seen = 0
        self.residents: dict[int, HostResident] = {}
        self.controller = None

    # --- the loop's side (rto_fast.trainer.loop.StageRun)
    def check_resume(self, checkpoint: Path) -> None:
        for part in (Path(MODEL_DIR), Path(CRITIC_DIR) / MODEL_DIR):
            check_checkpoint(checkpoint / part, LoraSettings.from_config(self.config.model, self.mode))

    def build(self, resume_from: Path | None) -> None:
        context, settings, mode = self.context, self.settings, self.mode
        if not context.train_prompts:
            raise ValueError(f"stage {mode}: no training prompts (data.source / rl.prompts)")
        seed = self.config.runtime.seed + STAGE_SEED_OFFSET[mode]
        self.plan = DataPlan([len(prompt.prompt_ids) for prompt in context.train_prompts], settings.plan(), seed)
        self.total_steps = self.plan.total_steps
        steps = self.total_steps * settings.ppo_epochs * math.ceil(
            settings.rollout_batch_size * settings.samples_per_prompt / settings.mini_batch_size)
        logger.info("%s: %d iterations of %d prompts x %d samples over %d training prompts%s", mode, self.total_steps,
                    settings.rollout_batch_size, settings.samples_per_prompt, len(context.train_prompts),
                    f", resuming from {resume_from}" if resume_from else "")
        self.build_models(resume_from)
        logger.info("%s: models %s; kl_coef %.4g, reward model score %s%s", mode, self.paths, self.kl_coef,
                    "on" if self.use_reward_model else "off",
                    f"; true reward r* {settings.true_reward} (oracle)" if settings.true_reward else "")
        logger.info("%s: sampling with %s", mode, self._sampler())
        self.build_optimizers(steps)
        if self.dist.parallel:  # ranks sample different prompts: they must not draw the same random numbers
            torch.manual_seed(seed * 1_000_003 + self.dist.rank)
        if settings.adaptive_kl:
            self.controller = AdaptiveKLController(self.kl_coef, settings.kl_target, settings.kl_horizon)
        self.eval_prompts = context.eval_prompts[:settings.eval_prompts] if settings.eval_prompts else []

    def _sampler(self) -> str:
        sampling = self.sampling
        if sampling.engine == "transformers":
            return "model.generate" + (" (static cache)" if sampling.kv_cache == "static" else "")
        graph = sampling.cuda_graph and self.context.device.type == "cuda"
        return "rto_fast's decode loop" + (" (the decode step as a CUDA graph)" if graph else "")

    def state(self, step: int) -> dict:
        return {"prompts_seen": self.prompts_seen, "kl_coef": self.kl_coef}

    def restore(self, saved: dict) -> None:
        self.prompts_seen = int(saved.get("prompts_seen", 0))
        self.kl_coef = float(saved.get("kl_coef", self.kl_coef))
        if self.controller is not None:
            self.controller.value = self.kl_coef

    def has_eval(self) -> bool:
        return bool(self.eval_prompts)

    def evaluate(self) -> dict:
        return evaluate_policy(self, self.eval_prompts)

    def progress(self, record: dict) -> dict:
        # Named for what it is: a bundled task's true reward r* when known, else the DPO implicit reward.
        if record.get("true_reward") is not None:
            return {"true_reward": record["true_reward"]}
        return {"dpo_reward": record.get("dpo_reward")}

    def export(self, stage_dir: Path) -> None:
        self.actor.export(stage_dir / MODEL_DIR, self.tokenizer)
        self.critic_optimization.export(stage_dir / CRITIC_DIR)
        logger.info("%s: critic in %s", self.mode, stage_dir / CRITIC_DIR)

    # --- models
    def build_models(self, resume_from: Path | None) -> None:
        """Reference, DPO model, reward model, policy and critic (see the module docstring)."""
        config, settings = self.config, self.settings
        if settings.offload_frozen_models and distributed.zero_stage(self.dist) == 3:
            raise ValueError("rl.offload_frozen_models: under ZeRO-3 the frozen models are partitioned; offload "
                             "them with runtime.deepspeed.zero_optimization.offload_param instead")
        self.paths = paths = Wiring.of(self.context).rl_models(self.mode)
        seed = config.runtime.seed + STAGE_SEED_OFFSET[self.mode]
        frozen_device = (torch.device("cpu") if settings.offload_frozen_models
                         and offload_saves_memory(self.context.device) else None)
        lora = LoraSettings.from_config(config.model, self.mode)
        # With LoRA, a reference that is where the policy starts is the policy with its adapters off (no copy).
        share_reference = lora is not None and paths["reference"] == paths["policy"]
        if share_reference:
            self.policy = self._trained(paths["policy"], settings.actor_lr,
                                        lambda: causal_lm(paths["policy"], self.context, True, lora=lora))
            self.reference = SharedReference(self.policy)
        else:
            self.reference = frozen(paths["reference"], self.context, lambda: causal_lm(
                paths["reference"], self.context, False, seed), frozen_device)
        self.dpo_model = (frozen(paths["dpo"], self.context, lambda: causal_lm(paths["dpo"], self.context, False),
                                 frozen_device) if paths["dpo"] else None)
        self.reward_model = (frozen(paths["reward"], self.context, lambda: value_model(
            paths["reward"], self.context, False), frozen_device) if paths["reward"] else None)
        self._build_trained(resume_from, lora, share_reference, seed)
        if settings.offload_frozen_models:
            self._offload_frozen_models()

    def _build_trained(self, resume_from: Path | None, lora, share_reference: bool, seed: int) -> None:
        """Policy (unless it came with a shared reference) and critic: from the checkpoint when resuming full
        fine-tuning; with LoRA from the starting models, then the checkpoint's adapters."""
        paths, model_settings = self.paths, self.config.model
        resumed = resume_from is not None and lora is None
        policy_source = str(resume_from / MODEL_DIR) if resumed else paths["policy"]
        if not share_reference and resume_from is None and policy_source == paths["reference"] == TINY:
            # pi_0 = pi_ref with random 'tiny' weights: a copy of the frozen reference.
            self.policy = trainable_copy(self.reference, self.context.device, model_settings.gradient_checkpointing,
                                         model_settings.keep_dropout)
        elif not share_reference:
            self.policy = self._trained(policy_source, self.settings.actor_lr,
                                        lambda: causal_lm(policy_source, self.context, True, lora=lora))
        critic_source = str(resume_from / CRITIC_DIR / MODEL_DIR) if resumed else paths["critic"]
        self.critic = self._trained(critic_source, self.settings.critic_lr,
                                    lambda: value_model(critic_source, self.context, True, seed + 1, lora))
        if lora is not None and resume_from is not None:
            load_adapters(self.policy, resume_from / MODEL_DIR)
            load_adapters(self.critic, resume_from / CRITIC_DIR / MODEL_DIR)

    def _trained(self, path: str, lr: float, load):
        return trained(path, self.context, self.settings.optimizer(lr), load)

    def _offload_frozen_models(self) -> None:
        """rl.offload_frozen_models: reference, DPO and reward model into host memory (after the policy may have
        been copied from the reference)."""
        if not offload_saves_memory(self.context.device):
            logger.info("rl.offload_frozen_models: no effect on a %s device (nothing to offload to)",
                        self.context.device.type)
            return
        for model in (self.reference, self.dpo_model, self.reward_model):
            if isinstance(model, torch.nn.Module):  # not a SharedReference: that one is the policy
                self.residents[id(model)] = HostResident(model, self.context.device)
        moved = sum(resident.nbytes for resident in self.residents.values()) / 2**20
        logger.info("rl.offload_frozen_models: %d frozen model(s), %.0f MiB, kept in host memory", len(self.residents),
                    moved)

    def frozen_on_device(self, model):
        """Context: `model` with its weights on the device (a copy when it is offloaded, else the model itself); a
        SharedReference is the policy with its adapters off."""
        if isinstance(model, SharedReference):
            return frozen_view(model)
        return on_device(self.residents.get(id(model)), model)

    def build_optimizers(self, total_steps: int) -> None:
        """The actor's and the critic's optimizers (one shared one with rl.critic_optimizer shared), and under
        DeepSpeed the engines; under ZeRO-3 the frozen models become partitioned engines too."""
        settings, context = self.settings, self.context
        shared = settings.critic_optimizer == "shared" and not self.dist.engine
        self.actor = Optimization(self.policy, settings.optimizer(settings.actor_lr), total_steps, context,
                                  name="policy and critic" if shared else "policy",
                                  also=(self.critic,) if shared else ())
        self.critic_optimization = (Optimization.follower(self.critic) if shared else
                                    Optimization(self.critic, settings.optimizer(settings.critic_lr), total_steps,
                                                 context, name="critic"))
        if self.dist.engine:  # under ZeRO-3 the frozen models are partitioned too; their forwards are then collective
            if not isinstance(self.reference, SharedReference):  # that one is the policy, in its own engine
                self.reference = distributed.frozen_engine(self.reference, self.dist, "reference")
            if self.dpo_model is not None:
                self.dpo_model = distributed.frozen_engine(self.dpo_model, self.dist, "DPO model")
            if self.reward_model is not None:
                self.reward_model = distributed.frozen_engine(self.reward_model, self.dist, "reward model")
        self.policy, self.critic = self.actor.model, self.critic_optimization.model
        self.parts = {"": self.actor, CRITIC_DIR: self.critic_optimization}

    @contextlib.contextmanager
    def whole_models(self):
        """(policy, critic) as bare models for sampling and scoring (see EngineTrainer.whole_model)."""
        with self.actor.whole_model() as policy, self.critic_optimization.whole_model() as critic:
            yield policy, critic

    # --- one iteration
    def reward_spec(self) -> rollouts.RewardSpec:
        return rollouts.RewardSpec(self.mode, self.kl_coef, self.settings, self.use_reward_model, self.task)

    def reward_arguments(self) -> dict:
        """The keywords of ops.token_rewards this stage uses now."""
        return self.reward_spec().arguments()

    def sample(self, prompts: list) -> list:
        with self.actor.whole_model() as policy:
            return rollouts.sample(policy, prompts, self.sampling, self.tokenizer)

    def score(self, prompts: list, sampled: list) -> rollouts.RolloutBatch:
        """Log-probs, values, rewards and (not yet whitened) advantages of this rank's rollouts."""
        with self.whole_models() as (policy, critic), torch.inference_mode():
            models = rollouts.Models(policy, critic, self.reference, self.dpo_model, self.reward_model)
            batch, offset = rollouts.score(models, prompts, sampled, self.reward_spec(), self.context,
                                           self.frozen_on_device)
        if offset is not None:
            self.dpo_offset = offset
        return batch

    def gather(self, batch: rollouts.RolloutBatch) -> rollouts.RolloutBatch:
        return rollouts.gather(batch, self.dist, self.settings.whiten_advantages)

    def train(self, batch: rollouts.RolloutBatch, iteration: int) -> dict:
        return ppo_update(batch, self.actor, self.critic_optimization, self.settings, self.context, iteration,
                          self.nonfinite)

    def step(self, step: int) -> dict:
        """Sample, score and train on one rollout batch; returns the iteration's metrics."""
        settings = self.settings
        indices, epoch = self.plan.batch(step)
        prompts = [self.context.train_prompts[i] for i in indices for _ in range(settings.samples_per_prompt)]
        started = time.perf_counter()
        if self.dist.parallel:  # this rank samples and scores its slice of the prompts; all slices are gathered after
            prompts = rank_share(prompts, self.dist.world_size, self.dist.rank)
        with phase("generate"):
            sampled = self.sample(prompts)
        generated = time.perf_counter()
        with phase("score"):
            batch = self.gather(self.score(prompts, sampled))
        scored = time.perf_counter()
        lrs = {"lr_actor": self.actor.lr}
        if self.critic_optimization.scheduler is not None:
            lrs["lr_critic"] = self.critic_optimization.lr
        with phase("train"):
            train_stats = self.train(batch, step)
        finished = time.perf_counter()
        metrics = rollouts.rollout_metrics(batch, self.reward_spec(), self.tokenizer)
        if self.dpo_offset is not None:
            metrics["dpo_offset"] = self.dpo_offset
        if self.controller is not None:
            self.controller.update(metrics["kl"], len(batch))
            self.kl_coef = self.controller.value
        response_tokens = sum(len(r.response_ids) for r in batch.rollouts)
        tokens = response_tokens + sum(len(r.prompt_ids) for r in batch.rollouts)
        elapsed = finished - started
        self.prompts_seen += len(indices)
        return {"epoch": round(epoch, 4), "prompts": len(indices), **lrs, **metrics, **train_stats,
                "time_generate_s": generated - started, "time_score_s": scored - generated,
                "time_train_s": finished - scored, "time_s": elapsed, "tokens": tokens,
                "response_tokens": response_tokens, "tokens_per_s": tokens / max(elapsed, 1e-9),
                "prompts_seen": self.prompts_seen}


def evaluate_policy(stage: RLStage, prompts: list) -> dict:
    """eval_* means of the policy's samples on `prompts` (the eval stage's sampling settings and seed), under a
    forked RNG so that training draws the same random numbers with or without evaluation."""
    config = stage.config
    sampling = SamplingSettings(max_new_tokens=stage.sampling.max_new_tokens, temperature=config.eval.temperature,
                                top_p=config.eval.top_p, batch_size=config.eval.batch_size,
                                engine=config.eval.generation_engine, cuda_graph=config.eval.generation_cuda_graph)
    device = stage.context.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.eval.seed)
        with stage.actor.whole_model() as policy:
            sampled = generate(policy, [prompt.prompt_ids for prompt in prompts], sampling,
                               eos_token_id=stage.tokenizer.eos_token_id, pad_token_id=stage.tokenizer.pad_token_id)
    with (stage.frozen_on_device(stage.reward_model) as reward_model,
          stage.frozen_on_device(stage.dpo_model) as dpo_model,
          stage.frozen_on_device(stage.reference) as ref_model):
        judges = Judges(reward_model=reward_model, dpo_model=dpo_model, ref_model=ref_model,
                        dpo_coef=stage.settings.dpo_coef, task=stage.task,
                        fused_output_layer=config.model.fused_output_layer)
        scores = score_rollouts(judges, prompts, sampled, stage.tokenizer, stage.settings.micro_batch_tokens,
                                dist=stage.dist if distributed.zero_stage(stage.dist) == 3 else None)
    return {EVAL_METRICS.get(key, f"eval_{key}"): float(np.mean(values)) for key, values in scores.items()}


__all__ = ["RLStage", "AdaptiveKLController", "evaluate_policy", "sampling_settings"]
