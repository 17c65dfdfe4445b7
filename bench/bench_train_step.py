"""The SFT and DPO stages against TRL's SFTTrainer and DPOTrainer, side by side: the same model, data, batch and steps.

    python bench/bench_train_step.py --stage dpo --device cpu         # tiny Llama, a minute on 2 cores
    python bench/bench_train_step.py --stage sft --device cpu --vocab 50304
    python bench/bench_train_step.py --stage dpo --device cuda --model pythia-410m [--vocab 50304]
    python bench/bench_train_step.py --stage dpo --device cpu --precompute-ref   # the reference scored once, first

Both sides start from the same saved model (built from a config, nothing downloaded) and train on the same rows of
the synthetic task (`rto_fast.synthetic`: prompt / chosen / rejected; SFT trains on prompt + chosen with the loss on
the response) for the same number of optimizer steps of `--batch` rows, with one micro-batch per step on each side
(TRL: per_device_train_batch_size = batch; rto_fast: a token budget that holds the whole batch), AdamW at the same
constant learning rate; DPO with beta 0.1 and the sigmoid loss. What differs is how each trains: TRL pads every row
to the batch's longest sequence and takes the float32 log-softmax (or cross entropy) of the full logits; rto_fast
packs the rows into one stream and computes log-probs with its fused op at response positions only. Each side runs
in its own process; the first --warmup steps are not timed.

Reports the mean step time, rows (pairs for DPO) per second and peak memory (CUDA allocator peak, or peak RSS on CPU)
of each side and the ratios; writes bench/results/<stage>_step_<device>.md (hardware, versions, command).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from bench_rl_step import (PYTHIA, PYTHIA_VOCAB, model_config, peak_memory_mb, run_peak_mb, run_side,  # noqa: E402
                           sized_tokenizer)

RESULTS = BENCH / "results"


def build_policy(folder: Path, model: str, seed: int, vocab_size: int | None) -> str:
    """The initial causal LM (the SFT model both sides start from), saved with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from rto_fast.trainer.models import build_tokenizer

    tokenizer = build_tokenizer() if vocab_size is None else sized_tokenizer(vocab_size)
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_config(model_config(model, tokenizer))
    policy.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_pairs(folder: Path, count: int, seed: int) -> Path:
    """`count` rows of the synthetic task as prompt / chosen / rejected jsonl (train split)."""
    from rto_fast.tasks.letters import write_synthetic_task

    write_synthetic_task(folder, seed=seed, num_train=count, num_test=0)
    return folder / "preference" / "train.jsonl"


# ------------------------------------------------------------------------------------------------ the two sides

def run_ours(spec: dict) -> dict:
    from rto_fast.trainer.run_log import read_metrics
    from rto_fast.trainer.cli import main

    output = Path(spec["workdir"]) / "ours"
    dtype = "bf16" if spec["device"] == "cuda" else "fp32"
    stage = spec["stage"]
    sequences = 2 if stage == "dpo" else 1  # per row
    overrides = [
        f"stages=[{stage}]", f"model.{'sft_path' if stage == 'dpo' else 'name_or_path'}={spec['policy']}",
        f"model.tokenizer={spec['policy']}", f"data.source={spec['pairs']}", "data.format=preference",
        "data.test_split=null", f"data.max_prompt_length={spec['max_prompt']}",
        f"data.max_response_length={spec['max_response']}", f"{stage}.batch_size={spec['batch']}",
        f"{stage}.max_steps={spec['steps']}", f"{stage}.epochs=1", f"{stage}.eval_every=0",
        f"{stage}.micro_batch_tokens={sequences * spec['batch'] * (spec['max_prompt'] + spec['max_response'])}",
        f"{stage}.lr={spec['lr']}", f"{stage}.warmup_ratio=0", f"{stage}.weight_decay=0",
        f"{stage}.lr_schedule=constant",
        f"model.fused_output_layer={str(spec['fused_output_layer']).lower()}",
        f"runtime.device={spec['device']}", f"runtime.output_dir={output}", "runtime.progress_bar=false",
        "runtime.checkpoint_every=0", "runtime.resume=never", f"runtime.dtype={dtype}", f"model.dtype={dtype}"]
    if stage == "dpo":
        # TRL's DPOTrainer is plain DPO (rpo_alpha None): so is ours here.
        overrides += ["dpo.beta=0.1", "dpo.sft_coef=0",
                      f"dpo.precompute_ref_logprobs={str(spec['precompute_ref']).lower()}"]
    if main(overrides) != 0:
        raise SystemExit("the rto_fast run failed")
    records = [record for record in read_metrics(output / "metrics.jsonl") if record.get("stage") == stage]
    precompute = re.search(r"pairs computed in ([\d.]+) s", (output / "train.log").read_text())
    elapsed = [0.0] + [record["elapsed_s"] for record in records]
    steps = [after - before for before, after in zip(elapsed, elapsed[1:])]
    return {"step_s": steps, "precompute_s": float(precompute.group(1)) if precompute else None,
            "peak_mb": run_peak_mb(records, spec["device"]),
            "losses": [record["loss"] for record in records]}


def run_trl(spec: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    from rto_fast.trainer.models import build_tokenizer

    tokenizer = build_tokenizer(spec["policy"])
    rows = [json.loads(line) for line in open(spec["pairs"], encoding="utf-8")]
    dtype = torch.bfloat16 if spec["device"] == "cuda" else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=dtype)
    common = dict(output_dir=str(Path(spec["workdir"]) / "trl"), per_device_train_batch_size=spec["batch"],
                  gradient_accumulation_steps=1, max_steps=spec["steps"], learning_rate=spec["lr"],
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                  max_length=spec["max_prompt"] + spec["max_response"], save_strategy="no", report_to=[],
                  logging_steps=1, seed=spec["seed"], use_cpu=spec["device"] == "cpu", bf16=spec["device"] == "cuda",
                  dataloader_drop_last=True)
    if spec["stage"] == "dpo":
        from trl import DPOConfig, DPOTrainer

        dataset = Dataset.from_list([{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in rows])
        reference = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=dtype)
        args = DPOConfig(**common, beta=0.1, precompute_ref_log_probs=spec["precompute_ref"],
                         disable_dropout=True)  # the default loss: sigmoid

        def make_trainer(callbacks):
            return DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=callbacks)
    else:
        from trl import SFTConfig, SFTTrainer

        # Prompt-completion rows: the loss on the completion only, as rto_fast's SFT.
        dataset = Dataset.from_list([{"prompt": row["prompt"], "completion": row["chosen"]} for row in rows])
        args = SFTConfig(**common)

        def make_trainer(callbacks):
            return SFTTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=callbacks)
    marks: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, arguments, state, control, **kwargs):
            if not marks:  # train() has set up (and precomputed the reference's log-probs, when asked)
                marks.append(time.perf_counter())

        def on_step_end(self, arguments, state, control, **kwargs):
            if spec["device"] == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    trainer = make_trainer([StepTimer()])
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"step_s": [after - before for before, after in zip(marks, marks[1:])],
            "precompute_s": marks[0] - started if spec["precompute_ref"] and spec["stage"] == "dpo" else None,
            "peak_mb": peak_memory_mb(spec["device"]), "losses": losses, "trl_version": trl.__version__}


def summarize(result: dict, warmup: int, batch: int) -> dict:
    timed = result["step_s"][warmup:] or result["step_s"]
    step = sum(timed) / len(timed)
    return {"step_s": step, "rows_per_s": batch / step, "precompute_s": result["precompute_s"],
            "peak_mb": result["peak_mb"], "timed_steps": len(timed),
            "first_loss": result["losses"][0] if result["losses"] else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("dpo", "sft"), default="dpo")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=("tiny", *PYTHIA), default=None,
                        help="default: tiny on cpu, pythia-410m on cuda")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary size (default: the shipped tokenizer's 259 for tiny, 50304 for Pythia)")
    parser.add_argument("--batch", type=int, default=None,
                        help="rows (DPO: pairs) per optimizer step (default 32 cpu, 64 cuda)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per side on CPU")
    parser.add_argument("--precompute-ref", action="store_true",
                        help="DPO: both sides score the reference once before training (TRL "
                             "precompute_ref_log_probs, rto_fast dpo.precompute_ref_logprobs)")
    parser.add_argument("--fused-output-layer", action="store_true",
                        help="rto_fast computes log-probs from the output layer's input (model.fused_output_layer)")
    parser.add_argument("--output", default=None)
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.side:  # a child process: run one side, write its result
        spec = json.loads(args.spec)
        result = run_ours(spec) if args.side == "ours" else run_trl(spec)
        Path(args.result).write_text(json.dumps(result))
        return 0

    gpu = args.device == "cuda"
    dpo = args.stage == "dpo"
    if args.precompute_ref and not dpo:
        raise SystemExit("--precompute-ref is a DPO option")
    model = args.model or ("pythia-410m" if gpu else "tiny")
    batch = args.batch or (64 if gpu else 32)
    if args.steps <= args.warmup:
        raise SystemExit("--steps must exceed --warmup")
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as workdir:
        workdir = Path(workdir)
        spec = {"stage": args.stage, "device": args.device, "seed": 0, "workdir": str(workdir), "batch": batch,
                "steps": args.steps, "lr": 1e-5, "max_prompt": 64, "max_response": 64, "threads": args.threads,
                "precompute_ref": args.precompute_ref, "fused_output_layer": args.fused_output_layer,
                "policy": build_policy(workdir / "policy", model, 0,
                                       args.vocab or (None if model == "tiny" else PYTHIA_VOCAB)),
                "pairs": str(write_pairs(workdir / "data", batch * args.steps, 0))}
        results = {}
        for side in ("ours", "trl"):
            results[side] = run_side(side, spec, __file__)
            print(side, json.dumps(summarize(results[side], args.warmup, batch)), flush=True)

    ours, peer = (summarize(results[side], args.warmup, batch) for side in ("ours", "trl"))
    import torch
    import transformers

    from _env import hardware, write_report

    vocab = args.vocab or (259 if model == "tiny" else PYTHIA_VOCAB)
    unit = "pairs" if dpo else "sequences"
    details = "; fused output layer on our side" if args.fused_output_layer else ""
    if dpo:
        details = ("; reference scored once before training on both sides" if args.precompute_ref
                   else "; reference run in every step on both sides") + details
    trainer = "DPOTrainer" if dpo else "SFTTrainer"
    command = "python bench/bench_train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# The {args.stage.upper()} stage: rto_fast vs TRL {results['trl'].get('trl_version', '?')} {trainer} "
             f"({args.device})", "", f"Command: `{command.strip()}`  ",
             f"Hardware: {hardware(args.device)}; torch {torch.__version__}, transformers {transformers.__version__}, "
             f"Python {platform.python_version()}" + (f", {args.threads} intra-op thread(s) per side" if not gpu
                                                       else ""), "",
             f"Model {model} (random weights, vocabulary {vocab}), {batch} {unit} of the synthetic task per optimizer "
             f"step, one micro-batch per step on each side, {args.steps} steps of which the first {args.warmup} are "
             f"not timed{details}. Ratios: ours / TRL for speed ({unit}/s; > 1 is faster), ours / TRL for memory.",
             "", f"| | step s | {unit}/s | reference precompute s | peak memory MiB | first-step loss |",
             "|---|---|---|---|---|---|"]

    def seconds(value):
        return "-" if value is None else f"{value:.2f}"

    for name, row in (("rto_fast", ours), ("TRL", peer)):
        lines.append(f"| {name} | {row['step_s']:.3f} | {row['rows_per_s']:,.1f} | {seconds(row['precompute_s'])} | "
                     f"{row['peak_mb']:,.0f} | {row['first_loss']:.4f} |")
    precompute_ratio = (f"{peer['precompute_s'] / ours['precompute_s']:.2f}x" if args.precompute_ref
                        and ours["precompute_s"] else "")
    lines.append(f"| **ratio** | {peer['step_s'] / ours['step_s']:.2f}x | "
                 f"**{ours['rows_per_s'] / peer['rows_per_s']:.2f}x** | {precompute_ratio} | "
                 f"{ours['peak_mb'] / peer['peak_mb']:.2f}x | |")
    start_loss = ("Both sides start at the DPO loss of a policy equal to its reference, log 2 = 0.6931. " if dpo else
                  "Both sides start at the mean NLL per response token of the same random model. ")
    lines += ["", "Time columns in the ratio row are TRL time / rto_fast time. Reference precompute: rto_fast's "
              "scoring pass as its log reports it; TRL's train() up to its first step (which also holds its setup). "
              + start_loss + ("Peak memory is each side's whole-process peak RSS (libraries included)." if not gpu
                              else "Peak memory: the largest CUDA allocator peak of a step (rto_fast) / over "
                                   "train() (TRL)."), ""]
    write_report(lines, args.output or RESULTS / f"{args.stage}_step_{args.device}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
