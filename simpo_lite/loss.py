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
label smoothing (sigmoid only; hinge ignores it), and ``sft_weight`` times the NLL per token of the chosen
responses, every token weighing the same as in the official trainer (``sft_weight = 0`` is pure SimPO;
TRL's default ``cpo_alpha=1`` is this term, i.e. CPO-SimPO). Our ``sft_tokens: differing`` takes that
NLL only over the chosen tokens after the prefix the chosen answer shares with the rejected one.
Training and evaluation both compose the loss through ``objective_sums`` and ``objective_from_sums``.

``anchor_weight`` is our addition, not the paper's (SimPO has no reference model at all): ``anchor_weight``
times KL(p_base || p_policy) per token over the response tokens that the chosen and the rejected answer
share from their start, with the base = the model without its LoRA adapters. It is the KL-to-reference
regulariser of RLHF with PPO (a per-token KL penalty to the initial policy, Ziegler et al. 2019,
Ouyang et al. 2022) and the reference anchoring of DPO-style objectives, applied only where the
preference says nothing. simpo_lite.anchor computes the KL sums; here they are only weighed in.
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


# The metrics every training step and evaluation reports, in the order tables show them (eval adds
# an ``eval_`` prefix); ``sft_loss`` joins them when the SFT term is on.
METRIC_NAMES = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected")


def sft_nll(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Mean NLL per token of the chosen responses.

    With ``chosen_lengths`` (labelled tokens per response) every token weighs the same, as in the
    official trainer's and TRL's cross-entropy over the batch; without it every response weighs the
    same (``-chosen_logps.mean()``). The two agree when the responses are equally long.
    """
    nll, tokens = _nll_terms(chosen_logps, chosen_lengths)
    return nll / tokens


def _nll_terms(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL over the chosen tokens, token count), from average log-probs and lengths."""
    lengths = (torch.ones_like(chosen_logps) if chosen_lengths is None
               else chosen_lengths.to(device=chosen_logps.device, dtype=chosen_logps.dtype))
    return -(chosen_logps * lengths).sum(), lengths.sum()


def objective_sums(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, cfg,
                   chosen_lengths: torch.Tensor | None = None,
                   anchor: tuple[torch.Tensor, torch.Tensor] | None = None,
                   sft_excluded: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Sums over the pairs of a batch from which the loss and every metric are means.

    Training takes the means of one micro-batch; evaluation adds the sums of all its batches (and
    processes) first, so both compute one objective the same way. "simpo", "nll" and "anchor_kl" keep
    their gradient; the others are detached. ``anchor``: (KL summed over the shared response tokens,
    their count), as simpo_lite.anchor gives them; only when ``anchor_weight`` > 0. ``sft_excluded``:
    (log-probs summed over chosen tokens the SFT term leaves out, their count), with ``sft_tokens:
    differing`` the tokens the chosen answer shares with the rejected one.
    """
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        chosen_logps, rejected_logps, cfg.beta, cfg.gamma_beta_ratio, cfg.loss_type, cfg.label_smoothing)
    nll, tokens = _nll_terms(chosen_logps, chosen_lengths)
    if sft_excluded is not None:
        excluded_logps, excluded_tokens = sft_excluded
        nll, tokens = nll + excluded_logps, tokens - excluded_tokens.to(tokens.dtype)
    sums = {"simpo": losses.sum(), "nll": nll, "tokens": tokens.detach(),
            "pairs": torch.tensor(float(len(losses)), device=losses.device),
            **preference_sums(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards)}
    if cfg.anchor_weight > 0:
        kl_sum, kl_tokens = anchor if anchor is not None else (losses.new_zeros(()), losses.new_zeros(()))
        sums.update(anchor_kl=kl_sum, anchor_tokens=kl_tokens.detach())
    return sums


def objective_from_sums(sums: dict[str, torch.Tensor], cfg) -> tuple[torch.Tensor, dict[str, float]]:
    """loss = mean SimPO loss per pair + cfg.sft_weight * NLL per chosen token
    + cfg.anchor_weight * KL per shared token, and the metrics.

    A term whose weight is 0 is left out, and so is its metric.
    """
    pairs = sums["pairs"]
    loss = sums["simpo"] / pairs
    metrics = {name: (sums[name] / pairs).item() for name in METRIC_NAMES[1:]}
    if cfg.sft_weight > 0:
        # A batch whose chosen answers are all shared prefix (sft_tokens: differing) has no SFT token.
        nll = sums["nll"] / sums["tokens"].clamp(min=1)
        loss = loss + cfg.sft_weight * nll
        metrics["sft_loss"] = nll.item()
    if cfg.anchor_weight > 0:
        # A batch without any shared token has a sum of 0 over 0 tokens: the term is 0, not NaN.
        kl = sums["anchor_kl"] / sums["anchor_tokens"].clamp(min=1)
        loss = loss + cfg.anchor_weight * kl
        metrics["anchor_kl"] = kl.item()
    return loss, {"loss": loss.item(), **metrics}


def simpo_objective(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, cfg,
                    chosen_lengths: torch.Tensor | None = None,
                    anchor: tuple[torch.Tensor, torch.Tensor] | None = None,
                    sft_excluded: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The scalar loss of a batch and its metrics, from a ``SimpoConfig``-like ``cfg``.

    ``chosen_lengths`` (labelled tokens per chosen response) weigh the SFT term per token, as the
    official trainer does; training and evaluation always pass them. ``anchor``, ``sft_excluded``: see
    ``objective_sums``.
    """
    return objective_from_sums(objective_sums(chosen_logps, rejected_logps, cfg, chosen_lengths, anchor,
                                              sft_excluded), cfg)


def preference_sums(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-batch sums of the preference metrics (names as the official trainer and TRL log them)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": chosen_logps.detach().sum(),
        "logps/rejected": rejected_logps.detach().sum(),
    }


def preference_metrics(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                       chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Batch means of ``preference_sums`` (add an ``eval_`` prefix for eval)."""
    sums = preference_sums(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards)
    return {name: (value / len(chosen_logps)).item() for name, value in sums.items()}
