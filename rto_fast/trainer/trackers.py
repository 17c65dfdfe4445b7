"""Experiment trackers that receive every metrics record besides metrics.jsonl (`runtime.report_to`).

Usage:
    check_trackers(["tensorboard", "wandb"])           # before any model loads: a missing package is a UsageError
    trackers = open_trackers(config, run_dir)          # main process only; None when report_to is empty
    trackers.log({"stage": "sft", "step": 3, "loss": 1.2, "lr": 1e-5})
    trackers.close()

Each record's numbers go out as `<stage>/<key>` against the stage's own step: TensorBoard scalars in
`<output_dir>/tensorboard/<stage>` (`global_step` = the record's step; a resumed stage hides the events its
checkpoint does not cover), and a Weights & Biases run whose `<stage>/*` charts
use `<stage>/step` as their x axis. The wandb run's id is kept in `<output_dir>/wandb_run_id`, so a resumed run
continues the same wandb run (`resume="allow"`); `WANDB_MODE=offline` works as wandb documents. The packages are
optional and imported only when asked for.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb")
_PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb")}
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"


class TrackerError(ValueError):
    """A tracker that cannot be used: unknown, or its package is missing."""


def check_trackers(names) -> None:
    """Raise TrackerError naming `runtime.report_to` for an unknown tracker or one whose package is missing."""
    for name in names:
        if name not in TRACKERS:
            raise TrackerError(f"runtime.report_to: unknown tracker {name!r}; expected some of {list(TRACKERS)}")
        module, install = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(f"runtime.report_to: {name} needs the {module} package ({install})")


def _numbers(record: dict) -> dict:
    """The record's finite real numbers (bools, strings, lists and NaN / inf left out)."""
    numbers = {}
    for key, value in record.items():
        if key in ("stage", "step") or isinstance(value, bool):
            continue
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            value = value.item()
        if isinstance(value, (int, float)) and math.isfinite(value):
            numbers[key] = value
    return numbers


class Trackers:
    """The trackers of one run; `log` sends a metrics record to each of them."""

    def __init__(self, names, run_dir: Path, run_name: str, config: dict, wandb_project: str):
        self.names = list(names)
        self._steps: dict[str, int] = {}  # records without a step (evaluation) count per stage
        self._tensorboard_dir = Path(run_dir) / TENSORBOARD_DIR if "tensorboard" in self.names else None
        self._tensorboard: dict[str, object] = {}  # stage -> SummaryWriter
        self._wandb = None
        self._wandb_stages: set[str] = set()
        if "wandb" in self.names:
            import wandb

            id_file = Path(run_dir) / WANDB_ID_FILE
            run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else uuid.uuid4().hex[:8]
            self._wandb = wandb.init(project=wandb_project, name=run_name, id=run_id, resume="allow",
                                     dir=str(run_dir), config=config)
            id_file.write_text(run_id + "\n", encoding="utf-8")
        logger.info("metrics also go to %s", ", ".join(self.names))

    def log(self, record: dict) -> None:
        stage = str(record.get("stage", "run"))
        step = record.get("step")
        if step is None:
            step = self._steps.get(stage, 0) + 1
        self._steps[stage] = int(step)
        numbers = _numbers(record)
        if not numbers:
            return
        if self._tensorboard_dir is not None:
            writer = self._tensorboard_writer(stage, int(step))
            for key, value in numbers.items():
                writer.add_scalar(f"{stage}/{key}", value, global_step=int(step))
            writer.flush()  # a killed run keeps what it logged, as metrics.jsonl does
        if self._wandb is not None:
            if stage not in self._wandb_stages:
                self._wandb.define_metric(f"{stage}/step")
                self._wandb.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
                self._wandb_stages.add(stage)
            self._wandb.log({f"{stage}/step": int(step), **{f"{stage}/{key}": value for key, value in numbers.items()}})

    def _tensorboard_writer(self, stage: str, first_step: int):
        """One writer (and folder) per stage, opened at the stage's first record in this process with that step as
        purge_step: a resumed stage's earlier events from that step on (logged before the kill, past the
        checkpoint) are hidden, as metrics.jsonl drops them."""
        if stage not in self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard[stage] = SummaryWriter(log_dir=str(self._tensorboard_dir / stage),
                                                     purge_step=first_step)
        return self._tensorboard[stage]

    def close(self) -> None:
        for writer in self._tensorboard.values():
            writer.close()
        self._tensorboard = {}
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def open_trackers(config, run_dir: Path) -> Trackers | None:
    """The trackers `config.runtime.report_to` names (None when it names none)."""
    runtime = config.runtime
    if not runtime.report_to:
        return None
    return Trackers(runtime.report_to, Path(run_dir), runtime.run_name or Path(run_dir).resolve().name,
                    config.to_dict(), runtime.wandb_project)
