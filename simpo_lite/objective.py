"""The model-facing side of SimPO: one concatenated forward to per-pair losses and metrics."""

from __future__ import annotations

import torch
from torch import nn

from simpo_lite.config import SimpoConfig
from simpo_lite.logprobs import concatenated_logps
from simpo_lite.loss import simpo_loss, simpo_objective
from simpo_lite.packed import check_packable, packed_logps


class ConcatenatedPolicy(nn.Module):
    """Wraps the model so the whole log-prob computation is one module forward.

    DistributedDataParallel only synchronises gradients of work done inside its wrapped module's
    forward, and the chunked log-probs call the decoder and the output head separately.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int, pack_prompt: bool = False):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.pack_prompt = pack_prompt
        if pack_prompt:
            check_packable(model)  # before the first step, not in the middle of a run

    def forward(self, **batch):
        """(chosen, rejected) average log-probs of an unpacked or, with pack_prompt, a packed batch."""
        if self.pack_prompt:
            return packed_logps(self.model, batch, chunk_tokens=self.chunk_tokens)
        return concatenated_logps(self.model, batch, chunk_tokens=self.chunk_tokens)


def pair_losses(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, simpo_cfg: SimpoConfig):
    """Per-pair SimPO losses (plus the optional NLL term on the chosen response) and rewards."""
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        chosen_logps, rejected_logps, simpo_cfg.beta, simpo_cfg.gamma_beta_ratio,
        loss_type=simpo_cfg.loss_type, label_smoothing=simpo_cfg.label_smoothing)
    if simpo_cfg.sft_weight > 0:
        # chosen_logps are length-averaged, so -chosen_logps is the chosen response's mean NLL per token.
        losses = losses - simpo_cfg.sft_weight * chosen_logps
    return losses, chosen_rewards, rejected_rewards


def batch_metrics(policy, batch: dict, simpo_cfg: SimpoConfig):
    """(mean loss to backpropagate, metrics dict of floats) for one micro-batch."""
    chosen, rejected = policy(**batch)
    return simpo_objective(chosen, rejected, simpo_cfg)
