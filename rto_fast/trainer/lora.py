"""LoRA adapters on the models a stage trains (`model.lora_rank` > 0), through peft (an optional extra).

- `add_adapters(model, settings)` injects LoRA layers in place (`peft.inject_adapter_in_model`): the model keeps its
  class, its forward signature and its output layer, so `logits_to_keep`, the fused output layer and the decode loop
  see the same model as without adapters. Everything but the adapters (and a value-head model's head, which is new
  for the critic and the reward model) is frozen.
- Checkpoints hold the adapters only, in PEFT's format (`adapter_model.safetensors` + `adapter_config.json`, which
  `peft.PeftModel.from_pretrained` loads onto the stage's starting model): resuming rebuilds the model from where the
  stage started and loads them (`load_adapters`).
- A stage's output is the merged model (`merged_state_dict`): later stages and any user load it with
  `from_pretrained`, nothing about adapters to know.
- A frozen reference that is the trained model's own starting point is that model with its adapters off
  (`SharedReference`, used through `frozen_view`): no second copy of the weights is held.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import extras
from .config import ConfigError
from .extras import PEFT_MISSING
from .layout import VALUE_HEAD_FILE

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"
PEFT_PREFIX = "base_model.model."  # how PEFT's own files name a wrapped model's weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: str = "all-linear"

    @classmethod
    def from_config(cls, model_config, stage: str) -> "LoraSettings | None":
        """The `model.lora_*` settings for `stage`, or None when it fine-tunes fully (`model.lora_rank` 0, or
        `model.lora_stages` lists other stages)."""
        rank = int(model_config.lora_rank or 0)
        stages = model_config.lora_stages
        if rank <= 0 or (stages is not None and stage not in stages):
            return None
        alpha = model_config.lora_alpha if model_config.lora_alpha is not None else 2.0 * rank
        return cls(rank, float(alpha), float(model_config.lora_dropout), model_config.lora_target_modules)

    def targets(self) -> str | list[str]:
        """peft's `target_modules`: "all-linear" (every linear layer but the output layer) or a list of names."""
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.targets(), bias="none")


def _require_peft() -> None:
    if not extras.peft_available():
        raise ImportError(f"model.lora_rank > 0: {PEFT_MISSING}")


def _adapter_host(model: nn.Module) -> nn.Module:
    """The module the adapters live in: a value-head model's backbone, else the model (inside DDP / an engine)."""
    inner = getattr(model, "module", None)
    model = inner if isinstance(inner, nn.Module) else model
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else model


def _value_head(model: nn.Module) -> nn.Module | None:
    head = getattr(model, "value_head", None)
    return head if isinstance(head, nn.Module) else None


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in _adapter_host(model).modules() if isinstance(module, BaseTunerLayer)]


def has_adapters(model: nn.Module) -> bool:
    return getattr(_adapter_host(model), "rto_fast_lora", None) is not None


def add_adapters(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA adapters into `model` (a causal LM, or a value-head model's backbone) and freeze the rest; a
    value-head model's head stays trainable. Adapters start as a zero update (peft's B = 0), so the model computes
    what it computed before."""
    _require_peft()
    from peft import inject_adapter_in_model

    host = _adapter_host(model)
    try:
        inject_adapter_in_model(settings.peft_config(), host, ADAPTER_NAME)
    except ValueError as error:  # e.g. target modules the model does not have
        raise ValueError(f"model.lora_target_modules={settings.target_modules!r}: {error}") from error
    if not _tuner_layers(model):
        raise ValueError(f"model.lora_target_modules={settings.target_modules!r} matched no layer of "
                         f"{type(host).__name__}")
    host.rto_fast_lora = settings
    for name, parameter in host.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    head = _value_head(model)
    if head is not None:
        head.requires_grad_(True)
    # ds_numel: a ZeRO-3 partition's whole size (the base weights may already be partitioned here).
    sizes = [(getattr(parameter, "ds_numel", parameter.numel()), parameter.requires_grad)
             for parameter in model.parameters()]
    trained = sum(size for size, requires_grad in sizes if requires_grad)
    total = sum(size for size, _ in sizes)
    logger.info("LoRA rank %d (alpha %g) on %d layers of %s: %d of %d parameters trained (%.2f%%)", settings.rank,
                settings.alpha, len(_tuner_layers(model)), type(host).__name__, trained, total,
                100.0 * trained / max(total, 1))
    return model


def _adapter_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' own tensors, named relative to the module they live in (no copies)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(_adapter_host(model), adapter_name=ADAPTER_NAME)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights on the host, named as PEFT's files name them
    (`base_model.model.<module>.lora_A.weight`)."""
    return {PEFT_PREFIX + key: value.detach().contiguous().cpu() for key, value in _adapter_weights(model).items()}


def save_adapters(model: nn.Module, folder: str | Path) -> None:
    """The adapters (and a value-head model's head) in PEFT's format, into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings: LoraSettings = _adapter_host(model).rto_fast_lora
    config = settings.peft_config()
    # The model the adapters were added to, so that the folder loads on its own (peft, or as an rto_fast model path).
    base = getattr(_adapter_host(model).config, "_name_or_path", None) or None
    if base and Path(base).expanduser().exists():
        base = str(Path(base).expanduser().resolve())
    config.base_model_name_or_path = base
    config.save_pretrained(str(folder))
    save_file(adapter_state_dict(model), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    head = _value_head(model)
    if head is not None:
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in head.state_dict().items()},
                  str(folder / VALUE_HEAD_FILE))


def load_adapters(model: nn.Module, folder: str | Path) -> None:
    """Load adapters written by `save_adapters` into `model`, which already has adapters of the same settings
    (`add_adapters`); a value-head model's head too. Raises ValueError naming what does not match."""
    from peft import set_peft_model_state_dict

    folder = Path(folder)
    check_checkpoint(folder, _adapter_host(model).rto_fast_lora)
    weights = folder / ADAPTER_WEIGHTS
    state = {key.removeprefix(PEFT_PREFIX): value for key, value in load_file(str(weights)).items()}
    expected = set(_adapter_weights(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"model.lora_target_modules: the adapters in {folder} do not match this run's (missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}); resume with the settings they were trained "
                         "with")
    set_peft_model_state_dict(_adapter_host(model), state, adapter_name=ADAPTER_NAME)
    head = _value_head(model)
    if head is not None and (folder / VALUE_HEAD_FILE).is_file():
        head_state = load_file(str(folder / VALUE_HEAD_FILE))
        head.load_state_dict({name: tensor.to(head.weight.dtype) for name, tensor in head_state.items()})


def check_checkpoint(folder: str | Path, settings: LoraSettings | None) -> None:
    """Raise ConfigError (naming the model.lora_* key) when the model folder of a checkpoint cannot be resumed with
    `settings`: adapters where the run trains full weights, full weights where it trains adapters, or adapters of
    another rank, alpha or target modules. Runs before any model loads."""
    folder = Path(folder)
    saved_file = folder / ADAPTER_CONFIG
    if settings is None:
        if saved_file.is_file():
            saved = json.loads(saved_file.read_text(encoding="utf-8"))
            raise ConfigError(f"model.lora_rank: {folder} holds LoRA adapters of rank {saved.get('r')}; resume it "
                              "with the model.lora_* settings it was trained with")
        return
    if not saved_file.is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"model.lora_rank: {folder} holds no LoRA adapters ({ADAPTER_WEIGHTS}): it was trained "
                          "with model.lora_rank 0; resume it with model.lora_rank: 0")
    saved = json.loads(saved_file.read_text(encoding="utf-8"))

    def targets(value):  # "all-linear", or the module names in any order
        return value if isinstance(value, str) else sorted(value or [])

    for name, was, now in (("lora_rank", int(saved.get("r", 0)), settings.rank),
                           ("lora_alpha", float(saved.get("lora_alpha", 0)), settings.alpha),
                           ("lora_target_modules", targets(saved.get("target_modules")), targets(settings.targets()))):
        if was != now:
            raise ConfigError(f"model.{name}: {folder} was trained with {was!r}, this run has {now!r}; resume "
                              "with the settings it was trained with")


@torch.no_grad()
def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state dict with every adapter merged into the weight it adapts (W + scale * B @ A), named as the
    module's weights are named without adapters. Merged tensors are built one at a time and moved to host memory, so
    device memory grows by one weight at most; the rest are the module's own tensors (no copy)."""
    from peft.tuners.lora import LoraLayer

    deltas = {f"{name}.weight": layer for name, layer in module.named_modules()
              if isinstance(layer, LoraLayer) and ADAPTER_NAME in layer.lora_A}
    state = {}
    for key, value in module.state_dict().items():
        if ".lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        layer = deltas.get(clean)
        if layer is not None:
            delta = layer.get_delta_weight(ADAPTER_NAME)
            value = (value.float() + delta.float()).to(value.dtype).cpu()
        state[clean] = value
    return state


def save_merged(model: nn.Module, folder: str | Path) -> None:
    """`model` with its adapters merged, saved with `save_pretrained` (a plain model folder: config, safetensors
    weights and, for a value-head model, its head)."""
    model.save_pretrained(folder, state_dict=merged_state_dict(_adapter_host(model)))


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """`model` computes its base weights' function for the length of the block.

    The flag peft's layers read in their forward is set directly: peft's `enable_adapters` also flips the adapters'
    `requires_grad` on the way out and back, which a DeepSpeed engine's gradient hooks on those parameters should
    never see in the middle of a run."""
    layers = _tuner_layers(model)
    previous = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous):
            layer._disable_adapters = flag


class SharedReference:
    """The frozen reference when it is where the trained model started: the trained model with its adapters off.
    Use it through `frozen_view`."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __repr__(self) -> str:
        return f"SharedReference({type(_adapter_host(self.model)).__name__} with its LoRA adapters off)"


@contextlib.contextmanager
def frozen_view(model):
    """A frozen model ready for a pass: `model` itself, or for a `SharedReference` the trained model with its
    adapters off and no autograd graph."""
    if not isinstance(model, SharedReference):
        yield model
        return
    with adapters_off(model.model), torch.no_grad():
        yield model.model
