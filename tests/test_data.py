"""The data layer on small local files of every type and format, and the bundled synthetic task."""

import json
import logging
import random

import pandas as pd
import pytest

from rto_fast.trainer import data
from rto_fast.tasks import letters as synthetic
from rto_fast.trainer.config import DataConfig
from rto_fast.trainer.data import (DataError, PreferenceExample, PromptExample, load_preference_splits, load_prompt_splits,
                           pair_sequences, sft_sequence, truncate_prompt, validate_dataset_source)
from rto_fast.trainer.models import build_tokenizer
from rto_fast.trainer.packing import IGNORE_INDEX, build_micro_batches

BOS, EOS = 257, 258


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def byte_ids(text):
    """What the byte-level tokenizer gives for plain text (special tokens aside)."""
    return list(text.encode("utf-8"))


def write_rows(path, rows):
    """Rows to a .jsonl / .json / .parquet / .csv file, as a user would have them."""
    suffix = path.suffix
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        raise ValueError(suffix)
    return path


def config(source, **overrides):
    settings = dict(source=str(source), format="preference", max_prompt_length=128, max_response_length=64)
    settings.update(overrides)
    return DataConfig(**settings)


def load(cfg, tokenizer, tmp_path, seed=0):
    return load_preference_splits(cfg, tokenizer, cache_dir=tmp_path / "cache", seed=seed)


def hh_prompt(question):
    return f"\n\nHuman: {question}\n\nAssistant:"


PAIRS = [{"prompt": hh_prompt(f"question {i}?"), "chosen": f" good answer {i}", "rejected": f" bad {i}"}
         for i in range(12)]


# ------------------------------------------------------------------------------------------------ sources, formats

@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_preference_strings_from_each_file_type(tmp_path, tokenizer, suffix):
    path = write_rows(tmp_path / f"pairs{suffix}", PAIRS)
    validate_dataset_source(config(path))
    train, test = load(config(path), tokenizer, tmp_path)
    # One file is one split: a seeded test split is carved out of it, disjoint from training.
    assert len(test) == 1 and len(train) == len(PAIRS) - 1
    assert sorted(example.row for example in train + test) == list(range(len(PAIRS)))
    for example in train + test:
        assert isinstance(example, PreferenceExample)
        row = PAIRS[example.row]
        assert example.prompt_ids == [BOS] + byte_ids(row["prompt"])
        assert example.chosen_ids == byte_ids(row["chosen"]) + [EOS]
        assert example.rejected_ids == byte_ids(row["rejected"]) + [EOS]
        assert all(type(token) is int for token in example.prompt_ids + example.chosen_ids)


def test_carved_test_split_follows_the_seed(tmp_path, tokenizer):
    path = write_rows(tmp_path / "pairs.jsonl", PAIRS * 8)
    cfg = config(path, max_eval_samples=3)
    rows = {seed: [example.row for example in load(cfg, tokenizer, tmp_path, seed)[1]] for seed in (0, 0, 1)}
    assert len(rows[0]) == 3
    assert rows[0] == [example.row for example in load(cfg, tokenizer, tmp_path, 0)[1]]
    assert rows[0] != rows[1]
    train, test = load(config(path, test_split=None), tokenizer, tmp_path)
    assert len(train) == 8 * len(PAIRS) and test == []


def test_folder_with_train_and_test_files(tmp_path, tokenizer):
    write_rows(tmp_path / "folder" / "train.jsonl", PAIRS[:8])
    write_rows(tmp_path / "folder" / "test.jsonl", PAIRS[8:])
    cfg = config(tmp_path / "folder")
    validate_dataset_source(cfg)
    train, test = load(cfg, tokenizer, tmp_path)
    assert [example.row for example in train] == list(range(8))
    assert [example.chosen_ids for example in test] == [byte_ids(row["chosen"]) + [EOS] for row in PAIRS[8:]]
    train, test = load(config(tmp_path / "folder", max_train_samples=3, max_eval_samples=2), tokenizer, tmp_path)
    assert len(train) == 3 and len(test) == 2


HH_ROWS = [
    {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: An "
               "apple.",
     "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: No."},
    {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"},
    {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d\n\nHuman: e\n\nAssistant: f",
     "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d\n\nHuman: e\n\nAssistant: g"},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_hh_rlhf_multi_turn_transcripts(tmp_path, tokenizer, suffix):
    path = write_rows(tmp_path / f"hh{suffix}", HH_ROWS)
    cfg = config(path, format="hh-rlhf", test_split=None)
    validate_dataset_source(cfg)
    train, _ = load(cfg, tokenizer, tmp_path)
    assert len(train) == 3
    first = train[0]
    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant:"
    assert first.prompt_ids == [BOS] + byte_ids(prompt)  # up to and including the LAST Assistant marker
    assert first.chosen_ids == byte_ids(" An apple.") + [EOS]
    assert first.rejected_ids == byte_ids(" No.") + [EOS]
    assert train[2].chosen_ids == byte_ids(" f") + [EOS]


def test_hh_rlhf_malformed_transcripts(tmp_path, tokenizer, caplog):
    rows = HH_ROWS + [
        {"chosen": "\n\nHuman: no answer here", "rejected": "\n\nHuman: no answer here either"},
        {"chosen": "\n\nHuman: q1\n\nAssistant: a", "rejected": "\n\nHuman: q2\n\nAssistant: b"},
        {"chosen": "\n\nHuman: q\n\nAssistant: same", "rejected": "\n\nHuman: q\n\nAssistant: same"},
        {"chosen": "\n\nHuman: q\n\nAssistant:   ", "rejected": "\n\nHuman: q\n\nAssistant: b"},
        {"chosen": "\n\nHuman: \n\nAssistant: a", "rejected": "\n\nHuman: \n\nAssistant: b"},
    ]
    path = write_rows(tmp_path / "hh.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="rto_fast.trainer.data"):
        train, _ = load(config(path, format="hh-rlhf", test_split=None, max_bad_fraction=1.0), tokenizer, tmp_path)
    assert [example.row for example in train] == [0, 1, 2]
    log = caplog.text
    for reason in ("no_assistant_turn 1", "prompt_mismatch 1", "identical_responses 1", "empty_response 1",
                   "empty_prompt 1", "kept 3 of 8 rows"):
        assert reason in log, (reason, log)


def test_chat_messages_render_like_the_hh_strings(tmp_path, tokenizer):
    conversation = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Name a fruit."}]
    message_rows = [
        # response as one assistant message, and as the whole conversation (prompt messages, then the answer)
        {"prompt": conversation, "chosen": [{"role": "assistant", "content": "An apple."}],
         "rejected": conversation + [{"role": "assistant", "content": "No."}]},
        {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]},
    ]
    string_rows = [
        {"prompt": "\n\nHuman: Hi there\n\nAssistant: Hello!<eos>\n\nHuman: Name a fruit.\n\nAssistant:",
         "chosen": " An apple.", "rejected": " No."},
        {"prompt": hh_prompt("2+2?"), "chosen": " 4", "rejected": " 5"},
    ]
    examples = {}
    for name, rows, suffix in (("messages", message_rows, ".jsonl"), ("parquet", message_rows, ".parquet"),
                               ("strings", string_rows, ".jsonl")):
        path = write_rows(tmp_path / name / f"pairs{suffix}", rows)
        examples[name] = load(config(path, test_split=None), tokenizer, tmp_path)[0]
    assert examples["messages"] == examples["strings"] == examples["parquet"]
    first = examples["messages"][0]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert first.prompt_ids == [BOS] + tokenizer(rendered, add_special_tokens=False).input_ids
    assert first.prompt_ids.count(EOS) == 1  # the earlier assistant turn's end, parsed as the special token
    assert first.chosen_ids == byte_ids(" An apple.") + [EOS]  # the template's eos is not doubled


def test_bad_chat_messages_are_skipped(tmp_path, tokenizer, caplog):
    good = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    rows = [good,
            {**good, "prompt": [{"role": "wizard", "content": "q"}]},
            {**good, "chosen": [{"role": "user", "content": "a"}]},
            {**good, "rejected": [{"role": "assistant", "content": ""}]},
            {**good, "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    path = write_rows(tmp_path / "chat.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="rto_fast.trainer.data"):
        train, _ = load(config(path, test_split=None, max_bad_fraction=1.0), tokenizer, tmp_path)
    assert [example.row for example in train] == [0]
    assert "bad_messages 3" in caplog.text and "empty_response 1" in caplog.text


def test_prompt_only_format(tmp_path, tokenizer):
    rows = [{"prompt": hh_prompt("first")}, {"prompt": [{"role": "user", "content": "second"}]},
            {"prompt": hh_prompt("first")}, {"prompt": ""}]
    path = write_rows(tmp_path / "prompts.jsonl", rows)
    cfg = config(path, format="prompt", test_split=None, max_bad_fraction=0.5)
    validate_dataset_source(cfg)
    prompts, _ = load_prompt_splits(cfg, tokenizer, cache_dir=tmp_path / "cache")
    assert all(isinstance(example, PromptExample) for example in prompts)
    assert [example.row for example in prompts] == [0, 1, 2]  # prompt data is kept as it is, repeats included
    assert prompts[1].prompt == hh_prompt("second")
    assert prompts[1].prompt_ids == [BOS] + byte_ids(hh_prompt("second"))
    with pytest.raises(DataError, match="no responses"):
        load(cfg, tokenizer, tmp_path)
    # The prompts of preference data, each distinct prompt once.
    path = write_rows(tmp_path / "pairs.jsonl", PAIRS + PAIRS[:3])
    prompts, _ = load_prompt_splits(config(path, test_split=None), tokenizer, cache_dir=tmp_path / "cache")
    assert [example.prompt for example in prompts] == [row["prompt"] for row in PAIRS]


# ------------------------------------------------------------------------------------------------ truncation

def test_truncation_keeps_the_prompt_end_and_the_response_start(tmp_path, tokenizer, caplog):
    long_prompt = hh_prompt("x" * 40 + " the end")
    rows = [{"prompt": long_prompt, "chosen": " short", "rejected": " a much longer answer than allowed"},
            {"prompt": hh_prompt("q"), "chosen": " same start, then A", "rejected": " same start, then B"}]
    path = write_rows(tmp_path / "long.jsonl", rows)
    cfg = config(path, test_split=None, max_prompt_length=16, max_response_length=10, max_bad_fraction=1.0)
    with caplog.at_level(logging.INFO, logger="rto_fast.trainer.data"):
        train, _ = load(cfg, tokenizer, tmp_path)
    (example,) = train
    assert example.prompt_ids == [BOS] + byte_ids(long_prompt)[-15:]  # bos, then the last 15 bytes
    assert example.chosen_ids == byte_ids(" short") + [EOS]
    assert example.rejected_ids == byte_ids(" a much lo")  # first 10 tokens; cut, so no eos
    assert "identical_after_truncation 1" in caplog.text  # the second pair's answers differ only after the cut
    for sequence in pair_sequences(example):
        assert len(sequence.input_ids) <= cfg.max_prompt_length + cfg.max_response_length


def test_truncate_prompt_without_bos():
    assert truncate_prompt([1, 2, 3, 4], 2, bos_id=None) == [3, 4]
    assert truncate_prompt([9, 2, 3, 4], 2, bos_id=9) == [9, 4]
    assert truncate_prompt([9, 2], 5, bos_id=9) == [9, 2]


def test_drop_policy_skips_long_rows_without_calling_them_malformed(tmp_path, tokenizer, caplog):
    rows = PAIRS[:4] + [{"prompt": hh_prompt("y" * 200), "chosen": " a", "rejected": " b"},
                        {"prompt": hh_prompt("q"), "chosen": " z" * 100, "rejected": " b"}]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    cfg = config(path, test_split=None, truncation="drop", max_bad_fraction=0.0)
    with caplog.at_level(logging.INFO, logger="rto_fast.trainer.data"):
        train, _ = load(cfg, tokenizer, tmp_path)
    assert [example.row for example in train] == [0, 1, 2, 3]
    assert "too_long 2" in caplog.text
    with pytest.raises(DataError, match="no usable rows.*too_long"):
        load(config(path, test_split=None, truncation="drop", max_prompt_length=4), tokenizer, tmp_path)


# ------------------------------------------------------------------------------------------------ malformed rows

MIXED_ROWS = [
    PAIRS[0],
    {"prompt": hh_prompt("q"), "chosen": " a"},                           # missing rejected
    {"prompt": hh_prompt("q"), "chosen": 5, "rejected": " b"},            # not a string
    {"prompt": hh_prompt("q"), "chosen": " a", "rejected": "  "},         # empty response
    {"prompt": "   ", "chosen": " a", "rejected": " b"},                  # empty prompt
    {"prompt": hh_prompt("q"), "chosen": " same", "rejected": " same"},   # identical
    {"prompt": None, "chosen": " a", "rejected": " b"},                   # missing prompt
    PAIRS[1],
]


def test_malformed_rows_are_counted_and_skipped(tmp_path, tokenizer, caplog):
    path = write_rows(tmp_path / "mixed.jsonl", MIXED_ROWS)
    with caplog.at_level(logging.INFO, logger="rto_fast.trainer.data"):
        train, _ = load(config(path, test_split=None, max_bad_fraction=0.9), tokenizer, tmp_path)
    assert [example.row for example in train] == [0, 7]
    for reason in ("missing_field 2", "not_a_string 1", "empty_response 1", "empty_prompt 1",
                   "identical_responses 1", "kept 2 of 8 rows"):
        assert reason in caplog.text, (reason, caplog.text)


def test_csv_empty_cell_is_a_missing_field(tmp_path, tokenizer, caplog):
    rows = PAIRS[:5] + [{"prompt": hh_prompt("q"), "chosen": " a", "rejected": ""}]
    path = write_rows(tmp_path / "pairs.csv", rows)
    with caplog.at_level(logging.INFO, logger="rto_fast.trainer.data"):
        train, _ = load(config(path, test_split=None, max_bad_fraction=0.5), tokenizer, tmp_path)
    assert len(train) == 5 and "missing_field 1" in caplog.text


def test_too_many_malformed_rows_is_an_error_naming_a_row(tmp_path, tokenizer):
    rows = PAIRS[:8] + [{"prompt": hh_prompt("q"), "chosen": " same", "rejected": " same"}] + PAIRS[8:10]
    rows.insert(3, {"prompt": hh_prompt("q"), "chosen": " also", "rejected": " also"})
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError) as error:
        load(config(path, test_split=None, max_bad_fraction=0.1), tokenizer, tmp_path)
    message = str(error.value)
    assert isinstance(error.value, ValueError) and "\n" not in message
    assert "2 of 12 rows (16.7%)" in message and "identical_responses" in message
    assert "row 3" in message and "' also'" in message and "max_bad_fraction=0.1" in message
    # At or below the limit the same file loads.
    train, _ = load(config(path, test_split=None, max_bad_fraction=0.2), tokenizer, tmp_path)
    assert len(train) == 10


# ------------------------------------------------------------------------------------------------ validation

def test_validate_dataset_source_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        validate_dataset_source(config(tmp_path / "nothing.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        validate_dataset_source(config("./data/missing"))
    path = write_rows(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "answer": "b"}] * 3)
    with pytest.raises(DataError) as error:
        validate_dataset_source(config(path))
    assert "'rejected'" in str(error.value) and "prompt, chosen, answer" in str(error.value)
    assert "\n" not in str(error.value)
    validate_dataset_source(config(path), needed_format="prompt")  # prompts only need the prompt column
    with pytest.raises(DataError, match="no column 'prompt'"):
        validate_dataset_source(config(write_rows(tmp_path / "hh.parquet", HH_ROWS)))
    validate_dataset_source(config(tmp_path / "hh.parquet", format="hh-rlhf"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        validate_dataset_source(config(tmp_path / "notes.txt"))
    write_rows(tmp_path / "folder" / "validation.jsonl", PAIRS)
    with pytest.raises(DataError, match="no 'train' split"):
        validate_dataset_source(config(tmp_path / "folder"))
    validate_dataset_source(config("synthetic", format="hh-rlhf"))
    # Loading checks the same things.
    with pytest.raises(DataError, match="'rejected'"):
        load_preference_splits(config(path), build_tokenizer(), cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------------------ packing

def test_examples_feed_the_packer(tmp_path, tokenizer):
    train, _ = load(config(write_rows(tmp_path / "pairs.jsonl", PAIRS), test_split=None), tokenizer, tmp_path)
    sft = sft_sequence(train[0])
    assert sft.input_ids == train[0].prompt_ids + train[0].chosen_ids
    assert sft.label_mask == [False] * len(train[0].prompt_ids) + [True] * len(train[0].chosen_ids)
    sequences = [sequence for example in train for sequence in pair_sequences(example)]
    batches = build_micro_batches(sequences, max_tokens=256)
    trained = sum(int(batch.response_mask.sum()) for batch in batches)
    # Every response token is a label (predicted from the token before it); no prompt token is.
    assert trained == sum(len(example.chosen_ids) + len(example.rejected_ids) for example in train)
    labels = batches[0].labels[batches[0].labels != IGNORE_INDEX]
    assert int((labels == EOS).sum()) > 0 and int((labels == BOS).sum()) == 0


# ------------------------------------------------------------------------------------------------ synthetic task

def test_synthetic_task_is_deterministic(tmp_path):
    first = synthetic.write_synthetic_task(tmp_path / "a", seed=5, num_train=64, num_test=8)
    second = synthetic.write_synthetic_task(tmp_path / "b", seed=5, num_train=64, num_test=8)
    other = synthetic.write_synthetic_task(tmp_path / "c", seed=6, num_train=64, num_test=8)
    files = sorted(path.relative_to(first) for path in first.rglob("*.jsonl"))
    assert [str(path) for path in files] == ["hh/test.jsonl", "hh/train.jsonl", "preference/test.jsonl",
                                             "preference/train.jsonl", "prompts/test.jsonl", "prompts/train.jsonl"]
    for path in files:
        assert (first / path).read_bytes() == (second / path).read_bytes()
    assert (first / "preference/train.jsonl").read_bytes() != (other / "preference/train.jsonl").read_bytes()
    rows = [json.loads(line) for line in (first / "preference/train.jsonl").read_text().splitlines()]
    assert len(rows) == 64
    for row in rows:
        assert len(row["prompt"].encode()) <= 28 and len(row["chosen"].encode()) <= 10
        assert row["chosen"] != row["rejected"]
        assert row["chosen_reward"] == synthetic.true_reward(row["prompt"], row["chosen"])


def test_true_reward_is_a_sum_of_token_rewards():
    prompt = synthetic.HUMAN + "abca" + synthetic.ASSISTANT
    assert synthetic.prompt_word(prompt) == "abca"
    # space 0; a, c, b in the word: +1 each; eos after letters: +0.5
    assert synthetic.token_rewards(prompt, " acb") == [0.0, 1.0, 1.0, 1.0, 0.5]
    # h is not in the word: -1; a 5th letter is past L = 4: -1; not finished: no end term
    assert synthetic.token_rewards(prompt, " ahaaa", finished=False) == [0.0, 1.0, -1.0, 1.0, 1.0, -1.0]
    assert synthetic.token_rewards(prompt, "a!") == [1.0, -1.0, 0.5]
    assert synthetic.true_reward(prompt, "") == -1.0
    assert synthetic.true_reward(prompt, synthetic.best_response(prompt)) == 4.5
    rng = random.Random(0)
    for _ in range(200):
        prompt = synthetic.make_prompt(rng)
        response = synthetic.sample_base_response(prompt, rng)
        rewards = synthetic.token_rewards(prompt, response)
        assert len(rewards) == len(response) + 1  # one term per byte (= token) and one for the end
        assert synthetic.true_reward(prompt, response) == sum(rewards)
        assert synthetic.true_reward(prompt, response) <= synthetic.true_reward(prompt,
                                                                                synthetic.best_response(prompt))


def test_bradley_terry_labels_agree_with_true_reward(tmp_path):
    folder = synthetic.write_synthetic_task(tmp_path, seed=1, num_train=2000, num_test=0)
    rows = [json.loads(line) for line in (folder / "preference/train.jsonl").read_text().splitlines()]
    decided = [row for row in rows if row["chosen_reward"] != row["rejected_reward"]]
    assert len(decided) == len(rows)  # no ties: a tie carries no preference
    agree = sum(row["chosen_reward"] > row["rejected_reward"] for row in decided) / len(decided)
    assert 0.85 < agree < 0.99  # mostly right, yet noisy as Bradley-Terry sampling is
    # The recorded probability is the Bradley-Terry one, and the agreement is what Bradley-Terry predicts:
    # a pair is labelled as r* orders it with probability sigmoid(|r*(y1) - r*(y2)|) (binomial std ~0.008 here).
    for row in rows:
        expected = synthetic.preference_probability(row["chosen_reward"], row["rejected_reward"],
                                                   synthetic.TEMPERATURE)
        assert row["p_chosen"] == pytest.approx(expected, abs=1e-6)
    predicted = sum(synthetic.preference_probability(abs(row["chosen_reward"] - row["rejected_reward"]), 0.0,
                                                     synthetic.TEMPERATURE)
                    for row in decided) / len(decided)
    assert abs(predicted - agree) < 0.03
    transcripts = [json.loads(line) for line in (folder / "hh/train.jsonl").read_text().splitlines()]
    assert transcripts[0]["chosen"] == rows[0]["prompt"] + rows[0]["chosen"]


def test_synthetic_source_in_every_format(tmp_path, tokenizer):
    cfg = config("synthetic", max_train_samples=32, max_eval_samples=8)
    validate_dataset_source(cfg)
    preference = load(cfg, tokenizer, tmp_path)
    hh = load(config("synthetic", format="hh-rlhf", max_train_samples=32, max_eval_samples=8), tokenizer, tmp_path)
    assert preference == hh and len(preference[0]) == 32 and len(preference[1]) == 8
    prompts, test_prompts = load_prompt_splits(config("synthetic", format="prompt", max_eval_samples=4), tokenizer,
                                               cache_dir=tmp_path / "cache")
    assert len(prompts) == data.SYNTHETIC_NUM_TRAIN and len(test_prompts) == 4
    assert all(synthetic.prompt_word(example.prompt) for example in prompts)
