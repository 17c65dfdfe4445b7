"""Scoring sampled responses on packed streams: log-probs, critic values and reward-model scores.

Usage:
    sequences = [response_sequence(prompt_ids, response_ids), ...]
    batches = build_micro_batches(sequences, max_tokens=4096)            # rto_fast.packing
    logprobs = packed_logprobs(policy, batch)          # (1, N) float32 log-prob of each response token, 0 elsewhere
    values = packed_values(critic, batch)              # (1, N) float32 value at each position (ValueHeadModel)
    scores = last_token_scores(reward_model, batch)    # (S,) float32 reward read at each sequence's last token
    judged = sequence_judge_scores(batches, reward_model=rm)   # (len(sequences),) in input order

Alignment (rto_fast.packing): position t of a packed stream holds the log-prob of token t+1 when that token is a
response token (`batch.response_mask[t]`), and the critic's value at t is the value of the state that predicts it, so
log-probs, values, rewards and advantages all live on `batch.response_mask`, which is the mask the `rto_fast.ops`
functions take (with `cu_seqlens = batch.cu_seqlens`). A reward model reads its score at a sequence's last token
(the eos token when the response has one). These functions do not switch autograd off: call them under
`torch.inference_mode()` for frozen models.
"""

from __future__ import annotations

import torch

from .attention import packed_forward
from .models import forward_parameters
from .packing import PackedBatch, TokenizedSequence, sequence_sums, to_input_order


def response_sequence(prompt_ids, response_ids) -> TokenizedSequence:
    """prompt + response, with log-probs (label_mask) on the response tokens only."""
    prompt_ids, response_ids = list(prompt_ids), list(response_ids)
    return TokenizedSequence(prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids))


def packed_logprobs(model, batch: PackedBatch, *, return_entropy: bool = False, inplace_backward: bool = False):
    """(1, N) float32 log-prob of each response token under `model` (0 off the response), or (logprobs, entropy).

    Logits are computed only where a label is (`batch.response_mask`): the model's output layer never runs on prompt
    positions when its forward takes a `logits_to_keep` index (transformers' causal LMs do), which saves that share
    of the (N, V) logits, their memory and the output matmul forward and backward. They go through the fused
    `rto_fast.ops.token_logprobs`, so no float32 log-softmax is built either; `inplace_backward` lets its backward
    overwrite the logits with their gradient when they require one."""
    from .ops import token_logprobs

    positions = _label_positions(model, batch)
    if positions is None:
        logits = packed_forward(model, batch).logits
        labels = batch.labels
    else:
        logits = packed_forward(model, batch, logits_to_keep=positions).logits  # (1, K, V)
        labels = batch.labels[:, positions]
    result = token_logprobs(logits, labels, return_entropy=return_entropy,
                            inplace_backward=inplace_backward and logits.requires_grad)
    if positions is None:
        return result
    # Back onto the stream: (1, K) -> (1, N), zeros off the labels (index_copy keeps the gradient).
    spread = [value.new_zeros(batch.labels.shape).index_copy(1, positions, value)
              for value in (result if return_entropy else (result,))]
    return tuple(spread) if return_entropy else spread[0]


def _label_positions(model, batch: PackedBatch) -> torch.Tensor | None:
    """Indices of the stream positions that carry a label, or None when the whole stream's logits are needed (the
    model cannot select positions, or every position has a label)."""
    if "logits_to_keep" not in forward_parameters(model):
        return None
    mask = batch.response_mask[0]
    positions = mask.nonzero().squeeze(1)
    if positions.numel() in (0, mask.numel()):
        return None
    return positions.to(batch.input_ids.device)


def packed_values(value_model, batch: PackedBatch) -> torch.Tensor:
    """(1, N) float32 scalar head output at every position of the stream."""
    return packed_forward(value_model, batch)


def last_token_scores(reward_model, batch: PackedBatch) -> torch.Tensor:
    """(S,) float32 reward-model output at each packed sequence's last token, in packed order."""
    values = packed_values(reward_model, batch)
    last = batch.cu_seqlens[1:].long().to(values.device) - 1
    return values[0, last]


def implicit_dpo_rewards(dpo_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, batch: PackedBatch,
                         beta: float) -> torch.Tensor:
    """(S,) float32 DPO implicit reward beta * sum_h (log pi_dpo - log pi_ref) over each response, packed order."""
    return beta * sequence_sums(dpo_logprobs - ref_logprobs, batch)


@torch.inference_mode()
def sequence_judge_scores(batches: list[PackedBatch], *, reward_model=None, dpo_model=None, ref_model=None,
                          beta: float = 0.1, num_sequences: int | None = None) -> torch.Tensor:
    """One judge score per sequence, in the input order of the sequences that were packed into `batches`: the reward
    model's last-token score when `reward_model` is given, else the DPO implicit reward of (dpo_model, ref_model)."""
    if reward_model is None and (dpo_model is None or ref_model is None):
        raise ValueError("a judge needs reward_model, or both dpo_model and ref_model")
    per_batch = []
    for batch in batches:
        if reward_model is not None:
            per_batch.append(last_token_scores(reward_model, batch).float().cpu())
        else:
            dpo = packed_logprobs(dpo_model, batch)
            ref = packed_logprobs(ref_model, batch)
            per_batch.append(implicit_dpo_rewards(dpo, ref, batch, beta).cpu())
    return to_input_order([batch.to("cpu") for batch in batches], per_batch, num_sequences)
