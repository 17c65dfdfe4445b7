"""A whole RL iteration (generate, score, train) through rto_fast's PPO stage and through TRL's PPOTrainer, side by side.

    python bench/bench_rl_step.py --device cpu                 # tiny Llama, a few minutes on 2 cores
    python bench/bench_rl_step.py --device cuda --model pythia-410m --response-length 256 --rollout-batch 64

The peer is `trl.experimental.ppo.PPOTrainer` of TRL 1.12.0, the last TRL release that ships a PPO trainer
(`pip install trl==1.12.0`; `--trl-path DIR` puts a separately installed copy first on the TRL side's sys.path, so
the environment's own TRL can stay newer). Both sides get the same workload:
- the same architecture and initial weights, built from a config (nothing downloaded) and saved once: a causal LM
  (policy = reference) and a sequence-classification model with one label (reward model = critic init; rto_fast
  reads the same backbone and `score` head as a ValueHeadModel);
- the same prompts (the synthetic task's), rollout batch, response length (eos banned on our side, no stop token on
  TRL's, so every response has exactly --response-length tokens), PPO epochs, one optimizer step per epoch over the
  whole rollout batch (TRL: per_device_train_batch_size x gradient_accumulation_steps = rollout batch,
  num_mini_batches = 1), micro-batches of --micro-batch responses (ours: the same number of tokens), one shared
  optimizer over policy and critic, the same learning rate, KL coefficient and sampling temperature.
Each side runs in its own subprocess (so its peak RSS is its own); the first iteration is a warm-up and is not timed.

Per iteration: wall time split into generate / score / train, tokens per second ((prompt + response tokens of the
rollout batch) / iteration time), and peak memory (CUDA max allocated, or peak RSS on CPU); then the ratios
ours / TRL, for the whole iteration and for score + train only (generation excluded). TRL's loop is one function,
so its phases are timed by wrapping what it calls: `batch_generation` is generate; from its return to the first
forward with autograd on is score (reference, reward and value forwards, rewards, GAE, whitening); the rest of the
iteration, up to the trainer's step-end callback, is train.

Writes bench/results/rl_step_<device>.md (hardware, versions, command, table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# Published Pythia shapes (GPT-NeoX): hidden, layers, heads; vocabulary 50304.
PYTHIA = {"pythia-410m": (1024, 24, 16), "pythia-1.4b": (2048, 24, 16)}
PYTHIA_VOCAB = 50304
# --generation: rto_fast's config overrides for each way of sampling.
GENERATION = {"rto_fast": ["rl.generation_engine=rto_fast"],
              "transformers": ["rl.generation_engine=transformers", "rl.generation_cache=dynamic"],
              "transformers-static": ["rl.generation_engine=transformers", "rl.generation_cache=static"]}


# ------------------------------------------------------------------------------------------------ shared setup

def sized_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens, built offline: the shipped tokenizer's 256 byte
    tokens, merges of printable ASCII pairs and then triples (in a fixed order) up to the size, and its <pad>, <bos>,
    <eos> last. A benchmark model needs a real vocabulary size (Pythia's is 50304): the output layer, the logits and
    everything of size (tokens, vocabulary) scale with it, and every id it samples must decode."""
    from transformers import PreTrainedTokenizerFast

    from rto_fast.trainer.models import CHAT_TEMPLATE, SPECIAL_TOKENS, _byte_to_char, byte_level_tokenizer

    chars = _byte_to_char()
    merges_needed = vocab_size - len(chars) - len(SPECIAL_TOKENS)
    if merges_needed < 0:
        raise SystemExit(f"--vocab must be at least {len(chars) + len(SPECIAL_TOKENS)}")
    printable = [chars[byte] for byte in range(32, 127)]
    pairs = [(a, b) for a in printable for b in printable]
    triples = [(a + b, c) for a, b in pairs for c in printable]
    tokenizer = byte_level_tokenizer((pairs + triples)[:merges_needed])
    assert tokenizer.get_vocab_size() == vocab_size
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=4096, clean_up_tokenization_spaces=False,
                                   chat_template=CHAT_TEMPLATE)


def model_config(model: str, tokenizer):
    """The transformers config of a benchmark model: the tiny Llama, or a Pythia shape (GPT-NeoX), sized to the
    tokenizer."""
    if model == "tiny":
        from rto_fast.trainer.models import tiny_model_config

        return tiny_model_config(vocab_size=len(tokenizer))
    from transformers import GPTNeoXConfig

    hidden, layers, heads = PYTHIA[model]
    return GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)


def build_models(folder: Path, model: str, seed: int, vocab_size: int | None) -> dict:
    """Save the initial causal LM and reward model (both layouts) under `folder`, each with the tokenizer (the
    shipped one, or one of `vocab_size` tokens); returns the paths."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rto_fast.trainer.models import ValueHeadModel, build_tokenizer

    tokenizer = build_tokenizer() if vocab_size is None else sized_tokenizer(vocab_size)
    config = model_config(model, tokenizer)
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_config(config)
    config.num_labels = 1
    reward = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        reward.score.weight.normal_(std=0.5)
    paths = {"policy": folder / "policy", "reward_hf": folder / "reward_hf", "reward_ours": folder / "reward_ours"}
    policy.save_pretrained(paths["policy"])
    tokenizer.save_pretrained(paths["policy"])
    reward.save_pretrained(paths["reward_hf"])
    tokenizer.save_pretrained(paths["reward_hf"])
    backbone = getattr(reward, reward.base_model_prefix)
    ours = ValueHeadModel(backbone)
    with torch.no_grad():
        ours.value_head.weight.copy_(reward.score.weight)
        ours.value_head.bias.zero_()
    ours.save_pretrained(paths["reward_ours"])
    tokenizer.save_pretrained(paths["reward_ours"])
    return {key: str(value) for key, value in paths.items()}


def write_prompts(path: Path, count: int, seed: int) -> None:
    from rto_fast.tasks.letters import make_prompt

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(count):
            handle.write(json.dumps({"prompt": make_prompt(rng)}) + "\n")


def run_peak_mb(records: list[dict], device: str) -> float:
    """Our side's peak: on CUDA the largest step peak the trainer logged (it resets the allocator's counter every
    step), elsewhere the process's peak RSS."""
    peaks = [record["peak_memory_mb"] for record in records if "peak_memory_mb" in record]
    return max(peaks) if device == "cuda" and peaks else peak_memory_mb(device)


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------------ rto_fast side

def run_ours(spec: dict) -> dict:
    from rto_fast.trainer.run_log import read_metrics
    from rto_fast.trainer.cli import main

    output = Path(spec["workdir"]) / "ours"
    overrides = [
        "stages=[ppo]", f"model.sft_path={spec['paths']['policy']}", f"model.reward_path={spec['paths']['reward_ours']}",
        f"rl.prompts={spec['prompts']}", "data.test_split=null", f"data.max_prompt_length={spec['max_prompt']}",
        f"rl.max_new_tokens={spec['response_length']}", "rl.ban_eos=true", f"rl.iterations={spec['iterations']}",
        f"rl.rollout_batch_size={spec['rollout_batch']}", f"rl.mini_batch_size={spec['rollout_batch']}",
        f"rl.ppo_epochs={spec['ppo_epochs']}", f"rl.generation_batch_size={spec['rollout_batch']}",
        f"rl.micro_batch_tokens={spec['micro_batch'] * (spec['max_prompt'] + spec['response_length'])}",
        "rl.critic_optimizer=shared", "rl.critic_init=rm", f"rl.actor_lr={spec['lr']}", "rl.lr_schedule=linear",
        "rl.warmup_ratio=0", "rl.min_lr_ratio=0", f"rl.kl_coef={spec['kl_coef']}", "rl.eval_prompts=0",
        "rl.temperature=1.0", *GENERATION[spec["generation"]],
        f"runtime.device={spec['device']}", f"runtime.output_dir={output}",
        "runtime.progress_bar=false", "runtime.checkpoint_every=0", "runtime.resume=never",
        f"runtime.dtype={'bf16' if spec['device'] == 'cuda' else 'fp32'}",
        f"model.dtype={'bf16' if spec['device'] == 'cuda' else 'fp32'}", f"model.tokenizer={spec['paths']['policy']}",
        f"model.fused_output_layer={str(spec['fused_output_layer']).lower()}",
        f"model.gradient_checkpointing={str(spec['gradient_checkpointing']).lower()}",
        f"rl.offload_frozen_models={str(spec.get('offload_frozen', False)).lower()}",
        f"model.bf16_optimizer={spec.get('bf16_optimizer', 'pure')}",
        f"runtime.profile_step={spec['profile']}", "runtime.profile_trace=false"]
    if spec.get("lora"):
        overrides += [f"model.lora_rank={spec['lora']}", f"model.lora_alpha={2 * spec['lora']}"]
    if main(overrides) != 0:
        raise SystemExit("the rto_fast run failed")
    from rto_fast.trainer.attention import chosen_backends

    records = [record for record in read_metrics(output / "metrics.jsonl") if record.get("stage") == "ppo"]
    iterations = [{"generate": r["time_generate_s"], "score": r["time_score_s"], "train": r["time_train_s"],
                   "total": r["time_s"], "tokens": r["tokens"]} for r in records]
    mismatch = [r["logprob_mismatch"] for r in records if "logprob_mismatch" in r]
    result = {"iterations": iterations, "peak_mb": run_peak_mb(records, spec["device"]),
              "attention": chosen_backends().get(spec["device"], "?"),
              "logprob_mismatch": max(mismatch) if mismatch else None}
    if spec["profile"]:
        result["profile"] = (output / "ppo" / "profile" / f"step_{spec['profile']}.md").read_text()
    return result


# ------------------------------------------------------------------------------------------------ TRL side

def run_trl(spec: dict) -> dict:
    if spec.get("trl_path"):
        sys.path.insert(0, spec["trl_path"])
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        from trl.experimental.ppo import ppo_trainer as trl_ppo
    except ImportError:
        raise SystemExit(f"trl {trl.__version__} has no trl.experimental.ppo: pip install trl==1.12.0 (or pass "
                         "--trl-path to a folder where it is installed)") from None
    from rto_fast.trainer.models import build_tokenizer

    tokenizer = build_tokenizer(spec["paths"]["policy"])
    tokenizer.padding_side = "left"
    prompts = [json.loads(line)["prompt"] for line in open(spec["prompts"], encoding="utf-8")]
    ids = [[tokenizer.bos_token_id, *tokenizer(prompt)["input_ids"]] for prompt in prompts]  # as our data layer
    # A plain list of rows, not a datasets.Dataset: TRL only iterates it through a DataLoader, and datasets'
    # fingerprinting fails to pickle pyarrow's MonthDayNano type under Python 3.12 (datasets 5.2, pyarrow 24-26).
    dataset = [{"input_ids": row} for row in ids]
    dtype = torch.bfloat16 if spec["device"] == "cuda" else torch.float32
    # --bf16-optimizer other than pure: TRL's way of keeping small updates, float32 weights (bf16 autocast from
    # bf16=True) for the two trained models; the frozen ones stay bf16.
    trained_dtype = torch.float32 if spec.get("bf16_optimizer", "pure") != "pure" else dtype
    policy = AutoModelForCausalLM.from_pretrained(spec["paths"]["policy"], dtype=trained_dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["paths"]["reward_hf"], dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(spec["paths"]["reward_hf"], dtype=trained_dtype)
    peft_config = None
    if spec.get("lora"):
        # TRL's own LoRA setup: the policy wrapped by get_peft_model, no reference model (the policy with its adapter
        # disabled). TRL leaves the value model whole; it gets the same adapters (backbone) + trained head as ours.
        from peft import LoraConfig, inject_adapter_in_model

        def lora_config():
            return LoraConfig(r=spec["lora"], lora_alpha=2 * spec["lora"], lora_dropout=0.0, bias="none",
                              target_modules="all-linear")

        peft_config = lora_config()
        inject_adapter_in_model(lora_config(), value.base_model)
        for name, parameter in value.named_parameters():
            parameter.requires_grad_(".lora_" in name or not name.startswith(value.base_model_prefix + "."))
        ref = None
    else:
        ref = AutoModelForCausalLM.from_pretrained(spec["paths"]["policy"], dtype=dtype)
    if spec["gradient_checkpointing"]:  # TRL's PPOTrainer never enables it itself (its args flag is not read)
        from rto_fast.trainer.models import enable_gradient_checkpointing

        for model in (policy, value):
            enable_gradient_checkpointing(model)
            if spec.get("lora"):  # frozen embeddings: the checkpointed layers' inputs must carry a gradient
                model.enable_input_require_grads()
    micro = spec["micro_batch"]
    args = PPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=spec["rollout_batch"] // micro, num_mini_batches=1,
        num_ppo_epochs=spec["ppo_epochs"], local_rollout_forward_batch_size=spec["rollout_batch"],
        response_length=spec["response_length"], stop_token=None, stop_token_id=None, temperature=1.0,
        learning_rate=spec["lr"], kl_coef=spec["kl_coef"], total_episodes=spec["iterations"] * spec["rollout_batch"],
        num_sample_generations=0, save_strategy="no", report_to=[], logging_steps=1, seed=spec["seed"],
        use_cpu=spec["device"] == "cpu", bf16=spec["device"] == "cuda", dataloader_drop_last=True,
        missing_eos_penalty=None)

    marks: dict = {"iteration_start": None, "generated": None, "first_train": None}
    iterations = []

    original_generation = trl_ppo.batch_generation
    original_forward = trl_ppo.forward

    def timed_generation(*positional, **keywords):
        from rto_fast.trainer.profiling import phase

        marks["generate_start"] = time.perf_counter()
        with phase("generate"):
            result = original_generation(*positional, **keywords)
        if spec["device"] == "cuda":
            torch.cuda.synchronize()
        marks["generated"] = time.perf_counter()
        marks["first_train"] = None
        return result

    def timed_forward(model, *positional, **keywords):
        if torch.is_grad_enabled() and marks["first_train"] is None and marks["generated"] is not None:
            if spec["device"] == "cuda":
                torch.cuda.synchronize()
            marks["first_train"] = time.perf_counter()
        return original_forward(model, *positional, **keywords)

    trl_ppo.batch_generation = timed_generation
    trl_ppo.forward = timed_forward

    profiler = {}

    def start_profile_if_wanted(iteration: int) -> None:  # iteration: 1-based, the one about to run
        if spec["profile"] == iteration:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if spec["device"] == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler["running"] = torch.profiler.profile(activities=activities)
            profiler["running"].start()

    class StepTimer(TrainerCallback):
        def on_step_end(self, arguments, state, control, **kwargs):
            if spec["device"] == "cuda":
                torch.cuda.synchronize()
            if "running" in profiler:
                from rto_fast.trainer.profiling import summary_lines

                running = profiler.pop("running")
                running.stop()
                profiler["summary"] = "\n".join(summary_lines(running, spec["profile"], torch.device(spec["device"])))
            now = time.perf_counter()
            start = marks["iteration_start"]
            tokens = spec["rollout_batch"] * spec["response_length"] + marks["prompt_tokens"]
            iterations.append({"generate": marks["generated"] - marks["generate_start"],
                               "score": marks["first_train"] - marks["generated"],
                               "train": now - marks["first_train"], "total": now - start, "tokens": tokens})
            marks["prompt_tokens"] = next_prompt_tokens()
            start_profile_if_wanted(len(iterations) + 1)
            marks["iteration_start"] = time.perf_counter()  # the profiler's start is not the next iteration's time

    # The dataloader draws rollout batches in order of a shuffled permutation we cannot see; the prompt tokens of a
    # batch are counted as the mean prompt length times the batch (prompts differ by a few tokens only).
    mean_prompt = sum(len(x) for x in ids) / len(ids)

    def next_prompt_tokens():
        return int(round(mean_prompt * spec["rollout_batch"]))

    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=dataset, value_model=value, callbacks=[StepTimer()], peft_config=peft_config)
    marks["prompt_tokens"] = next_prompt_tokens()
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start_profile_if_wanted(1)
    marks["iteration_start"] = time.perf_counter()
    trainer.train()
    result = {"iterations": iterations, "peak_mb": peak_memory_mb(spec["device"]), "trl_version": trl.__version__}
    if "summary" in profiler:
        result["profile"] = profiler["summary"]
    return result


# ------------------------------------------------------------------------------------------------ driver

def run_side(side: str, spec: dict, script: str = __file__) -> dict:
    """Run one side of `script` (`--side ours|trl`) in a fresh subprocess (OMP_NUM_THREADS from --threads) and read
    back its JSON result."""
    result_path = Path(spec["workdir"]) / f"{side}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, script, "--side", side, "--spec", json.dumps(spec), "--result", str(result_path)]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-6000:])
        raise SystemExit(f"the {side} side failed (exit {completed.returncode})")
    result = json.loads(result_path.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def summarize(result: dict, profiled: int = 0) -> dict:
    # The first iteration is a warm-up; a profiled one runs slower than the others: neither is timed.
    timed = [item for number, item in enumerate(result["iterations"], 1) if number not in (1, profiled)]
    timed = timed or result["iterations"]
    mean = {key: sum(item[key] for item in timed) / len(timed) for key in ("generate", "score", "train", "total",
                                                                           "tokens")}
    mean["tokens_per_s"] = mean["tokens"] / mean["total"]
    mean["score_train_tokens_per_s"] = mean["tokens"] / (mean["score"] + mean["train"])
    mean["peak_mb"] = result["peak_mb"]
    mean["timed_iterations"] = len(timed)
    return mean


def lora_note(rank: int) -> str:
    if not rank:
        return ""
    return (f"; LoRA rank {rank} (alpha {2 * rank}, every linear layer but the output layer) on policy and critic "
            "(heads trained whole) on both sides, each side's reference the policy with its adapters off")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=("tiny", *PYTHIA), default=None,
                        help="default: tiny on cpu, pythia-410m on cuda")
    parser.add_argument("--rollout-batch", type=int, default=None, help="default: 64 (cpu), 128 (cuda)")
    parser.add_argument("--response-length", type=int, default=None, help="default: 64 (cpu), 256 (cuda)")
    parser.add_argument("--micro-batch", type=int, default=16, help="responses per training micro-batch")
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=4, help="the first one is a warm-up")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per side on CPU")
    parser.add_argument("--generation", choices=tuple(GENERATION), default="rto_fast",
                        help="rto_fast's generation engine: its own decode loop, or model.generate with the dynamic "
                             "or the static (compiled on CUDA) KV cache. TRL always runs model.generate with the "
                             "dynamic cache")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary size (a byte-level BPE tokenizer of that size is built); default: the "
                             "shipped tokenizer's 259 for tiny, Pythia's 50304 for the Pythia shapes")
    parser.add_argument("--fused-output-layer", action="store_true",
                        help="rto_fast computes log-probs from the output layer's input (model.fused_output_layer)")
    parser.add_argument("--offload-frozen", action="store_true",
                        help="rto_fast keeps its frozen models (reference, reward model) in host memory outside "
                             "their scoring passes (rl.offload_frozen_models; TRL has no such option, so the memory "
                             "ratio then compares different setups)")
    parser.add_argument("--bf16-optimizer", choices=("pure", "master_weights", "stochastic_rounding"), default="pure",
                        help="on cuda, how the trained bf16 models are updated: pure (both sides: bf16 weights and "
                             "AdamW states, round-to-nearest; TRL's setup when handed a bf16 model), master_weights "
                             "(ours: float32 masters and states) or stochastic_rounding (ours: bf16 weights and "
                             "states, 8 bytes per parameter); with either of those TRL trains float32 weights under "
                             "bf16 autocast, its way of keeping AdamW's small updates (16 bytes per parameter)")
    parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                        help="LoRA adapters of this rank (alpha 2 x rank, every linear layer but the output layer) "
                             "on both sides' trained models: ours model.lora_rank, TRL its peft_config for the "
                             "policy (its reference is then the policy with the adapter off, as ours) and the same "
                             "adapters put into its value model's backbone; writes rl_step_<device>_lora.md")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="activation checkpointing in the trained models, on both sides")
    parser.add_argument("--trl-path", default=None, help="folder with trl 1.12.0 installed (pip install --target)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="record iteration N (1 is the warm-up) of both sides with torch.profiler and append "
                             "each side's phases and top operators / kernels to the report (the profiled iteration "
                             "runs slower: profile one that is not timed, or read its times with that in mind)")
    parser.add_argument("--output", default=None)
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.side:  # a child process: run one side and write its result
        spec = json.loads(args.spec)
        result = run_ours(spec) if args.side == "ours" else run_trl(spec)
        Path(args.result).write_text(json.dumps(result))
        return 0

    gpu = args.device == "cuda"
    model = args.model or ("pythia-410m" if gpu else "tiny")
    with tempfile.TemporaryDirectory(prefix="bench_rl_step_") as workdir:
        workdir = Path(workdir)
        spec = {"device": args.device, "model": model, "seed": 0, "workdir": str(workdir),
                "rollout_batch": args.rollout_batch or (128 if gpu else 64),
                "response_length": args.response_length or (256 if gpu else 64), "micro_batch": args.micro_batch,
                "ppo_epochs": args.ppo_epochs, "iterations": args.iterations, "lr": 1e-5, "kl_coef": 0.05,
                "max_prompt": 64, "threads": args.threads, "trl_path": args.trl_path,
                "generation": args.generation, "fused_output_layer": args.fused_output_layer,
                "gradient_checkpointing": args.gradient_checkpointing, "profile": args.profile,
                "offload_frozen": args.offload_frozen, "bf16_optimizer": args.bf16_optimizer if gpu else "pure",
                "lora": args.lora,
                "vocab": args.vocab or (None if model == "tiny" else PYTHIA_VOCAB)}
        if spec["rollout_batch"] % spec["micro_batch"]:
            raise SystemExit("--rollout-batch must be a multiple of --micro-batch")
        spec["paths"] = build_models(workdir, model, spec["seed"], spec["vocab"])
        spec["prompts"] = str(workdir / "prompts.jsonl")
        write_prompts(Path(spec["prompts"]), spec["rollout_batch"] * (args.iterations + 1), spec["seed"])
        results = {}
        for side in ("ours", "trl"):
            results[side] = run_side(side, spec)
            # Printed now: kept even if the other side fails.
            print(side, json.dumps(summarize(results[side], args.profile)), flush=True)

    ours, peer = summarize(results["ours"], args.profile), summarize(results["trl"], args.profile)
    import torch
    import transformers

    from _env import hardware, write_report

    from rto_fast.trainer.models import build_tokenizer

    vocab_size = spec["vocab"] or len(build_tokenizer())

    precision = ""
    if gpu:
        precision = ("; trained models: pure bf16 weights and AdamW states on both sides" if spec["bf16_optimizer"] ==
                     "pure" else f"; trained models: rto_fast bf16 weights with model.bf16_optimizer="
                     f"{spec['bf16_optimizer']}, TRL float32 weights under bf16 autocast")
    command = "python bench/bench_rl_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# A whole RL iteration: rto_fast vs TRL {results['trl'].get('trl_version', '?')} PPOTrainer "
             f"({args.device})", "",
             f"Command: `{command.strip()}`  ",
             f"Hardware: {hardware(args.device)}; torch {torch.__version__}, transformers {transformers.__version__}, "
             f"Python {platform.python_version()}" + (f", {args.threads} intra-op thread(s) per side" if not gpu
                                                       else ""), "",
             f"Model {model} (random weights, vocabulary {vocab_size}), rollout batch {spec['rollout_batch']} prompts, "
             f"responses of exactly "
             f"{spec['response_length']} tokens, {spec['ppo_epochs']} PPO epochs with one optimizer step each, "
             f"micro-batches of {spec['micro_batch']} responses; rto_fast's generation: {spec['generation']}"
             f"{'; fused output layer' if spec['fused_output_layer'] else ''}"
             f"{'; rto_fast offloads its frozen models to host memory (TRL cannot)' if spec['offload_frozen'] else ''}"
             f"{'; gradient checkpointing on both sides' if spec['gradient_checkpointing'] else ''}"
             f"{lora_note(spec['lora'])}"
             f"{precision}; "
             f"rto_fast's packed attention: {results['ours'].get('attention', '?')}; "
             f"rto_fast's largest logprob_mismatch (training vs scoring log-probs before an update): "
             f"{results['ours'].get('logprob_mismatch')}; "
             f"mean of {ours['timed_iterations']} timed iterations "
             f"after one warm-up{f' (iteration {args.profile} profiled, not timed)' if args.profile > 1 else ''}. "
             "Ratios: ours / TRL for speed (tokens/s; > 1 is faster), ours / TRL for memory.", "",
             "| | generate s | score s | train s | iteration s | tokens/s | score+train tokens/s | peak memory MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in (("rto_fast", ours), ("TRL", peer)):
        lines.append(f"| {name} | {row['generate']:.3f} | {row['score']:.3f} | {row['train']:.3f} | "
                     f"{row['total']:.3f} | {row['tokens_per_s']:,.0f} | {row['score_train_tokens_per_s']:,.0f} | "
                     f"{row['peak_mb']:,.0f} |")
    lines.append(f"| **ratio** | {peer['generate'] / ours['generate']:.2f}x | {peer['score'] / ours['score']:.2f}x | "
                 f"{peer['train'] / ours['train']:.2f}x | {peer['total'] / ours['total']:.2f}x | "
                 f"**{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x** | "
                 f"**{ours['score_train_tokens_per_s'] / peer['score_train_tokens_per_s']:.2f}x** | "
                 f"{ours['peak_mb'] / peer['peak_mb']:.2f}x |")
    lines += ["", "Time columns in the ratio row are TRL time / rto_fast time (> 1: rto_fast is faster). Peak memory "
              "on CPU is each side's whole-process peak RSS (libraries included)." if not gpu else
              "Peak memory is torch.cuda.max_memory_allocated of each side's process.", ""]
    for name, side in (("rto_fast", "ours"), ("TRL", "trl")):
        if results[side].get("profile"):
            # The side's profile summary, its headings one level down, under a heading naming the side.
            lines += [f"## {name}: profile of iteration {args.profile}", ""]
            lines += [("##" + line) if line.startswith("#") else line
                      for line in results[side]["profile"].splitlines()[2:]]
            lines.append("")
    write_report(lines, args.output or RESULTS / f"rl_step_{args.device}{'_lora' if args.lora else ''}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
