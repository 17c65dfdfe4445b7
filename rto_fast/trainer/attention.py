"""Attention for packed streams: one backend per process, plugged into transformers; `packed_forward` calls a model.

Usage:
    from rto_fast.attention import packed_forward
    logits = packed_forward(model, batch).logits        # batch: rto_fast.packing.PackedBatch, a (1, N) stream

`packed_forward` calls the model with `input_ids`, `position_ids` (restarting at 0 per sequence), `use_cache=False`
and NO `attention_mask`, plus `cu_seq_lens_q/k` and `max_length_q/k` for flash-style backends. The KV cache and an
attention mask are exactly what would make transformers attend across sequences (DESIGN.md "Traps").

Backends, decided once per process and device type and logged (`logging`, logger `rto_fast.attention`):
- CUDA: flash-attn's varlen kernel when `flash_attn` imports; else `torch.nn.attention.varlen.varlen_attn` when this
  torch has it; else FlexAttention with a document mask. These run inside the attention function registered with
  transformers as "rto_fast_packed" (`AttentionInterface.register`), so any causal LM built on transformers'
  attention interface works. flash and varlen need fp16/bf16 inputs: fp32 calls go to FlexAttention.
- CPU: "packed_sdpa", the registered function running sdpa per sequence (one batched call over the sequences
  padded to the longest when that wastes little, else one call each). Measured on the tiny model, 16
  sequences of 90 tokens, forward + backward: 0.028 s against 0.113 s for transformers' own "sdpa" implementation,
  which splits documents from `position_ids` with an (N, N) mask and so does quadratic work in the whole stream.
Force one with RTO_FAST_ATTENTION=packed_sdpa|sdpa|flex|flash|varlen (or `set_backend(name)` in tests); on CPU "flex" runs
FlexAttention unfused (slow, forward only: torch has no CPU flex backward; for testing the registered path).

Gemma-2's soft-capped scores and sliding windows shorter than a sequence go to flash-attn (its softcap and
window_size) or FlexAttention (a score_mod and a windowed document mask; torch's varlen kernel takes windows, not
soft-capping). What no backend here takes runs written out per sequence (one batched call over the sequences padded
to the longest; float32 scores, memory quadratic in the longest sequence; one warning): gpt-oss's attention sinks,
and on CPU the soft-capping and windows too.

Calls that are not packed streams (generation: a padding mask, a KV cache, several rows) take a plain masked sdpa
path inside the registered function, so `model.generate` still works with the packed implementation set; the
trainer samples under `generation_attention` (transformers' sdpa, or its eager attention for models without sdpa
support, such as Gemma-2).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import warnings

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask


logger = logging.getLogger(__name__)

BACKENDS = ("packed_sdpa", "sdpa", "flex", "flash", "varlen")
ENV_VAR = "RTO_FAST_ATTENTION"
PACKED_IMPLEMENTATION = "rto_fast_packed"
# Implementations that find sequence boundaries from position_ids themselves and need no cu_seqlens keywords.
_POSITION_IDS_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")

_forced_backend: str | None = None
_chosen: dict[str, str] = {}


# ------------------------------------------------------------------------------------------------ backend choice

def set_backend(name: str | None) -> None:
    """Test hook: force a backend for this process (None: back to RTO_FAST_ATTENTION or automatic). Clears the
    cached choice."""
    global _forced_backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    _forced_backend = name
    _chosen.clear()


def chosen_backends() -> dict[str, str]:
    """{device type: backend} decided so far in this process (for logs and benchmark reports)."""
    return dict(_chosen)


def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # a broken build raises more than ImportError
        return False
    return True


@functools.cache
def _torch_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def select_backend(device: torch.device | str | None = None) -> str:
    """The packed-attention backend for `device` ('cuda' when available, else 'cpu', when None); decided once per
    device type and logged."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    if device_type in _chosen:
        return _chosen[device_type]
    forced = _forced_backend or os.environ.get(ENV_VAR) or None
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {forced!r}")
        if forced == "flash" and not _flash_attn_available():
            raise RuntimeError(f"{ENV_VAR}=flash but flash_attn does not import")
        if forced == "varlen" and _torch_varlen_attn() is None:
            raise RuntimeError(f"{ENV_VAR}=varlen but torch {torch.__version__} has no torch.nn.attention.varlen")
        if forced in ("flash", "varlen") and device_type != "cuda":
            raise RuntimeError(f"{ENV_VAR}={forced} needs CUDA tensors, not {device_type}")
        backend, reason = forced, f"forced by {ENV_VAR} or set_backend"
    elif device_type == "cuda":
        if _flash_attn_available():
            backend, reason = "flash", "flash_attn imports"
        elif _torch_varlen_attn() is not None:
            backend, reason = "varlen", "torch.nn.attention.varlen is available, flash_attn is not"
        else:
            backend, reason = "flex", "neither flash_attn nor torch varlen attention is available"
    else:
        backend, reason = "packed_sdpa", f"{device_type} tensors: sdpa once per sequence"
    _chosen[device_type] = backend
    logger.info("rto_fast packed attention on %s: %s (%s)", device_type, backend, reason)
    return backend


def model_attn_implementation(device: torch.device | str | None = None) -> str:
    """The `attn_implementation` to give `from_pretrained` / `from_config` for packed streams on `device`."""
    if select_backend(device) == "sdpa":
        return "sdpa"
    register_packed_attention()
    return PACKED_IMPLEMENTATION


def configure_packed_attention(model: torch.nn.Module, device: torch.device | str | None = None) -> str:
    """Switch an already built transformers model to the implementation for `device` (default: its parameters'
    device); returns the implementation name."""
    if device is None:
        device = next(model.parameters()).device
    implementation = model_attn_implementation(device)
    if _model_config(model)._attn_implementation != implementation:
        model.set_attn_implementation(implementation)
    return implementation


@contextlib.contextmanager
def generation_attention(model: torch.nn.Module):
    """Run `model.generate` under transformers' own "sdpa": it builds the causal + padding mask once per forward
    pass, where the packed implementation's padded fallback (`_masked_sdpa`) rebuilds it in every layer, ~10 small
    kernels per layer and decode step. A model without sdpa support (Gemma-2) runs transformers' "eager", which
    builds its soft-capped, sliding-window attention. Restores the model's implementation afterwards; a model that
    can switch to neither keeps its own."""
    config = _model_config(model)
    original = config._attn_implementation
    switched = False
    if original == PACKED_IMPLEMENTATION:
        for implementation in ("sdpa", "eager"):  # eager: models without sdpa support (Gemma-2's soft-capping)
            try:
                model.set_attn_implementation(implementation)
            except (ValueError, ImportError, AttributeError) as error:
                logger.debug("generation cannot use %s attention: %s", implementation, error)
                continue
            switched = config._attn_implementation == implementation
            if switched:
                break
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(original)


@functools.cache
def register_packed_attention() -> None:
    """Register "rto_fast_packed" with transformers (attention function and mask function); idempotent."""
    AttentionInterface.register(PACKED_IMPLEMENTATION, packed_attention)
    # Like flash attention: no (N, N) mask is ever built; a 2D padding mask (generation) is passed through as is.
    AttentionMaskInterface.register(PACKED_IMPLEMENTATION, flash_attention_mask)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model a DeepSpeed engine or DDP wraps (its `.module`), else `model` itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def forward_parameters(model: torch.nn.Module) -> frozenset:
    """Names of the keyword arguments `model`'s forward takes (of the model a DeepSpeed engine or DDP wraps)."""
    return _forward_parameters(type(unwrapped(model)))


@functools.cache
def _forward_parameters(model_class: type) -> frozenset:
    return frozenset(inspect.signature(model_class.forward).parameters)


# ------------------------------------------------------------------------------------------------ the call

def _model_config(model: torch.nn.Module):
    config = getattr(unwrapped(model), "config", None)  # not a DeepSpeed engine's own .config: the model's
    if config is None:
        raise TypeError(f"{type(model).__name__} has no transformers config")
    return config


def packed_forward(model: torch.nn.Module, batch, **model_kwargs):
    """Run `model` on a packed `(1, N)` stream (`rto_fast.packing.PackedBatch`) and return the model's output.

    Always `use_cache=False` and no `attention_mask`; `model_kwargs` go to the model (e.g. `output_hidden_states`).
    The batch is moved to the model's device when it is elsewhere."""
    for name in ("attention_mask", "use_cache", "past_key_values"):
        if name in model_kwargs:
            raise ValueError(f"packed_forward: {name} must not be passed; packed streams never use it")
    device = next(model.parameters()).device
    if batch.input_ids.device != device:
        batch = batch.to(device)
    call_kwargs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    if _model_config(model)._attn_implementation not in _POSITION_IDS_IMPLEMENTATIONS:
        # Flash-style backends (ours and transformers' flash_attention_*) read the boundaries directly.
        call_kwargs.update(cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
                           max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen)
    return model(**call_kwargs, **model_kwargs)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(1, N) position_ids restarting at 0 per sequence -> (cu_seqlens int32 (S+1,), max_seqlen)."""
    positions = position_ids.reshape(-1)
    starts = torch.nonzero(positions == 0).flatten()
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    total = torch.tensor([positions.numel()], device=positions.device, dtype=starts.dtype)
    cu_seqlens = torch.cat([starts, total]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None, **kwargs):
    """The attention function registered as "rto_fast_packed". query (B, H, T, D), key/value (B, Hkv, S, D);
    returns ((B, T, H, D), None) like transformers' own implementations."""
    batch_size, num_heads, q_length, head_dim = query.shape
    kv_length = key.shape[2]
    if scaling is None:
        scaling = head_dim**-0.5
    packed_stream = batch_size == 1 and attention_mask is None and q_length == kv_length
    if not packed_stream:
        window = kwargs.get("sliding_window")
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or (window and kv_length > window):
            # generation_attention switches such models to transformers' eager attention, which builds their masks
            raise NotImplementedError("rto_fast packed attention: a padded or cached call of a model with score "
                                      "soft-capping, attention sinks or a sliding window shorter than the keys; run "
                                      "it under rto_fast.attention.generation_attention (transformers' attention)")
        return _masked_sdpa(query, key, value, attention_mask, scaling), None

    if cu_seq_lens_q is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(q_length, device=query.device)[None]
        cu_seq_lens_q, max_length_q = cu_seqlens_from_position_ids(position_ids)
    elif max_length_q is None:
        max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    softcap, sinks, sliding_window = kwargs.get("softcap"), kwargs.get("s_aux"), kwargs.get("sliding_window")
    if sliding_window is not None and max_length_q <= sliding_window:
        sliding_window = None  # every sequence fits in the window: plain causal attention
    shaped = softcap is not None or sliding_window is not None  # flash-attn and FlexAttention take both

    backend = select_backend(query.device)
    if backend in ("flash", "varlen") and query.dtype not in (torch.float16, torch.bfloat16):
        _warn_fp32_fallback(backend)
        backend = "flex"
    if backend == "varlen" and (softcap is not None or (sliding_window is not None and not _varlen_takes_windows())):
        backend = "flex"  # torch's varlen kernel has no score soft-capping (and before 2.10-ish no window_size)
    if sinks is not None or (shaped and backend in ("packed_sdpa", "sdpa")):
        # What no backend here takes (gpt-oss's attention sinks; on CPU also Gemma-2's soft-capping and windows
        # shorter than a sequence): exact attention per sequence, written out (memory quadratic in its length).
        backend = "written_out"
        _warn_written_out_attention(softcap is not None, sinks is not None, sliding_window is not None)
    if dropout > 0.0 and backend != "flash":
        raise NotImplementedError(f"attention dropout {dropout} is not supported by the {backend} packed backend "
                                  "(flash-attn's is the only one that applies it): turn the model's dropout off "
                                  "(the trainer does unless model.keep_dropout is set; rto_fast.models."
                                  "disable_dropout)")
    cu_seqlens = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
    if backend == "flash":
        output_THD = _flash(query, key, value, cu_seqlens, int(max_length_q), dropout, scaling, softcap,
                            sliding_window)
    elif backend == "varlen":
        output_THD = _varlen(query, key, value, cu_seqlens, int(max_length_q), scaling, sliding_window)
    elif backend == "flex":
        return _flex(query, key, value, cu_seqlens, scaling, softcap, sliding_window), None
    elif backend == "written_out":
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        output_THD = _padded_attention(query, key, value, cu_seqlens.long(), lengths, scaling, softcap=softcap,
                                       sinks=sinks, sliding_window=sliding_window)
    else:
        output_THD = _per_sequence_sdpa(query, key, value, cu_seqlens, scaling)
    return output_THD.unsqueeze(0), None


@functools.cache
def _warn_fp32_fallback(backend: str) -> None:
    logger.warning("rto_fast packed attention: %s needs fp16/bf16 inputs; fp32 calls use FlexAttention", backend)


def _to_THD(tensor_BHTD: torch.Tensor) -> torch.Tensor:
    # Usually already contiguous: models build q/k/v as (B, T, H, D) and transpose to (B, H, T, D).
    return tensor_BHTD[0].transpose(0, 1).contiguous()


def _flash(query, key, value, cu_seqlens, max_seqlen, dropout, scaling, softcap=None, sliding_window=None):
    from flash_attn import flash_attn_varlen_func

    options = {}
    if softcap is not None:
        options["softcap"] = softcap
    if sliding_window is not None:  # key j seen from query i when i - window < j <= i
        options["window_size"] = (sliding_window - 1, 0)
    # flash-attn handles grouped-query attention itself (fewer KV heads).
    return flash_attn_varlen_func(_to_THD(query), _to_THD(key), _to_THD(value), cu_seqlens, cu_seqlens,
                                  max_seqlen, max_seqlen, dropout_p=dropout, softmax_scale=scaling, causal=True,
                                  **options)


def _repeat_kv_heads(tensor_BHTD: torch.Tensor, num_heads: int) -> torch.Tensor:
    repeats = num_heads // tensor_BHTD.shape[1]
    return tensor_BHTD if repeats == 1 else tensor_BHTD.repeat_interleave(repeats, dim=1)


def _varlen_takes_windows() -> bool:
    varlen_attn = _torch_varlen_attn()
    return varlen_attn is not None and "window_size" in inspect.signature(varlen_attn).parameters


def _varlen(query, key, value, cu_seqlens, max_seqlen, scaling, sliding_window=None):
    varlen_attn = _torch_varlen_attn()
    parameters = inspect.signature(varlen_attn).parameters
    options = {}
    # The causal switch changed name across torch versions (is_causal in 2.10, window_size later).
    if "window_size" in parameters:
        # (left, right): key j seen from query i when i - left <= j <= i + right; -1 is unbounded.
        options["window_size"] = (-1 if sliding_window is None else sliding_window - 1, 0)
    elif "is_causal" in parameters:
        options["is_causal"] = True
    else:
        raise RuntimeError(f"torch {torch.__version__} varlen_attn has no causal option")
    if "scale" in parameters:
        options["scale"] = scaling
    elif abs(scaling - query.shape[-1] ** -0.5) > 1e-12:
        raise RuntimeError(f"torch {torch.__version__} varlen_attn takes no scale; the model needs {scaling}")
    num_heads = query.shape[1]
    if key.shape[1] != num_heads:
        if "enable_gqa" in parameters:
            options["enable_gqa"] = True
        else:
            key, value = _repeat_kv_heads(key, num_heads), _repeat_kv_heads(value, num_heads)
    return varlen_attn(_to_THD(query), _to_THD(key), _to_THD(value), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                       **options)


_block_mask_cache: tuple = (None, None, {})  # (cu_seqlens, inference mode, {window: BlockMask})


def _document_block_mask(cu_seqlens: torch.Tensor, length: int, sliding_window: int | None = None):
    """BlockMask for causal attention within documents (and within `sliding_window` when given); cached for the last
    cu_seqlens tensor, which every layer of one forward pass shares (per window: sliding and global layers
    alternate in some models). A mask made in inference mode holds inference tensors that autograd refuses, and DPO
    scores a batch with the frozen reference (inference mode) before the policy trains on the same batch: the mode
    is part of the cache key."""
    global _block_mask_cache
    inference = torch.is_inference_mode_enabled()
    cached_cu_seqlens, cached_inference, cached_masks = _block_mask_cache
    if cached_cu_seqlens is not cu_seqlens or cached_inference != inference:
        cached_masks = {}
        _block_mask_cache = (cu_seqlens, inference, cached_masks)
    if sliding_window in cached_masks:
        return cached_masks[sliding_window]
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    document_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)

    def document_causal(batch, head, q_index, kv_index):
        return (document_ids[q_index] == document_ids[kv_index]) & (kv_index <= q_index)

    def document_causal_window(batch, head, q_index, kv_index):
        return document_causal(batch, head, q_index, kv_index) & (kv_index > q_index - sliding_window)

    options = {}
    if cu_seqlens.is_cuda and "_compile" in inspect.signature(create_block_mask).parameters:
        options["_compile"] = True  # uncompiled, create_block_mask materializes the (N, N) mask first
    block_mask = create_block_mask(document_causal if sliding_window is None else document_causal_window, None, None,
                                   length, length, device=cu_seqlens.device, **options)
    cached_masks[sliding_window] = block_mask
    return block_mask


@functools.cache
def _flex_attention_function(device_type: str):

    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        # Unfused flex materializes the (N, N) scores; compiled it is a fused kernel.
        return torch.compile(flex_attention)
    # The CPU path exists for tests of the registered function: eager is enough.
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    return flex_attention


def _flex(query, key, value, cu_seqlens, scaling, softcap=None, sliding_window=None):
    block_mask = _document_block_mask(cu_seqlens, query.shape[2], sliding_window)
    flex_attention = _flex_attention_function(query.device.type)
    options = {}
    if softcap is not None:
        def soft_capped(score, batch, head, q_index, kv_index):
            return torch.tanh(score / softcap) * softcap

        options["score_mod"] = soft_capped
    output_BHTD = flex_attention(query, key, value, block_mask=block_mask, scale=scaling,
                                 enable_gqa=key.shape[1] != query.shape[1], **options)
    return output_BHTD.transpose(1, 2).contiguous()


# Pad the sequences of a stream into one batched sdpa call when that computes at most this many times the
# attention scores of the per-sequence calls (one Python-level call per sequence and layer costs more than a
# little padding: 22 sequences of ~90 tokens, forward + backward, 6.6 ms padded vs 10.8 ms one by one).
PADDED_WASTE_LIMIT = 2.0


def _per_sequence_sdpa(query, key, value, cu_seqlens, scaling, padded: bool | None = None):
    """Exact per-document causal sdpa: one batched call over the sequences padded to the longest, or one call per
    sequence when padding would waste too much (`padded` forces a choice). The CPU path of the packed
    implementation."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if padded is None:
        longest = int(lengths.max())
        padded = lengths.numel() * longest**2 <= PADDED_WASTE_LIMIT * float((lengths.float() ** 2).sum())
    if padded:
        return _padded_attention(query, key, value, cu_seqlens.long(), lengths, scaling)
    num_heads = query.shape[1]
    key, value = _repeat_kv_heads(key, num_heads), _repeat_kv_heads(value, num_heads)
    outputs = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        outputs.append(F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end],
                                                      value[:, :, start:end], is_causal=True, scale=scaling))
    return torch.cat(outputs, dim=2)[0].transpose(0, 1)


# sdpa takes fewer key/value heads than query heads itself from torch 2.5 (no repeated copies to gather).
_SDPA_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


@functools.cache
def _warn_written_out_attention(softcap: bool, sinks: bool, window: bool) -> None:
    needs = [name for name, needed in (("score soft-capping", softcap), ("attention sinks", sinks),
                                       ("a sliding window shorter than its sequences", window)) if needed]
    logger.warning("rto_fast packed attention: the model needs %s, which the packed backend here does not take: "
                   "attention runs per sequence, written out (memory quadratic in the longest sequence)",
                   " and ".join(needs))


def _padded_attention(query, key, value, cu_seqlens, lengths, scaling, softcap=None, sinks=None,
                      sliding_window=None):
    """(N, H, D) causal attention of each sequence of a (1, H, N, D) stream, as one batched call on (S, H, L, D):
    sdpa, or written out when the model soft-caps its scores (`softcap`: c * tanh(s / c), Gemma-2), has per-head
    attention sinks (`sinks`: an extra logit in each softmax row, dropped after it, gpt-oss) or a `sliding_window`
    (key j seen from query i when i - window < j <= i).

    Rows are gathered with index_select on the (N, H, D) token-major view (what the projections wrote; one row copy
    per token, and its backward is an index_add) into a (S, L, H, D) buffer that sdpa reads through a transposed
    view, and the valid rows are selected back the same way: ~1.5x faster forward + backward than advanced indexing
    over the head-major view plus a boolean-mask select (tiny Llama, 23 sequences of 80-100 tokens)."""
    sequences, longest = lengths.numel(), int(lengths.max())
    positions = torch.arange(longest, device=query.device)
    valid = positions[None, :] < lengths[:, None]  # (S, L)
    index = (cu_seqlens[:-1, None] + positions[None, :]).clamp(max=query.shape[2] - 1).reshape(-1)

    def gather(tensor):  # (1, h, N, D) -> (S, h, L, D)
        rows = tensor[0].transpose(0, 1)  # (N, h, D)
        return rows.index_select(0, index).view(sequences, longest, *rows.shape[1:]).transpose(1, 2)

    written_out = softcap is not None or sinks is not None or sliding_window is not None
    gqa = {}
    if key.shape[1] != query.shape[1]:
        if _SDPA_GQA and not written_out:
            gqa = {"enable_gqa": True}
        else:
            key, value = _repeat_kv_heads(key, query.shape[1]), _repeat_kv_heads(value, query.shape[1])
    causal = torch.ones(longest, longest, dtype=torch.bool, device=query.device).tril()
    if sliding_window is not None:
        causal &= torch.ones_like(causal).triu(1 - sliding_window)
    # Padded keys are masked out; padded query rows still see their causal prefix, and themselves: never an empty
    # row (a window can leave a padded row no valid key), whose NaN would reach the gradients through the backward.
    mask = (causal[None, None] & valid[:, None, None, :]) | torch.eye(longest, dtype=torch.bool, device=query.device)
    if written_out:
        output = _written_out_attention(gather(query), gather(key), gather(value), mask, scaling, softcap, sinks)
    else:
        output = F.scaled_dot_product_attention(gather(query), gather(key), gather(value), attn_mask=mask,
                                                scale=scaling, **gqa)
    rows = output.transpose(1, 2).reshape(sequences * longest, query.shape[1], query.shape[3])
    return rows.index_select(0, valid.reshape(-1).nonzero().squeeze(1))


def _written_out_attention(query, key, value, mask, scaling, softcap, sinks):
    """softmax over (scores, soft-capped) with a boolean `mask` (True: attend), in float32; (B, H, L, D) each."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
        probs = torch.softmax(scores, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(value.dtype), value)


def _masked_sdpa(query, key, value, attention_mask, scaling):
    """Generation and padded batches: causal (offset by the cached length) and padding mask, plain sdpa."""
    q_length, kv_length = query.shape[2], key.shape[2]
    num_heads = query.shape[1]
    key, value = _repeat_kv_heads(key, num_heads), _repeat_kv_heads(value, num_heads)
    q_positions = torch.arange(q_length, device=query.device)[:, None] + (kv_length - q_length)
    allowed = torch.arange(kv_length, device=query.device)[None, :] <= q_positions  # (T, S)
    allowed = allowed[None, None]
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            allowed = allowed & attention_mask[:, None, None, -kv_length:].bool()
        elif attention_mask.dtype == torch.bool:
            allowed = allowed & attention_mask
        else:
            allowed = allowed & (attention_mask == 0)
        # A padding query row that sees nothing would give NaN; let it see itself (its output is never used).
        blind = ~allowed.any(dim=-1, keepdim=True)
        diagonal = torch.arange(kv_length, device=query.device)[None, :] == q_positions
        allowed = allowed | (blind & diagonal[None, None])
    output_BHTD = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    return output_BHTD.transpose(1, 2).contiguous()
