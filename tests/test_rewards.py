"""Tests of rto_fast.ops.token_rewards / token_rewards_from_logits against the float64 reference.

    pytest tests/test_rewards.py -q

Backends: `triton` (the kernels of rto_fast.kernels.rewards, through the interpreter on CPU) and `torch` (the
vectorized CPU path), forced with the `backend` fixture. Error budgets come from what plain PyTorch makes at the
same input precision: `reference.token_rewards` / `reference.token_logprobs` run in float32 on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

import rto_fast.ops as ops
from rto_fast.ops import reference
from tests.utils import assert_within_budget, poison_like

BACKENDS = ["triton", "torch"]
pytestmark = pytest.mark.usefixtures("tensors_on_test_device")
MODES = ["rto", "ppo", "dppo"]
ESTIMATORS = ["k1", "k2", "k3"]


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def _padded_mask(batch, length):
    """Several runs per row plus the awkward rows: no True, a run at the last position, length-1 runs."""
    mask = torch.rand(batch, length) < 0.6
    if batch >= 4 and length >= 3:
        mask[0] = False                      # a row without response
        mask[1, :] = False
        mask[1, -1] = True                   # a length-1 response at the last position
        mask[2, length // 2:] = True         # a run touching the last position
        mask[3, ::2] = True                  # length-1 responses
        mask[3, 1::2] = False
    return mask


def _packed_stream(num_segments, max_length):
    """(cu_seqlens int32, mask (N,)) with empty sequences (leading, inner, trailing), length-1 sequences, a fully
    masked one, and runs of True that cross sequence boundaries (which must be split)."""
    lengths = torch.randint(1, max_length + 1, (num_segments,))
    lengths[0] = 0
    lengths[2] = 0
    lengths[3] = 1
    lengths[-1] = 0
    cu_seqlens = torch.zeros(num_segments + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    mask = torch.rand(int(cu_seqlens[-1])) < 0.7
    mask[int(cu_seqlens[4]):int(cu_seqlens[6])] = True    # one run of True across the boundary at cu_seqlens[5]
    mask[int(cu_seqlens[7]):int(cu_seqlens[8])] = False   # a fully masked sequence
    return cu_seqlens, mask


def _logprobs(shape, dtype=torch.float32):
    """Three log-prob tensors (policy, reference, DPO): negative, spread, the log-ratios O(1)."""
    base = -torch.rand(shape) * 4
    return [(base + 0.7 * torch.randn(shape)).clamp(max=0).to(dtype) for _ in range(3)]


def _rewards_kwargs(mode, estimator, with_score, num_segments, dpo_clip=None, dtype=torch.float32):
    kwargs = dict(mode=mode, kl_estimator=estimator, kl_coef=0.05, dpo_coef=0.1, score_coef=0.5, dpo_clip=dpo_clip)
    if with_score:
        kwargs["score"] = torch.randn(num_segments).to(dtype)
    return kwargs


def _double(kwargs):
    return {key: (value.double() if isinstance(value, torch.Tensor) else value) for key, value in kwargs.items()}


def _check_rewards(mask, logprobs, ref_logprobs, dpo_logprobs, kwargs, cu_seqlens=None, name="rewards"):
    """ops.token_rewards against the float64 reference, with plain PyTorch's float32 error as the budget."""
    got = ops.token_rewards(logprobs, ref_logprobs, mask, dpo_logprobs=dpo_logprobs, cu_seqlens=cu_seqlens,
                            **kwargs)
    assert got.dtype == torch.float32 and got.shape == mask.shape
    expected = reference.token_rewards(logprobs.double(), ref_logprobs.double(), mask,
                                       dpo_logprobs=dpo_logprobs.double(), cu_seqlens=cu_seqlens, **_double(kwargs))
    baseline = None
    if logprobs.dtype != torch.float64 and mask.numel():
        baseline = reference.token_rewards(logprobs, ref_logprobs, mask, dpo_logprobs=dpo_logprobs,
                                           cu_seqlens=cu_seqlens, **kwargs)
    assert_within_budget(got, expected, baseline, name=name)
    assert bool((got[~mask] == 0).all()), f"{name}: nonzero outside the mask"
    return got


# ---------------------------------------------------------------------------------------------------------------
# token_rewards
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("with_score,dpo_clip", [(True, None), (False, None), (True, 0.05)])
def test_padded(backend, mode, estimator, with_score, dpo_clip):
    mask = _padded_mask(6, 37)
    kwargs = _rewards_kwargs(mode, estimator, with_score, 6, dpo_clip)
    _check_rewards(mask, *_logprobs(mask.shape), kwargs)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_dpo_clip_binds(backend):
    """A clip that binds on most tokens: rto rewards (k1, kl_coef 0) are exactly +-dpo_clip there."""
    mask = _padded_mask(5, 29)
    logprobs, ref_logprobs, dpo_logprobs = _logprobs(mask.shape)
    got = ops.token_rewards(logprobs, ref_logprobs, mask, dpo_logprobs=dpo_logprobs, kl_coef=0.0, dpo_coef=1.0,
                            dpo_clip=0.01)
    expected = reference.token_rewards(logprobs.double(), ref_logprobs.double(), mask,
                                       dpo_logprobs=dpo_logprobs.double(), kl_coef=0.0, dpo_coef=1.0, dpo_clip=0.01)
    assert_within_budget(got, expected, name="clipped rewards")
    assert float(got.abs().max()) <= 0.01 + 1e-9


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("shape", [(4, 1), (1, 1), (9,), (2, 3, 11), (3, 0)])
@pytest.mark.parametrize("mode", ["rto", "dppo"])
def test_odd_shapes(backend, shape, mode):
    mask = torch.rand(shape) < 0.6
    num_segments = mask.numel() // shape[-1] if shape[-1] else shape[0]
    kwargs = _rewards_kwargs(mode, "k3", True, num_segments)
    kwargs["score"] = kwargs["score"].reshape(shape[:-1])
    _check_rewards(mask, *_logprobs(shape), kwargs)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("two_dims", [False, True])
def test_packed_many_short_segments(backend, mode, two_dims):
    cu_seqlens, mask = _packed_stream(23, 6)
    num_segments = cu_seqlens.numel() - 1
    tensors = _logprobs(mask.shape)
    if two_dims:
        mask, tensors = mask[None], [t[None] for t in tensors]
    kwargs = _rewards_kwargs(mode, "k2", True, num_segments)
    _check_rewards(mask, *tensors, kwargs, cu_seqlens=cu_seqlens)
    # Without score too: the run crossing cu_seqlens[5] is two responses either way.
    kwargs.pop("score")
    _check_rewards(mask, *tensors, kwargs, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_packed_run_across_a_boundary_is_split_by_hand(backend):
    """dppo on one run of True over two sequences: each sequence gets its own sum on its own last token."""
    mask = torch.ones(6, dtype=torch.bool)
    cu_seqlens = torch.tensor([0, 0, 4, 4, 6, 6], dtype=torch.int32)
    zeros = torch.zeros(6)
    dpo_logprobs = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    score = torch.tensor([100.0, 10.0, 200.0, 20.0, 300.0])
    got = ops.token_rewards(zeros, zeros, mask, mode="dppo", dpo_logprobs=dpo_logprobs, dpo_coef=1.0, score=score,
                            cu_seqlens=cu_seqlens)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.0, 10.0 + 10.0, 0.0, 11.0 + 20.0]))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_input_dtypes(backend, dtype, mode):
    mask = _padded_mask(5, 23)
    kwargs = _rewards_kwargs(mode, "k3", True, 5, dtype=dtype)
    _check_rewards(mask, *_logprobs(mask.shape, dtype), kwargs, name=f"rewards from {dtype}")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("mode", MODES)
def test_nan_outside_the_mask_never_leaks(backend, mode):
    """Inputs are garbage (NaN) where mask is False: every output element is finite, and 0 there."""
    mask = _padded_mask(4, 19)
    tensors = [torch.where(mask, t, float("nan")) for t in _logprobs(mask.shape)]
    kwargs = _rewards_kwargs(mode, "k3", True, 4)
    _check_rewards(mask, *tensors, kwargs)


@pytest.mark.parametrize("block", [4, 16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode", ["rto", "dppo"])
def test_kernel_blocks_cross_and_every_element_written(block, packed, mode):
    """Runs that cross position blocks (long rows, a tiny forced block), into a NaN-poisoned output buffer."""
    from rto_fast.kernels import rewards as kernels

    if packed:
        lengths = torch.tensor([0, 61, 1, 0, 40, 3, 70])
        cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        mask = torch.rand(int(cu_seqlens[-1])) < 0.85
        num_segments = lengths.numel()
    else:
        cu_seqlens, mask = None, _padded_mask(4, 83)
        num_segments = 4
    mask[:block * 3] = True  # one long run over several blocks
    tensors = _logprobs(mask.shape)
    kwargs = _rewards_kwargs(mode, "k1", True, num_segments, dpo_clip=0.2)
    out = poison_like(torch.empty(mask.shape, dtype=torch.float32))
    got = kernels.token_rewards_forward(tensors[0], tensors[1], mask, dpo_logprobs=tensors[2], cu_seqlens=cu_seqlens,
                                        block=block, out=out, **kwargs)
    assert got is out
    expected = reference.token_rewards(*[t.double() for t in tensors[:2]], mask, dpo_logprobs=tensors[2].double(),
                                       cu_seqlens=cu_seqlens, **_double(kwargs))
    baseline = reference.token_rewards(*tensors[:2], mask, dpo_logprobs=tensors[2], cu_seqlens=cu_seqlens, **kwargs)
    assert_within_budget(got, expected, baseline, name=f"rewards, block {block}")
    assert bool((got[~mask] == 0).all())


@pytest.mark.parametrize("backend", ["reference"], indirect=True)
def test_reference_backend_dispatch(backend):
    mask = _padded_mask(4, 9)
    tensors = _logprobs(mask.shape)
    got = ops.token_rewards(*tensors[:2], mask, dpo_logprobs=tensors[2])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference.token_rewards(*tensors[:2], mask, dpo_logprobs=tensors[2]))
    labels = torch.randint(0, 31, mask.shape)
    logits = _logits((*mask.shape, 31))
    got = ops.token_rewards_from_logits(*logits[:2], labels, mask, dpo_logits=logits[2], mode="dppo")
    want = reference.token_rewards_from_logits(*logits[:2], labels, mask, dpo_logits=logits[2], mode="dppo")
    for got_part, want_part in zip(got, want):
        torch.testing.assert_close(got_part, want_part)


# ---------------------------------------------------------------------------------------------------------------
# token_rewards_from_logits
# ---------------------------------------------------------------------------------------------------------------


def _logits(shape, dtype=torch.float32):
    """Policy, reference and DPO logits: related models (a shared base plus noise), as in RLHF."""
    base = 3 * torch.randn(shape)
    return [(base + 0.5 * torch.randn(shape)).to(dtype) for _ in range(3)]


def _check_from_logits(logits, ref_logits, dpo_logits, labels, mask, kwargs, name="from logits"):
    """Log-probs against the float64 reference (budget: plain PyTorch's float32 log_softmax), and rewards against
    reference.token_rewards of the returned log-probs: a reward error budget derived from the end-to-end float32
    baseline would only measure how lucky that baseline's rounding was on a dozen tokens."""
    reward_kwargs = {key: value for key, value in kwargs.items() if key not in ("temperature", "ignore_index")}
    got = ops.token_rewards_from_logits(logits, ref_logits, labels, mask, dpo_logits=dpo_logits, **kwargs)
    expected = reference.token_rewards_from_logits(
        logits.double(), ref_logits.double(), labels, mask,
        dpo_logits=None if dpo_logits is None else dpo_logits.double(), **_double(kwargs))
    baseline = reference.token_rewards_from_logits(logits, ref_logits, labels, mask, dpo_logits=dpo_logits, **kwargs)
    assert (got[3] is None) == (dpo_logits is None)
    for index, part in enumerate(("rewards", "logprobs", "ref_logprobs", "dpo_logprobs")):
        if got[index] is None:
            continue
        assert got[index].dtype == torch.float32 and got[index].shape == labels.shape
        if index:
            assert_within_budget(got[index], expected[index], baseline[index], name=f"{name}: {part}")
    rewards_of_got = reference.token_rewards(
        got[1].double(), got[2].double(), mask, dpo_logprobs=None if got[3] is None else got[3].double(),
        **_double(reward_kwargs))
    rewards_baseline = reference.token_rewards(got[1], got[2], mask, dpo_logprobs=got[3], **reward_kwargs)
    assert_within_budget(got[0], rewards_of_got, rewards_baseline, name=f"{name}: rewards")
    assert bool((got[0][~mask] == 0).all())
    return got


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("vocab_size", [1000, 4999])
@pytest.mark.parametrize("mode", MODES)
def test_from_logits_padded(backend, vocab_size, mode):
    batch, length = 3, 5
    labels = torch.randint(0, vocab_size, (batch, length))
    labels[0, 1] = -100
    labels[2, -1] = -100
    mask = _padded_mask(batch, length) & (labels != -100)
    logits, ref_logits, dpo_logits = _logits((batch, length, vocab_size))
    kwargs = dict(temperature=0.7, mode=mode, score=torch.randn(batch), kl_coef=0.05, dpo_coef=0.2,
                  kl_estimator="k3")
    _check_from_logits(logits, ref_logits, None if mode == "ppo" else dpo_logits, labels, mask, kwargs)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_from_logits_low_precision_and_strided(backend, dtype):
    """bf16 / fp16 logits, read through logits[:, :-1] views (not contiguous), custom ignore_index."""
    batch, length, vocab_size = 2, 6, 1000
    full = _logits((batch, length + 1, vocab_size), dtype)
    views = [tensor[:, :-1] for tensor in full]
    assert not views[0].is_contiguous()
    labels = torch.randint(0, vocab_size, (batch, length))
    labels[1, 2] = 7777
    mask = torch.rand(batch, length) < 0.8
    kwargs = dict(ignore_index=7777, mode="rto", dpo_clip=0.3, kl_estimator="k2")
    _check_from_logits(*views, labels, mask, kwargs, name=f"from {dtype} logits")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("two_dims", [False, True])
def test_from_logits_packed(backend, two_dims):
    cu_seqlens = torch.tensor([0, 3, 3, 7, 8, 12], dtype=torch.int32)
    vocab_size = 333
    labels = torch.randint(0, vocab_size, (12,))
    mask = torch.rand(12) < 0.8
    logits = _logits((12, vocab_size))
    if two_dims:
        labels, mask, logits = labels[None], mask[None], [t[None] for t in logits]
    kwargs = dict(mode="dppo", score=torch.randn(5), cu_seqlens=cu_seqlens)
    _check_from_logits(*logits, labels, mask, kwargs)


def test_three_logprobs_kernel_small_vocab_blocks():
    """The online log-sum-exp across many vocabulary blocks, -inf logits included, and ignore_index rows."""
    from rto_fast.kernels import rewards as kernels

    vocab_size = 301
    logits, ref_logits, dpo_logits = _logits((7, vocab_size))
    ref_logits[:, :64] = float("-inf")  # whole leading blocks of -inf must not produce NaN
    labels = torch.randint(64, vocab_size, (7,))
    labels[3] = -100
    got = kernels.three_logprobs_forward(logits, ref_logits, labels, dpo_logits=dpo_logits, temperature=1.3,
                                         block_v=16)
    for tensor, result in zip((logits, ref_logits, dpo_logits), got):
        expected = reference.token_logprobs(tensor.double(), labels, temperature=1.3)
        baseline = reference.token_logprobs(tensor, labels, temperature=1.3)
        assert_within_budget(result, expected, baseline, name="log-probs")
        assert float(result[3]) == 0.0


def test_three_logprobs_kernel_mixed_dtypes_and_strides():
    """One launch serves three tensors of different dtypes and layouts: a strided (B, T) view in float32, a
    contiguous bfloat16 tensor and a float16 tensor whose batch stride is smaller than its time stride."""
    from rto_fast.kernels import rewards as kernels

    batch, length, vocab_size = 3, 5, 1000
    labels = torch.randint(0, vocab_size, (batch, length))
    labels[1, 2] = -100
    policy = torch.randn(batch, length + 1, vocab_size)[:, :-1]
    ref = torch.randn(batch, length, vocab_size).to(torch.bfloat16)
    dpo = torch.randn(length, batch, vocab_size).to(torch.float16).transpose(0, 1)
    got = kernels.three_logprobs_forward(policy, ref, labels, dpo_logits=dpo, temperature=0.8, block_v=128)
    for tensor, result in zip((policy, ref, dpo), got):
        expected = reference.token_logprobs(tensor.double(), labels, temperature=0.8)
        baseline = reference.token_logprobs(tensor.float(), labels, temperature=0.8)
        assert_within_budget(result, expected, baseline, name=f"{tensor.dtype} log-probs")
        assert float(result[1, 2]) == 0.0
    ref_only = kernels.three_logprobs_forward(policy, ref, labels, temperature=0.8, block_v=128)
    assert ref_only[2] is None
    assert torch.equal(ref_only[0], got[0]) and torch.equal(ref_only[1], got[1])
    prefetched = kernels.three_logprobs_forward(policy, ref, labels, dpo_logits=dpo, temperature=0.8, block_v=128,
                                                prefetch=True)
    assert all(torch.equal(a, b) for a, b in zip(got, prefetched))  # the same arithmetic, loads issued earlier


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def _bad_reward_calls():
    mask = torch.rand(3, 5) < 0.5
    lp, ref, dpo = _logprobs((3, 5))
    stream_mask = torch.rand(1, 8) < 0.5
    stream = [t.reshape(1, -1)[:, :8] for t in _logprobs((8,))]
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    rewards = ops.token_rewards

    def packed(**kwargs):
        return rewards(stream[0], stream[1], stream_mask, dpo_logprobs=stream[2], **kwargs)

    return [
        ("mode", lambda: rewards(lp, ref, mask, dpo_logprobs=dpo, mode="grpo")),
        ("kl_estimator", lambda: rewards(lp, ref, mask, dpo_logprobs=dpo, kl_estimator="k4")),
        ("dpo_logprobs", lambda: rewards(lp, ref, mask, mode="rto")),
        ("dpo_logprobs", lambda: rewards(lp, ref, mask, mode="dppo")),
        ("ref_logprobs", lambda: rewards(lp, ref[:, :4], mask, dpo_logprobs=dpo)),
        ("dpo_logprobs", lambda: rewards(lp, ref, mask, dpo_logprobs=dpo.T)),
        ("logprobs", lambda: rewards(lp[None], ref, mask, dpo_logprobs=dpo)),
        ("mask", lambda: rewards(lp, ref, mask.float(), dpo_logprobs=dpo)),
        ("logprobs", lambda: rewards(lp.long(), ref, mask, dpo_logprobs=dpo)),
        ("score", lambda: rewards(lp, ref, mask, dpo_logprobs=dpo, score=torch.randn(5))),
        ("score", lambda: rewards(lp, ref, mask, dpo_logprobs=dpo, score=torch.randn(3, 1))),
        ("dpo_clip", lambda: rewards(lp, ref, mask, dpo_logprobs=dpo, dpo_clip=0.0)),
        ("dpo_clip", lambda: rewards(lp, ref, mask, dpo_logprobs=dpo, dpo_clip=-1.0)),
        ("mask", lambda: rewards(lp, ref, mask, dpo_logprobs=dpo, cu_seqlens=torch.tensor([0, 15], dtype=torch.int32))),
        ("cu_seqlens", lambda: packed(cu_seqlens=cu.long())),
        ("cu_seqlens", lambda: packed(cu_seqlens=torch.tensor([0, 3, 9], dtype=torch.int32))),
        ("cu_seqlens", lambda: packed(cu_seqlens=torch.tensor([1, 3, 8], dtype=torch.int32))),
        ("cu_seqlens", lambda: packed(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32))),
        ("score", lambda: packed(cu_seqlens=cu, score=torch.randn(3))),
        ("ref_logprobs", lambda: rewards(lp, ref.to("meta"), mask, dpo_logprobs=dpo)),
        ("kl_coef", lambda: rewards(lp, ref, mask, dpo_logprobs=dpo, kl_coef="0.1")),
    ]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bad_reward_input_names_the_argument(backend):
    for argument, call in _bad_reward_calls():
        with pytest.raises((ValueError, TypeError), match=argument):
            call()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bad_logits_input_names_the_argument(backend):
    labels = torch.randint(0, 50, (2, 4))
    mask = torch.rand(2, 4) < 0.5
    logits, ref_logits, dpo_logits = _logits((2, 4, 50))
    call = ops.token_rewards_from_logits
    bad_labels = labels.clone()
    bad_labels[1, 1] = 50
    cases = [
        ("labels", lambda: call(logits, ref_logits, bad_labels, mask, dpo_logits=dpo_logits)),
        ("labels", lambda: call(logits, ref_logits, labels.float(), mask, dpo_logits=dpo_logits)),
        ("ref_logits", lambda: call(logits, ref_logits[..., :49], labels, mask, dpo_logits=dpo_logits)),
        ("dpo_logits", lambda: call(logits, ref_logits, labels, mask, dpo_logits=dpo_logits[:1])),
        ("dpo_logits", lambda: call(logits, ref_logits, labels, mask, mode="rto")),
        ("logits", lambda: call(logits[:, :3], ref_logits, labels, mask, dpo_logits=dpo_logits)),
        ("mask", lambda: call(logits, ref_logits, labels, mask[:, :3], dpo_logits=dpo_logits)),
        ("temperature", lambda: call(logits, ref_logits, labels, mask, dpo_logits=dpo_logits, temperature=0.0)),
        ("mode", lambda: call(logits, ref_logits, labels, mask, dpo_logits=dpo_logits, mode="bandit")),
    ]
    for argument, bad_call in cases:
        with pytest.raises((ValueError, TypeError), match=argument):
            bad_call()


def test_outputs_do_not_require_grad():
    mask = _padded_mask(3, 7)
    logprobs, ref_logprobs, dpo_logprobs = [t.requires_grad_(True) for t in _logprobs(mask.shape)]
    rewards = ops.token_rewards(logprobs, ref_logprobs, mask, dpo_logprobs=dpo_logprobs)
    assert not rewards.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------------


def test_torch_compile_calls_the_ops_without_graph_breaks():
    def step(logits, ref_logits, dpo_logits, labels, mask, score, cu_seqlens):
        rewards, logprobs, ref_logprobs, dpo_logprobs = ops.token_rewards_from_logits(
            logits, ref_logits, labels, mask, dpo_logits=dpo_logits, mode="dppo", cu_seqlens=cu_seqlens)
        again = ops.token_rewards(logprobs, ref_logprobs, mask, mode="rto", dpo_logprobs=dpo_logprobs,
                                  score=score, dpo_clip=0.1, kl_estimator="k3", cu_seqlens=cu_seqlens)
        return rewards * 2.0, again + 1.0

    cu_seqlens = torch.tensor([0, 4, 4, 9, 13], dtype=torch.int32)
    labels = torch.randint(0, 97, (1, 13))
    mask = torch.rand(1, 13) < 0.7
    args = (*_logits((1, 13, 97)), labels, mask, torch.randn(4), cu_seqlens)
    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(compiled(*args), step(*args)):
        torch.testing.assert_close(got, want)
