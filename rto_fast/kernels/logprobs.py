"""Triton kernels for per-token log-probs and entropy, and their launchers.

    from rto_fast.kernels.logprobs import logprobs_forward, logprobs_backward
    logprobs, row_stats, entropy = logprobs_forward(logits_NV, labels_N, temperature=1.0, return_entropy=True)
    grad_logits_NV = logprobs_backward(logits_NV, labels_N, row_stats, entropy, grad_logprobs, grad_entropy)

No autograd and no input checks here (`rto_fast.ops.logprobs` does both): labels must already be inside
[0, V) or equal to `ignore_index`, logits a 2-D (N, V) tensor whose last dimension is contiguous.

Forward: one program per row (or per row and vocabulary split) streams the row in blocks, keeping an online max m,
s = sum exp(z - m) and, for the entropy, t = sum exp(z - m) * (z - m), all in float32 (z = logits / temperature).
The float32 log-softmax is never materialized. Then log p(label) = (z[label] - m) - log s and
H = log s - t / s. When rows are few, the vocabulary is split over `split` programs per row and a second, tiny
kernel combines the partial (m, s, t) with rescaling. Rows whose label is `ignore_index` issue no loads (masked)
and give log-prob 0 and entropy 0. Each row saves `row_stats` = (m, log s) for backward rather than lse = m + log s:
log p = (z - m) - log s is exact to a rounding step of log p, while z - lse loses a rounding step of |lse| (large
for large logits), which costs float32 gradients a few bits.

Backward: with log p = (z - m) - log s and p = exp(log p), grad_z = g_lp * (onehot - p) + g_H * (-p * (log p + H)),
divided by the temperature, zero on ignored rows, written in the logits dtype; `out` may be the logits tensor
itself (in-place backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FORWARD_BLOCK = 4096
BACKWARD_BLOCK = 4096
MAX_SPLIT = 64
# Whether the forward streams prefetch the next block (see _online_block_update); off until measured on a GPU.
FORWARD_PREFETCH = False


@triton.jit
def _online_block_update(row_ptr, col_start, col_end, n_blocks, inv_temperature, active,
                         BLOCK: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr, PREFETCH: tl.constexpr):
    """Stream columns [col_start, col_end) of one row; return (m, s, t) of z = x * inv_temperature.

    One cross-warp reduction per block (the max): s and t are kept per lane, relative to the common running max,
    and summed once at the end. (Reducing s and t every block as well cost two more barrier-synchronised
    reductions per 4096 columns.) PREFETCH issues the next block's load before the current block's arithmetic, so
    each program keeps a load in flight through its max reduction (a block of registers more per thread)."""
    offsets = tl.arange(0, BLOCK)
    # The running max starts at a finite stand-in for -inf: exp(m_old - m_new) is then a clean 0, never the NaN of
    # (-inf) - (-inf) when a whole block is -inf (masked vocabulary entries, padding columns, ignored rows).
    m = -1.0e30
    s_lanes = tl.zeros((BLOCK,), tl.float32)
    t_lanes = tl.zeros((BLOCK,), tl.float32)
    # Inactive rows (ignore_index) get an empty column range: their masked loads touch no memory.
    col_limit = tl.where(active, col_end, col_start)
    if PREFETCH:
        cols = col_start + offsets
        x_next = tl.load(row_ptr + cols, mask=cols < col_limit, other=float("-inf"))
    for block in range(0, n_blocks):
        if PREFETCH:
            x = x_next.to(tl.float32)
            # The block after the last is past col_limit: a fully masked load, no memory traffic.
            cols = col_start + (block + 1) * BLOCK + offsets
            x_next = tl.load(row_ptr + cols, mask=cols < col_limit, other=float("-inf"))
        else:
            cols = col_start + block * BLOCK + offsets
            x = tl.load(row_ptr + cols, mask=cols < col_limit, other=float("-inf")).to(tl.float32)
        z = x * inv_temperature
        new_m = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - new_m)
        shifted = z - new_m
        e = tl.exp(shifted)
        if COMPUTE_ENTROPY:
            # Rescale t to the new max: sum e^(z-m)(z-m) -> alpha * (t + (m - new_m) * s). Where e is 0 (masked or
            # -inf columns) the term is 0, never 0 * -inf.
            t_lanes = alpha * (t_lanes + (m - new_m) * s_lanes) + e * tl.where(e > 0.0, shifted, 0.0)
        s_lanes = alpha * s_lanes + e
        m = new_m
    return m, tl.sum(s_lanes, axis=0), tl.sum(t_lanes, axis=0)


@triton.jit
def _label_logit(row_ptr, label, valid, inv_temperature):
    safe_label = tl.where(valid, label, 0)
    return tl.load(row_ptr + safe_label, mask=valid, other=0.0).to(tl.float32) * inv_temperature


@triton.jit
def _logprobs_fwd_kernel(logits_ptr, stride_row, labels_ptr, logprobs_ptr, stats_ptr, entropy_ptr,
                         part_m_ptr, part_s_ptr, part_t_ptr, vocab_size, split_cols, n_blocks,
                         inv_temperature, ignore_index, BLOCK: tl.constexpr, SPLIT: tl.constexpr,
                         COMPUTE_ENTROPY: tl.constexpr, PREFETCH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    col_start = part * split_cols
    col_end = tl.minimum(col_start + split_cols, vocab_size)
    m, s, t = _online_block_update(row_ptr, col_start, col_end, n_blocks, inv_temperature, valid,
                                   BLOCK, COMPUTE_ENTROPY, PREFETCH)
    if SPLIT == 1:
        s = tl.where(valid, s, 1.0)  # 0 on ignored rows; 0 on an all -inf row gives NaN outputs, as torch does
        log_s = tl.log(s)
        label_z = _label_logit(row_ptr, label, valid, inv_temperature)
        tl.store(logprobs_ptr + row, tl.where(valid, (label_z - m) - log_s, 0.0))
        tl.store(stats_ptr + 2 * row, tl.where(valid, m, 0.0))
        tl.store(stats_ptr + 2 * row + 1, tl.where(valid, log_s, 0.0))
        if COMPUTE_ENTROPY:
            tl.store(entropy_ptr + row, tl.where(valid, log_s - t / s, 0.0))
    else:
        tl.store(part_m_ptr + row * SPLIT + part, m)
        tl.store(part_s_ptr + row * SPLIT + part, s)
        if COMPUTE_ENTROPY:
            tl.store(part_t_ptr + row * SPLIT + part, t)


@triton.jit
def _logprobs_combine_kernel(logits_ptr, stride_row, labels_ptr, logprobs_ptr, stats_ptr, entropy_ptr,
                             part_m_ptr, part_s_ptr, part_t_ptr, inv_temperature, ignore_index,
                             SPLIT: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    parts = tl.arange(0, SPLIT)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    part_m = tl.load(part_m_ptr + row * SPLIT + parts)
    part_s = tl.load(part_s_ptr + row * SPLIT + parts)
    m = tl.max(part_m, axis=0)
    scale = tl.exp(part_m - m)
    s = tl.sum(part_s * scale, axis=0)
    s = tl.where(valid, s, 1.0)  # 0 on ignored rows; 0 on an all -inf row gives NaN outputs, as torch does
    log_s = tl.log(s)
    label_z = _label_logit(logits_ptr + row * stride_row, label, valid, inv_temperature)
    tl.store(logprobs_ptr + row, tl.where(valid, (label_z - m) - log_s, 0.0))
    tl.store(stats_ptr + 2 * row, tl.where(valid, m, 0.0))
    tl.store(stats_ptr + 2 * row + 1, tl.where(valid, log_s, 0.0))
    if COMPUTE_ENTROPY:
        part_t = tl.load(part_t_ptr + row * SPLIT + parts)
        # Each part's t is relative to its own max: shift by (part_m - m) like the online update does.
        shifted = tl.where(part_s > 0.0, scale * (part_t + (part_m - m) * part_s), 0.0)
        t = tl.sum(shifted, axis=0)
        tl.store(entropy_ptr + row, tl.where(valid, log_s - t / s, 0.0))


@triton.jit
def _logprobs_bwd_kernel(logits_ptr, stride_row, grad_ptr, stride_grad_row, labels_ptr, stats_ptr, entropy_ptr,
                         grad_logprobs_ptr, grad_entropy_ptr, vocab_size, inv_temperature, ignore_index,
                         BLOCK: tl.constexpr, HAS_GRAD_LOGPROBS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < vocab_size
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    x = tl.load(logits_ptr + row * stride_row + cols, mask=cols < tl.where(valid, vocab_size, 0),
                other=0.0).to(tl.float32)
    log_p = (x * inv_temperature - tl.load(stats_ptr + 2 * row)) - tl.load(stats_ptr + 2 * row + 1)
    p = tl.exp(log_p)
    grad = tl.zeros((BLOCK,), tl.float32)
    if HAS_GRAD_LOGPROBS:
        g_lp = tl.load(grad_logprobs_ptr + row).to(tl.float32)
        grad += g_lp * (tl.where(cols == label, 1.0, 0.0) - p)
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + row).to(tl.float32)
        entropy = tl.load(entropy_ptr + row)
        grad -= g_h * p * tl.where(p > 0.0, log_p + entropy, 0.0)  # -inf logits: 0, not 0 * -inf
    grad = tl.where(valid, grad * inv_temperature, 0.0)
    tl.store(grad_ptr + row * stride_grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so that tests of a few rows exercise the split path


def choose_split(n_rows: int, vocab_size: int, device: torch.device, block: int = FORWARD_BLOCK) -> int:
    """Vocabulary splits per row: 1 when rows fill the GPU (>= 2 programs per SM), else a power of 2 that does."""
    n_sms = _num_sms(device)
    if n_rows >= 2 * n_sms:
        return 1
    wanted = triton.cdiv(4 * n_sms, max(n_rows, 1))
    n_blocks = triton.cdiv(vocab_size, block)
    split = 1
    while split < wanted and split * 2 <= min(n_blocks, MAX_SPLIT):
        split *= 2
    return split


def _forward_block(vocab_size: int) -> int:
    return min(FORWARD_BLOCK, triton.next_power_of_2(vocab_size))


def logprobs_forward(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False, split=None,
                     block=None, out=None, num_warps=None, prefetch=None):
    """(logprobs (N,), row_stats (N, 2) = (max z, log sum exp(z - max z)), entropy (N,) or None), all float32.

    `split`: vocabulary splits per row (a power of 2), chosen by `choose_split` when None. `block`: columns per
    step (a power of 2; tests force small ones). `out`: optional float32 (N,) buffer for the log-probs (every
    element is written). `num_warps`: per program (bench/tune_logprobs.py sweeps it); None: 8 for blocks of 2048
    columns or more, else 4. `prefetch`: load the next block before reducing the current one (None:
    FORWARD_PREFETCH).
    """
    n_rows, vocab_size = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    labels = labels.contiguous()
    device = logits.device
    block = block or _forward_block(vocab_size)
    if split is None:
        split = choose_split(n_rows, vocab_size, device, block)
    if split < 1 or split & (split - 1):
        raise ValueError(f"split: expected a power of 2, got {split}")
    logprobs = out if out is not None else torch.empty(n_rows, device=device, dtype=torch.float32)
    row_stats = torch.empty(n_rows, 2, device=device, dtype=torch.float32)
    entropy = torch.empty(n_rows, device=device, dtype=torch.float32) if return_entropy else None
    if n_rows == 0:
        return logprobs, row_stats, entropy
    # Columns per split, a multiple of the block so that splits never share a block.
    split_cols = triton.cdiv(triton.cdiv(vocab_size, split), block) * block
    if split > 1:
        part_m = torch.empty(n_rows, split, device=device, dtype=torch.float32)
        part_s = torch.empty_like(part_m)
        part_t = torch.empty_like(part_m) if return_entropy else part_m
    else:
        part_m = part_s = part_t = logprobs  # unused
    entropy_arg = entropy if entropy is not None else logprobs
    inv_temperature = 1.0 / float(temperature)
    num_warps = num_warps or (8 if block >= 2048 else 4)
    _logprobs_fwd_kernel[(n_rows, split)](
        logits, logits.stride(0), labels, logprobs, row_stats, entropy_arg, part_m, part_s, part_t, vocab_size,
        split_cols, split_cols // block, inv_temperature, ignore_index, BLOCK=block, SPLIT=split,
        COMPUTE_ENTROPY=return_entropy, PREFETCH=FORWARD_PREFETCH if prefetch is None else bool(prefetch),
        num_warps=num_warps)
    if split > 1:
        _logprobs_combine_kernel[(n_rows,)](
            logits, logits.stride(0), labels, logprobs, row_stats, entropy_arg, part_m, part_s, part_t,
            inv_temperature, ignore_index, SPLIT=split, COMPUTE_ENTROPY=return_entropy, num_warps=1)
    return logprobs, row_stats, entropy


def logprobs_backward(logits, labels, row_stats, entropy, grad_logprobs, grad_entropy, *, temperature=1.0,
                      ignore_index=-100, out=None, block=None, num_warps=None):
    """grad of the logits (N, V) in the logits dtype; `out` may be `logits` itself (overwritten in place).

    `grad_logprobs` / `grad_entropy`: float (N,) or None (no gradient through that output); `entropy` is needed
    only with `grad_entropy`. `block` (columns per program, a power of 2) and `num_warps`: None for the defaults.
    """
    n_rows, vocab_size = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    labels = labels.contiguous()
    if out is None:
        out = torch.empty_like(logits)
    if n_rows == 0:
        return out
    block = block or min(BACKWARD_BLOCK, triton.next_power_of_2(vocab_size))
    has_lp = grad_logprobs is not None
    has_h = grad_entropy is not None
    grid = (n_rows, triton.cdiv(vocab_size, block))
    row_stats = row_stats.contiguous()
    _logprobs_bwd_kernel[grid](
        logits, logits.stride(0), out, out.stride(0), labels, row_stats, entropy if has_h else row_stats,
        grad_logprobs.contiguous() if has_lp else row_stats, grad_entropy.contiguous() if has_h else row_stats,
        vocab_size,
        1.0 / float(temperature), ignore_index, BLOCK=block, HAS_GRAD_LOGPROBS=has_lp, HAS_GRAD_ENTROPY=has_h,
        num_warps=num_warps or (8 if block >= 2048 else 4))
    return out
