"""The SimPO loss.

Reference: Meng, Xia and Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
NeurIPS 2024, https://arxiv.org/abs/2405.14734 (official code: https://github.com/princeton-nlp/SimPO).

The reward is the length-normalised log-likelihood of a response, with no reference model:

    r(x, y) = beta / |y| * sum_t log pi(y_t | x, y_<t)        (|y| = response tokens with a label)
    L       = -log sigmoid(r(x, y_w) - r(x, y_l) - gamma)      (eq. 6 of the paper)

``gamma`` is given as ``gamma_beta_ratio = gamma / beta`` as in the official trainer, so the loss is
``-log sigmoid(beta * (avg_logp_w - avg_logp_l - gamma_beta_ratio))``; TRL's CPOTrainer
(loss_type="simpo", cpo_alpha=0) writes the same thing with an absolute ``simpo_gamma = gamma``.
Variants of the official trainer kept here: the hinge loss ``relu(1 - beta * logits)``, conservative
label smoothing (sigmoid only; hinge ignores it), and ``sft_weight`` times the NLL of the chosen
response (``sft_weight = 0`` is pure SimPO; TRL's default ``cpo_alpha=1`` is this term, i.e. CPO-SimPO).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge")


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float,
               gamma_beta_ratio: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B], chosen rewards [B], rejected rewards [B] from average response log-probs.

    Rewards are ``beta * avg logp``, detached: they are for logging only.
    """
    logits = (chosen_logps - rejected_logps) - gamma_beta_ratio
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
                  - label_smoothing * F.logsigmoid(-beta * logits))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


def sft_nll(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Mean NLL per token of the chosen responses.

    With ``chosen_lengths`` (labelled tokens per response) every token weighs the same, as in the
    official trainer's and TRL's cross-entropy over the batch; without it every response weighs the
    same (``-chosen_logps.mean()``). The two agree when the responses are equally long.
    """
    if chosen_lengths is None:
        return -chosen_logps.mean()
    lengths = chosen_lengths.to(chosen_logps.dtype)
    return -(chosen_logps * lengths).sum() / lengths.sum()


def simpo_objective(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, cfg,
                    chosen_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The scalar training loss of a batch and its metrics, from a ``SimpoConfig``-like ``cfg``.

    loss = mean(simpo_loss) + cfg.sft_weight * sft_nll(chosen); the SFT term is skipped (and its
    metric absent) when ``sft_weight`` is 0.
    """
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        chosen_logps, rejected_logps, cfg.beta, cfg.gamma_beta_ratio, cfg.loss_type, cfg.label_smoothing)
    loss = losses.mean()
    metrics = preference_metrics(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards)
    if cfg.sft_weight > 0:
        nll = sft_nll(chosen_logps, chosen_lengths)
        loss = loss + cfg.sft_weight * nll
        metrics["sft_loss"] = nll.item()
    return loss, metrics


def preference_metrics(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                       chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Batch means under the names the official trainer and TRL log (add an ``eval_`` prefix for eval)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": chosen_logps.detach().mean().item(),
        "logps/rejected": rejected_logps.detach().mean().item(),
    }
