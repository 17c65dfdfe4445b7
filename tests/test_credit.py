"""The credit task's pipeline on tiny models: the pairs stage samples and labels on-policy pairs that DPO and the RM
then train on; `python -m rto_fast.trainer.diagnose` writes its report (and shows the letters task's out-of-support tokens);
bench/rl_comparison.py writes OUTPUT.json with every model on a one-iteration smoke config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rto_fast.trainer import diagnose, pairs
from rto_fast.trainer.models import build_tokenizer
from rto_fast.tasks import get_task, token_true_rewards
from rto_fast.trainer.cli import main

ROOT = Path(__file__).resolve().parents[1]
CREDIT = ["model.tokenizer=credit", "data.source=credit", "data.max_prompt_length=8", "data.max_response_length=32",
          "runtime.device=cpu", "runtime.progress_bar=false", "runtime.seed=2", "data.max_train_samples=64",
          "data.max_eval_samples=16", "sft.max_steps=20", "sft.lr=1e-2", "sft.batch_size=16", "dpo.max_steps=4",
          "dpo.batch_size=16", "rm.max_steps=4", "rm.batch_size=16", "pairs.batch_size=64"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def credit_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("credit") / "run"
    assert main([*CREDIT, f"runtime.output_dir={run_dir}", "stages=[sft,pairs,dpo,rm]"]) == 0
    return run_dir


def test_pairs_are_sampled_from_the_sft_model_and_labelled_by_true_reward(credit_run):
    tokenizer = build_tokenizer("credit")
    task = get_task("credit")
    summary = json.loads((credit_run / "pairs" / "pairs.json").read_text())
    assert summary["train"]["pairs"] + summary["train"]["no_pair"] == summary["train"]["prompts"] == 64
    rows = [json.loads(line) for line in (credit_run / "pairs" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == summary["train"]["pairs"] > 0
    demo_prompts = {json.loads(line)["prompt"] for line in
                    (credit_run / "data" / "credit-seed0-2048-256" / "preference" / "train.jsonl").read_text()
                    .splitlines()}
    for row in rows:
        assert row["prompt"] in demo_prompts  # the preference data's prompts
        for side in ("chosen", "rejected"):
            ids = row[f"{side}_ids"]
            finished = ids[-1] == tokenizer.eos_token_id
            assert sum(token_true_rewards(task, row["prompt"], ids, finished, tokenizer)) == row[f"{side}_reward"]
        assert row["chosen_reward"] != row["rejected_reward"]
        assert 0.5 <= row["p_chosen"] or row["chosen_reward"] < row["rejected_reward"]
    # DPO and the RM trained on these pairs, not on the demonstrations.
    log = (credit_run / "train.log").read_text()
    assert f"dpo: 4 optimizer steps over {len(rows)} training examples" in log


def test_pairs_stage_is_not_sampled_again_on_rerun(credit_run):
    before = (credit_run / "pairs" / "train.jsonl").stat().st_mtime_ns
    assert main([*CREDIT, f"runtime.output_dir={credit_run}", "stages=[pairs]"]) == 0
    assert (credit_run / "pairs" / "train.jsonl").stat().st_mtime_ns == before


def test_pairs_stage_needs_a_bundled_task(tmp_path, capsys):
    code = main(["runtime.device=cpu", f"runtime.output_dir={tmp_path}", "stages=[sft,pairs]",
                 "data.source=org/pairs"])  # a Hub name: a missing local file would be reported first
    error = capsys.readouterr().err
    assert code == 2 and "'pairs' labels samples with a bundled task's true reward" in error


def test_diagnose_report_on_the_credit_task(credit_run, tmp_path):
    output = tmp_path / "report"
    code = diagnose.main(["--num-prompts", "12", "--output", str(output), *CREDIT,
                          f"runtime.output_dir={credit_run}"])
    assert code == 0
    report = json.loads((output / "report.json").read_text())
    assert report["prompts"] == 12 and report["vocabulary"] == 12
    assert 0.0 <= report["held_out"]["dpo_accuracy"] <= 1.0 and 0.0 <= report["held_out"]["rm_accuracy"] <= 1.0
    assert report["held_out"]["label_agreement_with_truth"] > 0.5
    for key in ("dense_mean", "dense_std", "length_correlation", "true_reward"):
        assert key in report["samples"], key
    for key in ("spearman_dpo_rm", "spearman_dpo_truth", "token_pearson_dpo_truth"):
        assert key in report["agreement"], key
    assert report["drift"]["exponent"] == pytest.approx(0.1 / 0.03)
    assert [entry["exponent"] for entry in report["drift_scan"]] == pytest.approx([0.5, 1.0, 2.0, 0.1 / 0.03])
    assert all("true_reward" in entry and "rm_score" in entry for entry in report["drift_scan"])
    assert any(line.startswith("Extrapolation: beta1 / beta2 = 3.33") for line in report["findings"])
    assert report["recommended_dpo_clip"] > 0
    text = (output / "report.md").read_text()
    for section in ("## Findings", "## Outside the preference data's support", "## Predicted drift",
                    "## Recommended rl.dpo_clip"):
        assert section in text, section
    assert (output / "diagnose.png").stat().st_size > 10_000


def test_diagnose_shows_the_letters_tasks_out_of_support_bytes(tmp_path):
    # The letters task's byte vocabulary: a barely trained model samples bytes no preference response contains.
    run_dir = tmp_path / "run"
    settings = ["runtime.device=cpu", "runtime.progress_bar=false", "data.max_train_samples=32",
                "data.max_eval_samples=8", "data.max_prompt_length=48", "data.max_response_length=12",
                "sft.max_steps=2", "dpo.max_steps=2", f"runtime.output_dir={run_dir}"]
    assert main([*settings, "stages=[sft,dpo]"]) == 0
    assert diagnose.main(["--num-prompts", "8", *settings]) == 0
    report = json.loads((run_dir / "diagnose" / "report.json").read_text())
    assert report["support_tokens"] < report["vocabulary"] == 259
    assert report["out_of_support"]["tokens"] > 0
    assert report["out_of_support"]["best_out_mean"] is not None


def test_diagnose_names_a_missing_dpo_model(tmp_path, capsys):
    code = diagnose.main([f"runtime.output_dir={tmp_path}", "runtime.device=cpu"])
    assert code == 2 and "no DPO model" in capsys.readouterr().err


def test_tilted_sampling_with_exponent_zero_is_the_reference(credit_run):
    # pi_ref^(1-a) pi_dpo^a at a = 0 is the reference itself: every sampled token's log-ratio to it is 0.
    from rto_fast.trainer.models import load_causal_lm

    tokenizer = build_tokenizer("credit")
    ref = load_causal_lm(str(credit_run / "sft" / "model"), trainable=False)
    dpo = load_causal_lm(str(credit_run / "dpo" / "model"), trainable=False)
    prompts = [[tokenizer.bos_token_id] + tokenizer("cafb:", add_special_tokens=False)["input_ids"]] * 3
    rollouts, kl = diagnose.sample_tilted(ref, dpo, prompts, 0.0, 8, tokenizer.eos_token_id)
    assert len(rollouts) == 3 and all(0 < len(rollout.response_ids) <= 8 for rollout in rollouts)
    assert abs(kl).max() < 1e-5


def test_rank_statistics():
    import numpy as np

    assert diagnose.ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert diagnose.spearman([1, 2, 3, 4], [10, 20, 25, 100]) == pytest.approx(1.0)
    assert diagnose.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.slow
def test_comparison_script_writes_every_model_on_a_smoke_config(tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, str(ROOT / "bench" / "rl_comparison.py"), "--config", "configs/credit_compare.yaml",
               "--seeds", "1", "--jobs", "1", "--root", str(tmp_path / "runs"), "--output", str(output),
               "--fractions", "--", "sft.max_steps=2", "dpo.max_steps=2", "rm.max_steps=2", "rl.iterations=1",
               "rl.rollout_batch_size=16", "data.max_train_samples=64", "eval.num_prompts=8", "rl.eval_prompts=8"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = json.loads(output.with_name("out.json").read_text())
    assert list(table) == ["seeds"] and list(table["seeds"]) == ["1"]
    assert set(table["seeds"]["1"]) == {"sft", "dpo", "ppo", "dppo", "rto", "rto_rm", "oracle_dense",
                                        "oracle_sparse"}
    assert all(isinstance(value, float) for value in table["seeds"]["1"].values())
    text = output.with_name("out.md").read_text()
    assert "## Win rates judged by r*" in text and "## The targets the paper predicts" in text
    for suffix in ("_curves.png", "_dpo_reward.png"):
        assert output.with_name("out" + suffix).is_file(), suffix
    assert not output.with_name("out_sample_efficiency.png").exists()  # no fractions asked for
