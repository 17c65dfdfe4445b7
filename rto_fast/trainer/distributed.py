"""Data-parallel runs: the process group, DeepSpeed engines for trained models, and the rank-aware pieces of the loop.

Launch (every rank runs the same command; RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT come from the launcher):
    torchrun --nproc_per_node 8 -m rto_fast.train --config CONFIG runtime.deepspeed=ds_zero2.json
    deepspeed --module rto_fast.train --config CONFIG runtime.deepspeed=ds_zero2.json

`runtime.deepspeed` is a DeepSpeed config (a JSON file or an inline mapping). A multi-process launch without one
runs DeepSpeed with ZeRO stage 0 (plain data parallelism). rto_fast owns the parts of that config that its own
settings decide, and fills them per stage (`deepspeed_config`):
- the optimizer (AdamW with the stage's lr, betas and weight decay; torch's implementation unless the optimizer
  states are offloaded on a GPU machine, where DeepSpeed's CPU Adam runs) and the lr schedule (the stage's
  warmup + cosine/linear/constant, stepped once per optimizer step);
- gradient clipping (the stage's max_grad_norm);
- the batch keys: a step's examples are cut into token-budget micro-batches, so DeepSpeed's own batch arithmetic is
  not used (train_micro_batch_size_per_gpu = gradient_accumulation_steps = 1; rto_fast marks the accumulation
  boundary itself). Setting any of these in the DeepSpeed config is an error that names the key.
Everything else (zero_optimization: stage 0-3, offload_optimizer / offload_param, overlap_comm, bucket sizes; bf16;
communication settings) passes through. Under ZeRO-3 the trained models load straight into partitions
(`partitioned_loading`); under ZeRO-3 the frozen models (reference, DPO, reward) are partitioned too
(`frozen_engine`), otherwise they are replicated on every rank.

Per optimizer step: every rank knows the whole step (the data plan is a function of the seed), takes its share of the
examples balanced by tokens (`shard_by_tokens`: longest first onto the rank with the fewest tokens), and packs it
into micro-batches. Ranks then pad to the same number of micro-batches with zero-weight repeats (ZeRO-2/3 reduce
gradients in every backward and ZeRO-3 gathers parameters in every forward, so each rank must run as many passes).
Losses are divided by the whole step's denominator (summed over ranks) and multiplied by the world size, because
DeepSpeed averages gradients over ranks: the update equals the one-process update of the same global batch.
Logged statistics are summed over ranks; only rank 0 writes logs, plots and model exports.

Checkpoints (`save_checkpoint`): one folder per step, written by all ranks into a shared temporary folder and
renamed by rank 0 once complete: `deepspeed/` (the engine's own save: module, ZeRO-partitioned optimizer states,
lr schedule), `model/` (the HF safetensors export of the full model, gathered under ZeRO-3), one RNG file per rank
and trainer_state.json (with the world size; a resume must use the same one).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .lora import has_adapters

logger = logging.getLogger(__name__)

# Keys of a DeepSpeed config that rto_fast fills from its own settings.
_OWNED_KEYS = {
    "optimizer": "the optimizer is AdamW with the stage's lr, adam_beta1/2 and weight_decay",
    "scheduler": "the learning-rate schedule comes from the stage's lr_schedule, warmup_ratio and min_lr_ratio",
    "gradient_clipping": "gradient clipping comes from the stage's max_grad_norm",
    "train_batch_size": "batches come from the stage's batch_size / batch_unit / micro_batch_tokens",
    "train_micro_batch_size_per_gpu": "batches come from the stage's batch_size / batch_unit / micro_batch_tokens",
    "gradient_accumulation_steps": "accumulation comes from the stage's grad_accumulation and micro_batch_tokens",
}
_RNG_FILE = "rng-rank-{rank:05d}.pt"
DEEPSPEED_DIR = "deepspeed"


class DistributedError(ValueError):
    """A DeepSpeed / multi-process setting that cannot work; the message names the key."""


@dataclass
class Distributed:
    """Where this process stands in the run. A single-process run without DeepSpeed has rank 0 of 1, `engine` off."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    deepspeed: dict | None = None  # the user's DeepSpeed config (validated), None: plain PyTorch
    # Where collective tensors live: NCCL reduces only CUDA tensors, gloo CPU ones.
    collective_device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def engine(self) -> bool:
        return self.deepspeed is not None

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.parallel:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if not self.parallel:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.collective_device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def max(self, value: int) -> int:
        if not self.parallel:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.collective_device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return int(tensor.item())

    def share(self, items: list[int], tokens: list[int]) -> tuple[list[int], float]:
        """This rank's token-balanced share of `items` (every rank draws the same list) and the weight of its passes.
        With fewer items than ranks an empty share becomes a zero-weight repeat of the first item: every rank must
        still run passes (ZeRO collectives)."""
        if not self.parallel:
            return items, 1.0
        mine = shard_by_tokens(items, tokens, self.world_size)[self.rank]
        return (mine, 1.0) if mine else (items[:1], 0.0)

    def gather(self, value) -> list:
        """One picklable object per rank, in rank order, on every rank."""
        if not self.parallel:
            return [value]
        gathered: list = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def sum_dicts(self, values: dict) -> dict:
        """Key-wise sum of one dict per rank (keys may differ between ranks)."""
        if not self.parallel:
            return dict(values)
        total: dict = {}
        for part in self.gather(values):
            for key, value in part.items():
                total[key] = total.get(key, 0.0) + value
        return total

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (it may write caches), the other ranks after it."""
        if not self.main:
            self.barrier()
        try:
            yield
        finally:
            if self.main:
                self.barrier()


def load_deepspeed_config(value) -> dict:
    """runtime.deepspeed as a dict: an inline mapping, or the path of a JSON file."""
    if isinstance(value, dict):
        return json.loads(json.dumps(value))  # a deep copy of plain data
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise DistributedError(f"runtime.deepspeed: {value!r} is neither a mapping nor an existing JSON file")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DistributedError(f"runtime.deepspeed: {path} is not valid JSON ({error})") from None
    if not isinstance(loaded, dict):
        raise DistributedError(f"runtime.deepspeed: {path} must hold a JSON object")
    return loaded


def validate_deepspeed_config(config: dict) -> dict:
    """Check what can be checked before any process group exists; returns the config."""
    for key, reason in _OWNED_KEYS.items():
        if key in config and config[key] != "auto":
            raise DistributedError(f"runtime.deepspeed.{key}: rto_fast sets this itself ({reason}); remove it or "
                                   "set it to \"auto\"")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise DistributedError("runtime.deepspeed.zero_optimization: expected a mapping")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise DistributedError(f"runtime.deepspeed.zero_optimization.stage: {stage!r} is not a ZeRO stage "
                               "(0, 1, 2 or 3)")
    for offload in ("offload_optimizer", "offload_param"):
        device = (zero.get(offload) or {}).get("device", "none")
        if device not in ("none", "cpu", "nvme"):
            raise DistributedError(f"runtime.deepspeed.zero_optimization.{offload}.device: {device!r}; expected "
                                   "none, cpu or nvme")
    if (zero.get("offload_param") or {}).get("device", "none") != "none" and stage != 3:
        raise DistributedError("runtime.deepspeed.zero_optimization.offload_param needs ZeRO stage 3 "
                               f"(stage is {stage})")
    for precision in ("fp16", "bf16"):
        if precision in config and not isinstance(config[precision], dict):
            raise DistributedError(f"runtime.deepspeed.{precision}: expected a mapping such as {{\"enabled\": true}}")
    if (config.get("fp16") or {}).get("enabled"):
        raise DistributedError("runtime.deepspeed.fp16: fp16 training (loss scaling) is not supported; use bf16")
    return config


def check_world(settings_by_stage: dict, world_size: int) -> None:
    """Batch settings that cannot be shared by `world_size` ranks: every rank needs at least one example per step."""
    for name, settings in settings_by_stage.items():
        if settings.batch_unit == "sequences" and settings.batch_size % world_size:
            raise DistributedError(f"{name}.batch_size: {settings.batch_size} examples per step do not divide over "
                                   f"{world_size} ranks; use a multiple of {world_size}")


def from_environment(deepspeed_setting, device_type: str) -> Distributed:
    """Join the process group the launcher set up (WORLD_SIZE > 1), or describe a single-process run."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if deepspeed_setting is None and world_size == 1:
        return Distributed()
    config = validate_deepspeed_config(load_deepspeed_config(deepspeed_setting) if deepspeed_setting is not None
                                       else {"zero_optimization": {"stage": 0}})
    import deepspeed

    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    # Ranks wait for each other where their work differs (sampling lengths, rank 0 writing exports): a generous timeout.
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo",
                               timeout=datetime.timedelta(hours=2))
    return Distributed(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                       local_rank=local_rank, deepspeed=config,
                       collective_device=f"cuda:{local_rank}" if device_type == "cuda" else "cpu")


# ------------------------------------------------------------------------------------------------ data sharding

def shard_by_tokens(indices: list[int], tokens: list[int], parts: int) -> list[list[int]]:
    """Split `indices` (with their token counts) into `parts` shards of near-equal tokens: longest first, each onto
    the shard with the fewest tokens so far (ties: the lower shard). Deterministic, so every rank computes the same
    split; each shard keeps the original order of its indices. With at least `parts` indices no shard is empty."""
    order = sorted(range(len(indices)), key=lambda i: (-tokens[i], i))
    loads = [0] * parts
    members: list[list[int]] = [[] for _ in range(parts)]
    for position in order:
        # An empty shard first: with enough indices every rank gets work, whatever the lengths.
        target = min(range(parts), key=lambda p: (bool(members[p]), loads[p], p))
        members[target].append(position)
        loads[target] += tokens[position]
    return [[indices[i] for i in sorted(shard)] for shard in members]


# ------------------------------------------------------------------------------------------------ engines

def deepspeed_config(user: dict, settings, world_size: int, device_type: str) -> dict:
    """The DeepSpeed config of one trained model: the user's, plus what rto_fast owns (see the module docstring)."""
    config = {key: value for key, value in user.items() if key not in _OWNED_KEYS}
    zero = config.setdefault("zero_optimization", {"stage": 0})
    offloaded = (zero.get("offload_optimizer") or {}).get("device", "none") != "none"
    config.update({
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": float(settings.max_grad_norm) if settings.max_grad_norm is not None else 0.0,
        "optimizer": {"type": "AdamW", "params": {
            "lr": settings.lr, "betas": [settings.adam_beta1, settings.adam_beta2],
            "weight_decay": settings.weight_decay,
            # torch's AdamW needs no compiled extension; DeepSpeed's CPU Adam is much faster for offloaded states.
            "torch_adam": not (offloaded and device_type == "cuda")}},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": offloaded and device_type == "cuda",
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    })
    return config


def zero_stage(dist: Distributed) -> int:
    """The ZeRO stage of this launch (0 without DeepSpeed)."""
    if not dist.engine:
        return 0
    return int(dist.deepspeed.get("zero_optimization", {}).get("stage", 0))


def frozen_deepspeed_config(dist: Distributed) -> dict:
    """The DeepSpeed config of a model that is never trained: the user's, without optimizer or its offload."""
    config = {key: value for key, value in dist.deepspeed.items() if key not in _OWNED_KEYS}
    # No optimizer states to offload; offload_param (frozen weights kept in CPU memory) still applies.
    config["zero_optimization"] = {key: value for key, value in config.get("zero_optimization", {}).items()
                                   if key != "offload_optimizer"}
    config.update({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                   "train_batch_size": dist.world_size, "steps_per_print": 2**62, "wall_clock_breakdown": False})
    return config


def frozen_engine(model: torch.nn.Module, dist: Distributed, name: str = "frozen model"):
    """Under ZeRO-3, a model that is never trained (reference, DPO model, reward model) as a DeepSpeed engine with no
    optimizer: its parameters are partitioned over the ranks (each holds 1/world of them) and every forward gathers
    them layer by layer. Forwards are then collective: every rank must run the same number of them, in the same
    order across models (see `Distributed.max`). Other stages: the model itself, whole on every rank."""
    if zero_stage(dist) != 3:
        return model
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model.requires_grad_(False), config=frozen_deepspeed_config(dist))
    engine.eval()  # DeepSpeedEngine.eval returns None
    parameters = list(engine.module.parameters())
    held = sum(parameter.ds_tensor.numel() for parameter in parameters)
    logger.info("%s partitioned over %d ranks (ZeRO-3): %d of its %d parameters on this rank", name, dist.world_size,
                held, sum(parameter.ds_numel for parameter in parameters))
    return engine


@contextlib.contextmanager
def partitioned_loading(dist: Distributed, settings, device_type: str, enabled: bool = True):
    """While a model loads under ZeRO-3: transformers builds it straight into ZeRO-3 partitions (deepspeed.zero.Init
    through HfDeepSpeedConfig), so no rank ever holds the whole model. `settings` are the optimizer settings of a
    model that will be trained, None for a frozen one (see frozen_engine). Off under other stages: the switch is
    transformers-global, so it is on only inside the block."""
    if not enabled or zero_stage(dist) != 3:
        yield False
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    config = (frozen_deepspeed_config(dist) if settings is None
              else deepspeed_config(dist.deepspeed, settings, dist.world_size, device_type))
    switch = HfDeepSpeedConfig(config)
    logger.info("loading a %s model straight into ZeRO-3 partitions (deepspeed.zero.Init)",
                "frozen" if settings is None else "trained")
    try:
        yield True
    finally:
        unset_hf_deepspeed_config()
        del switch


def load_model(load, dist: Distributed, device: torch.device, settings=None, enabled: bool = True):
    """`load()` straight into ZeRO-3 partitions under ZeRO-3 (see partitioned_loading; `settings` None for a frozen
    model), else whole and moved to `device`. `enabled=False` always loads whole (the random tiny model)."""
    with partitioned_loading(dist, settings, device.type, enabled=enabled) as split:
        model = load()
    return model if split else model.to(device)


class EngineTrainer:
    """A trained model under a DeepSpeed engine: what the stage loop needs from it.

    Forward passes call `engine` (ZeRO-3 advances its accumulation counter there; calling the bare model would make
    every micro-batch overwrite the previous one's gradient), then backward(loss, boundary) for each micro-batch
    (boundary=True on a step's last one), then step() -> grad norm. `module` is the bare model, for exports."""

    def __init__(self, model, settings, lr_lambda, dist: Distributed, device_type: str):
        import deepspeed

        self.dist = dist
        config = deepspeed_config(dist.deepspeed, settings, dist.world_size, device_type)
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=parameters, config=config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda))
        self.module = self.engine.module
        self.zero_stage = int(config["zero_optimization"].get("stage", 0))

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)
        # DeepSpeed averages gradients over ranks; the loss is already normalised by the whole step.
        self.engine.backward(loss * self.dist.world_size)

    def step(self) -> float:
        if self.zero_stage == 0:
            # Without ZeRO the engine keeps no norm; the gradients are already averaged over ranks at this point.
            gradients = [p.grad for p in self.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(gradients)) if gradients else 0.0
            self.engine.step()
            return norm
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    @contextlib.contextmanager
    def whole_model(self):
        """The bare model with all parameters whole on this rank and no ZeRO hooks, for passes that ranks run a
        different number of times (sampling, scoring): under ZeRO-3 the parameters are gathered once for the block
        and the per-module gather hooks are taken off, so nothing in it is collective; other stages hold the
        parameters whole anyway. Entering and leaving are collective."""
        if self.zero_stage != 3:
            yield self.module
            return
        import deepspeed

        offload = self.engine.optimizer.parameter_offload
        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            for parameter in self.module.parameters():
                getattr(parameter, "ds_active_sub_modules", set()).clear()
            offload._remove_module_hooks()
            try:
                yield self.module
            finally:
                offload.setup_zero_stage3_hooks()

    @contextlib.contextmanager
    def full_parameters(self):
        """All parameters whole on every rank for the block (ZeRO-3 gathers them; other stages hold them whole)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield
        else:
            yield

    def export(self, folder: Path, tokenizer=None, atomic: bool = False, merge_adapters: bool = True) -> None:
        """The full model as an HF folder (safetensors), written by rank 0 (`atomic`: through a temporary folder and
        one rename); collective (every rank must call it). LoRA adapters are merged, or with `merge_adapters=False`
        saved alone (checkpoints)."""
        def save(target: Path) -> None:
            ckpt.save_model(self.module, target, tokenizer, merge_adapters=merge_adapters)

        with self.full_parameters():
            if self.dist.main:
                if atomic:
                    ckpt.write_atomic_folder(folder, save)
                else:
                    save(folder)

    def save_engine(self, folder: Path) -> None:
        # With LoRA the frozen base weights are the stage's starting model: the engine saves the adapters only.
        self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_DIR, exclude_frozen_parameters=has_adapters(self.module))

    def load_engine(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_DIR, load_optimizer_states=True,
                                              load_lr_scheduler_states=True,
                                              load_module_strict=not has_adapters(self.module))
        if path is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint in {folder / DEEPSPEED_DIR}")


# ------------------------------------------------------------------------------------------------ checkpoints

def save_checkpoint(folder: Path, step: int, trainers: dict[str, EngineTrainer], state: dict, tokenizer,
                    keep_last: int | None, dist: Distributed) -> Path:
    """Collective, atomic checkpoint `step` under `folder` (layout in the module docstring). `trainers` maps a
    subfolder to each trained model ("" for the main one, e.g. "critic" for the RL critic: critic/deepspeed,
    critic/model); the tokenizer goes with the main one."""
    folder = Path(folder)
    target = folder / ckpt.checkpoint_name(step)
    temp = folder / f"{ckpt.TEMP_PREFIX}{target.name}"  # the same name on every rank
    if dist.main:
        folder.mkdir(parents=True, exist_ok=True)
        if temp.exists():
            shutil.rmtree(temp)
        temp.mkdir()
    dist.barrier()
    for name, trainer in trainers.items():
        trainer.save_engine(temp / name)
        trainer.export(temp / name / "model", tokenizer if not name else None, merge_adapters=False)
    torch.save(ckpt.rng_state(), temp / _RNG_FILE.format(rank=dist.rank))
    dist.barrier()
    if dist.main:
        ckpt.finish_atomic_folder(temp, target, {"step": step, **state, "world_size": dist.world_size,
                                                 "deepspeed": True})
        if keep_last is not None:
            ckpt.prune_checkpoints(folder, keep_last)
    dist.barrier()
    return target


def check_resumable(checkpoint: Path, dist: Distributed) -> dict:
    """trainer_state.json of `checkpoint`, or DistributedError when this run cannot resume it: a DeepSpeed
    checkpoint needs DeepSpeed and the world size that wrote it, a plain one a plain single-process run."""
    state = ckpt.read_state(checkpoint)
    if state.get("deepspeed") and not dist.engine:
        raise DistributedError(f"runtime.resume: {checkpoint} was written under DeepSpeed by "
                               f"{state.get('world_size', 1)} ranks; resume it with runtime.deepspeed set and as "
                               "many processes")
    if not state.get("deepspeed") and dist.engine:
        raise DistributedError(f"runtime.resume: {checkpoint} was written without DeepSpeed; resume it with "
                               "runtime.deepspeed unset in one process")
    if dist.engine and state.get("world_size", 1) != dist.world_size:
        raise DistributedError(f"runtime.resume: {checkpoint} was written by {state.get('world_size', 1)} ranks, "
                               f"this run has {dist.world_size}; resume with the same world size")
    return state


def load_checkpoint(checkpoint: Path, trainers: dict[str, EngineTrainer], dist: Distributed) -> dict:
    """Restore each engine (weights, optimizer, schedule; `trainers` as in save_checkpoint) and this rank's RNGs;
    returns trainer_state.json."""
    state = check_resumable(checkpoint, dist)
    for name, trainer in trainers.items():
        trainer.load_engine(Path(checkpoint) / name)
    rng_file = Path(checkpoint) / _RNG_FILE.format(rank=dist.rank)
    if rng_file.is_file():
        ckpt.set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state
