"""The one training loop every stage that trains runs: SFT, DPO and the reward model (one optimizer step per loop
step; rto_fast.trainer.supervised) and the RL stages RTO, PPO and DPPO (one iteration per loop step;
rto_fast.trainer.rl). What differs between them is a `StageRun`; everything around it happens here, once:

- resume: a finished stage (its model folder exists) is skipped; an interrupted one continues from its latest
  checkpoint (`runtime.resume` auto), or from the checkpoint `runtime.resume` names; `never` starts over. A
  checkpoint this launch cannot continue (another world size, other LoRA settings) is refused before any model loads;
- seeding (runtime.seed plus the stage's offset), building the stage, restoring the optimizers, schedules, RNGs and
  the stage's own state from the checkpoint, dropping the metrics the interrupted run wrote past it;
- each step under the profiler when asked (`runtime.profile_step`), with its wall time, tokens and peak memory;
- evaluation every `eval_every` steps and at the end (and once more when a resumed run ends without one);
- metrics every `runtime.log_every` steps, the progress bar;
- checkpoints every `runtime.checkpoint_every` steps and at the end, and a clean stop on SIGTERM / Ctrl-C
  (rto_fast.trainer.stopping);
- the stage's final model(s), written atomically.

Usage (the CLI runs a stage like this):
    output_folder = run_stage(SFTStage(context), context)     # run_dir/sft/model
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from . import checkpoint as ckpt
from . import distributed
from .layout import CHECKPOINT_DIR, MODEL_DIR
from .optimization import Optimization, load_checkpoint, save_checkpoint
from .profiling import profiled_step, reset_step_peak, step_peak_mb
from .run import RunContext, seed_everything
from .run_log import ProgressBar
from .stopping import checkpoint_or_stop

logger = logging.getLogger(__name__)

# Added to runtime.seed per stage, so stages draw different (but fixed) random numbers; the RL modes share one: rto,
# ppo and dppo see the same prompts in the same order (a paired comparison).
STAGE_SEED_OFFSET = {"sft": 1000, "pairs": 1500, "dpo": 2000, "rm": 3000, "rto": 4000, "ppo": 4000, "dppo": 4000,
                     "eval": 7000}


class StageRun:
    """What a training stage brings to the loop. The loop calls, in order: `check_resume` (before any model loads,
    when resuming), `build`, `restore` (when resuming), then per step `step`, at the eval cadence `evaluate`, at
    checkpoints `state`, and at the end `export`."""

    name = ""
    unit = "steps"  # what one loop step is, in messages
    total_steps = 0
    parts: dict[str, Optimization] = {}  # what checkpoints hold: "" the main model, others in subfolders
    eval_every = 0
    eval_at_start = False  # also evaluate before the first step (RL: the policy before any update, the baseline)

    def check_resume(self, checkpoint: Path) -> None:
        """Raise (naming the setting) when this run cannot continue `checkpoint`."""

    def build(self, resume_from: Path | None) -> None:
        """Models, optimizers (`parts`), plans; from the checkpoint's weights when resuming."""
        raise NotImplementedError

    def restore(self, saved: dict) -> None:
        """The stage's own state from a checkpoint's trainer_state.json."""

    def state(self, step: int) -> dict:
        """The stage's own state to record in a checkpoint taken after `step` steps."""
        return {}

    def step(self, step: int) -> dict:
        """Run 0-based step `step`; its metrics, with "tokens" (processed) among them."""
        raise NotImplementedError

    def has_eval(self) -> bool:
        return False

    def evaluate(self) -> dict:
        """eval_* metrics of the current model(s)."""
        return {}

    def progress(self, record: dict) -> dict:
        """Fields shown on the progress bar."""
        return {}

    def export(self, stage_dir: Path) -> None:
        """Write the final model(s): the main one to stage_dir/model."""
        raise NotImplementedError


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


def _restore(stage: StageRun, checkpoint: Path, state: dict, context: RunContext) -> int:
    """Optimizers, schedules, RNGs and the stage's state from `checkpoint`; returns its step."""
    saved = load_checkpoint(checkpoint, stage.parts, context.dist)
    state.update({key: saved[key] for key in state if key in saved})
    stage.restore(saved)
    if saved.get("total_steps") not in (None, stage.total_steps):
        logger.warning("%s: the checkpoint was planned for %s %s, this config gives %d", stage.name,
                       saved.get("total_steps"), stage.unit, stage.total_steps)
    return int(saved["step"])


def run_stage(stage: StageRun, context: RunContext) -> Path:
    """Train `stage` (resuming when allowed; see the module docstring); returns its output model folder."""
    name, runtime, dist = stage.name, context.config.runtime, context.dist
    stage_dir = context.run_dir / name
    output_dir = stage_dir / MODEL_DIR
    finished, resume_from = resume_point(name, context)
    if finished:
        return output_dir
    if resume_from is not None:  # before any model loads: a checkpoint this launch cannot continue is an error
        distributed.check_resumable(resume_from, dist)
        stage.check_resume(resume_from)
    seed_everything(runtime.seed + STAGE_SEED_OFFSET[name])
    stage.build(resume_from)
    state = {"stage": name, "tokens_seen": 0, "elapsed_s": 0.0, "evaluated_at": -1}
    step = _restore(stage, resume_from, state, context) if resume_from is not None else 0
    if dist.main:  # records past the checkpoint were written by the interrupted run; this run writes them again
        context.metrics.truncate(name, after_step=step if step else -1)
    if step == 0 and stage.eval_at_start and stage.has_eval():
        _evaluate_at_start(stage, context)

    def save(at_step: int) -> None:
        save_checkpoint(stage_dir / CHECKPOINT_DIR, at_step, stage.parts,
                        {**state, **stage.state(at_step), "total_steps": stage.total_steps}, context.tokenizer,
                        runtime.keep_last, dist)

    bar = ProgressBar(stage.total_steps, initial=step, desc=name, enabled=runtime.progress_bar and dist.main)
    try:
        while step < stage.total_steps:
            record = _one_step(stage, step, state, context, stage_dir)
            step += 1
            bar.update(step, record["tokens"], **stage.progress(record))
            checkpoint_or_stop(step, step == stage.total_steps, runtime.checkpoint_every, save, dist, name)
        if stage.has_eval() and state["evaluated_at"] != step:
            # Resumed from the final checkpoint of a run that had not evaluated yet.
            metrics = stage.evaluate()
            if dist.main:
                context.metrics.write({"stage": name, "step": step, **metrics})
    finally:
        bar.close()
    stage.export(stage_dir)
    dist.barrier()
    logger.info("%s: finished after %d %s; model in %s", name, step, stage.unit, output_dir)
    context.outputs[name] = output_dir
    return output_dir


def _evaluate_at_start(stage: StageRun, context: RunContext) -> None:
    """Evaluate before the first step and log it as step 0 (not counted in the stage's elapsed time)."""
    started = time.perf_counter()
    metrics = stage.evaluate()  # every rank: the evaluation may be collective
    if context.dist.main:
        context.metrics.write({"stage": stage.name, "step": 0, **metrics,
                               "time_eval_s": time.perf_counter() - started})


def _one_step(stage: StageRun, step: int, state: dict, context: RunContext, stage_dir: Path) -> dict:
    """Run, evaluate (at the cadence) and log step `step`; returns its record."""
    runtime, dist = context.config.runtime, context.dist
    started = time.perf_counter()
    reset_step_peak(context.device)
    with profiled_step(step + 1, context, stage_dir):
        metrics = stage.step(step)
    step_time = time.perf_counter() - started
    state["tokens_seen"] += metrics["tokens"]
    state["elapsed_s"] += step_time
    record = {"stage": stage.name, "step": step + 1, **metrics}
    record.setdefault("tokens_per_s", metrics["tokens"] / max(step_time, 1e-9))
    record.update(tokens_seen=state["tokens_seen"], elapsed_s=round(state["elapsed_s"], 3))
    peak = step_peak_mb(context.device)
    if peak is not None:
        record["peak_memory_mb"] = dist.max(int(round(peak)))  # the largest rank's
    last = step + 1 == stage.total_steps
    evaluated = stage.has_eval() and ((stage.eval_every and (step + 1) % stage.eval_every == 0) or last)
    if evaluated:
        started = time.perf_counter()
        record.update(stage.evaluate())
        record["time_eval_s"] = time.perf_counter() - started
        state["evaluated_at"] = step + 1
    if dist.main and ((step + 1) % runtime.log_every == 0 or last or evaluated):
        context.metrics.write(record)
    return record


__all__ = ["run_stage", "resume_point", "StageRun", "STAGE_SEED_OFFSET"]
