"""The SimPO loss against values worked out by hand.

Shared example: beta = 2, gamma_beta_ratio = 0.25 (gamma = 0.5),
  chosen avg logps   = [-1.0, -2.0]
  rejected avg logps = [-1.5, -1.0]
  logits = (chosen - rejected) - 0.25 = [0.25, -1.25];  beta * logits = [0.5, -2.5]
"""

import math

import pytest
import torch

from simpo_lite.config import SimpoConfig
from simpo_lite.loss import preference_metrics, sft_nll, simpo_loss, simpo_objective

BETA, RATIO = 2.0, 0.25
CHOSEN = [-1.0, -2.0]
REJECTED = [-1.5, -1.0]

# -log sigmoid(x) = log(1 + e^-x)
#   x = 0.5 : log(1 + 0.6065307) = log(1.6065307)  = 0.4740770
#   x = -2.5: log(1 + 12.1824940) = log(13.182494) = 2.5788897
SIGMOID_LOSSES = [0.4740770, 2.5788897]


def pair(requires_grad=False):
    c = torch.tensor(CHOSEN, requires_grad=requires_grad)
    r = torch.tensor(REJECTED, requires_grad=requires_grad)
    return c, r


def approx(values, expected, tol=1e-6):
    assert values.tolist() == pytest.approx(expected, abs=tol)


def test_sigmoid_by_hand():
    losses, chosen_rewards, rejected_rewards = simpo_loss(*pair(), BETA, RATIO)
    approx(losses, SIGMOID_LOSSES)
    approx(chosen_rewards, [-2.0, -4.0])    # beta * chosen
    approx(rejected_rewards, [-3.0, -2.0])  # beta * rejected


def test_sigmoid_gradient_by_hand():
    # d/d chosen of -log sigmoid(beta * l) = -beta * sigmoid(-beta * l); rejected gets the opposite sign.
    #   pair 0: -2 * sigmoid(-0.5) = -2 * 0.3775407 = -0.7550813
    #   pair 1: -2 * sigmoid(2.5)  = -2 * 0.9241418 = -1.8482836
    c, r = pair(requires_grad=True)
    losses, chosen_rewards, rejected_rewards = simpo_loss(c, r, BETA, RATIO)
    losses.sum().backward()
    approx(c.grad, [-0.7550813, -1.8482836])
    approx(r.grad, [0.7550813, 1.8482836])
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_hinge_by_hand():
    # relu(1 - beta * logits): relu(1 - 0.5) = 0.5, relu(1 + 2.5) = 3.5; gradient -beta where active.
    c, r = pair(requires_grad=True)
    losses, _, _ = simpo_loss(c, r, BETA, RATIO, loss_type="hinge")
    approx(losses, [0.5, 3.5])
    losses.sum().backward()
    approx(c.grad, [-2.0, -2.0])
    # A pair past the margin (beta * logits = 2 * (0.0 - (-1.0) - 0.25) = 1.5 > 1) costs nothing.
    far, _, _ = simpo_loss(torch.tensor([0.0]), torch.tensor([-1.0]), BETA, RATIO, loss_type="hinge")
    approx(far, [0.0])


def test_hinge_ignores_label_smoothing():
    plain, _, _ = simpo_loss(*pair(), BETA, RATIO, loss_type="hinge")
    smoothed, _, _ = simpo_loss(*pair(), BETA, RATIO, loss_type="hinge", label_smoothing=0.3)
    assert torch.equal(plain, smoothed)


def test_label_smoothing_by_hand():
    # -(1 - ls) log sigmoid(x) - ls log sigmoid(-x), ls = 0.1; -log sigmoid(-x) = x + (-log sigmoid(x)).
    #   x = 0.5 : 0.9 * 0.4740770 + 0.1 * (0.5 + 0.4740770)  = 0.4266693 + 0.0974077 = 0.5240770
    #   x = -2.5: 0.9 * 2.5788897 + 0.1 * (-2.5 + 2.5788897) = 2.3210007 + 0.0078890 = 2.3288897
    losses, _, _ = simpo_loss(*pair(), BETA, RATIO, label_smoothing=0.1)
    approx(losses, [0.5240770, 2.3288897])


def test_gamma_beta_ratio_equals_trl_absolute_gamma():
    """TRL: simpo_gamma = gamma_beta_ratio * beta; logits = (c - r) - simpo_gamma / beta."""
    g = torch.Generator().manual_seed(0)
    chosen, rejected = -3 * torch.rand(64, generator=g), -3 * torch.rand(64, generator=g)
    for beta, ratio in [(2.0, 0.5), (10.0, 0.3), (2.5, 0.55), (0.7, 0.0)]:
        simpo_gamma = ratio * beta
        trl_logits = (chosen - rejected) - simpo_gamma / beta
        trl_losses = -torch.nn.functional.logsigmoid(beta * trl_logits)
        losses, _, _ = simpo_loss(chosen, rejected, beta, ratio)
        torch.testing.assert_close(losses, trl_losses, atol=1e-6, rtol=0)
        # ... and it is not the same as mistaking the ratio for the absolute gamma (unless it is 0).
        if ratio:
            wrong = -torch.nn.functional.logsigmoid(beta * ((chosen - rejected) - ratio / beta))
            assert (losses - wrong).abs().max() > 1e-3


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type 'ipo'"):
        simpo_loss(*pair(), BETA, RATIO, loss_type="ipo")


def test_metrics_by_hand():
    c, r = pair()
    _, chosen_rewards, rejected_rewards = simpo_loss(c, r, BETA, RATIO)
    metrics = preference_metrics(c, r, chosen_rewards, rejected_rewards)
    assert metrics == pytest.approx({
        "rewards/chosen": -3.0,        # mean(-2, -4)
        "rewards/rejected": -2.5,      # mean(-3, -2)
        "rewards/accuracies": 0.5,     # -2 > -3 yes, -4 > -2 no
        "rewards/margins": -0.5,       # mean(1, -2)
        "logps/chosen": -1.5,
        "logps/rejected": -1.25,
    })
    assert all(type(v) is float for v in metrics.values())
    tie = torch.tensor([-1.0])
    assert preference_metrics(tie, tie, tie, tie)["rewards/accuracies"] == 0.0  # strictly greater, as TRL


def test_sft_nll_by_hand():
    c, _ = pair()
    approx(sft_nll(c).reshape(1), [1.5])  # every response weighs the same: -mean(-1, -2)
    # Every token weighs the same, lengths 3 and 1: -(3 * -1 + 1 * -2) / 4 = 1.25
    approx(sft_nll(c, torch.tensor([3, 1])).reshape(1), [1.25])


def test_objective_pure_simpo_and_with_sft_term():
    mean_simpo = sum(SIGMOID_LOSSES) / 2  # 1.5264834
    c, r = pair(requires_grad=True)
    loss, metrics = simpo_objective(c, r, SimpoConfig(beta=BETA, gamma_beta_ratio=RATIO))
    assert loss.item() == pytest.approx(mean_simpo, abs=1e-6)
    assert "sft_loss" not in metrics and metrics["rewards/margins"] == pytest.approx(-0.5)

    cfg = SimpoConfig(beta=BETA, gamma_beta_ratio=RATIO, sft_weight=0.5)
    loss, metrics = simpo_objective(c, r, cfg)
    assert loss.item() == pytest.approx(mean_simpo + 0.5 * 1.5, abs=1e-6)  # 2.2764834
    assert metrics["sft_loss"] == pytest.approx(1.5)
    loss, _ = simpo_objective(c, r, cfg, chosen_lengths=torch.tensor([3, 1]))
    assert loss.item() == pytest.approx(mean_simpo + 0.5 * 1.25, abs=1e-6)  # 2.1514834
    # d loss / d chosen_i = (SimPO grad_i) / 2 pairs - 0.5 * len_i / 4 tokens:
    #   pair 0: -0.7550813 / 2 - 0.5 * 3 / 4 = -0.3775407 - 0.375 = -0.7525407
    #   pair 1: -1.8482836 / 2 - 0.5 * 1 / 4 = -0.9241418 - 0.125 = -1.0491418
    # The SFT term pulls only on the chosen side: rejected keeps the pure SimPO gradient / 2.
    loss.backward()
    approx(c.grad, [-0.7525407, -1.0491418])
    approx(r.grad, [0.3775407, 0.9241418])


def test_objective_passes_loss_type_and_smoothing():
    cfg = SimpoConfig(beta=BETA, gamma_beta_ratio=RATIO, loss_type="sigmoid", label_smoothing=0.1)
    loss, _ = simpo_objective(*pair(), cfg)
    assert loss.item() == pytest.approx((0.5240770 + 2.3288897) / 2, abs=1e-6)
    loss, _ = simpo_objective(*pair(), SimpoConfig(beta=BETA, gamma_beta_ratio=RATIO, loss_type="hinge"))
    assert loss.item() == pytest.approx((0.5 + 3.5) / 2, abs=1e-6)


def test_inputs_untouched_and_float_arithmetic_matches_math():
    c, r = pair()
    before = (c.clone(), r.clone())
    losses, _, _ = simpo_loss(c, r, BETA, RATIO)
    assert torch.equal(c, before[0]) and torch.equal(r, before[1])
    assert losses[0].item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)


def test_anchor_term_by_hand():
    """anchor_weight * KL per shared token: a KL sum of 0.6 over 3 tokens is 0.2 per token."""
    mean_simpo = sum(SIGMOID_LOSSES) / 2  # 1.5264834
    c, r = pair()
    kl_sum = torch.tensor(0.6, requires_grad=True)
    cfg = SimpoConfig(beta=BETA, gamma_beta_ratio=RATIO, anchor_weight=0.5)
    loss, metrics = simpo_objective(c, r, cfg, anchor=(kl_sum, torch.tensor(3.0)))
    assert loss.item() == pytest.approx(mean_simpo + 0.5 * 0.2, abs=1e-6)  # 1.6264834
    assert metrics["anchor_kl"] == pytest.approx(0.2)
    loss.backward()
    assert kl_sum.grad.item() == pytest.approx(0.5 / 3)  # weight / tokens
    # No shared token in the batch: 0 / 0 tokens is a term of 0, not NaN.
    loss, metrics = simpo_objective(c, r, cfg, anchor=(torch.tensor(0.0), torch.tensor(0.0)))
    assert loss.item() == pytest.approx(mean_simpo, abs=1e-6) and metrics["anchor_kl"] == 0.0
    # Weight 0 (the default): the term and its metric are absent, whatever KL is passed.
    loss, metrics = simpo_objective(c, r, SimpoConfig(beta=BETA, gamma_beta_ratio=RATIO),
                                    anchor=(torch.tensor(5.0), torch.tensor(1.0)))
    assert loss.item() == pytest.approx(mean_simpo, abs=1e-6) and "anchor_kl" not in metrics


def test_sft_term_without_the_shared_tokens_by_hand():
    """sft_tokens: differing. Chosen averages -1 over 3 tokens and -2 over 1: NLL 3 + 2 = 5 over 4 tokens.
    Two of pair 0's tokens are shared with the rejected answer, log-probs summing to -1.5: the SFT term
    is the rest, (5 - 1.5) / (4 - 2) = 1.75 per token."""
    mean_simpo = sum(SIGMOID_LOSSES) / 2  # 1.5264834
    c, r = pair(requires_grad=True)
    shared_sum = torch.tensor(-1.5, requires_grad=True)
    cfg = SimpoConfig(beta=BETA, gamma_beta_ratio=RATIO, sft_weight=0.5, sft_tokens="differing")
    loss, metrics = simpo_objective(c, r, cfg, torch.tensor([3, 1]), sft_excluded=(shared_sum, torch.tensor(2.0)))
    assert metrics["sft_loss"] == pytest.approx(1.75)
    assert loss.item() == pytest.approx(mean_simpo + 0.5 * 1.75, abs=1e-6)  # 2.4014834
    loss.backward()
    # A shared token's log-prob reaches the loss twice: through pair 0's average (SFT part
    # -0.5 * 3 / 2 tokens on c0, i.e. -0.5 / 2 per token) and through the excluded sum (+0.5 / 2):
    # the SFT term leaves it alone.
    assert shared_sum.grad.item() == pytest.approx(0.25)
    approx(c.grad, [-0.3775407 - 0.5 * 3 / 2, -0.9241418 - 0.5 * 1 / 2])
    # Every chosen token shared (a batch of answers that differ only after their end): no SFT token, no NaN.
    loss, metrics = simpo_objective(c, r, cfg, torch.tensor([3, 1]), sft_excluded=(torch.tensor(-5.0), torch.tensor(4.0)))
    assert metrics["sft_loss"] == 0.0 and loss.item() == pytest.approx(mean_simpo, abs=1e-6)
