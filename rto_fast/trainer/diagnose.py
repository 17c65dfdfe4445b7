"""Reward diagnostics to read before spending GPU hours on RTO: is the DPO model's token reward one RL can climb?

Usage:
    python -m rto_fast.diagnose --config configs/credit.yaml              # after the run's sft, (pairs,) dpo, (rm)
    python -m rto_fast.diagnose --config my.yaml model.dpo_path=dpo model.ref_path=sft --num-prompts 128
    python -m rto_fast.diagnose --help

It reads what the trainer would read for the RL stage (the same config and run folder): the reference (model.ref_path,
else the SFT model), the DPO model (model.dpo_path, else the run's dpo stage), the reward model when there is one,
the preference data the DPO model learned from (the pairs stage's when it ran), the test prompts, and beta1 / beta2 /
the clip from `rl.dpo_coef`, `rl.kl_coef` (null: RTO's 0.03) and `rl.dpo_clip`. It writes
`<runtime.output_dir>/diagnose/` (or `--output`): report.md, report.json and diagnose.png.

What it measures, on `--num-prompts` test prompts answered by the reference (where RL starts, sampled as RL
samples: `rl.temperature`, `rl.max_new_tokens`), with the dense reward d_h = beta1 * log(pi_dpo / pi_ref) per token:
- d_h's mean (the offset every token gets: negative when DPO lowered the likelihood of what the reference writes)
  and standard deviation, and the correlation of a response's summed d with its length;
- the reward of tokens outside the preference data's support (token ids that occur in no response of the training
  pairs): on the sampled tokens that are out of support, and at every sampled position the best out-of-support
  token against the best in-support one (what a policy could learn to exploit);
- held-out sequence accuracy on the test pairs: the DPO implicit reward (and the reward model) ranking chosen
  above rejected, beside the labels' own agreement with r* on a bundled task (the ceiling);
- rank correlations (Spearman) of the sampled responses' summed d with the reward model's score and with r*, and the
  per-token Pearson correlation of d with r*'s token terms (bundled tasks);
- the predicted drift: the KL-regularised optimum of the dense reward is pi_ref * (pi_dpo / pi_ref)^(beta1 / beta2);
  responses sampled token by token from that tilted distribution (a per-token approximation of the sequence-level
  optimum) show where RTO is headed: their KL from the reference, length, out-of-support share, RM score and r*;
  the same for exponents 0.5, 1 (the DPO model) and 2, so the report shows whether a larger rl.kl_coef (a smaller
  exponent) leads somewhere better;
- a recommended `rl.dpo_clip`: the 95th percentile of |d| over the tokens of the held-out preference responses (the
  tokens DPO's reward was trained on), so that no token can earn more than the preference data's tokens earn.
The report ends with findings: each check that points at a problem, with the remedies the field knows.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from matplotlib.figure import Figure

from ..tasks import Task, prompt_task, token_true_rewards
from .attention import packed_forward
from .cli import UsageError, device_for, load_examples, load_prompts
from .config import ConfigError
from .config_file import load_config
from .data import PreferenceExample
from .generation import Rollout, SamplingSettings, generate
from .layout import PAIRS_DIR
from .models import ValueHeadModel, build_tokenizer, load_causal_lm
from .packing import build_micro_batches, pack, sequence_ids, to_input_order
from .pairs import SPLIT_FILES, SUMMARY_FILE, read_pairs
from .pipeline import Wiring
from .scoring import last_token_scores, response_sequence

logger = logging.getLogger("rto_fast.diagnose")

REPORT_DIR = "diagnose"
CLIP_QUANTILE = 0.95
# Exponents of pi_ref^(1 - a) * pi_dpo^a sampled besides beta1 / beta2: between the reference and the DPO model, the
# DPO model itself, and twice as far.
SCAN_EXPONENTS = (0.5, 1.0, 2.0)
MICRO_BATCH_TOKENS = 8192


# ------------------------------------------------------------------------------------------------ statistics

def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    rank = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        stop = start + 1
        while stop < len(values) and sorted_values[stop] == sorted_values[start]:
            stop += 1
        rank[order[start:stop]] = 0.5 * (start + stop - 1) + 1.0
        start = stop
    return rank


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x, y) -> float:
    return pearson(ranks(np.asarray(x, dtype=np.float64)), ranks(np.asarray(y, dtype=np.float64)))


# ------------------------------------------------------------------------------------------------ token rewards

@dataclass
class TokenRewards:
    """Per response (lists in input order): the dense reward of each sampled token, whether each token is in the
    preference data's support, and at each position the best reward an in-support / out-of-support token would get
    (nan when that set is empty)."""

    dense: list[np.ndarray]
    in_support: list[np.ndarray]
    best_in_support: list[np.ndarray]
    best_out_of_support: list[np.ndarray]


@torch.inference_mode()
def token_rewards(ref_model, dpo_model, sequences: list, dpo_coef: float, support: torch.Tensor) -> TokenRewards:
    """Dense DPO rewards of the response tokens of `sequences` (TokenizedSequences), with the whole vocabulary's
    rewards at each position reduced to the best in-support and out-of-support ones. `support`: (V,) bool."""
    device = next(ref_model.parameters()).device
    batches = build_micro_batches(sequences, MICRO_BATCH_TOKENS)
    per_batch = {name: [] for name in ("dense", "in_support", "best_in", "best_out")}
    support = support.to(device)
    for batch in batches:
        batch = batch.to(device)
        positions = batch.label_positions
        labels = batch.labels[0, positions]
        log_ratio = (torch.log_softmax(packed_forward(dpo_model, batch, logits_to_keep=positions).logits[0].float(), -1)
                     - torch.log_softmax(packed_forward(ref_model, batch, logits_to_keep=positions).logits[0].float(),
                                         -1))
        vocabulary = log_ratio.shape[-1]
        in_support = support[:vocabulary] if support.numel() >= vocabulary else torch.cat(
            [support, support.new_zeros(vocabulary - support.numel())])
        dense_all = dpo_coef * log_ratio  # (K, V)
        per_batch["dense"].append(dense_all.gather(1, labels[:, None])[:, 0])
        per_batch["in_support"].append(in_support[labels])
        nan = torch.tensor(float("nan"), device=device)
        per_batch["best_in"].append(dense_all[:, in_support].amax(1) if in_support.any()
                                    else nan.expand(len(positions)))
        per_batch["best_out"].append(dense_all[:, ~in_support].amax(1) if (~in_support).any()
                                     else nan.expand(len(positions)))
    results = {name: [None] * len(sequences) for name in per_batch}
    for index, batch in enumerate(batches):
        owner = sequence_ids(batch)[batch.label_positions]  # packed sequence of each label position
        for name in per_batch:
            values = per_batch[name][index].cpu()
            for packed, original in enumerate(batch.sequence_index.tolist()):
                results[name][original] = values[owner == packed].numpy()
    return TokenRewards(results["dense"], results["in_support"], results["best_in"], results["best_out"])


@torch.inference_mode()
def sequence_scores(model, sequences: list) -> np.ndarray:
    """A reward model's last-token score per sequence, in input order."""
    device = next(model.parameters()).device
    batches = build_micro_batches(sequences, MICRO_BATCH_TOKENS)
    scores = [last_token_scores(model, batch.to(device)).float().cpu() for batch in batches]
    return to_input_order(batches, scores, len(sequences)).double().numpy()


@torch.inference_mode()
def sample_tilted(ref_model, dpo_model, prompts: list[list[int]], exponent: float, max_new_tokens: int,
                  eos_token_id: int, temperature: float = 1.0) -> tuple[list[Rollout], np.ndarray]:
    """Responses sampled token by token from pi_ref^(1 - a) * pi_dpo^a (renormalised at each position, a =
    `exponent`), with each response's summed log(pi_tilted / pi_ref) of its tokens (a one-sample estimate of the
    KL from the reference). Uses the global RNG."""
    device = next(ref_model.parameters()).device
    responses = [[] for _ in prompts]
    log_ratio = np.zeros(len(prompts))
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        if not active:
            break
        batch = pack([response_sequence(prompts[i], responses[i] + [eos_token_id]) for i in active]).to(device)
        last = batch.cu_seqlens[1:].long() - 2  # the position that predicts the next token of each sequence
        ref_logp = torch.log_softmax(packed_forward(ref_model, batch, logits_to_keep=last).logits[0].float(), -1)
        dpo_logp = torch.log_softmax(packed_forward(dpo_model, batch, logits_to_keep=last).logits[0].float(), -1)
        tilted = torch.log_softmax((1.0 - exponent) * ref_logp + exponent * dpo_logp, -1)
        sampling = torch.log_softmax(tilted / temperature, -1) if temperature != 1.0 else tilted
        tokens = torch.multinomial(sampling.exp(), 1)[:, 0]
        chosen_ratio = (tilted - ref_logp).gather(1, tokens[:, None])[:, 0].cpu().numpy()
        order = batch.sequence_index.tolist()
        still = []
        for row, packed_index in enumerate(order):
            index = active[packed_index]
            token = int(tokens[row])
            responses[index].append(token)
            log_ratio[index] += float(chosen_ratio[row])
            if token != eos_token_id:
                still.append(index)
        active = sorted(still)
    rollouts = [Rollout(list(prompt), response, bool(response) and response[-1] == eos_token_id)
                for prompt, response in zip(prompts, responses)]
    return rollouts, log_ratio


# ------------------------------------------------------------------------------------------------ inputs

@dataclass
class Inputs:
    config: object
    run_dir: Path
    device: torch.device
    tokenizer: object
    paths: dict
    train_pairs: list
    test_pairs: list
    prompts: list  # PromptExample
    task: Task | None
    dpo_coef: float  # beta1
    kl_coef: float  # beta2


def gather_inputs(config) -> Inputs:
    """Models, data and coefficients as the RL stage would see them; ValueError naming what is missing."""
    run_dir = Path(config.runtime.output_dir)
    wiring = Wiring(config, run_dir)
    try:
        device = device_for(config.runtime.device)
        tokenizer = build_tokenizer(config.model.tokenizer or config.model.name_or_path)
        dpo, reward, reference = wiring.output("dpo"), wiring.output("rm"), wiring.judge_reference()
        if dpo is None:
            raise ValueError(f"no DPO model: set model.dpo_path or run the dpo stage in {run_dir}")
        if reference is None:
            raise ValueError(f"no reference: set model.ref_path (or model.sft_path) or run the sft stage in "
                             f"{run_dir}")
        if (run_dir / PAIRS_DIR / SUMMARY_FILE).is_file():
            train_pairs = read_pairs(run_dir / PAIRS_DIR / SPLIT_FILES["train"])
            test_pairs = read_pairs(run_dir / PAIRS_DIR / SPLIT_FILES["test"])
        else:
            train_pairs, test_pairs = load_examples(config, tokenizer, run_dir)
        _, prompts = load_prompts(config, tokenizer, run_dir)
    except UsageError as error:
        raise ValueError(str(error)) from None
    if not prompts:
        raise ValueError("no test prompts (data.test_split / rl.prompts)")
    return Inputs(config, run_dir, device, tokenizer, {"reference": str(reference), "dpo": str(dpo),
                                                       "reward": None if reward is None else str(reward)},
                  train_pairs, test_pairs, prompts, prompt_task(config), config.rl.dpo_coef,
                  config.rl.kl_coef_for("rto"))


def support_of(pairs: list[PreferenceExample], vocabulary: int) -> torch.Tensor:
    """(V,) bool: the token ids that occur in some response of `pairs`."""
    support = torch.zeros(vocabulary, dtype=torch.bool)
    for pair in pairs:
        for response in (pair.chosen_ids, pair.rejected_ids):
            support[torch.as_tensor(response, dtype=torch.long)] = True
    return support


# ------------------------------------------------------------------------------------------------ the report

def _mean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if values.size else float("nan")


@dataclass
class Judged:
    """The models the report reads, and the support of the preference data."""

    reference: torch.nn.Module
    dpo: torch.nn.Module
    reward: torch.nn.Module | None
    support: torch.Tensor  # (V,) bool
    vocabulary: int


def diagnose(inputs: Inputs, num_prompts: int, seed: int = 0) -> tuple[dict, dict]:
    """(report, arrays): the numbers of the module docstring, and the per-token / per-response arrays the plots
    draw."""
    config, tokenizer, device = inputs.config, inputs.tokenizer, inputs.device
    dtype = config.model.dtype
    reference = load_causal_lm(inputs.paths["reference"], dtype=dtype, trainable=False, tokenizer=tokenizer).to(device)
    vocabulary = reference.get_output_embeddings().weight.shape[0]
    models = Judged(reference,
                    load_causal_lm(inputs.paths["dpo"], dtype=dtype, trainable=False, tokenizer=tokenizer).to(device),
                    (ValueHeadModel.from_pretrained(inputs.paths["reward"], dtype=dtype, trainable=False).to(device)
                     if inputs.paths["reward"] else None),
                    support_of(inputs.train_pairs, max(vocabulary, len(tokenizer))), int(vocabulary))
    prompts = inputs.prompts[:num_prompts]
    rl = config.rl
    max_new = rl.max_new_tokens or config.data.max_response_length
    torch.manual_seed(seed)
    samples = generate(reference, [prompt.prompt_ids for prompt in prompts],
                       SamplingSettings(max_new_tokens=max_new, temperature=rl.temperature, top_p=rl.top_p,
                                        top_k=rl.top_k), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    report, arrays = _on_samples(inputs, models, prompts, samples)
    report.update({"models": inputs.paths, "dpo_coef": inputs.dpo_coef, "kl_coef": inputs.kl_coef,
                   "dpo_clip": rl.dpo_clip})
    report["held_out"] = _held_out(inputs, models, report, arrays)
    # Where the KL-regularised optimum of the dense reward lies: at beta1 / beta2, and for comparison between the
    # reference and the DPO model (exponent < 1), at the DPO model (1) and beyond it (2).
    exponent = inputs.dpo_coef / inputs.kl_coef
    scan = []
    for index, value in enumerate(sorted({*SCAN_EXPONENTS, exponent})):
        torch.manual_seed(seed + 1 + index)
        scan.append(drift_of(models, prompts, value, max_new, rl.temperature, inputs.task, tokenizer))
    report["drift"] = next(entry for entry in scan if entry["exponent"] == exponent)
    report["drift_scan"] = scan
    report["findings"] = findings(report)
    return report, arrays


def _on_samples(inputs: Inputs, models: Judged, prompts: list, samples: list) -> tuple[dict, dict]:
    """The dense reward on the reference's samples: its statistics, its support, its agreement with the judges."""
    tokenizer = inputs.tokenizer
    sequences = [response_sequence(rollout.prompt_ids, rollout.response_ids) for rollout in samples]
    tokens = token_rewards(models.reference, models.dpo, sequences, inputs.dpo_coef, models.support)
    dense_all = np.concatenate(tokens.dense)
    in_support_all = np.concatenate(tokens.in_support).astype(bool)
    sequence_dense = np.asarray([values.sum() for values in tokens.dense])
    lengths = np.asarray([len(rollout.response_ids) for rollout in samples], dtype=np.float64)
    best_in = np.concatenate(tokens.best_in_support)
    best_out = np.concatenate(tokens.best_out_of_support)
    out_values = dense_all[~in_support_all]
    report: dict = {
        "prompts": len(prompts), "support_tokens": int(models.support.sum()), "vocabulary": models.vocabulary,
        "samples": {
            "response_length": _mean(lengths), "eos_fraction": _mean([rollout.finished for rollout in samples]),
            "dense_mean": _mean(dense_all), "dense_std": float(dense_all.std()) if dense_all.size else float("nan"),
            "dense_positive_fraction": _mean(dense_all > 0), "sequence_dense_mean": _mean(sequence_dense),
            "length_correlation": pearson(sequence_dense, lengths),
        },
        "out_of_support": {
            "token_fraction": _mean(~in_support_all), "tokens": int((~in_support_all).sum()),
            "dense_mean": _mean(out_values), "dense_positive_fraction": _mean(out_values > 0),
            "best_out_mean": _mean(best_out[np.isfinite(best_out)]),
            "best_in_mean": _mean(best_in[np.isfinite(best_in)]),
            "positions_out_beats_in": _mean((best_out > best_in)[np.isfinite(best_out) & np.isfinite(best_in)]),
        },
    }
    arrays = {"dense": dense_all, "in_support": in_support_all, "sequence_dense": sequence_dense, "lengths": lengths,
              "per_position": tokens.dense}
    agreement: dict = {}
    if models.reward is not None:
        arrays["rm"] = sequence_scores(models.reward, sequences)
        agreement["spearman_dpo_rm"] = spearman(sequence_dense, arrays["rm"])
    if inputs.task is not None:
        true_tokens = [np.asarray(token_true_rewards(inputs.task, prompt.prompt, rollout.response_ids,
                                                     rollout.finished, tokenizer))
                       for prompt, rollout in zip(prompts, samples)]
        truth = np.asarray([values.sum() for values in true_tokens])
        agreement["spearman_dpo_truth"] = spearman(sequence_dense, truth)
        agreement["token_pearson_dpo_truth"] = pearson(dense_all, np.concatenate(true_tokens))
        if models.reward is not None:
            agreement["spearman_rm_truth"] = spearman(arrays["rm"], truth)
        report["samples"]["true_reward"] = _mean(truth)
        arrays["truth"] = truth
        arrays["true_per_position"] = true_tokens
    report["agreement"] = agreement
    return report, arrays


def _held_out(inputs: Inputs, models: Judged, report: dict, arrays: dict) -> dict:
    """Accuracy on the held-out pairs (DPO, RM, and the labels' own agreement with r*), and the recommended clip
    (written into `report`)."""
    tokenizer = inputs.tokenizer
    pair_sequences = [response_sequence(pair.prompt_ids, response) for pair in inputs.test_pairs
                      for response in (pair.chosen_ids, pair.rejected_ids)]
    held_out: dict = {"pairs": len(inputs.test_pairs)}
    if not pair_sequences:
        return held_out
    pair_tokens = token_rewards(models.reference, models.dpo, pair_sequences, inputs.dpo_coef, models.support)
    implicit = np.asarray([values.sum() for values in pair_tokens.dense])
    held_out["dpo_accuracy"] = _mean(implicit[0::2] > implicit[1::2])
    report["recommended_dpo_clip"] = float(np.quantile(np.abs(np.concatenate(pair_tokens.dense)), CLIP_QUANTILE))
    report["samples"]["beyond_recommended_clip"] = _mean(np.abs(arrays["dense"]) > report["recommended_dpo_clip"])
    if models.reward is not None:
        rm_pairs = sequence_scores(models.reward, pair_sequences)
        held_out["rm_accuracy"] = _mean(rm_pairs[0::2] > rm_pairs[1::2])
    if inputs.task is not None:
        truths = np.asarray([sum(token_true_rewards(inputs.task, tokenizer.decode(pair.prompt_ids,
                                                                                  skip_special_tokens=True),
                                                    response, bool(response) and
                                                    response[-1] == tokenizer.eos_token_id, tokenizer))
                             for pair in inputs.test_pairs for response in (pair.chosen_ids, pair.rejected_ids)])
        held_out["label_agreement_with_truth"] = _mean(truths[0::2] > truths[1::2])
        held_out["dpo_agreement_with_truth"] = _mean((implicit[0::2] > implicit[1::2]) ==
                                                     (truths[0::2] > truths[1::2]))
    return held_out


def drift_of(models: Judged, prompts: list, exponent: float, max_new_tokens: int, temperature: float,
             task: Task | None, tokenizer) -> dict:
    """What responses sampled from pi_ref^(1 - a) * pi_dpo^a (a = `exponent`) look like."""
    tilted, tilted_kl = sample_tilted(models.reference, models.dpo, [prompt.prompt_ids for prompt in prompts],
                                      exponent, max_new_tokens, tokenizer.eos_token_id, temperature)
    tokens = np.concatenate([np.asarray(rollout.response_ids, dtype=np.int64) for rollout in tilted])
    drift = {"exponent": exponent, "kl_from_reference": _mean(tilted_kl),
             "response_length": _mean([len(rollout.response_ids) for rollout in tilted]),
             "eos_fraction": _mean([rollout.finished for rollout in tilted]),
             "out_of_support_fraction": _mean(~models.support[torch.as_tensor(tokens)].numpy()) if tokens.size
             else float("nan")}
    if models.reward is not None:
        drift["rm_score"] = _mean(sequence_scores(models.reward, [response_sequence(rollout.prompt_ids,
                                                                                     rollout.response_ids)
                                                                   for rollout in tilted]))
    if task is not None:
        drift["true_reward"] = _mean([sum(token_true_rewards(task, prompt.prompt, rollout.response_ids,
                                                             rollout.finished, tokenizer))
                                      for prompt, rollout in zip(prompts, tilted)])
    return drift


def findings(report: dict) -> list[str]:
    """One line per check that points at a problem, with what the field tries against it."""
    lines = []
    samples, out, held, drift = report["samples"], report["out_of_support"], report["held_out"], report["drift"]
    if samples["dense_std"] and abs(samples["dense_mean"]) > samples["dense_std"]:
        lines.append(f"Offset: the mean token reward {samples['dense_mean']:+.3f} is larger than its spread "
                     f"{samples['dense_std']:.3f}: every token pays (or earns) about the same, so the reward mostly "
                     "says 'be shorter' (or longer). Try centring the dense reward or an SFT term in the DPO loss.")
    if abs(samples["length_correlation"]) > 0.3:
        lines.append(f"Length: the summed dense reward correlates with response length "
                     f"({samples['length_correlation']:+.2f}): RTO will move the length. Watch eos fraction and "
                     "length during RL; a larger rl.kl_coef or rl.dpo_clip limits it.")
    if out["tokens"] and out["dense_positive_fraction"] > 0.5:
        lines.append(f"Out of support: {100 * out['token_fraction']:.1f}% of sampled tokens never occur in the "
                     f"preference data and {100 * out['dense_positive_fraction']:.0f}% of them get a positive reward "
                     f"(mean {out['dense_mean']:+.3f}): RL can climb rewards DPO never learned. Use rl.dpo_clip.")
    if math.isfinite(out["positions_out_beats_in"]) and out["positions_out_beats_in"] > 0.1:
        lines.append(f"Exploitable: at {100 * out['positions_out_beats_in']:.0f}% of positions an out-of-support "
                     "token earns more than any in-support one.")
    if held.get("dpo_accuracy", 1.0) < 0.6:
        lines.append(f"Weak DPO model: held-out accuracy {100 * held['dpo_accuracy']:.1f}%. Tune DPO on held-out "
                     "accuracy (lr, epochs, beta) before RL.")
    if drift["exponent"] > 1.0:
        lines.append(f"Extrapolation: beta1 / beta2 = {drift['exponent']:.3g} puts the optimum of the dense reward "
                     "beyond the DPO model (exponent 1), where the log-ratio was never trained: RTO then amplifies "
                     f"the DPO model's errors. rl.kl_coef >= rl.dpo_coef ({report['dpo_coef']:g}) keeps it between the "
                     "reference and the DPO model (see the scan).")
    if "true_reward" in drift and "true_reward" in samples and drift["true_reward"] < samples["true_reward"]:
        lines.append(f"Drift: sampling the KL-regularised optimum pi_ref * (pi_dpo / pi_ref)^{drift['exponent']:.2g} "
                     f"gives r* {drift['true_reward']:.2f}, below the reference's {samples['true_reward']:.2f}: "
                     "with these coefficients the dense reward leads away from the truth. Raise rl.kl_coef (beta2) "
                     "or clip the dense reward.")
    clip = report.get("recommended_dpo_clip")
    if clip is not None and samples.get("beyond_recommended_clip", 0.0) > 0.05:
        lines.append(f"Clip: {100 * samples['beyond_recommended_clip']:.0f}% of sampled tokens get |reward| above "
                     f"{clip:.3g}, the 95th percentile on the preference data's tokens: rl.dpo_clip={clip:.3g} "
                     "bounds them.")
    return lines


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict, elapsed: float) -> str:
    samples, out, held, agreement, drift = (report["samples"], report["out_of_support"], report["held_out"],
                                            report["agreement"], report["drift"])
    percent = lambda value: "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"  # noqa
    lines = ["# Reward diagnostics", "",
             f"Reference `{report['models']['reference']}`, DPO model `{report['models']['dpo']}`, reward model "
             f"`{report['models']['reward']}`; beta1 (rl.dpo_coef) {report['dpo_coef']}, beta2 (rl.kl_coef) "
             f"{report['kl_coef']}, rl.dpo_clip "
             f"{report['dpo_clip']}. {report['prompts']} test prompts answered by the reference; "
             f"{report['support_tokens']} of {report['vocabulary']} token ids occur in the preference responses. "
             f"{elapsed:.0f} s.", "", "## Findings", ""]
    lines += [f"- {line}" for line in report["findings"]] or ["- none: no check points at a problem."]
    lines += ["", "## Dense token reward d = beta1 * log(pi_dpo / pi_ref) on the reference's samples", "",
              "| measure | value |", "|---|---|",
              f"| mean per token (offset) | {_number(samples['dense_mean'])} |",
              f"| std per token | {_number(samples['dense_std'])} |",
              f"| tokens with d > 0 | {percent(samples['dense_positive_fraction'])} |",
              f"| mean summed d per response | {_number(samples['sequence_dense_mean'])} |",
              f"| Pearson(summed d, length) | {_number(samples['length_correlation'], 2)} |",
              f"| mean length / eos fraction | {_number(samples['response_length'], 1)} / "
              f"{percent(samples['eos_fraction'])} |"]
    if "true_reward" in samples:
        lines.append(f"| mean r* | {_number(samples['true_reward'])} |")
    lines += ["", "## Outside the preference data's support", "", "| measure | value |", "|---|---|",
              f"| sampled tokens out of support | {out['tokens']} ({percent(out['token_fraction'])}) |",
              f"| their mean d / share with d > 0 | {_number(out['dense_mean'])} / "
              f"{percent(out['dense_positive_fraction'])} |",
              f"| best in-support token's d, mean over positions | {_number(out['best_in_mean'])} |",
              f"| best out-of-support token's d, mean over positions | {_number(out['best_out_mean'])} |",
              f"| positions where an out-of-support token earns most | {percent(out['positions_out_beats_in'])} |",
              "", "## Held-out preference pairs", "", "| measure | value |", "|---|---|",
              f"| pairs | {held['pairs']} |",
              f"| DPO implicit reward ranks chosen first | {percent(held.get('dpo_accuracy'))} |",
              f"| reward model ranks chosen first | {percent(held.get('rm_accuracy'))} |",
              f"| labels agree with r* (the ceiling) | {percent(held.get('label_agreement_with_truth'))} |",
              f"| DPO agrees with r*'s order | {percent(held.get('dpo_agreement_with_truth'))} |",
              "", "## Agreement on the samples", "", "| measure | value |", "|---|---|",
              f"| Spearman(summed d, RM score) | {_number(agreement.get('spearman_dpo_rm'), 2)} |",
              f"| Spearman(summed d, r*) | {_number(agreement.get('spearman_dpo_truth'), 2)} |",
              f"| Spearman(RM score, r*) | {_number(agreement.get('spearman_rm_truth'), 2)} |",
              f"| Pearson(d, r* token terms), per token | {_number(agreement.get('token_pearson_dpo_truth'), 2)} |",
              "", "## Predicted drift: pi_ref^(1 - a) * pi_dpo^a, sampled token by token",
              "", f"RTO's KL-regularised optimum is at a = beta1 / beta2 = {drift['exponent']:.3g} (marked); a = 1 is "
              "the DPO model, a < 1 lies between it and the reference (a larger rl.kl_coef).", "",
              "| a | KL from the reference | length | eos fraction | out of support | RM score | r* |",
              "|---|---|---|---|---|---|---|"]
    for entry in report.get("drift_scan", [drift]):
        mark = " (beta1/beta2)" if entry["exponent"] == drift["exponent"] else ""
        lines.append(f"| {entry['exponent']:.3g}{mark} | {_number(entry['kl_from_reference'])} | "
                     f"{_number(entry['response_length'], 1)} | {percent(entry['eos_fraction'])} | "
                     f"{percent(entry['out_of_support_fraction'])} | {_number(entry.get('rm_score'))} | "
                     f"{_number(entry.get('true_reward'))} |")
    lines.append(f"| 0 (the reference) | 0 | {_number(samples['response_length'], 1)} | "
                 f"{percent(samples['eos_fraction'])} | {percent(report['out_of_support']['token_fraction'])} | "
                 f"- | {_number(samples.get('true_reward'))} |")
    clip = report.get("recommended_dpo_clip")
    lines += ["", "## Recommended rl.dpo_clip", "",
              f"{_number(clip, 4)}: the {int(100 * CLIP_QUANTILE)}th percentile of |d| on the held-out preference "
              f"responses' tokens; {percent(samples.get('beyond_recommended_clip'))} of the sampled tokens exceed it."
              if clip is not None else "No held-out pairs: no recommendation.", "", "![diagnostics](diagnose.png)",
              ""]
    return "\n".join(lines)


def plot(arrays: dict, path: Path) -> Path:
    figure = Figure(figsize=(11, 8))
    axes = figure.subplots(2, 2)
    dense, in_support = arrays["dense"], arrays["in_support"]
    bins = np.linspace(np.percentile(dense, 0.5), np.percentile(dense, 99.5), 50) if dense.size else 10
    axes[0, 0].hist(dense[in_support], bins=bins, alpha=0.7, label="in support")
    if (~in_support).any():
        axes[0, 0].hist(dense[~in_support], bins=bins, alpha=0.7, label="out of support")
    axes[0, 0].set(title="token reward d on the reference's samples", xlabel="d", ylabel="tokens")
    axes[0, 0].legend()
    width = max((len(values) for values in arrays["per_position"]), default=0)

    def by_position(per_response):
        sums, counts = np.zeros(width), np.zeros(width)
        for values in per_response:
            sums[:len(values)] += values
            counts[:len(values)] += 1
        return sums / np.maximum(counts, 1)

    positions = np.arange(1, width + 1)
    axes[0, 1].plot(positions, by_position(arrays["per_position"]), marker=".", label="mean d")
    if "true_per_position" in arrays:
        axes[0, 1].plot(positions, by_position(arrays["true_per_position"]), marker=".", label="mean r* term")
    axes[0, 1].set(title="by response position", xlabel="position (token)")
    axes[0, 1].legend()
    other = "truth" if "truth" in arrays else "rm" if "rm" in arrays else None
    if other:
        axes[1, 0].scatter(arrays[other], arrays["sequence_dense"], s=8, alpha=0.6)
        axes[1, 0].set(title=f"summed d against {'r*' if other == 'truth' else 'the RM score'}",
                       xlabel="r*" if other == "truth" else "RM score", ylabel="summed d")
    else:
        axes[1, 0].set_axis_off()
    axes[1, 1].scatter(arrays["lengths"], arrays["sequence_dense"], s=8, alpha=0.6)
    axes[1, 1].set(title="summed d against length", xlabel="response tokens", ylabel="summed d")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return path


def _json_ready(value):
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(report: dict, arrays: dict, folder: Path, elapsed: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    plot(arrays, folder / "diagnose.png")
    (folder / "report.json").write_text(json.dumps(_json_ready(report), indent=1) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(markdown(report, elapsed), encoding="utf-8")
    return folder / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rto_fast.diagnose", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="the run's YAML config (as for python -m rto_fast.train)")
    parser.add_argument("--output", help="report folder (default: <runtime.output_dir>/diagnose)")
    parser.add_argument("--num-prompts", type=int, default=256, help="test prompts the reference answers")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.num_prompts <= 0:
        print("rto_fast.diagnose: error: --num-prompts must be > 0", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, args.overrides)
        inputs = gather_inputs(config)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"rto_fast.diagnose: error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    if inputs.device.type == "cpu":
        torch.set_num_threads(1)
    report, arrays = diagnose(inputs, args.num_prompts, args.seed)
    folder = Path(args.output) if args.output else inputs.run_dir / REPORT_DIR
    path = write_report(report, arrays, folder, time.perf_counter() - started)
    print(path.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
