"""The pairs stage: preference pairs sampled from the SFT model and labelled by a bundled task's true reward r*.

Usage (the CLI runs it when a config lists `pairs`, between sft and dpo: `stages: [sft, pairs, dpo, rm, rto]`):
    folder = run_pairs_stage(context)   # run_dir/pairs: train.jsonl, test.jsonl, pairs.json (the summary)
    # afterwards context.train_examples / context.eval_examples are these pairs, which the dpo and rm stages train on

Real pipelines sample the responses of their preference data from their SFT model and have them labelled, so that
DPO and the reward model learn the reward where RL starts. On a bundled task (`rto_fast.tasks`) the label comes from
the known r*: for every prompt of the preference data (train and test split), two responses are sampled from the
SFT model (`pairs.temperature`, at most `data.max_response_length` tokens) and the first is preferred with the
Bradley-Terry probability sigmoid((r*_1 - r*_2) / `pairs.label_temperature`). Two responses with the same r* carry
no preference: that prompt is sampled again (`pairs.max_rounds` tries in all). The responses are kept as the exact
token ids that were generated (a response cut at the length limit has no eos), so the later stages train on what
the model produced, with no decoding round trip.

The stage is finished when pairs.json exists with the same settings; a rerun then loads the pairs instead of
sampling them again (runtime.resume never samples again).
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import torch

from ..tasks import Task, get_task, token_true_rewards
from ..tasks.jsonl import write_jsonl
from .data import PreferenceExample
from .generation import SamplingSettings, generate
from .layout import PAIRS_DIR
from .loading import causal_lm
from .loop import STAGE_SEED_OFFSET
from .pipeline import Wiring
from .run import RunContext

logger = logging.getLogger(__name__)

SUMMARY_FILE = "pairs.json"
SPLIT_FILES = {"train": "train.jsonl", "test": "test.jsonl"}


def sample_pairs(model, prompts: list[list[int]], task: Task, tokenizer, sampling: SamplingSettings,
                 label_temperature: float, max_rounds: int, rng: random.Random) -> tuple[list[dict], dict]:
    """(rows, counts): one labelled pair per prompt whose two samples got different r* within `max_rounds` tries, in
    prompt order. Each row holds the texts and token ids of prompt, chosen and rejected, their r* and P(chosen)."""
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]
    rows: dict[int, dict] = {}
    pending = list(range(len(prompts)))
    ties = 0
    for _ in range(max_rounds):
        if not pending:
            break
        rollouts = generate(model, [prompts[index] for index in pending for _ in range(2)], sampling,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        retry = []
        for position, index in enumerate(pending):
            first, second = rollouts[2 * position], rollouts[2 * position + 1]
            rewards = [sum(token_true_rewards(task, texts[index], rollout.response_ids, rollout.finished, tokenizer))
                       for rollout in (first, second)]
            if rewards[0] == rewards[1]:
                ties += 1
                retry.append(index)
                continue
            p_first = 1.0 / (1.0 + math.exp(-(rewards[0] - rewards[1]) / label_temperature))
            first_wins = rng.random() < p_first
            chosen, rejected = (first, second) if first_wins else (second, first)
            reward_chosen, reward_rejected = (rewards[0], rewards[1]) if first_wins else (rewards[1], rewards[0])
            rows[index] = {
                "prompt": texts[index],
                "chosen": tokenizer.decode(chosen.response_ids, skip_special_tokens=True),
                "rejected": tokenizer.decode(rejected.response_ids, skip_special_tokens=True),
                "chosen_reward": reward_chosen, "rejected_reward": reward_rejected,
                "p_chosen": round(p_first if first_wins else 1.0 - p_first, 6),
                "prompt_ids": list(prompts[index]), "chosen_ids": list(chosen.response_ids),
                "rejected_ids": list(rejected.response_ids)}
        pending = retry
    ordered = [rows[index] for index in sorted(rows)]
    counts = {"prompts": len(prompts), "pairs": len(ordered), "ties_resampled": ties, "no_pair": len(pending)}
    return ordered, counts


def pair_statistics(rows: list[dict]) -> dict:
    """How the labels and the sampled responses look: label agreement with r*, mean r* and its spread."""
    if not rows:
        return {"label_agreement": float("nan"), "mean_true_reward": float("nan"), "mean_reward_gap": float("nan")}
    chosen = np.asarray([row["chosen_reward"] for row in rows])
    rejected = np.asarray([row["rejected_reward"] for row in rows])
    both = np.concatenate([chosen, rejected])
    return {"label_agreement": float(np.mean(chosen > rejected)), "mean_true_reward": float(both.mean()),
            "std_true_reward": float(both.std()), "mean_reward_gap": float(np.mean(np.abs(chosen - rejected))),
            "mean_response_tokens": float(np.mean([len(row["chosen_ids"]) + len(row["rejected_ids"])
                                                   for row in rows]) / 2)}


def read_pairs(path: Path) -> list[PreferenceExample]:
    """The PreferenceExamples of a pairs file (token ids as sampled)."""
    examples = []
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            row = json.loads(line)
            examples.append(PreferenceExample(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"], row=index))
    return examples


def _settings(context: RunContext, sft_model: Path) -> dict:
    config = context.config
    return {"sft_model": str(Path(sft_model).resolve()), "source": config.data.source, "seed": config.runtime.seed,
            "max_new_tokens": config.data.max_response_length, "temperature": config.pairs.temperature,
            "label_temperature": config.pairs.label_temperature, "max_rounds": config.pairs.max_rounds,
            "train_prompts": len(context.train_examples), "test_prompts": len(context.eval_examples)}


def load_finished_pairs(context: RunContext) -> bool:
    """When an earlier run in this folder finished the pairs stage: make its pairs the examples of the later stages
    (as a finished stage's model feeds the next stage). Returns whether it did."""
    folder = context.run_dir / PAIRS_DIR
    if not (folder / SUMMARY_FILE).is_file():
        return False
    logger.info("dpo / rm train on the pairs sampled earlier in %s", folder)
    _use_pairs(context, folder)
    return True


def _use_pairs(context: RunContext, folder: Path) -> None:
    context.train_examples = read_pairs(folder / SPLIT_FILES["train"])
    context.eval_examples = read_pairs(folder / SPLIT_FILES["test"])
    if not context.train_examples:
        raise ValueError("stage pairs: every prompt's two samples tied in r*: no training pairs")
    context.outputs["pairs"] = folder


def run_pairs_stage(context: RunContext) -> Path:
    """Sample and label the pairs (or load them when an earlier run finished this stage); the examples of the
    later stages become them. Returns the stage's folder."""
    config = context.config
    task = get_task(config.data.source)
    if task is None:
        raise ValueError(f"stage pairs: data.source {config.data.source!r} is no bundled task with a known reward")
    sft_model = Wiring.of(context).output("sft")
    if sft_model is None:
        raise ValueError("stage pairs samples from the SFT model: list the sft stage before it or set "
                         "model.sft_path")
    folder = context.run_dir / PAIRS_DIR
    settings = _settings(context, sft_model)
    with context.dist.main_first():  # rank 0 samples; the others then find the finished stage
        summary_path = folder / SUMMARY_FILE
        finished = (config.runtime.resume != "never" and summary_path.is_file()
                    and json.loads(summary_path.read_text(encoding="utf-8")).get("settings") == settings)
        if finished:
            logger.info("pairs: %s already holds the pairs; loading them", folder)
        else:
            _sample_and_write(context, task, sft_model, folder, settings)
    _use_pairs(context, folder)
    return folder


def _sample_and_write(context: RunContext, task: Task, sft_model: Path, folder: Path, settings: dict) -> None:
    config = context.config
    seed = config.runtime.seed + STAGE_SEED_OFFSET["pairs"]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = causal_lm(str(sft_model), context, trainable=False).to(context.device)
    sampling = SamplingSettings(max_new_tokens=config.data.max_response_length, temperature=config.pairs.temperature,
                                batch_size=config.pairs.batch_size)
    summary = {"settings": settings}
    for split, examples in (("train", context.train_examples), ("test", context.eval_examples)):
        rows, counts = sample_pairs(model, [example.prompt_ids for example in examples], task, context.tokenizer,
                                    sampling, config.pairs.label_temperature, config.pairs.max_rounds, rng)
        write_jsonl(folder / SPLIT_FILES[split], rows)
        summary[split] = {**counts, **pair_statistics(rows)}
        logger.info("pairs %s: %d pairs from %d prompts (%d ties sampled again, %d prompts without a pair); labels "
                    "agree with r* on %.1f%%, mean r* of the samples %.3f", split, counts["pairs"], counts["prompts"],
                    counts["ties_resampled"], counts["no_pair"], 100 * summary[split]["label_agreement"],
                    summary[split]["mean_true_reward"])
    del model
    # The summary is written last and atomically: it marks the stage finished.
    temporary = folder / f".{SUMMARY_FILE}.tmp"
    temporary.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    temporary.replace(folder / SUMMARY_FILE)


__all__ = ["run_pairs_stage", "load_finished_pairs", "sample_pairs", "pair_statistics", "read_pairs", "PAIRS_DIR"]
