"""LoRA adapters (model.lora_rank): only adapters (and a value head) train; adapters off give the base model exactly;
the merged output loads with from_pretrained and computes what the adapted model computed; checkpoints hold the
adapters in PEFT's format (PeftModel loads them) and resume bitwise; a reference that is the policy's start is the
policy with its adapters off (DPO and RL), and stays the starting model while the policy trains; wrong settings
fail naming the key."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rto_fast.trainer import checkpoint as ckpt
from rto_fast.trainer import extras, lora, models
from rto_fast.trainer.config import ConfigError
from rto_fast.trainer.config_file import load_config
from rto_fast.trainer.run_log import read_metrics
from rto_fast.trainer.cli import main

pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ["runtime.device=cpu", "runtime.progress_bar=false", "runtime.seed=4", "data.max_train_samples=32",
        "data.max_eval_samples=16", "data.max_prompt_length=48", "data.max_response_length=48",
        "sft.batch_size=16", "sft.micro_batch_tokens=1024", "sft.lr=3e-2", "sft.warmup_ratio=0.0",
        "dpo.batch_size=16", "dpo.micro_batch_tokens=1024", "dpo.lr=1e-2", "dpo.warmup_ratio=0.0", "dpo.sft_coef=0",
        "rm.batch_size=16", "rm.micro_batch_tokens=1024", "rm.lr=1e-2", "rm.warmup_ratio=0.0",
        "model.lora_rank=4", "model.lora_alpha=8"]
RL = ["data.max_response_length=10", "rl.rollout_batch_size=8", "rl.mini_batch_size=4", "rl.max_new_tokens=10",
      "rl.micro_batch_tokens=512", "rl.eval_prompts=0", "rl.actor_lr=1e-2", "rl.critic_lr=1e-2",
      "rl.warmup_ratio=0.0", "eval.micro_batch_tokens=512"]
SETTINGS = lora.LoraSettings(rank=4, alpha=8.0)


def run(output_dir, *overrides) -> Path:
    assert main([*BASE, f"runtime.output_dir={output_dir}", *overrides]) == 0
    return Path(output_dir)


def stream(seed: int, length: int = 23) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (1, length), generator=generator)
    return {"input_ids": ids, "position_ids": torch.arange(length)[None], "use_cache": False}


def randomize_adapters(model, seed: int) -> None:
    """B starts at 0 (no update): give adapters and head values so that they change what the model computes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def tiny(kind: str, seed: int = 0, adapters: bool = True):
    torch.manual_seed(seed)
    settings = SETTINGS if adapters else None
    if kind == "lm":
        return models.load_causal_lm("tiny", trainable=True, lora=settings)
    return models.ValueHeadModel.from_pretrained("tiny", trainable=True, lora=settings)


def outputs(model, inputs):
    with torch.no_grad():
        result = model(**inputs)
    return result.logits if hasattr(result, "logits") else result


# ------------------------------------------------------------------------------------------------ the adapters

@pytest.mark.parametrize("kind", ["lm", "value"])
def test_only_adapters_train_and_adapters_off_is_the_base_model(kind):
    base, adapted = tiny(kind, adapters=False), tiny(kind)
    inputs = stream(1)
    trained = {name for name, parameter in adapted.named_parameters() if parameter.requires_grad}
    assert trained and all(".lora_" in name or name.startswith("value_head.") for name in trained)
    assert kind == "lm" or {"value_head.weight", "value_head.bias"} <= trained
    assert not any("lm_head" in name for name in trained)  # all-linear leaves the output layer alone
    # B = 0: the adapted model starts as the base model.
    assert torch.equal(outputs(adapted, inputs), outputs(base, inputs))
    randomize_adapters(adapted, 2)
    assert not torch.allclose(outputs(adapted, inputs), outputs(base, inputs))
    if kind == "value":
        base.value_head.load_state_dict(adapted.value_head.state_dict())
    with lora.adapters_off(adapted):
        assert torch.equal(outputs(adapted, inputs), outputs(base, inputs))
    # Back on: the adapters compute and train again.
    assert {name for name, parameter in adapted.named_parameters() if parameter.requires_grad} == trained
    assert not torch.allclose(outputs(adapted, inputs), outputs(base, inputs))


def test_adapter_gradients_are_the_same_with_activation_checkpointing():
    """Frozen embeddings feed the checkpointed layers an input without a gradient: non-reentrant checkpointing still
    gives the adapters the gradients the plain model gives them."""
    inputs = stream(8)
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = models.load_causal_lm("tiny", trainable=True, lora=SETTINGS, gradient_checkpointing=checkpointing)
        randomize_adapters(model, 9)  # B != 0, so A has a gradient too
        model(**inputs).logits.float().logsumexp(-1).sum().backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        assert gradient is not None and gradient.abs().sum() > 0, name
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-5, atol=1e-7)


def test_fused_output_layer_serves_a_model_with_adapters():
    """The output layer gets no adapter (all-linear), so model.fused_output_layer still computes log-probs from its
    input: the same log-probs and adapter gradients as the logits path, and no logits held."""
    from rto_fast.trainer.packing import build_micro_batches
    from rto_fast.trainer.scoring import packed_logprobs, response_sequence

    generator = torch.Generator().manual_seed(11)
    sequences = [response_sequence(torch.randint(3, 250, (9,), generator=generator).tolist(),
                                   torch.randint(3, 250, (13,), generator=generator).tolist()) for _ in range(3)]
    batch = build_micro_batches(sequences, 4096)[0]
    results = []
    for fused in (False, True):
        model = tiny("lm")
        randomize_adapters(model, 12)
        outputs_seen = []
        model.get_output_embeddings().register_forward_hook(lambda module, args, out: outputs_seen.append(out))
        logprobs = packed_logprobs(model, batch, fused_output_layer=fused)
        logprobs.sum().backward()
        assert not fused or outputs_seen[0].stride()[:-1] == (0, 0)  # the fused path's stand-in, not logits
        results.append((logprobs.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for name, gradient in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], gradient, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["lm", "value"])
def test_merged_output_loads_plainly_and_computes_what_the_adapted_model_did(tmp_path, kind):
    adapted = tiny(kind)
    randomize_adapters(adapted, 3)
    ckpt.save_model(adapted, tmp_path / "merged", models.build_tokenizer())
    names = sorted(load_file(str(tmp_path / "merged" / "model.safetensors")))
    plain = tiny(kind, adapters=False)
    plain_names = sorted((plain.backbone if kind == "value" else plain).state_dict())
    # Tied embeddings may be stored once: every stored name is a plain weight name, none is an adapter's.
    assert set(names) <= set(plain_names) and not any("lora" in name or "base_layer" in name for name in names)
    if kind == "lm":
        loaded = models.load_causal_lm(str(tmp_path / "merged"), trainable=False)
    else:
        loaded = models.ValueHeadModel.from_pretrained(str(tmp_path / "merged"), trainable=False)
    inputs = stream(4)
    expected = outputs(adapted, inputs)
    torch.testing.assert_close(outputs(loaded, inputs), expected, rtol=1e-5, atol=1e-5)
    # Saving did not merge into the live model: adapters off is still the base.
    base = tiny(kind, adapters=False)
    if kind == "value":
        base.value_head.load_state_dict(adapted.value_head.state_dict())
    with lora.adapters_off(adapted):
        assert torch.equal(outputs(adapted, inputs), outputs(base, inputs))


def test_checkpoint_adapters_round_trip_and_load_in_peft(tmp_path):
    from peft import PeftModel

    adapted = tiny("lm")
    randomize_adapters(adapted, 5)
    ckpt.save_model(adapted, tmp_path / "adapters", None, merge_adapters=False)
    files = {path.name for path in (tmp_path / "adapters").iterdir()}
    assert files == {lora.ADAPTER_WEIGHTS, lora.ADAPTER_CONFIG}
    inputs = stream(6)
    expected = outputs(adapted, inputs)
    fresh = tiny("lm")
    lora.load_adapters(fresh, tmp_path / "adapters")
    assert torch.equal(outputs(fresh, inputs), expected)
    # PEFT itself reads the folder onto the base model.
    peft_model = PeftModel.from_pretrained(tiny("lm", adapters=False), str(tmp_path / "adapters"))
    torch.testing.assert_close(outputs(peft_model, inputs), expected, rtol=1e-6, atol=1e-6)
    # The value head travels with a critic's adapters.
    critic = tiny("value")
    randomize_adapters(critic, 7)
    ckpt.save_model(critic, tmp_path / "critic", None, merge_adapters=False)
    fresh_critic = tiny("value")
    lora.load_adapters(fresh_critic, tmp_path / "critic")
    assert torch.equal(outputs(fresh_critic, inputs), outputs(critic, inputs))


def test_adapters_that_do_not_match_the_run_are_refused(tmp_path):
    adapted = tiny("lm")
    ckpt.save_model(adapted, tmp_path / "adapters", None, merge_adapters=False)
    torch.manual_seed(0)
    other_rank = models.load_causal_lm("tiny", lora=lora.LoraSettings(rank=2, alpha=8.0))
    with pytest.raises(ValueError, match="model.lora_rank"):
        lora.load_adapters(other_rank, tmp_path / "adapters")
    torch.manual_seed(0)
    fewer = models.load_causal_lm("tiny", lora=lora.LoraSettings(rank=4, alpha=8.0, target_modules="q_proj,v_proj"))
    with pytest.raises(ValueError, match="model.lora_target_modules"):
        lora.load_adapters(fewer, tmp_path / "adapters")
    ckpt.save_model(tiny("lm", adapters=False), tmp_path / "full")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.load_adapters(tiny("lm"), tmp_path / "full")
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="model.lora_target_modules"):
        models.load_causal_lm("tiny", lora=lora.LoraSettings(rank=4, alpha=8.0, target_modules="no_such_proj"))


@pytest.mark.parametrize("override, message", [
    ("model.lora_rank=-1", "model.lora_rank"),
    ("model.lora_alpha=0", "model.lora_alpha"),
    ("model.lora_dropout=1.0", "model.lora_dropout"),
    ("model.lora_target_modules=,", "model.lora_target_modules"),
    ("model.lora_stages=[sft,eval]", "model.lora_stages"),
])
def test_bad_lora_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.lora_rank=4", override])


def test_missing_peft_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setattr(extras, "peft_available", lambda: False)
    with pytest.raises(ConfigError, match=r"rto_fast\[lora\]"):
        load_config(None, ["model.lora_rank=4"])
    assert load_config(None, ["model.lora_rank=0"]).model.lora_rank == 0  # full fine-tuning needs no peft


# ------------------------------------------------------------------------------------------------ the stages

def test_sft_dpo_rm_train_adapters_and_write_merged_models(tmp_path):
    run_dir = run(tmp_path / "run", "stages=[sft,dpo,rm]", "sft.max_steps=6", "dpo.max_steps=6", "rm.max_steps=6",
                  "runtime.checkpoint_every=3")
    records = {stage: [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == stage]
               for stage in ("sft", "dpo", "rm")}
    assert records["sft"][-1]["loss"] < records["sft"][0]["loss"]
    # DPO's reference is the SFT model, which is where the policy starts: the policy with adapters off, so the first
    # step's loss is exactly log 2.
    assert records["dpo"][0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert records["dpo"][-1]["loss"] < records["dpo"][0]["loss"]
    assert records["rm"][-1]["loss"] < records["rm"][0]["loss"]
    for stage in ("sft", "dpo", "rm"):
        output = run_dir / stage / "model"
        assert (output / "config.json").is_file() and not (output / lora.ADAPTER_WEIGHTS).exists()
        last = ckpt.latest_checkpoint(run_dir / stage / "checkpoints")
        assert (last / "model" / lora.ADAPTER_WEIGHTS).is_file() and not (last / "model" / "config.json").exists()
    assert (run_dir / "rm" / "checkpoints" / ckpt.checkpoint_name(6) / "model" / "value_head.safetensors").is_file()
    # The merged SFT model differs from where SFT started only where adapters were (embeddings and output layer are
    # untouched).
    sft = load_file(str(run_dir / "sft" / "model" / "model.safetensors"))
    dpo = load_file(str(run_dir / "dpo" / "model" / "model.safetensors"))
    assert torch.equal(sft["model.embed_tokens.weight"], dpo["model.embed_tokens.weight"])
    changed = [name for name in sft if not torch.equal(sft[name], dpo[name])]
    assert changed and all(name.endswith("proj.weight") for name in changed)


def test_sft_resume_with_adapters_is_bitwise_identical(tmp_path, capsys):
    overrides = ["stages=[sft]", "sft.max_steps=6", "runtime.checkpoint_every=3", "runtime.keep_last=5"]
    full = run(tmp_path / "full", *overrides)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "sft" / "model")
    shutil.rmtree(resumed / "sft" / "checkpoints" / ckpt.checkpoint_name(6))
    run(resumed, *overrides)
    a = load_file(str(full / "sft" / "model" / "model.safetensors"))
    b = load_file(str(resumed / "sft" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    # Changed LoRA settings cannot continue those adapters: exit 2 with the key named, before any model loads.
    shutil.rmtree(resumed / "sft" / "model")
    for change, key in (("model.lora_rank=2", "model.lora_rank"), ("model.lora_rank=0", "model.lora_rank"),
                        ("model.lora_target_modules=q_proj,v_proj", "model.lora_target_modules")):
        assert main([*BASE, f"runtime.output_dir={resumed}", *overrides, change]) == 2
        assert key in capsys.readouterr().err


@pytest.fixture(scope="module")
def rl_assets(tmp_path_factory):
    """A tiny SFT model (the policy's start and the reference) and a DPO model with other weights."""
    folder = tmp_path_factory.mktemp("lora_rl")
    tokenizer = models.build_tokenizer()
    for name, seed in (("sft", 31), ("dpo", 32)):
        torch.manual_seed(seed)
        ckpt.save_model(models.load_causal_lm("tiny", trainable=False), folder / name, tokenizer)
    return folder


def test_rl_reference_is_the_policy_with_adapters_off_and_resume_is_bitwise(tmp_path, rl_assets):
    paths = [f"model.sft_path={rl_assets / 'sft'}", f"model.dpo_path={rl_assets / 'dpo'}"]
    overrides = [*RL, *paths, "stages=[rto]", "rl.iterations=4", "runtime.checkpoint_every=2", "runtime.keep_last=5"]
    full = run(tmp_path / "full", *overrides)
    records = [r for r in read_metrics(full / "metrics.jsonl") if r["stage"] == "rto"]
    # Iteration 1 samples and scores before any update: policy and reference (the policy with adapters off) agree.
    assert records[0]["kl"] == 0.0
    assert records[-1]["kl"] > 0.0
    log = (full / "train.log").read_text()
    assert "LoRA rank 4" in log
    # The merged policy moved away from the SFT model; the critic is a plain value-head folder.
    policy = load_file(str(full / "rto" / "model" / "model.safetensors"))
    start = load_file(str(rl_assets / "sft" / "model.safetensors"))
    assert any(not torch.equal(policy[name], start[name]) for name in start)
    assert (full / "rto" / "critic" / "value_head.safetensors").is_file()
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "rto" / "model")
    shutil.rmtree(resumed / "rto" / "critic")
    shutil.rmtree(resumed / "rto" / "checkpoints" / ckpt.checkpoint_name(4))
    run(resumed, *overrides)
    for part in ("model", "critic"):
        a = load_file(str(full / "rto" / part / "model.safetensors"))
        b = load_file(str(resumed / "rto" / part / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    drop = ("time_generate_s", "time_score_s", "time_train_s", "time_s", "time_eval_s", "tokens_per_s", "elapsed_s")
    strip = [[{k: v for k, v in r.items() if k not in drop} for r in read_metrics(d / "metrics.jsonl")]
             for d in (full, resumed)]
    assert strip[0] == strip[1]
    state = json.loads((full / "rto" / "checkpoints" / ckpt.checkpoint_name(2) / ckpt.STATE_FILE).read_text())
    assert state["step"] == 2


def test_rl_reference_stays_the_starting_model_while_the_policy_trains(tmp_path, rl_assets):
    """After training, the shared reference's log-probs equal those of the SFT model loaded on its own."""
    from rto_fast.trainer import data, rl
    from rto_fast.trainer.run_log import MetricsLog
    from rto_fast.trainer.packing import build_micro_batches
    from rto_fast.trainer.scoring import packed_logprobs, response_sequence
    from rto_fast.trainer.pipeline import prompt_data_config
    from rto_fast.trainer.run import RunContext

    config = load_config(None, [*BASE, *RL, f"model.sft_path={rl_assets / 'sft'}",
                                f"model.dpo_path={rl_assets / 'dpo'}", f"runtime.output_dir={tmp_path}",
                                "stages=[rto]"])
    tokenizer = models.build_tokenizer()
    train_prompts, eval_prompts = data.load_prompt_splits(prompt_data_config(config), tokenizer,
                                                          cache_dir=tmp_path / "data")
    context = RunContext(config=config, run_dir=tmp_path, device=torch.device("cpu"), tokenizer=tokenizer,
                         train_examples=[], eval_examples=[], metrics=MetricsLog(tmp_path / "m.jsonl"),
                         train_prompts=train_prompts, eval_prompts=eval_prompts)
    torch.manual_seed(0)
    trainer = rl.RLStage("rto", context)
    trainer.build_models(None)
    trainer.build_optimizers(total_steps=10)
    assert isinstance(trainer.reference, lora.SharedReference)
    prompts = train_prompts[:8]
    for iteration in (1, 2):
        rollout = trainer.gather(trainer.score(prompts, trainer.sample(prompts)))
        trainer.train(rollout, iteration=iteration)
    sequences = [response_sequence(r.prompt_ids, r.response_ids) for r in trainer.sample(prompts)]
    batch = build_micro_batches(sequences, 4096)[0]
    sft = models.load_causal_lm(str(rl_assets / "sft"), trainable=False)
    with torch.no_grad():
        expected = packed_logprobs(sft, batch)
        with trainer.frozen_on_device(trainer.reference) as reference:
            shared = packed_logprobs(reference, batch)
        policy = packed_logprobs(trainer.policy, batch)
    torch.testing.assert_close(shared, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(policy, expected, atol=1e-4)


def test_dpo_with_precomputed_reference_scores_the_policy_with_adapters_off(tmp_path):
    run_dir = run(tmp_path / "run", "stages=[sft,dpo]", "sft.max_steps=3", "dpo.max_steps=3",
                  "dpo.precompute_ref_logprobs=true")
    first = next(r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "dpo")
    assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)


def test_rl_with_frozen_models_offloaded_keeps_the_shared_reference(tmp_path, rl_assets, monkeypatch):
    """Offloading (forced on CPU) moves the DPO model to host memory and leaves the shared reference alone: it is
    the policy, which trains on the device. Sampling through model.generate sees the adapters too."""
    from rto_fast.trainer import offload

    monkeypatch.setattr(offload, "OFFLOAD_DEVICE_TYPES", ("cuda", "cpu"))
    run_dir = run(tmp_path / "run", *RL, f"model.sft_path={rl_assets / 'sft'}", f"model.dpo_path={rl_assets / 'dpo'}",
                  "stages=[rto]", "rl.iterations=2", "rl.offload_frozen_models=true",
                  "rl.generation_engine=transformers")
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "rto"]
    assert records[0]["kl"] == 0.0 and len(records) == 2
    assert "rl.offload_frozen_models: 1 frozen model(s)" in (run_dir / "train.log").read_text()


def test_an_adapter_folder_is_a_model_path(tmp_path, rl_assets):
    """A checkpoint's adapters (or any local PEFT adapter folder) load as a model: their base with them merged, as the
    stage's merged output; a folder whose base cannot be loaded is refused naming it."""
    run_dir = run(tmp_path / "run", "stages=[sft]", f"model.name_or_path={rl_assets / 'sft'}", "sft.max_steps=3",
                  "runtime.checkpoint_every=3")
    adapters = run_dir / "sft" / "checkpoints" / ckpt.checkpoint_name(3) / "model"
    saved = json.loads((adapters / lora.ADAPTER_CONFIG).read_text())
    assert Path(saved["base_model_name_or_path"]) == (rl_assets / "sft").resolve()
    models.check_model_source(str(adapters))
    from_adapters = models.load_causal_lm(str(adapters), trainable=False)
    merged = models.load_causal_lm(str(run_dir / "sft" / "model"), trainable=False)
    inputs = stream(10)
    torch.testing.assert_close(outputs(from_adapters, inputs), outputs(merged, inputs), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs(from_adapters, inputs),
                              outputs(models.load_causal_lm(str(rl_assets / "sft"), trainable=False), inputs))
    # SFT from the random tiny model: its adapters have no loadable base.
    tiny_run = run(tmp_path / "tiny", "stages=[sft]", "sft.max_steps=1", "runtime.checkpoint_every=1")
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        models.check_model_source(str(tiny_run / "sft" / "checkpoints" / ckpt.checkpoint_name(1) / "model"))


def test_a_reference_other_than_the_start_is_loaded_on_its_own(tmp_path, rl_assets):
    """model.ref_path elsewhere: DPO and RL load that reference as a frozen model (no sharing); DPO's first loss is
    then not log 2 and RL's first KL not 0."""
    run_dir = run(tmp_path / "run", *RL, f"model.name_or_path={rl_assets / 'sft'}", f"model.ref_path={rl_assets / 'dpo'}",
                  "stages=[dpo,rto]", "dpo.max_steps=2", "rl.iterations=1", "data.max_response_length=48")
    records = read_metrics(run_dir / "metrics.jsonl")
    dpo = next(r for r in records if r["stage"] == "dpo")
    rto = next(r for r in records if r["stage"] == "rto")
    assert abs(dpo["loss"] - 0.6931471805599453) > 1e-3 and rto["kl"] != 0.0


def test_lora_stages_picks_the_stages_that_train_adapters(tmp_path):
    """model.lora_stages=[dpo]: SFT fine-tunes fully (full checkpoints), DPO trains adapters against the SFT model
    with its adapters off (first loss log 2, adapter checkpoints)."""
    run_dir = run(tmp_path / "run", "stages=[sft,dpo]", "model.lora_stages=[dpo]", "sft.max_steps=2", "dpo.max_steps=2",
                  "runtime.checkpoint_every=2")
    sft_checkpoint = run_dir / "sft" / "checkpoints" / ckpt.checkpoint_name(2) / "model"
    dpo_checkpoint = run_dir / "dpo" / "checkpoints" / ckpt.checkpoint_name(2) / "model"
    assert (sft_checkpoint / "config.json").is_file() and not (sft_checkpoint / lora.ADAPTER_CONFIG).exists()
    assert (dpo_checkpoint / lora.ADAPTER_CONFIG).is_file()
    first_dpo = next(r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "dpo")
    assert first_dpo["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    log = (run_dir / "train.log").read_text()
    assert log.count("LoRA rank 4") == 1  # the DPO policy only
