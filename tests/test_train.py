"""The trainer end to end on the synthetic task with the tiny model: SFT, DPO and RM learn, outputs load with
from_pretrained, the CLI fails early and clearly, checkpoints are atomic and pruned, a SIGKILLed run resumes to
bitwise the same weights, SIGTERM stops at a step with a checkpoint, bf16 weights train through the chosen
bf16 optimizer."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rto_fast.trainer import checkpoint as ckpt
from rto_fast.trainer import loading, models, optimization, run, supervised
from rto_fast.trainer.config_file import load_config
from rto_fast.trainer.run_log import MetricsLog, read_metrics
from rto_fast.trainer.stopping import STOP_SIGNALS, StopSignals, stop_requested
from rto_fast.trainer.cli import main

ROOT = Path(__file__).resolve().parents[1]

# Small and fast: 32 training pairs of the synthetic task (short sequences), few steps, no progress bar.
BASE = [
    "runtime.device=cpu", "runtime.progress_bar=false", "runtime.seed=3",
    "data.max_train_samples=32", "data.max_eval_samples=16",
    "data.max_prompt_length=48", "data.max_response_length=48",
    "sft.batch_size=16", "sft.micro_batch_tokens=1024", "sft.lr=3e-3", "sft.warmup_ratio=0.0",
    "dpo.batch_size=16", "dpo.micro_batch_tokens=1024", "dpo.lr=1e-3", "dpo.warmup_ratio=0.0", "dpo.sft_coef=0",
    "rm.batch_size=16", "rm.micro_batch_tokens=1024", "rm.lr=3e-3", "rm.warmup_ratio=0.0",
]


PIPELINE = ["stages=[sft,dpo]", "sft.max_steps=12", "dpo.max_steps=16", "sft.eval_every=6",
            "runtime.checkpoint_every=5", "runtime.keep_last=2"]
STEPS = {"sft": 12, "dpo": 16}


pytestmark = pytest.mark.usefixtures("one_thread")


SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_main(output_dir, *overrides):
    code = main([*BASE, f"runtime.output_dir={output_dir}", *overrides])
    assert code == 0
    return Path(output_dir)


def stage_records(run_dir, stage):
    return [record for record in read_metrics(Path(run_dir) / "metrics.jsonl") if record["stage"] == stage]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """One SFT -> DPO run shared by the tests that only read its outputs: 32 training pairs, several epochs."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    return run_main(run_dir, *PIPELINE)


def mean(values):
    values = list(values)
    return sum(values) / len(values)


# ------------------------------------------------------------------------------------------------ learning
# These runs are seconds long on 32 pairs, so they show that each stage optimises its objective on the data it
# sees; held-out generalisation needs the full task (configs/tiny_compare.yaml: DPO eval margin ~0.3, accuracy ~0.69).

def test_sft_loss_decreases(pipeline_run):
    records = stage_records(pipeline_run, "sft")
    assert [record["step"] for record in records] == list(range(1, STEPS["sft"] + 1))
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    evals = [record["eval_loss"] for record in records if "eval_loss" in record]
    assert len(evals) == 2 and evals[-1] < evals[0] < records[0]["loss"]
    for record in records:
        assert record["tokens"] > 0 and record["grad_norm"] > 0 and record["lr"] > 0


def test_dpo_implicit_reward_margin_rises(pipeline_run):
    records = stage_records(pipeline_run, "dpo")
    assert len(records) == STEPS["dpo"]
    # Step 1: the policy still equals the reference, so every implicit reward is 0 and the loss is log 2.
    assert abs(records[0]["reward_margin"]) < 1e-4
    assert abs(records[0]["loss"] - 0.693147) < 1e-4
    early, late = records[:4], records[-4:]
    assert mean(r["reward_margin"] for r in late) > mean(r["reward_margin"] for r in early) + 0.1
    assert mean(r["reward_accuracy"] for r in late) > 0.6
    assert mean(r["loss"] for r in late) < 0.65
    assert "eval_reward_margin" in records[-1] and "eval_reward_accuracy" in records[-1]


def test_dpo_sft_term_adds_the_chosen_nll_per_token(tmp_path, pipeline_run):
    # One step over all 32 pairs, policy = reference: the DPO loss is log 2, plus sft_coef times the mean over pairs
    # of the chosen response's NLL per token under the SFT model.
    from rto_fast.trainer import data
    from rto_fast.trainer.config_file import load_config

    sft = pipeline_run / "sft" / "model"
    settings = ["stages=[dpo]", f"model.sft_path={sft}", "dpo.batch_size=32", "dpo.max_steps=1", "dpo.sft_coef=0.5"]
    run_dir = run_main(tmp_path / "rpo", *settings)
    (record,) = stage_records(run_dir, "dpo")
    config = load_config(None, [*BASE, *settings])
    tokenizer = models.build_tokenizer()
    train, _ = data.load_preference_splits(config.data, tokenizer, cache_dir=tmp_path / "data", seed=3)
    model = models.load_causal_lm(str(sft), trainable=False)
    nll = []
    for example in train:
        ids = torch.tensor([example.prompt_ids + example.chosen_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        start = len(example.prompt_ids)
        targets = ids[0, start:]
        nll.append(-float(logprobs[start - 1:-1].gather(1, targets[:, None]).mean()))
    assert record["loss"] == pytest.approx(math.log(2) + 0.5 * sum(nll) / len(nll), abs=1e-4)


def test_rm_accuracy_above_chance(tmp_path, pipeline_run):
    run_dir = run_main(tmp_path / "rm", "stages=[rm]", f"model.sft_path={pipeline_run / 'sft' / 'model'}",
                       "rm.max_steps=24", "runtime.checkpoint_every=0")
    records = stage_records(run_dir, "rm")
    late = records[-8:]
    assert mean(r["accuracy"] for r in late) > 0.6
    assert mean(r["loss"] for r in late) < mean(r["loss"] for r in records[:4]) - 0.03
    assert "eval_accuracy" in records[-1]
    head = models.ValueHeadModel.from_pretrained(str(run_dir / "rm" / "model"), trainable=False)
    assert head.value_head.weight.abs().sum() > 0  # the trained head, not a fresh zero one


def test_outputs_load_with_from_pretrained(pipeline_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for stage in ("sft", "dpo"):
        folder = pipeline_run / stage / "model"
        assert (folder / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer("\n\nHuman: hi\n\nAssistant:", return_tensors="pt")["input_ids"]
        assert torch.isfinite(model(ids).logits).all()
        # The output is the model of the last step: the same weights as the final checkpoint.
        final = ckpt.latest_checkpoint(pipeline_run / stage / "checkpoints")
        assert final.name == ckpt.checkpoint_name(STEPS[stage])
        saved, output = load_file(final / "model" / "model.safetensors"), load_file(folder / "model.safetensors")
        assert saved.keys() == output.keys() and all(torch.equal(saved[k], output[k]) for k in saved)
    # DPO started from the SFT output (policy and reference), not from a fresh model.
    log = (pipeline_run / "train.log").read_text()
    assert f"starting from {pipeline_run / 'sft' / 'model'}" in log


def test_run_folder_contents(pipeline_run):
    assert (pipeline_run / "config.yaml").is_file()
    assert load_config(pipeline_run / "config.yaml").dpo.max_steps == STEPS["dpo"]
    for stage in ("sft", "dpo"):
        assert (pipeline_run / "plots" / f"{stage}.png").stat().st_size > 1000
        # checkpoint_every=5 saves 5, 10, 15 and the last step; keep_last=2 leaves the newest two.
        names = [path.name for path in ckpt.list_checkpoints(pipeline_run / stage / "checkpoints")]
        kept = {"sft": (10, 12), "dpo": (15, 16)}[stage]
        assert names == [ckpt.checkpoint_name(step) for step in kept]
        state = ckpt.read_state(pipeline_run / stage / "checkpoints" / ckpt.checkpoint_name(kept[0]))
        assert state["stage"] == stage and state["step"] == kept[0] and state["total_steps"] == STEPS[stage]
        assert 0 <= state["batch_in_epoch"] and state["epoch"] >= 1  # 32 pairs: several epochs by then
    summary = (pipeline_run / "summary.md").read_text()
    assert "| sft |" in summary and "| dpo |" in summary and "eval_reward_margin" in summary
    for line in (pipeline_run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_finished_run_is_skipped_on_rerun(pipeline_run, monkeypatch):
    before = (pipeline_run / "metrics.jsonl").read_text()
    monkeypatch.setattr(loading, "load_causal_lm", _refuse)
    assert main([*BASE, f"runtime.output_dir={pipeline_run}", *PIPELINE]) == 0
    assert (pipeline_run / "metrics.jsonl").read_text() == before


# ------------------------------------------------------------------------------------------------ batching

def _refuse(*args, **kwargs):
    raise AssertionError("a model was loaded")


def _step_gradients(stage, examples, max_tokens, accumulation):
    """The summed gradient of one optimizer step, the way run_stage accumulates it."""
    stage.model.zero_grad(set_to_none=True)
    groups = [stage.micro_batches(examples, group, max_tokens)
              for group in run.split_even(list(range(len(examples))), accumulation)]
    denominator = stage.denominator([batch for group in groups for batch in group])
    count = 0
    for group in groups:
        for batch, extra in zip(group, stage.prepare(group)):
            loss, _ = stage.loss(batch, extra, denominator)
            loss.backward()
            count += 1
    return count, {name: parameter.grad.clone() for name, parameter in stage.model.named_parameters()}


@pytest.mark.parametrize("name", ["sft", "dpo", "rm"])
def test_step_gradient_does_not_depend_on_micro_batching(name):
    """One micro-batch or many, one batch or three accumulated: the same step gradient (losses are normalised by
    the whole step)."""
    config = load_config(None, ["runtime.device=cpu", "dpo.beta=0.5"])
    tokenizer = models.build_tokenizer()
    generator = torch.Generator().manual_seed(5)

    def tokens(low, high):
        return torch.randint(0, 256, (int(torch.randint(low, high, (1,), generator=generator)),),
                             generator=generator).tolist()

    examples = [{"prompt_ids": tokens(3, 20), "chosen_ids": tokens(1, 15), "rejected_ids": tokens(1, 15)}
                for _ in range(9)]
    context = run.RunContext(config, Path("."), torch.device("cpu"), tokenizer, examples, [], None)
    stage = supervised.STAGE_CLASSES[name](context)
    stage.build_models(models.TINY, None)
    if name == "dpo":  # make policy and reference differ, so the DPO gradient is not the same at every pair
        with torch.no_grad():
            for parameter in stage.model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    if name == "rm":
        torch.nn.init.normal_(stage.model.value_head.weight, generator=generator)
    whole_count, whole = _step_gradients(stage, examples, 4096, 1)
    split_count, split = _step_gradients(stage, examples, 70, 3)
    assert whole_count == 1 and split_count > 3
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "gemma2"])
def test_every_stage_runs_on_other_architectures(tmp_path, kind):
    """The whole pipeline (SFT, DPO, RM, RTO, eval) from a saved model other than the tiny Llama: GPT-2 as shipped
    (dropout 0.1: trained models lose it) and Gemma-2 (soft-capped attention scores, written out on CPU; eager
    attention for sampling; its final logit soft-capping keeps the logits path of the fused output layer)."""
    import transformers

    tokenizer = models.build_tokenizer()
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                         **special)
    else:
        config = transformers.Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=8, sliding_window=16, attn_logit_softcapping=5.0, **special)
    torch.manual_seed(0)
    folder = tmp_path / kind
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    run_dir = run_main(tmp_path / "run", "stages=[sft,dpo,rm,rto,eval]", f"model.name_or_path={folder}",
                       "sft.max_steps=3", "dpo.max_steps=3", "rm.max_steps=3", "rl.iterations=2",
                       "rl.rollout_batch_size=8", "rl.mini_batch_size=8", "rl.max_new_tokens=8",
                       "rl.micro_batch_tokens=512", "rl.eval_prompts=0", "eval.num_prompts=8",
                       "eval.max_new_tokens=8", "eval.micro_batch_tokens=512", "model.fused_output_layer=true")
    for stage in ("sft", "dpo", "rm", "rto"):
        records = stage_records(run_dir, stage)
        assert records and all(math.isfinite(value) for record in records for value in record.values()
                               if isinstance(value, float)), stage
    assert (run_dir / "eval" / "win_rates.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "rto" / "model")
    assert type(reloaded).__name__.lower().startswith(kind)


def test_lr_schedule_warmup_then_cosine():
    settings = load_config(None, ["sft.warmup_ratio=0.2", "sft.min_lr_ratio=0.1"]).sft
    factors = [optimization.lr_factor(step, 10, settings) for step in range(10)]
    assert factors[0] == pytest.approx(1 / 3) and factors[1] == pytest.approx(2 / 3)
    assert factors[2] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert factors[-1] > 0.1 and optimization.lr_factor(10, 10, settings) == pytest.approx(0.1)


def test_token_batches_respect_the_budget():
    settings = load_config(None, ["sft.batch_unit=tokens", "sft.batch_size=100", "sft.epochs=2"]).sft
    lengths = [30, 50, 20, 70, 10, 40, 60, 25]
    plan = run.DataPlan(lengths, settings, seed=1)
    for epoch in range(2):
        batches = plan.epoch_batches(epoch)
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in batch) <= 100 for batch in batches)
    assert plan.total_steps == 2 * len(plan.epoch_batches(0))
    assert plan.epoch_batches(0) != plan.epoch_batches(1)  # a fresh order every epoch


# ------------------------------------------------------------------------------------------------ CLI errors

@pytest.mark.parametrize("override, expected", [
    ("sft.learning_rate=1e-4", "sft.lr"),                     # unknown key, with the suggestion
    ("model.name_or_path=/nonexistent/model", "model.name_or_path"),
    ("model.sft_path=./no/such/folder", "model.sft_path"),
    ("runtime.resume=/no/such/checkpoint", "runtime.resume"),
    ("data.format=prompt", "data.format"),
    ("runtime.deepspeed=ds_config.json", "runtime.deepspeed"),
    ("sft.batch_unit=pairs", "sft.batch_unit"),
])
def test_cli_fails_early_with_one_line(tmp_path, capsys, monkeypatch, override, expected):
    monkeypatch.setattr(models, "load_causal_lm", _refuse)
    monkeypatch.setattr(loading, "load_causal_lm", _refuse)
    code = main([*BASE, f"runtime.output_dir={tmp_path / 'run'}", override])
    error = capsys.readouterr().err
    assert code == 2
    assert len(error.strip().splitlines()) == 1, error
    assert error.startswith("rto_fast.train: error:") and expected in error


def test_cli_fails_on_missing_column(tmp_path, capsys, monkeypatch):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": f"a{i}", "answer": f"b{i}"})
                              for i in range(8)) + "\n")
    monkeypatch.setattr(loading, "load_causal_lm", _refuse)
    code = main([*BASE, f"runtime.output_dir={tmp_path / 'run'}", f"data.source={path}", "data.format=preference"])
    error = capsys.readouterr().err
    assert code == 2 and len(error.strip().splitlines()) == 1, error
    assert "rejected" in error


def test_cli_exit_code_and_help_in_a_subprocess(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rto_fast.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                             "sft.nonsense=1", f"runtime.output_dir={tmp_path}"], capture_output=True, text=True,
                            cwd=ROOT, env=SUBPROCESS_ENV)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "sft.nonsense" in result.stderr
    help_text = subprocess.run([sys.executable, "-m", "rto_fast.train", "--help"], capture_output=True, text=True,
                               cwd=ROOT, env=SUBPROCESS_ENV)
    assert help_text.returncode == 0 and "dpo.beta" in help_text.stdout and "runtime.resume" in help_text.stdout


# ------------------------------------------------------------------------------------------------ checkpoints

def _tiny_training_objects():
    torch.manual_seed(0)
    model = models.load_causal_lm("tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def test_keep_last_k(tmp_path):
    model, optimizer, scheduler = _tiny_training_objects()
    for step in (1, 2, 3, 4, 5):
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, scheduler, {"stage": "sft"}, keep_last=3)
    assert [path.name for path in ckpt.list_checkpoints(tmp_path)] == [ckpt.checkpoint_name(s) for s in (3, 4, 5)]
    assert sorted(path.name for path in tmp_path.iterdir()) == [ckpt.checkpoint_name(s) for s in (3, 4, 5)]


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    model, optimizer, scheduler = _tiny_training_objects()
    first = ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"stage": "sft"})
    real_save = torch.save

    def crash_on_rng(obj, path, *args, **kwargs):
        if Path(path).name == "rng.pt":
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crash_on_rng)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {"stage": "sft"})
    monkeypatch.setattr(torch, "save", real_save)
    assert [path.name for path in tmp_path.iterdir()] == [first.name]  # no partial folder, no leftover
    assert ckpt.latest_checkpoint(tmp_path) == first

    # A kill during a save leaves only a hidden temporary folder: never taken for a checkpoint, cleaned up later.
    partial = tmp_path / f"{ckpt.TEMP_PREFIX}{ckpt.checkpoint_name(3)}-999"
    (partial / "model").mkdir(parents=True)
    (partial / "optimizer.pt").write_bytes(b"\x00" * 10)
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert ckpt.clean_temporary(tmp_path) == [partial] and not partial.exists()

    # A checkpoint restores the optimizer, scheduler and RNG states exactly.
    optimizer.zero_grad()
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    scheduler.step()
    saved = ckpt.save_checkpoint(tmp_path, 4, model, optimizer, scheduler, {"stage": "sft", "tokens_seen": 7})
    expected_random = torch.rand(3)
    _, fresh_optimizer, fresh_scheduler = _tiny_training_objects()
    state = ckpt.load_training_state(saved, fresh_optimizer, fresh_scheduler)
    assert state["tokens_seen"] == 7 and state["step"] == 4
    assert torch.equal(torch.rand(3), expected_random)
    assert fresh_scheduler.last_epoch == scheduler.last_epoch
    for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_stop_signals_are_recorded_and_a_second_ctrl_c_interrupts():
    before = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    with StopSignals():
        assert stop_requested() == 0
        os.kill(os.getpid(), signal.SIGINT)
        assert stop_requested() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop_requested() == signal.SIGTERM
    assert stop_requested() == 0
    assert {number: signal.getsignal(number) for number in STOP_SIGNALS} == before


def test_sigterm_stops_at_a_step_with_a_checkpoint_and_the_rerun_matches(tmp_path):
    """SIGTERM from outside during SFT, with no periodic checkpoints: the process finishes its step, saves a
    checkpoint of it, exits with 128 + 15 and says how to resume; the same command then ends bitwise where an
    uninterrupted run ends, every step logged once."""
    common = [*BASE, "stages=[sft]", "sft.max_steps=150", "runtime.checkpoint_every=0", "data.max_eval_samples=8"]
    stopped_dir = tmp_path / "stopped"
    command = [sys.executable, "-m", "rto_fast.train", *common, f"runtime.output_dir={stopped_dir}"]
    process = subprocess.Popen(command, cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    try:
        while not any(record.get("step", 0) >= 2 for record in _records_so_far(stopped_dir)):
            assert process.poll() is None, process.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no SFT step logged within 120 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, errors[-2000:]
    assert "stopped by SIGTERM after step" in errors and "run the same command to resume" in errors
    stopped_at = ckpt.read_state(ckpt.latest_checkpoint(stopped_dir / "sft" / "checkpoints"))["step"]
    assert 2 <= stopped_at < 150 and not (stopped_dir / "sft" / "model").exists()

    resumed = subprocess.run(command, cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {stopped_dir / 'sft' / 'checkpoints' / ckpt.checkpoint_name(stopped_at)}" in resumed.stderr
    reference_dir = run_main(tmp_path / "reference", *common[len(BASE):])
    expected = load_file(reference_dir / "sft" / "model" / "model.safetensors")
    actual = load_file(stopped_dir / "sft" / "model" / "model.safetensors")
    assert expected.keys() == actual.keys() and all(torch.equal(expected[key], actual[key]) for key in expected)
    assert [record["step"] for record in stage_records(stopped_dir, "sft")] == list(range(1, 151))


def _records_so_far(run_dir: Path) -> list[dict]:
    """The metrics a running process has written (a last line may still be half-written)."""
    path = run_dir / "metrics.jsonl"
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    """Kill -9 during DPO (after SFT finished), resume with the same command: the final weights equal those of an
    uninterrupted run bit for bit (CPU, same thread count: every step replays the same float operations)."""
    common = [*BASE, "stages=[sft,dpo]", "sft.max_steps=4", "dpo.max_steps=16", "runtime.checkpoint_every=3",
              "runtime.keep_last=2", "data.max_eval_samples=8"]
    killed_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "rto_fast.train", *common, f"runtime.output_dir={killed_dir}"]
    env = SUBPROCESS_ENV
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while ckpt.latest_checkpoint(killed_dir / "dpo" / "checkpoints") is None:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no DPO checkpoint within 120 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not (killed_dir / "dpo" / "model").exists(), "the run finished before the kill; make it longer"
    killed_at = ckpt.read_state(ckpt.latest_checkpoint(killed_dir / "dpo" / "checkpoints"))["step"]
    assert killed_at < 16

    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    leftovers = [path for path in (killed_dir / "dpo").rglob(f"{ckpt.TEMP_PREFIX}*")]
    assert not leftovers, f"temporary folders survived the resume: {leftovers}"

    reference_dir = run_main(tmp_path / "reference", *common[len(BASE):])
    for stage in ("sft", "dpo"):
        expected = load_file(reference_dir / stage / "model" / "model.safetensors")
        actual = load_file(killed_dir / stage / "model" / "model.safetensors")
        assert expected.keys() == actual.keys()
        for name in expected:
            assert torch.equal(expected[name], actual[name]), f"{stage}: {name} differs after resume"
    # Every step logged exactly once, with the same losses as the uninterrupted run.
    for stage, steps in (("sft", 4), ("dpo", 16)):
        resumed_records = stage_records(killed_dir, stage)
        assert [record["step"] for record in resumed_records] == list(range(1, steps + 1))
        reference_losses = [record["loss"] for record in stage_records(reference_dir, stage)]
        assert [record["loss"] for record in resumed_records] == reference_losses


def test_profile_step_writes_phases_top_operators_and_a_trace(tmp_path):
    """runtime.profile_step=N: step N of each stage is recorded by torch.profiler; the summary names the trainer's
    phases and the operators that took the time, and the Chrome trace is valid JSON."""
    run_dir = run_main(tmp_path / "run", "stages=[sft,dpo]", "sft.max_steps=3", "dpo.max_steps=2",
                       "runtime.profile_step=2")
    for stage, phases in (("sft", ("forward", "backward", "optimizer_step")),
                          ("dpo", ("prepare", "forward", "backward", "optimizer_step"))):
        folder = run_dir / stage / "profile"
        assert sorted(path.name for path in folder.iterdir()) == ["step_2.md", "step_2.trace.json"]
        summary = (folder / "step_2.md").read_text()
        for name in phases:
            assert f"| {name} | " in summary, (stage, name, summary[:2000])
        assert "Top 30 operators by self CPU time" in summary
        assert re.search(r"^\| aten::\w+ \| \d+ \| [\d.]+ \| [\d.]+% \|", summary, flags=re.M), summary[:3000]
        assert json.loads((folder / "step_2.trace.json").read_text())["traceEvents"]
    assert len(stage_records(run_dir, "sft")) == 3  # profiling changes nothing else


def test_dpo_precomputed_reference_logprobs_train_like_the_live_reference(tmp_path):
    """dpo.precompute_ref_logprobs: the reference scores every pair once and is freed; training and evaluation see
    the same reference log-probs as when it runs every step (up to the rounding of a different packing)."""
    common = ["stages=[dpo]", "dpo.max_steps=4", "dpo.eval_every=2", "dpo.epochs=2"]
    live = stage_records(run_main(tmp_path / "live", *common), "dpo")
    cached = stage_records(run_main(tmp_path / "cached", *common, "dpo.precompute_ref_logprobs=true"), "dpo")
    assert [r["step"] for r in live] == [r["step"] for r in cached] == [1, 2, 3, 4]
    for a, b in zip(live, cached):
        for key in ("loss", "reward_margin", "eval_loss", "eval_reward_margin"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a["step"])
    log = (tmp_path / "cached" / "train.log").read_text()
    assert re.search(r"reference log-probs of 32 training and 16 evaluation pairs computed in [\d.]+ s; "
                     r"reference freed", log)


def test_dpo_reference_table_names_every_sequence_by_example_and_part(tmp_path):
    config = load_config(None, [*BASE, f"runtime.output_dir={tmp_path}", "stages=[dpo]",
                                "dpo.precompute_ref_logprobs=true"])
    tokenizer = models.build_tokenizer()
    examples = [{"prompt_ids": [1, 5 + i], "chosen_ids": [7, 8, 9][: 1 + i % 3], "rejected_ids": [10 + i]}
                for i in range(7)]
    context = run.RunContext(config=config, run_dir=tmp_path, device=torch.device("cpu"), tokenizer=tokenizer,
                         train_examples=examples, eval_examples=examples[:3],
                         metrics=MetricsLog(tmp_path / "m.jsonl"))
    stage = supervised.DPOStage(context)
    stage.build_models("tiny", None)
    reference = stage.reference
    stage.before_training(examples, examples[:3])
    assert stage.reference is None and stage.reference_tables["train"].shape == (14,)
    batches = stage.micro_batches(examples, [4, 1, 6], 10)  # a small budget: several batches
    assert len(batches) > 1
    assert sorted(i for batch in batches for i in batch.sequence_index.tolist()) == [2, 3, 8, 9, 12, 13]
    for batch, cached in zip(batches, stage.prepare(batches)):
        ids = batch.sequence_index.tolist()
        assert all(chosen % 2 == 0 and rejected == chosen + 1 for chosen, rejected in zip(ids[0::2], ids[1::2]))
        with torch.inference_mode():
            live = stage._sequence_logprobs(reference, batch, False)
        assert torch.allclose(cached, live, atol=1e-5)


@pytest.mark.parametrize("bf16_optimizer, low, high", [("master_weights", 0.85, 1.15),
                                                        ("stochastic_rounding", 0.7, 1.3), ("pure", 0.0, 0.4)])
def test_bf16_sft_follows_the_float32_run_unless_pure(tmp_path, bf16_optimizer, low, high):
    """SFT of a bf16 model at lr 1e-5 from saved weights: with master weights (the default) the trained bf16 weights
    show the float32 run's displacement from the start (measured 97%), with stochastic rounding about all of it on
    average (100%); pure bf16 AdamW rounds most of it away (14%)."""
    torch.manual_seed(0)
    start = models.load_causal_lm("tiny")
    start.save_pretrained(tmp_path / "start")
    models.build_tokenizer().save_pretrained(tmp_path / "start")
    initial = {name: value.detach().double() for name, value in start.state_dict().items()}
    common = ["stages=[sft]", "sft.max_steps=16", "sft.lr=1e-5", "runtime.checkpoint_every=0",
              "data.max_eval_samples=0", f"model.name_or_path={tmp_path / 'start'}"]
    reference = load_file(run_main(tmp_path / "fp32", *common, "model.dtype=fp32") / "sft" / "model" / "model.safetensors")
    run_dir = run_main(tmp_path / bf16_optimizer, *common, "model.dtype=bf16", f"model.bf16_optimizer={bf16_optimizer}")
    trained = load_file(run_dir / "sft" / "model" / "model.safetensors")
    along = squared = 0.0
    for key, value in trained.items():
        assert value.dtype == torch.bfloat16
        wanted = reference[key].double() - initial[key]
        got = value.double() - initial[key].to(torch.bfloat16).double()
        along += float((got * wanted).sum())
        squared += float((wanted * wanted).sum())
    assert low < along / squared < high, along / squared


def test_a_nonfinite_gradient_skips_its_update_and_training_goes_on(tmp_path, monkeypatch):
    """NaN losses in steps 3 and 4 (every micro-batch): those two updates are skipped, logged as skipped with their
    NaN norm, and the weights stay finite; the run finishes. Step 5 onwards train as usual."""
    original = supervised.SFTStage.loss
    step_of_call = []
    monkeypatch.setattr(supervised, "NonFiniteSteps", _StepTracking(supervised.NonFiniteSteps, step_of_call))

    def loss(self, batch, extra, denominator):
        value, stats = original(self, batch, extra, denominator)
        current = len(step_of_call) + 1  # optimizer steps already checked + 1
        return (value * float("nan"), stats) if current in (3, 4) else (value, stats)

    monkeypatch.setattr(supervised.SFTStage, "loss", loss)
    run_dir = run_main(tmp_path / "run", "stages=[sft]", "sft.max_steps=8", "runtime.checkpoint_every=0")
    records = stage_records(run_dir, "sft")
    assert [r["step"] for r in records if r.get("update_skipped")] == [3, 4]
    assert all(math.isnan(float(r["grad_norm"])) for r in records if r.get("update_skipped"))  # written as "nan"
    assert all(math.isfinite(r["grad_norm"]) and math.isfinite(r["loss"]) for r in records if r["step"] >= 5)
    weights = load_file(run_dir / "sft" / "model" / "model.safetensors")
    assert all(bool(torch.isfinite(value).all()) for value in weights.values())


def test_nonfinite_gradients_in_a_row_stop_the_run_with_finite_checkpoints(tmp_path, monkeypatch, capsys):
    original = supervised.SFTStage.loss
    step_of_call = []
    monkeypatch.setattr(supervised, "NonFiniteSteps", _StepTracking(supervised.NonFiniteSteps, step_of_call))

    def loss(self, batch, extra, denominator):
        value, stats = original(self, batch, extra, denominator)
        return (value * float("nan"), stats) if len(step_of_call) + 1 >= 3 else (value, stats)

    monkeypatch.setattr(supervised.SFTStage, "loss", loss)
    code = main([*BASE, f"runtime.output_dir={tmp_path / 'run'}", "stages=[sft]", "sft.max_steps=8",
                 "runtime.checkpoint_every=1", "runtime.keep_last=10", "runtime.max_nonfinite_steps=2"])
    error = capsys.readouterr().err
    assert code == 3 and "2 optimizer steps in a row, the last step 4" in error, error
    checkpoints = sorted((tmp_path / "run" / "sft" / "checkpoints").iterdir())
    assert [ckpt.read_state(folder)["step"] for folder in checkpoints] == [1, 2, 3]  # none after the stop
    for folder in checkpoints:
        weights = load_file(folder / "model" / "model.safetensors")
        assert all(bool(torch.isfinite(value).all()) for value in weights.values())


class _StepTracking:
    """Wraps NonFiniteSteps so a test knows how many optimizer steps have been checked (`calls` grows by one each)."""

    def __init__(self, cls, calls: list):
        self.cls, self.calls = cls, calls

    def __call__(self, *args, **kwargs):
        guard = self.cls(*args, **kwargs)
        allows = guard.allows

        def counted(*call_args, **call_kwargs):
            self.calls.append(call_args[1])
            return allows(*call_args, **call_kwargs)

        guard.allows = counted
        return guard


@pytest.mark.parametrize("stage, target, expected", [
    ("sft", "SFTStage.loss", ["stage sft, phase forward", "sft.micro_batch_tokens=1024",
                              "model.gradient_checkpointing=false"]),
    ("sft", "optimizer_step", ["stage sft, phase optimizer_step", "model.bf16_optimizer=master_weights",
                               "offload_optimizer"]),
])
def test_out_of_memory_names_the_phase_and_the_settings_that_shrink_it(tmp_path, monkeypatch, capsys, stage, target,
                                                                        expected):
    """A device OOM (raised here on CPU) ends the run with exit code 4 and one line naming stage, phase, torch's own
    first line and the settings that lower that phase's memory, with their values; torch's whole message goes to
    train.log."""
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                     "139.8 GiB\nof which 1.2 GiB is free.")

    if target == "SFTStage.loss":
        monkeypatch.setattr(supervised.SFTStage, "loss", out_of_memory)
    else:
        monkeypatch.setattr(optimization.torch.nn.utils, "clip_grad_norm_", out_of_memory)
    code = main([*BASE, f"runtime.output_dir={tmp_path / 'run'}", f"stages=[{stage}]", "sft.max_steps=2"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 4 and error.startswith("rto_fast.train: error: out of device memory"), error
    assert "Tried to allocate 2.00 GiB" in error and all(part in error for part in expected), error
    assert "of which 1.2 GiB is free" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.parametrize("phases, expected", [
    (["decode_forward", "generate"], "phase generate > decode_forward (CUDA out of memory.). The last checkpoint is "
                                     "kept: rerun to resume. Settings that lower this phase's memory: "
                                     "rl.generation_batch_size=64; rl.max_new_tokens=None; "
                                     "rl.offload_frozen_models=false"),
    (["reference_logprobs", "score"], "rl.micro_batch_tokens=4096; rl.offload_frozen_models=false; "
                                      "model.fused_output_layer=false"),
    (["policy_backward", "train"], "rl.micro_batch_tokens=4096; model.gradient_checkpointing=false"),
    ([], "phase outside the timed phases"),
])
def test_out_of_memory_advice_for_the_rl_phases(phases, expected):
    from rto_fast.trainer.memory_advice import describe

    error = torch.OutOfMemoryError("CUDA out of memory.")
    error.rto_fast_phases = phases
    message = describe(error, "rto", load_config(None, ["rl.generation_batch_size=64"]))
    assert message.startswith("out of device memory in stage rto") and expected in message, message


def test_a_stop_during_a_stages_last_step_stops_before_the_next_stage(tmp_path, monkeypatch, capsys):
    original = supervised.NonFiniteSteps

    class SignalInStepTwo(original):
        def allows(self, grad_norm, where, *args, **kwargs):
            if where == "step 2":
                os.kill(os.getpid(), signal.SIGTERM)
            return super().allows(grad_norm, where, *args, **kwargs)

    monkeypatch.setattr(supervised, "NonFiniteSteps", SignalInStepTwo)
    code = main([*BASE, f"runtime.output_dir={tmp_path / 'run'}", "stages=[sft,dpo]", "sft.max_steps=2",
                 "dpo.max_steps=2"])
    error = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM before stage dpo" in error, error
    assert (tmp_path / "run" / "sft" / "model").exists() and not (tmp_path / "run" / "dpo").exists()
