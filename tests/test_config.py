"""Trainer config: YAML + dotted overrides, unknown keys with suggestions, type checks, round trip, help text."""

import dataclasses

import pytest
import yaml

from rto_fast.trainer import config_file as config_module
from rto_fast.trainer.config import STAGES, Config, ConfigError
from rto_fast.trainer.config_file import config_help, load_config, save_config


def write_yaml(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file():
    config = load_config()
    assert config == Config()
    assert config.stages == ["sft", "dpo"]
    assert config.model.name_or_path == "tiny"
    assert set(config.stages) <= set(STAGES)


def test_yaml_then_overrides(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", """
stages: [sft]
model:
  dtype: bf16
sft:
  lr: 3.0e-4
  batch_size: 8
runtime:
  seed: 7
""")
    config = load_config(path, ["sft.batch_size=16", "dpo.beta=0.25", "stages=[sft,dpo]", "runtime.deepspeed=null"])
    assert config.model.dtype == "bf16"
    assert config.sft.lr == 3.0e-4
    assert config.sft.batch_size == 16  # the override wins over the file
    assert config.dpo.beta == 0.25
    assert config.stages == ["sft", "dpo"]
    assert config.runtime.seed == 7
    assert config.runtime.deepspeed is None
    # Everything the file does not mention keeps its default.
    assert config.dpo.lr == Config().dpo.lr
    assert config.data == Config().data


def test_override_value_parsing():
    config = load_config(None, [
        "stages=sft,rm",  # comma-separated list
        "sft.lr=1",  # int where a float is expected: accepted as float
        "dpo.lr=1e-6",  # YAML 1.1 reads this as a string; still a float
        "runtime.output_dir=2024",  # a str field keeps the text as written
        "model.sft_path=null",
        "runtime.deepspeed={zero_optimization: {stage: 2}}",
        "runtime.progress_bar=false",
    ])
    assert config.stages == ["sft", "rm"]
    assert config.sft.lr == 1.0 and isinstance(config.sft.lr, float)
    assert config.dpo.lr == 1e-6
    assert config.runtime.output_dir == "2024"
    assert config.model.sft_path is None
    assert config.runtime.deepspeed == {"zero_optimization": {"stage": 2}}
    assert config.runtime.progress_bar is False


@pytest.mark.parametrize("override, message", [
    ("sft.learning_rate=1e-4", "'sft.learning_rate' (did you mean 'sft.lr'?)"),
    ("dpo.betta=0.2", "'dpo.betta' (did you mean 'dpo.beta'?)"),
    ("runtime.sed=3", "'runtime.sed' (did you mean 'runtime.seed'?)"),
    ("modle.dtype=bf16", "'modle.dtype' (did you mean 'model.dtype'?)"),
    ("beta=0.3", "'beta' (did you mean 'dpo.beta'?)"),
])
def test_unknown_override_key_suggests_the_closest(override, message):
    with pytest.raises(ConfigError, match="unknown config key") as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_unknown_yaml_key_names_the_dotted_key(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", "data:\n  max_prompt_lenght: 64\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "'data.max_prompt_lenght'" in str(error.value)
    assert "did you mean 'data.max_prompt_length'" in str(error.value)


@pytest.mark.parametrize("override, expected, got", [
    ("sft.batch_size=2.5", "expected int", "got float"),
    ("sft.lr=fast", "expected float", "got str"),
    ("runtime.progress_bar=3", "expected bool", "got int"),
    ("runtime.seed=true", "expected int", "got bool"),
    ("stages=3", "expected list[str]", "got int"),
    ("model.name_or_path=null", "expected str", "got null"),
])
def test_wrong_type_names_key_expected_and_got(override, expected, got):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    message = str(error.value)
    assert message.startswith(key) and expected in message and got in message


def test_wrong_type_in_yaml(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", "rm:\n  micro_batch_tokens: many\n")
    with pytest.raises(ConfigError, match=r"rm.micro_batch_tokens: expected int, got str"):
        load_config(path)


@pytest.mark.parametrize("overrides, match", [
    (["stages=[sft,dop]"], r"stages\[1\]: unknown stage 'dop' \(did you mean 'dpo'\?\)"),
    (["stages=[sft,sft]"], "listed twice"),
    (["stages=[]"], "at least one"),
    (["model.dtype=fp16"], r"model.dtype: must be one of \['fp32', 'bf16'\]"),
    (["data.format=csv"], "data.format: must be one of"),
    (["sft.micro_batch_tokens=100"], "sft.micro_batch_tokens=100 is below"),
    (["sft.lr=-1"], "sft.lr: must be > 0"),
    (["data.max_bad_fraction=2"], r"data.max_bad_fraction: must be in \[0, 1\]"),
    (["runtime.device=tpu"], "runtime.device"),
    (["model=tiny"], "'model' is a section"),
    (["sft.lr.x=1"], "'sft.lr' is not a section"),
    (["sft.lr"], "not of the form key=value"),
    (["rl.generation_engine=vllm"], r"rl.generation_engine: must be one of \['rto_fast', 'transformers'\]"),
    (["rl.generation_cache=static"], "rl.generation_cache: static .* set rl.generation_engine: transformers"),
    (["eval.generation_engine=hf"], "eval.generation_engine: must be one of"),
])
def test_bad_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_budget_check_only_for_listed_stages():
    # rm is not run, so its budget does not matter; sft's does.
    load_config(None, ["stages=[sft]", "rm.micro_batch_tokens=16"])
    with pytest.raises(ConfigError):
        load_config(None, ["stages=[sft,rm]", "rm.micro_batch_tokens=16"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write_yaml(tmp_path / "list.yaml", "- sft\n- dpo\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_yaml(tmp_path / "broken.yaml", "model: [unclosed\n"))
    assert load_config(write_yaml(tmp_path / "empty.yaml", "")) == Config()
    # An empty section in the file is allowed and still takes overrides.
    assert load_config(write_yaml(tmp_path / "section.yaml", "model:\n"), ["model.dtype=bf16"]).model.dtype == "bf16"


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_save_load_round_trip(tmp_path):
    config = load_config(None, ["stages=[sft,dpo,rm]", "dpo.beta=0.05", "model.ref_path=some/ref", "sft.max_steps=3",
                                "runtime.deepspeed={zero_optimization: {stage: 3}}", "data.test_split=null"])
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    saved = yaml.safe_load(path.read_text())
    # The resolved file holds every field, not only the changed ones.
    flat = set()

    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict) and key != "deepspeed":
                walk(value, f"{prefix}{key}.")
            else:
                flat.add(prefix + key)

    walk(saved)
    assert flat == set(config_module._all_keys())


def test_help_documents_every_field():
    text = config_help()

    def check(cls, prefix):
        for item in dataclasses.fields(cls):
            annotation = config_module._hints(cls)[item.name]
            if config_module._is_section(annotation):
                check(annotation, f"{item.name}.")
                continue
            key = prefix + item.name
            assert f"  {key} (" in text, key
            assert item.metadata["help"], f"{key} has no help text"
            assert item.metadata["help"] in text

    check(Config, "")
    assert "one of: fp32, bf16" in text


def test_shipped_configs_load_and_their_deepspeed_settings_validate():
    from pathlib import Path

    from rto_fast.trainer import distributed

    folder = Path(__file__).resolve().parents[1] / "configs"
    configs = sorted(folder.glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        config = load_config(str(path), [])
        if config.runtime.deepspeed is not None:
            distributed.validate_deepspeed_config(distributed.load_deepspeed_config(config.runtime.deepspeed))
            distributed.check_world({stage: getattr(config, stage) for stage in config.stages
                                     if stage in ("sft", "dpo", "rm")}, 8)
