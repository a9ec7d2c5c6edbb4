"""Preference metrics of a model on a dataset: the same names as training, prefixed eval_."""

from __future__ import annotations

import torch

from simpo_lite.config import SimpoConfig
from simpo_lite.objective import pair_losses

METRIC_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


@torch.no_grad()
def evaluate_dataset(policy, dataset, collate, simpo_cfg: SimpoConfig, batch_size: int,
                     rank: int = 0, world_size: int = 1, reduce_sum=None, device=None) -> dict:
    """Mean metrics over every pair of `dataset`; each process takes every world_size-th pair.

    reduce_sum sums a tensor over processes (accelerate's reduce); None for one process.
    """
    was_training = policy.training
    policy.eval()
    sums = torch.zeros(len(METRIC_NAMES) + 1, dtype=torch.float64, device=device)
    indices = list(range(rank, len(dataset), world_size))
    for start in range(0, len(indices), batch_size):
        batch = collate([dataset[i] for i in indices[start:start + batch_size]])
        batch = {k: v.to(device) if device is not None else v for k, v in batch.items()}
        chosen, rejected = policy(batch["input_ids"], batch["attention_mask"], batch["labels"])
        losses, chosen_rewards, rejected_rewards = pair_losses(chosen, rejected, simpo_cfg)
        columns = [losses, chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float(),
                   chosen_rewards - rejected_rewards, chosen, rejected]
        sums[:-1] += torch.stack([c.double().sum() for c in columns])
        sums[-1] += len(chosen)
    if reduce_sum is not None:
        sums = reduce_sum(sums)
    policy.train(was_training)
    count = max(sums[-1].item(), 1.0)
    return {f"eval_{name}": sums[i].item() / count for i, name in enumerate(METRIC_NAMES)}
