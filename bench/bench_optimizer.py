"""One AdamW step of a Pythia-shaped model's parameters, for each way rto_fast can train them (`model.bf16_optimizer`).

    python bench/bench_optimizer.py --device cpu                       # pythia-70m-shaped, a few seconds
    python bench/bench_optimizer.py --device cuda --model pythia-410m

Rows: float32 weights with torch's fused AdamW; bf16 weights with pure bf16 AdamW (torch's fused, round-to-nearest),
with float32 master weights (`MasterWeightAdamW`), and with stochastic rounding (`StochasticRoundingAdamW`: the
Triton kernel on CUDA, and its torch path). Per row: median step time, optimizer memory (states, masters) per
parameter, and the bytes per parameter the step must at least move (its memory-traffic floor) against the measured
copy bandwidth on CUDA. Writes bench/results/optimizer_<device>.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import copy_bandwidth_gbs, hardware, write_report  # noqa: E402

# Pythia shapes (GPT-NeoX): hidden, layers, vocabulary; MLP 4 x hidden. "tiny" is for smoke tests.
SHAPES = {"tiny": (64, 2, 259), "pythia-70m": (512, 6, 50304), "pythia-410m": (1024, 24, 50304),
          "pythia-1.4b": (2048, 24, 50304)}
# Bytes each step must read and write per parameter (weight, gradient, states, masters), the traffic floor.
TRAFFIC = {"fp32 fused": 4 + 4 + 8 + 4 + 8, "bf16 pure": 2 + 2 + 4 + 2 + 4, "bf16 master weights": 2 + 4 + 8 + 4 + 8 + 2,
           "bf16 stochastic rounding": 2 + 2 + 4 + 2 + 4}


def parameter_shapes(model: str) -> list[tuple]:
    hidden, layers, vocab = SHAPES[model]
    per_layer = [(3 * hidden, hidden), (3 * hidden,), (hidden, hidden), (hidden,), (4 * hidden, hidden), (4 * hidden,),
                 (hidden, 4 * hidden), (hidden,), (hidden,), (hidden,), (hidden,), (hidden,)]
    return [(vocab, hidden), *per_layer * layers, (hidden,), (hidden,), (vocab, hidden)]


def make_parameters(shapes, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    parameters = []
    for shape in shapes:
        parameter = torch.nn.Parameter(torch.randn(shape, generator=generator, device=device).mul_(0.02).to(dtype))
        parameter.grad = torch.randn(shape, generator=generator, device=device).to(dtype)
        parameters.append(parameter)
    return parameters


def optimizers(device: str):
    """(name, dtype, factory, forced backend or None)."""
    from rto_fast.trainer.optim import MasterWeightAdamW, StochasticRoundingAdamW

    options = dict(lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
    rows = [("fp32 fused", torch.float32, lambda p: torch.optim.AdamW(p, fused=True, **options), None),
            ("bf16 pure", torch.bfloat16, lambda p: torch.optim.AdamW(p, fused=True, **options), None),
            ("bf16 master weights", torch.bfloat16, lambda p: MasterWeightAdamW(p, **options), None)]
    if device == "cuda":
        rows.append(("bf16 stochastic rounding", torch.bfloat16, lambda p: StochasticRoundingAdamW(p, **options),
                     None))
        rows.append(("bf16 stochastic rounding (torch path)", torch.bfloat16,
                     lambda p: StochasticRoundingAdamW(p, **options), "torch"))
    else:
        rows.append(("bf16 stochastic rounding", torch.bfloat16, lambda p: StochasticRoundingAdamW(p, **options),
                     None))
    return rows


def state_bytes(optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        total += sum(value.numel() * value.element_size() for value in state.values()
                     if isinstance(value, torch.Tensor) and value.dim() > 0)
    masters = getattr(optimizer, "model_parameters", None)
    if masters is not None:  # MasterWeightAdamW: float32 copies of the low-precision parameters
        total += sum(m.numel() * m.element_size() for p, m in zip(masters, optimizer.param_groups[0]["params"])
                     if m is not p)
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=tuple(SHAPES), default=None, help="default: pythia-70m (cpu), "
                                                                             "pythia-410m (cuda)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    device = args.device
    model = args.model or ("pythia-410m" if device == "cuda" else "pythia-70m")
    shapes = parameter_shapes(model)
    count = sum(torch.Size(shape).numel() for shape in shapes)
    bandwidth = copy_bandwidth_gbs(device) if device == "cuda" else None

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    results = []
    for name, dtype, factory, backend in optimizers(device):
        if backend:
            os.environ["RTO_FAST_BACKEND"] = backend
        try:
            parameters = make_parameters(shapes, dtype, device)
            optimizer = factory(parameters)
            optimizer.step()  # states allocated, kernels compiled
            sync()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                optimizer.step()
                sync()
                times.append(time.perf_counter() - start)
            results.append((name, statistics.median(times), state_bytes(optimizer) / count))
            del parameters, optimizer
        finally:
            os.environ.pop("RTO_FAST_BACKEND", None)
        if device == "cuda":
            torch.cuda.empty_cache()

    import triton

    command = " ".join(["python bench/bench_optimizer.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"# One AdamW step, {model}-shaped parameters ({device})", "",
             f"Command: `{command}`", "",
             f"Hardware: {hardware(device)}; torch {torch.__version__}, triton {triton.__version__}, "
             f"Python {platform.python_version()}" + (f"; {torch.get_num_threads()} threads" if device == "cpu" else "")
             + (f"; measured copy bandwidth {bandwidth:.0f} GB/s" if bandwidth else ""), "",
             f"{count / 1e6:.0f} M parameters in {len(shapes)} tensors (embeddings, 12 tensors per layer, output layer), "
             f"lr 1e-5; median of {args.repeats} steps after one. Traffic floor: the bytes per parameter a step must "
             "read and write at least.", "",
             "| optimizer | step ms | ns per parameter | optimizer state bytes per parameter | traffic floor bytes per "
             "parameter |" + (" floor at copy bandwidth ms |" if bandwidth else ""),
             "|---|---|---|---|---|" + ("---|" if bandwidth else "")]
    for name, seconds, state in results:
        floor = TRAFFIC.get(name.replace(" (torch path)", ""))
        row = f"| {name} | {seconds * 1e3:.1f} | {seconds / count * 1e9:.2f} | {state:.0f} | {floor} |"
        if bandwidth:
            row += f" {floor * count / (bandwidth * 1e9) * 1e3:.2f} |"
        lines.append(row)
    write_report(lines, args.output or ROOT / "results" / f"optimizer_{device}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
