"""The RL stages (rto, ppo, dppo) on tiny models on CPU: each mode runs and logs what it promises; the rewards, returns
and log-probs the loop uses equal the float64 reference computed from plain unpacked forwards; the score lands on a
response's last token (eos, or the last generated token of a cut response); responses of one token work; with the
frozen models offloaded to host memory (forced on CPU) a run trains bitwise the same and the frozen models are on the
device only while they score; a resumed RL stage ends bitwise equal to an uninterrupted one; wrong settings fail
early with exit code 2; SIGTERM saves a checkpoint and the rerun ends as an uninterrupted run."""

import copy
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from rto_fast.trainer import checkpoint as ckpt
from rto_fast.trainer import data, distributed, models, offload, rl
from rto_fast.trainer.optimization import Optimization
from rto_fast.trainer.packing import build_micro_batches
from rto_fast.trainer.rl import rollout as rl_rollout
from rto_fast.trainer.rl import update as rl_update
from rto_fast.trainer.scoring import response_sequence
from rto_fast.ops import reference
from rto_fast.trainer.config_file import load_config
from rto_fast.trainer.generation import Rollout
from rto_fast.trainer.run_log import MetricsLog, read_metrics
from rto_fast.trainer.run import RunContext
from rto_fast.trainer.cli import main
from rto_fast.trainer.pipeline import prompt_data_config
from tests.utils import storage_pointers

RL_BASE = ["runtime.device=cpu", "runtime.progress_bar=false", "runtime.seed=5", "data.max_prompt_length=48",
           "data.max_response_length=10", "data.max_eval_samples=8", "rl.rollout_batch_size=8",
           "rl.mini_batch_size=4", "rl.max_new_tokens=10", "rl.micro_batch_tokens=256", "rl.eval_prompts=0",
           "rl.actor_lr=1e-3", "rl.critic_lr=1e-3", "rl.warmup_ratio=0.0", "eval.micro_batch_tokens=256"]
TIME_KEYS = ("time_generate_s", "time_score_s", "time_train_s", "time_s", "time_eval_s", "tokens_per_s",
             "elapsed_s")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny models saved as folders: sft (= reference and initial policy), dpo (other weights, so log ratios are not
    0), rm (a nonzero head, so scores differ), and the model.* overrides pointing at them."""
    folder = tmp_path_factory.mktemp("rl_assets")
    tokenizer = models.build_tokenizer()
    for name, seed in (("sft", 21), ("dpo", 22)):
        torch.manual_seed(seed)
        ckpt.save_model(models.load_causal_lm("tiny", trainable=False), folder / name, tokenizer)
    torch.manual_seed(23)
    reward_model = models.ValueHeadModel.from_pretrained(str(folder / "sft"), trainable=False)
    with torch.no_grad():
        torch.nn.init.normal_(reward_model.value_head.weight, std=1.0)
        reward_model.value_head.bias.fill_(0.2)
    ckpt.save_model(reward_model, folder / "rm", tokenizer)
    paths = [f"model.sft_path={folder / 'sft'}", f"model.dpo_path={folder / 'dpo'}",
             f"model.reward_path={folder / 'rm'}"]
    return {"folder": folder, "tokenizer": tokenizer, "paths": paths}


def run_cli(run_dir, assets, *overrides):
    return main([*RL_BASE, *assets["paths"], f"runtime.output_dir={run_dir}", *overrides])


def make_trainer(assets, tmp_path, mode, *overrides):
    """An RLStage with its models and optimizers, as the training loop builds it, with the synthetic task's prompts."""
    config = load_config(None, [*RL_BASE, *assets["paths"], f"runtime.output_dir={tmp_path}", f"stages=[{mode}]",
                                *overrides])
    tokenizer = assets["tokenizer"]
    train_prompts, eval_prompts = data.load_prompt_splits(prompt_data_config(config), tokenizer,
                                                          cache_dir=assets["folder"] / "data")
    context = RunContext(config=config, run_dir=Path(tmp_path), device=torch.device("cpu"), tokenizer=tokenizer,
                         train_examples=[], eval_examples=[], metrics=MetricsLog(Path(tmp_path) / "m.jsonl"),
                         train_prompts=train_prompts, eval_prompts=eval_prompts)
    torch.manual_seed(0)
    trainer = rl.RLStage(mode, context)
    trainer.build_models(None)
    trainer.build_optimizers(total_steps=10)
    return trainer


def plain_logprobs(model, prompt_ids, response_ids) -> torch.Tensor:
    """float64 log-probs of the response tokens from one unpacked forward (the oracle path)."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].double()
    logprobs = F.log_softmax(logits, dim=-1)
    start = len(prompt_ids)
    targets = ids[0, start:]
    return logprobs[start - 1:start - 1 + len(response_ids)].gather(1, targets[:, None])[:, 0]


def plain_score(reward_model, prompt_ids, response_ids) -> float:
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        return float(reward_model(input_ids=ids)[0, -1])


def plain_values(critic, prompt_ids, response_ids) -> torch.Tensor:
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        values = critic(input_ids=ids)[0].double()
    start = len(prompt_ids)
    return values[start - 1:start - 1 + len(response_ids)]


def expected_rewards(trainer, prompt, rollout):
    """reference.token_rewards on float64 log-probs of plain forwards, with the trainer's coefficients."""
    response = rollout.response_ids
    lp = plain_logprobs(trainer.policy, prompt.prompt_ids, response)
    ref = plain_logprobs(trainer.reference, prompt.prompt_ids, response)
    dpo = plain_logprobs(trainer.dpo_model, prompt.prompt_ids, response)
    score = None
    if trainer.use_reward_model:
        raw = plain_score(trainer.reward_model, prompt.prompt_ids, response)
        score = torch.tensor([min(max(raw, -trainer.settings.score_clip), trainer.settings.score_clip)],
                             dtype=torch.float64)
    mask = torch.ones(1, len(response), dtype=torch.bool)
    arguments = trainer.reward_arguments()
    rewards = reference.token_rewards(lp[None], ref[None], mask, dpo_logprobs=dpo[None], score=score, **arguments)
    return lp, ref, rewards[0]


# ------------------------------------------------------------------------------------------------ each mode runs

@pytest.mark.parametrize("mode", ["rto", "ppo", "dppo"])
def test_each_mode_runs_and_logs(tmp_path, assets, mode):
    run_dir = tmp_path / "run"
    assert run_cli(run_dir, assets, f"stages=[{mode}]", "rl.iterations=2", "rl.eval_prompts=4",
                   "rl.eval_every=1") == 0
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == mode]
    # Iteration 0: the evaluation of the starting policy, before any update (the plots' baseline).
    assert [r["step"] for r in records] == [0, 1, 2]
    assert {"eval_true_reward", "eval_dpo_reward", "eval_rm_score"} <= set(records[0])
    records = records[1:]
    keys = {"dpo_reward", "true_reward", "token_reward", "sequence_reward", "kl", "kl_coef", "entropy",
            "response_length", "eos_fraction", "clipfrac", "approx_kl", "vf_clipfrac", "pg_loss", "vf_loss",
            "explained_variance", "time_generate_s", "time_score_s", "time_train_s", "tokens_per_s",
            "prompts_seen", "eval_true_reward", "eval_dpo_reward", "eval_rm_score", "grad_norm_actor",
            "logprob_mismatch"}
    if mode == "ppo":
        keys.add("rm_score")
    for record in records:
        assert keys <= set(record), keys - set(record)
        # Before its first update the policy's training forward reproduces scoring's log-probs exactly on CPU.
        assert record["logprob_mismatch"] == 0.0
    assert records[-1]["prompts_seen"] == 16
    assert records[0]["kl_coef"] == pytest.approx({"rto": 0.03, "ppo": 0.05, "dppo": 0.05}[mode])
    assert records[0]["optimizer_steps"] == 2 * 2  # ppo_epochs x (8 responses / mini-batches of 4)
    policy = models.load_causal_lm(str(run_dir / mode / "model"), trainable=False)
    initial = models.load_causal_lm(str(assets["folder"] / "sft"), trainable=False)
    changed = [not torch.equal(a, b) for a, b in zip(policy.parameters(), initial.parameters())]
    assert any(changed)
    critic = models.ValueHeadModel.from_pretrained(str(run_dir / mode / "critic"), trainable=False)
    assert critic.value_head.weight.abs().sum() > 0
    assert (run_dir / "plots" / f"{mode}.png").is_file()


def test_logprob_mismatch_measures_scoring_against_training(tmp_path, assets, monkeypatch):
    """Scoring's log-probs shifted by 0.01 on every response token: the iteration's logprob_mismatch (first
    mini-batch, policy not yet updated) is that shift."""
    original = rl_rollout.packed_logprobs

    def shifted(model, batch, **kwargs):
        result = original(model, batch, **kwargs)
        if kwargs.get("return_entropy"):  # the training forward
            return result
        return torch.where(batch.response_mask.to(result.device), result + 0.01, result)

    monkeypatch.setattr(rl_rollout, "packed_logprobs", shifted)
    run_dir = tmp_path / "run"
    assert run_cli(run_dir, assets, "stages=[rto]", "rl.iterations=1") == 0
    record = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "rto"][0]
    assert record["logprob_mismatch"] == pytest.approx(0.01, abs=1e-6)


# ------------------------------------------------------------------------------------------------ the math

@pytest.mark.parametrize("mode, overrides", [
    ("rto", ()), ("ppo", ()), ("dppo", ()),
    ("rto", ("rl.reward_model=true", "rl.score_coef=0.7", "rl.dpo_clip=0.05", "rl.kl_estimator=k3")),
    ("rto", ("model.fused_output_layer=true",)),  # policy, reference and DPO log-probs from the layer's input
])
def test_rewards_returns_and_logprobs_match_the_reference(tmp_path, assets, mode, overrides):
    trainer = make_trainer(assets, tmp_path, mode, "rl.score_clip=0.5", *overrides)
    prompts = trainer.context.train_prompts[:6]
    torch.manual_seed(1)
    rollouts = trainer.sample(prompts)
    batch = trainer.gather(trainer.score(prompts, rollouts))  # gather whitens the advantages
    settings = trainer.settings
    advantages_raw = []
    for index, (prompt, rollout) in enumerate(zip(prompts, rollouts)):
        lp, ref, rewards = expected_rewards(trainer, prompt, rollout)
        torch.testing.assert_close(batch.old_logprobs[index].double(), lp, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(batch.ref_logprobs[index].double(), ref, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(batch.rewards[index].double(), rewards, atol=2e-5, rtol=1e-5)
        values = plain_values(trainer.critic, prompt.prompt_ids, rollout.response_ids)
        torch.testing.assert_close(batch.values[index].double(), values, atol=2e-5, rtol=1e-5)
        mask = torch.ones(1, len(rollout.response_ids), dtype=torch.bool)
        advantages, returns = reference.gae(rewards[None], values[None], mask, gamma=settings.gamma,
                                            lam=settings.lam)
        torch.testing.assert_close(batch.returns[index].double(), returns[0], atol=5e-5, rtol=1e-5)
        advantages_raw.append(advantages[0])
    flat = torch.cat(advantages_raw)
    expected = (flat - flat.mean()) / torch.sqrt(flat.var() + 1e-8)
    torch.testing.assert_close(torch.cat(batch.advantages).double(), expected, atol=1e-4, rtol=1e-4)
    if mode == "rto" and "rl.reward_model=true" in overrides:
        assert batch.scores is not None


def test_score_lands_on_the_last_token_and_missing_eos_penalty(tmp_path, assets):
    # kl_coef 0: rewards are exactly the clipped score on each response's last token, 0 elsewhere.
    trainer = make_trainer(assets, tmp_path, "ppo", "rl.kl_coef=0", "rl.score_clip=0.3",
                           "rl.missing_eos_penalty=2.0")
    eos = assets["tokenizer"].eos_token_id
    prompts = trainer.context.train_prompts[:3]
    rollouts = [Rollout(prompts[0].prompt_ids, [ord(" "), ord("a"), eos], True),   # ends with eos
                Rollout(prompts[1].prompt_ids, [ord(" "), ord("b"), ord("c")], False),   # cut at the limit
                Rollout(prompts[2].prompt_ids, [eos], True)]   # a response of one token
    batch = trainer.score(prompts, rollouts)
    for index, (prompt, rollout) in enumerate(zip(prompts, rollouts)):
        raw = plain_score(trainer.reward_model, prompt.prompt_ids, rollout.response_ids)
        assert float(batch.scores[index]) == pytest.approx(raw, abs=1e-5)
        expected = torch.zeros(len(rollout.response_ids), dtype=torch.float64)
        expected[-1] = min(max(raw, -0.3), 0.3) - (0.0 if rollout.finished else 2.0)
        torch.testing.assert_close(batch.rewards[index].double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("oracle", ["dense", "sparse"])
def test_true_reward_oracles_put_r_star_on_every_token_or_the_last(tmp_path, assets, oracle):
    # kl_coef 0: the rewards are exactly r* per token (dense) or r* of the response on its last token (sparse).
    from rto_fast.tasks import get_task, token_true_rewards

    mode = "rto" if oracle == "dense" else "ppo"
    trainer = make_trainer(assets, tmp_path, mode, "rl.kl_coef=0", f"rl.true_reward={oracle}")
    assert not trainer.use_reward_model
    eos = assets["tokenizer"].eos_token_id
    prompts = trainer.context.train_prompts[:3]
    word = prompts[0].prompt.split("Human: ")[1].split("\n")[0]
    rollouts = [Rollout(prompts[0].prompt_ids, [ord(" "), ord(word[0]), ord("z"), eos], True),
                Rollout(prompts[1].prompt_ids, [ord(" "), ord("b"), ord("c")], False),
                Rollout(prompts[2].prompt_ids, [0xE2, eos], True)]
    batch = trainer.score(prompts, rollouts)
    task = get_task("synthetic")
    for index, (prompt, rollout) in enumerate(zip(prompts, rollouts)):
        truth = torch.tensor(token_true_rewards(task, prompt.prompt, rollout.response_ids, rollout.finished,
                                                assets["tokenizer"]), dtype=torch.float64)
        if oracle == "sparse":
            truth = torch.cat([torch.zeros(len(truth) - 1, dtype=torch.float64), truth.sum()[None]])
        torch.testing.assert_close(batch.rewards[index].double(), truth, atol=1e-6, rtol=0)
    assert batch.rewards[0].tolist()[:3] == ([0.0, 1.0, -1.0] if oracle == "dense" else [0.0, 0.0, 0.0])


def test_dpo_center_makes_the_dense_reward_average_zero_over_the_rollout_batch(tmp_path, assets):
    # kl_coef 0: the rewards are the dense DPO term alone; centred, they average 0 over every response token of the
    # batch, and each differs from the plain term by the same offset (logged as dpo_offset).
    plain = make_trainer(assets, tmp_path / "plain", "rto", "rl.kl_coef=0")
    centred = make_trainer(assets, tmp_path / "centred", "rto", "rl.kl_coef=0", "rl.dpo_center=true")
    prompts = plain.context.train_prompts[:5]
    torch.manual_seed(4)
    rollouts = plain.sample(prompts)
    before = torch.cat(plain.score(prompts, rollouts).rewards).double()
    after = torch.cat(centred.score(prompts, rollouts).rewards).double()
    assert abs(float(after.mean())) < 1e-6
    torch.testing.assert_close(before - after, torch.full_like(before, float(before.mean())), atol=1e-6, rtol=0)
    assert centred.dpo_offset == pytest.approx(float(before.mean()), abs=1e-6) and plain.dpo_offset is None


def test_responses_of_one_token_train(tmp_path, assets):
    run_dir = tmp_path / "run"
    assert run_cli(run_dir, assets, "stages=[rto]", "rl.iterations=1", "rl.max_new_tokens=1") == 0
    (record,) = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "rto"]
    assert record["response_length"] == 1.0 and np.isfinite(record["pg_loss"])


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_micro_batch_budget_does_not_change_the_update(tmp_path, assets):
    """The loss of a mini-batch is normalised by the whole mini-batch: cutting it into more micro-batches gives the
    same gradients, so the same weights after training on the same rollouts."""
    trainer = make_trainer(assets, tmp_path, "rto", "rl.ppo_epochs=1", "rl.mini_batch_size=8", "rl.max_grad_norm=null")
    prompts = trainer.context.train_prompts[:8]
    torch.manual_seed(2)
    batch = trainer.gather(trainer.score(prompts, trainer.sample(prompts)))
    small = copy.deepcopy(trainer)
    small.settings = copy.deepcopy(trainer.settings)
    small.settings.micro_batch_tokens = 64  # about one sequence per micro-batch
    for each in (trainer, small):
        each.build_optimizers(total_steps=10)
        # One optimizer step of plain SGD with lr 1: each weight moves by exactly its gradient (Adam would blow
        # float noise on near-zero gradients up into full-size steps).
        each.actor.optimizer = torch.optim.SGD(each.actor.parameters, lr=1.0)
        each.critic_optimization.optimizer = torch.optim.SGD(each.critic_optimization.parameters, lr=1.0)
        each.train(batch, iteration=0)
    for a, b in zip(trainer.policy.parameters(), small.policy.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(trainer.critic.parameters(), small.critic.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    moved = [not torch.equal(a, b) for a, b in zip(trainer.policy.parameters(), trainer.reference.parameters())]
    assert any(moved)


@pytest.mark.parametrize("critic_optimizer", ["separate", "shared"])
def test_policy_pass_then_critic_pass_give_the_joint_loss_gradients(tmp_path, assets, critic_optimizer):
    """The policy's pass (forward and backward) and then the critic's on a micro-batch (one model's activations alive
    at a time) give the gradients of the joint loss (clipped surrogate - entropy bonus + value loss) taken through
    both forwards at once, with the reference ppo_loss."""
    from rto_fast.trainer.packing import pack
    from rto_fast.trainer.scoring import packed_logprobs, packed_values

    trainer = make_trainer(assets, tmp_path, "rto", f"rl.critic_optimizer={critic_optimizer}", "rl.entropy_coef=0.05")
    settings = trainer.settings
    prompts = trainer.context.train_prompts[:6]
    torch.manual_seed(3)
    rollout = trainer.gather(trainer.score(prompts, trainer.sample(prompts)))
    sequences = rollout.sequences()
    chosen = list(range(len(sequences)))
    batch = pack(sequences, chosen)
    vf_coef = 1.0 if critic_optimizer == "separate" else settings.vf_coef
    events = []
    for name, model in (("policy", trainer.policy), ("critic", trainer.critic)):
        model.register_forward_hook(lambda module, args, output, name=name: events.append(("forward", name)))
        first = next(model.parameters())
        first.register_hook(lambda grad, name=name: events.append(("backward", name)))
    inputs = rl_update.stream_inputs(rollout, batch, chosen)
    rl_update.policy_pass(trainer.actor, batch, inputs, settings, trainer.context, share=1.0)
    rl_update.critic_pass(trainer.critic_optimization, batch, inputs, settings, trainer.context, share=1.0,
                          vf_coef=vf_coef)
    assert events == [("forward", "policy"), ("backward", "policy"), ("forward", "critic"), ("backward", "critic")]
    models_ = (trainer.policy, trainer.critic)
    split = [[parameter.grad.clone() for parameter in model.parameters()] for model in models_]
    for model in models_:
        model.zero_grad(set_to_none=True)

    logprobs, entropy = packed_logprobs(trainer.policy, batch, return_entropy=True)
    values = packed_values(trainer.critic, batch)
    stream = [rl_rollout.scatter_to_stream(tensors, batch, chosen)
              for tensors in (rollout.old_logprobs, rollout.advantages, rollout.values, rollout.returns)]
    loss, _ = reference.ppo_loss(logprobs, stream[0], stream[1], batch.response_mask, values=values,
                                 old_values=stream[2], returns=stream[3], clip_eps=settings.clip_eps,
                                 clip_eps_high=settings.clip_eps_high, value_clip=settings.value_clip, vf_coef=vf_coef,
                                 agg=settings.agg, cu_seqlens=batch.cu_seqlens)
    (loss - settings.entropy_coef * rl_update.aggregate(entropy, batch, settings.agg)).backward()
    for model, grads in zip(models_, split):
        assert any(grad.abs().sum() > 0 for grad in grads)
        for parameter, grad in zip(model.parameters(), grads):
            torch.testing.assert_close(grad, parameter.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("critic_optimizer", ["separate", "shared"])
def test_actor_steps_and_frees_its_gradients_before_the_critic_pass(tmp_path, assets, critic_optimizer):
    """A mini-batch runs the policy over all its micro-batches, then the critic. With separate optimizers the actor
    has stepped and its gradients are freed when the critic's forwards run (the peak holds one model's gradients);
    with one shared optimizer both step together after the critic's pass."""
    trainer = make_trainer(assets, tmp_path, "rto", f"rl.critic_optimizer={critic_optimizer}",
                           "rl.micro_batch_tokens=128", "rl.ppo_epochs=1")
    prompts = trainer.context.train_prompts[:8]
    torch.manual_seed(3)
    rollout = trainer.gather(trainer.score(prompts, trainer.sample(prompts)))
    events = []
    optimizer = trainer.actor.optimizer
    trainer.policy.register_forward_hook(lambda *args: events.append("policy"))
    trainer.critic.register_forward_hook(lambda *args: events.append(
        ("critic", optimizer.state_dict()["state"] != {},
         all(parameter.grad is None for parameter in trainer.actor.parameters))))
    stats = trainer.train(rollout, iteration=1)
    mini_batches = stats["optimizer_steps"]
    assert mini_batches == 2
    critic_events = [event for event in events if event != "policy"]
    per_mini_batch = len(events) // mini_batches
    assert per_mini_batch > 2  # several micro-batches per mini-batch
    for start in range(0, len(events), per_mini_batch):  # all policy passes, then all critic passes
        block = events[start:start + per_mini_batch]
        assert block == ["policy"] * (per_mini_batch // 2) + [e for e in block if e != "policy"]
    first_critic_stepped, first_actor_freed = critic_events[0][1:]
    if critic_optimizer == "separate":
        assert first_critic_stepped and all(event[1:] == (True, True) for event in critic_events)
    else:
        assert not first_critic_stepped and not first_actor_freed
    assert {"vf_loss", "vf_clipfrac", "pg_loss", "entropy"} <= set(stats)


def test_extra_scoring_passes_for_partitioned_frozen_models_change_nothing(tmp_path, assets, monkeypatch):
    """Under ZeRO-3 the frozen models' forwards are collective, so every rank runs as many scoring micro-batches
    (and judge micro-batches in the in-training eval) as the busiest one: the extra passes repeat a batch and are
    dropped. Faked here in one process: two extra passes leave every scored field and eval mean unchanged."""
    trainer = make_trainer(assets, tmp_path, "rto", "rl.reward_model=true", "rl.micro_batch_tokens=128")
    prompts = trainer.context.train_prompts[:6]
    torch.manual_seed(1)
    rollouts = trainer.sample(prompts)
    plain = trainer.score(prompts, rollouts)
    plain_eval = rl.evaluate_policy(trainer, trainer.context.eval_prompts[:5])
    forwards = []
    trainer.reference.register_forward_hook(lambda *args: forwards.append(1))
    monkeypatch.setattr(distributed, "zero_stage", lambda dist: 3)
    monkeypatch.setattr(distributed.Distributed, "max", lambda self, value: value + 2)
    padded = trainer.score(prompts, rollouts)
    batches = len(build_micro_batches([response_sequence(r.prompt_ids, r.response_ids) for r in rollouts], 128))
    assert batches > 1 and len(forwards) == batches + 2
    for name in ("old_logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"):
        for a, b in zip(getattr(plain, name), getattr(padded, name)):
            assert torch.equal(a, b), name
    assert torch.equal(plain.scores, padded.scores) and torch.equal(plain.dpo_rewards, padded.dpo_rewards)
    assert rl.evaluate_policy(trainer, trainer.context.eval_prompts[:5]) == plain_eval


# ------------------------------------------------------------------------------------------------ offloaded models

def test_offload_is_a_no_op_on_a_cpu_device(tmp_path, assets):
    trainer = make_trainer(assets, tmp_path, "rto", "rl.offload_frozen_models=true")
    assert trainer.residents == {}


@pytest.fixture
def offload_on_cpu(monkeypatch):
    monkeypatch.setattr(offload, "OFFLOAD_DEVICE_TYPES", ("cuda", "cpu"))


def test_rl_with_offloaded_frozen_models_trains_bitwise_the_same(tmp_path, assets, offload_on_cpu, capsys):
    overrides = ["stages=[rto]", "rl.iterations=2", "rl.reward_model=true", "rl.eval_every=1", "rl.eval_prompts=4",
                 "runtime.checkpoint_every=0"]
    results = {}
    for name, switch in (("plain", "false"), ("offloaded", "true")):
        run_dir = tmp_path / name
        assert run_cli(run_dir, assets, *overrides, f"rl.offload_frozen_models={switch}") == 0
        results[name] = [{key: value for key, value in record.items() if key not in TIME_KEYS}
                         for record in read_metrics(run_dir / "metrics.jsonl") if record["stage"] == "rto"]
    assert results["plain"] == results["offloaded"]
    assert "3 frozen model(s)" in capsys.readouterr().err  # reference, DPO and reward model were offloaded
    assert any("eval_dpo_reward" in record for record in results["plain"])


def test_frozen_models_are_on_the_device_only_while_they_score(tmp_path, assets, offload_on_cpu):
    """Forward hooks record whether each frozen model ran on its host tensors (offloaded) or on a device copy."""
    trainer = make_trainer(assets, tmp_path, "rto", "rl.offload_frozen_models=true", "rl.reward_model=true")
    frozen = {"reference": trainer.reference, "dpo": trainer.dpo_model, "reward": trainer.reward_model}
    assert set(trainer.residents) == {id(model) for model in frozen.values()}
    host = {name: storage_pointers(model) for name, model in frozen.items()}
    seen = []
    for name, model in frozen.items():
        model.register_forward_hook(lambda module, args, output, name=name: seen.append(
            (name, storage_pointers(module) == host[name])))

    def is_offloaded():
        return {name: storage_pointers(model) == host[name] for name, model in frozen.items()}

    prompts = trainer.context.train_prompts[:4]
    torch.manual_seed(1)
    rollouts = trainer.sample(prompts)
    assert all(is_offloaded().values())
    rollout = trainer.gather(trainer.score(prompts, rollouts))
    assert {name for name, _ in seen} == set(frozen) and not any(on_host for _, on_host in seen)
    assert all(is_offloaded().values())
    training_forwards = []
    trainer.policy.register_forward_hook(lambda *args: training_forwards.append(is_offloaded()))
    trainer.train(rollout, iteration=1)
    assert training_forwards and all(all(state.values()) for state in training_forwards)
    seen.clear()
    rl.evaluate_policy(trainer, trainer.context.eval_prompts[:3])
    assert seen and not any(on_host for _, on_host in seen)


def test_offload_under_zero3_names_the_setting_to_use(tmp_path, assets, offload_on_cpu, monkeypatch):
    monkeypatch.setattr(distributed, "zero_stage", lambda dist: 3)
    with pytest.raises(ValueError, match="offload_param"):
        make_trainer(assets, tmp_path, "rto", "rl.offload_frozen_models=true")


# ------------------------------------------------------------------------------------------------ resume

@pytest.mark.parametrize("precision", [[], ["model.dtype=bf16"],
                                       ["model.dtype=bf16", "model.bf16_optimizer=stochastic_rounding"]])
def test_resume_in_the_middle_matches_an_uninterrupted_run(tmp_path, assets, precision):
    """bf16: the policy and critic train through float32 master weights (the default model.bf16_optimizer), which the
    checkpoint carries (resuming from the saved bf16 weights alone would end elsewhere), or with stochastic rounding,
    whose generator state it carries."""
    overrides = ["stages=[rto]", "rl.iterations=4", "runtime.checkpoint_every=2", "runtime.keep_last=5",
                 "rl.adaptive_kl=true", "rl.kl_target=0.01", "rl.kl_horizon=100", *precision]
    full = tmp_path / "full"
    assert run_cli(full, assets, *overrides) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    # Back to the state right after the iteration-2 checkpoint: no final models, no later checkpoint or records.
    shutil.rmtree(resumed / "rto" / "model")
    shutil.rmtree(resumed / "rto" / "critic")
    shutil.rmtree(resumed / "rto" / "checkpoints" / ckpt.checkpoint_name(4))
    assert run_cli(resumed, assets, *overrides) == 0
    for part in ("model", "critic"):
        a = load_file(str(full / "rto" / part / "model.safetensors"))
        b = load_file(str(resumed / "rto" / part / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    records = {}
    for name, run_dir in (("full", full), ("resumed", resumed)):
        records[name] = [{k: v for k, v in r.items() if k not in TIME_KEYS}
                         for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "rto"]
    assert [r["step"] for r in records["resumed"]] == [1, 2, 3, 4]
    assert records["full"] == records["resumed"]
    kl_coefs = [r["kl_coef"] for r in records["full"]]
    assert len(set(kl_coefs)) > 1  # the adaptive controller moved it, and the resumed run continued from there
    state = json.loads((full / "rto" / "checkpoints" / ckpt.checkpoint_name(2) / ckpt.STATE_FILE).read_text())
    assert state["kl_coef"] == pytest.approx(kl_coefs[2])


def test_sigterm_saves_a_checkpoint_and_the_rerun_ends_like_an_uninterrupted_run(tmp_path, assets, monkeypatch):
    """SIGTERM during iteration 2 (no periodic checkpoints): the iteration finishes, a checkpoint of it is saved, the
    run exits with 128 + 15; the same command resumes from it and ends bitwise where an uninterrupted run ends."""
    overrides = ["stages=[rto]", "rl.iterations=4", "runtime.checkpoint_every=0"]
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    full = tmp_path / "full"
    assert run_cli(full, assets, *overrides) == 0
    stopped = tmp_path / "stopped"
    original = rl.RLStage.step
    calls = []

    def signalled_iteration(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # mid-iteration: the handler only records it
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(rl.RLStage, "step", signalled_iteration)
    assert run_cli(stopped, assets, *overrides) == 128 + signal.SIGTERM
    checkpoints = stopped / "rto" / "checkpoints"
    assert [path.name for path in checkpoints.iterdir()] == [ckpt.checkpoint_name(2)]
    assert not (stopped / "rto" / "model").exists()
    monkeypatch.setattr(rl.RLStage, "step", original)
    assert run_cli(stopped, assets, *overrides) == 0
    for part in ("model", "critic"):
        a = load_file(str(full / "rto" / part / "model.safetensors"))
        b = load_file(str(stopped / "rto" / part / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    records = [[{k: v for k, v in r.items() if k not in TIME_KEYS} for r in read_metrics(run_dir / "metrics.jsonl")
                if r["stage"] == "rto"] for run_dir in (full, stopped)]
    assert records[0] == records[1] and [r["step"] for r in records[1]] == [1, 2, 3, 4]
    # Outside the run the signals do what they did before: the handlers were restored.
    assert {number: signal.getsignal(number) for number in handlers} == handlers


def test_a_nonfinite_iteration_leaves_policy_and_critic_as_they_were(tmp_path, assets, monkeypatch):
    """Every loss of iteration 2 is NaN: each of its optimizer steps (actor and critic, separate optimizers) is
    skipped and logged, the policy and the critic leave it unchanged, and iteration 3 trains again."""
    original_backward, original_iteration = Optimization.backward, rl.RLStage.step
    current = {"iteration": 0}
    snapshots = []

    def backward(optimization, loss, boundary=True):
        original_backward(optimization, loss * float("nan") if current["iteration"] == 2 else loss, boundary)

    def iteration(trainer, *args, **kwargs):
        current["iteration"] += 1
        record = original_iteration(trainer, *args, **kwargs)
        snapshots.append([p.detach().clone() for p in (*trainer.policy.parameters(), *trainer.critic.parameters())])
        return record

    monkeypatch.setattr(Optimization, "backward", backward)
    monkeypatch.setattr(rl.RLStage, "step", iteration)
    assert run_cli(tmp_path / "run", assets, "stages=[rto]", "rl.iterations=3", "runtime.checkpoint_every=0") == 0
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["stage"] == "rto"]
    steps = records[1]["optimizer_steps"]
    assert [r.get("updates_skipped", 0) for r in records] == [0, 2 * steps, 0]
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))
    assert all(bool(torch.isfinite(p).all()) for p in snapshots[2])


# ------------------------------------------------------------------------------------------------ errors and units

@pytest.mark.parametrize("overrides, message", [
    (["stages=[rto]", "model.dpo_path=null"], "needs the DPO model"),
    (["stages=[ppo]", "model.reward_path=null"], "uses a reward model's score"),
    (["stages=[rto,dpo]"], "pipeline order"),
    (["stages=[rto]", "rl.mini_batch_size=16"], "rl.mini_batch_size=16 is larger than the rollout batch"),
    (["stages=[rto]", "rl.micro_batch_tokens=20"], "rl.micro_batch_tokens=20"),
    (["stages=[ppo]", "rl.reward_model=false"], "rl.reward_model: false"),
    (["stages=[rto]", "rl.gamma=1.5"], "rl.gamma"),
    (["stages=[rto,ppo]", "rl.true_reward=dense"], "rl.true_reward: dense replaces the reward of stage rto"),
    (["stages=[ppo]", "rl.true_reward=sparse", "rl.reward_model=true"], "rl.true_reward: sparse puts r*"),
    (["stages=[rto]", "rl.true_reward=dense", "rl.prompts=org/prompts"], "needs a bundled task"),
])
def test_bad_settings_fail_early(tmp_path, assets, capsys, overrides, message):
    paths = [path for path in assets["paths"] if path.split("=")[0] not in {o.split("=")[0] for o in overrides}]
    code = main([*RL_BASE, *paths, f"runtime.output_dir={tmp_path / 'run'}", *overrides])
    error = capsys.readouterr().err
    assert code == 2 and message in error and len(error.strip().splitlines()) == 1, error


def test_adaptive_kl_controller():
    controller = rl.AdaptiveKLController(0.1, target=6.0, horizon=100)
    controller.update(kl_per_response=12.0, num_responses=10)   # error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    controller = rl.AdaptiveKLController(0.1, target=6.0, horizon=100)
    controller.update(kl_per_response=5.4, num_responses=10)    # error -0.1
    assert controller.value == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))


def test_whiten_and_explained_variance():
    generator = torch.Generator().manual_seed(3)
    pieces = [torch.randn(n, generator=generator) * 3 + 2 for n in (1, 5, 9)]
    whitened = torch.cat(rl.whiten(pieces)).double()
    assert abs(float(whitened.mean())) < 1e-6 and float(whitened.std()) == pytest.approx(1.0, abs=1e-6)
    returns = torch.randn(50, generator=generator)
    assert rl.explained_variance(returns, returns) == pytest.approx(1.0)
    assert rl.explained_variance(torch.zeros(50), returns) == pytest.approx(0.0, abs=1e-9)


def test_profile_step_records_the_iteration_phases(tmp_path, assets):
    """runtime.profile_step=2 profiles the second RL iteration: generation (prefill, sampling, decode forwards),
    scoring (each model's log-probs or values, rewards + GAE) and training (forward, loss, backward, optimizer) each appear."""
    run_dir = tmp_path / "run"
    assert run_cli(run_dir, assets, "stages=[rto]", "rl.iterations=2", "runtime.profile_step=2") == 0
    folder = run_dir / "rto" / "profile"
    assert sorted(path.name for path in folder.iterdir()) == ["step_2.md", "step_2.trace.json"]
    summary = (folder / "step_2.md").read_text()
    for name in ("generate", "prefill", "sample", "decode_forward", "score", "policy_logprobs", "reference_logprobs",
                 "dpo_logprobs", "critic_values", "rewards_gae", "train", "policy_forward", "policy_loss",
                 "policy_backward", "critic_forward", "critic_loss", "critic_backward", "optimizer_step"):
        assert f"| {name} | " in summary, (name, summary[:3000])
    assert json.loads((folder / "step_2.trace.json").read_text())["traceEvents"]
