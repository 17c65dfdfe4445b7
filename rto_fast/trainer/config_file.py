"""Reading the configuration: defaults, then a YAML file, then dotted `key=value` overrides, checked against the schema
(`rto_fast.trainer.config`); writing it back; the `--help` text.

Usage:
    config = load_config("configs/tiny.yaml", ["sft.lr=1e-4", "stages=[sft,dpo]", "runtime.device=cpu"])
    save_config(config, "runs/x/config.yaml")      # the resolved config, every field
    print(config_help())                          # every option with its type, default and meaning (`--help`)

A YAML file sets only what differs from the defaults. Unknown keys raise ConfigError naming the full dotted key and
the closest valid one; values of the wrong type raise ConfigError naming the key, the expected and the given type
(an int where a float is expected is accepted). Override values are parsed as YAML scalars or lists
(`stages=[sft,dpo]`, `stages=sft,dpo`, `runtime.deepspeed=null`); a field of type str takes the text as written.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from .config import Config, ConfigError, validate

# Names people carry over from other trainers, mapped to ours, for the "did you mean" hint.
KEY_ALIASES = {
    "learning_rate": "lr", "grad_clip": "max_grad_norm", "clip_grad_norm": "max_grad_norm",
    "gradient_accumulation_steps": "grad_accumulation", "gradient_accumulation": "grad_accumulation",
    "num_epochs": "epochs", "num_train_epochs": "epochs", "warmup": "warmup_ratio", "seq_len": "max_prompt_length",
    "model_name": "name_or_path", "model_path": "name_or_path", "dataset": "source", "output": "output_dir",
    "torch_dtype": "dtype", "precision": "dtype", "micro_batch_size": "micro_batch_tokens",
}


# ------------------------------------------------------------------------------------------------ typing helpers

@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(annotation) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _union_members(annotation) -> tuple | None:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return None


def _type_name(annotation) -> str:
    members = _union_members(annotation)
    if members is not None:
        return " or ".join("null" if member is type(None) else _type_name(member) for member in members)
    if typing.get_origin(annotation) is list:
        return f"list[{_type_name(typing.get_args(annotation)[0])}]"
    return getattr(annotation, "__name__", str(annotation))


def _value_type(value) -> str:
    return "null" if value is None else type(value).__name__


def _all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for name, annotation in _hints(cls).items():
        key = f"{prefix}{name}"
        if _is_section(annotation):
            keys.extend(_all_keys(annotation, key + "."))
        else:
            keys.append(key)
    return keys


def _suggest(key: str, cls) -> str:
    """' (did you mean X?)' with the closest valid dotted key: by the whole key, else by its last part anywhere."""
    valid = _all_keys()
    leaf = key.rsplit(".", 1)[-1]
    if KEY_ALIASES.get(leaf) in _hints(cls):
        return f" (did you mean '{key[: len(key) - len(leaf)]}{KEY_ALIASES[leaf]}'?)"
    sections = [name for name, annotation in _hints(Config).items() if _is_section(annotation)]
    match = difflib.get_close_matches(key, valid + sections, n=1, cutoff=0.6)
    if not match:
        by_leaf = {candidate.rsplit(".", 1)[-1]: candidate for candidate in reversed(valid)}
        close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        match = [by_leaf[close[0]]] if close else []
    if match:
        return f" (did you mean '{match[0]}'?)"
    return f"; valid keys here: {', '.join(sorted(_hints(cls)))}"


def _coerce(value, annotation, key: str):
    """`value` as `annotation`, or ConfigError naming the key and both types."""
    members = _union_members(annotation)
    if members is not None:
        if value is None and type(None) in members:
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _coerce(value, member, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {_value_type(value)} ({value!r})")
    origin = typing.get_origin(annotation)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {_value_type(value)} ({value!r})")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected dict, got {_value_type(value)} ({value!r})")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        # YAML reads 1e-5 as a string (no dot in the mantissa): accept the numeric spellings.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config annotation {annotation!r} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {_value_type(value)} ({value!r})")


def _accepts_str(annotation) -> bool:
    members = _union_members(annotation)
    return annotation is str or (members is not None and str in members)


def _build(cls, values: dict | None, prefix: str = ""):
    """An instance of dataclass `cls` from a (possibly partial) mapping, recursively, with checks."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_value_type(values)}")
    hints = _hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise ConfigError(f"unknown config key '{key}'{_suggest(key, cls)}")
        annotation = hints[name]
        if _is_section(annotation):
            kwargs[name] = _build(annotation, value, key + ".")
        else:
            kwargs[name] = _coerce(value, annotation, key)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, raw: str) -> None:
    """Apply one `key=raw` override to the nested mapping `tree`, checking the key against the dataclasses."""
    parts = key.split(".")
    cls = Config
    node = tree
    for depth, part in enumerate(parts):
        hints = _hints(cls)
        dotted = ".".join(parts[: depth + 1])
        if part not in hints:
            raise ConfigError(f"unknown config key '{key}'{_suggest(key, cls)}")
        annotation = hints[part]
        last = depth == len(parts) - 1
        if _is_section(annotation):
            if last:
                example = next(iter(_hints(annotation)))
                raise ConfigError(f"'{key}' is a section; set one of its keys, e.g. {key}.{example}=...")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: expected a mapping")
            cls = annotation
            continue
        if not last:
            raise ConfigError(f"unknown config key '{key}': '{dotted}' is not a section")
        node[part] = _parse_override(raw, annotation)


def _parse_override(raw: str, annotation):
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is not None and not isinstance(value, str) and _accepts_str(annotation) \
            and not isinstance(value, (dict, list)):
        return raw  # a path or name that YAML would read as a number or a date
    if isinstance(value, str) and typing.get_origin(annotation) is list:
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


# ------------------------------------------------------------------------------------------------ public API

def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                checked: bool = True) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `key=value` overrides; ConfigError for unknown keys and
    wrong types, and (`checked`, the default) for values that cannot work (`config.validate`)."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {' '.join(str(error).split())}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {_value_type(loaded)}")
        tree = loaded or {}
    # Validate the file's keys and types before the overrides touch the tree.
    _build(Config, tree)
    for override in overrides:
        key, separator, raw = override.partition("=")
        if not separator or not key.strip():
            raise ConfigError(f"override {override!r} is not of the form key=value")
        _set_dotted(tree, key.strip(), raw.strip())
    config = _build(Config, tree)
    return validate(config) if checked else config


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config (every field) as YAML; `load_config(path)` gives the same config back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None), encoding="utf-8")


def config_help() -> str:
    """Every option, section by section: dotted key, type, default, meaning and allowed values."""
    lines = ["Configuration (YAML file sets what differs from these defaults; override with key=value):", ""]

    def describe(cls, prefix: str) -> None:
        hints = _hints(cls)
        for item in dataclasses.fields(cls):
            annotation = hints[item.name]
            if _is_section(annotation):
                continue
            default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
            default_text = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            text = f"  {prefix}{item.name} ({_type_name(annotation)}, default {default_text}): {item.metadata['help']}"
            choices = item.metadata.get("choices")
            if choices:
                names = ["null" if choice is None else str(choice) for choice in choices]
                text += f" [one of: {', '.join(names)}]"
            lines.append(text)

    describe(Config, "")
    for item in dataclasses.fields(Config):
        annotation = _hints(Config)[item.name]
        if _is_section(annotation):
            lines.append("")
            lines.append(f"{item.name}: {(annotation.__doc__ or '').strip().splitlines()[0]}")
            describe(annotation, f"{item.name}.")
    return "\n".join(lines)
