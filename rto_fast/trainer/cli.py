"""The trainer's command line: run the stages a config lists (SFT, pairs, DPO, RM, then RTO / PPO / DPPO, then eval),
each feeding the next.

Usage:
    python -m rto_fast.train --config configs/tiny.yaml                  # SFT, pairs, DPO, RTO, eval: credit task, CPU
    python -m rto_fast.train --config configs/tiny.yaml sft.lr=1e-4 runtime.output_dir=runs/try2
    python -m rto_fast.train --config my.yaml stages=dpo model.sft_path=runs/x/sft/model
    python -m rto_fast.train --help                                              # every option
    torchrun --nproc_per_node 8 -m rto_fast.train --config configs/pythia2.8b_hh_rto.yaml   # DeepSpeed, 8 GPUs

The run folder (`runtime.output_dir`) gets: config.yaml (the resolved config), metrics.jsonl (one JSON object per
logged step), train.log, <stage>/checkpoints/step-XXXXXXXX (atomic, the last `runtime.keep_last` kept),
<stage>/model (the stage's output: save_pretrained safetensors + tokenizer; RL stages also <mode>/critic),
pairs/ (the pairs stage's sampled preference pairs), eval/win_rates.{md,json} and eval/samples.jsonl,
plots/<stage>.png, plots/eval.png and summary.md (the answer first: each model's judge score, the win rates, a verdict;
rto_fast.trainer.layout). `runtime.resume=auto` (the default) skips finished
stages and continues an interrupted one from its latest checkpoint.

A bad config, a missing model path, a data set without the needed columns or a resume path that is no checkpoint
stops the run before any model loads, with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from . import data, distributed, trackers
from .checkpoint import STATE_FILE
from .config import RL_MODES, TRAINING_STAGES, Config, ConfigError, validate
from .config_file import config_help, load_config, save_config
from .distributed import DistributedError
from .evaluation import run_eval
from .extras import deepspeed_available
from .loop import run_stage
from .memory_advice import describe
from .models import TINY, build_tokenizer, check_model_source
from .optim import NonFiniteGradients
from .pairs import load_finished_pairs, run_pairs_stage
from .pipeline import PipelineError, Wiring, prompt_data_config
from .rl import RLStage
from .run import RunContext
from .run_log import METRICS_FILE, SUMMARY_FILE, MetricsLog, write_plots, write_summary
from .stopping import StopRequested, StopSignals, stop_requested
from .supervised import STAGE_CLASSES

logger = logging.getLogger("rto_fast.train")
EXIT_USAGE = 2
EXIT_NONFINITE = 3  # runtime.max_nonfinite_steps optimizer steps in a row had a NaN / inf gradient norm
EXIT_OUT_OF_MEMORY = 4


class OutOfMemory(Exception):
    """The device ran out of memory in a stage; the message names the phase and the settings that shrink it."""


class UsageError(Exception):
    """A problem with what the user asked for, found before any model loads: reported in one line, exit 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rto_fast.train", add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the rto_fast training stages a YAML config lists.",
        epilog=config_help())
    parser.add_argument("--config", help="YAML config file (sets what differs from the defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. sft.lr=1e-4")
    parser.add_argument("-h", "--help", action="store_true", help="show this help (every option) and exit")
    # The DeepSpeed launcher passes --local_rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------------------------------------ preflight

def _model_paths(config: Config) -> list[tuple[str, str]]:
    """(key, path) of every model path the config sets; all must exist whether or not this run reads them."""
    model = config.model
    paths = [("model.name_or_path", model.name_or_path)]
    for key in ("tokenizer", "sft_path", "dpo_path", "ref_path", "reward_path", "critic_path"):
        value = getattr(model, key)
        if value is not None:
            paths.append((f"model.{key}", value))
    return paths


def _check_model_paths(config: Config) -> None:
    for key, path in _model_paths(config):
        if key == "model.tokenizer":
            # A tokenizer folder has no config.json; only a local-looking path that does not exist is an error.
            if path != TINY and not Path(path).expanduser().exists() and \
                    (path.startswith((".", "/", "~")) or path.count("/") > 1):
                raise UsageError(f"{key}: tokenizer path {path!r} does not exist")
            continue
        try:
            check_model_source(path)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(f"{key}: {error}") from None


def preflight(config: Config) -> None:
    """Every check that needs no model: model paths, the stages' inputs, the resume folder, the data source and its
    columns."""
    _check_model_paths(config)
    _check_distributed(config)
    training = [stage for stage in config.stages if stage in TRAINING_STAGES]
    if config.data.format == "prompt" and training:
        raise UsageError(f"data.format 'prompt' has no responses; stages {', '.join(training)} need "
                         "'preference' or 'hh-rlhf' data")
    try:
        Wiring(config, Path(config.runtime.output_dir), planned=True).check()
        trackers.check_trackers(config.runtime.report_to)
    except (PipelineError, trackers.TrackerError) as error:
        raise UsageError(str(error)) from None
    resume = config.runtime.resume
    if resume not in ("auto", "never") and not (Path(resume) / STATE_FILE).is_file():
        raise UsageError(f"runtime.resume: {resume!r} is not a checkpoint folder (no {STATE_FILE}); "
                         "use auto, never, or a checkpoint folder")
    try:
        data.validate_dataset_source(config.data)
    except data.DataError as error:
        raise UsageError(str(error)) from None
    if config.rl.prompts is not None and any(stage in RL_MODES or stage == "eval" for stage in config.stages):
        try:
            data.validate_dataset_source(prompt_data_config(config))
        except data.DataError as error:
            raise UsageError(f"rl.prompts: {error}") from None


def _check_distributed(config: Config) -> None:
    """A DeepSpeed config that cannot work, or a multi-process launch of what runs in one process only."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if config.runtime.deepspeed is None and world_size == 1:
        return
    try:
        if config.runtime.deepspeed is not None:
            distributed.validate_deepspeed_config(distributed.load_deepspeed_config(config.runtime.deepspeed))
        distributed.check_world({stage: getattr(config, stage) for stage in config.stages
                                 if stage in TRAINING_STAGES}, world_size)
    except DistributedError as error:
        raise UsageError(str(error)) from None
    if any(stage in RL_MODES for stage in config.stages):
        rl = config.rl
        if rl.critic_optimizer == "shared":
            raise UsageError("rl.critic_optimizer: 'shared' (one optimizer over policy and critic) does not exist "
                             "under DeepSpeed, where each model has its own engine; use 'separate'")
        responses = rl.rollout_batch_size * rl.samples_per_prompt
        if responses % world_size:
            raise UsageError(f"rl.rollout_batch_size: {rl.rollout_batch_size} prompts x {rl.samples_per_prompt} "
                             f"samples do not divide over {world_size} ranks")
    if not deepspeed_available():
        raise UsageError("runtime.deepspeed / a multi-process launch needs the deepspeed package "
                         "(pip install deepspeed)")


# ------------------------------------------------------------------------------------------------ the run's inputs

def device_for(name: str, local_rank: int = 0) -> torch.device:
    """The torch device runtime.device names (auto: cuda when there is one); one GPU per process when launched
    several times."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.split(":")[0] == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        name = f"cuda:{local_rank}"  # one GPU per process, whatever index the config names
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"runtime.device: {name!r} asked for, but torch sees no CUDA device")
    return device


def load_examples(config: Config, tokenizer, run_dir: Path):
    """Tokenized training and evaluation examples (prompt_ids, chosen_ids, rejected_ids) from the data layer."""
    try:
        return data.load_preference_splits(config.data, tokenizer, cache_dir=run_dir / "data",
                                           seed=config.runtime.seed)
    except data.DataError as error:
        raise UsageError(str(error)) from None


def load_prompts(config: Config, tokenizer, run_dir: Path):
    """(train, test) PromptExamples for the RL and eval stages."""
    try:
        train, test = data.load_prompt_splits(prompt_data_config(config), tokenizer, cache_dir=run_dir / "data",
                                              seed=config.runtime.seed)
    except data.DataError as error:
        raise UsageError(str(error)) from None
    if any(stage in RL_MODES for stage in config.stages) and not train:
        raise UsageError("no usable RL prompts (rl.prompts / data.source)")
    return train, test


def _setup_logging(run_dir: Path, main: bool = True) -> None:
    package_logger = logging.getLogger("rto_fast")
    package_logger.setLevel(logging.INFO)
    formatter = logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S")
    for handler in list(package_logger.handlers):
        if getattr(handler, "_rto_fast_run", False):
            package_logger.removeHandler(handler)
            handler.close()
    if not main:  # other ranks: warnings and errors on stderr only; rank 0 writes the log
        package_logger.setLevel(logging.WARNING)
    handlers = [logging.StreamHandler(sys.stderr)]
    if main:
        handlers.append(logging.FileHandler(run_dir / "train.log", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._rto_fast_run = True
        package_logger.addHandler(handler)
    package_logger.propagate = False


class _NoAcceleratorNotice(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU" warning: transformers imports deepspeed (when installed) on every
    save_pretrained, even in a run that does not use it, and the warning would land inside the progress bar."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


def _quiet_unused_deepspeed(dist) -> None:
    if dist.engine:
        return
    # A filter, not a level: deepspeed sets its logger's level when it is imported, after this.
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(item, _NoAcceleratorNotice) for item in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_NoAcceleratorNotice())


def _context(config: Config) -> RunContext:
    """The run folder, logging, device, process group, tokenizer and data: everything the stages share."""
    device = device_for(config.runtime.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = distributed.from_environment(config.runtime.deepspeed, device.type)
    run_dir = Path(config.runtime.output_dir)
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    dist.barrier()
    _setup_logging(run_dir, dist.main)
    _quiet_unused_deepspeed(dist)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # torch defaults to the physical cores, which is 1 on a 2-vCPU machine: use every core this process may run on.
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(threads)
        logger.info("CPU: %d intra-op thread%s, the cores available (set OMP_NUM_THREADS to choose)", threads,
                    "" if threads == 1 else "s")
    # Our own bar shows progress; transformers' per-save and per-load bars would interleave with it.
    transformers_logging.disable_progress_bar()
    tokenizer_source = config.model.tokenizer or config.model.name_or_path
    try:
        tokenizer = build_tokenizer(tokenizer_source)
    except (OSError, ValueError) as error:
        raise UsageError(f"tokenizer {tokenizer_source!r} cannot be loaded: {' '.join(str(error).split())}") from None
    train_examples, eval_examples, train_prompts, eval_prompts = [], [], [], []
    if any(stage in TRAINING_STAGES or stage == "pairs" for stage in config.stages):
        with dist.main_first():  # rank 0 fills the data cache, the others read it
            train_examples, eval_examples = load_examples(config, tokenizer, run_dir)
        if not train_examples:
            raise UsageError(f"data.source {config.data.source!r}: no usable training examples")
    if any(stage in RL_MODES or stage == "eval" for stage in config.stages):
        with dist.main_first():
            train_prompts, eval_prompts = load_prompts(config, tokenizer, run_dir)
    logger.info("run folder %s, device %s, stages %s%s", run_dir, device, ", ".join(config.stages),
                f", {dist.world_size} ranks under DeepSpeed" if dist.engine else "")
    opened = trackers.open_trackers(config, run_dir) if dist.main else None  # rank 0 logs, as it writes metrics.jsonl
    return RunContext(config=config, run_dir=run_dir, device=device, tokenizer=tokenizer,
                      train_examples=train_examples, eval_examples=eval_examples,
                      metrics=MetricsLog(run_dir / METRICS_FILE, opened), train_prompts=train_prompts,
                      eval_prompts=eval_prompts, dist=dist)


# ------------------------------------------------------------------------------------------------ main

def run_one(name: str, context: RunContext) -> None:
    """Run stage `name` of the pipeline."""
    if name in TRAINING_STAGES:
        if name != "sft" and "pairs" not in context.outputs:
            load_finished_pairs(context)  # sampled by an earlier run in this folder
        run_stage(STAGE_CLASSES[name](context), context)
    elif name == "pairs":
        run_pairs_stage(context)
    elif name in RL_MODES:
        run_stage(RLStage(name, context), context)
    else:
        run_eval(context)


def run(config: Config) -> Path:
    """Run every stage of `config`; returns the run folder. Raises UsageError for problems found before any model
    loads."""
    preflight(config)
    context = _context(config)
    dist = context.dist
    # SIGTERM / Ctrl-C: the running stage finishes its step, saves a checkpoint and raises StopRequested (main); a
    # request that comes during a stage's last step stops the run before the next stage.
    try:
        with StopSignals():
            for name in config.stages:
                signal_number = stop_requested(dist)
                if signal_number:
                    raise StopRequested(signal_number, name, None)
                try:
                    run_one(name, context)
                except torch.OutOfMemoryError as error:
                    raise OutOfMemory(describe(error, name, config)) from error
    finally:
        context.metrics.close()
    if dist.main:
        plots = write_plots(context.run_dir)
        summary = write_summary(context.run_dir, plots)
        logger.info("plots: %s", ", ".join(str(path) for path in plots) or "none")
        # The run ends with its answer (scores, win rates, verdict), also in summary.md.
        print(f"\n{summary}", flush=True)
        logger.info("summary: %s", context.run_dir / SUMMARY_FILE)
    dist.barrier()
    return context.run_dir


def _run_log_handlers() -> list[logging.FileHandler]:
    """The train.log handler of this process's run (rank 0, once the run folder is set up), else none."""
    return [handler for handler in logging.getLogger("rto_fast").handlers
            if getattr(handler, "_rto_fast_run", False) and isinstance(handler, logging.FileHandler)]


def _log_exit(config: Config | None, message: str, error: BaseException | None = None) -> None:
    """Write why the run ended (and, with `error`, its traceback) to train.log, which otherwise stops at the last info
    line; the terminal gets the message (or Python's traceback) on its own. Before the run folder is set up, the
    line is appended to the train.log of an existing run folder (a resumed run's); a fresh run's stays unwritten."""
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, (),
                               (type(error), error, error.__traceback__) if error is not None else None)
    handlers = _run_log_handlers()
    for handler in handlers:
        handler.handle(record)
    if handlers or config is None or int(os.environ.get("RANK", "0")) != 0:
        return
    log_path = Path(config.runtime.output_dir) / "train.log"
    if log_path.parent.is_dir():
        with open(log_path, "a", encoding="utf-8") as handle:
            handle.write(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S").format(record) + "\n")


def _fail(config: Config | None, message: str, code: int) -> int:
    print(f"rto_fast.train: {message}", file=sys.stderr, flush=True)
    _log_exit(config, f"exit code {code}: {message}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.help:
        parser.print_help()
        return 0
    config = None
    try:
        # Values checked apart: when one is bad, the run folder it names is known (its train.log gets the reason).
        config = load_config(args.config, args.overrides, checked=False)
        run(validate(config))
    except (ConfigError, UsageError, DistributedError) as error:
        return _fail(config, f"error: {error}", EXIT_USAGE)
    except StopRequested as stop:
        return _fail(config, str(stop), stop.exit_code)
    except NonFiniteGradients as error:
        return _fail(config, f"error: {error}", EXIT_NONFINITE)
    except OutOfMemory as error:
        logger.error("%s", error.__cause__)  # torch's whole message (allocator numbers) goes to train.log
        return _fail(config, f"error: {error}", EXIT_OUT_OF_MEMORY)
    except SystemExit:
        raise
    except BaseException as error:  # a crash, or Ctrl-C pressed twice: the traceback reaches train.log too
        reason = "stopped by a second Ctrl-C (KeyboardInterrupt)" if isinstance(error, KeyboardInterrupt) else \
            f"crashed: {type(error).__name__}: {error}"
        _log_exit(config, reason, error)
        raise  # Python prints the traceback on the terminal and sets the exit code
    finally:
        # This run's train.log is closed: a later run in the same process (tests, notebooks) never writes to it.
        for handler in _run_log_handlers():
            logging.getLogger("rto_fast").removeHandler(handler)
            handler.close()
    return 0


__all__ = ["main", "run", "run_one", "preflight", "device_for", "load_examples", "load_prompts", "UsageError",
           "EXIT_USAGE", "EXIT_NONFINITE", "EXIT_OUT_OF_MEMORY"]
