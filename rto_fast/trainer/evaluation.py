"""The eval stage: win rates between models on the same test prompts (the paper's Table 1 protocol, docs/math.md
section 8), and the judges the RL stages reuse to score their samples.

Usage (the CLI runs the stage when a config lists `eval`):
    eval_dir = run_eval(context)        # run_dir/eval: win_rates.json, win_rates.md, samples.jsonl

    judges = load_judges(context)       # reward model, DPO model and reference that exist, frozen
    scores = score_rollouts(judges, prompts, rollouts, tokenizer, micro_batch_tokens=8192)
    scores["rm"], scores["dpo"], scores["truth"], scores["length"], scores["finished"]   # (len(rollouts),) float64
    rates = win_rate_matrix([scores_a, scores_b])      # rates[0, 1]: A's win rate against B

Protocol. Every model listed in `eval.models` (stage names sft / dpo / rto / ppo / dppo of this run, or model
folders; null: the stages of the config that train one) samples one response to each of the first
`eval.num_prompts` test prompts (temperature 0.9, top-p 0.99 by default). Sampling restarts from the same seed
(`eval.seed`) for every model, so two models draw the same random numbers (common random numbers): identical models
give identical responses (a tie on every prompt), and similar models mostly differ where their distributions do,
which lowers the variance of a win rate. A judge scores each response:
- `rm`: the reward model's output at the response's last token (its eos when it has one);
- `dpo`: the DPO implicit reward at RTO's scale, beta1 * sum_h log(pi_dpo(y_h | x, y_<h) / pi_ref(y_h | x, y_<h))
  (beta1 = `rl.dpo_coef`, as the RL stages log it);
- `truth`: a bundled task's true reward r* (only when the prompts are the task's; `rto_fast.tasks`);
- `auto`: rm when a reward model exists, else dpo when the DPO model and its reference exist, else truth.
The win rate of A against B is the mean over prompts of [s_A > s_B] + 0.5 [s_A == s_B], so W[A, B] + W[B, A] = 1.
Every judge that exists scores every response, so the per-model table also shows the other judges' means.

Data parallel (several processes): each rank samples and scores its slice of the prompts (the same seed for every
model on a rank, eval.seed + rank: common random numbers still hold per prompt), the slices are gathered, and rank 0
writes the outputs. With greedy sampling (eval.temperature 0) the result equals the one-process one. Under ZeRO-3
the judges are partitioned over the ranks (optimizer-less DeepSpeed engines, loaded straight into partitions), so
every rank runs every judge pass; the sampled models stay whole on each rank, as generation needs.

Models are loaded one at a time (frozen), next to the judges, and freed before the next one. The stage's outputs
are written atomically; win_rates.json is written last and marks the stage finished: a rerun with the same models
(folders), judge and sampling settings skips it unless `runtime.resume` is `never`, and one whose models changed
(say an RL stage finished since) evaluates again.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..tasks import Task, prompt_task, true_rewards
from . import distributed
from .config import RL_MODES
from .generation import Rollout, SamplingSettings, generate
from .layout import EVAL_DIR, WIN_RATES_JSON
from .models import TINY, ValueHeadModel, check_model_source, load_causal_lm
from .packing import build_micro_batches
from .pipeline import Wiring
from .run import RunContext, autocast, rank_share
from .scoring import response_sequence, sequence_judge_scores

logger = logging.getLogger(__name__)

WIN_RATES_MD = "win_rates.md"
SAMPLES_FILE = "samples.jsonl"
JUDGES = ("rm", "dpo", "truth")
# Stage names eval.models may use: the stages whose output is a causal LM.
MODEL_STAGES = ("sft", "dpo", *RL_MODES)
# How each score key is named in the per-model table and in metrics.jsonl.
JUDGE_TITLES = {"rm": "RM score", "dpo": "DPO reward", "truth": "true reward"}
METRIC_NAMES = {"rm": "rm_score", "dpo": "dpo_reward", "truth": "true_reward", "length": "length",
                "finished": "eos_fraction"}


# ------------------------------------------------------------------------------------------------ judges

@dataclass
class Judges:
    """The models that score responses; any may be missing. `dpo_coef` (beta1) scales the DPO implicit reward; `task`: the
    bundled task whose prompts these are, so its true reward r* is known; `fused_output_layer`: the DPO reward's
    log-probs come from the output layer's input (`model.fused_output_layer`)."""

    reward_model: ValueHeadModel | None = None
    dpo_model: torch.nn.Module | None = None
    ref_model: torch.nn.Module | None = None
    dpo_coef: float = 0.1
    task: Task | None = None
    fused_output_layer: bool = False

    def available(self) -> list[str]:
        """Judge names that can score: a subset of ('rm', 'dpo', 'truth'), in that order."""
        names = []
        if self.reward_model is not None:
            names.append("rm")
        if self.dpo_model is not None and self.ref_model is not None:
            names.append("dpo")
        if self.task is not None:
            names.append("truth")
        return names

    def device(self) -> torch.device:
        for model in (self.reward_model, self.dpo_model, self.ref_model):
            if model is not None:
                return next(model.parameters()).device
        return torch.device("cpu")


def judge_paths(context: RunContext) -> dict[str, Path | None]:
    """Where the judge models would come from: reward model, DPO model and its reference (None: there is none).
    The reference is `model.ref_path`, else the SFT model, the one DPO trained against."""
    wiring = Wiring.of(context)
    return {"rm": wiring.output("rm"), "dpo": wiring.output("dpo"), "ref": wiring.judge_reference()}


def choose_judge(requested: str, paths: dict[str, Path | None], known_reward: bool) -> str:
    """The judge `eval.judge` names, checked to be available; `auto` picks rm, else dpo, else true."""
    has = {"rm": paths["rm"] is not None, "dpo": paths["dpo"] is not None and paths["ref"] is not None,
           "truth": known_reward}
    if requested == "auto":
        for name in JUDGES:
            if has[name]:
                return name
        raise ValueError("eval.judge: auto found no judge: there is no reward model (rm stage or model.reward_path), "
                         "no DPO model with its reference (dpo stage or model.dpo_path, and the sft stage or "
                         "model.ref_path), and the data is no bundled task with a known reward")
    if requested not in has:
        raise ValueError(f"eval.judge: unknown judge {requested!r}; use one of auto, {', '.join(JUDGES)}")
    if not has[requested]:
        reasons = {
            "rm": "there is no reward model: list the rm stage or set model.reward_path",
            "dpo": ("there is no DPO model: list the dpo stage or set model.dpo_path" if paths["dpo"] is None else
                    "there is no reference model for the DPO reward: list the sft stage or set model.ref_path"),
            "truth": "the true reward is known only for a bundled task (data.source synthetic or credit, rl.prompts "
                     "null)",
        }
        raise ValueError(f"eval.judge: {requested}, but {reasons[requested]}")
    return requested


def load_judges(context: RunContext) -> Judges:
    """The judges that exist, frozen, in eval mode, on context.device: the reward model, and the DPO model with its
    reference (the reference only when a DPO model exists)."""
    config = context.config
    paths = judge_paths(context)
    dtype = config.model.dtype
    dist = context.dist

    def load(path, loader, name):
        # Under ZeRO-3 straight into partitions and into an optimizer-less engine (forwards are then collective).
        model = distributed.load_model(lambda: loader(str(path), dtype=dtype, trainable=False), dist, context.device,
                                       enabled=str(path) != TINY)
        return distributed.frozen_engine(model, dist, name)

    reward_model = dpo_model = ref_model = None
    if paths["rm"] is not None:
        reward_model = load(paths["rm"], ValueHeadModel.from_pretrained, "reward model")
    if paths["dpo"] is not None:
        if paths["ref"] is None:
            logger.warning("eval: a DPO model but no reference (sft stage or model.ref_path): no DPO reward")
        else:
            dpo_model = load(paths["dpo"], load_causal_lm, "DPO model")
            ref_model = load(paths["ref"], load_causal_lm, "reference")
    judges = Judges(reward_model=reward_model, dpo_model=dpo_model, ref_model=ref_model, dpo_coef=config.rl.dpo_coef,
                    task=prompt_task(config), fused_output_layer=config.model.fused_output_layer)
    logger.info("eval: judges %s (reward model %s, DPO model %s, reference %s)",
                ", ".join(judges.available()) or "none", paths["rm"], paths["dpo"], paths["ref"])
    return judges


def response_text(rollout: Rollout, tokenizer) -> str:
    """The response as text, without its eos token."""
    tokens = rollout.response_ids[:-1] if rollout.finished else rollout.response_ids
    return tokenizer.decode(tokens, skip_special_tokens=True)


def score_rollouts(judges: Judges, prompts: list, rollouts: list[Rollout], tokenizer,
                   micro_batch_tokens: int, dist=None) -> dict[str, np.ndarray]:
    """Per response (float64 arrays in the order of `rollouts`): 'rm' (reward model at the last token), 'dpo'
    (implicit DPO reward), 'truth' (a bundled task's r*), each when that judge exists, plus 'length' (response tokens, eos
    included) and 'finished' (1.0 when the response ends with eos). `prompts[i]` (a PromptExample) is the prompt
    of `rollouts[i]`; its text is what r* reads. `dist` (judges partitioned under ZeRO-3, whose forwards are
    collective): every rank runs as many micro-batches, a repeat of the last one where it has fewer (the repeat
    writes the same scores again), or of a two-token placeholder where it has none."""
    if len(prompts) != len(rollouts):
        raise ValueError(f"{len(prompts)} prompts but {len(rollouts)} rollouts")
    count = len(rollouts)
    scores: dict[str, np.ndarray] = {}
    available = judges.available()
    model_judges = [name for name in ("rm", "dpo") if name in available]
    if model_judges and (count or dist is not None):
        sequences = ([response_sequence(rollout.prompt_ids, rollout.response_ids) for rollout in rollouts]
                     or [response_sequence([0], [0])])  # nothing to judge here, but the passes are collective
        device = judges.device()
        batches = [batch.to(device) for batch in build_micro_batches(sequences, micro_batch_tokens)]
        if dist is not None:
            batches += batches[-1:] * (dist.max(len(batches)) - len(batches))
        with torch.inference_mode():
            if "rm" in model_judges:
                values = sequence_judge_scores(batches, reward_model=judges.reward_model,
                                               num_sequences=len(sequences))
                scores["rm"] = values[:count].double().numpy()
            if "dpo" in model_judges:
                values = sequence_judge_scores(batches, dpo_model=judges.dpo_model, ref_model=judges.ref_model,
                                               dpo_coef=judges.dpo_coef, num_sequences=len(sequences),
                                               fused_output_layer=judges.fused_output_layer)
                scores["dpo"] = values[:count].double().numpy()
    if judges.task is not None:
        scores["truth"] = true_rewards(judges.task, prompts, rollouts, tokenizer)
    scores["length"] = np.asarray([len(rollout.response_ids) for rollout in rollouts], dtype=np.float64)
    scores["finished"] = np.asarray([float(rollout.finished) for rollout in rollouts], dtype=np.float64)
    return scores


# ------------------------------------------------------------------------------------------------ win rates

def win_rate_matrix(scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(rates, stderr), both (M, M): rates[a, b] = mean over prompts of [s_a > s_b] + 0.5 [s_a == s_b] for the
    per-prompt judge scores of M models, and the standard error of that mean. The diagonal is 0.5 (all ties)."""
    count = len(scores)
    rates = np.full((count, count), 0.5)
    stderr = np.zeros((count, count))
    for a in range(count):
        for b in range(count):
            if a == b:
                continue
            outcome = (scores[a] > scores[b]).astype(np.float64) + 0.5 * (scores[a] == scores[b])
            rates[a, b] = outcome.mean()
            stderr[a, b] = outcome.std() / np.sqrt(max(len(outcome), 1))
    return rates, stderr


def _percent(value: float) -> str:
    return f"{100.0 * value:.1f}"


def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def markdown_tables(names: list[str], rates: np.ndarray, means: dict[str, dict[str, float]], judge: str,
                    num_prompts: int) -> str:
    """The win-rate table (row model against column model, %) and the per-model table of means."""
    lines = [f"Win rate (%) of the row model against the column model; judge {judge}, {num_prompts} prompts.", "",
             "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a, name in enumerate(names):
        cells = ["-" if a == b else _percent(rates[a, b]) for b in range(len(names))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    columns = [("judge", f"mean judge score ({judge})")]
    columns += [(key, f"mean {JUDGE_TITLES[key]}") for key in JUDGES
                if key != judge and any(key in model_means for model_means in means.values())]
    columns += [("length", "mean length"), ("finished", "eos fraction")]
    lines += ["", "| model | " + " | ".join(title for _, title in columns) + " |", "|---|" + "---|" * len(columns)]
    for name in names:
        cells = [_number(means[name].get(judge if key == "judge" else key)) for key, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the stage

def _write_atomic(path: Path, text: str) -> None:
    """Write a temporary file next to `path`, then rename it: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def model_entries(config) -> list[str]:
    """eval.models, or when it is null the stages of this config that train a language model (with none listed,
    every such stage: those without output in the run folder are skipped)."""
    if config.eval.models is not None:
        return list(config.eval.models)
    return [stage for stage in config.stages if stage in MODEL_STAGES] or list(MODEL_STAGES)


def resolve_models(context: RunContext) -> list[tuple[str, Path | str]]:
    """(name, model folder) per entry of eval.models: stage names through their stage's output (skipped with a
    warning when that stage produced nothing), `name=folder` as that folder under that name, anything else as a model
    folder or Hub name (named by itself)."""
    resolved = []
    for entry in model_entries(context.config):
        name, separator, folder = entry.partition("=")
        if separator:
            if not name or not folder:
                raise ValueError(f"eval.models: {entry!r}: write name=folder")
            try:
                check_model_source(folder)
            except FileNotFoundError as error:
                raise ValueError(f"eval.models: {name}: {error}") from None
            resolved.append((name, folder))
        elif name in MODEL_STAGES:
            path = Wiring.of(context).output(name)
            if path is None:
                if context.config.eval.models is not None:  # listed on purpose (preflight stops a fresh run sooner)
                    logger.warning("eval: skipping %s: the %s stage has no output in %s (and no model.* path)",
                                   name, name, context.run_dir)
                continue
            resolved.append((name, path))
        elif name in ("rm", "eval"):
            raise ValueError(f"eval.models: {name!r} is not a language model; use stage names "
                             f"{', '.join(MODEL_STAGES)} or model folders")
        else:
            try:
                check_model_source(name)
            except FileNotFoundError as error:
                raise ValueError(f"eval.models: {error}") from None
            resolved.append((name, name))
    if not resolved:
        raise ValueError(f"eval.models: none of {model_entries(context.config)} has a model (no listed stage has run "
                         "in this run folder, and no folder is listed)")
    return resolved


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _finished_result(path: Path, plan: dict) -> bool:
    """Whether `path` holds the win rates of this very plan (models, their folders, judge, sampling settings)."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(result.get(key) == value for key, value in plan.items())


def run_eval(context: RunContext) -> Path:
    """The eval stage (see the module docstring); returns run_dir/eval."""
    eval_dir = context.run_dir / EVAL_DIR
    models, prompts, judge, sampling, plan = _plan(context)  # everything that can be wrong, before any model loads
    finished_file = eval_dir / WIN_RATES_JSON
    if finished_file.is_file() and context.config.runtime.resume != "never":
        if _finished_result(finished_file, plan):
            logger.info("eval: %s already holds the win rates; skipping the stage", finished_file)
            return eval_dir
        # E.g. an RL stage finished since: the old table lacks a model.
        logger.info("eval: %s holds win rates of other models or settings; evaluating again", finished_file)
    logger.info("eval: %d models (%s) on %d test prompts, judge %s", len(models), ", ".join(plan["models"]),
                len(prompts), judge)
    started = time.perf_counter()
    scores, samples = _sample_and_judge(context, models, prompts, judge, sampling)
    if context.dist.main:
        _write_results(context, eval_dir, plan, scores, samples, time.perf_counter() - started)
    return eval_dir


def _plan(context: RunContext) -> tuple[list, list, str, SamplingSettings, dict]:
    """(models, prompts, judge, sampling settings, the plan win_rates.json records); ValueError for what cannot work."""
    config, settings = context.config, context.config.eval
    models = resolve_models(context)
    prompts = context.eval_prompts[:settings.num_prompts]
    if not prompts:
        raise ValueError("eval: no test prompts: data.test_split names no usable split (or data.max_eval_samples "
                         "is 0)")
    judge = choose_judge(settings.judge, judge_paths(context), prompt_task(config) is not None)
    sampling = SamplingSettings(max_new_tokens=settings.max_new_tokens or config.data.max_response_length,
                                temperature=settings.temperature, top_p=settings.top_p,
                                batch_size=settings.batch_size, engine=settings.generation_engine,
                                cuda_graph=settings.generation_cuda_graph)
    longest = max(len(prompt.prompt_ids) for prompt in prompts) + sampling.max_new_tokens
    if longest > settings.micro_batch_tokens:
        raise ValueError(f"eval.micro_batch_tokens={settings.micro_batch_tokens} is below the longest prompt + "
                         f"max new tokens = {longest}: the longest response would not fit a scoring micro-batch")
    plan = {"models": [name for name, _ in models], "paths": {name: str(path) for name, path in models},
            "judge": judge,
            "settings": {"num_prompts": len(prompts), "temperature": sampling.temperature, "top_p": sampling.top_p,
                         "max_new_tokens": sampling.max_new_tokens, "seed": settings.seed,
                         "batch_size": sampling.batch_size, "dpo_coef": config.rl.dpo_coef}}
    return models, prompts, judge, sampling, plan


def _sample_and_judge(context: RunContext, models: list, prompts: list, judge: str,
                      sampling: SamplingSettings) -> tuple[dict, list]:
    """Every model samples this rank's slice of the prompts, every judge scores them; (scores per model, the
    samples), gathered over the ranks."""
    config, dist, tokenizer = context.config, context.dist, context.tokenizer
    judges = load_judges(context)
    collective = distributed.zero_stage(dist) == 3  # partitioned judges: every rank runs every judge pass
    scores: dict[str, dict[str, np.ndarray]] = {}
    samples: list[dict] = []
    # This rank's slice of the prompts (all of them in one process); slices are contiguous and gathered in rank order.
    mine = rank_share(list(range(len(prompts))), dist.world_size, dist.rank)
    my_prompts = [prompts[index] for index in mine]
    devices = [context.device] if context.device.type == "cuda" else []
    for name, path in models:
        model = load_causal_lm(str(path), dtype=config.model.dtype, trainable=False).to(context.device)
        # The same seed for every model: common random numbers (and the run's own RNG stream is left alone).
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(config.eval.seed + dist.rank)
            rollouts = generate(model, [prompt.prompt_ids for prompt in my_prompts], sampling,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        _free(model)
        my_scores = {}
        if my_prompts or collective:
            with autocast(context):
                my_scores = score_rollouts(judges, my_prompts, rollouts, tokenizer, config.eval.micro_batch_tokens,
                                           dist=dist if collective else None)
        my_samples = [{"model": name, "prompt_index": index, "row": prompt.row, "prompt": prompt.prompt,
                       "response": response_text(rollout, tokenizer), "finished": rollout.finished,
                       "scores": {key: float(values[position]) for key, values in my_scores.items()}}
                      for position, (index, prompt, rollout) in enumerate(zip(mine, my_prompts, rollouts))]
        parts = [part for part in dist.gather((my_scores, my_samples)) if part[1]]
        model_scores = {key: np.concatenate([part[0][key] for part in parts]) for key in parts[0][0]}
        scores[name] = model_scores
        samples.extend(sample for part in parts for sample in part[1])
        logger.info("eval: %s: mean %s score %.4g, mean length %.1f", name, judge,
                    float(model_scores[judge].mean()), float(model_scores["length"].mean()))
    del judges
    gc.collect()
    return scores, samples


def _write_results(context: RunContext, eval_dir: Path, plan: dict, scores: dict, samples: list,
                   elapsed: float) -> None:
    """win_rates.{md,json} (json last: it marks the stage finished), samples.jsonl and the metrics record."""
    names, judge = plan["models"], plan["judge"]
    rates, stderr = win_rate_matrix([scores[name][judge] for name in names])
    means = {name: {key: float(values.mean()) for key, values in scores[name].items()} for name in names}
    stds = {name: {key: float(values.std()) for key, values in scores[name].items()} for name in names}
    table = markdown_tables(names, rates, means, judge, plan["settings"]["num_prompts"])
    result = {
        **plan,
        "means": means,
        "stds": stds,  # over prompts: the spread the summary and plots/eval.png show
        "matrix": rates.tolist(),
        "stderr": stderr.tolist(),
        "win_rates": {a: {b: float(rates[i, j]) for j, b in enumerate(names) if j != i} for i, a in enumerate(names)},
    }
    eval_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(eval_dir / SAMPLES_FILE, "".join(json.dumps(sample, ensure_ascii=False) + "\n"
                                                   for sample in samples))
    _write_atomic(eval_dir / WIN_RATES_MD, table + "\n")
    _write_atomic(eval_dir / WIN_RATES_JSON, json.dumps(result, indent=2) + "\n")  # last: marks the stage done
    record = {"stage": EVAL_DIR, "step": 0, "elapsed_s": round(elapsed, 3)}
    for name in names:
        record[f"judge_score/{name}"] = means[name][judge]
        for key, value in means[name].items():
            record[f"{METRIC_NAMES.get(key, key)}/{name}"] = value
    context.metrics.truncate(EVAL_DIR, after_step=-1)  # a rerun replaces the old record
    context.metrics.write(record)
    logger.info("eval: win rates (%s)\n%s", eval_dir, table)
