"""bench/ helpers that decide what a benchmark measures: the tokenizer of a chosen vocabulary size (the benchmark
models' output layer and logits scale with it), and the command lines of the benchmarks."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_rl_step  # noqa: E402


@pytest.mark.parametrize("vocab_size", [259, 1000, 50304])
def test_sized_tokenizer_has_exactly_the_size_and_round_trips(vocab_size):
    tokenizer = bench_rl_step.sized_tokenizer(vocab_size)
    assert len(tokenizer) == vocab_size
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == list(range(vocab_size - 3,
                                                                                                   vocab_size))
    text = "Human: list 3 primes > 7, then sort them!\nAssistant: 11 13 17 \u00e9\u4e2d"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    if vocab_size >= 1000:  # merges make ordinary text shorter than its bytes
        assert len(ids) < len(text.encode())
    # Every id a model can sample decodes (random weights sample all of them).
    assert all(isinstance(tokenizer.decode([i]), str) for i in range(0, vocab_size, 97))


def test_sized_tokenizer_refuses_a_size_below_its_bytes_and_specials():
    with pytest.raises(SystemExit, match="--vocab must be at least 259"):
        bench_rl_step.sized_tokenizer(258)


def test_tune_logprobs_smoke_run_reports_every_setting(tmp_path):
    """bench/tune_logprobs.py (run on a GPU to pick the kernels' launch settings) runs its grid through the Triton
    interpreter on a tiny shape: every setting gives the default's outputs and gets a time."""
    import tune_logprobs

    output = tmp_path / "tune.md"
    assert tune_logprobs.main(["--smoke", "--output", str(output)]) == 0
    text = output.read_text()
    # forward, forward with entropy, backward, three log-probs
    assert text.count("Default setting:") == 4 and "outputs differ" not in text and "Error" not in text
    assert text.count("1.00x") == 4  # the default is timed in each section


def test_optimizer_benchmark_reports_every_bf16_optimizer(tmp_path):
    import bench_optimizer

    output = tmp_path / "optimizer.md"
    assert bench_optimizer.main(["--device", "cpu", "--model", "tiny", "--repeats", "1", "--output", str(output)]) == 0
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in output.read_text().splitlines()
            if line.startswith("| fp32") or line.startswith("| bf16")}
    # optimizer state bytes per parameter: float32 Adam 8, bf16 Adam 4, masters + float32 Adam 12
    assert {name: row[3] for name, row in rows.items()} == {"fp32 fused": "8", "bf16 pure": "4",
                                                            "bf16 master weights": "12",
                                                            "bf16 stochastic rounding": "4"}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "sft"])
def test_train_step_benchmark_runs_both_sides(tmp_path, stage):
    """bench/bench_train_step.py end to end on a tiny setting: both sides train the same rows from the same model and
    start from the same loss (DPO: log 2, a policy equal to its reference; SFT: the random model's NLL)."""
    pytest.importorskip("trl")
    import bench_train_step

    output = tmp_path / "step.md"
    extra = ["--precompute-ref"] if stage == "dpo" else []
    assert bench_train_step.main(["--stage", stage, "--device", "cpu", "--batch", "4", "--steps", "3", "--warmup",
                                  "1", *extra, "--output", str(output)]) == 0
    rows = [line for line in output.read_text().splitlines() if line.startswith(("| rto_fast", "| TRL"))]
    assert len(rows) == 2
    losses = [float(row.split(" | ")[5].rstrip(" |")) for row in rows]
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)
    if stage == "dpo":
        assert losses[0] == pytest.approx(0.6931, abs=1e-4)
        assert all(row.split(" | ")[3] != "-" for row in rows)  # both precompute times measured
