"""The trainer computes bitwise what it computed when the fingerprints were recorded.

`tests/fingerprint/pipeline.yaml` runs every stage (SFT, DPO, RM, RTO, PPO, DPPO, eval) of the letters task, and
`tests/fingerprint/credit.yaml` the credit task's pipeline (SFT, pairs, DPO, RM, RTO, eval), for a few steps on CPU
with a fixed seed; the SHA-256 of every tensor of every stage's output model, and the eval stage's sampled
responses, must equal `tests/fingerprint/<name>.json`. Refactors of the trainer keep this test green; an intended
change of the math re-records them (`python tests/test_fingerprint.py --record`) and says why in its commit.

Float results depend on the torch build and the CPU's instruction set (the C++ row kernels' AVX2 and AVX-512 copies
use FMA, the baseline copy does not), so each file keeps one record per environment and the comparison runs where
one matches; elsewhere the test is skipped with the reason. `--record` replaces this machine's record and keeps the
others: after an intended change of the math, records of environments not re-recorded must be deleted by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent / "fingerprint"
NAMES = ("pipeline", "credit")


def environment() -> dict:
    from rto_fast import _C

    return {"torch": torch.__version__, "cpu_isa": _C.cpu_isa(), "threads": 1}


def fingerprint(run_dir: Path) -> dict:
    """SHA-256 per output tensor (stage outputs only, not checkpoints) and of the eval samples."""
    hashes = {}
    for path in sorted(run_dir.rglob("*.safetensors")):
        relative = path.relative_to(run_dir).as_posix()
        if "checkpoints" in relative:
            continue
        with safe_open(str(path), "pt") as handle:
            for name in sorted(handle.keys()):
                tensor = handle.get_tensor(name).contiguous()
                digest = hashlib.sha256(str((tensor.dtype, tuple(tensor.shape))).encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
                hashes[f"{relative}:{name}"] = digest.hexdigest()
    samples = (run_dir / "eval" / "samples.jsonl").read_bytes()
    hashes["eval/samples.jsonl"] = hashlib.sha256(samples).hexdigest()
    return hashes


def run_pipeline(name: str, output_dir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "rto_fast.train", "--config", str(HERE / f"{name}.yaml"),
                             f"runtime.output_dir={output_dir}"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_pipeline_weights_match_the_recorded_fingerprint(tmp_path, name):
    records = json.loads((HERE / f"{name}.json").read_text())["records"]
    matching = [record for record in records if record["environment"] == environment()]
    if not matching:
        pytest.skip(f"recorded on {[record['environment'] for record in records]}, this machine is {environment()}")
    run_pipeline(name, tmp_path / "run")
    got = fingerprint(tmp_path / "run")
    expected = matching[0]["hashes"]
    assert got.keys() == expected.keys()
    differing = sorted(name for name in expected if got[name] != expected[name])
    assert not differing, f"{len(differing)} of {len(expected)} tensors differ, e.g. {differing[:5]}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_fingerprint.py --record")
    import tempfile

    for name in NAMES:
        path = HERE / f"{name}.json"
        with tempfile.TemporaryDirectory() as folder:
            run_pipeline(name, Path(folder) / "run")
            record = {"environment": environment(), "hashes": fingerprint(Path(folder) / "run")}
        others = [old for old in json.loads(path.read_text())["records"] if old["environment"] != environment()] \
            if path.exists() else []
        path.write_text(json.dumps({"records": others + [record]}, indent=1, sort_keys=True) + "\n")
        print(f"recorded {path} for {environment()}")
