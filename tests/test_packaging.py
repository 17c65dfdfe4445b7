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


@pytest.mark.parametrize("cwd", [ROOT, Path("/")], ids=["repo-root", "elsewhere"])
def test_no_top_level_kernels_package_outside_the_source_tree(cwd):
    # The Hub package `kernels` is imported by transformers (>= 5.25 requires it): ours must never stand in for it,
    # neither from the repo root (`python -m` puts the working folder first on sys.path) nor from anywhere else.
    code = "import importlib.util; spec = importlib.util.find_spec('kernels'); " \
           "print(spec.origin if spec and spec.origin else (list(spec.submodule_search_locations) if spec else 'none'))"
    origin = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                            check=True).stdout.strip()
    assert str(ROOT) not in origin, f"a top-level `kernels` resolves to the project: {origin}"
    if importlib.util.find_spec("kernels") is not None:  # the Hub package is installed: it is what transformers gets
        subprocess.run([sys.executable, "-c", "import transformers.integrations.hub_kernels"], cwd=cwd, check=True)


def test_checkout_has_no_importable_top_level_names_but_the_package():
    # A regular package or a module at the top of the checkout is importable from the repo root and may shadow an
    # installed package of the same name; folders without __init__.py (bench/, configs/, ...) are at most namespace
    # portions, which any installed regular package of that name wins over.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    top_level = {path.split("/")[0] for path in tracked if path.count("/") == 1 and path.endswith("/__init__.py")}
    top_level |= {path[:-3] for path in tracked if "/" not in path and path.endswith(".py")}
    assert top_level == {"rto_fast", "setup"}, top_level


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    """`pip install .` installs what this wheel holds: rto_fast.kernels, rto_fast._C, and no top-level kernels."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("rto_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rto_fast/kernels/__init__.py" in names
    assert "rto_fast/ops/reference.py" in names
    assert any(name.startswith("rto_fast/_C") and name.endswith(".so") for name in names)
    assert not any(name.startswith("kernels/") for name in names)
