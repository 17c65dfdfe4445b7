"""Loading the models a stage uses, as the run's settings say: dtype, activation checkpointing, dropout, LoRA, the
run's tokenizer for the random 'tiny' model, and under ZeRO-3 straight into partitions.

Usage:
    policy = trained(path, context, settings, lambda: causal_lm(path, context, trainable=True, lora=lora))
    reference = frozen(path, context, lambda: causal_lm(path, context, trainable=False))
    critic = value_model(path, context, trainable=True, seed=seed + 1)

The random 'tiny' model is always built whole and seeded first (`seed`), so every launch mode starts from the same
weights; anything else under ZeRO-3 loads straight into partitions (rto_fast.trainer.distributed.load_model).
"""

from __future__ import annotations

import torch

from . import distributed
from .config import OptimizerSettings
from .lora import LoraSettings
from .models import TINY, ValueHeadModel, load_causal_lm


def causal_lm(path: str, context, trainable: bool, seed: int | None = None, lora: LoraSettings | None = None):
    """A causal LM (policy, reference, DPO model) with the run's model settings; `seed` seeds the random tiny
    model's weights."""
    model_settings = context.config.model
    if path == TINY and seed is not None:
        torch.manual_seed(seed)  # the tiny model's random weights must be the same in every process
    return load_causal_lm(path, dtype=model_settings.dtype, trainable=trainable,
                          gradient_checkpointing=model_settings.gradient_checkpointing and trainable,
                          keep_dropout=model_settings.keep_dropout, lora=lora if trainable else None,
                          tokenizer=context.tokenizer)


def value_model(path: str, context, trainable: bool, seed: int | None = None, lora: LoraSettings | None = None):
    """A value-head model (reward model, critic) with the run's model settings."""
    model_settings = context.config.model
    if path == TINY and seed is not None:
        torch.manual_seed(seed)
    if not trainable:
        return ValueHeadModel.from_pretrained(path, dtype=model_settings.dtype, trainable=False)
    return ValueHeadModel.from_pretrained(path, dtype=model_settings.dtype, trainable=True,
                                          gradient_checkpointing=model_settings.gradient_checkpointing,
                                          keep_dropout=model_settings.keep_dropout, lora=lora,
                                          tokenizer=context.tokenizer)


def trained(path: str, context, settings: OptimizerSettings, load):
    """`load()` of a model the stage trains: straight into ZeRO-3 partitions under ZeRO-3 (never the random tiny
    model), else whole on the device."""
    return distributed.load_model(load, context.dist, context.device, settings, enabled=path != TINY)


def frozen(path: str, context, load, device: torch.device | None = None):
    """`load()` of a frozen model, whole on `device` (default: the run's), or partitioned under ZeRO-3."""
    return distributed.load_model(load, context.dist, device or context.device, enabled=path != TINY)


__all__ = ["causal_lm", "value_model", "trained", "frozen"]
