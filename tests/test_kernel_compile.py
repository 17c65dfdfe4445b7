"""Every Triton kernel launch of rto_fast.ops compiled by the real compiler (to an sm_90 cubin), without a GPU.

    pytest tests/test_kernel_compile.py -q

The other kernel tests run through Triton's interpreter, which never lowers a kernel: a kernel can pass them all
and still fail to compile on a GPU, or compile into one that spills registers. bench/kernel_resources.py drives
the public ops on CPU tensors with each launch replaced by Triton's ahead-of-time compile for an architecture;
these tests run it (in a subprocess: it must import triton without the interpreter) and check that it would
catch a kernel only the compiler rejects.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "bench" / "kernel_resources.py"


def _nvidia_tools_missing() -> bool:
    import triton

    tools = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin"
    return not (tools / "cuobjdump").exists() or not any(tools.glob("ptxas*"))


pytestmark = [
    pytest.mark.skipif(_nvidia_tools_missing(), reason="Triton's wheel has no ptxas / cuobjdump here"),
    # With a GPU the kernel tests themselves compile every kernel natively.
    pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the kernel tests compile natively"),
]


def _environment():
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "RTO_FAST_BACKEND")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


def _kernels_defined() -> set[str]:
    """Names of the launchable kernels in rto_fast/kernels/ (jit functions whose name ends in _kernel)."""
    names = set()
    for path in (ROOT / "rto_fast" / "kernels").glob("*.py"):
        names.update(re.findall(r"@triton\.jit\s*\ndef (_\w+_kernel)\(", path.read_text()))
    return names


def test_every_kernel_launch_compiles_for_sm90_without_spilling(tmp_path):
    output = tmp_path / "kernel_resources.md"
    result = subprocess.run([sys.executable, str(TOOL), "--check", "--output", str(output)], env=_environment(),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    text = output.read_text()
    assert "Problems: none" in text
    compiled = set(re.findall(r"^\| (_\w+_kernel) \|", text, flags=re.M))
    # Every kernel in rto_fast/kernels/ is reached by some workload: a new kernel needs a workload in the tool.
    assert compiled == _kernels_defined(), f"not compiled: {_kernels_defined() - compiled}"
    registers = [int(value) for value in re.findall(r"^\| _\w+ \| [^|]* \| \d+ \| (\d+) \|", text, flags=re.M)]
    assert len(registers) >= 40 and all(0 < value <= 255 for value in registers)


def test_a_kernel_only_the_compiler_rejects_is_reported(tmp_path):
    """A loop-carried value that starts as an int and becomes a float block runs in the interpreter (numpy
    promotes it) but the compiler rejects the type change."""
    script = tmp_path / "bad_kernel.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'bench')!r})
        import kernel_resources
        import torch
        import triton
        import triton.language as tl

        @triton.jit
        def _type_changing_loop_kernel(a_ptr, out_ptr, n_blocks, BLOCK: tl.constexpr):
            offsets = tl.arange(0, BLOCK)
            total = 0
            for block in range(0, n_blocks):
                total = total + tl.load(a_ptr + block * BLOCK + offsets)
            tl.store(out_ptr + offsets, total)

        @triton.jit
        def _copy_kernel(a_ptr, out_ptr, BLOCK: tl.constexpr):
            offsets = tl.arange(0, BLOCK)
            tl.store(out_ptr + offsets, tl.load(a_ptr + offsets))

        a = torch.randn(64)
        with kernel_resources.CompileRecorder(90) as recorder:
            recorder.run_case("bad", lambda: _type_changing_loop_kernel[(1,)](a, torch.empty_like(a), 2, BLOCK=32))
            recorder.run_case("good", lambda: _copy_kernel[(1,)](a, torch.empty_like(a), BLOCK=64))
        launches = list(recorder.launches.values())
        assert [launch.name for launch in launches] == ["_type_changing_loop_kernel", "_copy_kernel"], launches
        assert launches[0].compiled is None and launches[0].error, "the compile error was not recorded"
        assert launches[1].compiled is not None and launches[1].error is None
        usage = kernel_resources.resources(launches[1].compiled)
        assert usage["REG"] > 0 and usage["LOCAL"] == 0
        print("reported:", launches[0].error)
    """))
    result = subprocess.run([sys.executable, str(script)], env=_environment(), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "reported:" in result.stdout


@pytest.mark.parametrize("registers,warps,expected", [(32, 8, 8), (48, 8, 5), (64, 8, 4), (255, 8, 1),
                                                      (32, 1, 32), (80, 1, 25)])
def test_occupancy_arithmetic(registers, warps, expected):
    """Programs per SM on sm_90 from registers alone (65536 per SM, 256-register units per warp, 64 warps)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        source = TOOL.read_text()
        namespace = {}
        # Only the pure function: importing the tool would take Triton out of interpreter mode for this process.
        exec(compile(re.search(r"SM_LIMITS = \{.*?\n\}\n", source, flags=re.S).group(0)
                     + "RESERVED_SHARED_PER_PROGRAM = 1024\n"
                     + re.search(r"def programs_per_sm\(.*?\n    return [^\n]*\n", source, flags=re.S).group(0),
                     str(TOOL), "exec"), namespace)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert namespace["programs_per_sm"](registers, warps, 0, 90) == expected
