"""The package installs as DESIGN.md lays it out: kernels under rto_fast.kernels, the C++ extension as rto_fast._C."""

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_subpackages_import():
    kernels = importlib.import_module("rto_fast.kernels")
    assert Path(kernels.__file__).parent.name == "kernels"
    extension = importlib.import_module("rto_fast._C")
    assert callable(extension.gae)
    ops = importlib.import_module("rto_fast.ops")
    for name in ("token_logprobs", "linear_token_logprobs", "token_rewards", "token_rewards_from_logits", "gae",
                 "ppo_loss", "gae_ppo_loss"):
        assert callable(getattr(ops, name)), name


def test_no_top_level_kernels_package_outside_the_source_tree():
    # The Hub package `kernels` is imported by transformers when present: ours must never shadow it.
    code = "import importlib.util, sys; spec = importlib.util.find_spec('kernels'); " \
           "print(spec.origin if spec else 'none')"
    origin = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                            check=True).stdout.strip()
    assert not origin.startswith(str(ROOT)), f"a top-level `kernels` resolves to the project: {origin}"


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    """`pip install .` installs what this wheel holds: rto_fast.kernels, rto_fast._C, and no top-level kernels."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("rto_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rto_fast/kernels/__init__.py" in names
    assert "rto_fast/reference.py" in names
    assert any(name.startswith("rto_fast/_C") and name.endswith(".so") for name in names)
    assert not any(name.startswith("kernels/") for name in names)
