"""RTO vs PPO vs DPPO vs DPO vs SFT on the synthetic task, over several seeds, with equal RL budgets.

    python bench/tiny_rl_comparison.py                       # seeds 1 2 3, two runs at a time, ~5 min on 2 cores
    python bench/tiny_rl_comparison.py --seeds 1 2 3 4 5 --jobs 2 --root runs/tiny_compare

Each seed runs `python -m rto_fast.train --config configs/tiny_compare.yaml runtime.seed=S` (SFT -> DPO -> RM ->
RTO, PPO, DPPO -> eval) into `<root>/seed-S`; a finished seed is not run again (the trainer skips finished stages).
The report aggregates every seed's eval/win_rates.json (true reward r* of each model's samples on the same test
prompts, judge = r*) and the RL stages' evaluations during training (eval_true_reward against prompts seen):
    bench/results/tiny_rl_comparison.md    table: mean +- std over seeds of r*, the DPO and RM scores, lengths,
                                           win rates of RTO against each model; per-seed numbers; the command
    bench/results/tiny_rl_comparison.png   true reward of the policy's samples against prompts seen (RTO, PPO, DPPO)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _env import hardware

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODELS = ("sft", "dpo", "rto", "ppo", "dppo")
RL_MODES = ("rto", "ppo", "dppo")


def run_seeds(config: str, root: Path, seeds: list[int], jobs: int, overrides: list[str]) -> None:
    """Run every seed's pipeline as its own process, `jobs` at a time, one intra-op thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    pending = list(seeds)
    running: list[tuple[int, subprocess.Popen, object]] = []
    failed = []
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            folder = root / f"seed-{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            log = open(folder / "stdout.log", "w")
            command = [sys.executable, "-m", "rto_fast.train", "--config", config, f"runtime.seed={seed}",
                       f"runtime.output_dir={folder}", "runtime.progress_bar=false", *overrides]
            print(f"seed {seed}: {' '.join(command[1:])}", flush=True)
            running.append((seed, subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                            log))
        time.sleep(2)
        for item in list(running):
            seed, process, log = item
            if process.poll() is not None:
                log.close()
                running.remove(item)
                print(f"seed {seed}: exit {process.returncode}", flush=True)
                if process.returncode != 0:
                    failed.append(seed)
    if failed:
        raise SystemExit(f"seeds {failed} failed; see {root}/seed-N/stdout.log")


def load_seed(folder: Path) -> dict:
    result = json.loads((folder / "eval" / "win_rates.json").read_text())
    samples = [json.loads(line) for line in (folder / "eval" / "samples.jsonl").read_text(encoding="utf-8").split("\n")
               if line]
    curves = {}
    for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").split("\n"):
        if not line:
            continue
        record = json.loads(line)
        if record.get("stage") in RL_MODES and "eval_true_reward" in record:
            curves.setdefault(record["stage"], []).append((record["prompts_seen"], record["eval_true_reward"]))
    return {"eval": result, "curves": curves, "samples": samples}


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman's correlation)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a, b) -> float:
    return float(np.corrcoef(_ranks(np.asarray(a, float)), _ranks(np.asarray(b, float)))[0, 1])


def proxy_quality(seeds: list[int], runs: dict[int, dict]) -> list[str]:
    """How well the DPO implicit reward and the RM score track r* on each model's samples, pooled over seeds."""
    lines = ["How well each proxy tracks r* on each model's own samples (pooled over seeds): Spearman correlation "
             "with r*, and the DPO reward per response token (the dense RTO reward's average, beta-scaled):", "",
             "| samples of | Spearman(r*, DPO reward) | Spearman(r*, RM score) | Spearman(length, DPO reward) | "
             "DPO reward per token |", "|---|---|---|---|---|"]
    for name in MODELS:
        rows = [row for seed in seeds for row in runs[seed]["samples"] if row["model"] == name]
        if not rows or "dpo" not in rows[0]["scores"]:
            continue
        truth = [row["scores"]["truth"] for row in rows]
        dpo = [row["scores"]["dpo"] for row in rows]
        lengths = [row["scores"]["length"] for row in rows]
        rm = f"{spearman(truth, [row['scores']['rm'] for row in rows]):.2f}" if "rm" in rows[0]["scores"] else "-"
        lines.append(f"| {name} | {spearman(truth, dpo):.2f} | {rm} | {spearman(lengths, dpo):.2f} | "
                     f"{sum(dpo) / sum(lengths):.3f} |")
    return lines


def _mean_std(values: list[float]) -> str:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 1:
        return f"{values[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def _versions() -> str:
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"


def report(seeds: list[int], runs: dict[int, dict], command: str, wall_s: float | None,
           plot_name: str = "tiny_rl_comparison.png") -> str:
    first = runs[seeds[0]]["eval"]
    models = [name for name in MODELS if name in first["models"]]
    lines = ["# The synthetic task: RTO vs PPO vs DPPO vs DPO vs SFT", "",
             f"Command: `{command}`  ", f"Machine: {hardware('cpu')}; {_versions()}  ",
             f"Seeds: {', '.join(map(str, seeds))}" + (f"; wall time {wall_s / 60:.1f} min" if wall_s else ""), "",
             "Every model samples one response (temperature 0.9, top-p 0.99) for each of the same "
             f"{first['settings'].get('num_prompts', '?')} test prompts; r* is the task's known reward (best "
             "responses score L + 0.5 for a prompt word of L letters, 3 <= L <= 6). The RL stages share one budget "
             "(configs/tiny_compare.yaml: iterations, rollout batch, PPO epochs, learning rates) and see the same "
             "prompts in the same order.", "",
             "| model | true reward r* | DPO implicit reward | RM score | response length | eos fraction |",
             "|---|---|---|---|---|---|"]
    for name in models:
        cells = []
        for key in ("truth", "dpo", "rm", "length", "finished"):
            values = [runs[seed]["eval"]["means"][name].get(key) for seed in seeds]
            cells.append("-" if any(value is None for value in values) else _mean_std(values))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "rto" in models:
        lines += ["", "Win rate of RTO (judge r*, ties count half), mean over seeds:", "",
                  "| against | " + " | ".join(name for name in models if name != "rto") + " |",
                  "|---|" + "---|" * (len(models) - 1)]
        cells = []
        for name in models:
            if name == "rto":
                continue
            values = []
            for seed in seeds:
                result = runs[seed]["eval"]
                order = result["models"]
                values.append(100 * result["matrix"][order.index("rto")][order.index(name)])
            cells.append(f"{np.mean(values):.1f}%")
        lines.append("| RTO wins | " + " | ".join(cells) + " |")
    lines += ["", "Per seed, true reward r*:", "", "| seed | " + " | ".join(models) + " |",
              "|---|" + "---|" * len(models)]
    for seed in seeds:
        means = runs[seed]["eval"]["means"]
        lines.append(f"| {seed} | " + " | ".join(f"{means[name]['truth']:.3f}" for name in models) + " |")
    lines += ["", *proxy_quality(seeds, runs)]
    lines += ["", f"![true reward against prompts seen]({plot_name})", ""]
    return "\n".join(lines)


def plot(seeds: list[int], runs: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    colors = {"rto": "tab:red", "ppo": "tab:blue", "dppo": "tab:green"}
    sft = [runs[seed]["eval"]["means"]["sft"]["truth"] for seed in seeds if "sft" in runs[seed]["eval"]["means"]]
    for mode in RL_MODES:
        per_seed = [dict(runs[seed]["curves"].get(mode, [])) for seed in seeds]
        if not all(per_seed):
            continue
        steps = sorted(set.intersection(*(set(curve) for curve in per_seed)))
        values = np.array([[curve[step] for step in steps] for curve in per_seed])
        xs = [0, *steps] if sft else steps
        mean = values.mean(axis=0)
        mean = np.concatenate([[np.mean(sft)], mean]) if sft else mean
        axis.plot(xs, mean, "o-", color=colors[mode], label=f"{mode.upper()} (mean of {len(seeds)} seeds)",
                  markersize=3)
        if len(seeds) > 1:
            std = values.std(axis=0, ddof=1)
            std = np.concatenate([[np.std(sft, ddof=1)], std]) if sft else std
            axis.fill_between(xs, mean - std, mean + std, color=colors[mode], alpha=0.15)
    axis.set_xlabel("prompts seen in RL")
    axis.set_ylabel("true reward r* of samples (128 test prompts)")
    axis.set_title("Synthetic task: sample efficiency")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_compare.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=2, help="seeds run at the same time")
    parser.add_argument("--root", default="runs/tiny_compare", help="one run folder per seed under this")
    parser.add_argument("--report-only", action="store_true", help="aggregate existing runs, run nothing")
    parser.add_argument("--output", default=str(RESULTS / "tiny_rl_comparison.md"))
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides for every seed")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not root.is_absolute():
        root = ROOT / root
    started = time.perf_counter()
    if not args.report_only:
        run_seeds(args.config, root, args.seeds, args.jobs, args.overrides)
    wall = None if args.report_only else time.perf_counter() - started
    runs = {seed: load_seed(root / f"seed-{seed}") for seed in args.seeds}
    output = Path(args.output)
    named_output = [] if output == Path(parser.get_default("output")) else ["--output", args.output]
    command = "python bench/tiny_rl_comparison.py " + " ".join(
        ["--seeds", *map(str, args.seeds), "--jobs", str(args.jobs), *named_output, *args.overrides])
    output.parent.mkdir(parents=True, exist_ok=True)
    text = report(args.seeds, runs, command.strip(), wall, output.with_suffix(".png").name)
    output.write_text(text, encoding="utf-8")
    plot(args.seeds, runs, output.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
