"""The bundled synthetic preference task: small, generated from a seed, with a known token-level reward r*.

Usage:
    folder = write_synthetic_task("runs/x/data/synthetic", seed=0, num_train=2048, num_test=256)
    # folder/preference/{train,test}.jsonl   prompt / chosen / rejected strings (+ their r* and the BT probability)
    # folder/hh/{train,test}.jsonl           the same pairs as HH-RLHF transcripts (chosen / rejected)
    # folder/prompts/{train,test}.jsonl      fresh prompts only, for RL
    true_reward("\\n\\nHuman: abca\\n\\nAssistant:", " acb")           # 3.5, the sum of token_rewards(...)
    token_rewards(prompt, " acb")                                         # [0.0, 1.0, 1.0, 1.0, 0.5]

`rto_fast.data` writes and loads this task when `data.source` is `synthetic` (any format).

The task. A prompt is an HH-style turn around a short "word" of 3-6 letters drawn from the alphabet "abcdefgh":
`"\\n\\nHuman: cafa\\n\\nAssistant:"` (24-27 bytes). A response is a space and a few letters (` acf`); the data
layer appends the end-of-sequence token. The ground-truth reward r*(x, y) is a sum of per-character terms (with
the byte-level tokenizer, one character = one token), which is what makes a dense per-token signal exist:

- the optional leading space: 0;
- the h-th letter, h <= L where L = the prompt word's length: +1 if the letter occurs in the prompt word, else -1;
- any character past the L-th, and any character that is not one of the alphabet's letters: -1;
- the end of the response (the eos token; `finished=True`): +0.5 when at least one letter came before it, else -1.

So the best responses are L letters taken from the prompt word followed by eos, worth L + 0.5; every character's
contribution is known in isolation, and an RL method that credits tokens (RTO) gets the exact signal for each one.

Preferences. For each training prompt two responses with different r* are drawn from a noisy "base policy"
(length uniform in 1..L+3; each letter from the prompt word with a per-response probability uniform in
[0.2, 0.9], else uniform over the alphabet). The first is preferred with the Bradley-Terry probability
P(y1 > y2) = sigmoid((r*(x, y1) - r*(x, y2)) / temperature) (`TEMPERATURE` = 0.5 by default), so labels are noisy
but agree with r* on most pairs (about 95% at temperature 0.5, 87% at 1). Everything comes from
`random.Random(seed)`: the same seed writes byte-identical files. SFT trains on the chosen responses; the
prompt-only split uses fresh prompts.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

from .jsonl import write_jsonl

ALPHABET = "abcdefgh"
MIN_WORD, MAX_WORD = 3, 6
HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"
LETTER_MATCH, LETTER_MISS, OVERFLOW = 1.0, -1.0, -1.0
END_BONUS, EMPTY_END = 0.5, -1.0
TEMPERATURE = 0.5  # Bradley-Terry temperature of the labels: 95% agree with r*
EXTRA_LENGTH = 3  # the base policy's responses run up to L + 3 letters, so some are too long
SPLITS = ("train", "test")
FORMAT_FOLDERS = {"preference": "preference", "hh-rlhf": "hh", "prompt": "prompts"}


def prompt_word(prompt: str) -> str:
    """The word the last Human turn of `prompt` asks about (the whole stripped text when there is no such turn)."""
    text = prompt
    if HUMAN.strip() in text:
        text = text.rsplit(HUMAN.strip(), 1)[1]
    if ASSISTANT.strip() in text:
        text = text.split(ASSISTANT.strip(), 1)[0]
    return text.strip()


def token_rewards(prompt: str, response: str, finished: bool = True) -> list[float]:
    """r* per response character (a leading space counts 0), plus one entry for the end token when `finished`."""
    word = prompt_word(prompt)
    allowed = set(word)
    rewards = []
    letters = 0
    for position, char in enumerate(response):
        if position == 0 and char == " ":
            rewards.append(0.0)
            continue
        letters += 1
        if char not in ALPHABET or letters > len(word):
            rewards.append(OVERFLOW)
        else:
            rewards.append(LETTER_MATCH if char in allowed else LETTER_MISS)
    if finished:
        rewards.append(END_BONUS if letters > 0 else EMPTY_END)
    return rewards


def true_reward(prompt: str, response: str, finished: bool = True) -> float:
    """r*(x, y): the sum of `token_rewards`. `finished`: the response ended with the end-of-sequence token."""
    return float(sum(token_rewards(prompt, response, finished)))


def best_response(prompt: str) -> str:
    """A response with the highest r* (the prompt word itself), for reference and tests."""
    return " " + prompt_word(prompt)


def make_prompt(rng: random.Random) -> str:
    word = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_WORD, MAX_WORD)))
    return f"{HUMAN}{word}{ASSISTANT}"


def sample_base_response(prompt: str, rng: random.Random) -> str:
    """One response of the noisy base policy: mostly letters of the prompt word, sometimes too long."""
    word = prompt_word(prompt)
    on_topic = rng.uniform(0.2, 0.9)
    length = rng.randint(1, len(word) + EXTRA_LENGTH)
    letters = [rng.choice(word) if rng.random() < on_topic else rng.choice(ALPHABET) for _ in range(length)]
    return " " + "".join(letters)


def preference_probability(reward_first: float, reward_second: float, temperature: float = 1.0) -> float:
    """Bradley-Terry: P(first preferred) = sigmoid((r1 - r2) / temperature)."""
    return 1.0 / (1.0 + math.exp(-(reward_first - reward_second) / temperature))


def make_pair(rng: random.Random, temperature: float = TEMPERATURE) -> dict:
    """One preference row: a prompt, two different base-policy responses, the Bradley-Terry label."""
    prompt = make_prompt(rng)
    first = sample_base_response(prompt, rng)
    second = sample_base_response(prompt, rng)
    reward_first = true_reward(prompt, first)
    # A pair whose r* tie carries no preference, only label noise: draw again until they differ.
    while True:
        second = sample_base_response(prompt, rng)
        reward_second = true_reward(prompt, second)
        if reward_second != reward_first:
            break
    p_first = preference_probability(reward_first, reward_second, temperature)
    if rng.random() < p_first:
        chosen, rejected, reward_chosen, reward_rejected, p_chosen = first, second, reward_first, reward_second, \
            p_first
    else:
        chosen, rejected, reward_chosen, reward_rejected, p_chosen = second, first, reward_second, reward_first, \
            1.0 - p_first
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_reward": reward_chosen,
            "rejected_reward": reward_rejected, "p_chosen": round(p_chosen, 6)}


def write_synthetic_task(folder: str | os.PathLike, seed: int = 0, num_train: int = 2048, num_test: int = 256,
                         temperature: float = TEMPERATURE, num_prompts_train: int | None = None,
                         num_prompts_test: int | None = None) -> Path:
    """Write the task's jsonl files under `folder` (see the module docstring) and return `folder` as a Path.

    Deterministic in `seed`; the prompt-only split (default: as many prompts as preference rows) uses its own
    random stream, so its prompts are fresh draws, not the preference prompts."""
    if num_train <= 0 or num_test < 0:
        raise ValueError(f"num_train must be > 0 and num_test >= 0, got {num_train} and {num_test}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    folder = Path(folder)
    rng = random.Random(seed)
    pairs = {"train": [make_pair(rng, temperature) for _ in range(num_train)],
             "test": [make_pair(rng, temperature) for _ in range(num_test)]}
    prompt_rng = random.Random(f"prompts-{seed}")
    prompt_counts = {"train": num_train if num_prompts_train is None else num_prompts_train,
                     "test": num_test if num_prompts_test is None else num_prompts_test}
    for split in SPLITS:
        write_jsonl(folder / FORMAT_FOLDERS["preference"] / f"{split}.jsonl", pairs[split])
        transcripts = [{"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
                       for row in pairs[split]]
        write_jsonl(folder / FORMAT_FOLDERS["hh-rlhf"] / f"{split}.jsonl", transcripts)
        prompts = [{"prompt": make_prompt(prompt_rng)} for _ in range(prompt_counts[split])]
        write_jsonl(folder / FORMAT_FOLDERS["prompt"] / f"{split}.jsonl", prompts)
    return folder
