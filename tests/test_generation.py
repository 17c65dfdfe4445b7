"""The rto_fast decode loop (rto_fast.trainer.generation.decode) and its sampler.

- greedy: token for token what transformers' `generate` produces, for Llama, GPT-NeoX, GPT-2 and OPT (absolute
  positions, so a left-padded row's positions matter), a sliding-window Mistral and Gemma-2 (eager attention with
  softcapping: the 2D-mask path)
  (whose layers keep transformers' own cache class), with eos ending rows at different steps (rows leave the batch)
  and prompts of different lengths in one left-padded batch; a prompt alone gives what it gives inside a batch;
- sampling: `filter_logits` removes exactly the tokens transformers' temperature / top-k / top-p warpers remove;
  `draw_tokens` draws each token with its probability (frequencies over many draws), never a zero-probability one,
  also at the extreme uniform numbers; seeded runs repeat, other seeds differ;
- fixed-shape steps (the CUDA-graph path, run eagerly on CPU) decode what the growing steps decode (Qwen2 and
  Qwen3 too) and read no tensor value back on the host (which graph capture cannot take); on a GPU, the replayed
  graph decodes what eager steps decode;
- the cache: preallocated layers hand out views of the filled part, refuse to overflow, keep a subset of rows;
- settings: unknown engine, static cache without the transformers engine.
"""

import math

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig,
                          MistralConfig, OPTConfig, Qwen2Config)

from rto_fast.trainer import generation
from rto_fast.trainer.generation import SamplingSettings, decode, draw_tokens, filter_logits, generate

VOCAB = 97
PAD = 0


def tiny_model(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    if kind == "llama":
        config = LlamaConfig(num_key_value_heads=2, **common)
    elif kind == "neox":
        config = GPTNeoXConfig(rotary_pct=0.5, **common)
    elif kind == "gpt2":  # learned absolute positions: a left-padded row's positions must start at 0
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                            tie_word_embeddings=False)
    elif kind == "opt":  # learned positions with an offset, computed by the model from the attention mask
        config = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=32, tie_word_embeddings=False)
    elif kind == "qwen2":  # biases on q, k, v
        config = Qwen2Config(num_key_value_heads=2, **common)
    elif kind == "qwen3":  # per-head RMS norms on q and k
        from transformers import Qwen3Config

        config = Qwen3Config(num_key_value_heads=2, head_dim=8, **common)
    elif kind == "gemma2":  # eager attention with logit softcapping, sliding and full layers alternating
        config = Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=6, **common)
    else:  # a window shorter than the sequences, so the sliding layers matter
        config = MistralConfig(num_key_value_heads=2, sliding_window=6, **common)
    torch.manual_seed(1)
    implementation = "eager" if kind == "gemma2" else "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()
    with torch.no_grad():  # a sharper distribution: greedy choices far from ties, so both engines agree exactly
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def random_prompts(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (length,), generator=generator).tolist() for length in lengths]


def frequent_token(model, prompts, steps):
    """A token that greedy decoding emits in some rows but not all, at different steps: as eos it ends rows at
    different times."""
    rollouts = generate(model, prompts, SamplingSettings(max_new_tokens=steps, temperature=0.0, ban_eos=True,
                                                         engine="transformers"), eos_token_id=VOCAB - 1,
                        pad_token_id=PAD)
    counts = {}
    for rollout in rollouts:
        for token in set(rollout.response_ids):
            counts[token] = counts.get(token, 0) + 1
    candidates = [token for token, count in counts.items() if 1 < count < len(prompts) and token != PAD]
    assert candidates, "no token appears in some rows but not all"
    return max(candidates, key=lambda token: counts[token])


@pytest.mark.parametrize("kind", ["llama", "neox", "gpt2", "opt", "mistral", "gemma2"])
def test_greedy_decode_equals_transformers_generate(kind):
    model = tiny_model(kind)
    prompts = random_prompts([5, 13, 1, 9, 9, 20, 3, 11])
    eos = frequent_token(model, prompts, steps=12)
    seen_batches = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen_batches.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    for batch_size in (8, 3):
        settings = dict(max_new_tokens=12, temperature=0.0, batch_size=batch_size)
        ours = generate(model, prompts, SamplingSettings(**settings), eos_token_id=eos, pad_token_id=PAD)
        theirs = generate(model, prompts, SamplingSettings(engine="transformers", **settings), eos_token_id=eos,
                          pad_token_id=PAD)
        assert ours == theirs
        assert any(r.finished for r in ours) and not all(r.finished for r in ours)
    # Finished rows left the batch: some of our decode steps ran on fewer rows than the batch started with.
    assert any(0 < size < 8 for size in seen_batches)


def left_padded(prompts):
    width = max(len(prompt) for prompt in prompts)
    ids = torch.tensor([[PAD] * (width - len(prompt)) + prompt for prompt in prompts])
    mask = (torch.arange(width) >= torch.tensor([[width - len(prompt)] for prompt in prompts])).long()
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "neox", "gpt2", "qwen2", "qwen3", "mistral"])
def test_fixed_shape_steps_decode_what_growing_steps_decode(kind):
    """The fixed-shape steps (what CUDA graphs replay: whole-cache attention, in-place inputs, rows kept to the
    end) give the growing steps' tokens: greedy with eos, and sampled under one seed (no rows dropped). Mistral's
    sliding layers cannot attend to the whole cache: it falls back to growing steps."""
    model = tiny_model(kind)
    prompts = random_prompts([5, 13, 1, 9, 20, 3])
    ids, mask = left_padded(prompts)
    eos = frequent_token(model, prompts, steps=12)
    greedy = SamplingSettings(max_new_tokens=12, temperature=0.0)
    kwargs = dict(eos_token_id=eos, pad_token_id=PAD)
    fixed = decode(model, ids, mask, greedy, fixed_shapes=True, **kwargs)
    assert torch.equal(fixed, decode(model, ids, mask, greedy, fixed_shapes=False, **kwargs))
    assert (fixed == eos).any()
    sampled = SamplingSettings(max_new_tokens=12, temperature=1.0, top_k=30, ban_eos=True)
    runs = []
    for fixed_shapes in (True, False):
        torch.manual_seed(7)
        runs.append(decode(model, ids, mask, sampled, fixed_shapes=fixed_shapes, **kwargs))
    assert torch.equal(*runs)


@pytest.mark.parametrize("kind", ["llama", "neox", "gpt2", "qwen2", "qwen3"])
def test_a_fixed_shape_step_reads_nothing_back_from_the_device(kind, monkeypatch):
    """A CUDA graph cannot capture a step that reads a tensor's value on the host (`.item()`, a tensor in an `if`,
    `.tolist()`, `nonzero`): capture fails and decoding silently falls back to eager steps. The model's decode step
    (transformers' forward with our cache and prepared mask) must read none; counted here on CPU, where the same
    Python runs."""
    reads = []
    inside = {"step": False}

    def counting(original, name):
        def read(*args, **kwargs):
            if inside["step"]:
                reads.append(name)
            return original(*args, **kwargs)
        return read

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name), name))
    monkeypatch.setattr(torch, "nonzero", counting(torch.nonzero, "torch.nonzero"))
    eager_step = generation._FixedShapeSteps._eager

    def watched_step(self):
        inside["steps"] = inside.get("steps", 0) + 1
        inside["step"] = True
        try:
            return eager_step(self)
        finally:
            inside["step"] = False

    monkeypatch.setattr(generation._FixedShapeSteps, "_eager", watched_step)
    inside["step"] = True  # the counter counts: a read inside a step
    bool(torch.ones(()) > 0)
    inside["step"] = False
    assert reads == ["__bool__"]
    reads.clear()
    model = tiny_model(kind)
    ids, mask = left_padded(random_prompts([5, 9, 2]))
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0, ban_eos=True)
    with generation.generation_attention(model):
        tokens = decode(model, ids, mask, settings, eos_token_id=VOCAB - 1, pad_token_id=PAD, fixed_shapes=True)
    assert tokens.shape == (3, 6)
    import transformers

    # transformers 4 builds the mask in every layer: no fixed-shape steps there (growing steps instead)
    assert inside.get("steps") == 5 or int(transformers.__version__.split(".")[0]) < 5
    assert reads == [], f"the decode step reads tensor values on the host: {reads}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_equals_eager_decode(caplog):
    model = tiny_model("llama").cuda()
    prompts = random_prompts([5, 13, 1, 9, 20, 3])
    ids, mask = (tensor.cuda() for tensor in left_padded(prompts))
    settings = SamplingSettings(max_new_tokens=20, temperature=0.0, ban_eos=True)
    replays = []
    original = torch.cuda.CUDAGraph.replay
    torch.cuda.CUDAGraph.replay = lambda graph: (replays.append(1), original(graph))[1]
    try:
        graphed = decode(model, ids, mask, settings, eos_token_id=VOCAB - 1, pad_token_id=PAD)
    finally:
        torch.cuda.CUDAGraph.replay = original
    eager = decode(model, ids, mask, SamplingSettings(max_new_tokens=20, temperature=0.0, ban_eos=True,
                                                      cuda_graph=False), eos_token_id=VOCAB - 1, pad_token_id=PAD)
    assert torch.equal(graphed, eager)
    assert len(replays) == 18 and "without a CUDA graph" not in caplog.text  # every step after the captured one


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_repeated_prompts_share_one_prefill(kind):
    """Prompts sampled several times (rl.samples_per_prompt) prefill once: the first forward sees the distinct
    prompts only, and every copy decodes what it decodes without sharing (and what model.generate decodes)."""
    model = tiny_model(kind)
    distinct = random_prompts([5, 13, 9, 2])
    prompts = [distinct[i] for i in (0, 1, 1, 2, 0, 3, 1, 0)]
    eos = frequent_token(model, distinct + random_prompts([7, 11], seed=2), steps=10)
    ids, mask = left_padded(prompts)
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    settings = SamplingSettings(max_new_tokens=10, temperature=0.0)
    shared = decode(model, ids, mask, settings, eos_token_id=eos, pad_token_id=PAD, fixed_shapes=False)
    assert seen[0] == (4, ids.shape[1]) and seen[1][0] == 8
    hook.remove()
    alone = decode(model, ids, mask, settings, eos_token_id=eos, pad_token_id=PAD, share_prefill=False)
    assert torch.equal(shared, alone)
    fixed = decode(model, ids, mask, settings, eos_token_id=eos, pad_token_id=PAD, fixed_shapes=True)
    assert torch.equal(shared, fixed)
    expected = generate(model, prompts, SamplingSettings(max_new_tokens=10, temperature=0.0, engine="transformers"),
                        eos_token_id=eos, pad_token_id=PAD)
    assert generate(model, prompts, settings, eos_token_id=eos, pad_token_id=PAD) == expected


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_prompt_alone_gives_what_it_gives_in_a_left_padded_batch(kind):
    model = tiny_model(kind)
    prompts = random_prompts([2, 17, 7, 30])
    settings = SamplingSettings(max_new_tokens=10, temperature=0.0, ban_eos=True, batch_size=4)
    batched = generate(model, prompts, settings, eos_token_id=VOCAB - 1, pad_token_id=PAD)
    for prompt, rollout in zip(prompts, batched):
        alone = generate(model, [prompt], settings, eos_token_id=VOCAB - 1, pad_token_id=PAD)[0]
        assert alone == rollout
        assert len(rollout.response_ids) == 10 and VOCAB - 1 not in rollout.response_ids


def test_sampling_is_seeded_and_ban_eos_holds():
    model = tiny_model("neox")
    with torch.no_grad():
        model.get_output_embeddings().weight.div_(8.0)  # a flat distribution: many different samples
    prompts = random_prompts([4, 8, 6])
    settings = SamplingSettings(max_new_tokens=15, temperature=1.3, top_k=40, top_p=0.95, ban_eos=True)
    eos = 5

    def run(seed):
        torch.manual_seed(seed)
        return generate(model, prompts, settings, eos_token_id=eos, pad_token_id=PAD)

    first, again, other = run(3), run(3), run(4)
    assert first == again and first != other
    for rollout in first + other:
        assert len(rollout.response_ids) == 15 and eos not in rollout.response_ids and not rollout.finished
    assert len({tuple(r.response_ids) for r in first + other}) == 6
    assert model.training is False


def test_train_mode_is_restored():
    model = tiny_model("llama").train()
    generate(model, random_prompts([3]), SamplingSettings(max_new_tokens=2), eos_token_id=1, pad_token_id=PAD)
    assert model.training


# ------------------------------------------------------------------------------------------------ the sampler

def transformers_filter(logits, temperature, top_k, top_p):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.9), (1.4, 50, 0.5),
                                                     (0.3, 1, 0.99), (1.0, 0, 1e-6), (2.0, 1000, 0.8)])
def test_filter_logits_removes_what_transformers_warpers_remove(temperature, top_k, top_p):
    generator = torch.Generator().manual_seed(hash((temperature, top_k, top_p)) % 2**31)
    logits = torch.randn(37, 211, generator=generator) * 3
    ours = filter_logits(logits, temperature, top_k, top_p)
    theirs = transformers_filter(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = ~torch.isinf(ours)
    torch.testing.assert_close(ours[kept], theirs[kept])
    assert kept.any(dim=-1).all()  # at least one token per row
    if top_k:
        assert (kept.sum(-1) <= top_k).all()


def test_filter_logits_keeps_ties_at_the_kth_value_and_does_not_write_its_input():
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0, -1.0]])
    before = logits.clone()
    kept = ~torch.isinf(filter_logits(logits, 1.0, top_k=2))
    assert kept.tolist() == [[True, False, True, False, True, False]]
    assert torch.equal(logits, before)


@pytest.fixture(params=[256, 3, 2, 1], ids=lambda block: f"block{block}")
def draw_block(request, monkeypatch):
    """draw_tokens' block size: the default (these short rows take one running sum), and blocks of 3, 2 and 1
    tokens, so that the block level, a shorter last block and zero-probability blocks are exercised on the same
    rows."""
    monkeypatch.setattr(generation, "_DRAW_BLOCK", request.param)
    return request.param


def test_draw_tokens_follows_the_distribution(draw_block):
    probabilities = torch.tensor([0.0, 0.05, 0.0, 0.4, 0.15, 0.3, 0.1, 0.0])
    logits = probabilities.log().expand(40_000, -1).contiguous()
    counts = torch.zeros(8)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        counts += torch.bincount(draw_tokens(logits, generator), minlength=8)
    total = counts.sum()
    frequencies = counts / total
    for p, f in zip(probabilities.tolist(), frequencies.tolist()):
        if p == 0.0:
            assert f == 0.0
        else:  # within 5 standard deviations of the binomial
            assert abs(f - p) <= 5 * math.sqrt(p * (1 - p) / total), (p, f)


def test_draw_tokens_keeps_the_chances_of_tokens_below_float32_resolution(monkeypatch, draw_block):
    """Two tokens of probability 1e-9 after one of nearly 1: in float32 their slices of the running sum vanish
    (1 + 1e-9 == 1) and they could never be drawn; the float64 sum and uniform number keep them."""
    logits = torch.tensor([[0.0, math.log(1e-9), math.log(1e-9)]])
    for value, expected in ((0.5, 0), (1.0 - 1.5e-9, 1), (1.0 - 0.5e-9, 2)):
        monkeypatch.setattr(torch, "rand", lambda size, **kwargs: torch.full(size, value, dtype=kwargs["dtype"]))
        assert draw_tokens(logits).tolist() == [expected], value


def test_draw_tokens_at_the_extreme_uniform_numbers(monkeypatch, draw_block):
    # Zero-probability tokens first, last and in between: neither u = 0 nor u -> 1 may pick one.
    logits = torch.tensor([[-math.inf, 0.5, -math.inf, 1.0, -math.inf, -math.inf, -math.inf]] * 3)
    for value in (0.0, 1.0 - 2.0**-53, 0.5):
        monkeypatch.setattr(torch, "rand", lambda size, **kwargs: torch.full(size, value, dtype=kwargs["dtype"]))
        tokens = draw_tokens(logits)
        assert set(tokens.tolist()) <= {1, 3}, value
    monkeypatch.setattr(torch, "rand", lambda size, **kwargs: torch.zeros(size, dtype=kwargs["dtype"]))
    assert draw_tokens(logits).tolist() == [1, 1, 1]


# ------------------------------------------------------------------------------------------------ cache and settings

def test_draw_tokens_draws_what_the_whole_running_sum_draws():
    """The two-level cumulative distribution picks, for the same uniform number, the token a float64 running sum over
    the whole row picks (many blocks, a shorter last block, zero-probability tokens in every block), except where the
    number falls within float32 rounding (1e-7 of a block's mass) of a block boundary."""
    logits = torch.randn(64, 50_000, generator=torch.Generator().manual_seed(2)) * 4
    logits[:, ::7] = -math.inf
    tokens = draw_tokens(logits, torch.Generator().manual_seed(5))
    uniform = torch.rand((64, 1), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cumulative = torch.softmax(logits, dim=-1).double().cumsum(dim=-1)
    expected = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True).squeeze(-1)
    assert (tokens != expected).sum() <= 1 and not (tokens % 7 == 0).any()


def test_preallocated_layer_hands_out_views_refuses_overflow_and_keeps_rows():
    layer_class = generation._preallocated_layer_class()
    assert layer_class is not None
    layer = layer_class(capacity=5)
    keys, values = torch.randn(3, 2, 3, 4), torch.randn(3, 2, 3, 4)
    out_keys, out_values = layer.update(keys, values)
    assert out_keys.shape == (3, 2, 3, 4) and torch.equal(out_keys, keys) and torch.equal(out_values, values)
    step = torch.randn(3, 2, 1, 4)
    out_keys, _ = layer.update(step, step)
    assert layer.get_seq_length() == 4 and torch.equal(out_keys[:, :, 3:], step)
    assert out_keys.data_ptr() == layer.key_buffer.data_ptr()  # a view, not a copy
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(layer.keys[:, :, :3], keys[[2, 0]]) and layer.get_seq_length() == 4
    layer.update(step[:2], step[:2])
    with pytest.raises(RuntimeError, match="full"):
        layer.update(step[:2], step[:2])


def test_decode_returns_only_the_steps_it_ran():
    model = tiny_model("llama")
    prompts = random_prompts([4, 6])
    eos = frequent_token(model, prompts + random_prompts([5, 7], seed=1), steps=6)
    input_ids, mask = left_padded(prompts)
    tokens = decode(model, input_ids, mask, SamplingSettings(max_new_tokens=40, temperature=0.0), eos_token_id=eos,
                    pad_token_id=PAD)
    assert tokens.shape[0] == 2 and tokens.shape[1] <= 40
    for row in tokens.tolist():
        if eos in row:
            assert all(token == PAD for token in row[row.index(eos) + 1:])


def test_settings_reject_an_unknown_engine_and_a_static_cache_without_transformers():
    with pytest.raises(ValueError, match="engine"):
        SamplingSettings(engine="vllm")
    with pytest.raises(ValueError, match="engine='transformers'"):
        SamplingSettings(kv_cache="static")
    SamplingSettings(kv_cache="static", engine="transformers")
