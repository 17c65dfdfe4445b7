"""The trainer's configuration schema: one dataclass per section, every field with its default and a one-line help,
and `validate`, which checks the values and how they fit together (ConfigError naming the key). Reading YAML files and
key=value overrides into it is `rto_fast.trainer.config_file`.

Usage:
    config = Config()                          # the defaults; load_config (config_file) reads a file and overrides
    validate(config)                           # ConfigError naming the first key that cannot work
    config.rl.optimizer(config.rl.actor_lr)    # OptimizerSettings of the RL actor; config.sft.optimizer() of SFT
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tasks import TASKS, get_task, prompt_task
from . import extras
from .extras import PEFT_MISSING
from .trackers import TRACKERS

# Stages a config may list, in pipeline order: SFT, `pairs` (preference pairs sampled from the SFT model and labelled
# by a bundled task's r*), DPO and RM, the RL stages (one per mode, all reading the `rl` section, each writing its
# own model), then evaluation.
TRAINING_STAGES = ("sft", "dpo", "rm")
RL_MODES = ("rto", "ppo", "dppo")
STAGES = ("sft", "pairs", "dpo", "rm", *RL_MODES, "eval")
# The oracle rewards of rl.true_reward (bundled tasks only): r* per token in place of the DPO token reward (rto), or
# r* of the response in place of the reward model's score (ppo).
TRUE_REWARD_MODES = {"dense": "rto", "sparse": "ppo"}
# The KL coefficient the paper used per mode (Table 5, Pythia-2.8B on HH-RLHF) when rl.kl_coef is null.
PAPER_KL_COEF = {"rto": 0.03, "ppo": 0.05, "dppo": 0.05}
DATA_FORMATS = ("hh-rlhf", "preference", "prompt")
# File types of a local data source (rto_fast.trainer.data reads each with its datasets builder).
LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
DTYPE_CHOICES = ("fp32", "bf16")
# How AdamW updates bf16 weights (rto_fast.trainer.optim).
BF16_OPTIMIZERS = ("master_weights", "stochastic_rounding", "pure")


class ConfigError(ValueError):
    """A configuration that cannot be used: unknown key, wrong type, bad value. The message is one line."""


def option(default: Any = None, help: str = "", choices: tuple | None = None, factory: Any = None):
    """A dataclass field carrying its one-line help (and allowed values), which `config_help` prints."""
    metadata = {"help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """Models: where each stage's model comes from."""

    name_or_path: str = option("tiny", "base model: a Hub name, a local folder, or 'tiny' (a small Llama built "
                                       "from a config, with the tokenizer shipped in the package)")
    tokenizer: str | None = option(None, "tokenizer folder or Hub name; null: the base model's own ('tiny': the "
                                          "shipped byte-level tokenizer)")
    dtype: str = option("fp32", "dtype the weights are loaded and trained in", DTYPE_CHOICES)
    bf16_optimizer: str = option("master_weights", "how AdamW updates bf16 weights (without DeepSpeed, which keeps "
                                                   "its own float32 master weights): master_weights: float32 copies "
                                                   "and float32 states in the optimizer, 16 bytes per trained "
                                                   "parameter; stochastic_rounding: bf16 weights and states written "
                                                   "back with stochastic rounding (small updates survive on "
                                                   "average), 8 bytes; pure: bf16 with round-to-nearest, 8 bytes, "
                                                   "but a weight only moves when its step reaches half its spacing "
                                                   "(|w| * 2^-9 or more), so most updates at RL learning rates are "
                                                   "lost", BF16_OPTIMIZERS)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    keep_dropout: bool = option(False, "keep the checkpoint's dropout in trained models; false: every dropout of a "
                                       "trained model is set to 0 (as TRL's disable_dropout), so PPO's ratio, the "
                                       "KL and DPO's log-ratios see the same network as scoring does (attention "
                                       "dropout also needs flash-attn: the other packed backends refuse it)")
    fused_output_layer: bool = option(False, "log-probs straight from the output layer's input "
                                             "(ops.linear_token_logprobs): the (tokens, vocabulary) logits are never "
                                             "held, which saves their memory at large vocabularies; a trained "
                                             "model's backward recomputes them (one more output-layer matmul)")
    lora_rank: int = option(0, "train LoRA adapters of this rank in place of the full weights of every trained "
                                "model (SFT and DPO policy, reward model, RL actor and critic; a value-head model's "
                                "head is trained whole); checkpoints hold the adapters, each stage's output is the "
                                "merged model, and a reference that is the policy's starting point is the policy with "
                                "its adapters off (no second copy). 0: full fine-tuning. Needs peft "
                                "(pip install 'rto_fast[lora]')")
    lora_alpha: float | None = option(None, "LoRA scale numerator: updates are scaled by lora_alpha / lora_rank; "
                                            "null: 2 * lora_rank")
    lora_dropout: float = option(0.0, "dropout on the adapters' input while the trained model is in training mode "
                                      "(every pass but sampling, RL's scoring passes included, as with "
                                      "model.keep_dropout); 0 keeps PPO's ratio and the KL free of dropout noise")
    lora_stages: list[str] | None = option(None, "the stages whose trained models get LoRA adapters when lora_rank "
                                                 "> 0 (sft, dpo, rm, rto, ppo, dppo; e.g. [rto, ppo] fine-tunes SFT "
                                                 "and DPO fully and trains RL with adapters); null: every stage")
    lora_target_modules: str = option("all-linear", "layers given adapters: all-linear (every linear layer but the "
                                                    "output layer) or comma-separated module names, e.g. "
                                                    "q_proj,k_proj,v_proj,o_proj")
    sft_path: str | None = option(None, "start after SFT from this model (skips needing the sft stage's output)")
    dpo_path: str | None = option(None, "the DPO model (RTO's token reward); null: the dpo stage's output")
    ref_path: str | None = option(None, "the frozen reference model; null: the SFT model")
    reward_path: str | None = option(None, "the reward model (value-head folder); null: the rm stage's output")
    critic_path: str | None = option(None, "the critic's starting point; null: the reward model, else the SFT model")


@dataclass
class DataConfig:
    """Data: source, format, splits, lengths."""

    source: str = option("synthetic", "Hub dataset name, local .jsonl/.json/.parquet/.csv file, or a bundled task "
                                      "with a known reward: 'synthetic' (short letter responses) or 'credit' "
                                      "(24-token responses, rto_fast.tasks.credit)")
    format: str = option("preference", "hh-rlhf: chosen/rejected transcripts; preference: prompt/chosen/rejected "
                                       "columns (strings or chat messages); prompt: prompts only", DATA_FORMATS)
    data_dir: str | None = option(None, "subfolder of a Hub dataset (load_dataset's data_dir), e.g. helpful-base of "
                                        "Anthropic/hh-rlhf; null: the whole dataset")
    train_split: str = option("train", "split used for training")
    test_split: str | None = option("test", "split used for evaluation; null: no evaluation")
    prompt_field: str = option("prompt", "column holding the prompt (preference and prompt formats)")
    chosen_field: str = option("chosen", "column holding the preferred response (or transcript for hh-rlhf)")
    rejected_field: str = option("rejected", "column holding the dispreferred response (or transcript)")
    max_prompt_length: int = option(256, "prompt tokens kept")
    max_response_length: int = option(256, "response tokens kept")
    truncation: str = option("truncate", "truncate: keep a prompt's last max_prompt_length tokens and a response's "
                                         "first max_response_length; drop: skip (and count) rows over a limit",
                             ("truncate", "drop"))
    max_bad_fraction: float = option(0.05, "above this fraction of malformed rows the data is an error")
    max_train_samples: int | None = option(None, "use at most this many training rows; null: all")
    max_eval_samples: int | None = option(None, "use at most this many evaluation rows; null: all")


@dataclass(frozen=True)
class OptimizerSettings:
    """What an optimizer and its schedule need (a training stage's settings, or the RL actor's or critic's)."""

    lr: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    warmup_ratio: float
    lr_schedule: str
    min_lr_ratio: float
    max_grad_norm: float | None


@dataclass(frozen=True)
class PlanSettings:
    """What a data plan needs: how many examples (or tokens) per step, and how many steps."""

    batch_size: int
    batch_unit: str
    max_steps: int | None
    epochs: float


def optimizer_settings(section, lr: float) -> OptimizerSettings:
    """The optimizer settings of a config section that has the AdamW and schedule fields, at learning rate `lr`."""
    return OptimizerSettings(lr=lr, weight_decay=section.weight_decay, adam_beta1=section.adam_beta1,
                             adam_beta2=section.adam_beta2, warmup_ratio=section.warmup_ratio,
                             lr_schedule=section.lr_schedule, min_lr_ratio=section.min_lr_ratio,
                             max_grad_norm=section.max_grad_norm)


@dataclass
class StageConfig:
    """Optimisation settings every training stage shares."""

    lr: float = option(1e-5, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    warmup_ratio: float = option(0.1, "fraction of the optimizer steps spent in linear warmup")
    lr_schedule: str = option("cosine", "learning-rate schedule after warmup", ("cosine", "constant", "linear"))
    min_lr_ratio: float = option(0.0, "final learning rate as a fraction of lr (cosine and linear)")
    max_grad_norm: float | None = option(1.0, "gradient clipping norm; null: no clipping")
    batch_size: int = option(32, "sequences (or tokens, see batch_unit) per optimizer step, over all ranks")
    batch_unit: str = option("sequences", "what batch_size counts", ("sequences", "tokens"))
    micro_batch_tokens: int = option(4096, "token budget of one packed micro-batch (forward/backward)")
    grad_accumulation: int = option(1, "batches whose gradients add up before each optimizer step")
    epochs: float = option(1.0, "passes over the training split (fractions allowed)")
    max_steps: int | None = option(None, "stop after this many optimizer steps; null: set by epochs")
    eval_every: int = option(0, "evaluate every N optimizer steps; 0: only at the end")
    eval_batch_tokens: int | None = option(None, "token budget of an evaluation micro-batch; null: micro_batch_tokens")

    def optimizer(self) -> OptimizerSettings:
        return optimizer_settings(self, self.lr)

    def plan(self) -> PlanSettings:
        return PlanSettings(self.batch_size, self.batch_unit, self.max_steps, self.epochs)


@dataclass
class SFTConfig(StageConfig):
    """Supervised fine-tuning on the chosen responses (NLL over response tokens)."""

    lr: float = option(2e-5, "peak learning rate (AdamW)")


@dataclass
class DPOConfig(StageConfig):
    """Direct preference optimisation against the frozen SFT model."""

    lr: float = option(5e-7, "peak learning rate (AdamW)")
    beta: float = option(0.1, "DPO temperature beta")
    sft_coef: float = option(1.0, "weight of an SFT term in the DPO loss: + sft_coef * the chosen response's NLL "
                                  "per token (RPO, Pang et al. 2024), which keeps the chosen responses likely; 0: "
                                  "plain DPO. Default 1: measured on both bundled tasks over 5 seeds, RTO with a "
                                  "plain DPO model collapsed on some seeds (docs/rl.md)")
    precompute_ref_logprobs: bool = option(False, "score every training and evaluation pair with the reference "
                                                  "once before training, then free the reference model: one "
                                                  "reference forward per pair instead of one per pair and epoch, "
                                                  "and no reference in memory while training")


@dataclass
class RMConfig(StageConfig):
    """Bradley-Terry reward model (value head on the SFT backbone)."""

    lr: float = option(1e-5, "peak learning rate (AdamW)")


@dataclass
class RLConfig:
    """RL stages rto, ppo and dppo: rollouts, token rewards, GAE and PPO epochs (docs/math.md §2-5)."""

    # rollouts
    rollout_batch_size: int = option(64, "prompts sampled per RL iteration")
    samples_per_prompt: int = option(1, "responses sampled per prompt")
    iterations: int | None = option(None, "RL iterations; null: one pass over the prompts (epochs)")
    epochs: float = option(1.0, "passes over the training prompts when iterations is null")
    max_new_tokens: int | None = option(None, "response tokens generated at most; null: data.max_response_length")
    temperature: float = option(1.0, "sampling temperature of rollouts (log-probs are always the models' own)")
    top_p: float = option(1.0, "nucleus sampling of rollouts; 1: off")
    top_k: int = option(0, "top-k sampling of rollouts; 0: off")
    generation_batch_size: int = option(64, "prompts per decode batch")
    generation_engine: str = option("rto_fast", "rto_fast: our decode loop (preallocated KV cache, finished rows "
                                                "leave the batch); transformers: model.generate",
                                    ("rto_fast", "transformers"))
    generation_cuda_graph: bool = option(True, "rto_fast engine on CUDA: capture the decode step as a CUDA graph "
                                               "once per batch and replay it (rows then stay until all finish); "
                                               "false: eager steps, finished rows leave the batch")
    generation_cache: str = option("dynamic", "KV cache of the transformers engine: dynamic (grows per step) or "
                                              "static (preallocated; prompts are left-padded to "
                                              "data.max_prompt_length so every call has the same shapes, which lets "
                                              "transformers compile the decode step on CUDA)", ("dynamic", "static"))
    ban_eos: bool = option(False, "never sample eos: every response has max_new_tokens tokens (for benchmarks)")
    prompts: str | None = option(None, "prompt-only data for RL (any data.source form, format 'prompt'); null: the "
                                       "prompts of data.source (a bundled task: its fresh prompt split)")
    # token rewards
    kl_coef: float | None = option(None, "KL coefficient (beta2; beta for ppo); null: the paper's value per mode "
                                         "(rto 0.03, ppo and dppo 0.05)")
    kl_estimator: str = option("k1", "KL estimator of the per-token penalty", ("k1", "k2", "k3"))
    dpo_coef: float = option(0.1, "beta1: scale of the DPO token reward log(pi_dpo / pi_ref) (rto, dppo)")
    dpo_clip: float | None = option(None, "clip of the scaled DPO token reward to [-c, c]; null: none")
    dpo_center: bool = option(False, "rto: subtract the rollout batch's mean DPO token reward (before the clip), so "
                                     "the average token earns 0 and a per-token offset (DPO lowering what the "
                                     "reference writes) does not pay for shorter responses")
    reward_model: bool | None = option(None, "add the reward model's score at the last token; null: ppo yes, rto "
                                             "and dppo no (the paper's beta3 = 0)")
    score_coef: float = option(1.0, "beta3: scale of the reward-model score (when reward_model is on)")
    score_clip: float | None = option(10.0, "clip of the reward-model score to [-c, c]; null: none")
    true_reward: str | None = option(None, "oracle rewards on a bundled task (known r*), for bounds: dense: stage rto "
                                           "with r* per token in place of the DPO token reward; sparse: stage ppo "
                                           "with r* of the response in place of the reward model's score at the "
                                           "last token; null: off", (None, "dense", "sparse"))
    missing_eos_penalty: float | None = option(None, "subtracted at the last token of a response cut at "
                                                     "max_new_tokens (no eos); null: none")
    adaptive_kl: bool = option(False, "adapt kl_coef towards kl_target (proportional controller)")
    kl_target: float = option(6.0, "target KL per response (sum over tokens) of the adaptive controller")
    kl_horizon: int = option(10000, "horizon (responses) of the adaptive KL controller")
    # advantages and losses
    gamma: float = option(1.0, "GAE discount")
    lam: float = option(0.95, "GAE lambda")
    whiten_advantages: bool = option(True, "whiten advantages over the rollout batch's response tokens")
    ppo_epochs: int = option(2, "passes of PPO updates over each rollout batch")
    mini_batch_size: int = option(16, "responses per optimizer step")
    micro_batch_tokens: int = option(4096, "token budget of one packed micro-batch (scoring and training)")
    offload_frozen_models: bool = option(False, "keep the frozen models (reference, DPO, reward model) in pinned "
                                                "host memory and copy each to the GPU only for its scoring pass: "
                                                "their GPU memory is free for training, for one host-to-device "
                                                "copy of their weights per iteration (no effect on CPU; under "
                                                "ZeRO-3 use zero_optimization.offload_param)")
    clip_eps: float = option(0.2, "PPO ratio clip epsilon")
    clip_eps_high: float | None = option(None, "upper ratio clip (decoupled clipping); null: clip_eps")
    value_clip: float = option(0.2, "value clip around the rollout values")
    vf_coef: float = option(0.1, "value-loss weight when actor and critic share one loss (critic_optimizer shared)")
    entropy_coef: float = option(0.0, "entropy bonus weight in the actor loss")
    agg: str = option("token-mean", "loss aggregation over a micro-batch", ("token-mean", "seq-mean-token-mean"))
    # optimisation
    actor_lr: float = option(5e-6, "actor peak learning rate (Adam)")
    critic_lr: float = option(9e-6, "critic peak learning rate (separate optimizer)")
    critic_optimizer: str = option("separate", "separate: actor and critic each have an optimizer and lr (official "
                                               "RTO code); shared: one loss pg + vf_coef * vf, one optimizer at "
                                               "actor_lr (TRL)", ("separate", "shared"))
    critic_init: str = option("auto", "critic's starting weights: sft, rm (the reward model), or auto (rm when a "
                                      "reward model exists, else sft); model.critic_path overrides",
                              ("auto", "sft", "rm"))
    weight_decay: float = option(0.0, "Adam weight decay")
    adam_beta1: float = option(0.9, "Adam beta1")
    adam_beta2: float = option(0.95, "Adam beta2")
    warmup_ratio: float = option(0.03, "fraction of the optimizer steps spent in linear warmup")
    lr_schedule: str = option("cosine", "learning-rate schedule after warmup", ("cosine", "constant", "linear"))
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of the peak (cosine and linear)")
    max_grad_norm: float | None = option(1.0, "gradient clipping norm (actor and critic each); null: none")
    # evaluation during RL
    eval_every: int = option(0, "every N iterations, sample the test prompts and log true / DPO / RM rewards; 0: "
                                "only at the end")
    eval_prompts: int = option(128, "test prompts sampled by the evaluation during RL (0: none)")

    def optimizer(self, lr: float) -> OptimizerSettings:
        """The actor's (lr = actor_lr) or the critic's (critic_lr) optimizer settings."""
        return optimizer_settings(self, lr)

    def plan(self) -> PlanSettings:
        """Prompts per iteration and iterations (rl.iterations, else rl.epochs passes over the prompts)."""
        return PlanSettings(self.rollout_batch_size, "sequences", self.iterations, self.epochs)

    def kl_coef_for(self, mode: str) -> float:
        """beta2 (beta for ppo): rl.kl_coef, else the paper's value for `mode`."""
        return self.kl_coef if self.kl_coef is not None else PAPER_KL_COEF[mode]


@dataclass
class PairsConfig:
    """Preference pairs sampled from the SFT model and labelled by a bundled task's true reward (Bradley-Terry), as
    real pipelines label samples of their SFT model; the dpo and rm stages after it train on them."""

    temperature: float = option(1.0, "sampling temperature of the two responses per prompt")
    label_temperature: float = option(1.0, "Bradley-Terry temperature: P(first preferred) = sigmoid((r*_1 - r*_2) "
                                           "/ label_temperature)")
    max_rounds: int = option(4, "a prompt whose two responses tie in r* is sampled again, at most this many times "
                                "in all (then it gives no pair)")
    batch_size: int = option(256, "prompts per decode batch")


@dataclass
class EvalConfig:
    """Evaluation: win rates between models on the same test prompts (paper Table 1 protocol)."""

    models: list[str] | None = option(None, "models compared: stage names (sft, dpo, rto, ppo, dppo: each must be "
                                            "listed in stages, have its output in the run folder or an explicit "
                                            "model.* path), model folders, or name=folder; null: every stage of "
                                            "this config that trains a language model (with only eval listed: those "
                                            "the run folder holds)")
    judge: str = option("auto", "who scores responses: rm (the reward model), dpo (the implicit reward beta * "
                                "sum log(pi_dpo / pi_ref)), truth (a bundled task's true reward r*), or auto (rm "
                                "when one exists, else dpo, else truth on a bundled task)",
                        ("auto", "rm", "dpo", "truth"))
    num_prompts: int = option(256, "test prompts (at most; the test split's size caps it)")
    temperature: float = option(0.9, "sampling temperature")
    top_p: float = option(0.99, "nucleus sampling")
    max_new_tokens: int | None = option(None, "response tokens at most; null: data.max_response_length")
    batch_size: int = option(64, "prompts per decode batch")
    generation_engine: str = option("rto_fast", "rto_fast: our decode loop; transformers: model.generate",
                                    ("rto_fast", "transformers"))
    generation_cuda_graph: bool = option(True, "rto_fast engine on CUDA: replay the decode step as a CUDA graph")
    micro_batch_tokens: int = option(8192, "token budget of a scoring micro-batch")
    seed: int = option(1234, "sampling seed (the same for every model)")


@dataclass
class RuntimeConfig:
    """Runtime: device, precision, seed, outputs, checkpoints, distributed."""

    device: str = option("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    dtype: str = option("fp32", "compute dtype of forward passes: fp32, or bf16 autocast", DTYPE_CHOICES)
    seed: int = option(0, "seed for weights, data order and sampling")
    output_dir: str = option("runs/default", "run folder: resolved config, metrics.jsonl, plots, checkpoints, models")
    log_every: int = option(1, "write metrics every N optimizer steps")
    checkpoint_every: int = option(100, "checkpoint every N optimizer steps (and at the end); 0: only at the end")
    keep_last: int = option(2, "checkpoints kept per stage (older ones are deleted)")
    max_nonfinite_steps: int = option(3, "an optimizer step whose gradient norm is NaN or inf is skipped (weights and "
                                         "optimizer states stay as they were); this many such steps in a row (RL: "
                                         "iterations with one) stop the run with an error, before any checkpoint of "
                                         "a broken model is written")
    resume: str = option("auto", "auto: continue from the latest checkpoint in output_dir; never; or a checkpoint "
                                 "folder")
    deepspeed: str | dict | None = option(None, "DeepSpeed config (JSON file path or inline mapping); null: plain "
                                                "PyTorch")
    progress_bar: bool = option(True, "show a progress bar with step, ETA and tokens/s")
    profile_step: int = option(0, "profile this optimizer step (sft, dpo, rm) or iteration (rl stages) of every "
                                  "stage with torch.profiler, counted from 1: <stage>/profile/step_<N>.md (phases, "
                                  "top operators and kernels) and .trace.json; 0: off")
    profile_trace: bool = option(True, "with profile_step: also write the Chrome trace (hundreds of MB for a long "
                                       "step on a GPU)")
    report_to: list[str] = option(help="experiment trackers that also receive every metrics record: tensorboard "
                                       "(<output_dir>/tensorboard/<stage>), wandb", factory=list)
    run_name: str | None = option(None, "the run's name in the trackers (default: the output folder's name)")
    wandb_project: str = option("rto_fast", "wandb project of the run")


@dataclass
class Config:
    """rto_fast trainer configuration."""

    stages: list[str] = option(help=f"stages to run, in order, from {list(STAGES)}", factory=lambda: ["sft", "dpo"])
    model: ModelConfig = option(factory=ModelConfig, help="models")
    data: DataConfig = option(factory=DataConfig, help="data")
    sft: SFTConfig = option(factory=SFTConfig, help="sft stage")
    dpo: DPOConfig = option(factory=DPOConfig, help="dpo stage")
    rm: RMConfig = option(factory=RMConfig, help="rm stage")
    pairs: PairsConfig = option(factory=PairsConfig, help="pairs stage")
    rl: RLConfig = option(factory=RLConfig, help="rl stages (rto, ppo, dppo)")
    eval: EvalConfig = option(factory=EvalConfig, help="eval stage")
    runtime: RuntimeConfig = option(factory=RuntimeConfig, help="runtime")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ validation

def validate(config: Config) -> Config:
    """Check every value and how they fit together; ConfigError naming the first key that cannot work."""
    _validate_stages(config)
    # First among the values: a missing data file explains later complaints about what the data is (eval.judge).
    _validate_local_sources(config)
    _validate_data(config)
    longest = config.data.max_prompt_length + config.data.max_response_length
    for stage in TRAINING_STAGES:
        _validate_training_stage(config, stage, longest)
    if "dpo" in config.stages:
        _positive("dpo.beta", config.dpo.beta)
        _positive("dpo.sft_coef", config.dpo.sft_coef, allow_zero=True)
    _validate_pairs(config)
    _validate_rl(config, longest)
    _validate_eval(config)
    _validate_lora(config)
    _validate_runtime(config.runtime)
    return config


def _choices_of(cls) -> dict[str, tuple]:
    return {item.name: item.metadata.get("choices") for item in dataclasses.fields(cls) if item.metadata.get("choices")}


def _validate_stages(config: Config) -> None:
    if not config.stages:
        raise ConfigError(f"stages: list at least one of {list(STAGES)}")
    for i, stage in enumerate(config.stages):
        if stage not in STAGES:
            close = difflib.get_close_matches(stage, STAGES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"stages[{i}]: unknown stage {stage!r}{hint}; allowed: {list(STAGES)}")
    if len(set(config.stages)) != len(config.stages):
        raise ConfigError(f"stages: a stage is listed twice: {config.stages}")
    pipeline_order = sorted(config.stages, key=STAGES.index)
    if config.stages != pipeline_order:
        raise ConfigError(f"stages: must follow the pipeline order {list(STAGES)} (each stage reads earlier ones' "
                          f"models): list them as {pipeline_order}")
    for name in ("model", "data", "runtime", "pairs", "rl", "eval", *TRAINING_STAGES):
        section = getattr(config, name)
        for key, choices in _choices_of(type(section)).items():
            value = getattr(section, key)
            if value not in choices:
                raise ConfigError(f"{name}.{key}: must be one of {list(choices)}, got {value!r}")


def looks_like_path(source: str) -> bool:
    """Whether a data source names a local file or folder (rather than a Hub dataset such as 'org/name')."""
    lowered = source.lower()
    return (lowered.endswith(LOCAL_DATA_SUFFIXES) or source.startswith((".", "/", "~")) or source.count("/") > 1
            or (os.sep != "/" and os.sep in source))


def _validate_local_sources(config: Config) -> None:
    sources = [("data.source", config.data.source)]
    if any(stage in RL_MODES or stage == "eval" for stage in config.stages):
        sources.append(("rl.prompts", config.rl.prompts))
    for key, source in sources:
        if (source and source.strip() and get_task(source) is None and looks_like_path(source)
                and not Path(source).expanduser().exists()):
            raise ConfigError(f"{key}: {source!r} does not exist (no such file or folder, and not a Hub dataset "
                              "name like 'org/name')")


def _validate_data(config: Config) -> None:
    data = config.data
    _positive("data.max_prompt_length", data.max_prompt_length)
    _positive("data.max_response_length", data.max_response_length)
    if not 0.0 <= data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction: must be in [0, 1], got {data.max_bad_fraction!r}")
    _positive("data.max_train_samples", data.max_train_samples)
    _positive("data.max_eval_samples", data.max_eval_samples, allow_zero=True)


def _validate_training_stage(config: Config, stage: str, longest: int) -> None:
    settings = getattr(config, stage)
    for name in ("lr", "max_grad_norm", "batch_size", "micro_batch_tokens", "eval_batch_tokens", "grad_accumulation",
                 "epochs", "max_steps"):
        _positive(f"{stage}.{name}", getattr(settings, name))
    for name in ("weight_decay", "eval_every", "min_lr_ratio"):
        _positive(f"{stage}.{name}", getattr(settings, name), allow_zero=True)
    for name in ("warmup_ratio", "adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(settings, name) < 1.0:
            raise ConfigError(f"{stage}.{name}: must be in [0, 1), got {getattr(settings, name)!r}")
    # The data layer truncates to prompt + response lengths; the packer refuses longer sequences.
    for name in ("micro_batch_tokens", "eval_batch_tokens"):
        budget = getattr(settings, name)
        if stage in config.stages and budget is not None and budget < longest:
            raise ConfigError(f"{stage}.{name}={budget} is below data.max_prompt_length + "
                              f"data.max_response_length = {longest}: the longest sequence would not fit")


def _validate_runtime(runtime: RuntimeConfig) -> None:
    if runtime.device != "auto" and runtime.device.split(":")[0] not in ("cpu", "cuda"):
        raise ConfigError(f"runtime.device: must be auto, cpu, cuda or cuda:N, got {runtime.device!r}")
    _positive("runtime.log_every", runtime.log_every)
    _positive("runtime.max_nonfinite_steps", runtime.max_nonfinite_steps)
    _positive("runtime.checkpoint_every", runtime.checkpoint_every, allow_zero=True)
    _positive("runtime.keep_last", runtime.keep_last)
    _positive("runtime.profile_step", runtime.profile_step, allow_zero=True)
    unknown = [name for name in runtime.report_to if name not in TRACKERS]
    if unknown:
        raise ConfigError(f"runtime.report_to: unknown tracker {unknown[0]!r}; expected some of {list(TRACKERS)}")
    if not runtime.resume.strip():
        raise ConfigError("runtime.resume: must be auto, never, or a checkpoint folder")


def _validate_lora(config: Config) -> None:
    model = config.model
    _positive("model.lora_rank", model.lora_rank, allow_zero=True)
    _positive("model.lora_alpha", model.lora_alpha)
    if not 0.0 <= model.lora_dropout < 1.0:
        raise ConfigError(f"model.lora_dropout: must be in [0, 1), got {model.lora_dropout!r}")
    trained = [*TRAINING_STAGES, *RL_MODES]
    for name in model.lora_stages or []:
        if name not in trained:
            raise ConfigError(f"model.lora_stages: {name!r} is not a stage that trains a model; expected some of "
                              f"{trained}")
    if not model.lora_rank:
        return
    if not model.lora_target_modules.replace(",", "").strip():
        raise ConfigError("model.lora_target_modules: name at least one module, or all-linear")
    if not extras.peft_available():
        raise ConfigError(f"model.lora_rank > 0: {PEFT_MISSING}")


def _positive(key, value, allow_zero=False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _validate_pairs(config: Config) -> None:
    pairs = config.pairs
    for name in ("temperature", "label_temperature", "max_rounds", "batch_size"):
        _positive(f"pairs.{name}", getattr(pairs, name))
    if "pairs" in config.stages and config.data.source not in TASKS:
        raise ConfigError(f"stages: 'pairs' labels samples with a bundled task's true reward: data.source must be one "
                          f"of {', '.join(TASKS)}, got {config.data.source!r}")


def _validate_rl(config: Config, longest: int) -> None:
    rl = config.rl
    for name in ("rollout_batch_size", "samples_per_prompt", "iterations", "epochs", "max_new_tokens",
                 "generation_batch_size", "kl_target", "kl_horizon", "ppo_epochs", "mini_batch_size",
                 "micro_batch_tokens", "actor_lr", "critic_lr", "max_grad_norm", "dpo_clip", "score_clip",
                 "clip_eps", "clip_eps_high"):
        _positive(f"rl.{name}", getattr(rl, name))
    for name in ("kl_coef", "dpo_coef", "score_coef", "temperature", "value_clip", "vf_coef", "entropy_coef",
                 "weight_decay", "min_lr_ratio", "top_k", "eval_every", "eval_prompts", "missing_eos_penalty"):
        _positive(f"rl.{name}", getattr(rl, name), allow_zero=True)
    for name in ("gamma", "lam", "top_p"):
        value = getattr(rl, name)
        if not 0.0 <= value <= 1.0 or (name == "top_p" and value == 0.0):
            raise ConfigError(f"rl.{name}: must be in {'(0, 1]' if name == 'top_p' else '[0, 1]'}, got {value!r}")
    for name in ("warmup_ratio", "adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(rl, name) < 1.0:
            raise ConfigError(f"rl.{name}: must be in [0, 1), got {getattr(rl, name)!r}")
    rollouts = rl.rollout_batch_size * rl.samples_per_prompt
    if rl.mini_batch_size > rollouts:
        raise ConfigError(f"rl.mini_batch_size={rl.mini_batch_size} is larger than the rollout batch "
                          f"(rl.rollout_batch_size * rl.samples_per_prompt = {rollouts})")
    max_new = rl.max_new_tokens or config.data.max_response_length
    needed = config.data.max_prompt_length + max_new
    if any(mode in config.stages for mode in RL_MODES) and rl.micro_batch_tokens < needed:
        raise ConfigError(f"rl.micro_batch_tokens={rl.micro_batch_tokens} is below data.max_prompt_length + "
                          f"max new tokens = {needed}: the longest rollout would not fit")
    if rl.generation_cache == "static" and rl.generation_engine != "transformers":
        raise ConfigError("rl.generation_cache: static is transformers' static cache: set rl.generation_engine: "
                          "transformers too (the rto_fast engine always preallocates its cache)")
    if rl.reward_model is False and "ppo" in config.stages and rl.true_reward != "sparse":
        raise ConfigError("rl.reward_model: false, but stage 'ppo' needs the reward model's score")
    if rl.true_reward is not None:
        if prompt_task(config) is None:
            raise ConfigError(f"rl.true_reward: {rl.true_reward} needs a bundled task as data.source "
                              f"({', '.join(TASKS)}) and rl.prompts null: only there is r* known")
        mode = TRUE_REWARD_MODES[rl.true_reward]
        others = [stage for stage in config.stages if stage in RL_MODES and stage != mode]
        if others:
            raise ConfigError(f"rl.true_reward: {rl.true_reward} replaces the reward of stage {mode}; it does not "
                              f"apply to {', '.join(others)}: run those in another config")
        if rl.true_reward == "sparse" and rl.reward_model:
            raise ConfigError("rl.true_reward: sparse puts r* where the reward model's score goes: set "
                              "rl.reward_model null or false")


def _validate_eval(config: Config) -> None:
    settings = config.eval
    if "eval" not in config.stages:
        return
    if settings.models is not None and not settings.models:
        raise ConfigError("eval.models: list at least one model (stage names or folders), or null for the stages "
                          "this config trains")
    if settings.models is not None and len(set(settings.models)) != len(settings.models):
        raise ConfigError(f"eval.models: a model is listed twice: {settings.models}")
    for name in ("num_prompts", "batch_size", "micro_batch_tokens", "max_new_tokens"):
        _positive(f"eval.{name}", getattr(settings, name))
    _positive("eval.temperature", settings.temperature, allow_zero=True)
    if not 0.0 < settings.top_p <= 1.0:
        raise ConfigError(f"eval.top_p: must be in (0, 1], got {settings.top_p!r}")
    if settings.judge == "truth" and prompt_task(config) is None:
        raise ConfigError(f"eval.judge: 'truth' needs a bundled task as data.source ({', '.join(TASKS)}: the only "
                          "data with a known reward) and rl.prompts null")
