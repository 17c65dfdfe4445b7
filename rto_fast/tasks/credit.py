"""The credit task: long responses whose true reward is a sum over tokens, so a dense token reward can carry exactly
what one score per response leaves unassigned. The bundled testbed on which RTO's claim can be checked.

Usage:
    folder = write_task("runs/x/data/credit", seed=0)     # preference/{train,test}.jsonl, prompts/{train,test}.jsonl
    tokenizer = build_tokenizer()                          # the task's own 12 symbols, built in code
    char_rewards("cafb:", "cafbcafbcafbcafbcafbcafb")      # [1.0] * 24 + [0.0] (the end token), r* = 24
    true_reward("cafb:", "cafbcafbcafbcafbcafbcafb")       # 24.0

`python -m rto_fast.train` uses it with `data.source: credit` and `model.tokenizer: credit` (configs/credit.yaml);
the `pairs` stage then samples the preference pairs DPO and the reward model learn from out of the SFT model.

Definition (fixed before any RL was run on it; see "Why" below).
- Symbols: the letters a-h, the separator ':', and <pad>, <bos>, <eos>. One symbol is one token (`build_tokenizer`).
- Prompt: a key of `KEY_LENGTH` = 4 letters drawn uniformly with repetition, then ':', e.g. "cafb:" (the data layer
  puts <bos> in front).
- Target: the key repeated, `RESPONSE_LENGTH` = 24 letters: t_h = key[(h - 1) mod 4] for h = 1..24.
- True reward r*(x, y) = sum over the response's symbols y_1, y_2, ... and its end token of
    +1  for y_h == t_h at h <= 24 (`CORRECT`),
     0  for any other symbol at h <= 24 (`WRONG`: a wrong letter, or ':', <pad>, <bos>),
    -1  for every symbol at h > 24 (`OVERFLOW`: the response should have ended),
     0  for the end token (<eos>) wherever it comes (`END`): ending early only forgoes the letters not written.
  A response cut at the length limit has no end token and pays -1 for each symbol past the 24th. The best response
  is the target followed by <eos> (r* = 24); r* of a response of n <= 24 letters is its number of correct letters.
  r* is computed on tokens: each token is decoded on its own and scores the sum of its symbols' terms (one symbol
  with this task's tokenizer; a byte that is not valid UTF-8 alone decodes to one replacement symbol, which is
  wrong), so no decoding of neighbours can merge or split what the policy generated.
- Demonstrations ("base policy", the SFT data): a response has a skill q ~ U(`SKILL_LOW`, `SKILL_HIGH`) = U(0.1,
  0.7) and a length uniform in 22..26 (`LENGTH_SPREAD` = 2 around 24, so an end token near the 25th position is in
  the data's support); each letter is the target with probability q, else uniform over the 8 letters (which may also
  hit the target). The SFT split holds pairs of two such responses to one prompt, labelled by Bradley-Terry on r*
  with temperature `TEMPERATURE` = 1; SFT trains on the chosen one, as the paper's pipeline does.
- Preference pairs for DPO and the reward model come from the SFT model itself (`sample_pairs`, run by the `pairs`
  stage): two responses sampled at temperature 1 per prompt of the preference split, labelled by Bradley-Terry on
  r* (temperature 1); pairs with equal r* carry no preference and are drawn again (for another prompt).
- Prompts for RL and evaluation: fresh keys (`prompts/`), 2048 for training and 256 for test by default.

Why this task. The paper's argument is that PPO with one sentence-level score on the last token leaves the credit of
each token to the critic, while a token-level reward hands it over directly. That only matters when there are many
tokens whose contributions differ: here 24 (plus the end token), each one's contribution known exactly and set by
the prompt and the position. One score per response is the sum of 24 terms of which the policy gradient cannot tell
which were earned; a token reward can represent r* exactly (r* itself is one). With beta1 equal to DPO's beta and
Bradley-Terry temperature 1, the ideal DPO model's token reward beta * log(pi_dpo / pi_ref) is r*'s token terms up
to a potential-based shaping (Rafailov et al. 2024, "From r to Q*"), so RTO's dense reward can approach the oracle
that gives r* per token. The symbols are the task's own, so the policy cannot wander into tokens no preference pair
ever showed the DPO model (the weakness of the `synthetic` letters task's byte vocabulary); ':', <pad> and <bos>
remain possible but never appear in a response of the data, so the reward they get is out of support (which
`python -m rto_fast.diagnose` measures). The pairs come from the SFT policy, as real pipelines sample them, so DPO
learns the reward where RL starts. The copy structure (period 4) is something a 2-layer model learns from
relative positions; the skill mixture gives the SFT model room to improve (it writes about half the letters right).
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .jsonl import write_jsonl

ALPHABET = "abcdefgh"
SEPARATOR = ":"
KEY_LENGTH = 4
RESPONSE_LENGTH = 24
LENGTH_SPREAD = 2
SKILL_LOW, SKILL_HIGH = 0.1, 0.7
CORRECT, WRONG, OVERFLOW, END = 1.0, 0.0, -1.0, 0.0
TEMPERATURE = 1.0
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
NUM_TRAIN, NUM_TEST = 2048, 256
FORMAT_FOLDERS = {"preference": "preference", "prompt": "prompts"}
SPLITS = ("train", "test")


# ------------------------------------------------------------------------------------------------ the reward

def prompt_key(prompt: str) -> str:
    """The key letters of a prompt ("cafb:" -> "cafb"; a leading <bos> or whitespace is ignored)."""
    text = prompt.replace(SPECIAL_TOKENS[1], "").strip()
    if text.endswith(SEPARATOR):
        text = text[:-1]
    key = text[-KEY_LENGTH:] if len(text) >= KEY_LENGTH else ""
    if len(key) != KEY_LENGTH or any(letter not in ALPHABET for letter in key):
        raise ValueError(f"not a credit-task prompt (a {KEY_LENGTH}-letter key of {ALPHABET!r} and "
                         f"{SEPARATOR!r}): {prompt!r}")
    return key


def target(prompt: str) -> str:
    """The best response's letters (the key repeated to RESPONSE_LENGTH)."""
    key = prompt_key(prompt)
    return (key * (RESPONSE_LENGTH // KEY_LENGTH + 1))[:RESPONSE_LENGTH]


def char_rewards(prompt: str, response: str, finished: bool = True) -> list[float]:
    """r* per response symbol, plus one entry for the end token when `finished`."""
    wanted = target(prompt)
    rewards = []
    for position, symbol in enumerate(response):
        if position >= RESPONSE_LENGTH:
            rewards.append(OVERFLOW)
        else:
            rewards.append(CORRECT if symbol == wanted[position] else WRONG)
    if finished:
        rewards.append(END)
    return rewards


def true_reward(prompt: str, response: str, finished: bool = True) -> float:
    """r*(x, y): the sum of `char_rewards`."""
    return float(sum(char_rewards(prompt, response, finished)))


# ------------------------------------------------------------------------------------------------ tokenizer

def build_tokenizer():
    """A `PreTrainedTokenizerFast` over the task's symbols: <pad>=0, <bos>=1, <eos>=2, then 'a'-'h', ':'. One
    character is one token (characters outside the vocabulary are an error at encoding time: they cannot occur)."""
    symbols = [*SPECIAL_TOKENS, *ALPHABET, SEPARATOR]
    core = Tokenizer(models.WordLevel(vocab={symbol: index for index, symbol in enumerate(symbols)},
                                      unk_token=SPECIAL_TOKENS[0]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=SPECIAL_TOKENS[0], bos_token=SPECIAL_TOKENS[1],
                                   eos_token=SPECIAL_TOKENS[2], clean_up_tokenization_spaces=False,
                                   model_max_length=4096)


# ------------------------------------------------------------------------------------------------ data

def make_prompt(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(KEY_LENGTH)) + SEPARATOR


def sample_demonstration(prompt: str, rng: random.Random) -> str:
    """One response of the base policy: a skill q, a length near RESPONSE_LENGTH, letters right with probability q."""
    wanted = target(prompt)
    skill = rng.uniform(SKILL_LOW, SKILL_HIGH)
    length = rng.randint(RESPONSE_LENGTH - LENGTH_SPREAD, RESPONSE_LENGTH + LENGTH_SPREAD)
    letters = [wanted[position % RESPONSE_LENGTH] if rng.random() < skill else rng.choice(ALPHABET)
               for position in range(length)]
    return "".join(letters)


def bradley_terry_label(prompt: str, first: tuple[str, bool], second: tuple[str, bool], rng: random.Random,
                        temperature: float = TEMPERATURE) -> dict | None:
    """A preference row for two (response, finished) of one prompt, labelled with probability
    sigmoid((r1 - r2) / temperature); None when their r* are equal (no preference to learn)."""
    reward_first, reward_second = true_reward(prompt, *first), true_reward(prompt, *second)
    if reward_first == reward_second:
        return None
    p_first = 1.0 / (1.0 + math.exp(-(reward_first - reward_second) / temperature))
    first_wins = rng.random() < p_first
    (chosen, chosen_reward), (rejected, rejected_reward) = (
        ((first[0], reward_first), (second[0], reward_second)) if first_wins
        else ((second[0], reward_second), (first[0], reward_first)))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_reward": chosen_reward,
            "rejected_reward": rejected_reward, "p_chosen": round(p_first if first_wins else 1.0 - p_first, 6)}


def _demonstration_pair(rng: random.Random) -> dict:
    prompt = make_prompt(rng)
    while True:
        row = bradley_terry_label(prompt, (sample_demonstration(prompt, rng), True),
                                  (sample_demonstration(prompt, rng), True), rng)
        if row is not None:
            return row


def write_task(folder: str | os.PathLike, seed: int = 0, num_train: int = NUM_TRAIN, num_test: int = NUM_TEST,
               num_prompts_train: int | None = None, num_prompts_test: int | None = None) -> Path:
    """Write preference/{train,test}.jsonl (demonstration pairs, for SFT) and prompts/{train,test}.jsonl (fresh
    keys, for RL and evaluation) under `folder`; deterministic in `seed`. Returns `folder` as a Path."""
    if num_train <= 0 or num_test < 0:
        raise ValueError(f"num_train must be > 0 and num_test >= 0, got {num_train} and {num_test}")
    folder = Path(folder)
    rng = random.Random(f"credit-{seed}")
    pairs = {"train": [_demonstration_pair(rng) for _ in range(num_train)],
             "test": [_demonstration_pair(rng) for _ in range(num_test)]}
    prompt_rng = random.Random(f"credit-prompts-{seed}")
    counts = {"train": num_train if num_prompts_train is None else num_prompts_train,
              "test": num_test if num_prompts_test is None else num_prompts_test}
    for split in SPLITS:
        write_jsonl(folder / FORMAT_FOLDERS["preference"] / f"{split}.jsonl", pairs[split])
        write_jsonl(folder / FORMAT_FOLDERS["prompt"] / f"{split}.jsonl",
                    [{"prompt": make_prompt(prompt_rng)} for _ in range(counts[split])])
    return folder
