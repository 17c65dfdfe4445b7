"""Data-parallel runs under DeepSpeed: the pieces in-process, and real 2-process runs started by the tests.

    pytest tests/test_distributed.py -q

The multi-process tests launch `torchrun --nproc_per_node 2 -m rto_fast.train` on CPU (gloo, torch's AdamW) with the
tiny model and compare with the plain single-process run of the same global batch: SFT, DPO and RM, ZeRO stages
1-3.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rto_fast.trainer import distributed
from rto_fast.trainer import cli as train
from rto_fast.trainer.config import SFTConfig

pytestmark = pytest.mark.cpu_path
REPO = Path(__file__).resolve().parents[1]
deepspeed_installed = pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None,
                                         reason="deepspeed is not installed")

# Two optimizer steps of SFT, DPO and the reward model, then two RTO iterations and the win rates, on the tiny model
# and the letters task (configs/tiny_compare.yaml, the settings these tolerances were set on), several
# micro-batches per step (so that accumulation, token-balanced shards and zero-weight padding passes all happen).
# RTO samples greedily here: ranks sample different prompts with their own random numbers, so only greedy rollouts
# can be compared with one process token for token. The critic starts from the SFT model, not the reward model: the
# reward model's value-head bias has an exactly zero gradient under the pairwise loss in one process, and a ~1e-10
# one when the gradient is summed over ranks, which Adam turns into a 4e-5 step; a critic started from it drifts
# apart by design of Adam, not of the data-parallel math (the reward model itself is compared below).
RUN_ARGS = ["--config", str(REPO / "configs" / "tiny_compare.yaml"), "stages=[sft,dpo,rm,rto,eval]", "sft.max_steps=2",
            "dpo.max_steps=2", "rm.max_steps=2", "sft.micro_batch_tokens=512", "dpo.micro_batch_tokens=1024",
            "rm.micro_batch_tokens=1024", "sft.eval_every=0", "dpo.eval_every=0", "rm.eval_every=0",
            "rl.iterations=2", "rl.rollout_batch_size=8", "rl.mini_batch_size=4", "rl.micro_batch_tokens=256",
            "rl.temperature=0", "rl.eval_prompts=0", "rl.critic_init=sft", "data.max_eval_samples=16",
            "eval.models=[sft,dpo,rto]", "eval.temperature=0",
            "runtime.progress_bar=false"]


# ------------------------------------------------------------------------------------------------ in process

def test_shard_by_tokens_balances_tokens_and_keeps_every_index():
    generator = torch.Generator().manual_seed(0)
    for parts in (1, 2, 3, 8):
        indices = torch.randperm(50, generator=generator).tolist()
        tokens = torch.randint(10, 500, (50,), generator=generator).tolist()
        shards = distributed.shard_by_tokens(indices, tokens, parts)
        assert sorted(i for shard in shards for i in shard) == sorted(indices)
        assert all(shards) and len(shards) == parts
        assert shards == distributed.shard_by_tokens(indices, tokens, parts)  # every rank computes the same split
        by_index = dict(zip(indices, tokens))
        loads = [sum(by_index[i] for i in shard) for shard in shards]
        assert max(loads) - min(loads) <= max(tokens)  # greedy longest-first: within one example's tokens
        for shard in shards:  # original order kept inside a shard
            assert shard == [i for i in indices if i in set(shard)]
    # Fewer examples than ranks: the empty shards are the last ones.
    assert distributed.shard_by_tokens([5, 6], [10, 20], 3) == [[6], [5], []]


@pytest.mark.parametrize("config,key", [
    ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": True}}, "zero_optimization.stage"),
    ({"zero_optimization": []}, "zero_optimization"),
    ({"train_batch_size": 32}, "train_batch_size"),
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu"),
    ({"gradient_accumulation_steps": 3}, "gradient_accumulation_steps"),
    ({"optimizer": {"type": "Adam"}}, "optimizer"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ({"gradient_clipping": 1.0}, "gradient_clipping"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "zero_optimization.offload_param"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}},
     "zero_optimization.offload_optimizer.device"),
    ({"fp16": {"enabled": True}}, "fp16"),
    ({"bf16": True}, "bf16"),
])
def test_bad_deepspeed_config_names_the_key(config, key):
    with pytest.raises(distributed.DistributedError, match=f"runtime.deepspeed.{key}:? "):
        distributed.validate_deepspeed_config(config)


def test_deepspeed_config_files(tmp_path):
    good = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "train_batch_size": "auto",
            "bf16": {"enabled": False}}
    (tmp_path / "good.json").write_text(json.dumps(good))
    assert distributed.validate_deepspeed_config(distributed.load_deepspeed_config(str(tmp_path / "good.json"))) == good
    (tmp_path / "broken.json").write_text("{stage: 2")
    with pytest.raises(distributed.DistributedError, match="not valid JSON"):
        distributed.load_deepspeed_config(str(tmp_path / "broken.json"))
    with pytest.raises(distributed.DistributedError, match="neither a mapping nor an existing JSON file"):
        distributed.load_deepspeed_config(str(tmp_path / "missing.json"))


def test_deepspeed_config_takes_the_stage_settings():
    settings = SFTConfig(lr=2e-4, weight_decay=0.1, max_grad_norm=0.5)
    config = distributed.deepspeed_config({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}, settings,
                                          world_size=4, device_type="cpu")
    assert config["zero_optimization"] == {"stage": 3} and config["bf16"] == {"enabled": True}
    assert config["optimizer"]["params"]["lr"] == 2e-4 and config["optimizer"]["params"]["weight_decay"] == 0.1
    assert config["optimizer"]["params"]["torch_adam"] is True
    assert config["gradient_clipping"] == 0.5
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (4, 1, 1)


def _usage_error(monkeypatch, capsys, args, world_size=None):
    if world_size is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
    assert train.main(args) == train.EXIT_USAGE
    return capsys.readouterr().err


def test_preflight_rejects_bad_distributed_settings(monkeypatch, capsys, tmp_path):
    out = f"runtime.output_dir={tmp_path / 'run'}"
    err = _usage_error(monkeypatch, capsys, RUN_ARGS + [out, "runtime.deepspeed={zero_optimization: {stage: 4}}"])
    assert "runtime.deepspeed.zero_optimization.stage" in err
    err = _usage_error(monkeypatch, capsys, RUN_ARGS + [out, "sft.batch_size=15"], world_size=2)
    assert "sft.batch_size" in err and "2 ranks" in err
    err = _usage_error(monkeypatch, capsys, RUN_ARGS + [out, "stages=[sft,dpo,rto]", "rl.critic_optimizer=shared"],
                       world_size=2)
    assert "rl.critic_optimizer" in err
    err = _usage_error(monkeypatch, capsys, RUN_ARGS + [out, "stages=[sft,dpo,rto]", "rl.rollout_batch_size=5"],
                       world_size=2)
    assert "rl.rollout_batch_size" in err and "2 ranks" in err
    assert not (tmp_path / "run").exists()  # nothing was written


# ------------------------------------------------------------------------------------------------ 2 processes

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment() -> dict:
    # The repository first; the caller's PYTHONPATH after it (a suite run against other library versions).
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    environment.pop("WORLD_SIZE", None)
    return environment


def _run(output_dir: Path, *extra: str, processes: int | None = None, check: bool = True, launcher: str = "torchrun"):
    """One training run: plain `python -m rto_fast.train`, or `processes` ranks started by torchrun or by DeepSpeed's
    launcher (which also passes --local_rank)."""
    environment = _environment()
    if processes is None:
        command = [sys.executable, "-m", "rto_fast.train"]
    elif launcher == "deepspeed":
        command = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={processes}",
                   f"--master_port={_free_port()}", "--module", "rto_fast.train"]
    else:
        command = _command(processes)
    result = subprocess.run(command + RUN_ARGS + [f"runtime.output_dir={output_dir}", *extra], cwd=REPO,
                            env=environment, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _command(processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            f"--master_port={_free_port()}", "-m", "rto_fast.train"]


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _weights(folder: Path) -> dict:
    """Every tensor of an exported model folder (a reward model's value head lives in its own file)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"{folder}: no safetensors"
    return {f"{path.name}:{key}": tensor for path in files for key, tensor in load_file(path).items()}


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[key].double() - b[key].double()).abs().max().item() for key in a)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().split("\n") if line]


def _eval_samples(run: Path) -> list[tuple]:
    lines = (run / "eval" / "samples.jsonl").read_text(encoding="utf-8").split("\n")
    return [(r["model"], r["prompt_index"], r["response"]) for r in map(json.loads, filter(None, lines))]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("plain") / "run"
    _run(run)
    return run


# Adam's first steps move every weight by about lr (3e-3 for SFT); summing the step's gradient over ranks in another
# order changes the weights by ~1e-6 after two steps. A wrong loss scale or a lost micro-batch moves them by ~1e-3.
WEIGHT_TOLERANCE = 1e-4
# Logged values compared between runs to rel 1e-4, abs 1e-6, except: the KL is a mean of log-prob differences near 0,
# each log-prob carrying float32 rounding of about 1e-6, and under ZeRO-3 it moved by 2e-7 to 1e-6 from the one-process
# value (LoRA, step 3: 5.4e-7 with the earlier exp of the CPU row kernels, 1.0e-6 with the current one).
ABSOLUTE_SLACK = {"kl": 5e-6}


@deepspeed_installed
@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_two_ranks_match_one_process(single_process_run, tmp_path, zero_stage):
    run = tmp_path / "run"
    # ZeRO-2 and -3 also take the fused output layer (log-probs from the output layer's input; the single process
    # computes them from the logits): trained under ZeRO-2, frozen and partitioned under ZeRO-3.
    fused = [f"model.fused_output_layer={'true' if zero_stage > 1 else 'false'}"]
    result = _run(run, f"runtime.deepspeed={{zero_optimization: {{stage: {zero_stage}}}}}", *fused, processes=2)
    assert "fused output layer:" not in result.stderr  # every model took the fused path (or was trained by ZeRO-3)
    if zero_stage == 3:  # frozen models are partitioned too (rank 0 logs)
        partitioned = [line.split("rto_fast.trainer.distributed: ")[1].split(" partitioned")[0]
                       for line in result.stderr.splitlines() if "partitioned over 2 ranks (ZeRO-3)" in line]
        assert partitioned == ["reference", "reference", "DPO model", "reward model",  # DPO; RTO
                               "reward model", "DPO model", "reference"], partitioned  # the eval stage's judges
        for line in result.stderr.splitlines():
            if "partitioned over 2 ranks (ZeRO-3)" in line:
                held, total = (int(word) for word in line.split(": ")[-1].split() if word.isdigit())
                assert held <= total // 2 + 64, line  # half of each parameter, rounded up per tensor
        # ... and load straight into partitions (all but the random tiny model, which SFT starts from).
        assert result.stderr.count("loading a frozen model straight into ZeRO-3 partitions") == 7
        assert result.stderr.count("loading a trained model straight into ZeRO-3 partitions") == 4
    for model in ("sft/model", "dpo/model", "rm/model", "rto/model", "rto/critic"):
        difference = _max_difference(_weights(single_process_run / model), _weights(run / model))
        assert difference < WEIGHT_TOLERANCE, f"ZeRO-{zero_stage} {model}: weights differ by {difference:.2e}"
    expected, records = _records(single_process_run), _records(run)
    # Rank 0 alone writes the log: one record per step, the same steps as the single process.
    assert [(r["stage"], r["step"]) for r in records] == [(r["stage"], r["step"]) for r in expected]
    for want, got in zip(expected, records):
        assert got.get("tokens") == want.get("tokens")
        for key in ("loss", "grad_norm", "kl", "dpo_reward", "pg_loss", "vf_loss", "grad_norm_actor",
                    "grad_norm_critic", "entropy", "response_length"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=ABSOLUTE_SLACK.get(key, 1e-6)), \
                    f"{want['stage']} {key}"
    # Eval: each rank sampled (greedily) and judged its slice of the prompts; rank 0 wrote the gathered result.
    expected_eval = json.loads((single_process_run / "eval" / "win_rates.json").read_text())
    got_eval = json.loads((run / "eval" / "win_rates.json").read_text())
    assert got_eval["matrix"] == expected_eval["matrix"]
    for model, means in expected_eval["means"].items():
        # abs 1e-4: the reward model's value-head bias differs by ~4e-5 between the runs (see RUN_ARGS), which
        # shifts every rm score by that constant (and changes no win rate).
        assert got_eval["means"][model] == pytest.approx(means, rel=1e-4, abs=1e-4), model
    assert _eval_samples(run) == _eval_samples(single_process_run)
    state = json.loads((run / "sft" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["deepspeed"] is True


@deepspeed_installed
@pytest.mark.parametrize("deepspeed_config,precision", [
    ("{zero_optimization: {stage: 2, offload_optimizer: {device: cpu}}, bf16: {enabled: true}}", "bf16"),
    ("{zero_optimization: {stage: 3, offload_optimizer: {device: cpu}, offload_param: {device: cpu}}}", "fp32"),
])
def test_offload_and_bf16(single_process_run, tmp_path, deepspeed_config, precision):
    run = tmp_path / "run"
    extra = [f"runtime.deepspeed={deepspeed_config}", "stages=[sft]"] + (["model.dtype=bf16"] if precision == "bf16"
                                                                         else [])
    _run(run, *extra, processes=2)
    expected = [r for r in _records(single_process_run) if r["stage"] == "sft"]
    records = _records(run)
    assert [r["step"] for r in records] == [r["step"] for r in expected]
    # bf16 weights (fp32 master copies in the ZeRO optimizer) follow the fp32 run to bf16 precision.
    tolerance = 2e-2 if precision == "bf16" else 1e-5
    for want, got in zip(expected, records):
        assert got["loss"] == pytest.approx(want["loss"], rel=tolerance)
    if precision == "fp32":
        assert _max_difference(_weights(single_process_run / "sft" / "model"), _weights(run / "sft" / "model")) \
            < WEIGHT_TOLERANCE


@deepspeed_installed
def test_deepspeed_launcher(single_process_run, tmp_path):
    run = tmp_path / "run"
    _run(run, "runtime.deepspeed={zero_optimization: {stage: 1}}", "stages=[sft]", processes=2, launcher="deepspeed")
    expected = [r["loss"] for r in _records(single_process_run) if r["stage"] == "sft"]
    assert [r["loss"] for r in _records(run)] == pytest.approx(expected, rel=1e-5)


@deepspeed_installed
def test_two_rank_checkpoint_resumes_identically(tmp_path):
    # RTO with sampling (each rank's RNG state is part of the checkpoint) and two engines (policy and critic).
    extra = ["runtime.deepspeed={zero_optimization: {stage: 2}}", "stages=[sft,dpo,rto]", "rl.iterations=4",
             "rl.temperature=1.0", "runtime.checkpoint_every=2", "runtime.keep_last=3"]
    full = tmp_path / "full"
    _run(full, *extra, processes=2)
    # The same run interrupted after its iteration-2 checkpoint: later checkpoints, the models and their log records
    # gone (sft and dpo had finished and are skipped).
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for folder in ("rto/model", "rto/critic", "rto/checkpoints/step-00000004"):
        shutil.rmtree(resumed / folder)
    records = _records(resumed)
    kept = [r for r in records if not (r["stage"] == "rto" and r["step"] > 2)]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    # A different world size cannot resume these ZeRO shards: a clear error, nothing changed.
    result = _run(resumed, *extra, check=False, processes=1)
    assert result.returncode != 0  # torchrun reports the rank's exit code 2 as a failure
    assert "rto_fast.train: error: runtime.resume:" in result.stderr and "written by 2 ranks" in result.stderr
    # Nor can a plain single-process run.
    result = _run(resumed, *extra[1:], check=False)
    assert result.returncode == train.EXIT_USAGE and "written under DeepSpeed by 2 ranks" in result.stderr
    _run(resumed, *extra, processes=2)
    for model in ("rto/model", "rto/critic"):
        assert _max_difference(_weights(full / model), _weights(resumed / model)) == 0.0, model
    rto = [(r["step"], r["kl"], r["true_reward"], r["pg_loss"]) for r in _records(full) if r["stage"] == "rto"]
    assert rto == [(r["step"], r["kl"], r["true_reward"], r["pg_loss"]) for r in _records(resumed)
                   if r["stage"] == "rto"]


@deepspeed_installed
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SIGTERM reaches one of two ranks only: the ranks agree on the step (the other one would otherwise block in
    the next step's collectives), both save that step's checkpoint and exit; the rerun ends where an uninterrupted
    2-rank run ends."""
    extra = ["stages=[sft]", "sft.max_steps=40", "runtime.checkpoint_every=0", "runtime.keep_last=2"]
    full = tmp_path / "full"
    _run(full, *extra, processes=2)
    stopped = tmp_path / "stopped"
    process = subprocess.Popen(_command(2) + RUN_ARGS + [f"runtime.output_dir={stopped}", *extra], cwd=REPO,
                               env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while not (stopped / "metrics.jsonl").exists() or '"step": 2,' not in (stopped / "metrics.jsonl").read_text():
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no second SFT step within 300 s"
            time.sleep(0.05)
        ranks = _children(process.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGTERM)
        _, errors = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0 and "stopped by SIGTERM after step" in errors, errors[-3000:]
    checkpoints = sorted((stopped / "sft" / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").exists(), checkpoints
    stopped_at = json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"]
    assert 2 <= stopped_at < 40 and not (stopped / "sft" / "model").exists()
    _run(stopped, *extra, processes=2)
    assert _max_difference(_weights(full / "sft" / "model"), _weights(stopped / "sft" / "model")) == 0.0
    assert [r["step"] for r in _records(stopped)] == list(range(1, 41))


@deepspeed_installed
def test_zero3_dpo_with_the_reference_scored_once(single_process_run, tmp_path):
    """dpo.precompute_ref_logprobs under ZeRO-3: the partitioned reference scores each rank's share of the pairs in
    collective passes, the ranks add their tables up, and DPO trains as it does with the live reference."""
    run = tmp_path / "run"
    _run(run, "runtime.deepspeed={zero_optimization: {stage: 3}}", "stages=[sft,dpo]",
         "dpo.precompute_ref_logprobs=true", processes=2)
    expected = [r for r in _records(single_process_run) if r["stage"] == "dpo"]
    records = [r for r in _records(run) if r["stage"] == "dpo"]
    assert [r["step"] for r in records] == [r["step"] for r in expected]
    for want, got in zip(expected, records):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["reward_margin"] == pytest.approx(want["reward_margin"], rel=1e-3, abs=1e-5)
    assert "reference freed" in (run / "train.log").read_text()


def test_zero3_dpo_reference_table_with_fewer_batches_than_ranks(tmp_path):
    """One evaluation pair, so one reference micro-batch for two ranks: the rank without a batch of its own still
    joins every collective pass of the partitioned reference (it used to fail with an IndexError)."""
    run = tmp_path / "run"
    _run(run, "runtime.deepspeed={zero_optimization: {stage: 3}}", "stages=[sft,dpo]", "data.max_eval_samples=1",
         "dpo.precompute_ref_logprobs=true", processes=2)
    records = [r for r in _records(run) if r["stage"] == "dpo"]
    assert records and all(math.isfinite(r["loss"]) for r in records)
    assert "reference freed" in (run / "train.log").read_text()


@deepspeed_installed
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_lora_under_zero_matches_one_process_and_resumes_identically(tmp_path, zero_stage):
    """LoRA adapters under ZeRO-2 and ZeRO-3 (the DPO and RTO references are the policy with its adapters off; under
    ZeRO-3 the base weights load straight into partitions and the adapters are partitioned by the engine): two ranks
    end where one process ends; the engine checkpoints hold the adapters only, and a run resumed from iteration 2
    ends bitwise where the uninterrupted 2-rank run ends."""
    extra = ["model.lora_rank=4", "stages=[sft,dpo,rto]", "rl.iterations=4", "runtime.checkpoint_every=2",
             "runtime.keep_last=3"]
    zero2 = f"runtime.deepspeed={{zero_optimization: {{stage: {zero_stage}}}}}"
    plain, full = tmp_path / "plain", tmp_path / "full"
    _run(plain, *extra)
    _run(full, zero2, *extra, processes=2)
    for model in ("sft/model", "dpo/model", "rto/model", "rto/critic"):
        difference = _max_difference(_weights(plain / model), _weights(full / model))
        assert difference < WEIGHT_TOLERANCE, f"{model}: weights differ by {difference:.2e}"
    for want, got in zip(_records(plain), _records(full)):
        for key in ("loss", "kl", "pg_loss", "vf_loss"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=ABSOLUTE_SLACK.get(key, 1e-6)), \
                    f"{want['stage']} {key}"
    checkpoint = full / "rto" / "checkpoints" / "step-00000002"
    assert (checkpoint / "model" / "adapter_model.safetensors").is_file()
    engine_files = [path.stat().st_size for path in checkpoint.rglob("*model_states.pt")]
    base_bytes = (plain / "sft" / "model" / "model.safetensors").stat().st_size
    # The adapters, not the frozen base weights.
    assert engine_files and max(engine_files) < base_bytes / 2, (engine_files, base_bytes)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for folder in ("rto/model", "rto/critic", "rto/checkpoints/step-00000004"):
        shutil.rmtree(resumed / folder)
    kept = [r for r in _records(resumed) if not (r["stage"] == "rto" and r["step"] > 2)]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    _run(resumed, zero2, *extra, processes=2)
    for model in ("rto/model", "rto/critic"):
        assert _max_difference(_weights(full / model), _weights(resumed / model)) == 0.0, model
