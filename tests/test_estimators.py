"""The update rules against the gradients of the objectives they state, with exact expectations.

One prompt, answers of one token each, a softmax policy over them with logits θ, and exact critics (each critic's
value is the expectation of its signal). The expected update is enumerated over every draw of the k samples and
compared with the gradient of the Lagrangian taken by autograd:

    rectified, per sample:  L = E[R] − λ·E[(C − d)⁺]
    rectified, per prompt:  L = E[R] − λ·E_{y_1..k}[(C̄_k − d)⁺]
    average:                L = E[R] − λ·(E[C] − d)

divided by 1 + λ where the mix normalises. The advantages go through the trainer's own code
(``repo_exp.train.compute_advantages``) and the policy loss (``repo_exp.algorithms.policy_loss``) at ratio 1.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from repo_exp.algorithms import group_advantages, kl_k3, leave_one_out_advantages, policy_loss
from repo_exp.config import EstimatorConfig, PPOConfig
from repo_exp.constraints import AverageConstraint, NoConstraint, RectifiedConstraint, ShapingConstraint
from repo_exp.rollout import Experience
from repo_exp.train import compute_advantages

D = torch.float64
# comply: helpful and unsafe; refuse: barely helpful and safe; help: a safe helpful answer
COMPLY, REFUSE, HELP = (1.0, 1.0), (0.1, -1.5), (0.6, -0.8)


def config(estimator: str = "gae", kl_coeff: float = 0.0, kl: str | None = None) -> SimpleNamespace:
    est = EstimatorConfig(name=estimator, kl=kl or ("loss" if estimator == "grpo" else "reward"))
    return SimpleNamespace(ppo=PPOConfig(kl_coeff=kl_coeff, gamma=1.0, gae_lambda=0.95), estimator=est)


def experience(rewards, costs, logprobs, groups=None, ref_logprobs=None, reward_values=None, cost_values=None):
    """A batch of B samples whose responses have T = logprobs.shape[1] tokens."""
    logprobs = logprobs if logprobs.dim() == 2 else logprobs.unsqueeze(-1)
    B, T = logprobs.shape
    return Experience(
        sequences=torch.zeros(B, T + 1, dtype=torch.long), attention_mask=torch.ones(B, T + 1, dtype=torch.long),
        response_mask=torch.ones(B, T, dtype=D), prompt_index=torch.zeros(B, dtype=torch.long) if groups is None
        else groups, logprobs=logprobs, ref_logprobs=logprobs.detach() if ref_logprobs is None else ref_logprobs,
        rewards=torch.as_tensor(rewards, dtype=D), costs=torch.as_tensor(costs, dtype=D),
        truncated=torch.zeros(B, dtype=torch.bool), reward_values=reward_values, cost_values=cost_values)


def advantages(constraint, cfg, answers, draw, logprobs, critics=None):
    """The trainer's mixed advantage (k,) for one draw of k answer indices."""
    rewards = [answers[i][0] for i in draw]
    costs = [answers[i][1] for i in draw]
    k = len(draw)
    values = {}
    if critics is not None:  # exact critics: constant over the draw
        values = {"reward_values": torch.full((k, 1), critics[0], dtype=D),
                  "cost_values": torch.full((k, 1), critics[1], dtype=D)}
    exp = experience(rewards, costs, logprobs[list(draw)], **values)
    exp.cost_active = constraint.cost_gate(exp.costs, exp.prompt_index)
    compute_advantages(exp, constraint, cfg)
    return exp.advantages[:, 0]


def expected_update(constraint, cfg, answers, theta, k, critic_signal=None):
    """E over the k-sample draws of the policy-loss gradient's negative, at ratio 1 (the ascent direction)."""
    logprobs = torch.log_softmax(theta, 0)
    probs = logprobs.exp().detach()
    draws = list(itertools.product(range(len(answers)), repeat=k))
    critics = None
    if cfg.estimator.name == "gae":  # exact critics: the expected reward and the expected cost signal of a sample
        v_r, v_c = 0.0, 0.0
        for draw in draws:
            p = torch.prod(probs[list(draw)])
            costs = torch.tensor([answers[i][1] for i in draw], dtype=D)
            signal = constraint.cost_signal(costs, torch.zeros(k, dtype=torch.long))
            v_r += p * sum(answers[i][0] for i in draw) / k
            v_c += p * signal.mean()
        critics = (float(v_r), float(v_c))
    total = torch.zeros((), dtype=D)
    for draw in draws:
        p = torch.prod(probs[list(draw)])
        adv = advantages(constraint, cfg, answers, draw, logprobs.detach(), critics)
        lp = logprobs[list(draw)].unsqueeze(-1)
        loss, _ = policy_loss(lp, lp.detach(), adv.unsqueeze(-1).detach(), torch.ones_like(lp), 0.2)
        total = total - p * loss
    (grad,) = torch.autograd.grad(total, theta)
    return grad


def lagrangian_gradient(answers, theta, lam, d, kind, k=1):
    probs = torch.softmax(theta, 0)
    if kind == "prompt":
        value = torch.zeros((), dtype=D)
        for draw in itertools.product(range(len(answers)), repeat=k):
            p = torch.prod(probs[list(draw)])
            mean_cost = sum(answers[i][1] for i in draw) / k
            value = value + p * (sum(answers[i][0] for i in draw) / k - lam * max(mean_cost - d, 0.0))
    else:
        r = torch.tensor([a[0] for a in answers], dtype=D)
        c = torch.tensor([a[1] for a in answers], dtype=D)
        penalty = (c - d).clamp(min=0.0) if kind == "sample" else c - d
        value = (probs * (r - lam * penalty)).sum()
    (grad,) = torch.autograd.grad(value, theta)
    return grad


def theta_for(p_first: float, n: int) -> torch.Tensor:
    """Logits whose softmax gives the first answer probability ``p_first`` and the rest equal shares."""
    rest = (1.0 - p_first) / (n - 1)
    return torch.log(torch.tensor([p_first] + [rest] * (n - 1), dtype=D)).requires_grad_(True)


P_COMPLY = [0.01, 0.1, 0.3, 0.5, 0.7, 0.82, 0.9, 0.93, 0.96, 0.99]


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("d", [-0.5, 0.0])
@pytest.mark.parametrize("lam", [0.5, 2.0, 5.0, 10.0])
def test_unbiased_rectified_gae_is_the_gradient_of_the_rectified_lagrangian(lam, d, normalize):
    c = RectifiedConstraint(threshold=d, lambda_init=lam, lambda_max=20.0, normalize=normalize)
    answers = [COMPLY, REFUSE]
    for p in P_COMPLY:
        theta = theta_for(p, 2)
        got = expected_update(c, config(), answers, theta, k=1)
        want = lagrangian_gradient(answers, theta, lam, d, "sample") / ((1.0 + lam) if normalize else 1.0)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("d", [-0.5, 0.0])
@pytest.mark.parametrize("lam", [0.5, 2.0, 5.0, 10.0])
@pytest.mark.parametrize("k", [2, 3])
def test_unbiased_rectified_per_prompt_is_the_gradient_of_the_k_sample_lagrangian(k, lam, d, normalize):
    c = RectifiedConstraint(threshold=d, lambda_init=lam, lambda_max=20.0, normalize=normalize, granularity="prompt")
    answers = [COMPLY, REFUSE, HELP]
    for p in (0.05, 0.4, 0.8, 0.97):
        theta = theta_for(p, 3)
        got = expected_update(c, config(), answers, theta, k=k)
        want = lagrangian_gradient(answers, theta, lam, d, "prompt", k) / ((1.0 + lam) if normalize else 1.0)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def comply_preference(grad: torch.Tensor) -> float:
    """Positive when the update raises the probability of complying (answer 0) against refusing (answer 1)."""
    return float(grad[0] - grad[1])


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("lam", [2.0, 5.0, 10.0])
def test_gated_form_favours_complying_past_a_pinned_probability(lam, normalize):
    """The gated form at sample granularity, with exact critics, prefers complying once P(comply) exceeds

        p* = 1 − 0.9 / (2.5 λ)                                   (unnormalised)
        p* = 1.3667-like root of (1 − p)(0.9 − 2.5λ)/(1 + λ) + 0.9 p = 0      (normalised)

    (0.93 at λ = 5 and 0.60 at λ = 2 normalised), while the true gradient prefers refusing for every λ > 0.9."""
    gated = RectifiedConstraint(threshold=0.0, lambda_init=lam, lambda_max=20.0, normalize=normalize, form="gated")
    unbiased = RectifiedConstraint(threshold=0.0, lambda_init=lam, lambda_max=20.0, normalize=normalize)
    answers = [COMPLY, REFUSE]
    a = 0.9 - 2.5 * lam  # coefficient of (1 − p) in the comply-minus-refuse advantage gap
    p_star = 1 - 0.9 / (2.5 * lam) if not normalize else (-a / (1 + lam)) / (0.9 - a / (1 + lam))
    for p in [x / 100 for x in range(1, 100)]:
        if abs(p - p_star) < 0.006:
            continue
        theta = theta_for(p, 2)
        assert (comply_preference(expected_update(gated, config(), answers, theta, k=1)) > 0) == (p > p_star), p
        assert comply_preference(expected_update(unbiased, config(), answers, theta, k=1)) < 0, p
    assert {(5.0, False): 0.928, (2.0, True): 0.603}.get((lam, normalize), p_star) == pytest.approx(p_star, abs=1e-3)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("lam", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("granularity", ["sample", "prompt"])
def test_rloo_rectified_is_the_gradient_of_the_lagrangian(granularity, k, lam, normalize):
    d = -0.5
    c = RectifiedConstraint(threshold=d, lambda_init=lam, lambda_max=20.0, normalize=normalize,
                            granularity=granularity)
    answers = [COMPLY, REFUSE, HELP]
    for p in (0.05, 0.5, 0.95):
        theta = theta_for(p, 3)
        got = expected_update(c, config("rloo"), answers, theta, k=k)
        want = lagrangian_gradient(answers, theta, lam, d, granularity, k) / ((1.0 + lam) if normalize else 1.0)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("lam", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("k", [2, 3])
def test_rloo_average_is_the_gradient_of_the_lagrangian(k, lam):
    c = AverageConstraint(threshold=0.0, lambda_init=lam)
    answers = [COMPLY, REFUSE, HELP]
    for p in (0.05, 0.5, 0.95):
        theta = theta_for(p, 3)
        got = expected_update(c, config("rloo"), answers, theta, k=k)
        want = lagrangian_gradient(answers, theta, lam, 0.0, "average") / (1.0 + lam)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def grpo_by_hand(scores: list[float], eps: float) -> list[float]:
    mean = sum(scores) / len(scores)
    std = (sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) ** 0.5
    return [(s - mean) / (std + eps) for s in scores]


def test_grpo_departs_from_the_gradient_by_its_std_scaling():
    """grpo's advantages are the group-normalised scores, (S − mean)/(std + ε) per signal, mixed as A_r − λ·A_c;
    its expected update is not the Lagrangian's gradient, nor a positive multiple of it."""
    lam, eps = 2.0, 1e-4
    c = RectifiedConstraint(threshold=0.0, lambda_init=lam, normalize=False)
    cfg = config("grpo")
    answers = [COMPLY, REFUSE, HELP]
    for draw in [(0, 1, 2), (0, 0, 1), (2, 1, 1)]:
        got = advantages(c, cfg, answers, draw, torch.zeros(3, dtype=D))
        r = grpo_by_hand([answers[i][0] for i in draw], eps)
        s = [max(answers[i][1], 0.0) for i in draw]
        cost = grpo_by_hand(s, eps) if len(set(s)) > 1 else [x / eps * 0 for x in s]
        torch.testing.assert_close(got, torch.tensor([a - lam * b for a, b in zip(r, cost)], dtype=D))
    theta = theta_for(0.5, 3)
    got = expected_update(c, cfg, answers, theta, k=3)
    want = lagrangian_gradient(answers, theta, lam, 0.0, "sample", 3)
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=0)
    assert (got - want).abs().max() > 1e-2
    assert abs(float(cosine) - 1.0) > 1e-3  # not even the same direction


def test_leave_one_out_by_hand():
    scores = torch.tensor([1.0, 3.0, 5.0, 2.0, 4.0], dtype=D)
    groups = torch.tensor([0, 0, 0, 1, 1])
    torch.testing.assert_close(leave_one_out_advantages(scores, groups),
                               torch.tensor([1 - 4, 3 - 3, 5 - 2, 2 - 4, 4 - 2], dtype=D))
    torch.testing.assert_close(group_advantages("grpo", scores[:3], groups[:3], eps=0.0),
                               torch.tensor([-1.0, 0.0, 1.0], dtype=D) * 2 / 2)


# ---------------------------------------------------------------------------------------------- one KL strength


def constraints_for_kl(lam: float):
    for normalize in (False, True):
        yield RectifiedConstraint(threshold=0.0, lambda_init=lam, lambda_max=20.0, normalize=normalize)
        yield RectifiedConstraint(threshold=-0.5, lambda_init=lam, lambda_max=20.0, normalize=normalize,
                                  form="gated")
        yield RectifiedConstraint(threshold=0.0, lambda_init=lam, lambda_max=20.0, normalize=normalize,
                                  granularity="prompt")
        yield ShapingConstraint(multiplier=lam, normalize=normalize)
    average = AverageConstraint(lambda_init=1.0)
    average.log_lambda = float(torch.log(torch.tensor(max(lam, 1e-12))))
    yield average
    yield NoConstraint()


@pytest.mark.parametrize("estimator", ["gae", "rloo"])
@pytest.mark.parametrize("lam", [0.0, 1.0, 5.0])
def test_every_sample_carries_the_configured_kl_coefficient(lam, estimator):
    """Zero rewards and costs, random log-ratios, zero critics: the advantage fed to the loss is the one a single
    stream −β·k_t gives, for every constraint, both normalisations and every λ."""
    beta = 0.05
    gen = torch.Generator().manual_seed(0)
    B, T = 6, 5
    logprobs = -torch.rand(B, T, generator=gen, dtype=D)
    ref = -torch.rand(B, T, generator=gen, dtype=D)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    cfg = config(estimator, kl_coeff=beta)
    # the reference: the KL alone in the reward signal, with the same estimator, and no cost
    ref_exp = experience([0.0] * B, [0.0] * B, logprobs, groups, ref, torch.zeros(B, T, dtype=D),
                         torch.zeros(B, T, dtype=D))
    none = NoConstraint()
    ref_exp.cost_active = none.cost_gate(ref_exp.costs, groups)
    compute_advantages(ref_exp, none, cfg)
    for c in constraints_for_kl(lam):
        if estimator == "gae" and isinstance(c, AverageConstraint) and lam == 0.0:
            continue  # log-space λ is never 0
        exp = experience([0.0] * B, [0.0] * B, logprobs, groups, ref, torch.zeros(B, T, dtype=D),
                         torch.zeros(B, T, dtype=D))
        exp.cost_active = c.cost_gate(exp.costs, groups)
        compute_advantages(exp, c, cfg)
        torch.testing.assert_close(exp.advantages, ref_exp.advantages, atol=1e-12, rtol=1e-9,
                                   msg=lambda m: f"{type(c).__name__} normalize={c.normalize}: {m}")
    assert ref_exp.advantages.abs().max() > 0.01  # the KL is really there


def test_grpo_kl_is_a_loss_term_with_beta_for_every_sample_under_every_constraint():
    """grpo: zero scores give zero advantages under every constraint and λ; the actor's loss is then β times the KL
    term alone, the same loss and gradient for every constraint, both normalisations and every λ."""
    from repo_exp.train import actor_objective

    beta = 0.1
    gen = torch.Generator().manual_seed(1)
    base = -torch.rand(6, 3, generator=gen, dtype=D)
    ref = -torch.rand(6, 3, generator=gen, dtype=D)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    cfg = config("grpo", kl_coeff=beta)
    results = []
    for lam in (0.0, 1.0, 5.0):
        for c in constraints_for_kl(lam):
            logprobs = base.clone().requires_grad_(True)
            exp = experience([0.0] * 6, [0.0] * 6, logprobs.detach(), groups, ref)
            exp.cost_active = c.cost_gate(exp.costs, groups)
            compute_advantages(exp, c, cfg)
            assert torch.count_nonzero(exp.advantages) == 0
            loss, stats = actor_objective(logprobs, exp, cfg)
            (grad,) = torch.autograd.grad(loss, logprobs)
            results.append((loss.detach(), grad, stats["kl"]))
    first_loss, first_grad, kl = results[0]
    torch.testing.assert_close(first_loss, beta * kl)  # nothing but the KL term
    assert first_grad.abs().max() > 1e-3
    for loss, grad, _ in results[1:]:
        torch.testing.assert_close(loss, first_loss, atol=1e-12, rtol=0)
        torch.testing.assert_close(grad, first_grad, atol=1e-12, rtol=0)


ANSWER_LOGITS = torch.tensor([0.3, -0.2, 1.0, 0.1], dtype=D)
REFERENCE_LOGITS = torch.tensor([-0.5, 0.4, 0.2, 0.0], dtype=D)


@pytest.mark.parametrize("on_policy", [True, False])
def test_grpo_kl_term_has_the_expected_gradient_of_kl_policy_to_reference(on_policy):
    """One prompt, four one-token answers, a softmax policy. The KL term's gradient, in expectation over answers
    drawn from the sampling policy π_old, equals ∇KL(π ‖ π_ref) taken by autograd: at π_old = π (the first
    minibatch) and after π has moved away from π_old (importance weights)."""
    from repo_exp.algorithms import kl_penalty

    theta = ANSWER_LOGITS.clone().requires_grad_(True)
    logp, ref = torch.log_softmax(theta, 0), torch.log_softmax(REFERENCE_LOGITS, 0)
    old = logp.detach() if on_policy else torch.log_softmax(ANSWER_LOGITS + torch.tensor([0.5, -0.3, 0.0, 0.2],
                                                                                         dtype=D), 0)
    expected = (old.exp() * kl_penalty(logp, old, ref)).sum()
    (grad,) = torch.autograd.grad(expected, theta)
    theta2 = ANSWER_LOGITS.clone().requires_grad_(True)
    p = torch.softmax(theta2, 0)
    (true,) = torch.autograd.grad((p * (torch.log(p) - ref)).sum(), theta2)
    torch.testing.assert_close(grad, true, atol=1e-12, rtol=1e-9)
    if on_policy:  # the term's value is the KL's importance-weighted k1 estimate: exact in expectation
        torch.testing.assert_close(expected.detach(), (logp.exp() * (logp - ref)).sum().detach())


def test_the_k3_loss_of_the_grpo_paper_follows_the_reverse_kl():
    """Why the KL term is not k3: as a loss, k3's expected gradient is ∇KL(π_ref ‖ π), which differs here from
    ∇KL(π ‖ π_ref) by up to 0.061 per logit; its value stays an unbiased, non-negative estimate of KL(π ‖ π_ref)."""
    theta = ANSWER_LOGITS.clone().requires_grad_(True)
    logp, ref = torch.log_softmax(theta, 0), torch.log_softmax(REFERENCE_LOGITS, 0)
    probs = logp.exp().detach()
    (k3_grad,) = torch.autograd.grad((probs * kl_k3(logp, ref)).sum(), theta)
    theta2 = ANSWER_LOGITS.clone().requires_grad_(True)
    logp2 = torch.log_softmax(theta2, 0)
    (reverse,) = torch.autograd.grad((ref.exp() * (ref - logp2)).sum(), theta2)
    torch.testing.assert_close(k3_grad, reverse, atol=1e-12, rtol=1e-9)
    theta3 = ANSWER_LOGITS.clone().requires_grad_(True)
    p3 = torch.softmax(theta3, 0)
    (forward,) = torch.autograd.grad((p3 * (torch.log(p3) - ref)).sum(), theta3)
    assert (k3_grad - forward).abs().max() > 0.05
    torch.testing.assert_close((probs * kl_k3(logp, ref)).sum().detach(), (probs * (logp.detach() - ref)).sum())
    assert (kl_k3(logp, ref) >= 0).all() and kl_k3(ref, ref).abs().max() == 0


# ------------------------------------------------------------------------------------------- critic-free runs


def test_a_critic_free_run_builds_steps_and_saves_no_critic(smoke_cfg, tmp_path):
    from reliability_support import make_trainer

    def trainable(trainer) -> int:
        return sum(p.numel() for e in trainer.models.engines for p in e.module.parameters() if p.requires_grad)

    gae = make_trainer(smoke_cfg, tmp_path / "gae", "constraint=rectified", "trainer.total_steps=1",
                       "eval.at_start=false", "eval.at_end=false")
    free = make_trainer(smoke_cfg, tmp_path / "rloo", "constraint=rectified", "estimator=rloo",
                        "trainer.total_steps=1", "eval.at_start=false", "eval.at_end=false")
    policy = sum(p.numel() for p in free.models.policy.module.parameters())
    assert free.models.critics.engines == [] and free.models.critics.names == []
    assert trainable(free) == policy
    assert trainable(gae) > 2 * policy * 0.9  # the gae run trains two critics beside the policy
    metrics = free.train_step(0)
    assert not any(k.startswith(("loss/reward_critic", "loss/cost_critic", "values/", "returns/")) for k in metrics)
    assert "grad_norm/actor" in metrics and "advantages/cost" in metrics
    folder = free.save(1)
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if "critic" in n], names
    assert "policy" in names and "actor.optim.pt" in names
