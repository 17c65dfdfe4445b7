"""Launch settings of the log-prob kernels, swept on the GPU: which (block, warps, split, prefetch) reads logits
fastest.

    python bench/tune_logprobs.py                    # CUDA: the shapes below, bf16
    TRITON_INTERPRET=1 python bench/tune_logprobs.py --smoke   # CPU: a tiny shape through the interpreter

The defaults (rto_fast/kernels/logprobs.py: 4096-column blocks, 8 warps, a vocabulary split only when rows are fewer than
2 programs per SM, no prefetch; rto_fast/kernels/rewards.py: 4096-column blocks, 8 warps) were set on the first H200 run.
That run read 16384 x 151936 logits at 71% of copy bandwidth but 4096 x 128256 at 31%, though every row is a program
either way; scoring micro-batches hold a few thousand response tokens, so the small-row case is the one the trainer
meets (4096 x 50304, the RL benchmark's shape, comes first, with the training forward's entropy too). Prefetch
(the next block's load issued before the current block's max reduction, so a load stays in flight through it) costs
registers: 48 -> 64 per thread for the bf16 forward, 5 -> 4 programs per SM
(bench/results/kernel_resources_sm90.md); only a GPU says which wins.
For each kernel and shape this times every setting in the grid (CUDA events, median of --repeats calls after
warm-up), checks that each setting gives the default's outputs, and reports GB/s, the share of the measured copy
bandwidth and the speed-up over the default. Writes bench/results/tune_logprobs_<device>.md.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import copy_bandwidth_gbs, hardware, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parent
# The RL benchmark's training shape first (a micro-batch's response tokens, Pythia's vocabulary; its forward also
# computes the entropy), then the target shape, then the small-row shapes: a run stopped at its time limit
# keeps the shapes it finished.
GPU_SHAPES = [(4096, 50304), (16384, 151936), (4096, 128256), (4096, 32000)]
ENTROPY_SHAPES = {(4096, 50304)}
SMOKE_SHAPES = [(7, 300)]


def timed(call, device: str, repeats: int) -> float:
    """Median milliseconds of `call()` over `repeats` calls after two warm-up calls (which also compile)."""
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            call()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def sweep(name, settings, default, run, check, bytes_read, device, repeats):
    """Rows (setting, ms, GB/s) for the default and every setting of the grid; a setting whose outputs differ
    from the default's (beyond float32 rounding) is reported as wrong, not timed."""
    settings = [default] + [setting for setting in settings if setting != default]
    reference = run(default)
    rows = []
    for setting in settings:
        try:
            outputs = run(setting)
            if not check(outputs, reference):
                rows.append((setting, None, "outputs differ from the default's"))
                continue
            ms = timed(lambda: run(setting), device, repeats)
        except Exception as error:  # noqa: BLE001 - a setting that does not compile or launch is a result too
            rows.append((setting, None, f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"))
            continue
        rows.append((setting, ms, bytes_read / (ms * 1e-3) / 1e9))
    print(name, flush=True)
    return rows


def default_warps(block: int, threshold: int) -> int:
    """The kernels' own rule when no num_warps is given: 8 warps from `threshold` columns per block, else 4."""
    return 8 if block >= threshold else 4


def close(outputs, reference) -> bool:
    return all(a is None and b is None or torch.allclose(a, b, rtol=1e-5, atol=1e-5)
               for a, b in zip(outputs, reference))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one tiny shape and a small grid (CPU, interpreter)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) to check the script on CPU")
    from rto_fast.kernels import logprobs as lp_kernels
    from rto_fast.kernels import rewards as reward_kernels

    shapes = SMOKE_SHAPES if args.smoke else GPU_SHAPES
    blocks = (64, 128) if args.smoke else (2048, 4096, 8192)
    warps = (4,) if args.smoke else (4, 8, 16)
    splits = (1, 2) if args.smoke else (1, 2, 4)
    repeats = 1 if args.smoke else args.repeats
    bandwidth = None
    if device == "cuda":
        bandwidth = copy_bandwidth_gbs(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def report() -> None:
        """Written after every shape, so that a run stopped at its time limit keeps what it measured."""
        import triton

        command = " ".join(argv if argv is not None else sys.argv[1:])
        copy = f"; copy bandwidth {bandwidth:.0f} GB/s" if bandwidth else ""
        lines = ["# Log-prob kernel launch settings (" + device + ")", "",
                 f"Command: `python bench/tune_logprobs.py {command}`  ",
                 f"Hardware: {hardware(device)}; torch {torch.__version__}, triton {triton.__version__}, "
                 f"Python {platform.python_version()}{copy}", "",
                 f"{'bf16' if device == 'cuda' else 'float32'} logits; median of {repeats} calls (CUDA events) after "
                 "two warm-up calls. Setting = (block, warps, split, prefetch) for the forward, (block, warps) for "
                 "the backward, (block, warps, prefetch) for the three log-probs (prefetch: each stream loads the "
                 "next block before reducing the current one). GB/s counts the logits bytes read (and written, for "
                 "the backward).", ""]
        for title, default, rows in sections:
            default_ms = next((ms for setting, ms, _ in rows if setting == default and ms is not None), None)
            lines += [f"## {title}", "", f"Default setting: {default}", "",
                      "| setting | ms | GB/s | of copy bandwidth | x default |", "|---|---|---|---|---|"]
            timed_rows = sorted((row for row in rows if row[1] is not None), key=lambda row: row[1])
            for setting, ms, gbs in timed_rows:
                share = f"{100 * gbs / bandwidth:.0f}%" if bandwidth else "n/a"
                speedup = f"{default_ms / ms:.2f}x" if default_ms else "n/a"
                lines.append(f"| {setting} | {ms:.3f} | {gbs:,.0f} | {share} | {speedup} |")
            for setting, _, problem in (row for row in rows if row[1] is None):
                lines.append(f"| {setting} | n/a | {problem} | | |")
            lines.append("")
        write_report(lines, args.output or ROOT / "results" / f"tune_logprobs_{device}.md")

    sections = []
    for rows_count, vocab in shapes:
        torch.manual_seed(0)
        logits = torch.randn(rows_count, vocab, device=device).mul_(2).to(dtype)
        labels = torch.randint(0, vocab, (rows_count,), device=device)
        logit_bytes = logits.numel() * logits.element_size()

        def forward(setting):
            block, num_warps, split, prefetch = setting
            logprobs, stats, _ = lp_kernels.logprobs_forward(logits, labels, block=block, num_warps=num_warps,
                                                             split=split, prefetch=prefetch)
            return logprobs, stats

        default_block = lp_kernels._forward_block(vocab)
        default_split = lp_kernels.choose_split(rows_count, vocab, logits.device, default_block)
        default = (default_block, default_warps(default_block, 2048), default_split, lp_kernels.FORWARD_PREFETCH)
        # Prefetching with the default's split only: it changes how each program streams, not how rows divide.
        grid = (list(itertools.product(blocks, warps, splits, (False,)))
                + list(itertools.product(blocks, warps, (default_split,), (True,))))
        sections.append((f"token_logprobs forward, {rows_count} x {vocab}", default,
                         sweep(f"forward {rows_count} x {vocab}", grid, default, forward, close, logit_bytes,
                               device, repeats)))
        if (rows_count, vocab) in ENTROPY_SHAPES or args.smoke:
            # The training forward (log-probs and entropy): more registers per thread, so its best setting may differ.
            def forward_entropy(setting):
                block, num_warps, split, prefetch = setting
                return lp_kernels.logprobs_forward(logits, labels, block=block, num_warps=num_warps, split=split,
                                                   prefetch=prefetch, return_entropy=True)

            grid = list(itertools.product(blocks, warps, (default_split,), (False, True)))
            sections.append((f"token_logprobs forward with entropy, {rows_count} x {vocab}", default,
                             sweep(f"forward+entropy {rows_count} x {vocab}", grid, default, forward_entropy, close,
                                   logit_bytes, device, repeats)))

        _, stats, _ = lp_kernels.logprobs_forward(logits, labels)
        grad = torch.randn(rows_count, device=device)

        def backward(setting):
            block, num_warps = setting
            return (lp_kernels.logprobs_backward(logits, labels, stats, None, grad, None, block=block,
                                                 num_warps=num_warps).float(),)

        block = min(lp_kernels.BACKWARD_BLOCK, 1 << (vocab - 1).bit_length())
        default = (block, default_warps(block, 2048))
        grid = list(itertools.product(blocks, warps))
        sections.append((f"token_logprobs backward, {rows_count} x {vocab} (reads and writes the logits)", default,
                         sweep(f"backward {rows_count} x {vocab}", grid, default, backward,
                               lambda a, b: torch.allclose(a[0], b[0], rtol=1e-2, atol=1e-6),
                               2 * logit_bytes, device, repeats)))

        others = [torch.randn_like(logits, dtype=torch.float32).mul_(2).to(dtype) for _ in range(2)]

        def three(setting):
            block, num_warps, prefetch = setting
            return reward_kernels.three_logprobs_forward(logits, others[0], labels, dpo_logits=others[1],
                                                         block_v=block, num_warps=num_warps, prefetch=prefetch)

        block = min(4096, 1 << (vocab - 1).bit_length())
        default = (block, default_warps(block, 4096), lp_kernels.FORWARD_PREFETCH)
        sections.append((f"three log-probs (policy, reference, DPO), {rows_count} x {vocab}", default,
                         sweep(f"three {rows_count} x {vocab}", list(itertools.product(blocks, warps, (False, True))),
                               default, three, close, 3 * logit_bytes, device, repeats)))
        report()

    return 0


if __name__ == "__main__":
    sys.exit(main())
