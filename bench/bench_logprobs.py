"""Benchmark of rto_fast's per-token log-prob ops against the ways RLHF code computes them.

    python bench/bench_logprobs.py [--device cpu|cuda] [--quick] [--repeats N]

Writes bench/results/logprobs_<device>.md (hardware, versions, command, tables, ratios vs TRL) and prints it.

token_logprobs peers, same logits and labels, forward and forward+backward (sum of the log-probs):
- "rto_fast": `ops.token_logprobs` (Triton on CUDA, the C++ row kernels of csrc/logprobs.cpp on CPU); "rto_fast inplace" adds
  `inplace_backward=True` (the gradient overwrites the logits); "rto_fast kernel" (CUDA, forward) launches the
  forward kernel alone, without the op's checks and dispatch: the difference is the op's host overhead.
- "TRL": `trl.trainer.utils.selective_log_softmax` on (B, T, V) logits with B = 8 rows (a padded batch; on CPU it
  loops over B; on CUDA it runs TRL's own Triton kernel). "TRL packed" is the same call on a packed (1, N, V)
  stream, the layout this project trains on.
- "plain": `torch.log_softmax(logits.float(), -1).gather(...)` (OpenRLHF, the official RTO code).
- "Liger CE": Liger-Kernel's `liger_cross_entropy(..., reduction="none")`, log-prob = -loss (CUDA only: its Triton
  kernels do not run on CPU, reported n/a); "flash-attn CE": flash-attn's Triton cross entropy when importable.
linear_token_logprobs peers: "rto_fast linear" (`ops.linear_token_logprobs`), "matmul + rto_fast" (full logits,
then `ops.token_logprobs`), "matmul + plain", and Liger's fused linear cross entropy (reduction="none", CUDA only).
token_rewards_from_logits: `ops.token_rewards_from_logits` on three logits tensors vs "3x token_logprobs +
token_rewards" and vs the floor of reading each logits tensor once (`x.sum(dtype=float32)` per tensor).

Time: median of `--repeats` calls after one warmup call. On CPU the speed-up against TRL is also measured on
`--pairs` alternating rto_fast / TRL calls (median of the per-pair ratios): the number the 3x forward target is
checked on, since cases timed one after another on a shared machine can see different loads. Peak memory:
- CUDA: `torch.cuda.max_memory_allocated()` during one call minus the memory allocated before it (inputs excluded).
- CPU: for every case a fresh subprocess makes one tiny call (imports, one-time set-up), allocates the inputs, then
  makes one call; peak memory is the growth of the process's peak resident set (VmHWM, reset just before the
  call through /proc/self/clear_refs) over the resident set just before that call, outputs and gradients
  included. glibc's mmap threshold is pinned to 128 KiB there (MALLOC_MMAP_THRESHOLD_), so every large block is
  returned to the OS when freed and the peak RSS is the peak of live memory (tracemalloc would not see torch's
  allocations). Times are taken in the parent process, with the default allocator settings.
On CUDA, GB/s counts the bytes that must move per second (forward: the logits once; forward + backward: the logits
twice and the gradient once), compared with the measured device-to-device copy bandwidth (2 x bytes / copy time).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import rto_fast.ops as ops  # noqa: E402
from _env import copy_bandwidth_gbs, hardware  # noqa: E402  (bench/ is on sys.path when a script in it runs)

GPU_SHAPES = [(n, v) for n in (4096, 16384) for v in (32000, 128256, 151936)]
CPU_SHAPES = [(2048, 32000, "float32"), (2048, 32000, "bfloat16")]
CPU_SHAPES_QUICK = [(2048, 32000, "float32"), (2048, 32000, "bfloat16")]
TRL_BATCH = 8
# The CPU forward's speed-up target against TRL, in float32 and in bfloat16 (checked on the paired calls).
CPU_TARGET_X_TRL = 3.0


# ---------------------------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------------------------


def _trl():
    try:
        from trl.trainer.utils import selective_log_softmax
    except Exception:  # noqa: BLE001 -- a missing or broken peer is reported as n/a
        return None
    return selective_log_softmax


def _liger_ce():
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception:  # noqa: BLE001
        return None
    return liger_cross_entropy


def _liger_flce():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:  # noqa: BLE001
        return None
    return liger_fused_linear_cross_entropy


def _flash_ce():
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss
    except Exception:  # noqa: BLE001
        return None
    return cross_entropy_loss


def _importable(module):
    # find_spec does not import the package: TRL alone takes seconds to import, once per subprocess is enough.
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def logprob_impls(device):
    """name -> function(logits (N, V), labels (N,)) -> log-probs (N,); None where the peer cannot run here.

    Peers are imported on first call, so a subprocess measuring one implementation imports only that one.
    """
    has_trl = _importable("trl")
    has_liger = device == "cuda" and _importable("liger_kernel")
    has_flash = device == "cuda" and _importable("flash_attn")

    def trl_batched(logits, labels):
        n, v = logits.shape
        return _trl()(logits.view(TRL_BATCH, n // TRL_BATCH, v), labels.view(TRL_BATCH, -1)).reshape(-1)

    def trl_packed(logits, labels):
        return _trl()(logits.unsqueeze(0), labels.unsqueeze(0)).reshape(-1)

    def kernel_only(logits, labels):
        from rto_fast.kernels.logprobs import logprobs_forward

        return logprobs_forward(logits, labels)[0]

    return {
        "rto_fast": lambda logits, labels: ops.token_logprobs(logits, labels),
        "rto_fast inplace": lambda logits, labels: ops.token_logprobs(logits, labels, inplace_backward=True),
        # The forward kernel's launch alone: no argument checks, label check (and its host sync) or custom-op
        # dispatch; against "rto_fast" it shows the op's host overhead, which a call from an idle GPU pays in full.
        "rto_fast kernel": kernel_only if device == "cuda" else None,
        "TRL": trl_batched if has_trl else None,
        "TRL packed": trl_packed if has_trl else None,
        "plain": lambda logits, labels: torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None])[:, 0],
        "Liger CE": (lambda logits, labels: -_liger_ce()(logits, labels, reduction="none")) if has_liger else None,
        "flash-attn CE": (lambda logits, labels: -_flash_ce()(logits, labels)[0]) if has_flash else None,
    }


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes():
    """VmHWM: this address space's peak RSS (ru_maxrss would carry the parent's peak across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: VmHWM restarts from the current RSS
    except OSError:
        pass


def measure(call, setup, device, repeats):
    """(median ms, peak extra bytes, min ms): `setup()` makes fresh inputs, `call(inputs)` runs the case once."""
    inputs = setup()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call(inputs)
        _sync(device)
        peak = torch.cuda.max_memory_allocated() - before
    else:
        _reset_peak_rss()
        before = max(_rss_bytes(), _peak_rss_bytes())
        call(inputs)
        peak = max(0, _peak_rss_bytes() - before)
    if repeats == 0:
        return float("nan"), peak, float("nan")
    times = []
    for _ in range(repeats):
        inputs = setup()
        _sync(device)
        start = time.perf_counter()
        call(inputs)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, peak, min(times) * 1e3


def _logits_case(n, v, dtype, device, requires_grad, head_output=False):
    """`head_output`: the logits are the output of an op on a leaf (as an LM head's are), not a leaf themselves:
    inplace_backward refuses to overwrite a leaf that requires grad. A clone costs the timed call nothing: its
    backward hands the gradient on unchanged and the leaf keeps that very buffer as its .grad."""
    def setup():
        torch.manual_seed(0)
        logits = torch.randn(n, v, device=device, dtype=dtype).mul_(2).requires_grad_(requires_grad)
        labels = torch.randint(0, v, (n,), device=device)
        return (logits.clone(), labels, logits) if head_output else (logits, labels)

    return setup


def max_error_vs_float64(fn, logits, labels):
    """max |fn(logits) - float64 log-probs| over all rows (the float64 reference runs in row chunks)."""
    with torch.no_grad():
        got = fn(logits, labels).double()
        error = 0.0
        for start in range(0, logits.shape[0], 256):
            rows = slice(start, start + 256)
            expected = torch.log_softmax(logits[rows].double(), -1).gather(-1, labels[rows, None])[:, 0]
            error = max(error, (got[rows] - expected).abs().max().item())
    return error


def run_case(spec, device, repeats):
    """One measurement described by a JSON-able dict; returns (ms, peak bytes) or None when n/a."""
    kind = spec["kind"]
    # Import the peer before measuring: its import must not count as the call's memory.
    for prefix, getter in (("TRL", _trl), ("Liger fused", _liger_flce), ("Liger CE", _liger_ce),
                           ("flash-attn", _flash_ce)):
        if spec["impl"].startswith(prefix):
            getter()
    dtype = getattr(torch, spec["dtype"])
    n, v = spec["n"], spec["v"]
    if kind in ("forward", "backward"):
        fn = logprob_impls(device)[spec["impl"]]
        if fn is None:
            return None
        backward = kind == "backward"
        if not backward and spec["impl"] == "rto_fast inplace":
            return None

        def call(inputs):
            logits, labels = inputs[:2]
            if not backward:
                with torch.no_grad():
                    return fn(logits, labels)
            fn(logits, labels).sum().backward()
            leaf = inputs[-1]  # the logits themselves, or the leaf "rto_fast inplace"'s logits were computed from
            return leaf.grad

        setup = _logits_case(n, v, dtype, device, backward, head_output=spec["impl"] == "rto_fast inplace")
        result = measure(call, setup, device, repeats)
        if backward or repeats == 0:
            return result
        return (*result, max_error_vs_float64(fn, *setup()))  # (median, peak, min, error)
    if kind in ("linear_forward", "linear_backward"):
        d = spec["d"]
        backward = kind == "linear_backward"
        fn = linear_impls(device)[spec["impl"]]
        if fn is None:
            return None

        def setup():
            torch.manual_seed(0)
            hidden = torch.randn(n, d, device=device, dtype=dtype).requires_grad_(backward)
            weight = (torch.randn(v, d, device=device, dtype=dtype) / d**0.5).requires_grad_(backward)
            labels = torch.randint(0, v, (n,), device=device)
            return hidden, weight, labels

        def call(inputs):
            hidden, weight, labels = inputs
            if not backward:
                with torch.no_grad():
                    return fn(hidden, weight, labels)
            fn(hidden, weight, labels).sum().backward()
            return hidden.grad

        return measure(call, setup, device, repeats)
    if kind == "rewards":
        fn = reward_impls()[spec["impl"]]
        if fn is None:
            return None

        def setup():
            torch.manual_seed(0)
            three = [torch.randn(n, v, device=device, dtype=dtype) for _ in range(3)]
            labels = torch.randint(0, v, (1, n), device=device)
            mask = torch.ones(1, n, dtype=torch.bool, device=device)
            return three, labels, mask

        def call(inputs):
            with torch.no_grad():
                return fn(*inputs)

        return measure(call, setup, device, repeats)
    raise ValueError(kind)


def linear_impls(device):
    has_liger = device == "cuda" and _importable("liger_kernel")

    def matmul_then(fn):
        return lambda hidden, weight, labels: fn(hidden @ weight.T, labels)

    return {
        "rto_fast linear": lambda hidden, weight, labels: ops.linear_token_logprobs(hidden, weight, labels),
        "matmul + rto_fast": matmul_then(ops.token_logprobs),
        "matmul + plain": matmul_then(
            lambda logits, labels: torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None])[:, 0]),
        "Liger fused linear CE": (
            lambda hidden, weight, labels: -_liger_flce()(hidden, weight, labels, reduction="none"))
        if has_liger else None,
    }


def reward_impls():
    from_logits = getattr(ops, "token_rewards_from_logits", None)

    def fused(three, labels, mask):
        logits, ref_logits, dpo_logits = (x.unsqueeze(0) for x in three)
        return from_logits(logits, ref_logits, labels, mask, dpo_logits=dpo_logits)

    def unfused(three, labels, mask):
        lp, ref, dpo = (ops.token_logprobs(x.unsqueeze(0), labels) for x in three)
        return ops.token_rewards(lp, ref, mask, dpo_logprobs=dpo)

    def read_once(three, labels, mask):
        return [x.sum(dtype=torch.float32) for x in three]

    return {"token_rewards_from_logits": fused if from_logits is not None else None,
            "3x token_logprobs + token_rewards": unfused, "read 3 logits once (floor)": read_once}


def paired_times(kind, n, v, dtype, device, pairs):
    """[(rto_fast ms, TRL ms)] for `pairs` pairs of calls, the two alternating on the same inputs.

    A long run on a shared machine drifts (other tenants, clocks): cases timed one after the other can see different
    machines, so the speed-up against TRL is also taken pair by pair, each pair seeing the same conditions.
    """
    impls = logprob_impls(device)
    if impls["TRL"] is None:
        return None
    backward = kind == "backward"
    logits, labels = _logits_case(n, v, getattr(torch, dtype), device, backward)()

    def timed(fn):
        logits.grad = None
        _sync(device)
        start = time.perf_counter()
        if backward:
            fn(logits, labels).sum().backward()
        else:
            with torch.no_grad():
                fn(logits, labels)
        _sync(device)
        return (time.perf_counter() - start) * 1e3

    timed(impls["rto_fast"]), timed(impls["TRL"])  # warmup (TRL's import included)
    return [(timed(impls["rto_fast"]), timed(impls["TRL"])) for _ in range(pairs)]


def paired_section(shapes, device, pairs, target):
    lines = [f"## token_logprobs against TRL, paired calls (the speed-up target: forward >= {target:g}x TRL)", "",
             f"rto_fast and TRL called alternately, {pairs} pairs on the same inputs; the ratio is TRL time / rto_fast "
             "time per pair (median, and the middle half of the pairs). This is the number the target is checked "
             "on: each pair sees the same machine, which the sequential tables above cannot promise.", "",
             "| N x V dtype | pass | rto_fast ms | TRL ms | x TRL (median) | x TRL (25%-75%) | target |",
             "|---|---|---|---|---|---|---|"]
    for n, v, dtype in shapes:
        for kind, title in (("forward", "forward"), ("backward", "forward + backward")):
            times = paired_times(kind, n, v, dtype, device, pairs)
            if times is None:
                lines.append(f"| {n} x {v} {dtype} | {title} | n/a | n/a (TRL not installed) | | | |")
                continue
            ratios = sorted(peer / ours for ours, peer in times)
            quartile = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            median = statistics.median(ratios)
            verdict = ("met" if median >= target else "NOT met") if kind == "forward" else ""
            lines.append(f"| {n} x {v} {dtype} | {title} | {statistics.median(t[0] for t in times):.1f} | "
                         f"{statistics.median(t[1] for t in times):.1f} | {median:.2f}x | "
                         f"{quartile[0]:.2f}x-{quartile[2]:.2f}x | {verdict} |")
            print("paired", kind, n, v, dtype, f"{median:.2f}x", flush=True)
    return lines + [""]


def _available(spec, device):
    """False for peers that cannot run here (no need to start a subprocess to find out)."""
    kind, impl = spec["kind"], spec["impl"]
    if (kind == "forward" and impl == "rto_fast inplace") or (kind == "backward" and impl == "rto_fast kernel"):
        return False
    table = {"forward": logprob_impls, "backward": logprob_impls, "linear_forward": linear_impls,
             "linear_backward": linear_impls, "rewards": lambda device: reward_impls()}[kind](device)
    return table[impl] is not None


def measure_spec(spec, device, repeats, isolate):
    """(ms, peak bytes[, max error]) of one spec, or None (n/a), or ("error", message).

    Times are taken in this process. On CPU the peak memory comes from a fresh subprocess that makes one call with
    glibc's dynamic mmap threshold pinned (MALLOC_MMAP_THRESHOLD_): every large block is then mmap'd and unmapped
    on free, so the peak RSS is the peak of live memory, not of blocks the allocator kept from earlier calls.
    """
    if not _available(spec, device):
        return None
    try:
        result = run_case(spec, device, repeats)
    except Exception as error:  # noqa: BLE001 -- report the failure in the table, keep going
        return ("error", f"{type(error).__name__}: {str(error)[:80]}")
    if not isolate or result is None:
        return result
    command = [sys.executable, os.path.abspath(__file__), "--one-case", json.dumps(spec), "--device", device,
               "--repeats", "0"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    memory = subprocess.run(command, capture_output=True, text=True, env=env)
    if memory.returncode != 0:
        return ("error", ((memory.stderr.strip() or "failed").splitlines()[-1])[:100])
    peak = json.loads(memory.stdout.strip().splitlines()[-1])[1]
    return (result[0], peak, *result[2:])


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def _fmt_ms(result):
    """'median (min)' in ms."""
    if result is None:
        return "n/a"
    if isinstance(result, (list, tuple)) and result and result[0] == "error":
        return f"error ({result[1]})"
    median, best = result[0], result[2]
    return f"{median:.1f} ({best:.1f})" if best >= 10 else f"{median:.2f} ({best:.2f})"


def _fmt_mb(result):
    if result is None or (isinstance(result, (list, tuple)) and result and result[0] == "error"):
        return "n/a"
    return f"{result[1] / 2**20:.0f}"


def _ok(result):
    return result is not None and not (isinstance(result, (list, tuple)) and result and result[0] == "error")


def _versions():
    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for name, dist in (("triton", "triton"), ("transformers", "transformers"), ("trl", "trl"),
                       ("liger_kernel", "liger-kernel"), ("flash_attn", "flash-attn")):
        try:
            parts.append(f"{name} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


def _hardware(device):
    text = f"{hardware(device)}, torch threads {torch.get_num_threads()}"
    if device == "cpu":
        from rto_fast import _C

        text += f", rto_fast CPU row kernels: {_C.cpu_isa()}"
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--pairs", type=int, default=None,
                        help="alternating rto_fast / TRL call pairs for the paired speed-up (CPU; default 15, 7 with --quick)")
    parser.add_argument("--one-case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = args.device
    repeats = args.repeats or (3 if args.quick else 5)
    if args.one_case:
        spec = json.loads(args.one_case)
        # One tiny call first: lazy imports and one-time initialisation are not the op's memory.
        run_case(dict(spec, n=TRL_BATCH * 2, v=64, **({"d": 16} if "d" in spec else {})), device, 0)
        result = run_case(spec, device, 0)
        print(json.dumps(list(result) if result is not None else None))
        return
    isolate = device == "cpu"
    if device == "cuda":
        shapes = [(n, v, "bfloat16") for n, v in (GPU_SHAPES[:2] if args.quick else GPU_SHAPES)]
    else:
        shapes = CPU_SHAPES_QUICK if args.quick else CPU_SHAPES
    bandwidth = copy_bandwidth_gbs(device) if device == "cuda" else None
    names = list(logprob_impls(device))
    lines = [f"# token_logprobs / linear_token_logprobs / token_rewards_from_logits benchmark ({device})", "",
             f"Command: `python bench/bench_logprobs.py {' '.join(sys.argv[1:])}`", "",
             f"- {_versions()}", f"- {_hardware(device)}"]
    if device == "cpu":
        lines.append(f"- load average when the run started: {os.getloadavg()[0]:.2f} (other jobs on the same "
                     "cores slow down every small parallel region; compare ratios within this run)")
    lines.append("")
    if bandwidth:
        lines.append(f"- measured device copy bandwidth: {bandwidth:.0f} GB/s (2 x bytes / time of a 256 MiB copy)")
    lines += [f"Times: median (and min) of {repeats} calls after a warmup call, in ms; ratios likewise. Peak "
              "memory (MiB): "
              + ("CUDA max_memory_allocated during one call minus what was allocated before it."
                 if device == "cuda" else
                 "growth of peak RSS (VmHWM) over RSS before one call, each case in a fresh subprocess with "
                 "MALLOC_MMAP_THRESHOLD_=131072 so that freed blocks leave the RSS (outputs and gradients "
                 "included).") + " x TRL = TRL time / rto_fast time (above 1: rto_fast is faster).",
              "Liger-Kernel and flash-attn run Triton kernels that need a GPU: n/a on CPU.", ""]
    for kind, title in (("forward", "forward (no grad)"), ("backward", "forward + backward")):
        errors = []
        lines += [f"## token_logprobs, {title}", "",
                  "| N x V dtype | " + " | ".join(f"{n} ms" for n in names) + " | "
                  + " | ".join(f"{n} MiB" for n in names) + " | rto_fast x TRL | rto_fast x TRL packed |"
                  + (" rto_fast GB/s | rto_fast kernel GB/s |" if bandwidth else ""),
                  "|" + "---|" * (2 * len(names) + 3 + (2 if bandwidth else 0))]
        for n, v, dtype in shapes:
            results = {}
            for name in names:
                spec = {"kind": kind, "impl": name, "n": n, "v": v, "dtype": dtype}
                results[name] = measure_spec(spec, device, repeats, isolate)
                print(kind, n, v, dtype, name, results[name], flush=True)
            ours = results["rto_fast"]
            ratios = []
            for peer in ("TRL", "TRL packed"):
                ok = _ok(ours) and _ok(results[peer])
                ratios.append(f"{results[peer][0] / ours[0]:.2f}x ({results[peer][2] / ours[2]:.2f}x)" if ok
                              else "n/a")
            row = (f"| {n} x {v} {dtype} | " + " | ".join(_fmt_ms(results[x]) for x in names) + " | "
                   + " | ".join(_fmt_mb(results[x]) for x in names) + " | " + " | ".join(ratios) + " |")
            if bandwidth:
                # Bytes that must move: the logits read once (forward); read twice and the gradient written (both).
                element = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
                moved = n * v * element * (1 if kind == "forward" else 3)
                for result in (ours, results["rto_fast kernel"]):
                    achieved = moved / result[0] / 1e6 if _ok(result) else None
                    row += f" {achieved:.0f} ({achieved / bandwidth:.0%}) |" if achieved else " n/a |"
            lines.append(row)
            errors.append((f"{n} x {v} {dtype}", results))
        lines.append("")
        if kind == "forward":
            shown = [x for x in names if x != "rto_fast inplace"]
            lines += ["Forward accuracy: max |log-prob - float64 reference| over all tokens (TRL's bf16 path returns "
                      "bf16 log-probs).", "", "| N x V dtype | " + " | ".join(shown) + " |",
                      "|" + "---|" * (len(shown) + 1)]
            for label, results in errors:
                lines.append(f"| {label} | " + " | ".join(
                    f"{results[x][3]:.1e}" if _ok(results[x]) and len(results[x]) > 3 else "n/a"
                    for x in shown) + " |")
            lines.append("")

    if device == "cpu":
        lines += paired_section(shapes, device, args.pairs or (7 if args.quick else 15), CPU_TARGET_X_TRL)

    # linear_token_logprobs
    if device == "cuda":
        linear_shapes = [(4096, 4096, 128256, "bfloat16")] if args.quick else [
            (4096, 4096, 128256, "bfloat16"), (16384, 4096, 151936, "bfloat16")]
    else:
        linear_shapes = [(512, 128, 32000, "float32")]
    linear_names = list(linear_impls(device))
    for kind, title in (("linear_forward", "forward (no grad)"), ("linear_backward", "forward + backward")):
        lines += [f"## linear_token_logprobs, {title}", "",
                  "| N x D x V dtype | " + " | ".join(f"{x} ms" for x in linear_names) + " | "
                  + " | ".join(f"{x} MiB" for x in linear_names) + " |",
                  "|" + "---|" * (2 * len(linear_names) + 1)]
        for n, d, v, dtype in linear_shapes:
            results = {}
            for name in linear_names:
                spec = {"kind": kind, "impl": name, "n": n, "d": d, "v": v, "dtype": dtype}
                results[name] = measure_spec(spec, device, repeats, isolate)
                print(kind, n, d, v, dtype, name, results[name], flush=True)
            lines.append(f"| {n} x {d} x {v} {dtype} | " + " | ".join(_fmt_ms(results[x]) for x in linear_names)
                         + " | " + " | ".join(_fmt_mb(results[x]) for x in linear_names) + " |")
        lines.append("")

    # token_rewards_from_logits
    reward_shapes = [(4096, 128256, "bfloat16")] if device == "cuda" else [(1024, 32000, "bfloat16")]
    reward_names = list(reward_impls())
    lines += ["## token_rewards_from_logits (policy, reference and DPO logits, mode rto)", "",
              "| N x V dtype | " + " | ".join(f"{x} ms" for x in reward_names) + " | "
              + " | ".join(f"{x} MiB" for x in reward_names) + " |", "|" + "---|" * (2 * len(reward_names) + 1)]
    for n, v, dtype in reward_shapes:
        results = {}
        for name in reward_names:
            spec = {"kind": "rewards", "impl": name, "n": n, "v": v, "dtype": dtype}
            results[name] = measure_spec(spec, device, repeats, isolate)
            print("rewards", n, v, dtype, name, results[name], flush=True)
        lines.append(f"| {n} x {v} {dtype} | " + " | ".join(_fmt_ms(results[x]) for x in reward_names) + " | "
                     + " | ".join(_fmt_mb(results[x]) for x in reward_names) + " |")
    lines.append("")

    text = "\n".join(lines)
    print(text)
    out_dir = os.path.join(ROOT, "bench", "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"logprobs_{device}.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
