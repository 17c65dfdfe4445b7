"""Atomic checkpoints: model (safetensors) + optimizer, scheduler, RNG states and data position; keep the last K.

Usage:
    from rto_fast.trainer import checkpoint
    path = checkpoint.save_checkpoint(stage_dir / "checkpoints", step=10, model=model, tokenizer=tokenizer,
                                      optimizer=optimizer, scheduler=scheduler, state={"epoch": 0, ...}, keep_last=2)
    latest = checkpoint.latest_checkpoint(stage_dir / "checkpoints")       # Path or None
    state = checkpoint.load_training_state(latest, optimizer, scheduler)    # restores optimizer/scheduler/RNG
    model = load_causal_lm(str(latest / "model"))                           # the weights: from_pretrained

Layout of one checkpoint `step-00000010/`:
    model/              save_pretrained (safetensors) + tokenizer: loads with from_pretrained; with LoRA
                        (model.lora_rank) the adapters only, in PEFT's format (rto_fast.lora), which load as a
                        model path too (their base with them merged)
    optimizer.pt        optimizer.state_dict()
    scheduler.pt        scheduler.state_dict()
    rng.pt              torch (CPU and CUDA), python `random` and numpy generator states
    trainer_state.json  step, data position (epoch, batch in epoch), tokens seen, ...; written last

Atomicity: everything is written into a hidden temporary folder next to the target, each file and the folder are
fsynced, then one `os.replace` renames the folder to `step-XXXXXXXX` and the parent folder is fsynced. A crash at
any moment leaves either the complete checkpoint or none (only a `.tmp-*` folder, which `latest_checkpoint`
ignores and `clean_temporary` deletes). `write_atomic_folder` gives the same guarantee for the final model folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import lora

STEP_PREFIX = "step-"
TEMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
_STEP_PATTERN = re.compile(rf"^{STEP_PREFIX}(\d+)$")


# ------------------------------------------------------------------------------------------------ atomic folders

def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (folders: so a rename or a new entry survives a power cut)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


def write_atomic_folder(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(temp_folder)`, fsync what it wrote, then rename the folder to `target` in one step.

    An existing `target` is replaced: moved aside first, deleted after the rename (between the two renames the
    target is briefly absent; the trainer only replaces folders it can rebuild from a checkpoint). If `write`
    raises, the temporary folder is removed and `target` is left as it was."""
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    temp = parent / f"{TEMP_PREFIX}{target.name}-{os.getpid()}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    try:
        write(temp)
        _fsync_tree(temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return _replace_folder(temp, target)


def finish_atomic_folder(temp: Path, target: Path, training_state: dict) -> Path:
    """Complete a checkpoint that several processes wrote into `temp`: trainer_state.json last, fsync, rename."""
    (temp / STATE_FILE).write_text(json.dumps(training_state, indent=2) + "\n", encoding="utf-8")
    _fsync_tree(temp)
    return _replace_folder(temp, target)


def _replace_folder(temp: Path, target: Path) -> Path:
    """Rename the complete folder `temp` to `target` (moving an existing target aside first) and fsync the parent."""
    parent = target.parent
    old = None
    if target.exists():
        # os.replace cannot replace a non-empty folder: move the old one aside (also atomic), then delete it.
        old = parent / f"{TEMP_PREFIX}old-{target.name}-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(temp, target)
    _fsync_path(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def clean_temporary(folder: str | os.PathLike) -> list[Path]:
    """Delete leftover `.tmp-*` folders (a crash during a save) under `folder`; returns what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name.startswith(TEMP_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


# ------------------------------------------------------------------------------------------------ RNG states

def rng_state() -> dict:
    """Every RNG the training loop may draw from. numpy's state becomes plain lists so `weights_only` loads it."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached_gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ checkpoints

def checkpoint_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `folder`, oldest first (a folder counts once its trainer_state.json exists)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _STEP_PATTERN.match(entry.name)
        if match and entry.is_dir() and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(folder)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(folder: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints; returns the deleted folders."""
    checkpoints = list_checkpoints(folder)
    doomed = checkpoints[:-keep_last] if keep_last > 0 else checkpoints
    for path in doomed:
        # Rename first so that a crash during the delete leaves a .tmp- folder, never a half-deleted checkpoint.
        trash = path.parent / f"{TEMP_PREFIX}deleted-{path.name}-{os.getpid()}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def save_model(model, folder: Path, tokenizer=None, merge_adapters: bool = True) -> None:
    """save_pretrained (safetensors, the only format transformers 5 writes) plus the tokenizer, so the folder loads
    with from_pretrained on its own. A model with LoRA adapters is saved merged, or with `merge_adapters=False` as
    its adapters only (PEFT's format; what checkpoints hold, see `rto_fast.lora`)."""
    if lora.has_adapters(model):
        (lora.save_merged if merge_adapters else lora.save_adapters)(model, folder)
    else:
        model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _save_trainable(folder: Path, model, optimizer, scheduler, tokenizer) -> None:
    save_model(model, folder / "model", tokenizer, merge_adapters=False)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")


def save_checkpoint(folder: str | os.PathLike, step: int, model, optimizer, scheduler, state: dict,
                    tokenizer=None, keep_last: int | None = None, extra: dict | None = None) -> Path:
    """Write checkpoint `step` atomically under `folder`, then keep only the newest `keep_last` (None: all).

    `extra` maps a name to another (model, optimizer, scheduler) trained alongside (the RL critic); each lands in
    its own subfolder `<name>/` with the same layout (optimizer and scheduler may be None)."""
    folder = Path(folder)
    training_state = {"step": step, **state}

    def write(temp: Path) -> None:
        _save_trainable(temp, model, optimizer, scheduler, tokenizer)
        for name, (extra_model, extra_optimizer, extra_scheduler) in (extra or {}).items():
            _save_trainable(temp / name, extra_model, extra_optimizer, extra_scheduler, None)
        torch.save(rng_state(), temp / "rng.pt")
        # Last: its presence marks a complete checkpoint even if a file system reorders the rename.
        (temp / STATE_FILE).write_text(json.dumps(training_state, indent=2) + "\n", encoding="utf-8")

    path = write_atomic_folder(folder / checkpoint_name(step), write)
    if keep_last is not None:
        prune_checkpoints(folder, keep_last)
    return path


def read_state(checkpoint: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))


def _load_optimizer_state(folder: Path, optimizer, scheduler) -> None:
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))


def load_training_state(checkpoint: str | os.PathLike, optimizer, scheduler, restore_rng: bool = True,
                        extra: dict | None = None) -> dict:
    """Restore optimizer and scheduler (and the RNGs) from `checkpoint`; returns its trainer_state.json.

    `extra` maps a subfolder name to (optimizer, scheduler) saved there by `save_checkpoint(extra=...)`. The model
    weights are loaded separately, with from_pretrained on `checkpoint / "model"` (and `checkpoint / name / "model"`)."""
    checkpoint = Path(checkpoint)
    _load_optimizer_state(checkpoint, optimizer, scheduler)
    for name, (extra_optimizer, extra_scheduler) in (extra or {}).items():
        _load_optimizer_state(checkpoint / name, extra_optimizer, extra_scheduler)
    if restore_rng:
        with contextlib.suppress(FileNotFoundError):
            set_rng_state(torch.load(checkpoint / "rng.pt", map_location="cpu", weights_only=True))
    return read_state(checkpoint)
