"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch

from simpo_lite.config import TrainConfig


def optimizer_name(choice: str, cuda: bool) -> str:
    """train.optimizer with "auto" resolved: paged 8-bit AdamW on CUDA (bitsandbytes' 8-bit state,
    paged to CPU under pressure), torch AdamW elsewhere."""
    if choice == "auto":
        return "paged_adamw_8bit" if cuda else "adamw"
    return choice


def build_optimizer(params, train_cfg: TrainConfig):
    params = [p for p in params if p.requires_grad]
    if optimizer_name(train_cfg.optimizer, torch.cuda.is_available()) == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay)
    return torch.optim.AdamW(params, lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay)


def total_steps(train_cfg: TrainConfig, steps_per_epoch: int) -> int:
    if train_cfg.max_steps:
        return train_cfg.max_steps
    return max(1, math.ceil(train_cfg.num_epochs * steps_per_epoch))


def warmup_steps(train_cfg: TrainConfig, total_steps: int) -> int:
    return math.ceil(train_cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer, train_cfg: TrainConfig, total_steps: int):
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    warmup = warmup_steps(train_cfg, total_steps)
    if train_cfg.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    factory = get_cosine_schedule_with_warmup if train_cfg.lr_scheduler == "cosine" else get_linear_schedule_with_warmup
    return factory(optimizer, warmup, total_steps)
