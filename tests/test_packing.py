"""Packed micro-batches, packed attention and the models around them.

- planning: first-fit-decreasing respects the budget, places every sequence once; rank balancing;
- packing: labels shifted within each sequence, position_ids, cu_seqlens, unpacking helpers;
- attention: for a tiny Llama, GPT-NeoX, Qwen2 and Qwen3 (fp32, random weights) packed logits equal each sequence's own
  logits on every CPU path; Gemma-2 (soft-capping, sliding window) and gpt-oss (sinks) against transformers' eager
  attention, gradients and generation included; packed calls never touch the KV cache (the cross-sequence
  contamination trap);
- models: the shipped tokenizer, the tiny model, ValueHeadModel save/load; trained models lose their dropout.
"""

import json
import logging
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, GPTNeoXConfig, LlamaConfig

from rto_fast.trainer import attention
from rto_fast.trainer.models import (TOKENIZER_DIR, ValueHeadModel, build_tokenizer, check_model_source, load_causal_lm,
                             make_byte_tokenizer, tiny_model_config)
from rto_fast.trainer.packing import (IGNORE_INDEX, PackedBatch, TokenizedSequence, balance_across_ranks,
                              build_micro_batches, build_rank_micro_batches, first_fit_decreasing, pack,
                              sequence_sums, to_input_order, unpack)

VOCAB = 301  # odd on purpose


def random_sequences(lengths, vocab=VOCAB, all_trained=False):
    sequences = []
    for length in lengths:
        ids = torch.randint(0, vocab, (length,)).tolist()
        prompt = random.Random(length).randint(0, length - 1)
        mask = [True] * length if all_trained else [False] * prompt + [True] * (length - prompt)
        sequences.append(TokenizedSequence(ids, mask))
    return sequences


# ------------------------------------------------------------------------------------------------ planning

@pytest.mark.parametrize("count, budget", [(1, 7), (37, 64), (500, 1000)])
def test_ffd_budget_and_every_sequence_once(count, budget):
    lengths = torch.randint(1, budget + 1, (count,)).tolist()
    bins = first_fit_decreasing(lengths, budget)
    placed = sorted(index for b in bins for index in b)
    assert placed == list(range(count))
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)
    lower_bound = -(-sum(lengths) // budget)
    # First-fit-decreasing uses at most 11/9 OPT + 6/9 bins.
    assert lower_bound <= len(bins) <= 11 / 9 * max(lower_bound, sum(length > budget / 2 for length in lengths)) + 1
    assert bins == first_fit_decreasing(lengths, budget)  # deterministic


def test_ffd_known_plan():
    # Decreasing: 6(i1) 5(i3) 4(i0) 3(i2) 2(i4) 2(i5) -> [6,4] [5,3,2] [2]
    assert first_fit_decreasing([4, 6, 3, 5, 2, 2], 10) == [[1, 0], [3, 2, 4], [5]]


def test_ffd_rejects_long_and_empty_sequences():
    with pytest.raises(ValueError, match=r"sequence 2 has 11 tokens, more than the micro-batch budget max_tokens=10"):
        first_fit_decreasing([3, 4, 11, 2], 10)
    with pytest.raises(ValueError, match="sequence 1 has length 0"):
        first_fit_decreasing([3, 0], 10)
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        first_fit_decreasing([3], 0)
    with pytest.raises(ValueError, match="sequence 1 has 12 tokens"):
        build_micro_batches(random_sequences([3, 12]), 10)


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 8])
def test_rank_balance(num_ranks):
    lengths = torch.randint(1, 200, (301,)).tolist()
    budget = 512
    ranks = balance_across_ranks(first_fit_decreasing(lengths, budget), lengths, num_ranks, budget)
    assert len(ranks) == num_ranks
    assert len({len(rank) for rank in ranks}) == 1, "every rank must take the same number of micro-batches"
    assert sorted(i for rank in ranks for b in rank for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= budget for rank in ranks for b in rank)
    tokens = [sum(lengths[i] for b in rank for i in b) for rank in ranks]
    assert max(tokens) - min(tokens) <= budget  # near-equal: within one micro-batch
    if num_ranks > 1:
        assert max(tokens) - min(tokens) <= 0.03 * sum(tokens) / num_ranks


def test_rank_balance_splits_bins_when_there_are_too_few():
    lengths = [3, 3, 2, 1, 1]
    ranks = balance_across_ranks(first_fit_decreasing(lengths, 100), lengths, 4)  # one bin -> four
    assert [len(rank) for rank in ranks] == [1, 1, 1, 1]
    assert sorted(i for rank in ranks for b in rank for i in b) == list(range(5))
    with pytest.raises(ValueError, match="cannot give each of 4 ranks"):
        balance_across_ranks([[0, 1, 2]], [1, 1, 1], 4)
    with pytest.raises(ValueError, match="cannot be dealt evenly"):
        balance_across_ranks([[0], [1], [2]], [9, 9, 9], 2)


def test_build_rank_micro_batches_covers_everything():
    sequences = random_sequences(torch.randint(1, 40, (50,)).tolist())
    per_rank = build_rank_micro_batches(sequences, 64, num_ranks=3)
    assert len({len(rank) for rank in per_rank}) == 1
    seen = torch.cat([batch.sequence_index for rank in per_rank for batch in rank]).sort().values
    assert torch.equal(seen, torch.arange(50))
    assert all(batch.num_tokens <= 64 for rank in per_rank for batch in rank)


# ------------------------------------------------------------------------------------------------ packing

def expected_labels(ids, mask):
    """Per-sequence labels written the slow way: next token when it is trained on, else -100; last is -100."""
    return [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def test_pack_layout_and_labels_never_cross_a_boundary():
    lengths = [5, 1, 9, 2, 13, 3]
    sequences = random_sequences(lengths)
    order = [4, 0, 3, 1, 5, 2]
    batch = pack(sequences, order)
    total = sum(lengths)
    assert batch.input_ids.shape == batch.position_ids.shape == batch.labels.shape == (1, total)
    assert batch.response_mask.shape == (1, total) and batch.response_mask.dtype == torch.bool
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0] + torch.tensor([lengths[i] for i in order]).cumsum(0).tolist()
    assert batch.sequence_index.tolist() == order
    assert batch.max_seqlen == 13
    for slot, index in enumerate(order):
        start, end = batch.cu_seqlens[slot].item(), batch.cu_seqlens[slot + 1].item()
        ids, mask = sequences[index].input_ids, sequences[index].label_mask
        assert batch.input_ids[0, start:end].tolist() == ids
        assert batch.position_ids[0, start:end].tolist() == list(range(end - start))
        assert batch.labels[0, start:end].tolist() == expected_labels(ids, mask)
        assert batch.labels[0, end - 1] == IGNORE_INDEX  # never the next sequence's first token
    assert torch.equal(batch.response_mask, batch.labels != IGNORE_INDEX)
    assert torch.equal(batch.label_positions, batch.response_mask[0].nonzero().squeeze(1))
    assert batch.label_positions.dtype == torch.long
    assert torch.equal(batch.to("cpu").label_positions, batch.label_positions)


def test_pack_accepts_mappings_and_default_mask():
    batch = pack([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9], "label_mask": [True, False]}])
    assert batch.labels.tolist() == [[6, 7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    with pytest.raises(ValueError, match="sequence 0: label_mask has 2 entries for 3 tokens"):
        pack([{"input_ids": [1, 2, 3], "label_mask": [True, True]}])
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pack([{"input_ids": [1]}, {"input_ids": []}])


def test_unpack_and_sums_and_input_order():
    sequences = random_sequences([4, 7, 2, 5, 3])
    batches = build_micro_batches(sequences, 9)
    assert sorted(torch.cat([b.sequence_index for b in batches]).tolist()) == list(range(5))
    per_batch = []
    for batch in batches:
        values = torch.randn(1, batch.num_tokens)
        pieces = unpack(values, batch)
        assert [piece.numel() for piece in pieces] == batch.seqlens.tolist()
        sums = sequence_sums(values, batch)
        expected = [(piece * mask).sum() for piece, mask in zip(pieces, unpack(batch.response_mask, batch))]
        torch.testing.assert_close(sums, torch.stack(expected))
        per_batch.append(torch.tensor([float(i) for i in batch.sequence_index]))
    assert to_input_order(batches, per_batch).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="positions"):
        unpack(torch.zeros(3), batches[0])


def test_packed_batch_to():
    batch = pack(random_sequences([3, 4]))
    moved = batch.to("cpu")
    assert isinstance(moved, PackedBatch) and moved.max_seqlen == batch.max_seqlen
    assert torch.equal(moved.labels, batch.labels)


# ------------------------------------------------------------------------------------------------ attention

def tiny_llama(implementation):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()


def tiny_neox(implementation):
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()


def tiny_qwen(implementation, version=2):
    """Qwen2 (biases on q, k, v) or Qwen3 (RMS norms on q and k per head)."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config = (transformers.Qwen2Config(**common) if version == 2
              else transformers.Qwen3Config(head_dim=16, **common))
    return AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()


BUILDERS = {"llama": tiny_llama, "neox": tiny_neox, "qwen2": tiny_qwen,
            "qwen3": lambda implementation: tiny_qwen(implementation, version=3)}


@pytest.fixture
def attention_backend(request, monkeypatch):
    """'sdpa': transformers' sdpa splitting documents from position_ids; 'flex': our registered function with
    FlexAttention; 'packed-sdpa': our registered function's per-sequence CPU fallback."""
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    name = request.param
    attention.set_backend("flex" if name == "flex" else "sdpa")
    yield name
    attention.set_backend(None)


def model_for(kind, backend):
    implementation = attention.model_attn_implementation("cpu")
    if backend == "packed-sdpa":
        attention.register_packed_attention()
        implementation = attention.PACKED_IMPLEMENTATION
    model = BUILDERS[kind](implementation)
    expected = "sdpa" if backend == "sdpa" else attention.PACKED_IMPLEMENTATION
    assert model.config._attn_implementation == expected
    return model


def own_logits(model, sequences, batch):
    """Each sequence alone, no packing, in packed order."""
    return torch.cat([model(input_ids=torch.tensor([sequences[i].input_ids]), use_cache=False).logits[0]
                      for i in batch.sequence_index.tolist()])


@pytest.mark.parametrize("attention_backend", ["sdpa", "flex", "packed-sdpa"], indirect=True)
@pytest.mark.parametrize("kind", ["llama", "neox", "qwen2", "qwen3"])
def test_packed_logits_equal_each_sequence_alone(kind, attention_backend):
    model = model_for(kind, attention_backend)
    sequences = random_sequences([7, 1, 19, 4, 12])
    batch = pack(sequences, [2, 0, 4, 1, 3])
    with torch.no_grad():
        packed = attention.packed_forward(model, batch).logits[0]
        alone = own_logits(model, sequences, batch)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def written_out_model(kind: str):
    """A tiny Gemma-2 (soft-capped scores, sliding and global layers) or gpt-oss (attention sinks, a mixture of
    experts), eager attention: transformers' own implementation, the reference."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, max_position_embeddings=256, sliding_window=6)  # shorter than most sequences below
    if kind == "gemma2":
        config = transformers.Gemma2Config(intermediate_size=64, attn_logit_softcapping=2.0, **common)
    else:
        config = transformers.GptOssConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                           **common)
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    if kind == "gpt_oss":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_()  # nonzero sinks, so that they matter
    return model


@pytest.mark.parametrize("kind", ["gemma2", "gpt_oss"])
def test_packed_attention_writes_out_softcapping_sinks_and_sliding_windows(kind, monkeypatch, caplog):
    """Attention the fused backends do not take (Gemma-2's soft-capped scores, gpt-oss's sinks, sliding windows
    shorter than the sequences) runs written out per sequence: packed logits and gradients equal transformers' eager
    attention on each sequence alone, and greedy generation (which switches to transformers' eager) is unchanged."""
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    model = written_out_model(kind)
    sequences = random_sequences([7, 1, 19, 4, 12])
    batch = pack(sequences, [2, 0, 4, 1, 3])
    alone = own_logits(model, sequences, batch)
    prompts = [[3, 9, 4, 11, 7, 2, 8, 5], [6, 1, 12]]
    from rto_fast.trainer.generation import SamplingSettings, generate

    settings = SamplingSettings(max_new_tokens=9, temperature=0.0, ban_eos=True)
    expected_tokens = generate(model, prompts, settings, eos_token_id=VOCAB - 1, pad_token_id=0)
    loss_alone = sum(torch.nn.functional.cross_entropy(
        model(input_ids=pack([sequence]).input_ids, use_cache=False).logits[0], pack([sequence]).labels[0],
        ignore_index=IGNORE_INDEX, reduction="sum") for sequence in sequences)
    alone_grads = torch.autograd.grad(loss_alone, list(model.parameters()), allow_unused=True)

    attention.register_packed_attention()
    model.set_attn_implementation(attention.PACKED_IMPLEMENTATION)
    caplog.set_level(logging.WARNING, logger="rto_fast.trainer.attention")
    attention._warn_written_out_attention.cache_clear()
    logits = attention.packed_forward(model, batch).logits
    torch.testing.assert_close(logits[0].detach(), alone, atol=1e-5, rtol=1e-5)
    assert "written out" in caplog.text
    loss = torch.nn.functional.cross_entropy(logits[0], batch.labels[0], ignore_index=IGNORE_INDEX, reduction="sum")
    packed_grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    for packed_grad, alone_grad in zip(packed_grads, alone_grads):
        if alone_grad is None:  # an expert no token was routed to
            assert packed_grad is None or not packed_grad.any()
            continue
        torch.testing.assert_close(packed_grad, alone_grad, atol=2e-5, rtol=1e-4)
    assert generate(model, prompts, settings, eos_token_id=VOCAB - 1, pad_token_id=0) == expected_tokens
    assert model.config._attn_implementation == attention.PACKED_IMPLEMENTATION  # restored after generation
    if kind == "gemma2":  # FlexAttention takes soft-capping (a score_mod) and the window (its document mask)
        attention.set_backend("flex")
        try:
            with torch.no_grad():  # CPU FlexAttention has no backward
                flex = attention.packed_forward(model, batch).logits[0]
        finally:
            attention.set_backend(None)
        torch.testing.assert_close(flex, alone, atol=1e-5, rtol=1e-5)


def test_varlen_call_maps_causal_windows_scale_and_grouped_heads(monkeypatch):
    """torch's varlen_attn (CUDA only) is replaced by a stand-in with its documented semantics (window_size =
    (left, right): key j seen from query i when i - left <= j <= i + right, -1 unbounded; scale; enable_gqa):
    what `_varlen` asks of it equals the written-out attention, with and without a sliding window."""
    def fake_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                         enable_gqa=False):
        outputs = []
        for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
            q, k, v = (tensor[start:end].transpose(0, 1) for tensor in (query, key, value))  # (H, L, D)
            if enable_gqa:
                k, v = (t.repeat_interleave(q.shape[0] // t.shape[0], dim=0) for t in (k, v))
            i, j = torch.arange(end - start)[:, None], torch.arange(end - start)[None, :]
            left, right = window_size
            allowed = ((j >= i - left) | (left < 0)) & ((j <= i + right) | (right < 0))
            scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
            outputs.append((scores.softmax(-1) @ v).transpose(0, 1))
        return torch.cat(outputs)

    monkeypatch.setattr(attention, "_torch_varlen_attn", lambda: fake_varlen_attn)
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(1, 4, 23, 8, generator=generator)
    key, value = (torch.randn(1, 2, 23, 8, generator=generator) for _ in range(2))
    cu_seqlens = torch.tensor([0, 9, 10, 23], dtype=torch.int32)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    for window in (None, 4):
        got = attention._varlen(query, key, value, cu_seqlens, 13, 0.3, sliding_window=window)
        expected = attention._padded_attention(query, key, value, cu_seqlens.long(), lengths, 0.3,
                                               sliding_window=window)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert attention._varlen_takes_windows()


def test_windowed_block_mask_is_cached_per_window():
    """Sliding and global layers alternate in one forward pass (one cu_seqlens tensor): one mask per window."""
    cu_seqlens = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    full = attention._document_block_mask(cu_seqlens, 17)
    windowed = attention._document_block_mask(cu_seqlens, 17, sliding_window=3)
    assert attention._document_block_mask(cu_seqlens, 17) is full
    assert attention._document_block_mask(cu_seqlens, 17, sliding_window=3) is windowed
    q, k = torch.arange(17)[:, None], torch.arange(17)[None, :]
    document = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 9, 3]))
    same = document[:, None] == document[None, :]
    expected = same & (k <= q) & (k > q - 3)
    dense = torch.nn.attention.flex_attention.create_mask(windowed.mask_mod, None, None, 17, 17)[0, 0]
    assert torch.equal(dense, expected)


# FlexAttention has no backward on CPU (torch raises), so the registered function is checked via its sdpa fallback.
@pytest.mark.parametrize("attention_backend", ["sdpa", "packed-sdpa"], indirect=True)
def test_packed_gradients_equal_per_sequence_gradients(attention_backend):
    model = model_for("llama", attention_backend)
    sequences = random_sequences([6, 11, 3])
    batch = pack(sequences)
    logits = attention.packed_forward(model, batch).logits
    loss = torch.nn.functional.cross_entropy(logits[0], batch.labels[0], ignore_index=IGNORE_INDEX, reduction="sum")
    packed_grads = torch.autograd.grad(loss, list(model.parameters()))
    loss_alone = 0
    for sequence in sequences:
        single = pack([sequence])
        logits = model(input_ids=single.input_ids, use_cache=False).logits
        loss_alone = loss_alone + torch.nn.functional.cross_entropy(logits[0], single.labels[0],
                                                                    ignore_index=IGNORE_INDEX, reduction="sum")
    alone_grads = torch.autograd.grad(loss_alone, list(model.parameters()))
    for packed_grad, alone_grad in zip(packed_grads, alone_grads):
        torch.testing.assert_close(packed_grad, alone_grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "neox"])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_packed_logprobs_compute_logits_only_at_labels(kind, inplace_backward):
    """scoring.packed_logprobs runs the output layer on the labelled positions only (logits_to_keep) and spreads the
    log-probs and entropy back onto the stream: equal, with gradients, to the whole stream's logits."""
    from rto_fast import ops
    from rto_fast.trainer.scoring import packed_logprobs

    model = model_for(kind, "packed-sdpa")
    batch = pack(random_sequences([9, 14, 5, 20]))
    rows_seen = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: rows_seen.append(out.shape[1]))
    logprobs, entropy = packed_logprobs(model, batch, return_entropy=True, inplace_backward=inplace_backward)
    assert rows_seen == [int(batch.response_mask.sum())] and rows_seen[0] < batch.input_ids.shape[1]
    (logprobs.sum() + 0.5 * entropy.sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    logits = attention.packed_forward(model, batch).logits
    full_logprobs, full_entropy = ops.token_logprobs(logits, batch.labels, return_entropy=True)
    full_entropy = torch.where(batch.response_mask, full_entropy, torch.zeros(()))
    torch.testing.assert_close(logprobs, full_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, full_entropy, atol=1e-5, rtol=1e-5)
    assert (logprobs[~batch.response_mask] == 0).all() and (entropy[~batch.response_mask] == 0).all()
    (full_logprobs.sum() + 0.5 * full_entropy.sum()).backward()
    for grad, parameter in zip(grads, model.parameters()):
        torch.testing.assert_close(grad, parameter.grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "neox"])
def test_kv_cache_contaminates_and_packed_forward_avoids_it(kind, monkeypatch):
    """The trap: with the default cache, sdpa sees one long sequence. packed_forward must never go there."""
    model = BUILDERS[kind]("sdpa")
    assert model.config.use_cache  # the transformers default, left on to show packed_forward does not rely on it
    sequences = random_sequences([9, 14, 6])
    batch = pack(sequences)
    with torch.no_grad():
        alone = own_logits(model, sequences, batch)
        wrong = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits[0]
        assert (wrong - alone).abs().max() > 1e-3, "the wrong call should attend across sequences"

        calls = []
        original_forward = model.forward

        def recording_forward(*args, **kwargs):
            calls.append(kwargs)
            return original_forward(*args, **kwargs)

        def no_cache(*args, **kwargs):
            raise AssertionError("a packed forward used the KV cache")

        monkeypatch.setattr(model, "forward", recording_forward)
        monkeypatch.setattr(DynamicCache, "update", no_cache)
        packed = attention.packed_forward(model, batch).logits[0]
    (kwargs,) = calls
    assert kwargs["use_cache"] is False
    assert "attention_mask" not in kwargs and "past_key_values" not in kwargs
    assert torch.equal(kwargs["position_ids"], batch.position_ids)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention_mask must not be passed"):
        attention.packed_forward(model, batch, attention_mask=torch.ones_like(batch.input_ids))
    with pytest.raises(ValueError, match="use_cache must not be passed"):
        attention.packed_forward(model, batch, use_cache=True)


def test_flash_style_models_get_cu_seqlens(monkeypatch):
    attention.register_packed_attention()
    model = tiny_llama(attention.PACKED_IMPLEMENTATION)
    batch = pack(random_sequences([5, 8]))
    calls = []
    original_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(k) or original_forward(*a, **k))
    with torch.no_grad():
        attention.packed_forward(model, batch)
    (kwargs,) = calls
    assert torch.equal(kwargs["cu_seq_lens_q"], batch.cu_seqlens) and torch.equal(kwargs["cu_seq_lens_k"],
                                                                                 batch.cu_seqlens)
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 8
    assert kwargs["use_cache"] is False and "attention_mask" not in kwargs


@pytest.mark.parametrize("attention_backend", ["flex"], indirect=True)
def test_generation_with_the_packed_implementation(attention_backend):
    """generate() (left padding, KV cache) through the registered function matches plain sdpa."""
    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    model = tiny_llama("sdpa")
    # No token_type_ids: transformers 4.x's generate rejects a keyword the model does not take.
    inputs = tokenizer(["Hello there, how", "Hi"], return_tensors="pt", padding=True, return_token_type_ids=False)
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = model.generate(**inputs, **options)
    assert attention.configure_packed_attention(model) == attention.PACKED_IMPLEMENTATION
    assert torch.equal(model.generate(**inputs, **options), expected)


def test_backend_choice_env_and_logging(monkeypatch, caplog):
    attention.set_backend(None)
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    with caplog.at_level(logging.INFO, logger="rto_fast.trainer.attention"):
        assert attention.select_backend("cpu") == "packed_sdpa"
    assert "packed attention on cpu: packed_sdpa" in caplog.text
    assert attention.model_attn_implementation("cpu") == attention.PACKED_IMPLEMENTATION
    try:
        monkeypatch.setenv(attention.ENV_VAR, "flex")
        attention.set_backend(None)  # clears the cached choice
        assert attention.select_backend("cpu") == "flex"
        monkeypatch.setenv(attention.ENV_VAR, "banana")
        attention.set_backend(None)
        with pytest.raises(ValueError, match="RTO_FAST_ATTENTION must be one of"):
            attention.select_backend("cpu")
        monkeypatch.setenv(attention.ENV_VAR, "varlen")
        attention.set_backend(None)
        with pytest.raises(RuntimeError, match="varlen"):
            attention.select_backend("cpu")
        with pytest.raises(ValueError):
            attention.set_backend("bogus")
    finally:
        monkeypatch.delenv(attention.ENV_VAR, raising=False)
        attention.set_backend(None)


def test_cu_seqlens_from_position_ids():
    batch = pack(random_sequences([3, 1, 4]))
    cu_seqlens, longest = attention.cu_seqlens_from_position_ids(batch.position_ids)
    assert torch.equal(cu_seqlens, batch.cu_seqlens) and longest == 4


# ------------------------------------------------------------------------------------------------ models

def test_shipped_tokenizer_is_reproducible(tmp_path):
    make_byte_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((TOKENIZER_DIR / name).read_text()), name


def test_tokenizer_round_trip_and_special_tokens():
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer()
    assert len(tokenizer) == 259
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (256, 257, 258)
    text = "Human: héllo wörld, 你好 ✓\n\tend"
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # byte level: id = byte, nothing added
    assert tokenizer.decode(ids) == text
    assert tokenizer("a<eos>")["input_ids"] == [97, 258]
    assert AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))(text)["input_ids"] == ids


def test_chat_template():
    tokenizer = build_tokenizer()
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert full == "\n\nHuman: Hi?\n\nAssistant: Hello.<eos>"
    assert prompt == "\n\nHuman: Hi?\n\nAssistant:"
    assert full.startswith(prompt)  # the data layer splits prompt and response this way


def test_tiny_model_and_loaders():
    config = tiny_model_config()
    assert config.vocab_size == len(build_tokenizer())
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    torch.manual_seed(0)
    policy = load_causal_lm("tiny", gradient_checkpointing=True)
    assert policy.training and any(getattr(m, "gradient_checkpointing", False) for m in policy.modules())
    assert all(p.requires_grad for p in policy.parameters())
    assert policy.config.use_cache is False
    # Checkpointing changes memory, not gradients.
    torch.manual_seed(0)
    plain = load_causal_lm("tiny")
    batch = pack(random_sequences([7, 4], vocab=config.vocab_size))
    for model in (policy, plain):
        attention.packed_forward(model, batch).logits.logsumexp(-1).sum().backward()
    for checkpointed, reference in zip(policy.parameters(), plain.parameters()):
        torch.testing.assert_close(checkpointed.grad, reference.grad, atol=1e-6, rtol=1e-5)
    frozen = load_causal_lm("tiny", dtype="bf16", trainable=False)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert next(frozen.parameters()).dtype == torch.bfloat16
    batch = pack(random_sequences([5, 3], vocab=config.vocab_size))
    with torch.no_grad():
        assert attention.packed_forward(frozen, batch).logits.shape == (1, 8, config.vocab_size)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_causal_lm("tiny", dtype="fp16")


def dropout_model_config(kind: str):
    """A tiny config of `kind` whose checkpoint would train with dropout (every dropout setting at 0.1)."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    return {
        "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256),
        "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=256,
                                              word_embed_proj_dim=32, dropout=0.1, attention_dropout=0.1,
                                              layerdrop=0.5),
        "llama": lambda: transformers.LlamaConfig(attention_dropout=0.1, **common),
        "neox": lambda: transformers.GPTNeoXConfig(attention_dropout=0.1, hidden_dropout=0.1, **common),
        "qwen2": lambda: transformers.Qwen2Config(attention_dropout=0.1, num_key_value_heads=2, **common),
        "phi": lambda: transformers.PhiConfig(attention_dropout=0.1, resid_pdrop=0.1, embd_pdrop=0.1, **common),
    }[kind]()


@pytest.mark.parametrize("kind", ["gpt2", "opt", "llama", "neox", "qwen2", "phi"])
def test_trained_models_load_without_dropout(tmp_path, kind):
    """A checkpoint with dropout (GPT-2 and OPT ship with 0.1) trains on packed streams: a trained model's dropout
    is 0 (two training-mode forwards agree, the packed attention gets no dropout to refuse), its saved config keeps
    the checkpoint's values; model.keep_dropout keeps it (then only flash-attn's packed attention takes it)."""
    torch.manual_seed(0)
    folder = tmp_path / kind
    AutoModelForCausalLM.from_config(dropout_model_config(kind)).save_pretrained(folder)
    batch = pack(random_sequences([9, 5, 12]))
    model = load_causal_lm(str(folder))
    assert model.training
    first, second = (attention.packed_forward(model, batch).logits for _ in range(2))
    assert torch.equal(first, second)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    original = json.loads((folder / "config.json").read_text())
    assert {key: saved[key] for key in original if "drop" in key} == {key: original[key] for key in original
                                                                     if "drop" in key}
    critic = ValueHeadModel.from_pretrained(str(folder))
    assert torch.equal(*(attention.packed_forward(critic, batch) for _ in range(2)))

    kept = load_causal_lm(str(folder), keep_dropout=True)
    try:
        outputs = [attention.packed_forward(kept, batch).logits for _ in range(2)]
    except NotImplementedError as error:  # attention dropout on a backend that cannot apply it
        assert "keep_dropout" in str(error)
    else:
        assert not torch.equal(*outputs)


def test_check_model_source(tmp_path):
    import transformers

    falcon = tmp_path / "falcon"  # a class off transformers' attention interface: refused before it is built
    config = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    config.save_pretrained(falcon)
    with pytest.raises(ValueError, match="FalconForCausalLM does not take plug-in attention functions"):
        check_model_source(str(falcon))
    with pytest.raises(ValueError, match="attention interface"):
        load_causal_lm(str(falcon))
    check_model_source("tiny")
    check_model_source("EleutherAI/pythia-70m")  # looks like a Hub name: left to from_pretrained
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model_source(str(tmp_path / "nothing" / "here"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        check_model_source(str(tmp_path))


def test_value_head_model_save_load(tmp_path):
    lm = load_causal_lm("tiny")
    lm.save_pretrained(tmp_path / "lm")
    critic = ValueHeadModel.from_pretrained(str(tmp_path / "lm"))
    # The backbone is the causal LM's; a fresh head starts at zero.
    lm_state = lm.model.state_dict()
    for name, tensor in critic.backbone.state_dict().items():
        torch.testing.assert_close(tensor, lm_state[name], atol=0, rtol=0)
    assert critic.value_head.weight.abs().sum() == 0

    torch.nn.init.normal_(critic.value_head.weight)
    torch.nn.init.normal_(critic.value_head.bias)
    sequences = random_sequences([6, 2, 9], vocab=lm.config.vocab_size)
    batch = pack(sequences)
    critic.eval()
    with torch.no_grad():
        values = attention.packed_forward(critic, batch)
        alone = torch.cat([critic(input_ids=torch.tensor([s.input_ids])) for s in sequences], dim=1)
    assert values.shape == (1, batch.num_tokens) and values.dtype == torch.float32
    torch.testing.assert_close(values, alone, atol=1e-5, rtol=1e-5)

    critic.save_pretrained(tmp_path / "critic")
    assert (tmp_path / "critic" / "value_head.safetensors").is_file()
    loaded = ValueHeadModel.from_pretrained(str(tmp_path / "critic"), trainable=False)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(attention.packed_forward(loaded, batch), values, atol=0, rtol=0)


@pytest.mark.parametrize("lengths", [[5, 1, 9, 9, 3], [17], [1, 1, 2]])
def test_padded_and_per_sequence_cpu_attention_agree(lengths):
    """The CPU packed path's two ways (one padded sdpa call, or one call per sequence) give the same outputs and
    gradients as each sequence attended alone."""
    generator = torch.Generator().manual_seed(len(lengths))
    total = sum(lengths)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    inputs = [torch.randn(1, heads, total, 8, generator=generator, dtype=torch.float64) for heads in (4, 2, 2)]
    results = []
    for padded in (True, False):
        leaves = [tensor.clone().requires_grad_(True) for tensor in inputs]
        output = attention._per_sequence_sdpa(*leaves, cu_seqlens, 0.3, padded=padded)
        assert output.shape == (total, 4, 8)
        (output * torch.linspace(-1, 1, output.numel(), dtype=torch.float64).reshape(output.shape)).sum().backward()
        results.append((output.detach(), [leaf.grad for leaf in leaves]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for first, second in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(first, second)



def test_block_mask_made_in_inference_mode_is_not_reused_for_training():
    """DPO's order: the reference scores a batch in inference mode, then the policy trains on the same batch (the
    same cu_seqlens tensor). The cached FlexAttention block mask must not carry inference tensors into autograd."""
    cu_seqlens = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    with torch.inference_mode():
        frozen = attention._document_block_mask(cu_seqlens, 17)
        assert attention._document_block_mask(cu_seqlens, 17) is frozen  # still one mask per forward pass
    trained = attention._document_block_mask(cu_seqlens, 17)
    assert not trained.kv_num_blocks.is_inference() and not trained.kv_indices.is_inference()
    assert torch.equal(trained.to_dense(), frozen.to_dense())
    assert attention._document_block_mask(cu_seqlens, 17) is trained


# FlexAttention trains only on CUDA (CPU has no backward); there the full model-level check runs too.
@pytest.mark.parametrize("attention_backend", [
    pytest.param("flex", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="flex backward needs CUDA")),
    "packed-sdpa"], indirect=True)
def test_frozen_pass_then_trained_pass_share_a_batch(attention_backend):
    """The reference's inference-mode pass, then the policy's training pass on the same packed batch."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model_for("llama", attention_backend).to(device)
    batch = pack(random_sequences([6, 11, 3])).to(device)
    with torch.inference_mode():
        reference = attention.packed_forward(model, batch).logits
    logits = attention.packed_forward(model, batch).logits
    logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    torch.testing.assert_close(logits.detach(), reference, atol=1e-5, rtol=1e-5)


def test_generate_runs_under_sdpa_and_restores_the_packed_implementation():
    """rto_fast.trainer.generation.generate switches a packed-attention model to transformers' sdpa for the decode loop
    (one mask per forward, not one per layer) and back; greedy tokens equal those of a plain sdpa model."""
    from rto_fast.trainer.generation import SamplingSettings, generate

    tokenizer = build_tokenizer()
    model = tiny_llama("sdpa")
    prompts = [tokenizer("Hello there, how")["input_ids"], tokenizer("Hi")["input_ids"]]
    settings = SamplingSettings(max_new_tokens=6, temperature=0.0, batch_size=2)
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    expected = generate(model, prompts, settings, **ids)
    attention.register_packed_attention()
    model.set_attn_implementation(attention.PACKED_IMPLEMENTATION)
    seen = []
    original = model.model.forward

    def spy(*args, **kwargs):
        seen.append(model.config._attn_implementation)
        return original(*args, **kwargs)

    model.model.forward = spy
    assert generate(model, prompts, settings, **ids) == expected
    assert seen and set(seen) == {"sdpa"}
    assert model.config._attn_implementation == attention.PACKED_IMPLEMENTATION


def test_static_kv_cache_and_fixed_prompt_width_sample_the_same_tokens():
    """rl.generation_cache=static (transformers engine): its preallocated cache and prompts left-padded to a fixed
    width give the greedy tokens of its dynamic cache."""
    from rto_fast.trainer.generation import SamplingSettings, generate

    tokenizer = build_tokenizer()
    model = tiny_llama("sdpa")
    prompts = [tokenizer(text)["input_ids"] for text in ("Hello there, how", "Hi", "a b c d e f g")]
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    dynamic = generate(model, prompts, SamplingSettings(max_new_tokens=7, temperature=0.0, batch_size=2,
                                                        engine="transformers"), **ids)
    static = generate(model, prompts, SamplingSettings(max_new_tokens=7, temperature=0.0, batch_size=2,
                                                       engine="transformers", kv_cache="static", prompt_width=24),
                      **ids)
    assert static == dynamic
    with pytest.raises(ValueError, match="kv_cache"):
        SamplingSettings(kv_cache="paged")


def fused_output_model(kind: str):
    """A tiny causal LM of `kind` for the fused output layer tests: its output layer is a plain nn.Linear (Phi's
    has a bias; GPT-2's is tied to the input embedding), or the model changes its logits after it (Gemma-2
    soft-caps them, Cohere scales them)."""
    from transformers import (AutoModelForCausalLM, CohereConfig, Gemma2Config, GPT2Config, LlamaConfig,
                              OPTConfig, PhiConfig)

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    configs = {
        "llama": lambda: LlamaConfig(num_key_value_heads=2, **common),
        "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                   bos_token_id=1, eos_token_id=2),
        "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32),
        "phi": lambda: PhiConfig(**common),
        "gemma2": lambda: Gemma2Config(num_key_value_heads=2, head_dim=8, final_logit_softcapping=4.0, **common),
        "cohere": lambda: CohereConfig(num_key_value_heads=2, logit_scale=0.5, **common),
    }
    torch.manual_seed(3)
    # eval(): no dropout, so both paths see the same network (gradients flow all the same)
    model = AutoModelForCausalLM.from_config(configs[kind](), attn_implementation="eager").eval()
    with torch.no_grad():  # logits of a few units, so that soft-capping and scaling matter
        model.get_output_embeddings().weight.mul_(4.0)
    return model


def logits_path_logprobs(model, batch):
    """Log-probs, entropy and parameter gradients of the logits path (the reference for the fused path)."""
    from rto_fast.trainer.scoring import packed_logprobs

    model.zero_grad()
    logprobs, entropy = packed_logprobs(model, batch, return_entropy=True)
    (logprobs.sum() + 0.5 * entropy.sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return logprobs.detach(), entropy.detach(), grads


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "phi"])
def test_fused_output_layer_never_builds_the_logits(kind):
    """fused_output_layer=True: ops.linear_token_logprobs on the output layer's input gives the logits path's
    log-probs, entropy and gradients of every parameter (tied weights and a bias included), and the output layer
    hands the model a zero-memory stand-in, never (K, V) logits."""
    from rto_fast.trainer.scoring import packed_logprobs

    model = fused_output_model(kind)
    batch = pack(random_sequences([9, 14, 5, 20]))
    expected_logprobs, expected_entropy, expected_grads = logits_path_logprobs(model, batch)
    layer_outputs = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: layer_outputs.append(out))
    logprobs, entropy = packed_logprobs(model, batch, return_entropy=True, fused_output_layer=True)
    (logprobs.sum() + 0.5 * entropy.sum()).backward()
    (stand_in,) = layer_outputs
    assert stand_in.shape[-1] == VOCAB and stand_in.stride()[:-1] == (0, 0)  # one row, broadcast
    torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=1e-5)
    assert (logprobs[~batch.response_mask] == 0).all() and (entropy[~batch.response_mask] == 0).all()
    for (name, parameter), expected in zip(model.named_parameters(), expected_grads):
        torch.testing.assert_close(parameter.grad, expected, atol=2e-5, rtol=1e-4, msg=name)
    assert "forward" not in vars(model.get_output_embeddings())  # the layer's own forward is back


def test_fused_output_layer_under_bf16_autocast_matches_the_logits_path():
    """Under bf16 autocast the fused path runs the output matmul in bf16, as autocast runs the layer."""
    from rto_fast.trainer.scoring import packed_logprobs

    model = fused_output_model("llama")
    batch = pack(random_sequences([12, 7, 16]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = packed_logprobs(model, batch)
        fused = packed_logprobs(model, batch, fused_output_layer=True)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, expected, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("kind", ["gemma2", "cohere"])
def test_fused_output_layer_finds_models_that_change_their_logits(kind, caplog):
    """A model that soft-caps or scales its logits after the output layer cannot be served from the layer's input:
    its first call finds that out (one warning) and gives the logits path's numbers; later calls go straight to the
    logits path."""
    from rto_fast.trainer import scoring
    from rto_fast.trainer.scoring import packed_logprobs

    model = fused_output_model(kind)
    batch = pack(random_sequences([9, 14, 5]))
    expected_logprobs, expected_entropy, expected_grads = logits_path_logprobs(model, batch)
    with caplog.at_level("WARNING", logger="rto_fast.trainer.scoring"):
        for _ in range(2):
            logprobs, entropy = packed_logprobs(model, batch, return_entropy=True, fused_output_layer=True)
    assert len([r for r in caplog.records if "changes the output layer's logits" in r.getMessage()]) == 1
    assert model.get_output_embeddings() in scoring._UNFUSABLE
    torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=1e-5)
    (logprobs.sum() + 0.5 * entropy.sum()).backward()
    for parameter, expected in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(parameter.grad, expected, atol=2e-5, rtol=1e-4)


def test_fused_output_layer_finds_a_model_that_calls_its_output_layer_twice(caplog):
    """A model whose forward runs its output layer once more (here on an extra hidden state first) is served from its
    logits (one warning), with the logits path's numbers."""
    from rto_fast.trainer import scoring
    from rto_fast.trainer.scoring import packed_logprobs

    model = fused_output_model("llama")
    original_forward = model.forward

    def forward_with_an_extra_head_call(*args, **kwargs):
        model.get_output_embeddings()(torch.zeros(1, 1, model.config.hidden_size))
        return original_forward(*args, **kwargs)

    model.forward = forward_with_an_extra_head_call
    batch = pack(random_sequences([9, 14, 5]))
    expected, _, _ = logits_path_logprobs(model, batch)
    with caplog.at_level("WARNING", logger="rto_fast.trainer.scoring"):
        logprobs = packed_logprobs(model, batch, fused_output_layer=True)
    assert any("calls the output layer twice" in r.getMessage() for r in caplog.records)
    assert model.get_output_embeddings() in scoring._UNFUSABLE
    torch.testing.assert_close(logprobs.detach(), expected, atol=1e-5, rtol=1e-5)
