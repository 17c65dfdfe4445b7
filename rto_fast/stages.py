"""Training stages SFT, DPO and RM, and the loop they share (packed micro-batches, accumulation, eval, checkpoints).

Usage (the CLI `python -m rto_fast.train` does this for every stage a config lists):
    context = RunContext(config, run_dir, device, tokenizer, train_examples, eval_examples, metrics)
    output_folder = run_stage("sft", context)          # run_dir/sft/model: loads with from_pretrained

Stages:
- sft: mean NLL over response tokens of prompt + chosen (prompt tokens masked).
- dpo: -log sigmoid(beta * [(S_pi(y_w) - S_ref(y_w)) - (S_pi(y_l) - S_ref(y_l))]) with S the sum of response-token
  log-probs from `rto_fast.ops.token_logprobs` on packed streams; the frozen reference's log-probs are computed once
  per batch, in `torch.inference_mode`, before the policy's passes. Logs the implicit rewards and their margin.
- rm: Bradley-Terry -log sigmoid(r(x, y_w) - r(x, y_l)) with `ValueHeadModel`, r read at each sequence's last
  token; logs accuracy.

Batches: an optimizer step takes `batch_size` examples (`batch_unit: sequences`; a preference pair counts once) or
examples up to `batch_size` tokens (`batch_unit: tokens`; prompt + response tokens, both sequences of a pair). The
step is processed as `grad_accumulation` consecutive batches; each is packed into micro-batches of at most
`micro_batch_tokens` tokens (a pair always lands in one micro-batch), whose gradients add up. Losses are normalised
by the whole step (response tokens for SFT, pairs for DPO/RM), so the gradient does not depend on how the step
was cut into micro-batches.

Data order: epoch e visits the training examples in a permutation drawn from its own generator seeded by
(runtime.seed, stage, e), so the data position of a checkpoint is just its step number, and a resumed run sees
exactly the batches the uninterrupted run would have seen.

Data parallel (`runtime.deepspeed`, several processes; rto_fast.distributed): every rank draws the same step, trains
on its token-balanced share of it under a DeepSpeed engine, and pads to the same number of passes; statistics are
summed over ranks and rank 0 alone writes logs, checkpoints' metadata and the final model.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import distributed
from .attention import packed_forward
from .config import RL_MODES, Config, StageConfig
from .distributed import Distributed, EngineTrainer
from .lora import LoraSettings, SharedReference, check_checkpoint, frozen_view, load_adapters
from .models import TINY, ValueHeadModel, load_causal_lm, trainable_copy
from .optim import NonFiniteSteps, adamw
from .packing import PackedBatch, TokenizedSequence, first_fit_decreasing, pack, sequence_sums
from .profiling import phase, profiled_step, reset_step_peak, step_peak_mb
from .run_log import MetricsLog, ProgressBar
from .scoring import packed_logprobs
from .stopping import checkpoint_or_stop

logger = logging.getLogger(__name__)

# Added to runtime.seed per stage, so stages draw different (but fixed) random numbers.
STAGE_SEED_OFFSET = {name: 1000 * (index + 1) for index, name in enumerate(("sft", "dpo", "rm", *RL_MODES, "eval"))}
STAGE_SEED_OFFSET["pairs"] = 1500
# The RL modes share one: rto, ppo and dppo see the same prompts in the same order (a paired comparison).
STAGE_SEED_OFFSET.update({mode: STAGE_SEED_OFFSET[RL_MODES[0]] for mode in RL_MODES})
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"


# ------------------------------------------------------------------------------------------------ run context

@dataclass
class RunContext:
    """Everything a stage needs from the run: config, folders, device, tokenizer, tokenized data, the log."""

    config: Config
    run_dir: Path
    device: torch.device
    tokenizer: object
    train_examples: list
    eval_examples: list
    metrics: MetricsLog
    # Output model folder of each finished stage of this run; feeds the next stage.
    outputs: dict = field(default_factory=dict)
    # Prompts for the RL and eval stages (rto_fast.data.PromptExample), loaded when a config lists those stages.
    train_prompts: list = field(default_factory=list)
    eval_prompts: list = field(default_factory=list)
    # This process's place in a data-parallel run (rank 0 of 1 and no DeepSpeed engine by default).
    dist: Distributed = field(default_factory=Distributed)


def _get(example, name: str):
    return example[name] if isinstance(example, dict) else getattr(example, name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ data plan

class DataPlan:
    """Which training examples each optimizer step uses; a pure function of (seed, stage, step)."""

    def __init__(self, example_tokens: list[int], settings: StageConfig, seed: int):
        if not example_tokens:
            raise ValueError("no training examples")
        self.example_tokens = np.asarray(example_tokens, dtype=np.int64)
        self.settings = settings
        self.seed = seed
        self._epochs: dict[int, list[list[int]]] = {}
        self._epoch_steps: dict[int, int] = {}  # steps per epoch, kept for every epoch seen (cheap)
        steps_first_epoch = len(self.epoch_batches(0))
        if settings.max_steps is not None:
            self.total_steps = settings.max_steps
        else:
            self.total_steps = max(1, math.ceil(settings.epochs * steps_first_epoch - 1e-9))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.example_tokens), generator=generator).tolist()
            size = self.settings.batch_size
            if self.settings.batch_unit == "sequences":
                batches = [order[start:start + size] for start in range(0, len(order), size)]
            else:
                batches, current, tokens = [], [], 0
                for index in order:
                    length = int(self.example_tokens[index])
                    if current and tokens + length > size:
                        batches.append(current)
                        current, tokens = [], 0
                    current.append(index)
                    tokens += length
                if current:
                    batches.append(current)
            self._epochs = {epoch: batches}  # only the current epoch's batches are kept
            self._epoch_steps[epoch] = len(batches)
        return self._epochs[epoch]

    def _steps_in(self, epoch: int) -> int:
        if epoch not in self._epoch_steps:
            self.epoch_batches(epoch)
        return self._epoch_steps[epoch]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index in that epoch) of 0-based optimizer step `step`."""
        epoch = 0
        while step >= self._steps_in(epoch):
            step -= self._steps_in(epoch)
            epoch += 1
        return epoch, step

    def batch(self, step: int) -> tuple[list[int], float]:
        """Example indices of step `step` and the fractional epoch reached after it."""
        epoch, index = self.position(step)
        batches = self.epoch_batches(epoch)
        return batches[index], epoch + (index + 1) / len(batches)


def split_even(items: list, parts: int) -> list[list]:
    """`items` cut into at most `parts` consecutive chunks of near-equal size (none empty)."""
    parts = max(1, min(parts, len(items)))
    bounds = [round(i * len(items) / parts) for i in range(parts + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]


# ------------------------------------------------------------------------------------------------ stages

class Stage:
    """One training stage: how examples become sequences, the models, the loss of one packed micro-batch."""

    name = ""
    pairs = False  # True: each example gives a (chosen, rejected) pair packed into the same micro-batch

    def __init__(self, context: RunContext, settings: StageConfig):
        self.context = context
        self.settings = settings
        self.config = context.config
        self.model = None

    # --- data
    def sequences(self, example) -> list[TokenizedSequence]:
        prompt = list(_get(example, "prompt_ids"))
        responses = [_get(example, "chosen_ids")]
        if self.pairs:
            responses.append(_get(example, "rejected_ids"))
        return [TokenizedSequence(prompt + list(response), [False] * len(prompt) + [True] * len(response))
                for response in responses]

    def micro_batches(self, examples: list, indices: list[int], max_tokens: int) -> list[PackedBatch]:
        """Pack examples[indices] into micro-batches of at most max_tokens tokens; a pair stays together, chosen
        at even and rejected at odd packed positions. A batch's `sequence_index` holds example * parts + part
        (parts: 1, or 2 for pairs), which names each sequence across the batches of one example list."""
        sequences, units = {}, []
        for index in indices:
            parts = self.sequences(examples[index])
            ids = [index * len(parts) + part for part in range(len(parts))]
            units.append(ids)
            sequences.update(zip(ids, parts))
        unit_lengths = [sum(len(sequences[i].input_ids) for i in unit) for unit in units]
        bins = first_fit_decreasing(unit_lengths, max_tokens)
        return [pack(sequences, [i for unit_index in bin_ for i in units[unit_index]]) for bin_ in bins]

    def example_tokens(self, example) -> int:
        return sum(len(sequence.input_ids) for sequence in self.sequences(example))

    # --- models
    def build(self, init_path: str, resume_model: Path | None) -> None:
        raise NotImplementedError

    def load_trained(self, path: str, load):
        """`load()` of the model this stage trains from `path`: straight into ZeRO-3 partitions when the run uses
        ZeRO-3, else whole and moved to the device. The tiny model always loads whole: its random weights are drawn
        differently when built in partitions, and every launch mode must start from the same weights."""
        return distributed.load_model(load, self.context.dist, self.context.device, self.settings,
                                      enabled=path != TINY)

    @property
    def lora(self) -> LoraSettings | None:
        return LoraSettings.from_config(self.config.model, self.name)

    def trained_source(self, init_path: str, resume_model: Path | None) -> str:
        """Where the trained model's weights load from: the checkpoint when resuming full fine-tuning; with LoRA the
        stage's starting model, onto which `resume_adapters` then loads the checkpoint's adapters."""
        return str(resume_model) if resume_model is not None and self.lora is None else init_path

    def resume_adapters(self, resume_model: Path | None) -> None:
        if resume_model is not None and self.lora is not None:
            load_adapters(self.model, resume_model)

    def trainable_parameters(self):
        return [parameter for parameter in self.model.parameters() if parameter.requires_grad]

    def save(self, folder: Path) -> None:
        ckpt.save_model(self.model, folder, self.context.tokenizer)

    # --- loss
    def denominator(self, micro_batches: list[PackedBatch]) -> float:
        """What the step's loss is averaged over (pairs by default)."""
        return float(sum(batch.num_sequences for batch in micro_batches) // (2 if self.pairs else 1))

    def before_training(self, train_examples: list, eval_examples: list) -> None:
        """Work done once, after the models are built and before the first step (e.g. DPO's reference scores)."""

    def prepare(self, micro_batches: list[PackedBatch], split: str = "train") -> list:
        """Per micro-batch of `split` ("train" or "eval"), what the loss needs besides the trained model (e.g.
        reference log-probs)."""
        return [None] * len(micro_batches)

    def loss(self, batch: PackedBatch, extra, denominator: float) -> tuple[torch.Tensor, dict]:
        """(loss / denominator, sums of the logged statistics including 'count')."""
        raise NotImplementedError


def _load_lm(path: str, context: RunContext, trainable: bool, seed: int | None = None,
             lora: LoraSettings | None = None):
    config = context.config
    if path == TINY and seed is not None:
        torch.manual_seed(seed)  # the tiny model's random weights must be the same in every process
    return load_causal_lm(path, dtype=config.model.dtype, trainable=trainable,
                          gradient_checkpointing=config.model.gradient_checkpointing and trainable,
                          keep_dropout=config.model.keep_dropout, lora=lora if trainable else None,
                          tokenizer=context.tokenizer)


class SFTStage(Stage):
    name = "sft"

    def build(self, init_path, resume_model):
        seed = self.config.runtime.seed + STAGE_SEED_OFFSET[self.name]
        path = self.trained_source(init_path, resume_model)
        self.model = self.load_trained(path, lambda: _load_lm(path, self.context, True, seed, self.lora))
        self.resume_adapters(resume_model)

    def denominator(self, micro_batches):
        return float(sum(int(batch.response_mask.sum()) for batch in micro_batches))

    def loss(self, batch, extra, denominator):
        logprobs = packed_logprobs(self.model, batch, inplace_backward=torch.is_grad_enabled(),
                                   fused_output_layer=self.config.model.fused_output_layer)
        nll_sum = -logprobs.sum()
        return nll_sum / denominator, {"loss": nll_sum.detach(), "count": batch.response_mask.sum()}


class DPOStage(Stage):
    name = "dpo"
    pairs = True
    reference_tables: dict | None = None  # split -> reference log-prob per sequence, with precompute_ref_logprobs

    def build(self, init_path, resume_model):
        # Reference first, then the policy: the same order in a fresh and in a resumed run.
        seed = self.config.runtime.seed + STAGE_SEED_OFFSET[self.name]
        ref_path = self.config.model.ref_path or init_path
        if self.lora is not None and ref_path == init_path:
            # The reference is where the policy starts: the policy with its adapters off, no second copy.
            self.model = self.load_trained(init_path, lambda: _load_lm(init_path, self.context, True, seed,
                                                                       self.lora))
            self.reference = SharedReference(self.model)
            self.resume_adapters(resume_model)
            return
        self.reference = distributed.load_model(lambda: _load_lm(ref_path, self.context, False, seed),
                                                self.context.dist, self.context.device, enabled=ref_path != TINY)
        if self.lora is not None:
            self.model = self.load_trained(init_path, lambda: _load_lm(init_path, self.context, True, seed,
                                                                       self.lora))
            self.resume_adapters(resume_model)
        elif resume_model is not None:
            self.model = self.load_trained(str(resume_model), lambda: _load_lm(str(resume_model), self.context, True))
        elif init_path == ref_path == TINY:
            # The same random weights (ZeRO-3 partitions this whole copy when the engine starts).
            self.model = trainable_copy(self.reference, self.context.device,
                                        keep_dropout=self.config.model.keep_dropout)
        else:
            self.model = self.load_trained(init_path, lambda: _load_lm(init_path, self.context, True, seed))
        # Under ZeRO-3 the reference is partitioned too (its forwards are then collective; see run_stage's passes).
        self.reference = distributed.frozen_engine(self.reference, self.context.dist, "reference")

    def _sequence_logprobs(self, model, batch, training: bool) -> torch.Tensor:
        logprobs = packed_logprobs(model, batch, inplace_backward=training,
                                   fused_output_layer=self.config.model.fused_output_layer)
        return sequence_sums(logprobs, batch)  # (S,), packed order

    def before_training(self, train_examples, eval_examples):
        """With dpo.precompute_ref_logprobs: every pair's reference log-probs, then the reference is freed."""
        if not self.settings.precompute_ref_logprobs:
            return
        budget = self.settings.eval_batch_tokens or self.settings.micro_batch_tokens
        started = time.perf_counter()
        self.reference_tables = {split: self._reference_table(examples, budget)
                                 for split, examples in (("train", train_examples), ("eval", eval_examples))}
        self.reference = None
        if self.context.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.info("dpo: reference log-probs of %d training and %d evaluation pairs computed in %.1f s; reference "
                    "freed", len(train_examples), len(eval_examples), time.perf_counter() - started)

    def _reference_table(self, examples: list, budget: int) -> torch.Tensor:
        """(2 * len(examples),) float32 on the device: the reference's log-prob of sequence example * 2 + part.
        Ranks score their share of the batches and add their tables up."""
        dist, device = self.context.dist, self.context.device
        table = torch.zeros(2 * len(examples), dtype=torch.float32, device=device)
        if not examples:
            return table
        batches = self.micro_batches(examples, list(range(len(examples))), budget)
        mine = split_even(batches, dist.world_size)[dist.rank] if dist.parallel else batches
        # A partitioned (ZeRO-3) reference runs collective forwards: every rank runs as many, extras are dropped.
        passes = dist.max(len(mine)) if distributed.zero_stage(dist) == 3 else len(mine)
        scored = []
        with torch.inference_mode(), _autocast(self.context):
            for index in range(passes):
                batch = (mine or batches)[min(index, len(mine or batches) - 1)].to(device)
                with frozen_view(self.reference) as reference:
                    values = self._sequence_logprobs(reference, batch, False)
                if index < len(mine):
                    scored.append((batch.sequence_index, values.float().clone()))
        for sequence_index, values in scored:
            table[sequence_index] = values
        if dist.parallel:
            torch.distributed.all_reduce(table)
        return table

    def prepare(self, micro_batches, split="train"):
        if self.reference_tables is not None:
            table = self.reference_tables[split]
            return [table[batch.sequence_index.to(table.device)] for batch in micro_batches]
        # Once per batch, before the policy passes; no autograd graph, no saved activations.
        with torch.inference_mode(), _autocast(self.context), frozen_view(self.reference) as reference_model:
            reference = [self._sequence_logprobs(reference_model, batch, False) for batch in micro_batches]
        return [values.clone() for values in reference]  # plain tensors: usable next to autograd tensors

    def loss(self, batch, ref_logprobs, denominator):
        policy_logprobs = self._sequence_logprobs(self.model, batch, torch.is_grad_enabled())
        beta = self.settings.beta
        chosen_rewards = beta * (policy_logprobs[0::2] - ref_logprobs[0::2])
        rejected_rewards = beta * (policy_logprobs[1::2] - ref_logprobs[1::2])
        margins = chosen_rewards - rejected_rewards
        losses = -F.logsigmoid(margins)
        if self.settings.sft_coef:  # RPO: the chosen response's NLL per token
            chosen_tokens = sequence_sums(batch.response_mask.float(), batch)[0::2].clamp_min(1)
            losses = losses - self.settings.sft_coef * policy_logprobs[0::2] / chosen_tokens
        detached = margins.detach()
        stats = {"loss": losses.detach().sum(), "reward_margin": detached.sum(),
                 "reward_accuracy": (detached > 0).float().sum(), "chosen_reward": chosen_rewards.detach().sum(),
                 "rejected_reward": rejected_rewards.detach().sum(),
                 "chosen_logprob": policy_logprobs[0::2].detach().sum(), "count": margins.numel()}
        return losses.sum() / denominator, stats


class RMStage(Stage):
    name = "rm"
    pairs = True

    def build(self, init_path, resume_model):
        path = self.trained_source(init_path, resume_model)
        if path == TINY:
            torch.manual_seed(self.config.runtime.seed + STAGE_SEED_OFFSET[self.name])
        self.model = self.load_trained(path, lambda: ValueHeadModel.from_pretrained(
            path, dtype=self.config.model.dtype, trainable=True,
            gradient_checkpointing=self.config.model.gradient_checkpointing,
            keep_dropout=self.config.model.keep_dropout, lora=self.lora, tokenizer=self.context.tokenizer))
        self.resume_adapters(resume_model)

    def loss(self, batch, extra, denominator):
        values = packed_forward(self.model, batch)  # (1, N) float32
        last_token = batch.cu_seqlens[1:].long().to(values.device) - 1
        rewards = values[0, last_token]
        margins = rewards[0::2] - rewards[1::2]
        losses = -F.logsigmoid(margins)
        detached = margins.detach()
        stats = {"loss": losses.detach().sum(), "accuracy": (detached > 0).float().sum(),
                 "reward_margin": detached.sum(), "chosen_reward": rewards[0::2].detach().sum(),
                 "rejected_reward": rewards[1::2].detach().sum(), "count": margins.numel()}
        return losses.sum() / denominator, stats


STAGE_CLASSES = {"sft": SFTStage, "dpo": DPOStage, "rm": RMStage}


# ------------------------------------------------------------------------------------------------ the loop

def lr_factor(step: int, total_steps: int, settings: StageConfig) -> float:
    """Multiplier of the peak lr for 0-based optimizer step `step`: linear warmup, then cosine/linear/constant."""
    warmup = int(round(settings.warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if settings.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = settings.min_lr_ratio
    if settings.lr_schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _autocast(context: RunContext):
    enabled = context.config.runtime.dtype == "bf16"
    return torch.autocast(context.device.type, dtype=torch.bfloat16, enabled=enabled)


def _accumulate(totals: dict, stats: dict) -> None:
    for key, value in stats.items():
        totals[key] = totals.get(key, 0.0) + float(value)


def _averages(totals: dict, prefix: str = "") -> dict:
    count = max(totals.get("count", 0.0), 1.0)
    return {f"{prefix}{key}": value / count for key, value in totals.items() if key != "count"}


def evaluate(stage: Stage, eval_batches: list[PackedBatch]) -> dict:
    """Mean metrics over the evaluation micro-batches, prefixed 'eval_'."""
    model = stage.model
    model.eval()
    totals: dict = {}
    with torch.inference_mode():
        batches = [batch.to(stage.context.device) for batch in eval_batches]
        extras = stage.prepare(batches, "eval")
        with _autocast(stage.context):
            for batch, extra in zip(batches, extras):
                _, stats = stage.loss(batch, extra, 1.0)
                _accumulate(totals, stats)
    model.train()
    return _averages(totals, "eval_")


def stage_init_path(name: str, context: RunContext) -> str:
    """The model a stage starts from: an explicit path, else the previous stage's output, else the base model."""
    model = context.config.model
    if name == "sft":
        return model.name_or_path
    if model.sft_path:
        return model.sft_path
    if "sft" in context.outputs:
        return str(context.outputs["sft"])
    previous = context.run_dir / "sft" / MODEL_DIR
    if previous.is_dir():  # an earlier run in this folder finished SFT
        return str(previous)
    return model.name_or_path


# Which explicit model.* path stands for a stage's output.
_EXPLICIT_PATHS = {"sft": "sft_path", "dpo": "dpo_path", "rm": "reward_path"}


def stage_output(name: str, context: RunContext) -> Path | None:
    """The model folder stage `name` produced: the explicit model.* path for sft/dpo/rm when set, else this run's
    output of that stage (finished now or by an earlier run in the same folder); None when there is none."""
    explicit = _EXPLICIT_PATHS.get(name)
    if explicit and getattr(context.config.model, explicit):
        return Path(getattr(context.config.model, explicit))
    if name in context.outputs:
        return Path(context.outputs[name])
    folder = context.run_dir / name / MODEL_DIR
    return folder if folder.is_dir() else None


def _explicit_checkpoint(name: str, context: RunContext) -> Path | None:
    """The checkpoint folder `runtime.resume` names, when it belongs to stage `name`."""
    resume = context.config.runtime.resume
    if resume in ("auto", "never"):
        return None
    path = Path(resume)
    return path if ckpt.read_state(path).get("stage") == name else None


def resume_point(name: str, context: RunContext) -> tuple[bool, Path | None]:
    """(finished, checkpoint) for stage `name` under runtime.resume: never -> start over (its folder is deleted);
    auto -> a finished stage (its model folder exists) is skipped, else it continues from its latest checkpoint;
    a checkpoint folder -> its stage continues from it, the other stages as with auto. Also removes what an
    interrupted save left behind. A finished stage's model folder is recorded in context.outputs."""
    runtime = context.config.runtime
    dist = context.dist
    stage_dir = context.run_dir / name
    output_dir = stage_dir / MODEL_DIR
    explicit = _explicit_checkpoint(name, context)
    finished = explicit is None and runtime.resume != "never" and output_dir.is_dir()
    dist.barrier()  # every rank has looked before rank 0 changes anything
    if finished:
        logger.info("%s: %s already holds the finished model; skipping the stage", name, output_dir)
        context.outputs[name] = output_dir
        return True, None
    if dist.main:
        if runtime.resume == "never" and stage_dir.exists():
            shutil.rmtree(stage_dir)
        for leftover in (ckpt.clean_temporary(stage_dir / CHECKPOINT_DIR) + ckpt.clean_temporary(stage_dir)):
            logger.info("%s: removed %s, left by an interrupted save", name, leftover)
    dist.barrier()
    if explicit is not None:
        return False, explicit
    if runtime.resume == "never":
        return False, None
    return False, ckpt.latest_checkpoint(stage_dir / CHECKPOINT_DIR)


def run_stage(name: str, context: RunContext) -> Path:
    """Train stage `name` (resuming from its latest checkpoint when allowed); returns its output model folder."""
    config = context.config
    settings = getattr(config, name)
    runtime = config.runtime
    stage_dir = context.run_dir / name
    output_dir = stage_dir / MODEL_DIR
    finished, resume_from = resume_point(name, context)
    if finished:
        return output_dir
    if resume_from is not None:  # before any model loads: a checkpoint this launch cannot continue is an error
        distributed.check_resumable(resume_from, context.dist)
        check_checkpoint(resume_from / MODEL_DIR, LoraSettings.from_config(config.model, name))

    stage = STAGE_CLASSES[name](context, settings)
    seed = runtime.seed + STAGE_SEED_OFFSET[name]
    seed_everything(seed)
    plan = DataPlan([stage.example_tokens(example) for example in context.train_examples], settings, seed)
    total_steps = plan.total_steps
    eval_tokens = settings.eval_batch_tokens or settings.micro_batch_tokens
    eval_batches = (stage.micro_batches(context.eval_examples, list(range(len(context.eval_examples))), eval_tokens)
                    if context.eval_examples else [])

    init_path = stage_init_path(name, context)
    logger.info("%s: %d optimizer steps over %d training examples (%d eval), starting from %s%s", name, total_steps,
                len(context.train_examples), len(context.eval_examples), init_path,
                f", resuming from {resume_from}" if resume_from else "")
    stage.build(init_path, resume_from / MODEL_DIR if resume_from else None)
    stage.before_training(context.train_examples, context.eval_examples)

    dist = context.dist
    schedule = (lambda at: lr_factor(at, total_steps, settings))  # noqa: E731
    trainer = optimizer = scheduler = None
    if dist.engine:
        trainer = EngineTrainer(stage.model, settings, schedule, dist, context.device.type)
        stage.model = trainer.engine  # forward passes go through the engine (ZeRO-3 counts them for accumulation)
    else:
        optimizer = adamw(stage.trainable_parameters(), settings.lr, settings,
                          bf16_optimizer=context.config.model.bf16_optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    state = {"stage": name, "tokens_seen": 0, "elapsed_s": 0.0, "evaluated_at": -1}
    step = 0
    if resume_from is not None:
        if trainer is not None:
            saved = distributed.load_checkpoint(resume_from, {"": trainer}, dist)
        else:
            saved = ckpt.load_training_state(resume_from, optimizer, scheduler)
        step = int(saved["step"])
        state.update({key: saved[key] for key in state if key in saved})
        if saved.get("total_steps") not in (None, total_steps):
            logger.warning("%s: the checkpoint was planned for %s steps, this config gives %d", name,
                           saved.get("total_steps"), total_steps)
    if dist.main:
        # Records past the checkpoint were written by the interrupted run; this run writes them again.
        context.metrics.truncate(name, after_step=step)

    def save_checkpoint(at_step: int) -> None:
        epoch, batch_in_epoch = plan.position(at_step)  # where the next step starts
        position = {**state, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "total_steps": total_steps}
        if trainer is not None:
            distributed.save_checkpoint(stage_dir / CHECKPOINT_DIR, at_step, {"": trainer}, position,
                                        context.tokenizer, runtime.keep_last, dist)
        else:
            ckpt.save_checkpoint(stage_dir / CHECKPOINT_DIR, at_step, stage.model, optimizer, scheduler, position,
                                 tokenizer=context.tokenizer, keep_last=runtime.keep_last)

    bar = ProgressBar(total_steps, initial=step, desc=name, enabled=runtime.progress_bar and dist.main)
    parameters = stage.trainable_parameters()
    nonfinite = NonFiniteSteps(name, runtime.max_nonfinite_steps)
    clip = settings.max_grad_norm if settings.max_grad_norm is not None else float("inf")
    try:
        while step < total_steps:
            started = time.perf_counter()
            reset_step_peak(context.device)
            with profiled_step(step + 1, context, stage_dir):
                indices, epoch = plan.batch(step)
                # This rank's share of the step, balanced by tokens (all of it in one process).
                indices, weight = dist.share(indices, [int(plan.example_tokens[i]) for i in indices])
                groups = [stage.micro_batches(context.train_examples, group, settings.micro_batch_tokens)
                          for group in split_even(indices, settings.grad_accumulation)]
                denominator = dist.sum([weight * stage.denominator([batch for group in groups for batch in group])])[0]
                passes = [[(batch, weight) for batch in group] for group in groups]
                # Every rank runs as many passes in every accumulation group (ZeRO collectives: the trained model's, and
                # under ZeRO-3 a partitioned reference's, which runs once per group); missing ones repeat a batch with
                # weight 0.
                any_batch = next(batch for group in groups for batch in group)
                for group in passes:
                    group.extend([(group[-1][0] if group else any_batch, 0.0)] * (dist.max(len(group)) - len(group)))
                last_pass = (len(passes) - 1, len(passes[-1]) - 1)
                lr = trainer.lr if trainer is not None else scheduler.get_last_lr()[0]
                if optimizer is not None:
                    optimizer.zero_grad(set_to_none=True)
                totals: dict = {}
                tokens = 0
                for group_index, group in enumerate(passes):
                    batches = [batch.to(context.device) for batch, _ in group]
                    with phase("prepare"):  # e.g. DPO's reference log-probs
                        extras = stage.prepare(batches)
                    for pass_index, (batch, extra, (_, weight)) in enumerate(zip(batches, extras, group)):
                        with _autocast(context), phase("forward"):
                            loss, stats = stage.loss(batch, extra, denominator)
                        with phase("backward"):
                            if trainer is not None:
                                trainer.backward(loss * weight, boundary=(group_index, pass_index) == last_pass)
                            else:
                                loss.backward()
                        if weight:
                            _accumulate(totals, stats)
                            tokens += batch.num_tokens
                skipped = False
                with phase("optimizer_step"):
                    if trainer is not None:
                        grad_norm = trainer.step()
                        nonfinite.allows(grad_norm, f"step {step + 1}", applied=True)
                    else:
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, clip))
                        skipped = not nonfinite.allows(grad_norm, f"step {step + 1}")
                        if not skipped:
                            optimizer.step()
                        scheduler.step()  # a skipped step still consumed its data: the schedule moves on
                    nonfinite.finish_unit(f"step {step + 1}")
            if dist.parallel:
                totals = dist.sum_dicts({**totals, "_tokens": tokens})
                tokens = int(totals.pop("_tokens"))
            step += 1
            state["tokens_seen"] += tokens
            step_time = time.perf_counter() - started
            state["elapsed_s"] += step_time

            record = {"stage": name, "step": step, "epoch": round(epoch, 4), "lr": lr, **_averages(totals),
                      "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / max(step_time, 1e-9),
                      "tokens_seen": state["tokens_seen"], "elapsed_s": round(state["elapsed_s"], 3)}
            if skipped:
                record["update_skipped"] = 1  # a NaN / inf gradient norm: the weights did not change
            peak = step_peak_mb(context.device)
            if peak is not None:
                record["peak_memory_mb"] = dist.max(int(round(peak)))  # the largest rank's
            last = step == total_steps
            if eval_batches and ((settings.eval_every and step % settings.eval_every == 0) or last):
                record.update(evaluate(stage, eval_batches))  # every rank evaluates all of it: same numbers
                state["evaluated_at"] = step
            if dist.main and (step % runtime.log_every == 0 or last or "eval_loss" in record):
                context.metrics.write(record)
            bar.update(step, tokens, loss=record.get("loss"))
            checkpoint_or_stop(step, last, runtime.checkpoint_every, save_checkpoint, dist, name)
        if eval_batches and state["evaluated_at"] != step:
            # Resumed from the final checkpoint of a run that had not evaluated yet.
            metrics = evaluate(stage, eval_batches)
            if dist.main:
                context.metrics.write({"stage": name, "step": step, **metrics})
    finally:
        bar.close()

    if trainer is not None:
        trainer.export(output_dir, context.tokenizer, atomic=True)
        dist.barrier()
    else:
        ckpt.write_atomic_folder(output_dir, stage.save)
    logger.info("%s: finished after %d steps; model in %s", name, step, output_dir)
    context.outputs[name] = output_dir
    return output_dir
