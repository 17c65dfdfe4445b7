"""The ops contract on every backend: what a trajectory is, what NaN and inf give, and how bad arguments are named.

    pytest tests/test_ops_contract.py -q

A trajectory is a row, or a packed sequence between `cu_seqlens` boundaries; its action tokens are its mask-True
positions, and False positions inside it (prompt, tool output between turns) are holes, not ends. The oracles
here are written from that sentence and nothing else: GAE on the action tokens with the holes cut out, the
multi-turn GAE formula that verl uses (values and advantages carried unchanged over observation tokens), and for
single-turn rows the classic per-response GAE that the trainer relied on before multi-turn trajectories existed.

Backends: `triton` (through the interpreter on CPU), `torch` (the C++ / vectorized CPU paths) and `reference`.
"""

from __future__ import annotations

import math

import pytest
import torch

import rto_fast.ops as ops
from rto_fast.ops import reference

BACKENDS = ["triton", "torch", "reference"]
pytestmark = pytest.mark.usefixtures("tensors_on_test_device")
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------------------------------
# Inputs: trajectories with holes, packed streams with empty and action-less sequences
# ---------------------------------------------------------------------------------------------------------------


def _multi_turn_rows(batch, length):
    """Rows of prompt, then 1-4 turns of actions separated by tool-output holes, then padding; plus a row without
    any action token and a row whose only action token is its last position."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(2, batch):
        position = int(torch.randint(0, 4, ()))
        for _ in range(int(torch.randint(1, 5, ()))):
            turn = int(torch.randint(1, 6, ()))
            mask[row, position:position + turn] = True
            position += turn + int(torch.randint(1, 4, ()))  # the hole: environment / tool output
    mask[1, -1] = True
    return mask


def _packed_multi_turn(num_sequences, max_length):
    """(cu_seqlens int32, mask (N,)): random holes, an empty sequence, a sequence without action tokens."""
    lengths = torch.randint(1, max_length + 1, (num_sequences,))
    lengths[1] = 0
    cu_seqlens = torch.zeros(num_sequences + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    mask = torch.rand(int(cu_seqlens[-1])) < 0.6
    mask[int(cu_seqlens[2]):int(cu_seqlens[3])] = False
    return cu_seqlens, mask


def _trajectories(mask, cu_seqlens):
    """Per trajectory, the flat positions of its action tokens in order."""
    flat = mask.reshape(-1).cpu()
    if cu_seqlens is None:
        length = mask.shape[-1]
        bounds = [(start, start + length) for start in range(0, flat.numel(), length)]
    else:
        offsets = cu_seqlens.tolist()
        bounds = list(zip(offsets[:-1], offsets[1:]))
    return [[p for p in range(begin, end) if flat[p]] for begin, end in bounds]


def _gae_with_holes_cut_out(rewards, values, mask, gamma, lam, cu_seqlens=None):
    """Float64: each trajectory's action tokens gathered into a hole-free sequence, the textbook GAE on it, and the
    results put back; 0 everywhere else."""
    r, v = rewards.double().reshape(-1).cpu(), values.double().reshape(-1).cpu()
    advantages = torch.zeros_like(r)
    for positions in _trajectories(mask, cu_seqlens):
        next_value = next_advantage = 0.0
        for p in reversed(positions):
            next_advantage = r[p] + gamma * next_value - v[p] + gamma * lam * next_advantage
            next_value = v[p]
            advantages[p] = next_advantage
    advantages = advantages.reshape(mask.shape)
    returns = torch.where(mask.cpu(), advantages + v.reshape(mask.shape), 0.0)
    return advantages, returns


def _verl_multi_turn_gae(rewards, values, mask, gamma, lam):
    """verl's multi-turn formula on padded rows, written out: a reverse loop over columns in which observation
    tokens (mask False) keep `nextvalues` and `lastgaelam` unchanged. It outputs its carry on those tokens, so
    only action tokens are compared."""
    r, v, m = rewards.double().cpu(), values.double().cpu(), mask.double().cpu()
    next_values = torch.zeros(r.shape[0], dtype=torch.float64)
    last_gae = torch.zeros(r.shape[0], dtype=torch.float64)
    advantages = torch.zeros_like(r)
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_values - v[:, t]
        candidate = delta + gamma * lam * last_gae
        next_values = v[:, t] * m[:, t] + (1 - m[:, t]) * next_values
        last_gae = candidate * m[:, t] + (1 - m[:, t]) * last_gae
        advantages[:, t] = last_gae
    return advantages


def _per_response_gae(rewards, values, mask, gamma, lam):
    """The GAE the trainer used for single-turn rows: every maximal run of True is a response of its own."""
    r, v, m = rewards.double().cpu(), values.double().cpu(), mask.cpu()
    advantages = torch.zeros_like(r)
    for row in range(r.shape[0]):
        next_value = next_advantage = 0.0
        for t in reversed(range(r.shape[1])):
            if not m[row, t]:
                next_value = next_advantage = 0.0
                continue
            next_advantage = r[row, t] + gamma * next_value - v[row, t] + gamma * lam * next_advantage
            next_value = v[row, t]
            advantages[row, t] = next_advantage
    return advantages


def _close(actual, expected, name, atol=2e-5):
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol * scale, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# 1. One definition of a trajectory
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_runs_over_action_tokens_with_holes_cut_out(backend, gamma, lam):
    mask = _multi_turn_rows(7, 41)
    rewards, values = torch.randn(mask.shape), torch.randn(mask.shape)
    # Whatever the holes hold is never read.
    rewards, values = rewards.masked_fill(~mask, NAN), values.masked_fill(~mask, INF)
    advantages, returns = ops.gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected_advantages, expected_returns = _gae_with_holes_cut_out(rewards, values, mask, gamma, lam)
    _close(advantages, expected_advantages, "advantages")
    _close(returns, expected_returns, "returns")
    assert bool((advantages[~mask] == 0).all()) and bool((returns[~mask] == 0).all())
    verl = _verl_multi_turn_gae(rewards.masked_fill(~mask, 0.0), values.masked_fill(~mask, 0.0), mask, gamma, lam)
    _close(advantages[mask], verl[mask.cpu()], "advantages against verl's multi-turn formula")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_gae_packed_trajectories_never_cross_a_boundary(backend):
    cu_seqlens, mask = _packed_multi_turn(17, 13)
    rewards, values = torch.randn(mask.shape), torch.randn(mask.shape)
    advantages, returns = ops.gae(rewards, values, mask, gamma=0.97, lam=0.9, cu_seqlens=cu_seqlens)
    expected_advantages, expected_returns = _gae_with_holes_cut_out(rewards, values, mask, 0.97, 0.9, cu_seqlens)
    _close(advantages, expected_advantages, "advantages")
    _close(returns, expected_returns, "returns")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_single_turn_rows_keep_the_per_response_gae(backend):
    """One response per row (prompt, response, padding): the trajectory contract gives what per-response GAE gave,
    so the RL stage, whose rows are single-turn, computes the same advantages as before multi-turn support."""
    batch, length = 6, 33
    starts = torch.randint(0, 10, (batch,))
    ends = torch.minimum(starts + torch.randint(1, 24, (batch,)), torch.tensor(length))
    columns = torch.arange(length)
    mask = (columns >= starts[:, None]) & (columns < ends[:, None])
    rewards, values = torch.randn(mask.shape), torch.randn(mask.shape)
    advantages, _ = ops.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    _close(advantages, _per_response_gae(rewards, values, mask, 1.0, 0.95), "advantages")


@pytest.mark.parametrize("block", [4, 16])
@pytest.mark.parametrize("method", ["scan", "loop"])
def test_gae_kernel_carries_the_recursion_over_holes_across_blocks(block, method):
    """Holes that straddle the Triton scan's position blocks (a tiny forced block), padded and packed."""
    from rto_fast.kernels import gae_ppo as kernels

    mask = _multi_turn_rows(5, 57)
    mask[2, : 3 * block] = False
    mask[2, 3 * block - 1] = True  # one action token, then a hole spanning whole blocks
    rewards, values = torch.randn(mask.shape), torch.randn(mask.shape)
    advantages, returns, _ = kernels.gae_forward(rewards, values, mask, gamma=0.95, lam=0.9, method=method,
                                                 block=block if method == "scan" else None)
    expected_advantages, expected_returns = _gae_with_holes_cut_out(rewards, values, mask, 0.95, 0.9)
    _close(advantages, expected_advantages, "advantages")
    _close(returns, expected_returns, "returns")
    cu_seqlens, packed_mask = _packed_multi_turn(9, 40)
    rewards, values = torch.randn(packed_mask.shape), torch.randn(packed_mask.shape)
    advantages, _, stats = kernels.gae_forward(rewards, values, packed_mask, cu_seqlens=cu_seqlens, gamma=0.95,
                                               lam=0.9, method=method, block=block if method == "scan" else None)
    expected, _ = _gae_with_holes_cut_out(rewards, values, packed_mask, 0.95, 0.9, cu_seqlens)
    _close(advantages, expected, "packed advantages")
    if stats is not None:  # the whitening statistics count action tokens only
        assert stats[:, 0].sum().item() == packed_mask.sum().item()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("packed", [False, True])
def test_dppo_sum_and_score_land_on_the_trajectorys_last_action_token(backend, packed):
    if packed:
        cu_seqlens, mask = _packed_multi_turn(11, 15)
        num_trajectories = cu_seqlens.numel() - 1
    else:
        cu_seqlens, mask = None, _multi_turn_rows(6, 37)
        num_trajectories = 6
    logprobs, ref_logprobs, dpo_logprobs = (-torch.rand(mask.shape) * 3 for _ in range(3))
    score = torch.randn(num_trajectories)
    got = ops.token_rewards(logprobs, ref_logprobs, mask, mode="dppo", dpo_logprobs=dpo_logprobs, score=score,
                            kl_coef=0.05, dpo_coef=0.2, score_coef=0.5, cu_seqlens=cu_seqlens)
    expected = (-0.05 * (logprobs - ref_logprobs)).double().reshape(-1).cpu()
    log_ratio = (dpo_logprobs - ref_logprobs).double().reshape(-1).cpu()
    for trajectory, positions in enumerate(_trajectories(mask, cu_seqlens)):
        if positions:
            expected[positions[-1]] += 0.2 * log_ratio[positions].sum() + 0.5 * float(score[trajectory])
    expected = torch.where(mask.reshape(-1).cpu(), expected, 0.0).reshape(mask.shape)
    _close(got, expected, "dppo rewards")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_gae_ppo_loss_and_seq_mean_follow_the_trajectories(backend):
    """gae_ppo_loss on multi-turn rows equals gae with the holes cut out, whitened over action tokens, then the
    clipped loss averaged per trajectory (seq-mean-token-mean)."""
    mask = _multi_turn_rows(6, 29)
    rewards, old_values, old_logprobs = torch.randn(mask.shape), torch.randn(mask.shape), -torch.rand(mask.shape)
    logprobs = (old_logprobs + 0.1 * torch.randn(mask.shape)).requires_grad_()
    values = (old_values + 0.1 * torch.randn(mask.shape)).requires_grad_()
    loss, stats, advantages, returns = ops.gae_ppo_loss(rewards, old_values, old_logprobs, logprobs, values, mask,
                                                        gamma=1.0, lam=0.95, agg="seq-mean-token-mean")
    cut, cut_returns = _gae_with_holes_cut_out(rewards, old_values, mask, 1.0, 0.95)
    whitened = reference.masked_whiten(cut, mask.cpu())
    _close(advantages, whitened, "whitened advantages", atol=1e-4)
    _close(returns, cut_returns, "returns")
    # seq-mean-token-mean by hand: the mean over trajectories with action tokens of their token means.
    ratio = torch.exp(logprobs.detach().double() - old_logprobs.double()).cpu()
    adv = whitened.double()
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    means = [pg[row][mask[row].cpu()].mean() for row in range(mask.shape[0]) if mask[row].any()]
    _close(stats["pg_loss"], torch.stack(means).mean(), "pg_loss", atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# 2. NaN and inf: what torch gives, on every backend
# ---------------------------------------------------------------------------------------------------------------


def _same_nonfinite(actual, expected, name):
    """Non-finite where the float64 reference is non-finite (NaN as NaN, +-inf with its sign), close elsewhere."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{name}: NaN at {actual.isnan().nonzero().tolist()}, " \
                                                          f"expected at {expected.isnan().nonzero().tolist()}"
    assert torch.equal(actual.isposinf(), expected.isposinf()), f"{name}: +inf positions differ"
    assert torch.equal(actual.isneginf(), expected.isneginf()), f"{name}: -inf positions differ"
    finite = expected.isfinite()
    _close(actual[finite], expected[finite], name, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_nan_and_inf_rows_as_torch(backend, dtype):
    """A NaN logit, a +inf logit, a row of -inf, -inf at the label only: log-prob, entropy and gradient as torch's
    log_softmax gives them (NaN rows stay NaN, the other rows are untouched)."""
    logits = torch.randn(6, 67).to(dtype)
    logits[1, 5] = NAN
    logits[2, 9] = INF
    logits[3, :] = -INF
    logits[4, 7] = -INF
    labels = torch.tensor([0, 1, 2, 3, 7, 66])
    leaf = logits.clone().requires_grad_()
    logprobs, entropy = ops.token_logprobs(leaf, labels, return_entropy=True)
    logprobs.backward(torch.ones_like(logprobs))
    expected_logprobs, expected_entropy = reference.token_logprobs(logits.double(), labels, return_entropy=True)
    _same_nonfinite(logprobs, expected_logprobs, "logprobs")
    _same_nonfinite(entropy, expected_entropy, "entropy")
    assert expected_logprobs[[1, 2, 3]].isnan().all() and expected_logprobs[4] == -INF
    grad_nan_rows = leaf.grad.isnan().any(-1).cpu()
    assert grad_nan_rows.tolist() == [False, True, True, True, False, False], grad_nan_rows.tolist()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_linear_token_logprobs_nan_weight_row_gives_nan(backend):
    hidden, weight = torch.randn(5, 8), torch.randn(13, 8)
    weight[4, 3] = NAN  # one vocabulary row: it enters every row's softmax
    got = ops.linear_token_logprobs(hidden, weight, torch.randint(0, 13, (5,)))
    assert got.isnan().all(), got.tolist()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("poisoned", ["logprobs", "old_logprobs", "advantages", "values", "old_values", "returns"])
@pytest.mark.parametrize("poison", [NAN, INF])
def test_ppo_loss_nan_and_inf_at_an_action_token_as_torch(backend, poisoned, poison):
    """Shapes of 3 x 37 so that the CPU loss runs its vector lanes as well as its per-token tail."""
    mask = torch.rand(3, 37) < 0.8
    position = tuple(int(i) for i in mask.nonzero()[5])
    inputs = {"logprobs": -torch.rand(mask.shape), "old_logprobs": -torch.rand(mask.shape),
              "advantages": torch.randn(mask.shape), "values": torch.randn(mask.shape),
              "old_values": torch.randn(mask.shape), "returns": torch.randn(mask.shape)}
    inputs[poisoned][position] = poison
    inputs = {name: tensor.masked_fill(~mask, NAN) for name, tensor in inputs.items()}  # holes: never read
    kwargs = dict(values=inputs["values"], old_values=inputs["old_values"], returns=inputs["returns"])
    loss, stats = ops.ppo_loss(inputs["logprobs"], inputs["old_logprobs"], inputs["advantages"], mask, **kwargs)
    double = {name: tensor.double() for name, tensor in inputs.items()}
    expected_loss, expected_stats = reference.ppo_loss(
        double["logprobs"], double["old_logprobs"], double["advantages"], mask, values=double["values"],
        old_values=double["old_values"], returns=double["returns"])
    _same_nonfinite(loss, expected_loss, "loss")
    for name in expected_stats:
        _same_nonfinite(stats[name], expected_stats[name], name)
    if math.isnan(poison):
        assert math.isnan(float(loss))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_gae_nan_reward_reaches_only_earlier_tokens_of_its_trajectory(backend):
    mask = _multi_turn_rows(5, 31)
    rewards, values = torch.randn(mask.shape), torch.randn(mask.shape)
    row = 4
    positions = mask[row].nonzero().squeeze(1)
    middle = int(positions[len(positions) // 2])
    rewards[row, middle] = NAN
    advantages, returns = ops.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    expected_advantages, expected_returns = reference.gae(rewards.double(), values.double(), mask, gamma=1.0,
                                                          lam=0.95)
    _same_nonfinite(advantages, expected_advantages, "advantages")
    _same_nonfinite(returns, expected_returns, "returns")
    nan_positions = advantages.isnan().nonzero().tolist()
    assert nan_positions == [[row, int(p)] for p in positions if p <= middle]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("mode,dpo_clip", [("rto", 0.1), ("rto", None), ("dppo", None)])
def test_token_rewards_nan_dpo_logprob_as_torch(backend, mode, dpo_clip):
    """A NaN DPO log-prob under dpo_clip stays NaN (a max-num clamp would make it +-dpo_clip); for dppo it reaches
    the trajectory's summed reward only."""
    mask = _multi_turn_rows(4, 23)
    logprobs, ref_logprobs, dpo_logprobs = (-torch.rand(mask.shape) * 2 for _ in range(3))
    position = tuple(int(i) for i in mask.nonzero()[3])
    dpo_logprobs[position] = NAN
    got = ops.token_rewards(logprobs, ref_logprobs, mask, mode=mode, dpo_logprobs=dpo_logprobs, dpo_clip=dpo_clip)
    expected = reference.token_rewards(logprobs.double(), ref_logprobs.double(), mask, mode=mode,
                                       dpo_logprobs=dpo_logprobs.double(), dpo_clip=dpo_clip)
    _same_nonfinite(got, expected, "rewards")
    assert int(got.isnan().sum()) == 1


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_token_rewards_from_logits_nan_logit_as_torch(backend):
    mask = torch.ones(2, 5, dtype=torch.bool)
    logits, ref_logits, dpo_logits = (torch.randn(2, 5, 11) for _ in range(3))
    logits[1, 2, 4] = NAN
    ref_logits[0, 3, :] = -INF
    labels = torch.randint(0, 11, (2, 5))
    rewards, logprobs, ref_logprobs, _ = ops.token_rewards_from_logits(logits, ref_logits, labels, mask,
                                                                       dpo_logits=dpo_logits)
    expected = reference.token_rewards_from_logits(logits.double(), ref_logits.double(), labels, mask,
                                                   dpo_logits=dpo_logits.double())
    _same_nonfinite(rewards, expected[0], "rewards")
    _same_nonfinite(logprobs, expected[1], "logprobs")
    _same_nonfinite(ref_logprobs, expected[2], "ref_logprobs")
    assert rewards.isnan().nonzero().tolist() == [[0, 3], [1, 2]]


# ---------------------------------------------------------------------------------------------------------------
# 3. Every bad argument named
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype,label,vocab_size", [(torch.uint8, 255, 300), (torch.uint8, 156, 160),
                                                     (torch.int16, 30000, 40000)])
def test_narrow_integer_labels_are_compared_in_int64(backend, dtype, label, vocab_size):
    """uint8 255 < V=300 and int16 30000 < V=40000 are valid labels (compared in their own dtype, V wraps and they
    were rejected); uint8 156 is not ignore_index=-100 (which wraps to 156 in uint8)."""
    logits = torch.randn(2, vocab_size)
    labels = torch.tensor([label, 3], dtype=dtype)
    expected = reference.token_logprobs(logits.double(), labels.long())
    _close(ops.token_logprobs(logits, labels), expected, "token_logprobs")
    hidden, weight = torch.randn(2, 4), torch.randn(vocab_size, 4)
    _close(ops.linear_token_logprobs(hidden, weight, labels), reference.token_logprobs(
        (hidden @ weight.T).double(), labels.long()), "linear_token_logprobs")
    mask = torch.ones(2, dtype=torch.bool)
    _, logprobs, _, _ = ops.token_rewards_from_logits(logits, logits, labels, mask, mode="ppo")
    _close(logprobs, expected, "token_rewards_from_logits")
    with pytest.raises(ValueError, match="labels: label 301"):
        ops.token_logprobs(torch.randn(1, 301), torch.tensor([301], dtype=torch.int16))


def _ppo_arguments():
    mask = torch.ones(2, 5, dtype=torch.bool)
    x = torch.randn(2, 5)
    return mask, x


@pytest.mark.parametrize("name,value,allowed", [
    ("clip_eps", -0.2, r"\[0.0, 1.0\]"), ("clip_eps", NAN, r"\[0.0, 1.0\]"),
    ("clip_eps_high", -0.5, r"\[0.0, inf\)"), ("value_clip", -1.0, r"\[0.0, inf\)"),
    ("vf_coef", -0.1, r"\[0.0, inf\)"), ("vf_coef", INF, r"\[0.0, inf\)"),
])
def test_ppo_loss_out_of_range_numbers_are_named(name, value, allowed):
    mask, x = _ppo_arguments()
    for call in (lambda: ops.ppo_loss(x, x, x, mask, values=x, old_values=x, returns=x, **{name: value}),
                 lambda: ops.gae_ppo_loss(x, x, x, x, x, mask, **{name: value})):
        with pytest.raises(ValueError, match=f"^{name}: must be in {allowed}, got"):
            call()


@pytest.mark.parametrize("name,value", [("gamma", NAN), ("gamma", -1.0), ("gamma", 1.5), ("lam", 2.0),
                                        ("lam", -0.1), ("lam", INF)])
def test_gae_out_of_range_numbers_are_named(name, value):
    mask, x = _ppo_arguments()
    for call in (lambda: ops.gae(x, x, mask, **{name: value}),
                 lambda: ops.gae_ppo_loss(x, x, x, x, x, mask, **{name: value})):
        with pytest.raises(ValueError, match=rf"^{name}: must be in \[0.0, 1.0\], got"):
            call()


@pytest.mark.parametrize("name,value", [("kl_coef", -0.1), ("kl_coef", NAN), ("dpo_coef", INF),
                                        ("score_coef", NAN), ("dpo_clip", 0.0), ("dpo_clip", -1.0)])
def test_token_rewards_out_of_range_numbers_are_named(name, value):
    mask, x = _ppo_arguments()
    with pytest.raises(ValueError, match=f"^{name}: must be"):
        ops.token_rewards(x, x, mask, dpo_logprobs=x, **{name: value})


def test_inplace_backward_refuses_a_leaf_that_requires_grad():
    labels = torch.randint(0, 9, (3,))
    leaf = torch.randn(3, 9, requires_grad=True)
    for logits in (leaf, leaf.view(3, 9), leaf[:, :]):
        with pytest.raises(ValueError, match="^inplace_backward: logits is"):
            ops.token_logprobs(logits, labels, inplace_backward=True)
    before = leaf.detach().clone()
    computed = leaf * 2.0  # a non-leaf (an LM head's output): allowed, and the leaf is left alone
    ops.token_logprobs(computed, labels, inplace_backward=True).sum().backward()
    assert torch.equal(leaf.detach(), before) and leaf.grad is not None
    with torch.no_grad():  # no backward will run: nothing to refuse
        ops.token_logprobs(leaf, labels, inplace_backward=True)


def test_a_tensor_on_another_device_is_the_one_named():
    """The first tensor argument sets the device; the error names whichever other tensor differs."""
    mask, x = _ppo_arguments()
    mask = mask.to(x.device)
    meta = torch.empty(2, 5, device="meta")
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    cases = [
        ("labels", lambda: ops.token_logprobs(logits, labels.to("meta"))),
        ("weight", lambda: ops.linear_token_logprobs(x, torch.randn(7, 5, device="meta"), labels[:, 0].clone())),
        ("labels", lambda: ops.token_rewards_from_logits(logits, logits, labels.to("meta"), mask, mode="ppo")),
        ("mask", lambda: ops.token_rewards_from_logits(logits, logits, labels, mask.to("meta"), mode="ppo")),
        ("mask", lambda: ops.token_rewards(x, x, mask.to("meta"), dpo_logprobs=x)),
        ("dpo_logprobs", lambda: ops.token_rewards(x, x, mask, dpo_logprobs=meta)),
        ("values", lambda: ops.gae(x, meta, mask)),
        ("mask", lambda: ops.gae(x, x, mask.to("meta"))),
        ("old_values", lambda: ops.ppo_loss(x, x, x, mask, values=x, old_values=meta, returns=x)),
        ("advantages", lambda: ops.ppo_loss(x, x, meta, mask)),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=f"^{name}: on meta, but"):
            call()
