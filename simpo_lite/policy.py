"""The model side of SimPO: one concatenated forward to the objective, for a training step or a whole eval set."""

from __future__ import annotations

import torch
from torch import nn

from simpo_lite.anchor import check_anchorable, shared_prefix_logps
from simpo_lite.logprobs import IGNORE_INDEX, concatenated_logps
from simpo_lite.loss import objective_from_sums, objective_sums, simpo_objective
from simpo_lite.packed import check_packable, packed_logps, pair_lengths


class ConcatenatedPolicy(nn.Module):
    """Wraps the model so the whole log-prob computation is one module forward.

    DistributedDataParallel only synchronises gradients of work done inside its wrapped module's
    forward, and the chunked log-probs call the decoder and the output head separately (and, with
    anchor, the base pass with the adapters off).
    """

    def __init__(self, model: nn.Module, chunk_tokens: int, pack_prompt: bool = False, anchor: bool = False,
                 sft_differing: bool = False):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.pack_prompt = pack_prompt
        self.anchor = anchor
        self.sft_differing = sft_differing
        # Both before the first step, not in the middle of a run (config refuses either with pack_prompt).
        if pack_prompt:
            check_packable(model)
        if anchor:
            check_anchorable(model)

    @classmethod
    def from_config(cls, model: nn.Module, simpo_cfg) -> "ConcatenatedPolicy":
        """The policy a run's ``simpo`` section asks for: training and ``simpo-lite eval`` build it here."""
        return cls(model, simpo_cfg.logp_chunk_tokens, simpo_cfg.pack_prompt, anchor=simpo_cfg.anchor_weight > 0,
                   sft_differing=simpo_cfg.sft_weight > 0 and simpo_cfg.sft_tokens == "differing")

    def forward(self, **batch) -> dict:
        """{"chosen", "rejected"}: average log-probs of an unpacked or, with pack_prompt, a packed batch;
        with anchor also "anchor" and with sft_differing "sft_excluded" (simpo_lite.anchor)."""
        if self.anchor or self.sft_differing:
            return shared_prefix_logps(self.model, batch, self.chunk_tokens, kl=self.anchor,
                                       shared_sums=self.sft_differing)
        if self.pack_prompt:
            chosen, rejected = packed_logps(self.model, batch, chunk_tokens=self.chunk_tokens)
        else:
            chosen, rejected = concatenated_logps(self.model, batch, chunk_tokens=self.chunk_tokens)
        return {"chosen": chosen, "rejected": rejected}


def chosen_lengths(batch: dict) -> torch.Tensor:
    """Labelled tokens of each chosen response, for the per-token SFT term: from a packed batch's
    chosen_targets (per pair), or from the first half of an unpacked [chosen; rejected] batch's labels."""
    if "chosen_targets" in batch:
        return pair_lengths(batch["chosen_targets"], batch["pair_index"])
    labels = batch["labels"]
    return (labels[: labels.shape[0] // 2, 1:] != IGNORE_INDEX).sum(-1)


def batch_objective(policy, batch: dict, simpo_cfg) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss to backpropagate, metrics) of one micro-batch: what a training step computes."""
    return simpo_objective(*_objective_inputs(policy(**batch), batch, simpo_cfg))


def _objective_inputs(out: dict, batch: dict, simpo_cfg) -> tuple:
    """The arguments of loss.objective_sums / simpo_objective, from a policy's forward and its batch."""
    return (out["chosen"], out["rejected"], simpo_cfg, chosen_lengths(batch), out.get("anchor"),
            out.get("sft_excluded"))


@torch.no_grad()
def evaluate_dataset(policy, dataset, collate, simpo_cfg, batch_size: int, rank: int = 0, world_size: int = 1,
                     reduce_sum=None, device=None) -> dict[str, float]:
    """The objective and metrics over every pair of `dataset`, prefixed eval_; each process takes every
    world_size-th pair, and reduce_sum (accelerate's reduce; None for one process) adds their sums."""
    was_training = policy.training
    policy.eval()
    empty = torch.zeros(0, dtype=torch.float64, device=device)
    # Zeros to start from, also what a process without any eval pair contributes.
    totals = {name: value.double() for name, value in objective_sums(empty, empty, simpo_cfg).items()}
    indices = list(range(rank, len(dataset), world_size))
    for start in range(0, len(indices), batch_size):
        batch = collate([dataset[i] for i in indices[start:start + batch_size]])
        batch = {k: v.to(device) if device is not None else v for k, v in batch.items()}
        for name, value in objective_sums(*_objective_inputs(policy(**batch), batch, simpo_cfg)).items():
            totals[name] = totals[name] + value.detach().double()
    policy.train(was_training)
    names = list(totals)
    stacked = torch.stack([totals[name] for name in names])
    if reduce_sum is not None:
        stacked = reduce_sum(stacked)
    _, metrics = objective_from_sums(dict(zip(names, stacked)), simpo_cfg)
    return {f"eval_{name}": value for name, value in metrics.items()}
