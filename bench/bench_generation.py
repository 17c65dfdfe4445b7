"""Sampling rollouts: rto_fast's decode loop against transformers' `model.generate`, the phase that caps an RL
iteration when responses are long.

    python bench/bench_generation.py --device cpu                      # tiny Llama, about a minute on 2 cores
    python bench/bench_generation.py --device cuda --model pythia-410m --batch 64 --new-tokens 256

One model (random weights, built from a config: nothing is downloaded), one left-padded batch of prompts of mixed
lengths, `--new-tokens` tokens per response with eos banned (every engine does the same work), sampling at
temperature 1. Engines, each through `rto_fast.trainer.generation.generate` with the same settings:
- transformers: `model.generate` with its dynamic cache (what TRL and most trainers call);
- rto_fast: the decode loop with eager steps (preallocated cache, ready masks, finished rows leave the batch);
- rto_fast-graph (CUDA): the same loop with the decode step captured once per batch as a CUDA graph;
- transformers-static: `model.generate` with its static cache (compiled by transformers on CUDA).
Per engine: median (and best) wall time of a generate call after a warm-up call, milliseconds per decode step,
generated tokens per second, the speed-up over `transformers`, peak memory of the call on CUDA, and whether its
greedy tokens (temperature 0, a separate call) equal `transformers`' token for token.

Writes bench/results/generation_<device>.md (hardware, versions, command, table).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import hardware, write_report  # noqa: E402
from bench_rl_step import PYTHIA, PYTHIA_VOCAB, model_config, sized_tokenizer  # noqa: E402

ENGINES = {  # name -> SamplingSettings keywords; the static cache last: on CUDA its warm-up call compiles
    "transformers": dict(engine="transformers"),
    "rto_fast": dict(engine="rto_fast", cuda_graph=False),
    "rto_fast-graph": dict(engine="rto_fast", cuda_graph=True),
    "transformers-static": dict(engine="transformers", kv_cache="static"),
}


def build_model(name: str, device: str, vocab_size: int | None):
    from transformers import AutoModelForCausalLM

    from rto_fast.trainer.models import build_tokenizer

    tokenizer = build_tokenizer() if vocab_size is None else sized_tokenizer(vocab_size)
    config = model_config(name, tokenizer)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    return model, tokenizer


def prompts_of_mixed_length(count: int, shortest: int, longest: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (count,), generator=generator).tolist()
    # Ids 0..255 are the byte tokens of the shipped tokenizer: ordinary text, never a special token.
    return [torch.randint(0, min(vocab, 256), (length,), generator=generator).tolist() for length in lengths]


def time_engine(model, prompts, settings, ids, device, repeats):
    from rto_fast.trainer.generation import generate

    def call():
        torch.manual_seed(0)
        return generate(model, prompts, settings, **ids)

    call()  # warm-up (and compilation / capture, which every call of the graph engine repeats)
    times = []
    peak = None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        started = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        times.append(time.perf_counter() - started)
    return statistics.median(times), min(times), peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=("tiny", *PYTHIA), default=None,
                        help="default: tiny on cpu, pythia-410m on cuda")
    parser.add_argument("--batch", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary size; default: 259 (the shipped tokenizer) for tiny, 50304 for Pythia shapes")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 64 (cpu), 256 (cuda)")
    parser.add_argument("--prompt-length", type=int, nargs=2, default=(16, 48), metavar=("SHORTEST", "LONGEST"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads on CPU")
    parser.add_argument("--engines", nargs="+", choices=tuple(ENGINES), default=None,
                        help="default: all that apply to the device (rto_fast-graph needs CUDA)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    from rto_fast.trainer.generation import SamplingSettings, generate

    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if not gpu:
        torch.set_num_threads(args.threads)
    model_name = args.model or ("pythia-410m" if gpu else "tiny")
    new_tokens = args.new_tokens or (256 if gpu else 64)
    engines = args.engines or [name for name in ENGINES if gpu or name != "rto_fast-graph"]
    vocab_size = args.vocab or (None if model_name == "tiny" else PYTHIA_VOCAB)
    model, tokenizer = build_model(model_name, args.device, vocab_size)
    prompts = prompts_of_mixed_length(args.batch, *args.prompt_length, model.config.vocab_size)
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    rows = {}
    greedy_reference = None
    for name in engines:
        common = dict(max_new_tokens=new_tokens, batch_size=args.batch, ban_eos=True, **ENGINES[name])
        median, best, peak = time_engine(model, prompts, SamplingSettings(temperature=1.0, **common), ids,
                                         args.device, args.repeats)
        greedy = generate(model, prompts, SamplingSettings(temperature=0.0, **common), **ids)
        if greedy_reference is None:
            greedy_reference = greedy
        rows[name] = {"median": median, "best": best, "peak": peak, "equal": greedy == greedy_reference}
        print(name, {key: value for key, value in rows[name].items()}, flush=True)

    import transformers

    baseline = rows.get("transformers", next(iter(rows.values())))["median"]
    command = "python bench/bench_generation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Sampling rollouts: rto_fast's decode loop vs transformers' generate (" + args.device + ")", "",
             f"Command: `{command.strip()}`  ",
             f"Hardware: {hardware(args.device)}; torch {torch.__version__}, transformers {transformers.__version__}, "
             f"Python {platform.python_version()}" + ("" if gpu else f", {args.threads} intra-op thread(s)"), "",
             f"Model {model_name} (random weights, vocabulary {model.config.vocab_size}, {'bf16' if gpu else 'fp32'}, "
             f"sdpa), one batch of {args.batch} "
             f"prompts of {args.prompt_length[0]}-{args.prompt_length[1]} tokens (left-padded), {new_tokens} new "
             f"tokens each (eos banned), temperature 1; median (best) of {args.repeats} calls after a warm-up call. "
             "'greedy equal': temperature-0 tokens identical to the first engine's.", "",
             "| engine | ms per call | ms per decode step | generated tokens/s | vs transformers | peak MiB | "
             "greedy equal |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        peak = f"{row['peak']:,.0f}" if row["peak"] is not None else "n/a"
        lines.append(f"| {name} | {1e3 * row['median']:.1f} ({1e3 * row['best']:.1f}) | "
                     f"{1e3 * row['median'] / new_tokens:.2f} | {args.batch * new_tokens / row['median']:,.0f} | "
                     f"{baseline / row['median']:.2f}x | {peak} | {'yes' if row['equal'] else 'NO'} |")
    lines += ["", "vs transformers: its time / the engine's time (> 1: faster). Peak MiB: CUDA memory allocated "
              "during a call above what was allocated before it (n/a on CPU).", ""]
    write_report(lines, args.output or ROOT / "results" / f"generation_{args.device}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
