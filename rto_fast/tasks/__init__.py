"""The bundled synthetic tasks: generated from a seed, with a known true reward r* per token.

Usage:
    task = get_task("credit")                     # or "synthetic" (the letters task); None for any other source
    task.write_task(folder, seed=0)               # its jsonl files
    token_true_rewards(task, prompt_text, response_ids, finished, tokenizer)   # r* per response token
    true_rewards(task, prompts, rollouts, tokenizer)                            # r* per response (float64 array)

Two tasks, both selected by `data.source`:
- `synthetic` (`rto_fast.synthetic`): short responses (a few letters) over the byte-level tokenizer; the first
  bundled task, kept as it was.
- `credit` (`rto_fast.tasks.credit`): 24-token responses whose r* is a sum of position-dependent token terms, over
  the task's own 12-symbol tokenizer: the testbed where token-level credit matters.

r* is computed on tokens: each response token is decoded on its own and scores the sum of the task's character terms
of its characters, and the end token scores the task's end term. So a junk byte scores as one wrong character,
whatever bytes the policy put next to it, and a special token (<pad>, <bos>) inside a response as one non-letter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import letters
from . import credit

NOT_A_SYMBOL = "\ufffd"


@dataclass(frozen=True)
class Task:
    """A bundled task: how to write its files, its per-character r*, and its tokenizer (None: the shipped bytes)."""

    name: str
    write_task: Callable
    char_rewards: Callable  # (prompt text, response text, finished) -> r* per character (+ the end term)
    format_folders: dict
    tokenizer: str | None = None


TASKS = {
    "synthetic": Task("synthetic", letters.write_synthetic_task, letters.token_rewards,
                      letters.FORMAT_FOLDERS),
    "credit": Task("credit", credit.write_task, credit.char_rewards, credit.FORMAT_FOLDERS,
                   tokenizer="credit"),
}


def get_task(source: str | None) -> Task | None:
    """The bundled task `data.source` names, or None for real data."""
    return TASKS.get(source) if isinstance(source, str) else None


def prompt_task(config) -> Task | None:
    """The bundled task whose prompts the RL and eval stages of `config` see (so r* is known), or None."""
    task = get_task(config.data.source)
    return task if task is not None and config.rl.prompts in (None, task.name) else None


def token_true_rewards(task: Task, prompt: str, response_ids: list[int], finished: bool, tokenizer) -> list[float]:
    """r* per response token (the end token included when `finished`, the last id then being eos)."""
    content = response_ids[:-1] if finished else response_ids
    special = set(tokenizer.all_special_ids)
    # A special token inside a response (<pad>, <bos>) is one symbol that is no letter of any task.
    pieces = [NOT_A_SYMBOL if token in special else tokenizer.decode([token]) for token in content]
    per_char = task.char_rewards(prompt, "".join(pieces), finished)
    rewards, start = [], 0
    for piece in pieces:
        rewards.append(float(sum(per_char[start:start + len(piece)])))
        start += len(piece)
    if finished:
        rewards.append(float(per_char[-1]))
    return rewards


def true_rewards(task: Task, prompts: list, rollouts: list, tokenizer) -> np.ndarray:
    """r* of each response (`prompts[i].prompt` the text of the prompt of `rollouts[i]`), float64."""
    return np.asarray([sum(token_true_rewards(task, prompt.prompt, rollout.response_ids, rollout.finished,
                                              tokenizer)) for prompt, rollout in zip(prompts, rollouts)],
                      dtype=np.float64)


__all__ = ["Task", "TASKS", "get_task", "prompt_task", "token_true_rewards", "true_rewards", "credit"]
