"""What every stage of a run shares: the run context, seeding, the data plan of each step, and the compute dtype.

Usage:
    context = RunContext(config, run_dir, device, tokenizer, train_examples, eval_examples, metrics)
    seed_everything(seed)                                  # python, numpy and torch
    plan = DataPlan(example_tokens, config.sft.plan(), seed)
    indices, epoch = plan.batch(step)                      # the examples of 0-based optimizer step `step`
    with autocast(context): ...                            # bf16 autocast when runtime.dtype is bf16

Data order: epoch e visits the examples in a permutation drawn from its own generator seeded by (seed, e), so the
data position of a checkpoint is just its step number, and a resumed run sees exactly the batches the uninterrupted
run would have seen.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import Config, PlanSettings
from .distributed import Distributed
from .run_log import MetricsLog


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
    # Output folder of each finished stage of this run; feeds the next stage (rto_fast.trainer.pipeline).
    outputs: dict = field(default_factory=dict)
    # Prompts for the RL and eval stages (rto_fast.trainer.data.PromptExample), loaded when a config lists those stages.
    train_prompts: list = field(default_factory=list)
    eval_prompts: list = field(default_factory=list)
    # This process's place in a data-parallel run (rank 0 of 1 and no DeepSpeed engine by default).
    dist: Distributed = field(default_factory=Distributed)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(context: RunContext):
    """bf16 autocast of the forward passes when runtime.dtype is bf16, else a no-op context."""
    enabled = context.config.runtime.dtype == "bf16"
    return torch.autocast(context.device.type, dtype=torch.bfloat16, enabled=enabled)


def split_even(items: list, parts: int) -> list[list]:
    """`items` cut into at most `parts` consecutive chunks of near-equal size (none empty)."""
    parts = max(1, min(parts, len(items)))
    bounds = [round(i * len(items) / parts) for i in range(parts + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]


def rank_share(items: list, world_size: int, rank: int) -> list:
    """This rank's chunk of `split_even(items, world_size)`: empty when there are fewer items than ranks."""
    chunks = split_even(items, world_size)
    return chunks[rank] if rank < len(chunks) else []


class DataPlan:
    """Which examples each optimizer step (or RL iteration) uses; a pure function of (seed, step)."""

    def __init__(self, example_tokens: list[int], settings: PlanSettings, seed: int):
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
                batches = self._token_batches(order, size)
            self._epochs = {epoch: batches}  # only the current epoch's batches are kept
            self._epoch_steps[epoch] = len(batches)
        return self._epochs[epoch]

    def _token_batches(self, order: list[int], budget: int) -> list[list[int]]:
        batches, current, tokens = [], [], 0
        for index in order:
            length = int(self.example_tokens[index])
            if current and tokens + length > budget:
                batches.append(current)
                current, tokens = [], 0
            current.append(index)
            tokens += length
        if current:
            batches.append(current)
        return batches

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


__all__ = ["RunContext", "seed_everything", "autocast", "split_even", "DataPlan"]
