"""Tests of rto_fast.ops.gae / ppo_loss / gae_ppo_loss against the float64 reference, on every backend.

    pytest tests/test_gae_ppo.py -q

Backends: `triton` (the kernels, through the interpreter on CPU), `torch` (the C++ scan `rto_fast._C.gae` and the
vectorized loss) and `reference`. Error budgets come from what plain PyTorch makes at float32: a float32 reverse
loop for GAE, reference.ppo_loss on float32 inputs for the loss.
"""

from __future__ import annotations

import pytest
import torch

import rto_fast.ops as ops
from rto_fast.ops import reference
from tests.utils import assert_within_budget, cpu_isas, poison_like

BACKENDS = ["triton", "torch", "reference"]
# The loss and its statistics are sums over tokens: the kernels add blocks of 1024 in float32 and then the blocks,
# PyTorch in its own order, so the two differ by a few roundings even where PyTorch's float32 sum happens to land on
# the float64 value (baseline error ~0): 4 roundings of slack rather than 2 (seen: 3.1 ulp, 1 run in ~400).
REDUCTION_SLACK = 4.0
GAMMA_LAMBDA = [(1.0, 1.0), (0.99, 0.95), (1.0, 0.95), (0.9, 0.0)]
pytestmark = pytest.mark.usefixtures("tensors_on_test_device")


# ---------------------------------------------------------------------------------------------------------------
# Inputs and baselines
# ---------------------------------------------------------------------------------------------------------------


def _padded_mask(batch, length):
    """Random response runs plus the awkward rows: fully masked, ending at the last position, length-1 runs."""
    mask = torch.rand(batch, length) < 0.7
    if batch >= 4 and length >= 3:
        mask[0] = False                      # fully masked row
        mask[1, :] = False
        mask[1, -1] = True                   # a length-1 response at the last position
        mask[2, :] = True                    # one response filling the row
        mask[3, ::2] = True                  # length-1 responses
        mask[3, 1::2] = False
    return mask


def _packed_stream(num_segments, max_length, with_empty=True):
    """(lengths-derived cu_seqlens int32, mask (N,)) with empty, length-1 and fully masked sequences."""
    lengths = torch.randint(1, max_length + 1, (num_segments,))
    if with_empty and num_segments >= 4:
        lengths[1] = 0
        lengths[2] = 1
    cu_seqlens = torch.zeros(num_segments + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    total = int(cu_seqlens[-1])
    mask = torch.rand(total) < 0.75
    if num_segments >= 4:
        mask[int(cu_seqlens[3]):int(cu_seqlens[4])] = False  # a fully masked sequence
    return cu_seqlens, mask


def _float32_loop_gae(rewards, values, mask, gamma, lam, cu_seqlens=None):
    """What plain PyTorch computes in float32: a reverse loop over columns that carries (V, A) of the next action
    token over holes and resets them where a new trajectory (row or packed sequence) begins."""
    length = mask.shape[-1]
    valid = mask.reshape(-1, length)
    segment = reference.segment_ids(mask.shape, cu_seqlens).reshape(valid.shape)
    rewards, values = rewards.float().reshape(valid.shape), values.float().reshape(valid.shape)
    next_value = torch.zeros(valid.shape[0])
    next_advantage = torch.zeros(valid.shape[0])
    next_segment = torch.full((valid.shape[0],), -1)
    advantages = torch.zeros(valid.shape)
    for t in reversed(range(length)):
        same = segment[:, t] == next_segment
        delta = rewards[:, t] + gamma * torch.where(same, next_value, 0.0) - values[:, t]
        advantage = delta + gamma * lam * torch.where(same, next_advantage, 0.0)
        advantages[:, t] = torch.where(valid[:, t], advantage, 0.0)
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_advantage = torch.where(valid[:, t], advantage, next_advantage)
        next_segment = torch.where(valid[:, t], segment[:, t], next_segment)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages.reshape(mask.shape), returns.reshape(mask.shape)


def _check_gae(actual, rewards, values, mask, gamma, lam, cu_seqlens=None):
    expected = reference.gae(rewards.double(), values.double(), mask, gamma=gamma, lam=lam, cu_seqlens=cu_seqlens)
    baseline = _float32_loop_gae(rewards, values, mask, gamma, lam, cu_seqlens)
    for name, got, want, base in zip(("advantages", "returns"), actual, expected, baseline):
        assert got.dtype == torch.float32, f"{name}: dtype {got.dtype}"
        assert bool((got[~mask] == 0).all()), f"{name}: nonzero outside the mask"
        assert_within_budget(got, want, base, name=name)


# ---------------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("gamma,lam", GAMMA_LAMBDA)
def test_gae_padded(backend, gamma, lam):
    mask = _padded_mask(6, 45)
    rewards, values = torch.randn(mask.shape), torch.randn(mask.shape)
    _check_gae(ops.gae(rewards, values, mask, gamma=gamma, lam=lam), rewards, values, mask, gamma, lam)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95)])
@pytest.mark.parametrize("two_dims", [False, True])
def test_gae_packed_many_short_segments(backend, gamma, lam, two_dims):
    cu_seqlens, mask = _packed_stream(40, 9)
    if two_dims:
        mask = mask[None]
    rewards, values = torch.randn(mask.shape), torch.randn(mask.shape)
    actual = ops.gae(rewards, values, mask, gamma=gamma, lam=lam, cu_seqlens=cu_seqlens)
    _check_gae(actual, rewards, values, mask, gamma, lam, cu_seqlens)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("shape", [(3, 1), (1, 1), (7,), (2, 3, 5)])
def test_gae_odd_shapes(backend, shape):
    mask = torch.rand(shape) < 0.6
    mask.reshape(-1)[-1] = True
    rewards, values = torch.randn(shape), torch.randn(shape)
    _check_gae(ops.gae(rewards, values, mask, gamma=0.99, lam=0.95), rewards, values, mask, 0.99, 0.95)


@pytest.mark.parametrize("backend", ["torch"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_gae_cpp_dtypes(backend, dtype):
    """The C++ scan on float64 buffers and on upcast half-precision inputs."""
    mask = _padded_mask(5, 31)
    rewards, values = torch.randn(mask.shape).to(dtype), torch.randn(mask.shape).to(dtype)
    advantages, returns = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    expected = reference.gae(rewards.double(), values.double(), mask, gamma=0.99, lam=0.95)
    assert advantages.dtype == torch.float32 and returns.dtype == torch.float32
    assert_within_budget(advantages, expected[0], name="advantages")
    assert_within_budget(returns, expected[1], name="returns")


@pytest.mark.parametrize("method,block", [("scan", 8), ("scan", 16), ("scan", 64), ("loop", None)])
@pytest.mark.parametrize("packed", [False, True])
def test_gae_kernel_blocks_cross_and_every_element_written(method, block, packed):
    """Tiny blocks force runs across block boundaries; NaN-poisoned outputs show any element left unwritten."""
    from rto_fast.kernels import gae_ppo as kernels

    if packed:
        cu_seqlens, mask = _packed_stream(12, 40)
    else:
        cu_seqlens, mask = None, _padded_mask(5, 53)
    rewards, values = torch.randn(mask.shape), torch.randn(mask.shape)
    advantages = poison_like(rewards)
    returns = poison_like(rewards)
    _, _, segment_stats = kernels.gae_forward(rewards, values, mask, cu_seqlens=cu_seqlens, gamma=0.99, lam=0.95,
                                              method=method, block=block, advantages=advantages, returns=returns)
    _check_gae((advantages, returns), rewards, values, mask, 0.99, 0.95, cu_seqlens)
    if method == "scan":
        # Per-segment (count, mean, M2) of the advantages: what whitening is built from.
        offsets = (cu_seqlens.tolist() if packed else list(range(0, mask.numel() + 1, mask.shape[-1])))
        flat_mask, flat_adv = mask.reshape(-1), advantages.reshape(-1).double()
        for segment, (begin, end) in enumerate(zip(offsets[:-1], offsets[1:])):
            chosen = flat_adv[begin:end][flat_mask[begin:end]]
            count, mean, m2 = segment_stats[segment].double().tolist()
            assert count == chosen.numel()
            if chosen.numel():
                assert abs(mean - chosen.mean().item()) <= 1e-5 * (1 + chosen.abs().max().item())
                assert abs(m2 - (chosen - chosen.mean()).square().sum().item()) <= 1e-4 * (1 + m2)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_gae_agrees_with_trl_loop(backend):
    """Peer oracle: TRL PPOTrainer's lastgaelam loop on right-padded rows whose responses start at column 0.

    TRL bootstraps from the value after the last response token; with values and rewards zeroed on padding (the
    V_{H+1} = 0 convention of docs/math.md) its loop must give our advantages and returns on the response tokens.
    """
    batch, length, gamma, lam = 6, 29, 0.99, 0.95
    response_lengths = torch.randint(1, length + 1, (batch,))
    response_lengths[0] = length
    mask = torch.arange(length)[None, :] < response_lengths[:, None]
    rewards = torch.randn(batch, length).masked_fill(~mask, 0.0)
    values = torch.randn(batch, length).masked_fill(~mask, 0.0)

    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    trl_advantages = torch.stack(advantages_reversed[::-1], axis=1)
    trl_returns = trl_advantages + values

    advantages, returns = ops.gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = reference.gae(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
    zero = torch.zeros(())
    assert_within_budget(advantages, expected[0], torch.where(mask, trl_advantages, zero), name="advantages")
    assert_within_budget(returns, expected[1], torch.where(mask, trl_returns, zero), name="returns")
    torch.testing.assert_close(advantages[mask], trl_advantages[mask], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# PPO loss
# ---------------------------------------------------------------------------------------------------------------


def _ppo_inputs(shape, with_values, mask=None):
    mask = _padded_mask(*shape) if mask is None else mask
    logprobs = -torch.rand(mask.shape) * 3
    inputs = {
        "logprobs": logprobs,
        "old_logprobs": logprobs + 0.3 * torch.randn(mask.shape),  # many ratios outside [0.8, 1.2]
        "advantages": torch.randn(mask.shape),
        "mask": mask,
    }
    if with_values:
        old_values = torch.randn(mask.shape)
        inputs.update(values=old_values + 0.3 * torch.randn(mask.shape), old_values=old_values,
                      returns=torch.randn(mask.shape))
    return inputs


def _reference_ppo(inputs, dtype, **kwargs):
    """reference.ppo_loss at `dtype` with autograd gradients for logprobs and values."""
    cast = {name: (t.to(dtype) if t.dtype.is_floating_point else t) for name, t in inputs.items()}
    cast["logprobs"].requires_grad_(True)
    if "values" in cast:
        cast["values"].requires_grad_(True)
    loss, stats = reference.ppo_loss(cast.pop("logprobs"), cast.pop("old_logprobs"), cast.pop("advantages"),
                                     cast.pop("mask"), **cast, **kwargs)
    return loss, stats


def _check_ppo(loss, stats, inputs, grads, **kwargs):
    """loss, every stat and the gradients against float64 autograd through reference.ppo_loss."""
    leaves = {name: inputs[name].clone().requires_grad_(True) for name in ("logprobs", "values") if name in inputs}
    results = {}
    for dtype in (torch.float64, torch.float32):
        cast = {name: (t.to(dtype) if t.dtype.is_floating_point else t) for name, t in inputs.items()}
        for name in leaves:
            cast[name] = leaves[name].detach().to(dtype).requires_grad_(True)
        ref_loss, ref_stats = reference.ppo_loss(cast["logprobs"], cast["old_logprobs"], cast["advantages"],
                                                 cast["mask"], values=cast.get("values"),
                                                 old_values=cast.get("old_values"), returns=cast.get("returns"),
                                                 **kwargs)
        ref_grads = torch.autograd.grad(ref_loss, [cast[name] for name in leaves])
        results[dtype] = (ref_loss.detach(), ref_stats, dict(zip(leaves, ref_grads)))
    expected, baseline = results[torch.float64], results[torch.float32]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_within_budget(loss.detach(), expected[0], baseline[0], name="loss", slack=REDUCTION_SLACK)
    assert set(stats) == set(reference_stat_names())
    for name, value in stats.items():
        assert value.dtype == torch.float32 and value.dim() == 0 and not value.requires_grad, name
        assert_within_budget(value, expected[1][name], baseline[1][name], name=name, slack=REDUCTION_SLACK)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype
        assert bool((grad[~inputs["mask"]] == 0).all()), f"d loss / d {name}: nonzero outside the mask"
        # Gradients come back in the input dtype: one rounding step of that dtype is part of the budget.
        grad_dtype = grad.dtype if grad.dtype in (torch.bfloat16, torch.float16) else torch.float32
        assert_within_budget(grad, expected[2][name], baseline[2][name], dtype=grad_dtype, name=f"d loss / d {name}")


def reference_stat_names():
    return ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "vf_clipfrac")


def _run_ppo(inputs, **kwargs):
    logprobs = inputs["logprobs"].clone().requires_grad_(True)
    values = inputs["values"].clone().requires_grad_(True) if "values" in inputs else None
    loss, stats = ops.ppo_loss(logprobs, inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
                               values=values, old_values=inputs.get("old_values"), returns=inputs.get("returns"),
                               **kwargs)
    leaves = [logprobs] + ([values] if values is not None else [])
    upstream = 1.7  # a non-unit upstream gradient checks the backward's multiply
    grads = torch.autograd.grad(loss * upstream, leaves)
    grads = {name: grad / upstream for name, grad in zip(("logprobs", "values"), grads)}
    return loss, stats, grads


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("with_values", [True, False])
@pytest.mark.parametrize("clip_eps_high", [None, 0.28])
def test_ppo_loss_padded(backend, agg, with_values, clip_eps_high):
    inputs = _ppo_inputs((7, 41), with_values)
    kwargs = dict(agg=agg, clip_eps_high=clip_eps_high)
    loss, stats, grads = _run_ppo(inputs, **kwargs)
    _check_ppo(loss, stats, inputs, grads, **kwargs)
    if not with_values:
        assert float(stats["vf_loss"]) == 0.0 and float(stats["vf_clipfrac"]) == 0.0
    else:
        assert 0 < float(stats["vf_clipfrac"]) < 1 and 0 < float(stats["clipfrac"]) < 1  # both branches exercised


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_ppo_loss_packed(backend, agg):
    cu_seqlens, mask = _packed_stream(30, 17)
    inputs = _ppo_inputs(None, True, mask=mask[None])
    kwargs = dict(agg=agg, cu_seqlens=cu_seqlens, vf_coef=0.5, clip_eps=0.1)
    loss, stats, grads = _run_ppo(inputs, **kwargs)
    _check_ppo(loss, stats, inputs, grads, **kwargs)


@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
def test_ppo_loss_no_value_clip_and_bf16(backend):
    inputs = _ppo_inputs((4, 23), True)
    inputs = {name: (t.to(torch.bfloat16) if t.dtype.is_floating_point else t) for name, t in inputs.items()}
    loss, stats, grads = _run_ppo(inputs, value_clip=None)
    assert float(stats["vf_clipfrac"]) == 0.0
    _check_ppo(loss, stats, inputs, grads, value_clip=None)


@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
def test_ppo_loss_empty_mask(backend):
    inputs = _ppo_inputs((3, 9), True)
    inputs["mask"] = torch.zeros(3, 9, dtype=torch.bool)
    for agg in ("token-mean", "seq-mean-token-mean"):
        loss, stats, grads = _run_ppo(inputs, agg=agg)
        assert float(loss.detach()) == 0.0 and all(float(v) == 0.0 for v in stats.values())
        assert all(bool((g == 0).all()) for g in grads.values())


@pytest.fixture(params=cpu_isas())
def cpu_copy(request, monkeypatch):
    """The C++ loss (csrc/gae.cpp) on CPU tensors in one instruction-set copy of its vectorized loop."""
    from rto_fast import _C

    monkeypatch.setenv("RTO_FAST_BACKEND", "torch")
    previous = _C.cpu_isa()
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(previous)


@pytest.mark.cpu_path
@pytest.mark.parametrize("layout", ["padded token-mean", "padded seq-mean", "packed seq-mean"])
def test_ppo_loss_cpu_copies_weight_layouts_and_extreme_ratios(cpu_copy, layout):
    """Each weight layout of the vectorized loop (one weight; a weight per row, rows of 37 tokens that vectors
    straddle; a weight per token), tails shorter than a vector, and valid tokens whose log-ratio is beyond +-80
    (those vectors take the per-token path with the C library's exp)."""
    if layout.startswith("packed"):
        cu_seqlens, mask = _packed_stream(23, 29)
        inputs = _ppo_inputs(None, True, mask=mask[None])
        kwargs = dict(agg="seq-mean-token-mean", cu_seqlens=cu_seqlens)
    else:
        inputs = _ppo_inputs((6, 37), True)
        kwargs = dict(agg="token-mean" if layout.endswith("token-mean") else "seq-mean-token-mean")
    flat_mask = inputs["mask"].reshape(-1)
    extreme = flat_mask.nonzero().squeeze(1)[[2, 9, 30]]
    inputs["old_logprobs"].view(-1)[extreme] = inputs["logprobs"].view(-1)[extreme] - torch.tensor([85.0, -85.0, -95.0])
    inputs["advantages"].view(-1)[extreme[2]] = 1.0  # the unclipped branch wins: d loss / d logprob = -w * ratio
    loss, stats, grads = _run_ppo(inputs, **kwargs)
    _check_ppo(loss, stats, inputs, grads, **kwargs)
    # exp(-95) is a float32 subnormal, which the vector exp flushes to 0: that token went the per-token way.
    assert float(grads["logprobs"].view(-1)[extreme[2]]) < 0.0


@pytest.mark.cpu_path
def test_ppo_loss_cpu_copies_ignore_whatever_masked_tokens_hold(cpu_copy):
    """NaN and inf at masked positions (any input) change nothing: the vector lanes select, never multiply by 0."""
    inputs = _ppo_inputs((5, 45), True)
    for name in ("logprobs", "old_logprobs", "advantages", "values", "old_values", "returns"):
        inputs[name] = inputs[name].masked_fill(~inputs["mask"], 0.0)
    clean = _run_ppo(inputs, agg="seq-mean-token-mean")
    poisoned = dict(inputs)
    for index, name in enumerate(("logprobs", "old_logprobs", "advantages", "values", "old_values", "returns")):
        poison = (float("nan"), float("inf"), float("-inf"))[index % 3]
        poisoned[name] = inputs[name].masked_fill(~inputs["mask"], poison)
    dirty = _run_ppo(poisoned, agg="seq-mean-token-mean")
    assert torch.equal(clean[0], dirty[0])
    assert all(torch.equal(clean[1][name], dirty[1][name]) for name in clean[1])
    assert all(torch.equal(clean[2][name], dirty[2][name]) for name in clean[2])


# ---------------------------------------------------------------------------------------------------------------
# gae_ppo_loss
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("agg,packed", [("token-mean", False), ("seq-mean-token-mean", False),
                                        ("seq-mean-token-mean", True)])
def test_gae_ppo_loss_equals_composition(backend, whiten, agg, packed):
    if packed:
        cu_seqlens, mask = _packed_stream(25, 15)
    else:
        cu_seqlens, mask = None, _padded_mask(6, 37)
    rewards, old_values = torch.randn(mask.shape), torch.randn(mask.shape)
    old_logprobs = -torch.rand(mask.shape) * 3
    logprobs = (old_logprobs + 0.3 * torch.randn(mask.shape)).requires_grad_(True)
    values = (old_values + 0.3 * torch.randn(mask.shape)).requires_grad_(True)
    kwargs = dict(gamma=0.99, lam=0.95, cu_seqlens=cu_seqlens, agg=agg, clip_eps_high=0.25)
    loss, stats, advantages, returns = ops.gae_ppo_loss(rewards, old_values, old_logprobs, logprobs, values, mask,
                                                        whiten=whiten, **kwargs)
    grads = torch.autograd.grad(loss, [logprobs, values])

    def composed(dtype):
        lp = logprobs.detach().to(dtype).requires_grad_(True)
        v = values.detach().to(dtype).requires_grad_(True)
        if dtype == torch.float32:  # plain PyTorch at float32: the float32 GAE loop, then the reference
            adv, ret = _float32_loop_gae(rewards, old_values, mask, 0.99, 0.95, cu_seqlens)
        else:
            adv, ret = reference.gae(rewards.double(), old_values.double(), mask, gamma=0.99, lam=0.95,
                                     cu_seqlens=cu_seqlens)
        if whiten:
            adv = reference.masked_whiten(adv, mask)
        out_loss, out_stats = reference.ppo_loss(lp, old_logprobs.to(dtype), adv, mask, values=v,
                                                 old_values=old_values.to(dtype), returns=ret,
                                                 cu_seqlens=cu_seqlens, agg=agg, clip_eps_high=0.25)
        return out_loss.detach(), out_stats, adv, ret, torch.autograd.grad(out_loss, [lp, v])

    expected, baseline = composed(torch.float64), composed(torch.float32)
    assert_within_budget(advantages, expected[2], baseline[2], name="advantages")
    assert_within_budget(returns, expected[3], baseline[3], name="returns")
    assert_within_budget(loss.detach(), expected[0], baseline[0], name="loss", slack=REDUCTION_SLACK)
    for name in stats:
        assert_within_budget(stats[name], expected[1][name], baseline[1][name], name=name, slack=REDUCTION_SLACK)
    for name, got, want, base in zip(("logprobs", "values"), grads, expected[4], baseline[4]):
        assert_within_budget(got, want, base, name=f"d loss / d {name}")

    # The separate ops composed the same way give the same numbers.
    separate_adv, separate_ret = ops.gae(rewards, old_values, mask, gamma=0.99, lam=0.95, cu_seqlens=cu_seqlens)
    if whiten:
        separate_adv = reference.masked_whiten(separate_adv, mask)
    separate_loss, _ = ops.ppo_loss(logprobs, old_logprobs, separate_adv, mask, values=values,
                                    old_values=old_values, returns=separate_ret, cu_seqlens=cu_seqlens, agg=agg,
                                    clip_eps_high=0.25)
    torch.testing.assert_close(separate_loss, loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
def test_gae_ppo_loss_actor_only(backend):
    mask = _padded_mask(4, 19)
    rewards, old_values = torch.randn(mask.shape), torch.randn(mask.shape)
    old_logprobs = -torch.rand(mask.shape)
    logprobs = (old_logprobs + 0.3 * torch.randn(mask.shape)).requires_grad_(True)
    loss, stats, advantages, _ = ops.gae_ppo_loss(rewards, old_values, old_logprobs, logprobs, None, mask)
    expected_loss, expected_stats, expected_adv, _ = reference.gae_ppo_loss(
        rewards.double(), old_values.double(), old_logprobs.double(), logprobs.detach().double(), None, mask)
    assert_within_budget(advantages, expected_adv, name="advantages", slack=8.0)
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    assert float(stats["vf_loss"]) == 0.0
    loss.backward()
    assert logprobs.grad is not None and bool(torch.isfinite(logprobs.grad).all())


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def _bad_calls():
    mask = torch.ones(2, 5, dtype=torch.bool)
    x = torch.randn(2, 5)
    packed_mask = torch.ones(6, dtype=torch.bool)
    y = torch.randn(6)
    good_cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    return [
        ("rewards", lambda: ops.gae(torch.randn(2, 4), x, mask)),
        ("values", lambda: ops.gae(x, torch.randn(5, 2), mask)),
        ("mask", lambda: ops.gae(x, x, mask.float())),
        ("rewards", lambda: ops.gae(x.long(), x, mask)),
        ("cu_seqlens", lambda: ops.gae(y, y, packed_mask, cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32))),
        ("cu_seqlens", lambda: ops.gae(y, y, packed_mask, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))),
        ("cu_seqlens", lambda: ops.gae(y, y, packed_mask, cu_seqlens=good_cu.long())),
        ("mask", lambda: ops.gae(x, x, mask, cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))),
        ("old_logprobs", lambda: ops.ppo_loss(x, torch.randn(2, 6), x, mask)),
        ("advantages", lambda: ops.ppo_loss(x, x, x.int(), mask)),
        ("mask", lambda: ops.ppo_loss(x, x, x, mask.int())),
        ("agg", lambda: ops.ppo_loss(x, x, x, mask, agg="seq-mean")),
        ("old_values", lambda: ops.ppo_loss(x, x, x, mask, values=x, returns=x)),
        ("returns", lambda: ops.ppo_loss(x, x, x, mask, values=x, old_values=x)),
        ("values", lambda: ops.ppo_loss(x, x, x, mask, values=x[:, :4], old_values=x, returns=x)),
        ("cu_seqlens", lambda: ops.ppo_loss(y, y, y, packed_mask, cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))),
        ("agg", lambda: ops.gae_ppo_loss(x, x, x, x, x, mask, agg="sum")),
        ("old_values", lambda: ops.gae_ppo_loss(x, x[:1], x, x, x, mask)),
        ("cu_seqlens", lambda: ops.gae_ppo_loss(y, y, y, y, y, packed_mask,
                                                cu_seqlens=torch.tensor([0, 7, 6], dtype=torch.int32))),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_names_the_argument(index):
    name, call = _bad_calls()[index]
    with pytest.raises(ValueError, match=name):
        call()


# ---------------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------------


def test_torch_compile_calls_the_ops_without_graph_breaks():
    def step(rewards, values, mask, logprobs, old_logprobs, new_values):
        advantages, returns = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95)
        loss, stats = ops.ppo_loss(logprobs, old_logprobs, advantages, mask, values=new_values, old_values=values,
                                   returns=returns)
        return loss * 2.0, stats["clipfrac"]

    inputs = _ppo_inputs((4, 21), True)
    rewards = torch.randn(inputs["mask"].shape)
    leaves = [inputs["logprobs"].clone().requires_grad_(True), inputs["values"].clone().requires_grad_(True)]
    args = (rewards, inputs["old_values"], inputs["mask"], leaves[0], inputs["old_logprobs"], leaves[1])
    compiled = torch.compile(step, fullgraph=True)
    loss, clipfrac = compiled(*args)
    grads = torch.autograd.grad(loss, leaves)
    eager_leaves = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]
    eager_loss, eager_clipfrac = step(rewards, inputs["old_values"], inputs["mask"], eager_leaves[0],
                                      inputs["old_logprobs"], eager_leaves[1])
    eager_grads = torch.autograd.grad(eager_loss, eager_leaves)
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(clipfrac, eager_clipfrac)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.cpu_path
@pytest.mark.parametrize("layout_case", ["scalar", "per-row", "per-token"])
def test_vectorized_torch_loss_matches_cpp(layout_case):
    """The vectorized torch loss (the path for RTO_FAST_BACKEND=torch off CPU) agrees with the C++ one."""
    from rto_fast.ops import gae_ppo as impl

    if layout_case == "per-token":
        cu_seqlens, mask = _packed_stream(20, 13)
    else:
        cu_seqlens, mask = None, _padded_mask(5, 27)
    inputs = _ppo_inputs(None, True, mask=mask)
    agg = "token-mean" if layout_case == "scalar" else "seq-mean-token-mean"
    weights, layout = impl._aggregation_weights(mask, cu_seqlens, agg)
    whiten_params = impl._whiten_params(inputs["advantages"], mask)
    args = (inputs["logprobs"], inputs["old_logprobs"], inputs["advantages"], mask, weights, layout,
            inputs["values"], inputs["old_values"], inputs["returns"], whiten_params, 0.2, 0.3, 0.2, 0.1)
    for got, want in zip(impl._ppo_torch(*args), impl._ppo_cpu(*args)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
