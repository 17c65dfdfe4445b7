"""Every method on one config over seeds, with equal RL budgets: SFT, DPO, PPO, DPPO, RTO, RTO + RM score, and two
oracle bounds; the paper's sample-efficiency figure and its Figure 3 (the DPO reward of the samples over training).

    python bench/rl_comparison.py --config configs/credit_compare.yaml --seeds 1 2 3 4 5 --jobs 2 \\
        --output bench/results/credit_comparison
    python bench/rl_comparison.py --config configs/tiny_compare.yaml --seeds 1 2 3 --output bench/results/x
    python bench/rl_comparison.py --config configs/credit_compare.yaml --seeds 1 --output /tmp/c rl.iterations=1

Per seed S, under <root>/seed-S (root: --root, default runs/<config name>), each part a `python -m rto_fast.train`
run of the config with runtime.seed=S and the key=value overrides given here:
- base/: the config's stages before RL (sft, pairs, dpo, rm), then `python -m rto_fast.diagnose` on them;
- rto/, ppo/, dppo/: that stage alone, from the base's models (model.sft_path, dpo_path, reward_path);
- rto_rm/: RTO plus the reward model's score on the last token (rl.reward_model=true, the official code's reward);
- oracle_dense/: RTO's loop with the true per-token r* as the dense reward (rl.true_reward=dense);
- oracle_sparse/: r* of the response on the last token, PPO's loop (rl.true_reward=sparse); both oracles use RTO's
  KL coefficient, so they differ only in where the same reward is given;
- rto_1_8/ ... ppo_1_2/: RTO and PPO on the first 1/8, 1/4, 1/2 of the training prompts (data.max_train_samples)
  with the same passes over them (rl.epochs; so a fraction of the iterations), unless --fractions is empty;
- extra variants (`--variant NAME STAGES KEY=VALUE ...`, e.g. the remedies `--variant rto_kl0.1 rto rl.kl_coef=0.1`):
  STAGES (comma-separated) from the base's models with those overrides; a value may name a number of the seed's
  diagnostics report in braces (`rl.dpo_clip={recommended_dpo_clip}`); a variant that trains its own DPO or RM
  model (STAGES with dpo or rm) trains it on the base's pairs, and its RL stage uses it;
- eval/: the eval stage over all of them (named folders), judge r*, the config's eval settings.
Finished parts are skipped (the trainer skips finished stages), so a rerun only adds what is missing. Seeds run
`--jobs` at a time, each part with one intra-op thread.

Writes OUTPUT.md (tables, targets, plots), OUTPUT.json = {"seeds": {"S": {model: mean r*}}} for the models sft, dpo,
ppo, dppo, rto, rto_rm, oracle_dense, oracle_sparse, OUTPUT_details.json (everything the report reads), and the
figures OUTPUT_curves.png, OUTPUT_sample_efficiency.png, OUTPUT_dpo_reward.png.
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
import yaml
from _env import hardware

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("sft", "dpo", "ppo", "dppo", "rto", "rto_rm", "oracle_dense", "oracle_sparse")
# name -> (the RL stage it runs, overrides on top of the config)
VARIANTS = {
    "rto": ("rto", []),
    "ppo": ("ppo", []),
    "dppo": ("dppo", []),
    "rto_rm": ("rto", ["rl.reward_model=true"]),
    "oracle_dense": ("rto", ["rl.true_reward=dense"]),
    "oracle_sparse": ("ppo", ["rl.true_reward=sparse"]),
}
RL_STAGES = ("rto", "ppo", "dppo")
PRE_RL_STAGES = ("sft", "pairs", "dpo", "rm")
CURVE_COLORS = {"rto": "tab:red", "ppo": "tab:blue", "dppo": "tab:green", "rto_rm": "tab:purple",
                "oracle_dense": "black", "oracle_sparse": "tab:gray"}
RTO_KL_COEF = 0.03  # the paper's RTO value (PAPER_KL_COEF), the oracles' KL when rl.kl_coef is null


def fraction_name(method: str, fraction: int) -> str:
    return f"{method}_1_{fraction}"


# ------------------------------------------------------------------------------------------------ running

def train(folder: Path, config: str, seed: int, overrides: list[str], extra: list[str]) -> None:
    """One `python -m rto_fast.train` run into `folder` (its output in folder/stdout.log); SystemExit on failure."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "rto_fast.train", "--config", config, f"runtime.seed={seed}",
               f"runtime.output_dir={folder}", "runtime.progress_bar=false", *overrides, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(folder / "stdout.log", "a", encoding="utf-8") as log:
        log.write("$ " + " ".join(command[1:]) + "\n")
        log.flush()
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{folder}: exit {code}; see {folder / 'stdout.log'}")


def diagnose(folder: Path, config: str, seed: int, overrides: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "rto_fast.diagnose", "--config", config, "--num-prompts", "256",
               f"runtime.seed={seed}", f"runtime.output_dir={folder}", *overrides]
    with open(folder / "diagnose.log", "w", encoding="utf-8") as log:
        subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)


def training_prompts(config: str, overrides: list[str], folder: Path) -> int:
    """How many RL training prompts the config gives (the fractions' data.max_train_samples are shares of it)."""
    sys.path.insert(0, str(ROOT))
    from rto_fast.trainer import data
    from rto_fast.trainer.config_file import load_config
    from rto_fast.trainer.models import build_tokenizer
    from rto_fast.trainer.pipeline import prompt_data_config

    settings = load_config(config, overrides)
    tokenizer = build_tokenizer(settings.model.tokenizer or settings.model.name_or_path)
    prompts, _ = data.load_prompt_splits(prompt_data_config(settings), tokenizer, cache_dir=folder / "data")
    return len(prompts)


def extra_variant(folder: Path, base: Path, paths: list[str], spec: list[str]) -> tuple[str, list[str], str]:
    """(name, train overrides, the RL stage whose model it evaluates) of a --variant NAME STAGES KEY=VALUE ...
    entry, its {placeholders} filled from the base's diagnostics."""
    name, stages, *settings = spec
    stages = stages.split(",")
    report = json.loads((base / "diagnose" / "report.json").read_text())
    settings = [setting.format(**{key: value for key, value in report.items() if not isinstance(value, dict)})
                for setting in settings]
    own = [stage for stage in stages if stage in ("dpo", "rm")]
    if own:  # its own DPO / RM model, trained on the base's pairs, is the one its RL stage uses
        if (base / "pairs").is_dir() and not (folder / name / "pairs").exists():
            (folder / name).mkdir(parents=True, exist_ok=True)
            (folder / name / "pairs").symlink_to(base / "pairs", target_is_directory=True)
        keys = {"dpo": "model.dpo_path", "rm": "model.reward_path"}
        paths = [path for path in paths if path.split("=")[0] not in {keys[stage] for stage in own}]
    rl_stage = next(stage for stage in reversed(stages) if stage in RL_STAGES)
    return name, [f"stages=[{','.join(stages)}]", *paths, *settings], rl_stage


def run_seed(config: str, root: Path, seed: int, overrides: list[str], fractions: list[int],
             variants: list[list[str]] = ()) -> None:
    """Every part of one seed, in order (see the module docstring)."""
    folder = root / f"seed-{seed}"
    started = time.perf_counter()
    stages = yaml.safe_load(Path(ROOT / config).read_text() if not Path(config).is_absolute()
                            else Path(config).read_text()).get("stages", [])
    base_stages = [stage for stage in stages if stage in PRE_RL_STAGES]
    base = folder / "base"
    train(base, config, seed, overrides, [f"stages=[{','.join(base_stages)}]"])
    diagnose(base, config, seed, overrides)
    paths = [f"model.sft_path={base / 'sft' / 'model'}", f"model.dpo_path={base / 'dpo' / 'model'}"]
    if (base / "rm" / "model").is_dir():
        paths.append(f"model.reward_path={base / 'rm' / 'model'}")
    settings = yaml.safe_load((base / "config.yaml").read_text())
    kl = settings["rl"]["kl_coef"] if settings["rl"]["kl_coef"] is not None else RTO_KL_COEF
    models = {"sft": base / "sft" / "model", "dpo": base / "dpo" / "model"}
    for name, (stage, variant) in VARIANTS.items():
        extra = [f"rl.kl_coef={kl}"] if name.startswith("oracle") else []
        train(folder / name, config, seed, overrides, [f"stages=[{stage}]", *paths, *variant, *extra])
        models[name] = folder / name / stage / "model"
    for spec in variants:
        name, extra, stage = extra_variant(folder, base, paths, spec)
        train(folder / name, config, seed, overrides, extra)
        models[name] = folder / name / stage / "model"
    if fractions:
        total = training_prompts(config, overrides, base)
        for method in ("rto", "ppo"):
            for fraction in fractions:
                name = fraction_name(method, fraction)
                train(folder / name, config, seed, overrides,
                      [f"stages=[{method}]", *paths, f"data.max_train_samples={max(1, total // fraction)}"])
                models[name] = folder / name / method / "model"
    listed = ",".join(f"{name}={path}" for name, path in models.items())
    train(folder / "eval", config, seed, overrides, ["stages=[eval]", *paths, f"eval.models=[{listed}]",
                                                     "eval.judge=truth"])
    (folder / "timing.json").write_text(json.dumps({"seconds": time.perf_counter() - started}) + "\n")


def run_seeds(args, root: Path) -> None:
    """Each seed as its own process (this script with --seed-job), `jobs` at a time."""
    pending, running, failed = list(args.seeds), [], []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            command = [sys.executable, __file__, "--seed-job", str(seed), "--config", args.config, "--root", str(root),
                       *(item for spec in args.variant for item in ("--variant", *spec)),
                       "--fractions", *map(str, args.fractions), "--", *args.overrides]
            print(f"seed {seed}: started", flush=True)
            running.append((seed, subprocess.Popen(command, cwd=ROOT)))
        time.sleep(2)
        for item in list(running):
            seed, process = item
            if process.poll() is not None:
                running.remove(item)
                print(f"seed {seed}: exit {process.returncode}", flush=True)
                if process.returncode:
                    failed.append(seed)
    if failed:
        raise SystemExit(f"seeds {failed} failed; see {root}/seed-N/*/stdout.log")


# ------------------------------------------------------------------------------------------------ reading

def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def load_seed(folder: Path) -> dict:
    """What the report reads from one seed's folder."""
    result = json.loads((folder / "eval" / "eval" / "win_rates.json").read_text())
    curves, dpo_rewards = {}, {}
    for name, (stage, _) in VARIANTS.items():
        for record in _records(folder / name / "metrics.jsonl"):
            if record.get("stage") != stage:
                continue
            if "eval_true_reward" in record:
                # The evaluation before the first iteration (step 0) has seen no prompts.
                curves.setdefault(name, []).append((record.get("prompts_seen", 0), record["eval_true_reward"]))
            if "dpo_reward" in record:
                dpo_rewards.setdefault(name, []).append((record["step"], record["dpo_reward"]))
    diagnosis_path = folder / "base" / "diagnose" / "report.json"
    timing = folder / "timing.json"
    return {"eval": result, "curves": curves, "dpo_rewards": dpo_rewards,
            "diagnose": json.loads(diagnosis_path.read_text()) if diagnosis_path.is_file() else None,
            "seconds": json.loads(timing.read_text())["seconds"] if timing.is_file() else None,
            "pairs": (json.loads((folder / "base" / "pairs" / "pairs.json").read_text())
                      if (folder / "base" / "pairs" / "pairs.json").is_file() else None)}


# ------------------------------------------------------------------------------------------------ the report

def _mean_std(values) -> str:
    values = np.asarray([value for value in values if value is not None], dtype=np.float64)
    if values.size == 0:
        return "-"
    if values.size == 1:
        return f"{values[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def _versions() -> str:
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"


def true_means(runs: dict, seeds: list[int], name: str) -> list[float]:
    return [runs[seed]["eval"]["means"][name]["truth"] for seed in seeds if name in runs[seed]["eval"]["means"]]


def targets(runs: dict, seeds: list[int], fractions: list[int]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the targets the paper's theory predicts."""
    names = [*MODELS, *(fraction_name(method, fraction) for method in ("rto", "ppo") for fraction in fractions)]
    mean = {name: float(np.mean(true_means(runs, seeds, name))) for name in names if true_means(runs, seeds, name)}
    rows = []
    if {"rto", "dppo"} <= mean.keys():
        rows.append(("RTO > DPPO (mean r*)", f"{mean['rto']:.2f} vs {mean['dppo']:.2f}", mean["rto"] > mean["dppo"]))
    if {"rto", "ppo"} <= mean.keys():
        rows.append(("RTO >= PPO (mean r*)", f"{mean['rto']:.2f} vs {mean['ppo']:.2f}", mean["rto"] >= mean["ppo"]))
    if {"rto", "oracle_dense", "sft"} <= mean.keys():
        oracle_gain = mean["oracle_dense"] - mean["sft"]
        share = (f"; {100 * (mean['rto'] - mean['sft']) / oracle_gain:.0f}% of the oracle's gain over SFT"
                 if oracle_gain > 0 else "")
        rows.append(("RTO within 15% of oracle_dense (r*(RTO) >= 0.85 r*(oracle))",
                     f"{mean['rto']:.2f} vs {mean['oracle_dense']:.2f}{share}",
                     mean["rto"] >= 0.85 * mean["oracle_dense"]))
    smallest = max(fractions) if fractions else None
    name = fraction_name("rto", smallest) if smallest else None
    if name and name in mean and "ppo" in mean:
        rows.append((f"RTO on 1/{smallest} of the prompts >= PPO on all", f"{mean[name]:.2f} vs {mean['ppo']:.2f}",
                     mean[name] >= mean["ppo"]))
    if {"oracle_dense", "oracle_sparse"} <= mean.keys():
        rows.append(("dense r* >= sparse r* (the premise: token credit matters here)",
                     f"{mean['oracle_dense']:.2f} vs {mean['oracle_sparse']:.2f}",
                     mean["oracle_dense"] >= mean["oracle_sparse"]))
    return rows


def report(args, runs: dict, wall_s: float | None, output: Path) -> str:
    seeds = args.seeds
    first = runs[seeds[0]]["eval"]
    names = first["models"]
    models = [name for name in MODELS if name in names]
    settings = first["settings"]
    seconds = [runs[seed]["seconds"] for seed in seeds if runs[seed]["seconds"]]
    command = " ".join(["python bench/rl_comparison.py --config", args.config, "--seeds", *map(str, seeds), "--jobs",
                        str(args.jobs), "--output", args.output,
                        *(" ".join(["--variant", *spec]) for spec in args.variant),
                        *(["--fractions", *map(str, args.fractions)] if args.fractions != [8, 4, 2] else []),
                        *args.overrides])
    lines = [f"# Method comparison on `{args.config}`", "", f"Command: `{command}`  ",
             f"Machine: {hardware('cpu')}; {_versions()}  ",
             f"Seeds: {', '.join(map(str, seeds))}" + (f"; wall time {wall_s / 60:.1f} min" if wall_s else "")
             + (f"; per seed {np.mean(seconds) / 60:.1f} min of one core on average" if seconds else ""), "",
             f"Every model samples one response (temperature {settings['temperature']}, top-p {settings['top_p']}) "
             f"to each of the same {settings['num_prompts']} test prompts with the same random numbers; the judge is "
             "the task's true reward r*. The RL runs share one budget (the config's rl section) and see the same "
             "prompts in the same order; the oracles use RTO's KL coefficient.", "",
             "## Mean true reward r* (mean ± std over seeds)", "",
             "| model | r* | DPO implicit reward | RM score | length | eos fraction |", "|---|---|---|---|---|---|"]
    for name in models:
        cells = [_mean_std([runs[seed]["eval"]["means"][name].get(key) for seed in seeds])
                 for key in ("truth", "dpo", "rm", "length", "finished")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed:", "", "| seed | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for seed in seeds:
        means = runs[seed]["eval"]["means"]
        lines.append(f"| {seed} | " + " | ".join(f"{means[name]['truth']:.2f}" for name in models) + " |")
    lines += ["", "## Win rates judged by r* (row against column, %, mean over seeds; ties count half)", "",
              "| model | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for a in models:
        cells = []
        for b in models:
            if a == b:
                cells.append("-")
                continue
            values = [runs[seed]["eval"]["win_rates"][a][b] for seed in seeds]
            cells.append(f"{100 * np.mean(values):.1f}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", "## The targets the paper predicts", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {target} | {measured} | {'yes' if met else 'no'} |" for target, measured, met in
              targets(runs, seeds, args.fractions)]
    if args.variant:
        lines += ["", "## Extra variants (remedies), against RTO as configured", "",
                  "| variant | stages and overrides | r* | length | win rate against rto |", "|---|---|---|---|---|"]
        for name, stages, *settings in args.variant:
            if name not in names:
                continue
            wins = _mean_std([100 * runs[seed]["eval"]["win_rates"][name]["rto"] for seed in seeds])
            lines.append(f"| {name} | {stages} {' '.join(settings)} | {_mean_std(true_means(runs, seeds, name))} | "
                         f"{_mean_std([runs[seed]['eval']['means'][name]['length'] for seed in seeds])} | {wins}% |")
    if args.fractions:
        lines += ["", "## Sample efficiency: RTO and PPO on a share of the training prompts (same passes over them)",
                  "", "| prompts | " + " | ".join(["RTO r*", "PPO r*"]) + " |", "|---|---|---|"]
        for fraction in [*sorted(args.fractions, reverse=True), 1]:
            cells = []
            for method in ("rto", "ppo"):
                name = method if fraction == 1 else fraction_name(method, fraction)
                cells.append(_mean_std(true_means(runs, seeds, name)))
            lines.append(f"| {'all' if fraction == 1 else f'1/{fraction}'} | " + " | ".join(cells) + " |")
    diagnoses = [runs[seed]["diagnose"] for seed in seeds if runs[seed]["diagnose"]]
    if diagnoses:
        def pick(path):
            values = []
            for diagnosis in diagnoses:
                value = diagnosis
                for key in path.split("."):
                    value = value.get(key) if isinstance(value, dict) else None
                values.append(value)
            return _mean_std(values)

        lines += ["", "## Reward diagnostics before RL (`python -m rto_fast.diagnose` on each seed's models)", "",
                  "| measure | mean ± std over seeds |", "|---|---|",
                  f"| DPO held-out accuracy | {pick('held_out.dpo_accuracy')} |",
                  f"| RM held-out accuracy | {pick('held_out.rm_accuracy')} |",
                  f"| labels' agreement with r* (ceiling) | {pick('held_out.label_agreement_with_truth')} |",
                  f"| per-token Pearson(d, r* term) | {pick('agreement.token_pearson_dpo_truth')} |",
                  f"| Spearman(summed d, r*) / Spearman(RM, r*) | {pick('agreement.spearman_dpo_truth')} / "
                  f"{pick('agreement.spearman_rm_truth')} |",
                  f"| dense reward per token: mean / std | {pick('samples.dense_mean')} / "
                  f"{pick('samples.dense_std')} |",
                  f"| r* of the SFT samples / of the tilted optimum (exponent beta1/beta2) | "
                  f"{pick('samples.true_reward')} / {pick('drift.true_reward')} |",
                  f"| recommended rl.dpo_clip | {pick('recommended_dpo_clip')} |"]
    stem = output.name
    lines += ["", "## Figures", "", f"![true reward during RL]({stem}_curves.png)", "",
              *([f"![sample efficiency]({stem}_sample_efficiency.png)", ""] if args.fractions else []),
              f"![DPO reward of the samples]({stem}_dpo_reward.png)", ""]
    return "\n".join(lines)


def _mean_curve(per_seed: list[list[tuple]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    curves = [dict(curve) for curve in per_seed if curve]
    steps = sorted(set.intersection(*(set(curve) for curve in curves))) if curves else []
    values = np.array([[curve[step] for step in steps] for curve in curves]) if steps else np.zeros((0, 0))
    if not steps:
        return np.array([]), np.array([]), np.array([])
    std = values.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(steps))
    return np.asarray(steps, dtype=float), values.mean(axis=0), std


def plots(args, runs: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = args.seeds
    sft = true_means(runs, seeds, "sft")
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name in VARIANTS:
        xs, mean, std = _mean_curve([runs[seed]["curves"].get(name, []) for seed in seeds])
        if not xs.size:
            continue
        axis.plot(xs, mean, "o-", markersize=3, color=CURVE_COLORS[name], label=name)
        axis.fill_between(xs, mean - std, mean + std, color=CURVE_COLORS[name], alpha=0.12)
    if sft:
        axis.axhline(np.mean(sft), color="tab:orange", linestyle="--", label="SFT")
    axis.set(xlabel="prompts seen in RL", ylabel="r* of samples (eval prompts during RL)",
             title=f"True reward during RL (mean ± std, {len(seeds)} seeds)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output.with_name(output.name + "_curves.png"), dpi=100)
    plt.close(figure)

    if args.fractions:
        _sample_efficiency_plot(args, runs, output, sft)
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for name in ("rto", "dppo"):
        xs, mean, std = _mean_curve([runs[seed]["dpo_rewards"].get(name, []) for seed in seeds])
        if xs.size:
            axis.plot(xs, mean, color=CURVE_COLORS[name], label=name.upper())
            axis.fill_between(xs, mean - std, mean + std, color=CURVE_COLORS[name], alpha=0.15)
    axis.set(xlabel="RL iteration", ylabel="DPO implicit reward of the samples (beta1 * sum log ratio)",
             title="The paper's Figure 3: RTO vs DPPO")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(output.with_name(output.name + "_dpo_reward.png"), dpi=100)
    plt.close(figure)


def _sample_efficiency_plot(args, runs: dict, output: Path, sft: list) -> None:
    import matplotlib.pyplot as plt

    seeds = args.seeds
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for method in ("rto", "ppo"):
        curve = runs[seeds[0]]["curves"].get(method, [])
        total = curve[-1][0] if curve else 1
        xs, means, stds = [], [], []
        for fraction in [*sorted(args.fractions, reverse=True), 1]:
            name = method if fraction == 1 else fraction_name(method, fraction)
            values = true_means(runs, seeds, name)
            if values:
                xs.append(total / fraction)
                means.append(np.mean(values))
                stds.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
        if xs:
            axis.errorbar(xs, means, yerr=stds, marker="o", capsize=3, color=CURVE_COLORS[method],
                          label=f"{method.upper()} trained on that many prompts")
    if sft:
        axis.axhline(np.mean(sft), color="tab:orange", linestyle="--", label="SFT")
    axis.set_xscale("log", base=2)
    axis.set(xlabel="prompts seen in RL (1/8, 1/4, 1/2, all of the prompts; same passes)",
             ylabel="r* of the final model (eval stage)", title="Sample efficiency")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output.with_name(output.name + "_sample_efficiency.png"), dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--jobs", type=int, default=2, help="seeds run at the same time")
    parser.add_argument("--root", help="one folder per seed under this (default runs/<config name>)")
    parser.add_argument("--output", help="report path without suffix: OUTPUT.md, OUTPUT.json, ... (required)")
    parser.add_argument("--fractions", type=int, nargs="*", default=[8, 4, 2],
                        help="sample-efficiency runs on 1/F of the prompts (none: skip them)")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME STAGES KEY=VALUE",
                        help="an extra variant: its name, its stages (comma-separated), its overrides")
    parser.add_argument("--report-only", action="store_true", help="aggregate existing runs, run nothing")
    parser.add_argument("--seed-job", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args(argv)
    root = Path(args.root) if args.root else ROOT / "runs" / Path(args.config).stem
    root = root if root.is_absolute() else ROOT / root
    if args.seed_job is not None:
        run_seed(args.config, root, args.seed_job, args.overrides, args.fractions, args.variant)
        return 0
    if not args.output:
        parser.error("--output is required")
    started = time.perf_counter()
    if not args.report_only:
        run_seeds(args, root)
    wall = None if args.report_only else time.perf_counter() - started
    runs = {seed: load_seed(root / f"seed-{seed}") for seed in args.seeds}
    output = Path(args.output)
    output = output if output.is_absolute() else ROOT / output
    output.parent.mkdir(parents=True, exist_ok=True)
    table = {"seeds": {str(seed): {name: runs[seed]["eval"]["means"][name]["truth"] for name in MODELS
                                   if name in runs[seed]["eval"]["means"]} for seed in args.seeds}}
    output.with_name(output.name + ".json").write_text(json.dumps(table, indent=1) + "\n")
    output.with_name(output.name + "_details.json").write_text(json.dumps(
        {"config": args.config, "overrides": args.overrides, "fractions": args.fractions, "wall_s": wall,
         "seeds": {str(seed): runs[seed] for seed in args.seeds}}, indent=1) + "\n")
    plots(args, runs, output)
    text = report(args, runs, wall, output)
    output.with_name(output.name + ".md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
