"""Benchmark of rto_fast.ops.gae and ppo_loss against the way PPO trainers compute them.

    python bench/bench_gae_ppo.py [--device cpu|cuda] [--repeats N] [--skip-compile]

Writes bench/results/gae_ppo_<device>.md (hardware, versions, command, tables, ratios) and prints the tables.

GAE peers, all on the same tensors:
- "python loop": TRL PPOTrainer's `lastgaelam` loop over reversed(range(T)) on whole columns (OpenRLHF, verl and
  the official RTO code do the same), with padding values and rewards zeroed so it follows our V_{H+1} = 0 rule.
- "torch vectorized": every delta in one shot, then the discounted reverse cumsum A = delta @ W with the
  (T x T) triangular matrix W[s, t] = (gamma * lam)^(s - t) for s >= t (one matmul; T^2 memory).
- "rto_fast": `ops.gae` (the C++ scan on CPU, the Triton kernel on CUDA).
Peers run on right-padded rows whose responses start at column 0 (their layout); the packed case gives them the
same sequences padded to the longest one, built outside the timing. The multi-turn case (rows of several model
turns with tool-output holes between them, one trajectory per row) compares with the multi-turn loop of verl, in
which observation tokens carry the recursion unchanged.

PPO loss peers (forward + backward, values included, token-mean): "eager" is TRL's formulation (masked_mean of
the clipped surrogate and clipped value loss, clip fractions, approx KL), "compiled" is torch.compile of the same
function (dynamic shapes, compiled once, compile time excluded), "rto_fast" is `ops.ppo_loss`.
On CUDA the script also times the two GAE kernel designs (segmented scan vs one lane per sequence) for T up to
8192, and compares ppo_loss with its memory-bandwidth floor (bytes that must move / measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import rto_fast  # noqa: E402
import rto_fast.ops as ops  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "bench"))
from _env import copy_bandwidth_gbs  # noqa: E402

PADDED_SHAPES = [(64, 512), (512, 1024), (256, 4096)]
PACKED_TOKENS = 512 * 1024
GAMMA, LAM = 1.0, 0.95


# ---------------------------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------------------------


def gae_python_loop(rewards, values, gamma=GAMMA, lam=LAM):
    """TRL PPOTrainer's GAE loop (trl/trainer/ppo_trainer.py), on right-padded rows with zeroed padding."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    return advantages, returns


def gae_multi_turn_loop(rewards, values, mask, gamma=GAMMA, lam=LAM):
    """The multi-turn form of the same loop (verl's): observation tokens (mask False) between the model's turns
    carry `nextvalues` and `lastgaelam` unchanged, so a turn's credit reaches the earlier turns."""
    action = mask.to(rewards.dtype)
    nextvalues = torch.zeros_like(rewards[:, 0])
    lastgaelam = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        candidate = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * action[:, t] + (1 - action[:, t]) * nextvalues
        lastgaelam = candidate * action[:, t] + (1 - action[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    return advantages, advantages + values


def discount_matrix(length, coefficient, device):
    """W[s, t] = coefficient^(s - t) for s >= t, else 0: A[:, t] = sum_s delta[:, s] * W[s, t]."""
    steps = torch.arange(length, device=device, dtype=torch.float32)
    exponent = steps[:, None] - steps[None, :]
    return torch.where(exponent >= 0, torch.tensor(coefficient, device=device) ** exponent.clamp(min=0), 0.0)


def gae_torch_vectorized(rewards, values, weight_matrix, gamma=GAMMA):
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))
    deltas = rewards + gamma * next_values - values
    advantages = deltas @ weight_matrix
    return advantages, advantages + values


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def ppo_loss_trl(new_logprobs, logprobs, advantages, mask, vpred, values, returns, cliprange=0.2,
                 cliprange_value=0.2, vf_coef=0.1):
    """TRL PPOTrainer's loss (trl/trainer/ppo_trainer.py, the micro-batch body), mask = ~padding_mask."""
    vpredclipped = torch.clamp(vpred, values - cliprange_value, values + cliprange_value)
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * masked_mean(vf_loss_max, mask)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), mask)
    logprobs_diff = new_logprobs - logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = masked_mean(pg_loss_max, mask)
    loss = pg_loss + vf_coef * vf_loss
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), mask)
    approxkl = 0.5 * masked_mean(logprobs_diff**2, mask)
    return loss, (pg_loss.detach(), vf_loss.detach(), pg_clipfrac, approxkl.detach(), vf_clipfrac)


def ppo_loss_rto_fast(new_logprobs, logprobs, advantages, mask, vpred, values, returns):
    return ops.ppo_loss(new_logprobs, logprobs, advantages, mask, values=vpred, old_values=values, returns=returns)


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(function, device, repeats, warmup=1):
    """Median wall time in milliseconds."""
    for _ in range(warmup):
        function()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_mb(function, device):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    function()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def padded_inputs(batch, length, device, generator):
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=generator)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    rewards = torch.randn(batch, length, generator=generator).masked_fill(~mask, 0.0)
    values = torch.randn(batch, length, generator=generator).masked_fill(~mask, 0.0)
    return rewards.to(device), values.to(device), mask.to(device)


def multi_turn_inputs(batch, length, device, generator):
    """Rows of 2-8 model turns (8-128 tokens each) separated by tool-output holes (4-64 tokens), then padding."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        position = 0
        for _ in range(int(torch.randint(2, 9, (1,), generator=generator))):
            turn = int(torch.randint(8, 129, (1,), generator=generator))
            mask[row, position:position + turn] = True
            position += turn + int(torch.randint(4, 65, (1,), generator=generator))
    rewards = torch.randn(batch, length, generator=generator).masked_fill(~mask, 0.0)
    values = torch.randn(batch, length, generator=generator).masked_fill(~mask, 0.0)
    return rewards.to(device), values.to(device), mask.to(device)


def packed_inputs(total, device, generator):
    """A (1, N) stream of random-length sequences, its cu_seqlens, and the same data right-padded for peers."""
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(64, 2049, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - total
    lengths = [n for n in lengths if n > 0]
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths), 0)
    rewards = torch.randn(1, total, generator=generator)
    values = torch.randn(1, total, generator=generator)
    mask = torch.ones(1, total, dtype=torch.bool)
    longest = max(lengths)
    padded_mask = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    padded_rewards = torch.zeros(len(lengths), longest)
    padded_values = torch.zeros(len(lengths), longest)
    padded_rewards[padded_mask] = rewards[0]
    padded_values[padded_mask] = values[0]
    to = lambda t: t.to(device)  # noqa: E731
    return (to(rewards), to(values), to(mask), to(cu_seqlens)), (to(padded_rewards), to(padded_values),
                                                                 to(padded_mask))


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------------------------


def bench_gae(device, repeats, generator, lines):
    lines += ["## gae (advantages and returns), gamma=1.0, lam=0.95", "",
              "| shape | python loop (ms) | torch vectorized (ms) | rto_fast (ms) | vs loop | vs vectorized "
              "| max abs diff vs loop |",
              "|---|---|---|---|---|---|---|"]
    ratios = {}
    cases = [(f"{b} x {t}", padded_inputs(b, t, device, generator), None) for b, t in PADDED_SHAPES]
    packed, padded_peer = packed_inputs(PACKED_TOKENS, device, generator)
    cases.append((f"packed N={PACKED_TOKENS} ({packed[3].numel() - 1} seqs)", padded_peer, packed))
    for label, (rewards, values, mask), packed_case in cases:
        length = rewards.shape[1]
        loop_repeats = max(2, repeats // 4) if device == "cpu" and length >= 2048 else repeats
        loop_ms = time_call(lambda: gae_python_loop(rewards, values), device, loop_repeats)
        weight_matrix = discount_matrix(length, GAMMA * LAM, device)
        vector_ms = time_call(lambda: gae_torch_vectorized(rewards, values, weight_matrix), device, repeats)
        if packed_case is None:
            ours = lambda: ops.gae(rewards, values, mask, gamma=GAMMA, lam=LAM)  # noqa: E731
        else:
            p_rewards, p_values, p_mask, cu_seqlens = packed_case
            ours = lambda: ops.gae(p_rewards, p_values, p_mask, gamma=GAMMA, lam=LAM,  # noqa: E731
                                   cu_seqlens=cu_seqlens)
        ours_ms = time_call(ours, device, repeats * 4, warmup=2)
        expected, _ = gae_python_loop(rewards, values)
        advantages, _ = ours()
        if packed_case is not None:
            advantages = advantages[0]
            expected = expected[mask]
        else:
            advantages, expected = advantages[mask], expected[mask]
        diff = (advantages - expected).abs().max().item()
        ratios[label] = loop_ms / ours_ms
        lines.append(f"| {label} | {loop_ms:.2f} | {vector_ms:.2f} | {ours_ms:.3f} | {loop_ms / ours_ms:.1f}x "
                     f"| {vector_ms / ours_ms:.1f}x | {diff:.1e} |")
        print(lines[-1], flush=True)
    # Multi-turn rows: the peer is the multi-turn loop; the triangular-matrix form has no way to skip holes.
    batch, length = 512, 1024
    rewards, values, mask = multi_turn_inputs(batch, length, device, generator)
    label = f"{batch} x {length} multi-turn ({mask.sum().item() / mask.numel():.0%} action tokens, holes)"
    loop_ms = time_call(lambda: gae_multi_turn_loop(rewards, values, mask), device, repeats)
    ours_ms = time_call(lambda: ops.gae(rewards, values, mask, gamma=GAMMA, lam=LAM), device, repeats * 4, warmup=2)
    expected, _ = gae_multi_turn_loop(rewards, values, mask)
    diff = (ops.gae(rewards, values, mask, gamma=GAMMA, lam=LAM)[0][mask] - expected[mask]).abs().max().item()
    ratios[label] = loop_ms / ours_ms
    lines.append(f"| {label} | {loop_ms:.2f} | n/a | {ours_ms:.3f} | {loop_ms / ours_ms:.1f}x | n/a | {diff:.1e} |")
    print(lines[-1], flush=True)
    lines.append("")
    return ratios


def bench_gae_variants(device, repeats, generator, lines):
    from rto_fast.kernels import gae_ppo as kernels

    lines += ["## gae kernel designs on the GPU (B = 256 rows, all positions valid)", "",
              "| T | scan (ms) | loop (ms) | loop / scan |", "|---|---|---|---|"]
    for length in (512, 1024, 2048, 4096, 8192):
        rewards, values, mask = padded_inputs(256, length, device, generator)
        mask = torch.ones_like(mask)
        scan_ms = time_call(lambda: kernels.gae_forward(rewards, values, mask, method="scan"), device, repeats * 4)
        loop_ms = time_call(lambda: kernels.gae_forward(rewards, values, mask, method="loop"), device, repeats * 4)
        lines.append(f"| {length} | {scan_ms:.3f} | {loop_ms:.3f} | {loop_ms / scan_ms:.2f} |")
        print(lines[-1], flush=True)
    lines.append("")


def bench_ppo(device, repeats, generator, lines, compile_peer):
    bandwidth = copy_bandwidth_gbs(device) if device == "cuda" else None
    header = "| shape | eager TRL (ms) | compiled TRL (ms) | rto_fast (ms) | vs eager | vs compiled |"
    rule = "|---|---|---|---|---|---|"
    if device == "cuda":
        header += " peak MB eager / ours | floor (ms) | ours / floor |"
        rule += "---|---|---|"
    lines += ["## ppo_loss forward + backward (values included, token-mean)", "", header, rule]
    compiled = torch.compile(ppo_loss_trl, dynamic=True) if compile_peer else None
    shapes = [(f"{b} x {t}", (b, t)) for b, t in PADDED_SHAPES] + [(f"packed 1 x {PACKED_TOKENS}",
                                                                   (1, PACKED_TOKENS))]
    for label, shape in shapes:
        mask = (torch.rand(shape, generator=generator) < 0.8).to(device)
        logprobs = -torch.rand(shape, generator=generator).to(device) * 3
        new_logprobs = logprobs + 0.2 * torch.randn(shape, generator=generator).to(device)
        advantages = torch.randn(shape, generator=generator).to(device)
        values = torch.randn(shape, generator=generator).to(device)
        vpred = values + 0.2 * torch.randn(shape, generator=generator).to(device)
        returns = torch.randn(shape, generator=generator).to(device)

        def run(loss_function):
            leaf_logprobs = new_logprobs.clone().requires_grad_(True)
            leaf_values = vpred.clone().requires_grad_(True)

            def step():
                loss, _ = loss_function(leaf_logprobs, logprobs, advantages, mask, leaf_values, values, returns)
                loss.backward()
                return loss

            return step

        eager_ms = time_call(run(ppo_loss_trl), device, repeats)
        compiled_ms = time_call(run(compiled), device, repeats, warmup=2) if compiled is not None else float("nan")
        ours_ms = time_call(run(ppo_loss_rto_fast), device, repeats, warmup=2)
        row = (f"| {label} | {eager_ms:.3f} | {compiled_ms:.3f} | {ours_ms:.3f} | {eager_ms / ours_ms:.2f}x "
               f"| {compiled_ms / ours_ms:.2f}x |")
        if device == "cuda":
            eager_mb = peak_memory_mb(run(ppo_loss_trl), device)
            ours_mb = peak_memory_mb(run(ppo_loss_rto_fast), device)
            # forward: 6 float32 inputs + 1 bool read, 2 float32 gradients written; backward: read 2, write 2.
            floor_ms = mask.numel() * (6 * 4 + 1 + 2 * 4 + 4 * 4) / (bandwidth * 1e9) * 1e3
            row += f" {eager_mb:.0f} / {ours_mb:.0f} | {floor_ms:.3f} | {ours_ms / floor_ms:.2f} |"
        lines.append(row)
        print(row, flush=True)
    if bandwidth is not None:
        lines += ["", f"Measured copy bandwidth: {bandwidth:.0f} GB/s (read + write of a 256 MiB tensor, best of 10)."]
    lines.append("")


def hardware_lines(device):
    lines = [f"- Python {platform.python_version()}, torch {torch.__version__}, rto_fast "
             f"{getattr(rto_fast, '__version__', '?')}"]
    try:
        import triton

        lines[-1] += f", triton {triton.__version__}"
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
            cpu = names[0] if names else cpu
    except OSError:
        pass
    lines.append(f"- CPU: {cpu}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}")
    if device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile of the TRL loss")
    parser.add_argument("--output", default=None, help="results file (default bench/results/gae_ppo_<device>.md)")
    args = parser.parse_args()
    device = args.device
    generator = torch.Generator().manual_seed(0)
    command = "python bench/bench_gae_ppo.py " + " ".join(sys.argv[1:])
    lines = [f"# gae / ppo_loss benchmark ({device})", "", f"Command: `{command.strip()}`", ""]
    lines += hardware_lines(device) + ["", "Times are medians of repeated calls in milliseconds; ratios are "
                                       "peer time / rto_fast time in the same run.", ""]
    print("\n".join(lines), flush=True)
    ratios = bench_gae(device, args.repeats, generator, lines)
    if device == "cuda":
        bench_gae_variants(device, args.repeats, generator, lines)
    bench_ppo(device, args.repeats, generator, lines, compile_peer=not args.skip_compile)
    target = 300.0 if device == "cuda" else 30.0
    for target_shape in ("512 x 1024", next(label for label in ratios if "multi-turn" in label)):
        verdict = "met" if ratios[target_shape] >= target else "NOT met"
        lines.append(f"Target: rto_fast gae >= {target:.0f}x faster than the Python loop at {target_shape}: "
                     f"{ratios[target_shape]:.1f}x, {verdict}.")
        print(lines[-1])
    lines.append("")
    if args.skip_compile:
        lines.append("torch.compile of the TRL loss was skipped (--skip-compile).")
    output = args.output or os.path.join(ROOT, "bench", "results", f"gae_ppo_{device}.md")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
