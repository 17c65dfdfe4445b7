"""The trainer's data layer: preference and prompt data from the Hub or local files, tokenized for packing.

Usage:
    validate_dataset_source(config.data)                        # before any model loads: source and columns exist
    train, test = load_preference_splits(config.data, tokenizer, cache_dir="runs/x/data", seed=0)
    train[0].prompt_ids, train[0].chosen_ids, train[0].rejected_ids, train[0].row   # plain lists of ints
    sft_sequence(train[0])        # TokenizedSequence(prompt + chosen, label_mask True on the response only)
    pair_sequences(train[0])      # [chosen, rejected] TokenizedSequences, as DPO and RM pack them
    prompts, test_prompts = load_prompt_splits(config.data, tokenizer)   # PromptExample(prompt_ids, prompt, row)

Sources (`data.source`):
- a bundled task (`rto_fast.tasks`): `synthetic` (the letters task, any format) or `credit` (the long-horizon credit
  task, formats preference and prompt), written as jsonl under `cache_dir`.
- a local file ending .jsonl, .json, .parquet or .csv: its rows are the training split;
- a local folder: split files found by `datasets`' naming rules (`train.jsonl`, `test.parquet`,
  `data/train-00000-of-00001.parquet`, ...);
- anything else is a Hub dataset name, loaded with `load_dataset(name, split=..., data_dir=data.data_dir)` into the
  usual HF cache (data_dir picks a subfolder, e.g. `helpful-base` of Anthropic/hh-rlhf).
Local files are read with `load_dataset("json" | "parquet" | "csv", data_files=...)`, caching into `cache_dir`
when given. When the test split (`data.test_split`) does not exist, a test split is carved out of the training rows:
`DEFAULT_TEST_FRACTION` of them (at most `data.max_eval_samples`), chosen with `seed`, removed from training.

Formats (`data.format`):
- `hh-rlhf`: columns `chosen` / `rejected` hold whole transcripts of "\\n\\nHuman: ..." / "\\n\\nAssistant: ..."
  turns. The prompt is everything up to and including the last "\\n\\nAssistant:" of chosen; the responses are the
  rest. Both transcripts must end on the same prompt.
- `preference`: columns `prompt` / `chosen` / `rejected`, each a string (used verbatim) or chat messages
  `[{"role": ..., "content": ...}]`. A message prompt is rendered with the tokenizer's chat template and
  `add_generation_prompt=True`; a message response (one assistant message, optionally preceded by the prompt's
  messages) is what the template adds after that prompt (e.g. " text<eos>"), or the message text when the
  template does not extend the prompt.
- `prompt`: a `prompt` column (string or messages), for RL. `load_prompt_splits` also takes the prompts of
  preference or HH data.
Column names come from `data.prompt_field`, `data.chosen_field`, `data.rejected_field`.

Tokens: prompts start with the tokenizer's bos token when it has one (not doubled when the text or template already
put it there); responses end with eos (not doubled). Truncation (`data.truncation`):
- `truncate` (default): a prompt keeps its LAST `max_prompt_length` tokens (the end of a conversation matters most;
  a leading bos stays in front); a response keeps its FIRST `max_response_length` tokens, so a cut response loses
  its eos (it did not end). A pair whose responses become identical after the cut is skipped as malformed.
- `drop`: rows with a prompt or a response over its limit are skipped and counted as `too_long`; they do not count
  as malformed.
So every sequence has at most max_prompt_length + max_response_length tokens.

Malformed rows (a missing field, a non-string where a string is needed, an empty prompt or response, identical
chosen and rejected, a transcript without an Assistant turn, transcripts with different prompts, bad chat
messages) are skipped and counted by reason; the counts go to the `rto_fast.data` log. When the malformed fraction
of a split exceeds `data.max_bad_fraction`, `DataError` (a ValueError) says which reason, what fraction and shows
one example row. Everything that reaches the trainer is well formed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from ..tasks import TASKS, get_task
from .config import looks_like_path
from .packing import TokenizedSequence

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
# Share of the training rows carved out as the test split when the source has none.
DEFAULT_TEST_FRACTION = 0.05
# A bundled task is the same task in every run: its seed is fixed, runtime.seed only orders the data.
SYNTHETIC_SEED = 0
SYNTHETIC_NUM_TRAIN = 2048
SYNTHETIC_NUM_TEST = 256
CHUNK_ROWS = 1024  # rows tokenized per call of the tokenizer
EXCERPT_CHARS = 100


class DataError(ValueError):
    """Data that cannot be used: a missing source or column, too many malformed rows. The message is one line."""


@dataclass
class PreferenceExample:
    """One preference pair as token ids; `row` is the row's index in its split as loaded (for messages)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    row: int = -1


@dataclass
class PromptExample:
    """One prompt for RL: its token ids, its text (as rendered, before tokenization) and its row index."""

    prompt_ids: list[int]
    prompt: str
    row: int = -1


def sft_sequence(example: PreferenceExample) -> TokenizedSequence:
    """prompt + chosen, trained on the chosen response tokens only."""
    return _sequence(example.prompt_ids, example.chosen_ids)


def pair_sequences(example: PreferenceExample) -> list[TokenizedSequence]:
    """[prompt + chosen, prompt + rejected], each trained on its response tokens only."""
    return [_sequence(example.prompt_ids, example.chosen_ids), _sequence(example.prompt_ids, example.rejected_ids)]


def _sequence(prompt_ids: list[int], response_ids: list[int]) -> TokenizedSequence:
    return TokenizedSequence(list(prompt_ids) + list(response_ids), [False] * len(prompt_ids) + [True] *
                             len(response_ids))


# ------------------------------------------------------------------------------------------------ sources

@dataclass
class _Source:
    kind: str  # "file", "folder" or "hub"
    location: str  # path or Hub name
    label: str  # how messages name it: data.source as the user wrote it
    data_dir: str | None = None  # a Hub dataset's subfolder (data.data_dir)


def _resolve_source(data_cfg, data_format: str, cache_dir: str | os.PathLike | None, write: bool) -> _Source:
    """Where the rows come from. `write`: materialise a bundled task (loading); validation only checks."""
    source = data_cfg.source
    task = get_task(source)
    if task is not None:
        folder = _task_folder(task.name, cache_dir)
        if data_format not in task.format_folders:
            raise DataError(f"data.format {data_format!r}: the bundled task {source!r} is written in the formats "
                            f"{', '.join(task.format_folders)}")
        if write:
            task.write_task(folder, seed=SYNTHETIC_SEED, num_train=SYNTHETIC_NUM_TRAIN, num_test=SYNTHETIC_NUM_TEST)
        return _Source("folder", str(folder / task.format_folders[data_format]), source)
    if not source or not source.strip():
        raise DataError("data.source is empty: give a Hub dataset name, a local file or folder, or a bundled task "
                        f"({', '.join(TASKS)})")
    path = Path(source).expanduser()
    if path.is_dir():
        return _Source("folder", str(path), source)
    if path.is_file():
        if path.suffix.lower() not in LOCAL_BUILDERS:
            raise DataError(f"data.source {source!r}: unsupported file type {path.suffix!r}; use one of "
                            f"{', '.join(LOCAL_BUILDERS)}")
        return _Source("file", str(path), source)
    if looks_like_path(source):
        raise DataError(f"data.source {source!r} does not exist (and is not a Hub dataset name like 'org/name')")
    return _Source("hub", source, source, getattr(data_cfg, "data_dir", None))


def _task_folder(name: str, cache_dir) -> Path:
    base = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "rto_fast-data"
    return base / f"{name}-seed{SYNTHETIC_SEED}-{SYNTHETIC_NUM_TRAIN}-{SYNTHETIC_NUM_TEST}"


@contextlib.contextmanager
def _quiet_datasets():
    """No `datasets` progress bars in the trainer's output."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _split_names(source: _Source, train_split: str) -> list[str] | None:
    """The splits a source has; None when that cannot be known without loading (Hub)."""
    if source.kind == "file":
        return [train_split]
    if source.kind == "folder":
        with _quiet_datasets() as datasets:
            try:
                return list(datasets.get_dataset_split_names(source.location))
            except Exception as error:  # datasets raises several types for unreadable folders
                raise DataError(f"data.source {source.label!r}: cannot read the folder's data files: "
                                f"{_one_line(error)}") from None
    return None


def _load_arguments(source: _Source, split: str, cache_dir) -> tuple[tuple, dict]:
    if source.kind == "file":
        builder = LOCAL_BUILDERS[Path(source.location).suffix.lower()]
        return (builder,), {"data_files": {split: source.location}, "split": split, "cache_dir": _cache(cache_dir)}
    if source.kind == "folder":
        return (source.location,), {"split": split, "cache_dir": _cache(cache_dir)}
    # Hub data goes to the shared HF cache, so every run reuses one download.
    return (source.location,), {"split": split, **({"data_dir": source.data_dir} if source.data_dir else {})}


def _cache(cache_dir) -> str | None:
    return None if cache_dir is None else str(Path(cache_dir) / "datasets")


def _load_split(source: _Source, split: str, cache_dir, train_split: str):
    """The split as a `datasets.Dataset`, or None when the source has no such split."""
    names = _split_names(source, train_split)
    if names is not None and split not in names:
        return None
    args, kwargs = _load_arguments(source, split, cache_dir)
    with _quiet_datasets() as datasets:
        try:
            return datasets.load_dataset(*args, **kwargs)
        except ValueError as error:
            if source.kind == "hub" and "Unknown split" in str(error):
                return None
            raise DataError(f"data.source {source.label!r} ({split} split) cannot be loaded: {_one_line(error)}") \
                from None
        except Exception as error:
            raise DataError(f"data.source {source.label!r} ({split} split) cannot be loaded: {_one_line(error)}") \
                from None


def _required_columns(data_cfg, data_format: str) -> list[str]:
    if data_format == "hh-rlhf":
        return [data_cfg.chosen_field, data_cfg.rejected_field]
    if data_format == "preference":
        return [data_cfg.prompt_field, data_cfg.chosen_field, data_cfg.rejected_field]
    if data_format == "prompt":
        return [data_cfg.prompt_field]
    raise DataError(f"data.format must be one of hh-rlhf, preference, prompt, got {data_format!r}")


def _check_columns(source: _Source, data_format: str, columns: list[str], data_cfg, split: str) -> None:
    missing = [name for name in _required_columns(data_cfg, data_format) if name not in columns]
    if missing:
        raise DataError(f"data.source {source.label!r} ({split} split) has no column "
                        f"{', '.join(repr(name) for name in missing)} needed by data.format={data_format!r}; "
                        f"its columns: {', '.join(columns) or 'none'}")


def validate_dataset_source(data_cfg, needed_format: str | None = None) -> None:
    """Check, without loading any model or the whole data set, that `data_cfg.source` exists, has the training
    split and the columns `needed_format` (default: `data_cfg.format`) reads. Raises DataError (one line)."""
    data_format = needed_format or data_cfg.format
    _required_columns(data_cfg, data_format)  # an unknown format is an error here too
    task = get_task(data_cfg.source)
    if task is not None:  # written by the package itself
        if data_format not in task.format_folders:
            raise DataError(f"data.format {data_format!r}: the bundled task {data_cfg.source!r} is written in the "
                            f"formats {', '.join(task.format_folders)}")
        return
    source = _resolve_source(data_cfg, data_format, None, write=False)
    split = data_cfg.train_split
    names = _split_names(source, split)
    if names is not None and split not in names:
        raise DataError(f"data.source {source.label!r} has no {split!r} split (data.train_split); its splits: "
                        f"{', '.join(names)}")
    args, kwargs = _load_arguments(source, split, None)
    kwargs.pop("cache_dir", None)
    with _quiet_datasets() as datasets:
        try:
            # Streaming reads only the first rows (and, for parquet, the schema).
            stream = datasets.load_dataset(*args, **kwargs, streaming=True)
            features = stream.features
            first = None if features is not None else next(iter(stream), None)
        except Exception as error:
            where = "not a local file or folder, and as a Hub dataset" if source.kind == "hub" else "it"
            raise DataError(f"data.source {source.label!r}: {where} cannot be opened: {_one_line(error)}") from None
    if features is not None:
        columns = list(features)
    elif first is not None:
        columns = list(first)
    else:
        raise DataError(f"data.source {source.label!r} ({split} split) has no rows")
    _check_columns(source, data_format, columns, data_cfg, split)


# ------------------------------------------------------------------------------------------------ parsing rows

class _Malformed(Exception):
    """A row that cannot be used; args[0] is the reason counted in the log."""


def _text(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        raise _Malformed("missing_field")
    if not isinstance(value, str):
        raise _Malformed("not_a_string")
    return value


def _split_hh(transcript: str) -> tuple[str, str]:
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise _Malformed("no_assistant_turn")
    cut += len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


def _parse_hh(row: dict, data_cfg) -> tuple[str, list[str]]:
    chosen = _text(row, data_cfg.chosen_field)
    rejected = _text(row, data_cfg.rejected_field)
    prompt, chosen_response = _split_hh(chosen)
    rejected_prompt, rejected_response = _split_hh(rejected)
    if rejected_prompt != prompt:
        raise _Malformed("prompt_mismatch")
    if not prompt[: -len(HH_ASSISTANT)].replace(HH_HUMAN, "").strip():
        raise _Malformed("empty_prompt")
    return prompt, [chosen_response, rejected_response]


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _Malformed("bad_messages")
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise _Malformed("bad_messages")
    return [{"role": message["role"], "content": message["content"]} for message in value]


class _Renderer:
    """Chat-template rendering, checked once per tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise DataError("the data has chat-message columns but the tokenizer has no chat template "
                            "(model.tokenizer)")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception:  # jinja raises for unknown roles and the like: that row is malformed
            raise _Malformed("bad_messages") from None


def _prompt_text(value: Any, renderer: _Renderer) -> tuple[str, list[dict] | None]:
    """(rendered prompt, its messages or None for a plain string)."""
    if value is None:
        raise _Malformed("missing_field")
    if isinstance(value, str):
        if not value.strip():
            raise _Malformed("empty_prompt")
        return value, None
    if isinstance(value, (list, tuple)):
        messages = _messages(value)
        if messages[-1]["role"] == "assistant" or not any(m["content"].strip() for m in messages):
            raise _Malformed("empty_prompt" if not any(m["content"].strip() for m in messages) else "bad_messages")
        return renderer.render(messages, add_generation_prompt=True), messages
    raise _Malformed("not_a_string")


def _response_text(value: Any, prompt: str, prompt_messages: list[dict] | None, renderer: _Renderer) -> str:
    if value is None:
        raise _Malformed("missing_field")
    if isinstance(value, str):
        if not value.strip():
            raise _Malformed("empty_response")
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _Malformed("not_a_string")
    messages = _messages(value)
    if prompt_messages and len(messages) > len(prompt_messages) and messages[: len(prompt_messages)] == \
            prompt_messages:
        messages = messages[len(prompt_messages):]  # a whole conversation: keep what follows the prompt
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise _Malformed("bad_messages")
    content = messages[0]["content"]
    if not content.strip():
        raise _Malformed("empty_response")
    if prompt_messages is None:
        return content
    full = renderer.render(prompt_messages + messages, add_generation_prompt=False)
    # What the template appends after the generation prompt (" text<eos>" here, "text<|im_end|>\n" elsewhere).
    return full[len(prompt):] if full.startswith(prompt) and len(full) > len(prompt) else content


def _parse_preference(row: dict, data_cfg, renderer: _Renderer) -> tuple[str, list[str]]:
    prompt, prompt_messages = _prompt_text(row.get(data_cfg.prompt_field), renderer)
    responses = [_response_text(row.get(name), prompt, prompt_messages, renderer)
                 for name in (data_cfg.chosen_field, data_cfg.rejected_field)]
    return prompt, responses


def _parse_row(row: dict, data_format: str, data_cfg, renderer: _Renderer, need_responses: bool):
    if data_format == "hh-rlhf":
        prompt, responses = _parse_hh(row, data_cfg)
    elif data_format == "preference":
        prompt, responses = _parse_preference(row, data_cfg, renderer)
    else:
        prompt, _ = _prompt_text(row.get(data_cfg.prompt_field), renderer)
        return prompt, []
    if need_responses:
        if any(not response.strip() for response in responses):
            raise _Malformed("empty_response")
        if responses[0] == responses[1]:
            raise _Malformed("identical_responses")
    return prompt, responses


# ------------------------------------------------------------------------------------------------ tokenizing

def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def truncate_prompt(prompt_ids: list[int], max_length: int, bos_id: int | None) -> list[int]:
    """The last `max_length` tokens, with a leading bos kept in front."""
    if len(prompt_ids) <= max_length:
        return prompt_ids
    if bos_id is not None and prompt_ids and prompt_ids[0] == bos_id and max_length > 1:
        return [bos_id] + prompt_ids[len(prompt_ids) - (max_length - 1):]
    return prompt_ids[len(prompt_ids) - max_length:]


def truncate_response(response_ids: list[int], max_length: int) -> list[int]:
    """The first `max_length` tokens (a cut response loses its eos)."""
    return response_ids[:max_length]


@dataclass
class _SplitReport:
    """What happened to the rows of one split."""

    split: str
    pairs: bool = True  # rows read as preference pairs (else as prompts)
    rows: int = 0
    kept: int = 0

    def __post_init__(self):
        self.malformed: Counter = Counter()
        self.skipped: Counter = Counter()
        self.example_row: dict[str, tuple[int, dict]] = {}

    def count(self, counter: Counter, reason: str, index: int, row: dict) -> None:
        counter[reason] += 1
        self.example_row.setdefault(reason, (index, row))


def _excerpt(row: dict) -> str:
    text = repr(row)
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."


def _process_rows(dataset, indices: list[int], data_cfg, data_format: str, tokenizer, split: str,
                  want_responses: bool, limit: int | None, label: str) -> tuple[list, _SplitReport]:
    """Parse, tokenize and truncate dataset[indices] until `limit` examples are kept; skip and count bad rows."""
    renderer = _Renderer(tokenizer)
    report = _SplitReport(split, pairs=want_responses)
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    max_prompt, max_response = data_cfg.max_prompt_length, data_cfg.max_response_length
    drop = data_cfg.truncation == "drop"
    examples: list = []
    seen_prompts: set[str] = set()
    for start in range(0, len(indices), CHUNK_ROWS):
        if limit is not None and len(examples) >= limit:
            break
        chunk = indices[start:start + CHUNK_ROWS]
        batch = dataset[chunk[0]:chunk[-1] + 1] if chunk == list(range(chunk[0], chunk[-1] + 1)) \
            else dataset.select(chunk)[:]
        columns = list(batch)
        rows = [dict(zip(columns, values)) for values in zip(*(batch[name] for name in columns))]
        parsed = []  # (index, row, prompt, responses)
        for index, row in zip(chunk, rows):
            report.rows += 1
            try:
                prompt, responses = _parse_row(row, data_format, data_cfg, renderer, want_responses)
            except _Malformed as reason:
                report.count(report.malformed, reason.args[0], index, row)
                continue
            if not want_responses and data_format != "prompt":
                if prompt in seen_prompts:
                    report.count(report.skipped, "duplicate_prompt", index, row)
                    continue
                seen_prompts.add(prompt)
            if not want_responses:
                responses = []
            parsed.append((index, row, prompt, responses))
        prompt_ids = _token_ids(tokenizer, [item[2] for item in parsed])
        response_ids = _token_ids(tokenizer, [text for item in parsed for text in item[3]])
        for position, (index, row, prompt, responses) in enumerate(parsed):
            if limit is not None and len(examples) >= limit:
                break
            prompt_tokens = prompt_ids[position]
            if bos_id is not None and (not prompt_tokens or prompt_tokens[0] != bos_id):
                prompt_tokens = [bos_id] + prompt_tokens
            response_tokens = response_ids[2 * position: 2 * position + 2] if want_responses else []
            if eos_id is not None:
                response_tokens = [ids if ids and ids[-1] == eos_id else ids + [eos_id] for ids in response_tokens]
            too_long = len(prompt_tokens) > max_prompt or any(len(ids) > max_response for ids in response_tokens)
            if too_long and drop:
                report.count(report.skipped, "too_long", index, row)
                continue
            prompt_tokens = truncate_prompt(prompt_tokens, max_prompt, bos_id)
            response_tokens = [truncate_response(ids, max_response) for ids in response_tokens]
            if want_responses:
                if response_tokens[0] == response_tokens[1]:
                    report.count(report.malformed, "identical_after_truncation", index, row)
                    continue
                examples.append(PreferenceExample(prompt_tokens, *response_tokens, row=index))
            else:
                examples.append(PromptExample(prompt_tokens, prompt, row=index))
            report.kept += 1
    # Rows parsed but beyond the limit were neither kept nor bad: the fraction is over the rows actually judged.
    judged = report.kept + sum(report.malformed.values()) + sum(report.skipped.values())
    report.rows = judged
    _log_and_check(report, data_cfg, label)
    return examples, report


def _log_and_check(report: _SplitReport, data_cfg, label: str) -> None:
    parts = [f"{reason} {count}" for reason, count in (report.malformed + report.skipped).most_common()]
    # Pairs (sft, dpo, rm) and prompts (RL, eval) are read separately, often from the same source: say which this is.
    what = "preference pairs" if report.pairs else "prompts"
    message = f"data {label!r} {report.split} {what}: kept {report.kept} of {report.rows} rows"
    if parts:
        message += "; skipped: " + ", ".join(parts)
    (logger.warning if report.malformed else logger.info)(message)
    bad = sum(report.malformed.values())
    if report.rows and bad / report.rows > data_cfg.max_bad_fraction:
        reason, count = report.malformed.most_common(1)[0]
        index, row = report.example_row[reason]
        raise DataError(f"data.source {label!r} ({report.split} split): {bad} of {report.rows} rows "
                        f"({bad / report.rows:.1%}) are malformed, above data.max_bad_fraction="
                        f"{data_cfg.max_bad_fraction}; most common: {reason} ({count} rows), e.g. row {index}: "
                        f"{_excerpt(row)}")
    if report.rows and report.kept == 0:
        reason, count = (report.malformed + report.skipped).most_common(1)[0]
        index, row = report.example_row[reason]
        hint = " (raise data.max_prompt_length / data.max_response_length or use data.truncation=truncate)" \
            if reason == "too_long" else ""
        raise DataError(f"data.source {label!r} ({report.split} split): no usable rows; all {report.rows} were "
                        f"skipped, most as {reason}{hint}, e.g. row {index}: {_excerpt(row)}")


# ------------------------------------------------------------------------------------------------ loading

def _carve(num_rows: int, seed: int, max_test: int | None, fraction: float) -> tuple[list[int], list[int]]:
    """(train rows, test rows): a seeded random `fraction` of the rows (at most max_test) becomes the test split."""
    num_test = int(round(fraction * num_rows))
    if max_test is not None:
        num_test = min(num_test, max_test)
    num_test = min(max(num_test, 1 if num_rows >= 2 else 0), num_rows - 1)
    if num_test <= 0:
        return list(range(num_rows)), []
    test = set(random.Random(seed).sample(range(num_rows), num_test))
    return [i for i in range(num_rows) if i not in test], sorted(test)


def _load(data_cfg, tokenizer, cache_dir, seed: int, want_responses: bool):
    data_format = data_cfg.format
    source = _resolve_source(data_cfg, data_format, cache_dir, write=True)
    label = source.label
    train_split, test_split = data_cfg.train_split, data_cfg.test_split
    train = _load_split(source, train_split, cache_dir, train_split)
    if train is None:
        raise DataError(f"data.source {label!r} has no {train_split!r} split (data.train_split)")
    _check_columns(source, data_format, list(train.column_names), data_cfg, train_split)
    train_rows = list(range(len(train)))
    test, test_rows = None, []
    wants_test = test_split is not None and data_cfg.max_eval_samples != 0
    if wants_test:
        test = _load_split(source, test_split, cache_dir, train_split) if test_split != train_split else None
        if test is not None:
            _check_columns(source, data_format, list(test.column_names), data_cfg, test_split)
            test_rows = list(range(len(test)))
        else:
            fraction = getattr(data_cfg, "test_fraction", DEFAULT_TEST_FRACTION)
            train_rows, test_rows = _carve(len(train), seed, data_cfg.max_eval_samples, fraction)
            test = train
            logger.info("data %r has no %r split: %d of %d training rows (seed %d) are the test split", label,
                        test_split, len(test_rows), len(train), seed)
    train_examples, _ = _process_rows(train, train_rows, data_cfg, data_format, tokenizer, train_split,
                                      want_responses, data_cfg.max_train_samples, label)
    test_examples = []
    if test is not None and test_rows:
        test_examples, _ = _process_rows(test, test_rows, data_cfg, data_format, tokenizer, test_split,
                                         want_responses, data_cfg.max_eval_samples, label)
    return train_examples, test_examples


def load_preference_splits(data_cfg, tokenizer, cache_dir: str | os.PathLike | None = None,
                           seed: int = 0) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """(train, test) PreferenceExamples of an `hh-rlhf` or `preference` source, tokenized and truncated.

    The test list is empty when `data.test_split` is null or `data.max_eval_samples` is 0. `seed` picks the rows
    of a carved test split. Raises DataError (one line) for a missing source, split or column, or too many
    malformed rows."""
    if data_cfg.format == "prompt":
        raise DataError("data.format 'prompt' has no responses; the sft, dpo and rm stages need 'preference' or "
                        "'hh-rlhf' data")
    return _load(data_cfg, tokenizer, cache_dir, seed, want_responses=True)


def load_prompt_splits(data_cfg, tokenizer, cache_dir: str | os.PathLike | None = None,
                       seed: int = 0) -> tuple[list[PromptExample], list[PromptExample]]:
    """(train, test) PromptExamples for RL: the prompts of any format (from preference or HH data, each distinct
    prompt once; a prompt-format source as it is)."""
    return _load(data_cfg, tokenizer, cache_dir, seed, want_responses=False)


def example_lengths(examples: list) -> list[int]:
    """Tokens per example as the stages pack it (prompt + both responses of a pair; the prompt of a PromptExample)."""
    lengths = []
    for example in examples:
        if isinstance(example, PreferenceExample):
            lengths.append(2 * len(example.prompt_ids) + len(example.chosen_ids) + len(example.rejected_ids))
        else:
            lengths.append(len(example.prompt_ids))
    return lengths


__all__ = ["DataError", "PreferenceExample", "PromptExample", "validate_dataset_source", "load_preference_splits",
           "load_prompt_splits", "sft_sequence", "pair_sequences", "truncate_prompt", "truncate_response",
           "example_lengths", "DEFAULT_TEST_FRACTION", "SYNTHETIC"]
