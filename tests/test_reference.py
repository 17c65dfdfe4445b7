"""The oracle checked against independent formulations and hand-computed cases.

Every fast path is tested against `rto_fast.reference`, so the reference itself must be right: here each of its
functions is compared with a second, differently written definition (cross entropy, closed forms, explicit loops)
and with small cases worked out by hand from docs/math.md.
"""

import math

import pytest
import torch

from rto_fast.ops import reference


def test_token_logprobs_matches_cross_entropy_and_entropy_definition():
    logits = torch.randn(3, 5, 37, dtype=torch.float64) * 3
    labels = torch.randint(0, 37, (3, 5))
    labels[0, 1] = -100
    logprobs, entropy = reference.token_logprobs(logits, labels, temperature=0.7, return_entropy=True)
    expected = -torch.nn.functional.cross_entropy((logits / 0.7).transpose(1, 2), labels, reduction="none")
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-12)
    probs = torch.softmax(logits / 0.7, -1)
    expected_entropy = -(probs * probs.log()).sum(-1)
    expected_entropy[0, 1] = 0
    torch.testing.assert_close(entropy, expected_entropy, rtol=0, atol=1e-12)
    assert logprobs[0, 1] == 0


def test_token_logprobs_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="labels"):
        reference.token_logprobs(torch.randn(2, 5), torch.tensor([1, 5]))


def test_linear_token_logprobs_is_logprobs_of_the_matmul():
    hidden, weight, bias = torch.randn(6, 4).double(), torch.randn(11, 4).double(), torch.randn(11).double()
    labels = torch.randint(0, 11, (6,))
    expected = reference.token_logprobs(hidden @ weight.T + bias, labels)
    torch.testing.assert_close(reference.linear_token_logprobs(hidden, weight, labels, bias=bias), expected)


def test_trajectories_are_segments_and_their_last_action_tokens():
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    cu_seqlens = torch.tensor([0, 5, 8, 8, 10], dtype=torch.int32)  # an empty sequence, then one with no action
    assert reference.segment_ids(mask.shape, cu_seqlens).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 3, 3]
    # Sequence 0 has a hole at position 2: one trajectory whose last action token is 4.
    assert reference.last_action_flags(mask, cu_seqlens).nonzero().flatten().tolist() == [4, 6]
    rows = mask[:8].reshape(2, 4)
    assert reference.last_action_flags(rows).nonzero().flatten().tolist() == [3, 6]


def test_multi_turn_rewards_and_gae_by_hand():
    # One trajectory of two turns, actions at 1..2 and 5..6, tool output at 3..4 (not actions), prompt at 0.
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    lp = torch.tensor([[0.0, -1.0, -2.0, 9.0, 9.0, -0.5, -1.5]], dtype=torch.float64)
    ref = torch.tensor([[0.0, -1.5, -1.0, 9.0, 9.0, -1.0, -1.0]], dtype=torch.float64)
    dpo = torch.tensor([[0.0, -0.5, -3.0, 1.0, 1.0, -0.5, -2.0]], dtype=torch.float64)
    score = torch.tensor([4.0], dtype=torch.float64)
    dppo = reference.token_rewards(lp, ref, mask, mode="dppo", dpo_logprobs=dpo, score=score, kl_coef=0.0,
                                   dpo_coef=0.5)
    # (dpo - ref) over the four action tokens: 1 - 2 + 0.5 - 1 = -1.5, all on the last action token, with the score.
    assert dppo.tolist() == [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5 * -1.5 + 4.0]]
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[0.0, 0.5, 0.25, 7.0, 7.0, 1.0, 0.75]], dtype=torch.float64)
    advantages, returns = reference.gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # Backwards over the action tokens 6, 5, 2, 1 (the holes' values 7.0 are never read):
    a6 = 2.0 - 0.75
    a5 = 0.0 + 0.5 * 0.75 - 1.0 + 0.25 * a6
    a2 = 1.0 + 0.5 * 1.0 - 0.25 + 0.25 * a5
    a1 = 0.0 + 0.5 * 0.25 - 0.5 + 0.25 * a2
    torch.testing.assert_close(advantages, torch.tensor([[0.0, a1, a2, 0.0, 0.0, a5, a6]], dtype=torch.float64))
    torch.testing.assert_close(returns, torch.where(mask, advantages + values, 0.0))


def test_token_rewards_by_hand():
    # One row, response at positions 1..3, policy / reference / DPO log-probs chosen by hand.
    lp = torch.tensor([[-9.0, -1.0, -2.0, -0.5, -7.0]], dtype=torch.float64)
    ref = torch.tensor([[-8.0, -1.5, -1.0, -0.5, -6.0]], dtype=torch.float64)
    dpo = torch.tensor([[-5.0, -0.5, -3.0, -0.25, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[False, True, True, True, False]])
    score = torch.tensor([2.0], dtype=torch.float64)
    kl = torch.tensor([0.5, -1.0, 0.0])  # lp - ref on the response
    dense = torch.tensor([1.0, -2.0, 0.25])  # dpo - ref on the response

    rto = reference.token_rewards(lp, ref, mask, mode="rto", dpo_logprobs=dpo, score=score, kl_coef=0.1,
                                  dpo_coef=0.5, score_coef=3.0)
    expected = torch.zeros(1, 5, dtype=torch.float64)
    expected[0, 1:4] = 0.5 * dense - 0.1 * kl
    expected[0, 3] += 3.0 * 2.0
    torch.testing.assert_close(rto, expected)

    clipped = reference.token_rewards(lp, ref, mask, mode="rto", dpo_logprobs=dpo, kl_coef=0.0, dpo_coef=0.5,
                                      dpo_clip=0.3)
    torch.testing.assert_close(clipped[0, 1:4], torch.tensor([0.3, -0.3, 0.125], dtype=torch.float64))

    ppo = reference.token_rewards(lp, ref, mask, mode="ppo", score=score, kl_coef=0.1)
    expected = torch.zeros(1, 5, dtype=torch.float64)
    expected[0, 1:4] = -0.1 * kl
    expected[0, 3] += 2.0
    torch.testing.assert_close(ppo, expected)

    dppo = reference.token_rewards(lp, ref, mask, mode="dppo", dpo_logprobs=dpo, kl_coef=0.1, dpo_coef=0.5)
    expected = torch.zeros(1, 5, dtype=torch.float64)
    expected[0, 1:4] = -0.1 * kl
    expected[0, 3] += 0.5 * dense.sum()
    torch.testing.assert_close(dppo, expected)


def test_kl_estimators_by_definition():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -0.5])
    d = lp - ref
    torch.testing.assert_close(reference.kl_penalty(lp, ref, "k1"), d)
    torch.testing.assert_close(reference.kl_penalty(lp, ref, "k2"), 0.5 * d * d)
    torch.testing.assert_close(reference.kl_penalty(lp, ref, "k3"), torch.exp(ref - lp) - 1 - (ref - lp))
    with pytest.raises(ValueError, match="kl_estimator"):
        reference.kl_penalty(lp, ref, "k4")


def test_gae_closed_form_for_gamma_lambda_one():
    # With gamma = lam = 1, A_h = (sum of the rewards of the trajectory's action tokens from h on) - V_h.
    rewards = torch.randn(2, 6, dtype=torch.float64)
    values = torch.randn(2, 6, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    advantages, returns = reference.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    expected = torch.zeros_like(rewards)
    for row in range(2):
        for h in range(6):
            if mask[row, h]:
                expected[row, h] = (rewards[row, h:] * mask[row, h:]).sum() - values[row, h]
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, torch.where(mask, expected + values, torch.zeros_like(values)))


def test_gae_lambda_zero_is_one_step_td():
    rewards, values = torch.randn(1, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    advantages, _ = reference.gae(rewards, values, mask, gamma=0.9, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(1, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(advantages, rewards + 0.9 * next_values - values)


def test_masked_whiten_uses_valid_tokens_only():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0], dtype=torch.float64)
    mask = torch.tensor([True, True, True, False])
    whitened = reference.masked_whiten(x, mask)
    torch.testing.assert_close(whitened, torch.tensor([-1.0, 0.0, 1.0, 0.0], dtype=torch.float64),
                               atol=1e-7, rtol=0)


def test_ppo_loss_by_hand():
    # Two tokens: ratio e^0.5 > 1.2 clipped with A = 1; ratio 1 with A = -2.
    logprobs = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    old = torch.zeros(1, 2, dtype=torch.float64)
    advantages = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    values = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    old_values = torch.tensor([[0.5, 0.1]], dtype=torch.float64)
    returns = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    loss, stats = reference.ppo_loss(logprobs, old, advantages, mask, values=values, old_values=old_values,
                                     returns=returns)
    pg = (max(-math.exp(0.5), -1.2) + 2.0) / 2  # token 1 clipped: max(-1.6487, -1.2) = -1.2
    vf_token0 = 0.5 * max(1.0**2, 0.7**2)  # V_clip = 0.5 + 0.2 = 0.7
    vf_token1 = 0.5 * max(1.0**2, 0.9**2)  # V_clip = 0.1 - 0.1 = 0.0 -> (0 - 1)^2, equal: not clipped
    assert stats["pg_loss"].item() == pytest.approx(pg)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * 0.25 / 2)
    assert stats["vf_loss"].item() == pytest.approx((vf_token0 + vf_token1) / 2)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.0)
    assert loss.item() == pytest.approx(pg + 0.1 * (vf_token0 + vf_token1) / 2)


def test_seq_mean_token_mean_weights_sequences_equally():
    per_token_source = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    zeros = torch.zeros_like(per_token_source)
    # pg per token = -A when ratio is 1.
    _, token_mean = reference.ppo_loss(zeros, zeros, -per_token_source, mask)
    _, seq_mean = reference.ppo_loss(zeros, zeros, -per_token_source, mask, agg="seq-mean-token-mean")
    assert token_mean["pg_loss"].item() == pytest.approx(9.0 / 5)
    assert seq_mean["pg_loss"].item() == pytest.approx((1.0 + 5.0) / 2)
