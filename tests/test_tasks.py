"""The bundled tasks' true reward r*, computed on tokens, with exact values on hand-made responses."""

import json

import pytest

from rto_fast.trainer.models import build_tokenizer
from rto_fast.tasks import TASKS, credit, get_task, token_true_rewards

PROMPT = "cafb:"
TARGET = "cafb" * 6


def credit_ids(tokenizer, text: str, eos: bool = True) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if eos else ids


@pytest.fixture(scope="module")
def credit_tokenizer():
    return build_tokenizer("credit")


def test_credit_tokenizer_is_the_task_symbols_one_token_each(credit_tokenizer):
    assert len(credit_tokenizer) == 12
    assert (credit_tokenizer.pad_token_id, credit_tokenizer.bos_token_id, credit_tokenizer.eos_token_id) == (0, 1, 2)
    ids = credit_tokenizer("abcdefgh:", add_special_tokens=False)["input_ids"]
    assert ids == list(range(3, 12))
    assert credit_tokenizer.decode(ids) == "abcdefgh:"


@pytest.mark.parametrize("response, finished, expected", [
    (TARGET, True, [1.0] * 24 + [0.0]),  # the best response: r* 24
    ("aaaa" * 6, True, [0.0, 1.0, 0.0, 0.0] * 6 + [0.0]),  # only the key's 'a' (second place) is right
    ("cafb", True, [1.0] * 4 + [0.0]),  # ending early only forgoes the letters not written
    (TARGET + "ca", True, [1.0] * 24 + [-1.0, -1.0, 0.0]),  # past the 24th symbol every symbol costs 1
    (TARGET + "cafbcafb", False, [1.0] * 24 + [-1.0] * 8),  # cut at the limit: no end token, overflow paid
    ("c:fb" + TARGET[4:], True, [1.0, 0.0] + [1.0] * 22 + [0.0]),  # the separator is a wrong symbol
    ("", True, [0.0]),
])
def test_credit_char_rewards_exact(response, finished, expected):
    assert credit.char_rewards(PROMPT, response, finished) == expected
    assert credit.true_reward(PROMPT, response, finished) == sum(expected)


def test_credit_token_rewards_on_ids_match_and_count_special_tokens_as_wrong(credit_tokenizer):
    task = get_task("credit")
    ids = credit_ids(credit_tokenizer, TARGET)
    assert token_true_rewards(task, PROMPT, ids, True, credit_tokenizer) == [1.0] * 24 + [0.0]
    # A <pad> or <bos> inside a response takes its position and is wrong; the letters after it keep their places.
    broken = ids[:2] + [credit_tokenizer.pad_token_id] + ids[3:]
    assert token_true_rewards(task, PROMPT, broken, True, credit_tokenizer) == [1.0, 1.0, 0.0] + [1.0] * 21 + [0.0]


def test_credit_prompt_key_is_checked():
    assert credit.prompt_key("<bos>cafb:") == "cafb"
    assert credit.target("dddd:") == "d" * 24
    with pytest.raises(ValueError, match="not a credit-task prompt"):
        credit.prompt_key("xyz:")


def test_letters_task_scores_each_junk_byte_as_one_character():
    # ' ab' then the three bytes of one UTF-8 character: each byte is its own (non-letter) token, -1 each; before, the
    # decoded text made them one character (+1.5 instead of -0.5).
    tokenizer = build_tokenizer()
    prompt = "\n\nHuman: abca\n\nAssistant:"
    ids = tokenizer(" ab", add_special_tokens=False)["input_ids"] + list("€".encode()) + [tokenizer.eos_token_id]
    rewards = token_true_rewards(get_task("synthetic"), prompt, ids, True, tokenizer)
    assert rewards == [0.0, 1.0, 1.0, -1.0, -1.0, -1.0, 0.5]
    assert sum(rewards) == -0.5


def test_credit_task_files_are_deterministic_and_labelled_by_their_rewards(tmp_path):
    first = credit.write_task(tmp_path / "a", seed=3, num_train=64, num_test=8)
    second = credit.write_task(tmp_path / "b", seed=3, num_train=64, num_test=8)
    for name in ("preference/train.jsonl", "preference/test.jsonl", "prompts/train.jsonl", "prompts/test.jsonl"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    rows = [json.loads(line) for line in (first / "preference/train.jsonl").read_text().splitlines()]
    assert len(rows) == 64
    for row in rows:
        assert row["chosen_reward"] == credit.true_reward(row["prompt"], row["chosen"])
        assert row["rejected_reward"] == credit.true_reward(row["prompt"], row["rejected"])
        assert row["chosen_reward"] != row["rejected_reward"]
        length = len(row["chosen"])
        assert credit.RESPONSE_LENGTH - credit.LENGTH_SPREAD <= length <= credit.RESPONSE_LENGTH + credit.LENGTH_SPREAD
    # Labels follow r* on most rows (Bradley-Terry, temperature 1, gaps of a few letters).
    assert sum(row["chosen_reward"] > row["rejected_reward"] for row in rows) >= 0.75 * len(rows)


def test_every_task_is_registered_with_its_formats():
    assert set(TASKS) == {"synthetic", "credit"}
    assert get_task("credit").format_folders == {"preference": "preference", "prompt": "prompts"}
    assert get_task("my/data.jsonl") is None
