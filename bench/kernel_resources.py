"""Every Triton kernel launch of rto_fast.ops compiled for a GPU architecture on a machine without one.

    python bench/kernel_resources.py                  # sm_90 (H100 / H200): report to bench/results/
    python bench/kernel_resources.py --arch 80 --check --output /tmp/r.md   # A100; exit 1 on any problem

Triton's interpreter (how the kernel tests run on CPU) never lowers a kernel to PTX, so it hides what only the
real compiler sees: type errors in lowering, layouts it cannot build, register spills. This script drives the
public ops (`RTO_FAST_BACKEND=triton`) on small CPU tensors through the shapes and options that decide the
kernels' compile-time constants (dtypes, vocabulary sizes, split and unsplit rows, entropy, gradients, reward
modes, packed and padded layouts, PPO weight layouts), with Triton's launch replaced by an ahead-of-time compile
for the chosen architecture: the same specialization Triton would make on a GPU (dtypes, 16-byte alignment and
divisibility hints), then ptxas through the cubin. Outputs of "launched" kernels are never computed, so the ops'
results are garbage; only the launches matter.

For each distinct compiled kernel it reports registers per thread, spill (local memory) bytes, shared memory
and the resident programs per SM that these allow, the occupancy that decides how many bytes a memory-bound
kernel keeps in flight. `--check` exits 1 when a launch fails to compile or spills registers.
Needs the ptxas and cuobjdump that Triton's wheel ships (triton/backends/nvidia/bin).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

# Kernels decorated under the interpreter cannot be compiled: decide before triton is imported.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["RTO_FAST_BACKEND"] = "triton"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import write_report  # noqa: E402

# Per-SM limits of the architectures this reports on (CUDA occupancy calculator numbers).
SM_LIMITS = {
    80: {"registers": 65536, "warps": 64, "programs": 32, "shared": 167936, "name": "sm_80 (A100)"},
    86: {"registers": 65536, "warps": 48, "programs": 16, "shared": 102400, "name": "sm_86 (RTX 30xx, A10)"},
    89: {"registers": 65536, "warps": 48, "programs": 24, "shared": 102400, "name": "sm_89 (L4, RTX 40xx)"},
    90: {"registers": 65536, "warps": 64, "programs": 32, "shared": 233472, "name": "sm_90 (H100, H200)"},
}
RESERVED_SHARED_PER_PROGRAM = 1024  # the driver's per-block reservation since sm_80


# ---------------------------------------------------------------------------------------------------------------
# Compile instead of launch
# ---------------------------------------------------------------------------------------------------------------


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: a fixed target and nothing else (no device, no launch)."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class Launch:
    """One distinct compiled kernel: its name, the compile-time constants that tell it apart, the binary."""

    def __init__(self, name, constants, signature, num_warps, compiled, cases):
        self.name, self.constants, self.signature = name, constants, signature
        self.num_warps, self.compiled, self.cases = num_warps, compiled, cases
        self.error = None


def _describe(value) -> str:
    return f"{value}" if not isinstance(value, bool) else str(value).lower()


class CompileRecorder:
    """Patches `JITFunction.run` so that every launch compiles for `arch` (Triton's warm-up path) and returns."""

    def __init__(self, arch: int):
        self.arch = arch
        self.launches: "OrderedDict[tuple, Launch]" = OrderedDict()
        self.errors: list[tuple[str, str, str]] = []  # (case, kernel, message)
        self.case = ""

    def __enter__(self):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        self._driver, self._jit = driver, JITFunction
        self._original_run = JITFunction.run
        self._previous_driver = getattr(driver, "_active", None)  # None: created lazily on first use
        driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", self.arch, 32)))
        recorder = self

        def run(kernel, *args, grid, warmup, **kwargs):
            name = kernel.fn.__name__
            params = [param.name for param in kernel.params]
            bound = dict(zip(params, args), **{k: v for k, v in kwargs.items() if k in params})
            constants = tuple((param.name, _describe(bound[param.name])) for param in kernel.params
                              if param.is_constexpr and param.name in bound)
            signature = tuple(str(value.dtype).replace("torch.", "") if isinstance(value, torch.Tensor)
                              else type(value).__name__ for value in args)
            key = (name, constants, signature, kwargs.get("num_warps"))
            if key in recorder.launches:
                recorder.launches[key].cases.append(recorder.case)
                return None
            try:
                compiled = recorder._original_run(kernel, *args, grid=grid, warmup=True, **kwargs)
            except Exception as error:  # a compile error: the point of this script is to report it
                launch = Launch(name, constants, signature, kwargs.get("num_warps"), None, [recorder.case])
                launch.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
                recorder.launches[key] = launch
                return None
            recorder.launches[key] = Launch(name, constants, signature, compiled.metadata.num_warps, compiled,
                                            [recorder.case])
            return None

        JITFunction.run = run
        self._triton = triton
        return self

    def __exit__(self, *exc):
        self._jit.run = self._original_run
        self._driver.set_active(self._previous_driver)
        return False

    def run_case(self, name, fn):
        """Run one workload; an exception outside the compiler (the op refusing its inputs) is an error too."""
        self.case = name
        try:
            fn()
        except Exception as error:
            self.errors.append((name, "", f"{type(error).__name__}: {error}"))


# ---------------------------------------------------------------------------------------------------------------
# The workloads: every compile-time constant of every kernel, reached through the public ops
# ---------------------------------------------------------------------------------------------------------------


def _logits(rows, vocab, dtype, grad=False):
    return torch.randn(rows, vocab, dtype=dtype).requires_grad_(grad)


def workloads():
    """name -> callable running public ops on CPU tensors (sizes chosen for the compile-time constants only)."""
    from rto_fast import ops

    cases = OrderedDict()
    # token_logprobs: blocks follow the vocabulary (small V: smaller blocks); 1 row splits the vocabulary.
    for vocab, dtype in ((32000, torch.bfloat16), (151936, torch.bfloat16), (128256, torch.float16),
                         (32000, torch.float32), (1000, torch.float32)):
        for rows in (1, 64):
            for entropy in (False, True):
                def case(vocab=vocab, dtype=dtype, rows=rows, entropy=entropy):
                    logits = _logits(rows, vocab, dtype, grad=True)
                    labels = torch.randint(0, vocab, (rows,))
                    out = ops.token_logprobs(logits, labels, return_entropy=entropy, temperature=0.7)
                    total = out[0].sum() + out[1].sum() if entropy else out.sum()
                    total.backward()

                name = f"token_logprobs {rows}x{vocab} {str(dtype)[6:]}{' entropy' if entropy else ''} fwd+bwd"
                cases[name] = case

    def inplace():
        logits = _logits(64, 32000, torch.bfloat16, grad=True)
        ops.token_logprobs(logits.clone(), torch.randint(0, 32000, (64,)), inplace_backward=True).sum().backward()

    cases["token_logprobs inplace backward bf16"] = inplace

    # The prefetching streams (a launch option the tuner sweeps, off by default): forward and three-logits kernels.
    for entropy in (False, True):
        def prefetch(entropy=entropy):
            from rto_fast.kernels import logprobs as logprob_kernels
            from rto_fast.kernels import rewards as reward_kernels

            logits = _logits(64, 128256, torch.bfloat16)
            labels = torch.randint(0, 128256, (64,))
            logprob_kernels.logprobs_forward(logits, labels, return_entropy=entropy, prefetch=True)
            logprob_kernels.logprobs_forward(logits[:1], labels[:1], return_entropy=entropy, prefetch=True)
            if not entropy:
                reward_kernels.three_logprobs_forward(logits, logits, labels, dpo_logits=logits, prefetch=True)

        cases[f"prefetching forward streams 128256 bfloat16{' entropy' if entropy else ''}"] = prefetch

    for dtype, bias in ((torch.bfloat16, False), (torch.float32, True)):
        def linear(dtype=dtype, bias=bias):
            hidden = torch.randn(16, 64, dtype=dtype, requires_grad=True)
            weight = torch.randn(32000, 64, dtype=dtype, requires_grad=True)
            bias_tensor = torch.randn(32000, dtype=dtype, requires_grad=True) if bias else None
            logprobs, entropy = ops.linear_token_logprobs(hidden, weight, torch.randint(0, 32000, (16,)),
                                                          bias=bias_tensor, return_entropy=True)
            (logprobs.sum() + entropy.sum()).backward()

        cases[f"linear_token_logprobs {str(dtype)[6:]}{' bias' if bias else ''} fwd+bwd"] = linear

    # token_rewards_from_logits: with and without the DPO model; (B, T, V) views with a stride past the labels.
    for vocab, dtype, dpo in ((128256, torch.bfloat16, True), (32000, torch.float32, False)):
        def from_logits(vocab=vocab, dtype=dtype, dpo=dpo):
            full = [torch.randn(2, 9, vocab, dtype=dtype) for _ in range(3)]
            labels = torch.randint(0, vocab, (2, 8))
            mask = torch.ones(2, 8, dtype=torch.bool)
            ops.token_rewards_from_logits(full[0][:, :-1], full[1][:, :-1], labels, mask,
                                          dpo_logits=full[2][:, :-1] if dpo else None,
                                          mode="rto" if dpo else "ppo")

        cases[f"token_rewards_from_logits {vocab} {str(dtype)[6:]}{' dpo' if dpo else ''}"] = from_logits

    def mixed_dtypes():
        labels = torch.randint(0, 32000, (2, 8))
        ops.token_rewards_from_logits(torch.randn(2, 8, 32000), torch.randn(2, 8, 32000, dtype=torch.bfloat16),
                                      labels, torch.ones(2, 8, dtype=torch.bool),
                                      dpo_logits=torch.randn(2, 8, 32000, dtype=torch.float16))

    cases["token_rewards_from_logits float32 policy, bfloat16 reference, float16 dpo"] = mixed_dtypes

    # token_rewards: every mode, estimator, score / clip flag, layout and block size at least once.
    reward_settings = [("rto", "k1", True, 0.5, False, 256, torch.float32),
                       ("rto", "k3", False, None, True, 64, torch.bfloat16),
                       ("ppo", "k2", True, None, True, 64, torch.float32),
                       ("dppo", "k1", False, None, False, 2048, torch.float32),
                       ("dppo", "k3", True, None, True, 64, torch.float16)]
    for mode, estimator, with_score, clip, packed, length, dtype in reward_settings:
        def rewards(mode=mode, estimator=estimator, with_score=with_score, clip=clip, packed=packed,
                    length=length, dtype=dtype):
            rows = 4
            shape = (rows * length,) if packed else (rows, length)
            logprobs, ref, dpo = (torch.randn(shape, dtype=dtype) for _ in range(3))
            mask = torch.rand(shape) < 0.8
            cu_seqlens = torch.arange(0, rows * length + 1, length, dtype=torch.int32) if packed else None
            ops.token_rewards(logprobs, ref, mask, mode=mode, dpo_logprobs=dpo, kl_estimator=estimator,
                              score=torch.randn(rows) if with_score else None, dpo_clip=clip, cu_seqlens=cu_seqlens)

        cases[f"token_rewards {mode} {estimator}{' score' if with_score else ''}{' clip' if clip else ''} "
              f"{'packed' if packed else 'padded'} T={length} {str(dtype)[6:]}"] = rewards

    # GAE + PPO loss: padded and packed, short and long rows, every aggregation layout, with and without values.
    for packed, length, agg, with_values, whiten in ((False, 256, "token-mean", True, True),
                                                     (False, 2048, "seq-mean-token-mean", False, False),
                                                     (True, 300, "seq-mean-token-mean", True, True),
                                                     (True, 64, "token-mean", False, True)):
        def gae_ppo(packed=packed, length=length, agg=agg, with_values=with_values, whiten=whiten):
            rows = 4
            shape = (rows * length,) if packed else (rows, length)
            cu_seqlens = torch.arange(0, rows * length + 1, length, dtype=torch.int32) if packed else None
            rewards, old_values, old_logprobs = (torch.randn(shape) for _ in range(3))
            logprobs = torch.randn(shape, requires_grad=True)
            values = torch.randn(shape, requires_grad=True) if with_values else None
            mask = torch.rand(shape) < 0.8
            advantages, returns = ops.gae(rewards, old_values, mask, cu_seqlens=cu_seqlens)
            loss, _ = ops.ppo_loss(logprobs, old_logprobs, advantages, mask, values=values,
                                   old_values=old_values if with_values else None,
                                   returns=returns if with_values else None, agg=agg, cu_seqlens=cu_seqlens,
                                   value_clip=0.2 if packed else None)
            loss.backward()
            loss, *_ = ops.gae_ppo_loss(rewards, old_values, old_logprobs, logprobs, values, mask, whiten=whiten,
                                        agg=agg, cu_seqlens=cu_seqlens)
            loss.backward()

        cases[f"gae + ppo_loss {'packed' if packed else 'padded'} T={length} {agg}"
              f"{' values' if with_values else ''}{' whiten' if whiten else ''}"] = gae_ppo

    # The one-lane-per-segment GAE that bench_gae_ppo.py compares with the scan (not behind a public op).
    for packed in (False, True):
        def gae_loop(packed=packed):
            from rto_fast.kernels import gae_ppo as gae_kernels

            shape = (4 * 64,) if packed else (4, 64)
            cu_seqlens = torch.arange(0, 4 * 64 + 1, 64, dtype=torch.int32) if packed else None
            gae_kernels.gae_forward(torch.randn(shape), torch.randn(shape), torch.rand(shape) < 0.8,
                                    cu_seqlens=cu_seqlens, method="loop")

        cases[f"gae loop {'packed' if packed else 'padded'}"] = gae_loop

    def stochastic_rounding_adamw():
        from rto_fast.trainer.optim import StochasticRoundingAdamW

        weight = torch.nn.Parameter(torch.randn(1000, 64).bfloat16())
        weight.grad = torch.randn(1000, 64).bfloat16()
        StochasticRoundingAdamW([weight], lr=1e-5, weight_decay=0.01).step()

    cases["stochastic-rounding AdamW step bfloat16"] = stochastic_rounding_adamw
    return cases


# ---------------------------------------------------------------------------------------------------------------
# Resources of a compiled kernel
# ---------------------------------------------------------------------------------------------------------------


def _nvidia_tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found at {path} (Triton's wheel ships it for its NVIDIA backend)")
    return str(path)


def resources(compiled) -> dict:
    """registers, local (spill) bytes, stack bytes and static shared bytes from the cubin (cuobjdump), plus the
    shared memory Triton asks for at launch."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(compiled.asm["cubin"])
        path = handle.name
    try:
        text = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(path)
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", text)
        usage[key] = int(match.group(1)) if match else 0
    usage["dynamic_shared"] = int(getattr(compiled.metadata, "shared", 0) or 0)
    return usage


def programs_per_sm(registers: int, num_warps: int, shared_bytes: int, arch: int) -> int:
    """Resident programs (thread blocks) per SM that registers, warps and shared memory allow."""
    limits = SM_LIMITS[arch]
    # Registers are allocated per warp in units of 256 (8 per thread).
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = (limits["registers"] // per_warp) // num_warps
    by_warps = limits["warps"] // num_warps
    by_shared = limits["shared"] // (shared_bytes + RESERVED_SHARED_PER_PROGRAM)
    return max(0, min(limits["programs"], by_registers, by_warps, by_shared))


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def collect(arch: int, only=None):
    recorder = CompileRecorder(arch)
    with recorder:
        for name, fn in workloads().items():
            if only is None or any(word in name for word in only):
                recorder.run_case(name, fn)
    rows = []
    for launch in recorder.launches.values():
        row = {"kernel": launch.name, "constants": launch.constants, "warps": launch.num_warps,
               "dtypes": launch.signature, "cases": launch.cases,
               "error": launch.error}
        if launch.compiled is not None:
            usage = resources(launch.compiled)
            shared = usage["SHARED"] + usage["dynamic_shared"]
            row.update(registers=usage["REG"], spill=usage["LOCAL"], stack=usage["STACK"], shared=shared,
                       programs=programs_per_sm(usage["REG"], launch.num_warps, shared, arch))
        rows.append(row)
    return rows, recorder.errors


def problems(rows, errors) -> list[str]:
    found = [f"{case}: {message}" for case, _, message in errors]
    for row in rows:
        if row["error"]:
            found.append(f"{row['kernel']} ({row['cases'][0]}): does not compile: {row['error']}")
        elif row["spill"] or row["stack"]:
            found.append(f"{row['kernel']} {dict(row['constants'])} warps={row['warps']}: spills registers "
                         f"({row['spill']} bytes local, {row['stack']} bytes stack)")
        elif row["programs"] == 0:
            found.append(f"{row['kernel']} {dict(row['constants'])}: no program fits on an SM")
    return found


def report(rows, errors, arch, command) -> list[str]:
    import triton

    limits = SM_LIMITS[arch]
    lines = [f"# Kernel resources, {limits['name']}, compiled without a GPU", "",
             f"Command: `{command}`", "",
             f"- Python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}",
             f"- {len(rows)} distinct kernels compiled (Triton's specialization, then ptxas) from the launches of "
             f"{len({case for row in rows for case in row['cases']})} workloads; registers and spills from the "
             "cubin (cuobjdump).",
             f"- Programs per SM: what registers (65536 per SM, allocated per warp in units of 256), warps "
             f"({limits['warps']} per SM) and shared memory allow; warps per SM = programs x warps.", "",
             "| kernel | compile-time constants | warps | registers | spill bytes | shared bytes | programs / SM "
             "| warps / SM | first workload |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        constants = ", ".join(f"{key}={value}" for key, value in row["constants"])
        if row["error"]:
            lines.append(f"| {row['kernel']} | {constants} | {row['warps']} | does not compile: {row['error']} "
                         f"| | | | | {row['cases'][0]} |")
            continue
        lines.append(f"| {row['kernel']} | {constants} | {row['warps']} | {row['registers']} | "
                     f"{row['spill'] + row['stack']} | {row['shared']} | {row['programs']} | "
                     f"{row['programs'] * row['warps']} | {row['cases'][0]} |")
    found = problems(rows, errors)
    lines += ["", "Problems: " + ("none (every launch compiles, nothing spills)." if not found else "")]
    lines += [f"- {problem}" for problem in found]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SM_LIMITS),
                        help="compute capability x 10 to compile for (default 90: H100 / H200)")
    parser.add_argument("--only", nargs="*", help="run only the workloads whose name contains one of these words")
    parser.add_argument("--check", action="store_true", help="exit 1 on a compile error, a spill or a refused op")
    parser.add_argument("--output", help="report path (default bench/results/kernel_resources_sm<arch>.md)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows, errors = collect(args.arch, args.only)
    command = "python bench/kernel_resources.py" + (f" --arch {args.arch}" if args.arch != 90 else "")
    lines = report(rows, errors, args.arch, command)
    write_report(lines, args.output or ROOT / "results" / f"kernel_resources_sm{args.arch}.md")
    print(f"compiled in {time.perf_counter() - start:.0f} s")
    return 1 if args.check and problems(rows, errors) else 0


if __name__ == "__main__":
    sys.exit(main())
