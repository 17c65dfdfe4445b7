"""The trainer's command line: run the stages a config lists (SFT, DPO, RM, then RTO / PPO / DPPO, then eval), each
feeding the next.

Usage:
    python -m rto_fast.train --config configs/tiny.yaml                  # SFT, DPO, RTO, eval: tiny model, CPU
    python -m rto_fast.train --config configs/tiny.yaml sft.lr=1e-4 runtime.output_dir=runs/try2
    python -m rto_fast.train --config my.yaml stages=dpo model.sft_path=runs/x/sft/model
    python -m rto_fast.train --help                                              # every option
    torchrun --nproc_per_node 8 -m rto_fast.train --config configs/pythia2.8b_hh_rto.yaml   # DeepSpeed, 8 GPUs

The run folder (`runtime.output_dir`) gets: config.yaml (the resolved config), metrics.jsonl (one JSON object per
logged step), train.log, <stage>/checkpoints/step-XXXXXXXX (atomic, the last `runtime.keep_last` kept),
<stage>/model (the stage's output: save_pretrained safetensors + tokenizer; RL stages also <mode>/critic),
eval/win_rates.{md,json} and eval/samples.jsonl, plots/<stage>.png and summary.md.
`runtime.resume=auto` (the default) skips finished stages and continues an interrupted one from its latest checkpoint.

A bad config, a missing model path, a data set without the needed columns or a resume path that is no checkpoint
stops the run before any model loads, with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

from .config import RL_MODES, TRAINING_STAGES, Config, ConfigError, config_help, load_config, save_config
from .distributed import DistributedError
from .tasks import get_task

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


def _check_stage_inputs(config: Config) -> None:
    """RL stages need models earlier stages (or explicit paths, or an earlier run in this folder) provide."""
    run_dir = Path(config.runtime.output_dir)

    def available(stage: str, explicit: str | None) -> bool:
        return stage in config.stages or explicit is not None or (run_dir / stage / "model").is_dir()

    if "pairs" in config.stages and not available("sft", config.model.sft_path):
        raise UsageError("stage pairs samples from the SFT model: list the sft stage before it or set model.sft_path")
    for mode in (stage for stage in config.stages if stage in RL_MODES):
        dense_oracle = mode == "rto" and config.rl.true_reward == "dense"
        if mode in ("rto", "dppo") and not dense_oracle and not available("dpo", config.model.dpo_path):
            raise UsageError(f"stage {mode} needs the DPO model: list the dpo stage before it or set model.dpo_path")
        uses_rm = (config.rl.reward_model if config.rl.reward_model is not None
                   else mode == "ppo" and config.rl.true_reward != "sparse")
        if uses_rm and not available("rm", config.model.reward_path):
            raise UsageError(f"stage {mode} uses a reward model's score: list the rm stage before it or set "
                             "model.reward_path")


def preflight(config: Config) -> None:
    """Every check that needs no model: model paths, the resume folder, the data source and its columns."""
    from .checkpoint import STATE_FILE
    from .models import TINY, check_model_source

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
    _check_distributed(config)
    training = [stage for stage in config.stages if stage in TRAINING_STAGES]
    if config.data.format == "prompt" and training:
        raise UsageError(f"data.format 'prompt' has no responses; stages {', '.join(training)} need "
                         "'preference' or 'hh-rlhf' data")
    _check_stage_inputs(config)
    from .trackers import TrackerError, check_trackers

    try:
        check_trackers(config.runtime.report_to)
    except TrackerError as error:
        raise UsageError(str(error)) from None
    resume = config.runtime.resume
    if resume not in ("auto", "never") and not (Path(resume) / STATE_FILE).is_file():
        raise UsageError(f"runtime.resume: {resume!r} is not a checkpoint folder (no {STATE_FILE}); "
                         "use auto, never, or a checkpoint folder")
    from . import data

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
    from . import distributed

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if config.runtime.deepspeed is None and world_size == 1:
        return
    try:
        if config.runtime.deepspeed is not None:
            distributed.validate_deepspeed_config(distributed.load_deepspeed_config(config.runtime.deepspeed))
        distributed.check_world({stage: getattr(config, stage) for stage in config.stages
                                 if stage in TRAINING_STAGES}, world_size)
    except distributed.DistributedError as error:
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
    if importlib.util.find_spec("deepspeed") is None:
        raise UsageError("runtime.deepspeed / a multi-process launch needs the deepspeed package "
                         "(pip install deepspeed)")


def _device(name: str, local_rank: int = 0):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.split(":")[0] == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        name = f"cuda:{local_rank}"  # one GPU per process, whatever index the config names
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"runtime.device: {name!r} asked for, but torch sees no CUDA device")
    return device


def _load_examples(config: Config, tokenizer, run_dir: Path):
    """Tokenized training and evaluation examples (prompt_ids, chosen_ids, rejected_ids) from the data layer."""
    from . import data

    try:
        return data.load_preference_splits(config.data, tokenizer, cache_dir=run_dir / "data",
                                           seed=config.runtime.seed)
    except data.DataError as error:
        raise UsageError(str(error)) from None


def prompt_data_config(config: Config):
    """The data settings RL prompts come from: rl.prompts (format 'prompt') when set, else data.* read as prompts
    (a bundled task's prompt split when data.source names one)."""
    import dataclasses

    if config.rl.prompts is not None:
        return dataclasses.replace(config.data, source=config.rl.prompts, format="prompt", data_dir=None)
    if get_task(config.data.source) is not None:
        return dataclasses.replace(config.data, format="prompt")
    return config.data


def _load_prompts(config: Config, tokenizer, run_dir: Path):
    """(train, test) PromptExamples for the RL and eval stages."""
    from . import data

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


# ------------------------------------------------------------------------------------------------ main

def run(config: Config) -> Path:
    """Run every stage of `config`; returns the run folder. Raises UsageError for problems found before any model
    loads."""
    preflight(config)
    from . import distributed

    device = _device(config.runtime.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = distributed.from_environment(config.runtime.deepspeed, device.type)
    run_dir = Path(config.runtime.output_dir)
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    dist.barrier()
    _setup_logging(run_dir, dist.main)

    from transformers.utils import logging as transformers_logging

    from .models import TINY, build_tokenizer

    if device.type == "cpu" and config.model.name_or_path == TINY and "OMP_NUM_THREADS" not in os.environ:
        # The tiny model's matmuls are too small for intra-op threads to pay reliably. Measured, one 2560-token SFT
        # step on 2 cores: idle, 2 threads 0.18 s; with another job on the machine, 1 thread 0.33 s but 2 threads
        # 0.7-2.8 s (OpenMP barriers waiting for a descheduled thread).
        import torch

        torch.set_num_threads(1)
        logger.info("tiny model on CPU: 1 intra-op thread (set OMP_NUM_THREADS to choose)")

    # Our own bar shows progress; transformers' per-save and per-load bars would interleave with it.
    transformers_logging.disable_progress_bar()

    tokenizer_source = config.model.tokenizer or config.model.name_or_path
    try:
        tokenizer = build_tokenizer(tokenizer_source)
    except (OSError, ValueError) as error:
        raise UsageError(f"tokenizer {tokenizer_source!r} cannot be loaded: {' '.join(str(error).split())}") from None
    train_examples, eval_examples = [], []
    if any(stage in TRAINING_STAGES or stage == "pairs" for stage in config.stages):
        with dist.main_first():  # rank 0 fills the data cache, the others read it
            train_examples, eval_examples = _load_examples(config, tokenizer, run_dir)
        if not train_examples:
            raise UsageError(f"data.source {config.data.source!r}: no usable training examples")
    train_prompts, eval_prompts = [], []
    if any(stage in RL_MODES or stage == "eval" for stage in config.stages):
        with dist.main_first():
            train_prompts, eval_prompts = _load_prompts(config, tokenizer, run_dir)

    from .pairs import load_finished_pairs, run_pairs_stage
    from .run_log import METRICS_FILE, MetricsLog, write_plots, write_summary
    from .stages import RunContext, run_stage

    logger.info("run folder %s, device %s, stages %s%s", run_dir, device, ", ".join(config.stages),
                f", {dist.world_size} ranks under DeepSpeed" if dist.engine else "")
    from .trackers import open_trackers

    trackers = open_trackers(config, run_dir) if dist.main else None  # rank 0 logs, as it writes metrics.jsonl
    context = RunContext(config=config, run_dir=run_dir, device=device, tokenizer=tokenizer,
                         train_examples=train_examples, eval_examples=eval_examples,
                         metrics=MetricsLog(run_dir / METRICS_FILE, trackers), train_prompts=train_prompts,
                         eval_prompts=eval_prompts, dist=dist)
    import torch

    from .stopping import StopRequested, StopSignals, stop_requested

    # SIGTERM / Ctrl-C: the running stage finishes its step, saves a checkpoint and raises StopRequested (main); a
    # request that comes during a stage's last step stops the run before the next stage.
    try:
        with StopSignals():
            for name in config.stages:
                signal_number = stop_requested(dist)
                if signal_number:
                    raise StopRequested(signal_number, name, None)
                try:
                    if name in TRAINING_STAGES:
                        if name != "sft" and "pairs" not in context.outputs:
                            load_finished_pairs(context)  # sampled by an earlier run in this folder
                        run_stage(name, context)
                    elif name == "pairs":
                        run_pairs_stage(context)
                    elif name in RL_MODES:
                        from .rl import run_rl_stage

                        run_rl_stage(name, context)
                    else:
                        from .evaluation import run_eval

                        run_eval(context)
                except torch.OutOfMemoryError as error:
                    from .memory_advice import describe

                    raise OutOfMemory(describe(error, name, config)) from error
    finally:
        context.metrics.close()
    if dist.main:
        plots = write_plots(run_dir)
        table = write_summary(run_dir)
        logger.info("plots: %s", ", ".join(str(path) for path in plots) or "none")
        print(table, flush=True)
    dist.barrier()
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.help:
        parser.print_help()
        return 0
    from .optim import NonFiniteGradients
    from .stopping import StopRequested

    try:
        config = load_config(args.config, args.overrides)
        run(config)
    except (ConfigError, UsageError, DistributedError) as error:
        print(f"rto_fast.train: error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except StopRequested as stop:
        print(f"rto_fast.train: {stop}", file=sys.stderr, flush=True)
        return stop.exit_code
    except NonFiniteGradients as error:
        print(f"rto_fast.train: error: {error}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    except OutOfMemory as error:
        logger.error("%s", error.__cause__)  # torch's whole message (allocator numbers) goes to train.log
        print(f"rto_fast.train: error: {error}", file=sys.stderr, flush=True)
        return EXIT_OUT_OF_MEMORY
    return 0


if __name__ == "__main__":
    sys.exit(main())
