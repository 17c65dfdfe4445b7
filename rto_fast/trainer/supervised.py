"""The supervised stages: SFT, DPO and the reward model. Each is a `StageRun` of the one training loop
(rto_fast.trainer.loop): how examples become packed sequences, the models, and the loss of one micro-batch.

Usage (the CLI runs each stage a config lists):
    output_folder = run_stage(SFTStage(context), context)     # run_dir/sft/model: loads with from_pretrained

Stages:
- sft: mean NLL over response tokens of prompt + chosen (prompt tokens masked).
- dpo: -log sigmoid(beta * [(S_pi(y_w) - S_ref(y_w)) - (S_pi(y_l) - S_ref(y_l))]) with S the sum of response-token
  log-probs from `rto_fast.ops.token_logprobs` on packed streams (docs/math.md §6), plus `dpo.sft_coef` times the
  chosen response's NLL per token; the frozen reference's log-probs are computed once per batch, in
  `torch.inference_mode`, before the policy's passes (or once for all pairs: dpo.precompute_ref_logprobs). Logs the
  implicit rewards and their margin.
- rm: Bradley-Terry -log sigmoid(r(x, y_w) - r(x, y_l)) with `ValueHeadModel`, r read at each sequence's last
  token; logs accuracy.

Batches: an optimizer step takes `batch_size` examples (`batch_unit: sequences`; a preference pair counts once) or
examples up to `batch_size` tokens (`batch_unit: tokens`; prompt + response tokens, both sequences of a pair). The
step is processed as `grad_accumulation` consecutive batches; each is packed into micro-batches of at most
`micro_batch_tokens` tokens (a pair always lands in one micro-batch), whose gradients add up. Losses are normalised
by the whole step (response tokens for SFT, pairs for DPO/RM), so the gradient does not depend on how the step
was cut into micro-batches.

Data parallel (`runtime.deepspeed`, several processes; rto_fast.trainer.distributed): every rank draws the same step,
trains on its token-balanced share of it under a DeepSpeed engine, and pads to the same number of passes; statistics
are summed over ranks and rank 0 alone writes logs, checkpoints' metadata and the final model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import distributed
from .attention import packed_forward
from .config import StageConfig
from .layout import MODEL_DIR
from .loading import causal_lm, frozen, trained, value_model
from .lora import LoraSettings, SharedReference, check_checkpoint, frozen_view, load_adapters
from .loop import STAGE_SEED_OFFSET, StageRun
from .models import TINY, trainable_copy
from .optim import NonFiniteSteps
from .optimization import Optimization
from .packing import PackedBatch, TokenizedSequence, first_fit_decreasing, pack, sequence_sums
from .pipeline import Wiring
from .profiling import phase
from .run import DataPlan, RunContext, autocast, rank_share, split_even
from .scoring import packed_logprobs

logger = logging.getLogger(__name__)


def _get(example, name: str):
    return example[name] if isinstance(example, dict) else getattr(example, name)


class SupervisedStage(StageRun):
    """One supervised stage: how examples become sequences, the models, the loss of one packed micro-batch, and one
    optimizer step over a planned batch of examples."""

    name = ""
    pairs = False  # True: each example gives a (chosen, rejected) pair packed into the same micro-batch

    def __init__(self, context: RunContext):
        self.context = context
        self.config = context.config
        self.settings: StageConfig = getattr(context.config, self.name)
        self.eval_every = self.settings.eval_every
        self.model = None
        self.nonfinite = NonFiniteSteps(self.name, self.config.runtime.max_nonfinite_steps)

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
    def build_models(self, init_path: str, resume_model: Path | None) -> None:
        raise NotImplementedError

    def load_trained(self, path: str, load):
        """`load()` of the model this stage trains from `path` (rto_fast.trainer.loading.trained)."""
        return trained(path, self.context, self.settings.optimizer(), load)

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

    # --- the loop's side (rto_fast.trainer.loop.StageRun)
    def check_resume(self, checkpoint: Path) -> None:
        check_checkpoint(checkpoint / MODEL_DIR, self.lora)

    def build(self, resume_from: Path | None) -> None:
        context, settings = self.context, self.settings
        seed = self.config.runtime.seed + STAGE_SEED_OFFSET[self.name]
        self.plan = DataPlan([self.example_tokens(example) for example in context.train_examples], settings.plan(),
                             seed)
        self.total_steps = self.plan.total_steps
        eval_tokens = settings.eval_batch_tokens or settings.micro_batch_tokens
        self.eval_batches = (self.micro_batches(context.eval_examples, list(range(len(context.eval_examples))),
                                                eval_tokens) if context.eval_examples else [])
        init_path = Wiring.of(context).start(self.name)
        logger.info("%s: %d optimizer steps over %d training examples (%d eval), starting from %s%s", self.name,
                    self.total_steps, len(context.train_examples), len(context.eval_examples), init_path,
                    f", resuming from {resume_from}" if resume_from else "")
        self.build_models(init_path, resume_from / MODEL_DIR if resume_from else None)
        self.before_training(context.train_examples, context.eval_examples)
        self.optimization = Optimization(self.model, settings.optimizer(), self.total_steps, context)
        self.model = self.optimization.model  # under DeepSpeed the engine (ZeRO-3 counts its forwards)
        self.parts = {"": self.optimization}

    def state(self, step: int) -> dict:
        epoch, batch_in_epoch = self.plan.position(step)  # where the next step starts
        return {"epoch": epoch, "batch_in_epoch": batch_in_epoch}

    def has_eval(self) -> bool:
        return bool(self.eval_batches)

    def evaluate(self) -> dict:
        return evaluate(self, self.eval_batches)  # every rank evaluates all of it: the same numbers

    def progress(self, record: dict) -> dict:
        return {"loss": record.get("loss")}

    def export(self, stage_dir: Path) -> None:
        self.optimization.export(stage_dir / MODEL_DIR, self.context.tokenizer)

    def step(self, step: int) -> dict:
        """One optimizer step over the plan's batch `step`: this rank's token-balanced share of it, cut into
        grad_accumulation groups of micro-batches; returns its metrics."""
        context, settings, dist = self.context, self.settings, self.context.dist
        indices, epoch = self.plan.batch(step)
        indices, weight = dist.share(indices, [int(self.plan.example_tokens[i]) for i in indices])
        groups = [self.micro_batches(context.train_examples, group, settings.micro_batch_tokens)
                  for group in split_even(indices, settings.grad_accumulation)]
        denominator = dist.sum([weight * self.denominator([batch for group in groups for batch in group])])[0]
        passes = [[(batch, weight) for batch in group] for group in groups]
        # Every rank runs as many passes in every accumulation group (ZeRO collectives: the trained model's, and under
        # ZeRO-3 a partitioned reference's, which runs once per group); missing ones repeat a batch with weight 0.
        any_batch = next(batch for group in groups for batch in group)
        for group in passes:
            group.extend([(group[-1][0] if group else any_batch, 0.0)] * (dist.max(len(group)) - len(group)))
        lr = self.optimization.lr
        self.optimization.zero_grad()
        totals, tokens = self._passes(passes, denominator)
        where = f"step {step + 1}"
        with phase("optimizer_step"):
            grad_norm = self.optimization.step(self.nonfinite, where)
            skipped = self.nonfinite.unit_skipped
            self.nonfinite.finish_unit(where)
        if dist.parallel:
            totals = dist.sum_dicts({**totals, "_tokens": tokens})
            tokens = int(totals.pop("_tokens"))
        record = {"epoch": round(epoch, 4), "lr": lr, **_averages(totals), "grad_norm": grad_norm, "tokens": tokens}
        if skipped:
            record["update_skipped"] = 1  # a NaN / inf gradient norm: the weights did not change
        return record

    def _passes(self, passes: list[list[tuple]], denominator: float) -> tuple[dict, int]:
        """Forward and backward of every micro-batch of the step; (summed statistics, tokens) of the real passes."""
        totals: dict = {}
        tokens = 0
        last_pass = (len(passes) - 1, len(passes[-1]) - 1)
        for group_index, group in enumerate(passes):
            batches = [batch.to(self.context.device) for batch, _ in group]
            with phase("prepare"):  # e.g. DPO's reference log-probs
                extras = self.prepare(batches)
            for pass_index, (batch, extra, (_, weight)) in enumerate(zip(batches, extras, group)):
                with autocast(self.context), phase("forward"):
                    loss, stats = self.loss(batch, extra, denominator)
                with phase("backward"):
                    self.optimization.backward(loss * weight if self.optimization.engine is not None else loss,
                                               boundary=(group_index, pass_index) == last_pass)
                if weight:
                    _accumulate(totals, stats)
                    tokens += batch.num_tokens
        return totals, tokens


class SFTStage(SupervisedStage):
    name = "sft"

    def build_models(self, init_path, resume_model):
        seed = self.config.runtime.seed + STAGE_SEED_OFFSET[self.name]
        path = self.trained_source(init_path, resume_model)
        self.model = self.load_trained(path, lambda: causal_lm(path, self.context, True, seed, self.lora))
        self.resume_adapters(resume_model)

    def denominator(self, micro_batches):
        return float(sum(int(batch.response_mask.sum()) for batch in micro_batches))

    def loss(self, batch, extra, denominator):
        logprobs = packed_logprobs(self.model, batch, inplace_backward=torch.is_grad_enabled(),
                                   fused_output_layer=self.config.model.fused_output_layer)
        nll_sum = -logprobs.sum()
        return nll_sum / denominator, {"loss": nll_sum.detach(), "count": batch.response_mask.sum()}


class DPOStage(SupervisedStage):
    name = "dpo"
    pairs = True
    reference_tables: dict | None = None  # split -> reference log-prob per sequence, with precompute_ref_logprobs

    def build_models(self, init_path, resume_model):
        # Reference first, then the policy: the same order in a fresh and in a resumed run.
        seed = self.config.runtime.seed + STAGE_SEED_OFFSET[self.name]
        ref_path = self.config.model.ref_path or init_path
        if self.lora is not None and ref_path == init_path:
            # The reference is where the policy starts: the policy with its adapters off, no second copy.
            self.model = self.load_trained(init_path, lambda: causal_lm(init_path, self.context, True, seed,
                                                                       self.lora))
            self.reference = SharedReference(self.model)
            self.resume_adapters(resume_model)
            return
        self.reference = frozen(ref_path, self.context, lambda: causal_lm(ref_path, self.context, False, seed))
        if self.lora is not None:
            self.model = self.load_trained(init_path, lambda: causal_lm(init_path, self.context, True, seed,
                                                                       self.lora))
            self.resume_adapters(resume_model)
        elif resume_model is not None:
            self.model = self.load_trained(str(resume_model), lambda: causal_lm(str(resume_model), self.context, True))
        elif init_path == ref_path == TINY:
            # The same random weights (ZeRO-3 partitions this whole copy when the engine starts).
            self.model = trainable_copy(self.reference, self.context.device,
                                        keep_dropout=self.config.model.keep_dropout)
        else:
            self.model = self.load_trained(init_path, lambda: causal_lm(init_path, self.context, True, seed))
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
        # A rank may get no batch at all (fewer batches than ranks): under ZeRO-3 it still joins every pass.
        mine = rank_share(batches, dist.world_size, dist.rank) if dist.parallel else batches
        # A partitioned (ZeRO-3) reference runs collective forwards: every rank runs as many, extras are dropped.
        passes = dist.max(len(mine)) if distributed.zero_stage(dist) == 3 else len(mine)
        scored = []
        with torch.inference_mode(), autocast(self.context):
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
        with torch.inference_mode(), autocast(self.context), frozen_view(self.reference) as reference_model:
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


class RMStage(SupervisedStage):
    name = "rm"
    pairs = True

    def build_models(self, init_path, resume_model):
        path = self.trained_source(init_path, resume_model)
        seed = self.config.runtime.seed + STAGE_SEED_OFFSET[self.name]
        self.model = self.load_trained(path, lambda: value_model(path, self.context, True, seed, self.lora))
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


def _accumulate(totals: dict, stats: dict) -> None:
    for key, value in stats.items():
        totals[key] = totals.get(key, 0.0) + float(value)


def _averages(totals: dict, prefix: str = "") -> dict:
    count = max(totals.get("count", 0.0), 1.0)
    return {f"{prefix}{key}": value / count for key, value in totals.items() if key != "count"}


def evaluate(stage: SupervisedStage, eval_batches: list[PackedBatch]) -> dict:
    """Mean metrics over the evaluation micro-batches, prefixed 'eval_'."""
    model = stage.model
    model.eval()
    totals: dict = {}
    with torch.inference_mode():
        batches = [batch.to(stage.context.device) for batch in eval_batches]
        extras = stage.prepare(batches, "eval")
        with autocast(stage.context):
            for batch, extra in zip(batches, extras):
                _, stats = stage.loss(batch, extra, 1.0)
                _accumulate(totals, stats)
    model.train()
    return _averages(totals, "eval_")


__all__ = ["SupervisedStage", "SFTStage", "DPOStage", "RMStage", "STAGE_CLASSES", "evaluate"]
