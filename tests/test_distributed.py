"""Data-parallel runs under DeepSpeed: the pieces in-process, and real 2-process runs started by the tests.

    pytest tests/test_distributed.py -q

The multi-process tests launch `torchrun --nproc_per_node 2 -m rto_fast.train` on CPU (gloo, torch's AdamW) with the
tiny model and compare with the plain single-process run of the same global batch: SFT, DPO and RM, ZeRO stages
1-3.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rto_fast import distributed, train
from rto_fast.config import SFTConfig

pytestmark = pytest.mark.cpu_path
REPO = Path(__file__).resolve().parents[1]
deepspeed_installed = pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None,
                                         reason="deepspeed is not installed")

# Two optimizer steps of SFT, DPO and the reward model on the tiny model, several micro-batches per step (so that accumulation,
# token-balanced shards and zero-weight padding passes all happen).
RUN_ARGS = ["--config", str(REPO / "configs" / "tiny.yaml"), "stages=[sft,dpo,rm]", "sft.max_steps=2",
            "dpo.max_steps=2", "rm.max_steps=2", "sft.micro_batch_tokens=512", "dpo.micro_batch_tokens=1024",
            "rm.micro_batch_tokens=1024", "sft.eval_every=0", "dpo.eval_every=0", "rm.eval_every=0",
            "data.max_eval_samples=16", "runtime.progress_bar=false"]


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
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}, "zero_optimization.offload_optimizer.device"),
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
    err = _usage_error(monkeypatch, capsys, RUN_ARGS + [out, "stages=[sft,rto]"], world_size=2)
    assert "stages rto" in err
    assert not (tmp_path / "run").exists()  # nothing was written


# ------------------------------------------------------------------------------------------------ 2 processes

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(output_dir: Path, *extra: str, processes: int | None = None, check: bool = True):
    """One training run: plain `python -m rto_fast.train`, or torchrun with `processes` ranks."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    environment.pop("WORLD_SIZE", None)
    if processes is None:
        command = [sys.executable, "-m", "rto_fast.train"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={_free_port()}", "-m", "rto_fast.train"]
    result = subprocess.run(command + RUN_ARGS + [f"runtime.output_dir={output_dir}", *extra], cwd=REPO,
                            env=environment, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


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
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("plain") / "run"
    _run(run)
    return run


# Adam's first steps move every weight by about lr (3e-3 for SFT); summing the step's gradient over ranks in another
# order changes the weights by ~1e-6 after two steps. A wrong loss scale or a lost micro-batch moves them by ~1e-3.
WEIGHT_TOLERANCE = 1e-4


@deepspeed_installed
@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_two_ranks_match_one_process(single_process_run, tmp_path, zero_stage):
    run = tmp_path / "run"
    _run(run, f"runtime.deepspeed={{zero_optimization: {{stage: {zero_stage}}}}}", processes=2)
    for stage in ("sft", "dpo", "rm"):
        difference = _max_difference(_weights(single_process_run / stage / "model"), _weights(run / stage / "model"))
        assert difference < WEIGHT_TOLERANCE, f"ZeRO-{zero_stage} {stage}: weights differ by {difference:.2e}"
    expected, records = _records(single_process_run), _records(run)
    # Rank 0 alone writes the log: one record per step, the same steps as the single process.
    assert [(r["stage"], r["step"]) for r in records] == [(r["stage"], r["step"]) for r in expected]
    for want, got in zip(expected, records):
        assert got["tokens"] == want["tokens"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    state = json.loads((run / "sft" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["deepspeed"] is True


@deepspeed_installed
def test_two_rank_checkpoint_resumes_identically(tmp_path):
    extra = ["runtime.deepspeed={zero_optimization: {stage: 2}}", "stages=[sft]", "sft.max_steps=4",
             "runtime.checkpoint_every=2", "runtime.keep_last=3"]
    full = tmp_path / "full"
    _run(full, *extra, processes=2)
    # The same run interrupted after its step-2 checkpoint: later checkpoints, the model and their log records gone.
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "sft" / "model")
    shutil.rmtree(resumed / "sft" / "checkpoints" / "step-00000004")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(line for line in lines if json.loads(line)["step"] <= 2) + "\n")
    # A different world size cannot resume these ZeRO shards: a clear error, nothing changed.
    result = _run(resumed, *extra, check=False, processes=1)
    assert result.returncode != 0 and "written by 2 ranks" in result.stderr
    _run(resumed, *extra, processes=2)
    assert _max_difference(_weights(full / "sft" / "model"), _weights(resumed / "sft" / "model")) == 0.0
    assert [r["loss"] for r in _records(full)] == [r["loss"] for r in _records(resumed)]
