"""Scoring sampled responses on packed streams: log-probs, critic values and reward-model scores.

Usage:
    sequences = [response_sequence(prompt_ids, response_ids), ...]
    batches = build_micro_batches(sequences, max_tokens=4096)            # rto_fast.packing
    logprobs = packed_logprobs(policy, batch)          # (1, N) float32 log-prob of each response token, 0 elsewhere
    logprobs = packed_logprobs(policy, batch, fused_output_layer=True)   # the same, the (N, V) logits never held
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

import logging
import weakref

import torch

from ..ops import linear_token_logprobs, token_logprobs
from .attention import forward_parameters, packed_forward, unwrapped
from .packing import PackedBatch, TokenizedSequence, sequence_sums, to_input_order

logger = logging.getLogger(__name__)


def response_sequence(prompt_ids, response_ids) -> TokenizedSequence:
    """prompt + response, with log-probs (label_mask) on the response tokens only."""
    prompt_ids, response_ids = list(prompt_ids), list(response_ids)
    return TokenizedSequence(prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids))


def packed_logprobs(model, batch: PackedBatch, *, return_entropy: bool = False, inplace_backward: bool = False,
                    fused_output_layer: bool = False):
    """(1, N) float32 log-prob of each response token under `model` (0 off the response), or (logprobs, entropy).

    Logits are computed only where a label is (`batch.response_mask`): the model's output layer never runs on prompt
    positions when its forward takes a `logits_to_keep` index (transformers' causal LMs do), which saves that share
    of the (N, V) logits, their memory and the output matmul forward and backward. They go through the fused
    `rto_fast.ops.token_logprobs`, so no float32 log-softmax is built either; `inplace_backward` lets its backward
    overwrite the logits with their gradient when they require one.

    `fused_output_layer`: the output layer's input goes straight into `rto_fast.ops.linear_token_logprobs`, so the
    (K, V) logits are never held at all (see `fused_output_logprobs`); models it cannot serve take the logits path."""
    positions = _label_positions(model, batch)
    labels = batch.labels if positions is None else batch.labels[:, positions]
    keep = {} if positions is None else {"logits_to_keep": positions}
    result = fused_output_logprobs(model, batch, labels, return_entropy, **keep) if fused_output_layer else None
    if result is None:
        logits = packed_forward(model, batch, **keep).logits  # (1, K, V)
        result = token_logprobs(logits, labels, return_entropy=return_entropy,
                                inplace_backward=inplace_backward and logits.requires_grad)
    if positions is None:
        return result
    # Back onto the stream: (1, K) -> (1, N), zeros off the labels (index_copy keeps the gradient).
    spread = [value.new_zeros(batch.labels.shape).index_copy(1, positions, value)
              for value in (result if return_entropy else (result,))]
    return tuple(spread) if return_entropy else spread[0]


# Output layers the fused path cannot serve, with the reason (logged once per layer).
_UNFUSABLE: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def fused_output_logprobs(model, batch: PackedBatch, labels: torch.Tensor, return_entropy: bool = False,
                          **model_kwargs):
    """Log-probs of `labels` (shaped like the positions the model's output layer sees) computed by
    `ops.linear_token_logprobs` from the output layer's input, or None when `model` cannot be served this way.

    For the length of one forward the output layer (`get_output_embeddings()`, an `nn.Linear`) is given a forward
    that computes the log-probs from its input, weight and bias and returns a stand-in for the logits: a (.., V)
    broadcast view of one row of small integers, no memory. The model must return that stand-in untouched (or only
    cast): a model that scales, soft-caps or offsets its logits after the output layer (Gemma-2's final
    soft-capping, Cohere's logit scale, ...) changes it, is found out on its first call, and is served from its
    logits from then on (one warning). Running inside the model's own forward keeps every wrapper's hooks: a ZeRO-3
    engine gathers the layer's weight for it. Not served: a layer that is not a plain `nn.Linear` or whose forward
    is already replaced (offloading hooks), a model whose forward calls the layer twice or on other positions than
    the labels', and a ZeRO-3 partitioned layer that is being trained (its weight is gathered again for the backward
    only through the layer's own output, which the loss does not use here)."""
    layer = _fusable_output_layer(model)
    if layer is None:
        return None
    call = {}

    def forward(hidden):
        if "stand_in" in call or hidden.shape[:-1].numel() != labels.numel():
            # Called twice, or on other positions than the labels': the layer's own output, and the model is
            # not served this way (below).
            call["unserved"] = "its forward calls the output layer twice or on positions other than the labels'"
            return torch.nn.functional.linear(hidden, layer.weight, layer.bias)
        weight, bias = layer.weight, layer.bias
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):  # what autocast would run the layer's matmul in
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):  # the op's own precision, in forward and backward alike
            call["result"] = linear_token_logprobs(hidden, weight, labels.to(hidden.device).reshape(hidden.shape[:-1]),
                                                   bias=bias, return_entropy=return_entropy)
        row = torch.arange(weight.shape[0], device=hidden.device).remainder_(251).to(hidden.dtype)
        call["row"], call["stand_in"] = row, row.expand(*hidden.shape[:-1], weight.shape[0])
        return call["stand_in"]

    layer.forward = forward
    try:
        logits = packed_forward(model, batch, **model_kwargs).logits
    finally:
        del layer.forward  # back to the class's forward
    if "unserved" in call:
        return _unfusable(layer, call["unserved"])
    if "result" not in call:
        return _unfusable(layer, "its forward never called the output layer")
    stand_in = call["stand_in"]
    untouched = logits is stand_in or (
        logits.shape == stand_in.shape and torch.equal(logits.reshape(-1, logits.shape[-1])[0].to(stand_in.dtype),
                                                       call["row"]))
    if not untouched:
        return _unfusable(layer, "its forward changes the output layer's logits (scaling, soft-capping or an offset)")
    result = call["result"]
    if return_entropy:
        return tuple(value.reshape(labels.shape) for value in result)
    return result.reshape(labels.shape)


def _fusable_output_layer(model) -> torch.nn.Module | None:
    get_output_embeddings = getattr(unwrapped(model), "get_output_embeddings", None)
    layer = get_output_embeddings() if callable(get_output_embeddings) else None
    if layer is None or layer in _UNFUSABLE:
        return None
    if type(layer) is not torch.nn.Linear:
        return _unfusable(layer, f"its output layer is a {type(layer).__name__}, not a torch.nn.Linear")
    if "forward" in vars(layer):
        return _unfusable(layer, "its output layer's forward is already replaced (offloading or adapter hooks)")
    if hasattr(layer.weight, "ds_status") and layer.weight.requires_grad and torch.is_grad_enabled():
        return None  # trained under ZeRO-3: the logits path this time (the frozen copies still fuse)
    return layer


def _unfusable(layer: torch.nn.Module, reason: str) -> None:
    if layer not in _UNFUSABLE:
        logger.warning("fused output layer: %s; log-probs come from the logits for this model", reason)
        _UNFUSABLE[layer] = reason
    return None


def _label_positions(model, batch: PackedBatch) -> torch.Tensor | None:
    """Indices of the stream positions that carry a label, or None when the whole stream's logits are needed (the
    model cannot select positions, or every position has a label)."""
    if "logits_to_keep" not in forward_parameters(model):
        return None
    positions = batch.label_positions
    if positions.numel() in (0, batch.num_tokens):
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
                         dpo_coef: float) -> torch.Tensor:
    """(S,) float32 DPO implicit reward at RTO's scale, beta1 * sum_h (log pi_dpo - log pi_ref) over each response
    (beta1 = `dpo_coef`, rl.dpo_coef), packed order."""
    return dpo_coef * sequence_sums(dpo_logprobs - ref_logprobs, batch)


@torch.inference_mode()
def sequence_judge_scores(batches: list[PackedBatch], *, reward_model=None, dpo_model=None, ref_model=None,
                          dpo_coef: float = 0.1, num_sequences: int | None = None,
                          fused_output_layer: bool = False) -> torch.Tensor:
    """One judge score per sequence, in the input order of the sequences that were packed into `batches`: the reward
    model's last-token score when `reward_model` is given, else the DPO implicit reward of (dpo_model, ref_model)."""
    if reward_model is None and (dpo_model is None or ref_model is None):
        raise ValueError("a judge needs reward_model, or both dpo_model and ref_model")
    per_batch = []
    for batch in batches:
        if reward_model is not None:
            per_batch.append(last_token_scores(reward_model, batch).float().cpu())
        else:
            dpo = packed_logprobs(dpo_model, batch, fused_output_layer=fused_output_layer)
            ref = packed_logprobs(ref_model, batch, fused_output_layer=fused_output_layer)
            per_batch.append(implicit_dpo_rewards(dpo, ref, batch, dpo_coef).cpu())
    return to_input_order([batch.to("cpu") for batch in batches], per_batch, num_sequences)
