"""Per-token log-probs (and entropy) from logits or from hidden states: input checks, dispatch, custom ops, autograd.

    import rto_fast.ops as ops
    logprobs = ops.token_logprobs(logits, labels)                                   # (B, T) float32
    logprobs, entropy = ops.token_logprobs(logits, labels, temperature=0.7, return_entropy=True)
    logprobs = ops.token_logprobs(logits, labels, inplace_backward=True)            # backward overwrites logits
    logprobs = ops.linear_token_logprobs(hidden, lm_head.weight, labels)            # never holds (N, V) logits

`token_logprobs(logits (..., V), labels (...))` returns log softmax(logits / temperature)[label] as float32 with the
shape of `labels`; positions whose label is `ignore_index` give 0 (and entropy 0, and zero gradient). Labels
outside [0, V) that are not `ignore_index` raise ValueError. Differentiable in `logits`.

`inplace_backward=True` writes the gradient of the logits into the logits tensor itself (no second (N, V) tensor):
after backward, `logits` holds its own gradient. Use it only when nothing else needs the logits afterwards (the
usual case: logits produced by the LM head and consumed only here); autograd's version check reports any other
saved use of them. A non-contiguous `logits` is copied first, and then it is the copy that is overwritten.

`linear_token_logprobs(hidden (..., D), weight (V, D), labels (...), bias=(V,))` is `token_logprobs` of
`hidden @ weight.T + bias` without holding the (N, V) logits: the vocabulary goes through in column chunks whose
logits (N x columns) hold about as many elements as `hidden` itself, at least 2^22 and never more than 2^27 elements
(`linear_chunk_columns`). Each chunk is one full-N matmul, its per-row (max, log-sum-exp, entropy) partials merge
online, and the label's logit is read from the chunk that holds it. Only hidden, weight, bias and per-token row
statistics / entropy are saved. Backward recomputes each chunk's logits with the same matmul (so bit for bit the
logits of the forward), turns them into grad_logits in place, and then grad_weight of those columns is a single
matmul over all N tokens (float32 accumulation inside it, no float32 (V, D) buffer), grad_bias a column sum, and
grad_hidden accumulates over chunks in float32. Chunking the tokens instead would make every chunk re-read and
re-write a float32 (V, D) grad_weight accumulator: on an H200 at 4096 x 4096 x 128256 bf16 that was 5x the time of
matmul + log-probs done separately.

Backends (`rto_fast.ops._common.backend_for`): CUDA tensors run the Triton kernels of `rto_fast.kernels.logprobs`
(float64 takes the torch path to keep its precision); CPU tensors run the torch path: float32 / bfloat16 logits go
to the C++ row kernels of `rto_fast._C` (csrc/logprobs.cpp: per row a max sweep and one exp sweep from cache, nothing
of size (N, V) written; backward writes the gradient in one sweep), other dtypes to ATen ops that walk the rows in
chunks of about 2 M elements, cast a chunk to float32 into a reused buffer and use log_softmax / gather on it.
`reference` runs `rto_fast.reference` for the forward. The raw ops are registered as `torch.library.custom_op`s
(`rto_fast::token_logprobs_fwd`, `..._bwd`, `..._bwd_inplace`, `rto_fast::linear_token_logprobs_fwd`, `..._bwd`)
with fake implementations and autograd, so `torch.compile`d code calls them without graph breaks.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _C
from . import reference
from ._common import FLOAT_DTYPES, LABEL_DTYPES, backend_for, check_devices, check_labels, check_tensor

__all__ = ["token_logprobs", "linear_token_logprobs"]

# The torch path casts at most this many logits to float32 at a time (8 MiB): small enough to stay in cache while
# log_softmax walks it, large enough that per-chunk overhead is noise. On 2 EPYC cores 2^20 to 2^21 were fastest
# (2048 x 32000: ~21 ms fp32, ~24 ms bf16; 2^22: +20% in bf16); 2^21 halves the number of small parallel regions,
# which is what suffers most when other jobs share the cores.
_TORCH_CHUNK_ELEMENTS = 1 << 21
# log p below which exp(log p) is exactly 0 in the compute dtype (under the smallest subnormal): clamping log p there
# changes no probability and keeps p * log p finite where a logit is -inf.
_LOG_P_FLOOR = {torch.float32: -104.0, torch.float64: -746.0}
# Float32 / bfloat16 CPU logits run the C++ row kernels of rto_fast._C (csrc/logprobs.cpp) rather than the chunked
# ATen path; tests switch this off to exercise the ATen path on the same inputs.
_NATIVE_CPU = True
# linear_token_logprobs: bounds on the logits of one vocabulary chunk (elements). The floor keeps the chunk matmul
# big enough to run at full speed when N or D is small; the cap bounds memory when N x D is huge.
_LINEAR_CHUNK_MIN_ELEMENTS = 1 << 22
_LINEAR_CHUNK_MAX_ELEMENTS = 1 << 27


def _kernels():
    from ..kernels import logprobs as kernels  # imports triton: only when the Triton backend runs

    return kernels


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _use_kernels(backend: str, dtype: torch.dtype) -> bool:
    # float64 keeps its precision on the torch path; the kernels compute in float32.
    return backend == "triton" and dtype != torch.float64


# ---------------------------------------------------------------------------------------------------------------
# Vectorized torch path (CPU, float64, or any device when forced)
# ---------------------------------------------------------------------------------------------------------------


def _chunk_rows(vocab_size: int) -> int:
    return max(1, _TORCH_CHUNK_ELEMENTS // max(vocab_size, 1))


def _scaled_chunk(logits_chunk, buffer, temperature):
    """logits_chunk / temperature in the compute dtype, in `buffer` unless the chunk can be used as it is."""
    if logits_chunk.dtype == buffer.dtype and temperature == 1.0:
        return logits_chunk
    buffer.copy_(logits_chunk)  # cast first: dividing a bf16 tensor would round the quotient to bf16
    if temperature != 1.0:
        buffer.div_(temperature)
    return buffer


def _native_cpu(logits: torch.Tensor) -> bool:
    """Whether rto_fast._C's row kernels take these logits (CPU, float32 or bfloat16, contiguous rows)."""
    return (_NATIVE_CPU and logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16)
            and logits.is_contiguous())


def _forward_native(logits, labels, temperature, ignore_index, return_entropy):
    n_rows, vocab_size = logits.shape
    labels = labels.to(torch.int64).contiguous()
    logprobs = torch.empty(n_rows, dtype=torch.float32)
    row_stats = torch.empty(n_rows, 2, dtype=torch.float32)
    entropy = torch.empty(n_rows, dtype=torch.float32) if return_entropy else None
    _C.token_logprobs_fwd(logits.data_ptr(), labels.data_ptr(), n_rows, vocab_size, float(temperature),
                          int(ignore_index), logprobs.data_ptr(), row_stats.data_ptr(),
                          entropy.data_ptr() if entropy is not None else 0, str(logits.dtype).replace("torch.", ""))
    return logprobs, row_stats, entropy


def _backward_native(logits, labels, row_stats, entropy, grad_logprobs, grad_entropy, temperature, ignore_index, out):
    n_rows, vocab_size = logits.shape
    labels = labels.to(torch.int64).contiguous()
    row_stats = row_stats.to(torch.float32).contiguous()
    float_inputs = [t.to(torch.float32).contiguous() if t is not None else None
                    for t in (entropy if grad_entropy is not None else None, grad_logprobs, grad_entropy)]
    _C.token_logprobs_bwd(logits.data_ptr(), labels.data_ptr(), row_stats.data_ptr(),
                          *(t.data_ptr() if t is not None else 0 for t in float_inputs), n_rows, vocab_size,
                          float(temperature), int(ignore_index), out.data_ptr(),
                          str(logits.dtype).replace("torch.", ""))
    return out


def _forward_torch(logits, labels, temperature, ignore_index, return_entropy, need_stats=True):
    """(logprobs float32, row_stats (N, 2), entropy float32 or None) for logits (N, V), labels (N,).

    row_stats = (m, log s): the row max of z = logits / temperature and log sum exp(z - m), what backward needs
    (rto_fast/kernels/logprobs.py says why not lse). They cost two extra max passes over each cached chunk; without
    `need_stats` they are zeros. Float32 / bfloat16 CPU logits go to the C++ row kernels instead (csrc/logprobs.cpp).
    """
    if _native_cpu(logits):
        return _forward_native(logits, labels, temperature, ignore_index, return_entropy)
    n_rows, vocab_size = logits.shape
    dtype = _compute_dtype(logits.dtype)
    device = logits.device
    logprobs = torch.empty(n_rows, device=device, dtype=torch.float32)
    row_stats = (torch.empty if need_stats else torch.zeros)(n_rows, 2, device=device, dtype=dtype)
    entropy = torch.empty(n_rows, device=device, dtype=torch.float32) if return_entropy else None
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0).long().unsqueeze(-1)
    rows = min(_chunk_rows(vocab_size), max(n_rows, 1))
    scaled_buffer = torch.empty(rows, vocab_size, device=device, dtype=dtype)
    log_p_buffer = torch.empty(rows, vocab_size, device=device, dtype=dtype)
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        count = stop - start
        z = _scaled_chunk(logits[start:stop], scaled_buffer[:count], temperature)
        log_p = torch.log_softmax(z, dim=-1, out=log_p_buffer[:count])
        logprobs[start:stop] = log_p.gather(-1, safe_labels[start:stop]).squeeze(-1)
        if need_stats:
            # log s summed in float64 (log_softmax's own float32 log-sum-exp is a few ulp off): backward rebuilds every
            # p of the row from it, so its rounding is every gradient's relative error.
            row_max = z.amax(-1, keepdim=True)
            row_stats[start:stop, 0] = row_max.squeeze(-1)
            row_stats[start:stop, 1] = torch.sub(z, row_max).exp_().sum(-1, dtype=torch.float64).log_()
        if return_entropy:
            # Below the floor p is exactly 0: the clamp changes no value and keeps 0 * -inf (masked logits) out.
            p = torch.exp(log_p, out=scaled_buffer[:count])
            p_log_p = p.mul_(log_p.clamp_(min=_LOG_P_FLOOR[dtype]))
            entropy[start:stop] = p_log_p.sum(-1, dtype=torch.float64).neg_()  # float64 sum, as the C++ rows
    logprobs.masked_fill_(~valid, 0.0)
    row_stats.masked_fill_(~valid.unsqueeze(-1), 0.0)
    if return_entropy:
        entropy.masked_fill_(~valid, 0.0)
    return logprobs, row_stats, entropy


def _backward_torch(logits, labels, row_stats, entropy, grad_logprobs, grad_entropy, temperature, ignore_index, out):
    """Gradient of the logits (N, V), written chunk by chunk into `out` (which may be `logits` itself)."""
    if _native_cpu(logits) and out.dtype == logits.dtype and out.is_contiguous():
        return _backward_native(logits, labels, row_stats, entropy, grad_logprobs, grad_entropy, temperature,
                                ignore_index, out)
    n_rows, vocab_size = logits.shape
    dtype = _compute_dtype(logits.dtype)
    valid = labels != ignore_index
    # A label outside [0, V) (not ignore_index) puts its one-hot term in no column: linear_token_logprobs passes
    # such labels for the rows whose label lies in another vocabulary chunk.
    in_columns = valid & (labels >= 0) & (labels < vocab_size)
    safe_labels = torch.where(in_columns, labels, 0).long().unsqueeze(-1)
    # Per-row factors with ignored rows zeroed: their gradient comes out exactly 0.
    g_lp = torch.where(valid, grad_logprobs.to(dtype), 0.0).unsqueeze(-1) if grad_logprobs is not None else None
    g_onehot = torch.where(in_columns.unsqueeze(-1), g_lp, 0.0) if g_lp is not None else None
    g_h = torch.where(valid, grad_entropy.to(dtype), 0.0).unsqueeze(-1) if grad_entropy is not None else None
    row_max = row_stats[:, 0:1].to(dtype)
    log_sum = row_stats[:, 1:2].to(dtype)
    # p = exp(z - m) / s, not exp((z - m) - log s): the large p of a row keep exp's own accuracy, as in a softmax,
    # instead of the rounding of (z - m) - log s near -log s.
    inverse_sum = torch.exp(-row_stats[:, 1:2].double()).to(dtype)
    entropy = entropy.to(dtype).unsqueeze(-1) if g_h is not None else None
    rows = min(_chunk_rows(vocab_size), max(n_rows, 1))
    log_p_buffer = torch.empty(rows, vocab_size, device=logits.device, dtype=dtype)
    p_buffer = torch.empty(rows if out.dtype != dtype else 0, vocab_size, device=logits.device, dtype=dtype)
    # When the gradient has the compute dtype, p and the gradient are built in `out` itself: one pass fewer.
    direct = out.dtype == dtype
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        count = stop - start
        logits_chunk = logits[start:stop]
        log_p = log_p_buffer[:count]
        if logits_chunk.dtype == dtype:
            if temperature != 1.0:
                # Divide exactly as the forward did: z must round the same way for z - m to be exact at the max.
                torch.div(logits_chunk, temperature, out=log_p).sub_(row_max[start:stop])
            else:
                torch.sub(logits_chunk, row_max[start:stop], out=log_p)
        else:
            log_p.copy_(logits_chunk)
            if temperature != 1.0:
                log_p.div_(temperature)
            log_p.sub_(row_max[start:stop])
        # log_p (z - m so far) holds everything needed from the logits chunk, so `out` may overwrite it now
        # (in-place backward).
        p = torch.exp(log_p, out=out[start:stop] if direct else p_buffer[:count]).mul_(inverse_sum[start:stop])
        log_p.sub_(log_sum[start:stop])  # (z - m) - log s: see rto_fast/kernels/logprobs.py
        if g_h is not None:
            # grad = -p * (g_lp + g_h * (log p + H)) + g_lp * onehot (log p clamped where p = 0, as in the forward)
            factor = log_p.clamp_(min=_LOG_P_FLOOR[dtype]).add_(entropy[start:stop]).mul_(g_h[start:stop])
            if g_lp is not None:
                factor.add_(g_lp[start:stop])
            grad = p.mul_(factor).neg_()
        else:
            grad = p.mul_(g_lp[start:stop].neg())
        if g_lp is not None:
            grad.scatter_add_(-1, safe_labels[start:stop], g_onehot[start:stop])
        if temperature != 1.0:
            grad.div_(temperature)
        invalid_rows = torch.nonzero(~valid[start:stop]).squeeze(-1)
        if invalid_rows.numel():  # exact zeros even where the logits of an ignored row are inf
            grad[invalid_rows] = 0.0
        if not direct:
            out[start:stop].copy_(grad)
    return out


def _forward_reference(logits, labels, temperature, ignore_index, return_entropy):
    dtype = _compute_dtype(logits.dtype)
    result = reference.token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                      return_entropy=return_entropy)
    logprobs, entropy = result if return_entropy else (result, None)
    z = logits.to(dtype) / temperature
    row_max = z.amax(-1, keepdim=True)
    row_stats = torch.cat([row_max, torch.logsumexp(z - row_max, dim=-1, keepdim=True)], dim=-1)
    row_stats.masked_fill_((labels == ignore_index).unsqueeze(-1), 0.0)
    return logprobs.float(), row_stats, entropy.float() if entropy is not None else None


def _forward_any(backend, logits, labels, temperature, ignore_index, return_entropy, need_stats=True):
    if _use_kernels(backend, logits.dtype):
        return _kernels().logprobs_forward(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                           return_entropy=return_entropy)
    if backend == "reference":
        return _forward_reference(logits, labels, temperature, ignore_index, return_entropy)
    return _forward_torch(logits, labels, temperature, ignore_index, return_entropy, need_stats)


def _backward_any(backend, logits, labels, row_stats, entropy, grad_logprobs, grad_entropy, temperature,
                  ignore_index, out):
    if _use_kernels(backend, logits.dtype):
        return _kernels().logprobs_backward(logits, labels, row_stats, entropy, grad_logprobs, grad_entropy,
                                            temperature=temperature, ignore_index=ignore_index, out=out)
    return _backward_torch(logits, labels, row_stats, entropy, grad_logprobs, grad_entropy, temperature, ignore_index,
                           out)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: token_logprobs
# ---------------------------------------------------------------------------------------------------------------


def _empty_entropy(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("rto_fast::token_logprobs_fwd", mutates_args=())
def _token_logprobs_fwd(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
                        return_entropy: bool, inplace_backward: bool, need_stats: bool) -> tuple[
                                            torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, V) contiguous, labels (N,) -> (logprobs f32, row_stats (N, 2), entropy f32 or empty).

    `need_stats`: backward will run (the torch path skips row_stats otherwise); `inplace_backward` is read by autograd.
    """
    check_labels(labels, logits.shape[-1], ignore_index)
    logprobs, row_stats, entropy = _forward_any(backend_for(logits), logits, labels, temperature, ignore_index,
                                                return_entropy, need_stats)
    return logprobs, row_stats, entropy if entropy is not None else _empty_entropy(logits)


@_token_logprobs_fwd.register_fake
def _(logits, labels, temperature, ignore_index, return_entropy, inplace_backward, need_stats):
    n_rows = logits.shape[0]
    logprobs = logits.new_empty(n_rows, dtype=torch.float32)
    row_stats = logits.new_empty(n_rows, 2, dtype=_compute_dtype(logits.dtype))
    entropy = logits.new_empty(n_rows if return_entropy else 0, dtype=torch.float32)
    return logprobs, row_stats, entropy


@torch.library.custom_op("rto_fast::token_logprobs_bwd", mutates_args=())
def _token_logprobs_bwd(logits: torch.Tensor, labels: torch.Tensor, row_stats: torch.Tensor, entropy: torch.Tensor,
                        grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                        temperature: float, ignore_index: int) -> torch.Tensor:
    out = torch.empty_like(logits)
    return _backward_any(backend_for(logits), logits, labels, row_stats, entropy, grad_logprobs, grad_entropy,
                         temperature, ignore_index, out)


@_token_logprobs_bwd.register_fake
def _(logits, labels, row_stats, entropy, grad_logprobs, grad_entropy, temperature, ignore_index):
    return torch.empty_like(logits)


@torch.library.custom_op("rto_fast::token_logprobs_bwd_inplace", mutates_args=("logits",))
def _token_logprobs_bwd_inplace(logits: torch.Tensor, labels: torch.Tensor, row_stats: torch.Tensor,
                                entropy: torch.Tensor, grad_logprobs: Optional[torch.Tensor],
                                grad_entropy: Optional[torch.Tensor], temperature: float, ignore_index: int) -> None:
    _backward_any(backend_for(logits), logits, labels, row_stats, entropy, grad_logprobs, grad_entropy, temperature,
                  ignore_index, logits)


@_token_logprobs_bwd_inplace.register_fake
def _(logits, labels, row_stats, entropy, grad_logprobs, grad_entropy, temperature, ignore_index):
    return None


def _token_logprobs_setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, return_entropy, inplace_backward, _ = inputs
    _, row_stats, entropy = output
    ctx.save_for_backward(logits, labels, row_stats, entropy)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.return_entropy = return_entropy
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(row_stats)
    ctx.set_materialize_grads(False)


def _token_logprobs_backward(ctx, grad_logprobs, grad_row_stats, grad_entropy):
    logits, labels, row_stats, entropy = ctx.saved_tensors
    if not ctx.return_entropy:
        grad_entropy = None
    if grad_logprobs is None and grad_entropy is None:
        return None, None, None, None, None, None, None
    grad_logprobs = grad_logprobs.contiguous() if grad_logprobs is not None else None
    grad_entropy = grad_entropy.contiguous() if grad_entropy is not None else None
    if ctx.inplace_backward:
        torch.ops.rto_fast.token_logprobs_bwd_inplace(logits, labels, row_stats, entropy, grad_logprobs, grad_entropy,
                                                      ctx.temperature, ctx.ignore_index)
        grad_logits = logits
    else:
        grad_logits = torch.ops.rto_fast.token_logprobs_bwd(logits, labels, row_stats, entropy, grad_logprobs,
                                                            grad_entropy, ctx.temperature, ctx.ignore_index)
    return grad_logits, None, None, None, None, None, None


torch.library.register_autograd("rto_fast::token_logprobs_fwd", _token_logprobs_backward,
                                setup_context=_token_logprobs_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: linear_token_logprobs
# ---------------------------------------------------------------------------------------------------------------


def linear_chunk_columns(n_rows: int, vocab_size: int, hidden_size: int) -> int:
    """Vocabulary columns per chunk: a chunk's logits (n_rows x columns) hold about as many elements as `hidden`
    (Liger-Kernel's rule), but at least 2^22 and at most 2^27 elements; a multiple of 128 (matmul tiles) when wider."""
    rows = max(n_rows, 1)
    elements = min(max(rows * hidden_size, _LINEAR_CHUNK_MIN_ELEMENTS), _LINEAR_CHUNK_MAX_ELEMENTS)
    columns = max(1, elements // rows)
    if columns > 128:
        columns -= columns % 128
    return min(columns, vocab_size)


def _chunk_logits(hidden, weight, bias):
    if bias is None:
        return hidden @ weight.T
    return torch.addmm(bias, hidden, weight.T)


def _mm_float32(a, b):
    """a @ b accumulated and returned in float32 (no float32 copies of bf16 operands on CUDA)."""
    if a.dtype == torch.float32 or a.dtype == torch.float64:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return (a @ b).float()


def _scaled_label_logits(values, temperature, dtype, backend):
    """Label logits / temperature computed as the log-prob backend computes z (the kernels multiply by the float32
    reciprocal, the torch path divides), so that z[label] - max z is exact where the label holds the max."""
    values = values.to(dtype)
    if temperature == 1.0:
        return values
    if _use_kernels(backend, values.dtype):
        return values * torch.tensor(1.0 / temperature, dtype=torch.float32)
    return values / temperature


@torch.library.custom_op("rto_fast::linear_token_logprobs_fwd", mutates_args=())
def _linear_token_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: Optional[torch.Tensor], temperature: float, ignore_index: int,
                               return_entropy: bool, need_stats: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """hidden (N, D), weight (V, D), labels (N,) -> (logprobs f32, row_stats (N, 2), entropy f32 or empty)."""
    n_rows = hidden.shape[0]
    vocab_size = weight.shape[0]
    check_labels(labels, vocab_size, ignore_index)
    backend = backend_for(hidden)
    if backend == "reference":
        backend = "torch"  # the reference has no chunked form; the torch path is its chunked equivalent
    dtype = _compute_dtype(hidden.dtype)
    labels = labels.long()
    valid = labels != ignore_index
    # Each chunk's pass needs only its rows' (max, log-sum-exp, entropy): label 0 is a valid stand-in.
    stand_in_labels = torch.where(valid, 0, ignore_index)
    columns = linear_chunk_columns(n_rows, vocab_size, hidden.shape[1])
    label_chunk, label_column = _label_chunks(labels, valid, columns)
    label_index = label_column.unsqueeze(-1)
    # Per chunk: the matmul, the log-prob kernel and one gather (no host sync); the chunks' (max, log-sum-exp,
    # entropy) merge once after the loop, so per-chunk work is three launches whatever the vocabulary.
    chunk_stats, chunk_entropies, picked = [], [], []
    for start in range(0, vocab_size, columns):
        stop = min(start + columns, vocab_size)
        logits = _chunk_logits(hidden, weight[start:stop], bias[start:stop] if bias is not None else None)
        _, stats, entropy = _forward_any(backend, logits, stand_in_labels, temperature, ignore_index,
                                         return_entropy)
        chunk_stats.append(stats)
        chunk_entropies.append(entropy)
        # Each row's logit at its label's column inside the chunk that holds the label (in bounds everywhere).
        picked.append(logits.gather(1, label_index if stop - start == columns else
                                    label_index.clamp(max=stop - start - 1)))
        del logits  # the next chunk's matmul may reuse this memory
    stats = torch.stack(chunk_stats).to(dtype)  # (chunks, N, 2)
    chunk_max, chunk_log_sum = stats[..., 0], stats[..., 1]
    label_logits = torch.cat(picked, dim=1).gather(1, label_chunk.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    label_z = _scaled_label_logits(label_logits, temperature, dtype, backend)
    # Merge the chunks' (m, s, t) as the split kernels' combine step does, against the row's overall max.
    row_max = chunk_max.amax(dim=0)
    scale = (chunk_max - row_max).exp()
    chunk_sum = chunk_log_sum.exp()
    sum_exp = (scale * chunk_sum).sum(dim=0)
    log_sum = sum_exp.log()
    logprobs = torch.where(valid, (label_z - row_max) - log_sum, 0.0).float()
    row_stats = torch.stack([row_max, log_sum], dim=-1).masked_fill_(~valid.unsqueeze(-1), 0.0)
    if return_entropy:
        # t = sum exp(z - m) (z - m) of a chunk, from its entropy H = log s - t / s; moved to the row's max.
        # A chunk whose logits are all -inf (s = 0) adds nothing; its own entropy is NaN and must not leak in. A NaN
        # anywhere in the row still makes sum_exp, hence the entropy, NaN.
        chunk_t = chunk_sum * (chunk_log_sum - torch.stack(chunk_entropies).to(dtype))
        shifted_t = torch.where(chunk_sum > 0, scale * (chunk_t + (chunk_max - row_max) * chunk_sum), 0.0)
        entropy_sum = shifted_t.sum(dim=0)
        entropy = torch.where(valid, log_sum - entropy_sum / sum_exp, 0.0).float()
    else:
        entropy = hidden.new_empty(0, dtype=torch.float32)
    return logprobs, row_stats, entropy


def _label_chunks(labels: torch.Tensor, valid: torch.Tensor, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunk of each row's label or -1 where ignored, the label's column inside that chunk or 0)."""
    chunk = torch.where(valid, labels.div(columns, rounding_mode="floor"), -1)
    column = torch.where(valid, labels - chunk * columns, 0)
    return chunk, column


@_linear_token_logprobs_fwd.register_fake
def _(hidden, weight, labels, bias, temperature, ignore_index, return_entropy, need_stats):
    n_rows = hidden.shape[0]
    return (hidden.new_empty(n_rows, dtype=torch.float32),
            hidden.new_empty(n_rows, 2, dtype=_compute_dtype(hidden.dtype)),
            hidden.new_empty(n_rows if return_entropy else 0, dtype=torch.float32))


@torch.library.custom_op("rto_fast::linear_token_logprobs_bwd", mutates_args=())
def _linear_token_logprobs_bwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: Optional[torch.Tensor], row_stats: torch.Tensor, entropy: torch.Tensor,
                               grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                               temperature: float, ignore_index: int, need_hidden: bool, need_weight: bool,
                               need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden or empty, grad_weight or empty, grad_bias or empty), in the dtypes of the inputs."""
    n_rows = hidden.shape[0]
    vocab_size = weight.shape[0]
    backend = backend_for(hidden)
    if backend == "reference":
        backend = "torch"
    accumulate = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=accumulate) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    grad_bias = torch.empty_like(bias) if need_bias else weight.new_empty(0)
    labels = labels.long()
    valid = labels != ignore_index
    elsewhere = -1 if ignore_index != -1 else -2  # a label outside the chunk's columns that is not ignore_index
    columns = linear_chunk_columns(n_rows, vocab_size, hidden.shape[1])
    label_chunk, label_column = _label_chunks(labels, valid, columns)
    # Every chunk's labels at once (chunks, N): the label's column in its own chunk, `elsewhere` in the others.
    chunk_ids = torch.arange(-(-vocab_size // columns), device=labels.device).unsqueeze(-1)
    all_chunk_labels = torch.where(label_chunk == chunk_ids, label_column, elsewhere)
    all_chunk_labels = torch.where(valid, all_chunk_labels, ignore_index)
    for index, start in enumerate(range(0, vocab_size, columns)):
        stop = min(start + columns, vocab_size)
        chunk_weight = weight[start:stop]
        logits = _chunk_logits(hidden, chunk_weight, bias[start:stop] if bias is not None else None)
        chunk_labels = all_chunk_labels[index]
        grad_logits = _backward_any(backend, logits, chunk_labels, row_stats, entropy, grad_logprobs, grad_entropy,
                                    temperature, ignore_index, logits)  # in place: the logits become their gradient
        if need_hidden:
            if grad_logits.dtype == accumulate:
                grad_hidden.addmm_(grad_logits, chunk_weight)
            else:
                grad_hidden += _mm_float32(grad_logits, chunk_weight)
        if need_weight:
            torch.mm(grad_logits.T, hidden, out=grad_weight[start:stop])
        if need_bias:
            grad_bias[start:stop] = grad_logits.sum(0, dtype=accumulate)
        del logits, grad_logits  # the next chunk's matmul may reuse this memory
    return (grad_hidden.to(hidden.dtype) if need_hidden else hidden.new_empty(0), grad_weight, grad_bias)


@_linear_token_logprobs_bwd.register_fake
def _(hidden, weight, labels, bias, row_stats, entropy, grad_logprobs, grad_entropy, temperature, ignore_index,
      need_hidden, need_weight, need_bias):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            bias.new_empty(bias.shape) if need_bias else weight.new_empty(0))


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, temperature, ignore_index, return_entropy, _ = inputs
    _, row_stats, entropy = output
    ctx.save_for_backward(hidden, weight, labels, bias, row_stats, entropy)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.return_entropy = return_entropy
    ctx.mark_non_differentiable(row_stats)
    ctx.set_materialize_grads(False)


def _linear_backward(ctx, grad_logprobs, grad_row_stats, grad_entropy):
    hidden, weight, labels, bias, row_stats, entropy = ctx.saved_tensors
    need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
    need_bias = bool(need_bias and bias is not None)
    if not ctx.return_entropy:
        grad_entropy = None
    if (grad_logprobs is None and grad_entropy is None) or not (need_hidden or need_weight or need_bias):
        return None, None, None, None, None, None, None, None
    grad_hidden, grad_weight, grad_bias = torch.ops.rto_fast.linear_token_logprobs_bwd(
        hidden, weight, labels, bias, row_stats, entropy,
        grad_logprobs.contiguous() if grad_logprobs is not None else None,
        grad_entropy.contiguous() if grad_entropy is not None else None,
        ctx.temperature, ctx.ignore_index, need_hidden, need_weight, need_bias)
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None, None,
            grad_bias if need_bias else None, None, None, None, None)


torch.library.register_autograd("rto_fast::linear_token_logprobs_fwd", _linear_backward,
                                setup_context=_linear_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------------


def _check_common(labels, batch_shape, batch_name, temperature, ignore_index):
    check_tensor("labels", labels)
    if labels.dtype not in LABEL_DTYPES:
        raise ValueError(f"labels: expected an integer dtype, got {str(labels.dtype).replace('torch.', '')}")
    if tuple(labels.shape) != tuple(batch_shape):
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match {batch_name} "
                         f"{tuple(batch_shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a number, got {type(temperature).__name__}")
    if not (temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature: must be positive and finite, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")


def _shares_a_grad_leaf(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a leaf that requires grad, or a view of one (same memory)."""
    base = tensor if tensor._base is None else tensor._base
    return base.is_leaf and base.requires_grad


def token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                   inplace_backward=False):
    """log softmax(logits / temperature)[labels] as float32 `labels.shape`; `(logprobs, entropy)` if asked.

    logits: (..., V) float32 / bfloat16 / float16 / float64; labels: (...) integer, in [0, V) or `ignore_index`
    (those positions give 0 and no gradient). `inplace_backward=True`: backward overwrites `logits` with its own
    gradient (see the module docstring).
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    check_devices(("logits", logits), ("labels", labels))
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    _check_common(labels, logits.shape[:-1], "logits.shape[:-1]", temperature, ignore_index)
    if inplace_backward and torch.is_grad_enabled() and _shares_a_grad_leaf(logits):
        # The backward would overwrite a tensor the optimizer owns with its own gradient; torch refuses in-place
        # changes to such leaves (and to views of them) for the same reason.
        raise ValueError("inplace_backward: logits is (a view of) a leaf tensor that requires grad, and the in-place "
                         "backward would overwrite it with its gradient; pass inplace_backward=False, or logits "
                         "computed from the parameters (e.g. an LM head's output)")
    vocab_size = logits.shape[-1]
    logits_2d = logits.reshape(-1, vocab_size)
    if logits_2d.stride(-1) != 1:
        logits_2d = logits_2d.contiguous()
    need_stats = torch.is_grad_enabled() and logits.requires_grad
    # int64 labels: narrower dtypes would wrap in comparisons with V or ignore_index (uint8 156 == -100).
    logprobs, _, entropy = torch.ops.rto_fast.token_logprobs_fwd(
        logits_2d, labels.reshape(-1).long(), float(temperature), int(ignore_index), bool(return_entropy),
        bool(inplace_backward), need_stats)
    logprobs = logprobs.view(labels.shape)
    if return_entropy:
        return logprobs, entropy.view(labels.shape)
    return logprobs


def linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False):
    """token_logprobs of `hidden @ weight.T + bias` without ever holding the (N, V) logits.

    hidden: (..., D); weight: (V, D) and bias: (V,), both in hidden's dtype; labels: (...). Differentiable in
    hidden, weight and bias. The matmuls run in the input dtype; log-probs and entropy come back as float32.
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    check_devices(("hidden", hidden), ("weight", weight), ("labels", labels), ("bias", bias))
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden: expected shape (..., D) with D >= 1, got {tuple(hidden.shape)}")
    check_tensor("weight", weight, dtypes=(hidden.dtype,), ndim=2)
    if weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight: expected shape (V, {hidden.shape[-1]}) with V >= 1, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(hidden.dtype,), ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _check_common(labels, hidden.shape[:-1], "hidden.shape[:-1]", temperature, ignore_index)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    need_stats = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    logprobs, _, entropy = torch.ops.rto_fast.linear_token_logprobs_fwd(
        hidden_2d, weight, labels.reshape(-1).long(), bias, float(temperature), int(ignore_index),
        bool(return_entropy), need_stats)
    logprobs = logprobs.view(labels.shape)
    if return_entropy:
        return logprobs, entropy.view(labels.shape)
    return logprobs
