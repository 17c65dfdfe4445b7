"""What a newcomer's first run shows: the README's main job (configs/tiny.yaml) ends with a summary that answers "did
RL help?" (each model's judge score, the per-prompt win rates, a verdict, the plots); a crash leaves its traceback in
train.log; a missing data file is the first error reported."""

import json
from pathlib import Path

import pytest

from rto_fast.trainer import cli
from rto_fast.trainer.cli import main
from rto_fast.trainer.run_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs" / "tiny.yaml"), "runtime.progress_bar=false"]
# configs/tiny.yaml's pipeline at its smallest: a few steps of each stage, one RL iteration, 16 test prompts.
ONE_ITERATION = ["data.max_train_samples=64", "data.max_eval_samples=32", "sft.max_steps=4", "dpo.max_steps=4",
                 "rl.iterations=1", "rl.rollout_batch_size=16", "rl.mini_batch_size=8", "rl.eval_prompts=16",
                 "eval.num_prompts=16", "runtime.checkpoint_every=0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_config_trains_and_evaluates_the_credit_task():
    from rto_fast.trainer.config_file import load_config

    config = load_config(ROOT / "configs" / "tiny.yaml")
    assert config.data.source == "credit" and config.stages == ["sft", "pairs", "dpo", "rto", "eval"]
    assert config.eval.judge == "truth"
    assert set(config.eval.models) == {"sft", "dpo", "rto"}  # only what it trains: no "skipping ppo" at the end


def test_summary_opens_with_scores_win_rates_and_verdict(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main([*TINY, f"runtime.output_dir={run_dir}", *ONE_ITERATION]) == 0
    summary = (run_dir / "summary.md").read_text()
    lines = summary.splitlines()
    # The answer comes first: scores, then the win-rate matrix, then the verdict, then plots and the stage table.
    scores = lines.index("| model | mean true reward | sd over prompts | standard error |")
    matrix = next(i for i, line in enumerate(lines) if line.startswith("Win rate (%)"))
    verdict = next(i for i, line in enumerate(lines) if line.startswith("**RTO "))
    plots = next(i for i, line in enumerate(lines) if line.startswith("Plots:"))
    stages = lines.index("Stages:")
    assert scores < matrix < verdict < plots < stages
    for name in ("SFT", "DPO", "RTO"):
        assert any(line.startswith(f"| {name} | ") for line in lines[scores:matrix])
        assert any(line.startswith(f"| {name} | ") for line in lines[matrix:verdict])
    assert "| model | SFT | DPO | RTO |" in summary
    assert " beats SFT on " in lines[verdict] or " does not beat SFT" in lines[verdict]
    assert "true reward" in lines[verdict]
    # Every plot is linked and exists, the eval stage's figure among them; no all-"-" eval row in the stage table.
    for name in ("eval", "sft", "dpo", "rto"):
        assert f"(plots/{name}.png)" in lines[plots] and (run_dir / "plots" / f"{name}.png").stat().st_size > 0
    assert not any(line.startswith("| eval |") for line in lines[stages:])
    # The RL curve starts at iteration 0 (the policy before any update: the SFT model's score, same prompts and seed).
    start = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "rto" and r["step"] == 0]
    assert len(start) == 1 and "eval_true_reward" in start[0]
    result = json.loads((run_dir / "eval" / "win_rates.json").read_text())
    assert set(result["stds"]) == {"sft", "dpo", "rto"}
    # The terminal gets the same answer at the end of the run.
    assert "| model | SFT | DPO | RTO |" in capsys.readouterr().out


def test_a_crash_writes_its_traceback_to_train_log(tmp_path, monkeypatch):
    def crash(name, context):
        raise RuntimeError(f"simulated failure in {name}")

    monkeypatch.setattr(cli, "run_one", crash)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated failure in sft"):
        main([*TINY, f"runtime.output_dir={run_dir}", "stages=[sft]"])
    log = (run_dir / "train.log").read_text()
    assert "crashed: RuntimeError: simulated failure in sft" in log
    assert "Traceback (most recent call last)" in log and "in crash" in log


def test_an_exit_reason_reaches_an_existing_train_log(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train.log").write_text("an earlier run\n")
    assert main([*TINY, f"runtime.output_dir={run_dir}", "sft.lr=-1"]) == 2
    assert "sft.lr" in capsys.readouterr().err
    assert "exit code 2: error: sft.lr: must be > 0" in (run_dir / "train.log").read_text()


def test_a_missing_data_file_is_the_first_error(tmp_path, capsys):
    """tiny.yaml judges with the true reward, which only a bundled task has: with data.source a missing file, that
    file is what the user has to fix first."""
    code = main([*TINY, f"runtime.output_dir={tmp_path / 'run'}", "data.source=/tmp/nope.jsonl"])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert error.splitlines()[0].startswith("rto_fast.train: error: data.source: '/tmp/nope.jsonl' does not exist")
    assert "eval.judge" not in error


def test_eval_models_the_run_never_trains_are_refused_before_training(tmp_path, capsys):
    code = main([*TINY, f"runtime.output_dir={tmp_path / 'run'}", "eval.models=[sft,dpo,rto,ppo]"])
    error = capsys.readouterr().err
    assert code == 2 and "eval.models: 'ppo' is not trained by this config" in error
