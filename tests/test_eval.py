"""The eval stage on tiny random models and the synthetic task's test prompts: the win-rate matrix (antisymmetric,
ties count half, common random numbers), each judge against a plain unpacked computation, the written outputs,
errors before any model loads, skipped missing models, and a rerun that skips the finished stage."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from rto_fast.trainer import checkpoint as ckpt
from rto_fast.trainer import data, evaluation, models
from rto_fast.tasks import letters as synthetic
from rto_fast.trainer.config_file import load_config
from rto_fast.trainer.generation import Rollout
from rto_fast.trainer.run_log import MetricsLog, read_metrics
from rto_fast.trainer.run import RunContext
from rto_fast.trainer.pipeline import prompt_data_config

NUM_PROMPTS = 16
BASE = ["stages=[eval]", "runtime.device=cpu", "runtime.progress_bar=false", "data.max_eval_samples=16",
        "data.max_prompt_length=48", "data.max_response_length=8", f"eval.num_prompts={NUM_PROMPTS}",
        "eval.max_new_tokens=8", "eval.batch_size=8", "eval.micro_batch_tokens=256", "rl.dpo_coef=0.5"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny random models saved as folders (sft; dpo with other weights; an RM with a nonzero head), the tokenizer
    and the synthetic task's test prompts."""
    folder = tmp_path_factory.mktemp("eval_assets")
    tokenizer = models.build_tokenizer()
    paths = {}
    for name, seed in (("sft", 11), ("dpo", 12)):
        torch.manual_seed(seed)
        paths[name] = folder / name
        ckpt.save_model(models.load_causal_lm("tiny", trainable=False), paths[name], tokenizer)
    torch.manual_seed(13)
    reward_model = models.ValueHeadModel.from_pretrained("tiny", trainable=False)
    with torch.no_grad():
        torch.nn.init.normal_(reward_model.value_head.weight, std=1.0)
        reward_model.value_head.bias.fill_(0.3)
    paths["rm"] = folder / "rm"
    ckpt.save_model(reward_model, paths["rm"], tokenizer)
    config = load_config(None, BASE)
    _, test_prompts = data.load_prompt_splits(prompt_data_config(config), tokenizer, cache_dir=folder / "data")
    assert len(test_prompts) >= NUM_PROMPTS
    return {"paths": paths, "tokenizer": tokenizer, "prompts": test_prompts}


def make_context(assets, run_dir, *overrides, judges=("sft", "dpo", "rm")):
    """A RunContext as the CLI builds it; `judges`: which of the saved models the model.* paths point at."""
    keys = {"sft": "sft_path", "dpo": "dpo_path", "rm": "reward_path"}
    paths = [f"model.{keys[name]}={assets['paths'][name]}" for name in judges]
    config = load_config(None, [*BASE, f"runtime.output_dir={run_dir}", *paths, *overrides])
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(config=config, run_dir=run_dir, device=torch.device("cpu"), tokenizer=assets["tokenizer"],
                      train_examples=[], eval_examples=[], metrics=MetricsLog(run_dir / "metrics.jsonl"),
                      eval_prompts=assets["prompts"])


def read_outputs(eval_dir):
    result = json.loads((eval_dir / evaluation.WIN_RATES_JSON).read_text())
    samples = [json.loads(line) for line in (eval_dir / evaluation.SAMPLES_FILE).read_text(encoding="utf-8").split("\n")
               if line]
    return result, samples


def judge_scores(samples, model, key):
    rows = sorted((s for s in samples if s["model"] == model), key=lambda s: s["prompt_index"])
    return np.asarray([row["scores"][key] for row in rows])


def _refuse(*args, **kwargs):
    raise AssertionError("a model was loaded")


@pytest.fixture
def eval_log(caplog):
    """Records of the rto_fast.trainer.evaluation logger (attached directly: the CLI may have stopped propagation)."""
    eval_logger = logging.getLogger("rto_fast.trainer.evaluation")
    eval_logger.addHandler(caplog.handler)
    previous = eval_logger.level
    eval_logger.setLevel(logging.INFO)
    yield caplog
    eval_logger.removeHandler(caplog.handler)
    eval_logger.setLevel(previous)


# ------------------------------------------------------------------------------------------------ the stage

@pytest.fixture(scope="module")
def rm_run(assets, tmp_path_factory):
    """Judge auto (= rm): sft, dpo, rto (a copy of sft in this run's rto/model folder) and ppo (never ran)."""
    run_dir = tmp_path_factory.mktemp("rm_run")
    ckpt.save_model(models.load_causal_lm(str(assets["paths"]["sft"]), trainable=False), run_dir / "rto" / "model",
                    assets["tokenizer"])
    context = make_context(assets, run_dir, "eval.models=[sft,dpo,rto,ppo]")
    eval_dir = evaluation.run_eval(context)
    return context, eval_dir


def test_outputs_and_matrix(rm_run):
    context, eval_dir = rm_run
    assert eval_dir == context.run_dir / "eval"
    result, samples = read_outputs(eval_dir)
    names = ["sft", "dpo", "rto"]
    assert result["models"] == names and result["judge"] == "rm"  # ppo never ran: skipped
    assert result["settings"]["num_prompts"] == NUM_PROMPTS and result["settings"]["max_new_tokens"] == 8
    assert len(samples) == len(names) * NUM_PROMPTS
    rates = np.asarray(result["matrix"])
    np.testing.assert_array_equal(rates + rates.T, np.ones((3, 3)))  # antisymmetric, exactly
    np.testing.assert_array_equal(np.diag(rates), 0.5)
    # The matrix is the tie-aware win rate of the per-prompt judge scores written to samples.jsonl.
    for a, first in enumerate(names):
        for b, second in enumerate(names):
            s_a, s_b = judge_scores(samples, first, "rm"), judge_scores(samples, second, "rm")
            assert rates[a, b] == pytest.approx(np.mean((s_a > s_b) + 0.5 * (s_a == s_b)), abs=1e-12)
    # Every judge that exists scores every sample; the means are those of the samples.
    for name in names:
        for key in ("rm", "dpo", "truth", "length", "finished"):
            assert result["means"][name][key] == pytest.approx(judge_scores(samples, name, key).mean())
    table = (eval_dir / evaluation.WIN_RATES_MD).read_text()
    assert "| sft | - |" in table and "| dpo |" in table and "eos fraction" in table and "mean true reward" in table


def test_common_random_numbers_make_a_copy_tie(rm_run):
    """rto holds the same weights as sft: with the same sampling seed it writes the same responses, every prompt
    is a tie, and the win rate is exactly one half. Different weights give different responses."""
    _, eval_dir = rm_run
    result, samples = read_outputs(eval_dir)
    by_model = {name: [s for s in samples if s["model"] == name] for name in result["models"]}
    assert [s["response"] for s in by_model["sft"]] == [s["response"] for s in by_model["rto"]]
    assert result["win_rates"]["sft"]["rto"] == 0.5 and result["win_rates"]["rto"]["sft"] == 0.5
    assert [s["response"] for s in by_model["sft"]] != [s["response"] for s in by_model["dpo"]]


def test_true_reward_matches_samples(rm_run):
    """r* is computed on the sampled tokens: where the response text decodes without replacement characters it
    equals r* of the text; a byte that is not valid UTF-8 alone counts as one wrong character per token, which the
    decoded text (where several such bytes make one replacement character) can only undercount."""
    _, eval_dir = rm_run
    _, samples = read_outputs(eval_dir)
    for sample in samples:
        expected = synthetic.true_reward(sample["prompt"], sample["response"], finished=sample["finished"])
        if "\ufffd" in sample["response"]:
            assert sample["scores"]["truth"] <= expected
        else:
            assert sample["scores"]["truth"] == expected
        assert sample["scores"]["finished"] == float(sample["finished"])


def test_metrics_record(rm_run):
    context, _ = rm_run
    records = [r for r in read_metrics(context.run_dir / "metrics.jsonl") if r["stage"] == "eval"]
    assert len(records) == 1 and records[0]["step"] == 0
    result, _ = read_outputs(context.run_dir / "eval")
    for name in result["models"]:
        assert records[0][f"rm_score/{name}"] == pytest.approx(result["means"][name]["rm"])
        assert records[0][f"true_reward/{name}"] == pytest.approx(result["means"][name]["truth"])
        assert records[0][f"judge_score/{name}"] == records[0][f"rm_score/{name}"]


def test_rerun_skips(rm_run, monkeypatch, eval_log):
    context, eval_dir = rm_run
    before = {name: (eval_dir / name).read_bytes() for name in
              (evaluation.WIN_RATES_JSON, evaluation.WIN_RATES_MD, evaluation.SAMPLES_FILE)}
    monkeypatch.setattr(evaluation, "load_causal_lm", _refuse)
    monkeypatch.setattr(evaluation.ValueHeadModel, "from_pretrained", _refuse)
    assert evaluation.run_eval(context) == eval_dir
    assert {name: (eval_dir / name).read_bytes() for name in before} == before
    assert "skipping the stage" in eval_log.text
    assert not list(eval_dir.glob(".*.tmp"))  # atomic writes left nothing behind


def test_rerun_with_other_models_evaluates_again(assets, tmp_path, eval_log):
    run_dir = tmp_path / "run"
    first = evaluation.run_eval(make_context(assets, run_dir, "eval.models=[sft,rto]", "eval.num_prompts=4"))
    assert read_outputs(first)[0]["models"] == ["sft"]  # rto has not run
    ckpt.save_model(models.load_causal_lm(str(assets["paths"]["dpo"]), trainable=False), run_dir / "rto" / "model",
                    assets["tokenizer"])
    second = evaluation.run_eval(make_context(assets, run_dir, "eval.models=[sft,rto]", "eval.num_prompts=4"))
    result, samples = read_outputs(second)
    assert result["models"] == ["sft", "rto"] and len(samples) == 8
    assert "evaluating again" in eval_log.text
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "eval"]
    assert len(records) == 1 and "rm_score/rto" in records[0]


@pytest.mark.parametrize("judge, judges", [("auto", ("sft", "dpo")), ("truth", ("sft", "dpo", "rm")),
                                           ("auto", ())])
def test_other_judges(assets, tmp_path, eval_log, judge, judges):
    """auto without a reward model is the DPO reward; true is r*; auto with no model judge is r*. Folders work as
    model names."""
    sft, dpo = assets["paths"]["sft"], assets["paths"]["dpo"]
    context = make_context(assets, tmp_path / "run", f"eval.judge={judge}", f"eval.models=[{sft},{dpo}]",
                           "eval.num_prompts=6", judges=judges)
    result, samples = read_outputs(evaluation.run_eval(context))
    expected = {("auto", ("sft", "dpo")): "dpo", ("truth", ("sft", "dpo", "rm")): "truth", ("auto", ()): "truth"}
    assert result["judge"] == expected[judge, judges]
    assert result["models"] == [str(sft), str(dpo)] and len(samples) == 12
    s_a, s_b = judge_scores(samples, str(sft), result["judge"]), judge_scores(samples, str(dpo), result["judge"])
    assert result["matrix"][0][1] == pytest.approx(np.mean((s_a > s_b) + 0.5 * (s_a == s_b)), abs=1e-12)
    assert ("rm" in samples[0]["scores"]) == ("rm" in judges)
    assert ("dpo" in samples[0]["scores"]) == ("dpo" in judges)
    assert f"judge {result['judge']}" in eval_log.text  # the table is logged


def test_named_folders(assets, tmp_path):
    """name=folder entries of eval.models evaluate that folder under that name (as the comparison script lists them)."""
    sft, dpo = assets["paths"]["sft"], assets["paths"]["dpo"]
    context = make_context(assets, tmp_path / "run", "eval.judge=truth", f"eval.models=[base={sft},tuned={dpo}]",
                           "eval.num_prompts=4")
    result, samples = read_outputs(evaluation.run_eval(context))
    assert result["models"] == ["base", "tuned"]
    assert result["paths"] == {"base": str(sft), "tuned": str(dpo)}
    assert {sample["model"] for sample in samples} == {"base", "tuned"}


# ------------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("overrides, judges, message", [
    (["eval.judge=rm"], ("sft", "dpo"), "model.reward_path"),
    (["eval.judge=dpo"], ("sft", "rm"), "model.dpo_path"),
    (["eval.models=[rto,ppo,dppo]"], ("sft", "dpo", "rm"), "eval.models"),
    (["eval.models=[sft,rm]"], ("sft", "dpo", "rm"), "eval.models"),
    (["eval.models=[sft,./no/such/folder]"], ("sft", "dpo", "rm"), "eval.models"),
    (["eval.models=[sft,x=./no/such/folder]"], ("sft", "dpo", "rm"), "eval.models: x"),
    (["eval.models=[sft,=folder]"], ("sft", "dpo", "rm"), "write name=folder"),
])
def test_errors_before_any_model_loads(assets, tmp_path, monkeypatch, overrides, judges, message):
    monkeypatch.setattr(evaluation, "load_causal_lm", _refuse)
    monkeypatch.setattr(evaluation.ValueHeadModel, "from_pretrained", _refuse)
    context = make_context(assets, tmp_path / "run", *overrides, judges=judges)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        evaluation.run_eval(context)
    assert not (tmp_path / "run" / "eval").exists()


def test_missing_judges_and_prompts(assets, tmp_path, monkeypatch):
    no_models = {"rm": None, "dpo": None, "ref": None}
    with pytest.raises(ValueError, match="eval.judge: truth"):
        evaluation.choose_judge("truth", no_models, known_reward=False)
    with pytest.raises(ValueError, match="eval.judge: auto"):
        evaluation.choose_judge("auto", no_models, known_reward=False)
    with pytest.raises(ValueError, match="model.ref_path"):
        evaluation.choose_judge("dpo", {"rm": None, "dpo": Path("x"), "ref": None}, known_reward=True)
    monkeypatch.setattr(evaluation, "load_causal_lm", _refuse)
    context = make_context(assets, tmp_path / "run", "eval.models=[sft]")
    context.eval_prompts = []
    with pytest.raises(ValueError, match=r"data\.test_split"):
        evaluation.run_eval(context)


# ------------------------------------------------------------------------------------------------ judges

def _random_rollouts(generator, eos_id, count=5):
    """Rollouts of random tokens of different lengths, some ending with eos."""
    rollouts = []
    for index in range(count):
        prompt = torch.randint(0, 256, (int(torch.randint(3, 20, (1,), generator=generator)),),
                               generator=generator).tolist()
        response = torch.randint(0, 256, (int(torch.randint(1, 12, (1,), generator=generator)),),
                                 generator=generator).tolist()
        finished = index % 2 == 0
        rollouts.append(Rollout(prompt, response + [eos_id] if finished else response, finished))
    return rollouts


def _plain_logprobs(model, prompt_ids, response_ids):
    """Response-token log-probs from an unpacked forward and log_softmax in the model's own dtype."""
    input_ids = torch.tensor([prompt_ids + response_ids])
    logits = model(input_ids=input_ids).logits[0]
    logprobs = torch.log_softmax(logits.to(next(model.parameters()).dtype), dim=-1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(response_ids) - 1)
    return logprobs[positions, input_ids[0, positions + 1]]


def test_judges_match_plain_forwards(assets, tmp_path):
    """rm: a plain (1, T) ValueHeadModel forward read at the last token; dpo: beta * sum(logp_dpo - logp_ref) from
    plain forwards and log_softmax. The reference is the same computation in float64; the packed fp32 scores may
    be off by at most about twice what the plain fp32 computation is off, plus a few fp32 ulps."""
    context = make_context(assets, tmp_path / "run")
    judges = evaluation.load_judges(context)
    assert judges.available() == ["rm", "dpo", "truth"] and judges.dpo_coef == 0.5
    assert not any(p.requires_grad for m in (judges.reward_model, judges.dpo_model, judges.ref_model)
                   for p in m.parameters())
    rollouts = _random_rollouts(torch.Generator().manual_seed(4), assets["tokenizer"].eos_token_id)
    prompts = [data.PromptExample(r.prompt_ids, "\n\nHuman: abc\n\nAssistant:") for r in rollouts]
    scores = evaluation.score_rollouts(judges, prompts, rollouts, assets["tokenizer"], micro_batch_tokens=40)
    assert set(scores) == {"rm", "dpo", "truth", "length", "finished"}
    np.testing.assert_array_equal(scores["length"], [len(r.response_ids) for r in rollouts])
    np.testing.assert_array_equal(scores["finished"], [r.finished for r in rollouts])
    for prompt, rollout, value in zip(prompts, rollouts, scores["truth"]):
        # r* on tokens: with the byte-level tokenizer each token is one character, a byte outside ASCII (or a special
        # token) one that is no letter.
        content = rollout.response_ids[:len(rollout.response_ids) - rollout.finished]
        text = "".join(chr(token) if token < 128 else "\ufffd" for token in content)
        assert value == synthetic.true_reward(prompt.prompt, text, finished=rollout.finished)

    def check(ours, plain32, plain64):
        budget = 2 * np.abs(plain32 - plain64) + 8 * np.finfo(np.float32).eps * (1 + np.abs(plain64))
        assert np.all(np.abs(ours - plain64) <= budget), (ours, plain32, plain64)

    rm64 = _double(judges.reward_model)
    dpo64, ref64 = _double(judges.dpo_model), _double(judges.ref_model)
    with torch.no_grad():
        rm32 = [float(judges.reward_model(input_ids=torch.tensor([r.prompt_ids + r.response_ids]))[0, -1])
                for r in rollouts]
        rm_ref = [float(_value_head_double(rm64, r.prompt_ids + r.response_ids)) for r in rollouts]
        dpo32 = [0.5 * float((_plain_logprobs(judges.dpo_model, r.prompt_ids, r.response_ids).double()
                              - _plain_logprobs(judges.ref_model, r.prompt_ids, r.response_ids).double()).sum())
                 for r in rollouts]
        dpo_ref = [0.5 * float((_plain_logprobs(dpo64, r.prompt_ids, r.response_ids)
                                - _plain_logprobs(ref64, r.prompt_ids, r.response_ids)).sum()) for r in rollouts]
    check(scores["rm"], np.asarray(rm32), np.asarray(rm_ref))
    check(scores["dpo"], np.asarray(dpo32), np.asarray(dpo_ref))
    assert np.abs(np.asarray(dpo_ref)).min() > 1e-3  # the two models differ: a real check, not 0 == 0


def test_collective_judging_pads_passes_and_judges_an_empty_slice(assets, tmp_path):
    """Partitioned judges (ZeRO-3) need every rank to run as many judge passes: with `dist`, score_rollouts runs
    repeats of its last micro-batch up to the busiest rank's count (same scores), and a rank with no responses still
    runs its passes on a placeholder and returns empty arrays. Faked in one process with dist.max."""
    judges = evaluation.load_judges(make_context(assets, tmp_path / "run"))
    rollouts = _random_rollouts(torch.Generator().manual_seed(5), assets["tokenizer"].eos_token_id)
    prompts = [data.PromptExample(r.prompt_ids, "\n\nHuman: abc\n\nAssistant:") for r in rollouts]
    passes = []
    judges.reward_model.register_forward_hook(lambda *args: passes.append(1))

    class Busier:  # another rank runs three more micro-batches than this one
        @staticmethod
        def max(value):
            return value + 3

    plain = evaluation.score_rollouts(judges, prompts, rollouts, assets["tokenizer"], micro_batch_tokens=40)
    plain_passes = len(passes)
    padded = evaluation.score_rollouts(judges, prompts, rollouts, assets["tokenizer"], micro_batch_tokens=40,
                                       dist=Busier())
    assert len(passes) - plain_passes == plain_passes + 3
    assert plain.keys() == padded.keys() and all(np.array_equal(plain[key], padded[key]) for key in plain)
    empty = evaluation.score_rollouts(judges, [], [], assets["tokenizer"], micro_batch_tokens=40, dist=Busier())
    assert len(passes) == plain_passes + (plain_passes + 3) + (1 + 3)  # the placeholder batch, then 3 repeats
    assert {key: len(values) for key, values in empty.items()} == {key: 0 for key in plain}


def _double(model):
    import copy

    return copy.deepcopy(model).double()


def _value_head_double(model, ids):
    hidden = model.backbone(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state
    return model.value_head(hidden)[0, -1, 0]


def test_win_rate_ties_count_half():
    rates, stderr = evaluation.win_rate_matrix([np.array([1.0, 2.0, 3.0, 0.0]), np.array([1.0, 1.0, 4.0, 0.0]),
                                                np.array([1.0, 2.0, 3.0, 0.0])])
    assert rates[0, 1] == pytest.approx((0.5 + 1 + 0 + 0.5) / 4) and rates[1, 0] == pytest.approx(1 - rates[0, 1])
    assert rates[0, 2] == rates[2, 0] == 0.5 and stderr[0, 2] == 0.0
    np.testing.assert_array_equal(np.diag(rates), 0.5)
