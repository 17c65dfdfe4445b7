"""One trained model and what updates it, behind one interface whether it is plain PyTorch (AdamW and its lr schedule)
or a DeepSpeed engine; and the checkpoints of the models a stage trains.

Usage:
    optimization = Optimization(model, config.sft.optimizer(), total_steps, context)
    optimization.zero_grad()
    loss = loss_of(optimization.model, batch)           # forward through `.model` (the engine under DeepSpeed)
    optimization.backward(loss, boundary=True)          # boundary: the last micro-batch of the step
    grad_norm = optimization.step(nonfinite, "step 3")  # clip, skip a NaN / inf norm, step, advance the schedule
    optimization.lr                                     # the current learning rate
    with optimization.whole_model() as bare: ...        # the bare model for sampling and scoring
    optimization.export(folder, tokenizer)              # the model as an HF folder, atomically
    save_checkpoint(folder, step, {"": actor, "critic": critic}, state, tokenizer, keep_last, context.dist)
    saved = load_checkpoint(checkpoint, {"": actor, "critic": critic}, context.dist)

Plain PyTorch: `rto_fast.trainer.optim.adamw` (fused AdamW; bf16 weights per model.bf16_optimizer) over the model's
trainable parameters and a LambdaLR schedule (`lr_factor`: linear warmup, then cosine, linear or constant). `step`
clips the gradients to max_grad_norm, applies the update only when their norm is finite (`NonFiniteSteps`), and
advances the schedule either way (the step's data has been used). Under DeepSpeed (`runtime.deepspeed`, see
`rto_fast.trainer.distributed`) the engine owns the optimizer, the schedule and the clipping; its update has been
applied when its norm is known, so a non-finite one stops the run.

`Optimization.follower(model)` is a model whose parameters another Optimization updates (the RL critic when
`rl.critic_optimizer` is shared): its checkpoint holds the model without optimizer state.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed
from .config import OptimizerSettings
from .distributed import EngineTrainer
from .optim import NonFiniteSteps, adamw


def lr_factor(step: int, total_steps: int, settings: OptimizerSettings) -> float:
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


def trainable_parameters(*models) -> list:
    return [parameter for model in models for parameter in model.parameters() if parameter.requires_grad]


class Optimization:
    """A trained model (`module`), the module its forward passes go through (`model`: the DeepSpeed engine or the
    model itself) and its optimizer and schedule. `also`: more models whose parameters this optimizer updates too
    (plain PyTorch only). `name` names the model in messages about its gradient norm."""

    def __init__(self, model: torch.nn.Module, settings: OptimizerSettings, total_steps: int, context, *,
                 name: str = "model", also: tuple = ()):
        self.name = name
        self.engine: EngineTrainer | None = None
        self.module = model
        self.optimizer = self.scheduler = None
        self.parameters: list = []
        self.max_grad_norm = settings.max_grad_norm
        dist = context.dist

        def schedule(step: int) -> float:
            return lr_factor(step, total_steps, settings)

        if dist.engine:
            self.engine = EngineTrainer(model, settings, schedule, dist, context.device.type)
            self.model, self.scheduler = self.engine.engine, self.engine.scheduler
            return
        self.model = model
        self.parameters = trainable_parameters(model, *also)
        self.optimizer = adamw(self.parameters, settings.lr, settings, context.config.model.bf16_optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    @classmethod
    def follower(cls, model: torch.nn.Module) -> "Optimization":
        follower = cls.__new__(cls)
        follower.name, follower.engine, follower.module, follower.model = "model", None, model, model
        follower.optimizer = follower.scheduler = None
        follower.parameters, follower.max_grad_norm = [], None
        return follower

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def zero_grad(self) -> None:
        """Free the gradients (plain PyTorch; an engine manages its own)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None:
        """Gradients of `loss`; `boundary`: the last micro-batch of the step (DeepSpeed reduces there)."""
        if self.engine is not None:
            self.engine.backward(loss, boundary)
        else:
            loss.backward()

    def step(self, nonfinite: NonFiniteSteps, where: str) -> float:
        """Clip, update (unless the gradient norm is NaN or inf) and advance the schedule; returns the norm before
        clipping. `where` names the step in messages ("step 12", "iteration 3")."""
        if self.engine is not None:
            norm = self.engine.step()
            nonfinite.allows(norm, where, self.name, applied=True)
            return norm
        clip = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, clip))
        if nonfinite.allows(norm, where, self.name):
            self.optimizer.step()
        self.scheduler.step()  # a skipped update still used its data: the schedule moves on
        return norm

    @contextlib.contextmanager
    def whole_model(self):
        """The bare model with its parameters whole on this rank (see EngineTrainer.whole_model)."""
        if self.engine is None:
            yield self.module
            return
        with self.engine.whole_model() as model:
            yield model

    def export(self, folder: Path, tokenizer=None) -> None:
        """The model as an HF folder (LoRA adapters merged), written atomically; collective under DeepSpeed."""
        if self.engine is not None:
            self.engine.export(folder, tokenizer, atomic=True)
        else:
            ckpt.write_atomic_folder(folder, lambda target: ckpt.save_model(self.module, target, tokenizer))


def save_checkpoint(folder: Path, step: int, parts: dict[str, Optimization], state: dict, tokenizer,
                    keep_last: int, dist) -> Path:
    """Checkpoint `step` of a stage's trained models (`parts`: "" the main one, e.g. "critic" beside it, each in its
    own subfolder) with `state` in trainer_state.json; atomic, the newest `keep_last` kept (checkpoint's layout)."""
    if any(part.engine is not None for part in parts.values()):
        return distributed.save_checkpoint(folder, step, {name: part.engine for name, part in parts.items()}, state,
                                           tokenizer, keep_last, dist)
    main = parts[""]
    extra = {name: (part.module, part.optimizer, part.scheduler) for name, part in parts.items() if name}
    return ckpt.save_checkpoint(folder, step, main.module, main.optimizer, main.scheduler, state,
                                tokenizer=tokenizer, keep_last=keep_last, extra=extra)


def load_checkpoint(checkpoint: Path, parts: dict[str, Optimization], dist) -> dict:
    """Restore the optimizers, schedules (engines: also the weights) and RNGs saved by `save_checkpoint`; returns
    trainer_state.json. Plain models load their weights from the checkpoint's model folders when they are built."""
    if any(part.engine is not None for part in parts.values()):
        return distributed.load_checkpoint(checkpoint, {name: part.engine for name, part in parts.items()}, dist)
    main = parts[""]
    extra = {name: (part.optimizer, part.scheduler) for name, part in parts.items() if name}
    return ckpt.load_training_state(checkpoint, main.optimizer, main.scheduler, extra=extra)


__all__ = ["Optimization", "lr_factor", "trainable_parameters", "save_checkpoint", "load_checkpoint"]
