"""`selective_log_softmax`: TRL's function of that name, with its signature and results, on our log-prob kernels.

    import rto_fast.ops as ops
    logps = ops.selective_log_softmax(logits, input_ids)                    # (...) in logits.dtype
    topk_logps = ops.selective_log_softmax(logits, topk_ids)               # (..., K): K log-probs per position
    logps = ops.selective_log_softmax(logits, input_ids, temperature=0.7, row_mask=completion_mask)

It is `torch.gather(logits.log_softmax(-1), -1, index)` (index (..., K)) or the same with `index.unsqueeze(-1)` and a
squeeze (index (...)), as TRL's `trl.trainer.utils.selective_log_softmax`:
- the result has the dtype of `logits` (TRL's contract), computed in float32 by `token_logprobs` and rounded once,
  so float16 / bfloat16 results equal TRL's `log_softmax(-1).gather` on the same logits (that rounds once too);
  float64 logits are computed in float64 with ATen ops (our kernels compute in float32);
- `temperature` divides the logits first; it must be positive (ValueError otherwise, as in TRL), and finite;
- `row_mask` (the shape of `index`): positions where it is 0 give 0, with no gradient;
- every index must lie in [0, V): -100 or any other out-of-range index raises (ValueError naming the position; TRL's
  `gather` raises a RuntimeError), it is not ignored the way `token_logprobs` ignores `ignore_index`.
Beyond TRL: integer indices of any dtype (TRL's CPU path needs int64); the forward never holds a float32 (N, V) copy
of the logits, whatever K (the (..., K) form takes the row's normaliser from the same fused pass and gathers the K
logits); the backward writes one (N, V) gradient in the logits' dtype (float32 work in row chunks for K > 1).
`token_logprobs` remains the op to use in new code: float32 output whatever
the logits' dtype, `ignore_index` positions give 0, entropy and an in-place backward on request.
"""

from __future__ import annotations

import torch

from ._common import FLOAT_DTYPES, LABEL_DTYPES, check_devices, check_labels, check_tensor
from .logprobs import token_logprobs

__all__ = ["selective_log_softmax"]

# The internal calls ignore nothing: every index has been checked to lie in [0, V), so -1 never occurs.
_NEVER_AN_INDEX = -1
# Float32 working chunks of the (..., K) form's backward: about 8 MiB, as the torch path of token_logprobs.
_CHUNK_ELEMENTS = 1 << 21


class _MultiIndexLogSoftmax(torch.autograd.Function):
    """log softmax(logits / T) at K indices per row: logits (N, V), index (N, K) int64 -> (N, K) float32.

    The row's normaliser (m, log s) comes from the fused forward kernel (one pass over the vocabulary, whatever K);
    log p_k = (z_k - m) - log s as torch's log_softmax computes it. Backward: the gradient of row n is
    (sum_k g_nk onehot(index_nk) - (sum_k g_nk) softmax(z_n)) / T, built in float32 row chunks and rounded once to
    the logits' dtype (summing a bf16 softmax gradient and a bf16 scatter would round twice and cancel).
    """

    @staticmethod
    def forward(ctx, logits, index, temperature):
        _, row_stats, _ = torch.ops.rto_fast.token_logprobs_fwd(logits, index[:, 0].contiguous(), temperature,
                                                                _NEVER_AN_INDEX, False, False, True)
        row_stats = row_stats.float()
        picked = torch.gather(logits, 1, index).float()
        if temperature != 1.0:
            picked = picked / temperature
        ctx.save_for_backward(logits, index, row_stats)
        ctx.temperature = temperature
        return (picked - row_stats[:, :1]) - row_stats[:, 1:]

    @staticmethod
    def backward(ctx, grad_out):
        logits, index, row_stats = ctx.saved_tensors
        temperature = ctx.temperature
        grad_out = grad_out.float() / temperature
        grad_total = grad_out.sum(-1, keepdim=True)
        grad_logits = torch.empty_like(logits)
        rows = max(1, _CHUNK_ELEMENTS // logits.shape[1])
        for start in range(0, logits.shape[0], rows):
            stop = min(start + rows, logits.shape[0])
            z = logits[start:stop].float()
            if temperature != 1.0:
                z = z / temperature
            grad = z.sub_(row_stats[start:stop, :1]).sub_(row_stats[start:stop, 1:]).exp_()
            grad.mul_(-grad_total[start:stop]).scatter_add_(1, index[start:stop], grad_out[start:stop])
            grad_logits[start:stop] = grad
        return grad_logits, None, None


def _check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a number, got {type(temperature).__name__}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if temperature == float("inf"):
        raise ValueError("temperature must be finite, got inf")


def _check_shapes(logits: torch.Tensor, index: torch.Tensor, row_mask) -> bool:
    """Whether `index` is the (...) form (one log-prob per position) rather than the (..., K) form."""
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    batch_shape = tuple(logits.shape[:-1])
    single = index.dim() == logits.dim() - 1
    if single and tuple(index.shape) != batch_shape:
        raise ValueError(f"index: shape {tuple(index.shape)} does not match logits.shape[:-1] {batch_shape}")
    if not single and (index.dim() != logits.dim() or tuple(index.shape[:-1]) != batch_shape):
        raise ValueError(f"index: expected shape {batch_shape} or {batch_shape + ('K',)} for logits of shape "
                         f"{tuple(logits.shape)}, got {tuple(index.shape)}")
    if row_mask is not None:
        check_tensor("row_mask", row_mask)
        if tuple(row_mask.shape) != tuple(index.shape):
            raise ValueError(f"row_mask: shape {tuple(row_mask.shape)} does not match index {tuple(index.shape)}")
    return single


def _float64_log_softmax_gather(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """float64 logits keep float64: log_softmax rows in chunks (no second (N, V) float64 tensor at once)."""
    rows = logits.reshape(-1, logits.shape[-1])
    picked = index.reshape(rows.shape[0], -1).long()
    chunk = max(1, _CHUNK_ELEMENTS // rows.shape[1])
    out = [torch.gather(part, -1, ids) - torch.logsumexp(part, -1, keepdim=True)
           for part, ids in zip(rows.split(chunk), picked.split(chunk))]
    return torch.cat(out).reshape(index.shape) if out else rows.new_empty(index.shape)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                          row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(logits / temperature) gathered at `index`, in `logits.dtype`, as TRL's function of this name.

    logits: (..., V) float; index: (...) or (..., K) integer in [0, V); row_mask: like `index`, 0 where the result
    should be 0. See the module docstring for how this differs from `token_logprobs`.
    """
    _check_temperature(temperature)
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    check_tensor("index", index, dtypes=LABEL_DTYPES)
    check_devices(("logits", logits), ("index", index), ("row_mask", row_mask))
    single = _check_shapes(logits, index, row_mask)
    check_labels(index, logits.shape[-1], None, name="index", item="index")
    if logits.dtype == torch.float64:
        logprobs = _float64_log_softmax_gather(logits if temperature == 1.0 else logits / temperature, index)
    elif single:
        logprobs = token_logprobs(logits, index, temperature=float(temperature),
                                  ignore_index=_NEVER_AN_INDEX).to(logits.dtype)
    else:
        logits_2d = logits.reshape(-1, logits.shape[-1]).contiguous()
        logprobs = _MultiIndexLogSoftmax.apply(logits_2d, index.reshape(logits_2d.shape[0], -1).long(),
                                               float(temperature))
        logprobs = logprobs.reshape(index.shape).to(logits.dtype)
    if row_mask is not None:
        logprobs = logprobs.masked_fill(row_mask == 0, 0.0)
    return logprobs
