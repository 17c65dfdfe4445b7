"""What the benchmark reports say about the machine they ran on, and how they are written."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def hardware(device: str) -> str:
    """'GPU: <name>' for cuda, else 'CPU: <model>, <N> cores visible'."""
    if device == "cuda":
        import torch

        return f"GPU: {torch.cuda.get_device_name()}"
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores visible"


def write_report(lines: list[str], output) -> None:
    """Write a Markdown report (creating its folder) and print it."""
    from pathlib import Path

    text = "\n".join(lines)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    print(text)


def copy_bandwidth_gbs(device: str) -> float:
    """Measured device copy bandwidth (bytes read + written per second, GB/s; best of 10 copies of 256 MiB): the
    ceiling for memory-bound kernels."""
    import time

    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    source = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    sync()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        target.copy_(source)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * source.numel() / min(times) / 1e9
