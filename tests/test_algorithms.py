"""The PPO math against plain loops and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from repo_exp.algorithms import (
    critic_loss,
    end_index,
    gae_advantages,
    masked_mean,
    policy_loss,
    ptx_loss,
    token_logprobs,
    token_streams,
)


def gae_loop(values, rewards, mask, gamma, lam):
    """Plain Python GAE over each row's masked-in positions only."""
    B, T = values.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        last = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            next_v = float(values[b, idx[j + 1]]) if j + 1 < len(idx) else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b][t] = last
            ret[b][t] = last + float(values[b, t])
    return torch.tensor(adv), torch.tensor(ret)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_gae_matches_plain_loop(gamma, lam, contiguous):
    g = torch.Generator().manual_seed(int(gamma * 100 + lam * 10 + contiguous))
    B, T = 6, 11
    values = torch.randn(B, T, generator=g)
    rewards = torch.randn(B, T, generator=g)
    if contiguous:  # response masks: 1 up to a random end
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None] < lengths[:, None]).long()
    else:  # arbitrary holes
        mask = (torch.rand(B, T, generator=g) > 0.35).long()
        mask[:, 0] = 1
    adv, ret = gae_advantages(values, rewards, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop(values, rewards, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-5, atol=1e-5)
    assert (adv[mask == 0] == 0).all()


def test_gae_hand_computed():
    # two steps, γ = 1, λ = 0.5: δ1 = 2 − 1 = 1 (last), δ0 = 0 + 1 − 0.5 = 0.5, A0 = 0.5 + 0.5·1 = 1.0
    values = torch.tensor([[0.5, 1.0]])
    rewards = torch.tensor([[0.0, 2.0]])
    adv, ret = gae_advantages(values, rewards, torch.ones(1, 2), gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.5, 2.0]]))


def test_policy_loss_clips_on_both_sides():
    # ratios e^0.5 ≈ 1.6487 (above 1.2) and e^-0.5 ≈ 0.6065 (below 0.8); advantages of both signs
    old = torch.zeros(1, 4)
    new = torch.tensor([[0.5, 0.5, -0.5, -0.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, stats = policy_loss(new, old, adv, torch.ones(1, 4), clip_range=0.2)
    r_hi, r_lo = math.exp(0.5), math.exp(-0.5)
    # per token: max(−A·r, −A·clip(r))
    expected = [max(-1 * r_hi, -1 * 1.2), max(1 * r_hi, 1 * 1.2), max(-1 * r_lo, -1 * 0.8), max(1 * r_lo, 1 * 0.8)]
    assert expected == [-1.2, r_hi, -r_lo, 0.8]
    assert loss.item() == pytest.approx(sum(expected) / 4, rel=1e-6)
    # clipped where the clipped term was the larger: tokens 0 and 3
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_policy_loss_aggregations():
    logp = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    seq, _ = policy_loss(logp, logp, adv, mask, aggregation="seq_mean_token_mean")
    tok, _ = policy_loss(logp, logp, adv, mask, aggregation="token_mean")
    assert seq.item() == pytest.approx(-((1 + 2 + 3) / 3 + 4) / 2)
    assert tok.item() == pytest.approx(-(1 + 2 + 3 + 4) / 4)


def test_critic_loss_hand_computed():
    values = torch.tensor([[1.0, 10.0, -10.0]])
    old = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    loss = critic_loss(values, old, returns, torch.ones(1, 3), clip_range_value=5.0, aggregation="token_mean")
    # token 0: (1−2)² = 1, clipped same; token 1: max(100, (5−0)²) = 100; token 2: max(100, 25) = 100
    assert loss.item() == pytest.approx(0.5 * (1 + 100 + 100) / 3)
    # the clipped term wins when it is further from the return
    loss2 = critic_loss(torch.tensor([[10.0]]), torch.tensor([[0.0]]), torch.tensor([[9.0]]), torch.ones(1, 1),
                        clip_range_value=5.0)
    assert loss2.item() == pytest.approx(0.5 * max(1.0, 16.0))


def test_kl_split_between_streams():
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    reward, cost, kl = token_streams(logp, ref, mask, torch.tensor([3.0]), torch.tensor([-2.0]), kl_coeff=0.1,
                                     kl_reward_weight=0.25, kl_cost_weight=0.75, clip_range_score=50.0)
    k = torch.tensor([[0.5, -1.0, 0.0, 0.0]])
    torch.testing.assert_close(kl, k)
    torch.testing.assert_close(reward, torch.tensor([[-0.1 * 0.25 * 0.5, 0.1 * 0.25, 3.0, 0.0]]))
    torch.testing.assert_close(cost, torch.tensor([[0.1 * 0.75 * 0.5, -0.1 * 0.75, -2.0, 0.0]]))
    # the split adds up to the whole penalty: r_t − c_t off the end token = −β·k_t
    torch.testing.assert_close((reward - cost)[:, :2], -0.1 * k[:, :2])


def test_end_scores_are_clipped():
    z = torch.zeros(1, 2)
    reward, cost, _ = token_streams(z, z, torch.ones(1, 2), torch.tensor([80.0]), torch.tensor([-90.0]), 0.1, 0.5,
                                    0.5, clip_range_score=50.0)
    assert reward[0, -1].item() == 50.0 and cost[0, -1].item() == -50.0


def test_end_index():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert end_index(mask).tolist() == [1, 3, 0]


def test_token_logprobs_and_ptx():
    logits = torch.randn(2, 3, 5)
    tokens = torch.randint(0, 5, (2, 3))
    ref = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, tokens), ref)
    labels = torch.randint(0, 5, (2, 4))
    logits4 = torch.randn(2, 4, 5)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    nll = -torch.log_softmax(logits4[:, :-1], -1).gather(-1, labels[:, 1:, None]).squeeze(-1)
    expected = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
    assert ptx_loss(logits4, labels, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_masked_mean_rejects_unknown_aggregation():
    with pytest.raises(ValueError, match="aggregation"):
        masked_mean(torch.ones(1, 1), torch.ones(1, 1), "per_token_sum")
