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
        chosen, rejected = policy(**batch)
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


def evaluate_command(model_or_run: str, preset: str | None = None, config=None, data: str | None = None,
                     sets: list[str] | None = None, out=None) -> dict:
    """`simpo-lite eval`: metrics of a base model, a run's adapter or an exported model on an eval split."""
    from pathlib import Path

    from simpo_lite.data import build_datasets, make_collator
    from simpo_lite.errors import UserError
    from simpo_lite.objective import ConcatenatedPolicy
    from simpo_lite.target import load_target_model, load_target_tokenizer, model_device, resolve_target

    if out is not None and Path(out).suffix.lower() != ".json":
        raise UserError(f"--out '{out}' must end in .json")
    target = resolve_target(model_or_run, preset=preset, config=config, data=data, sets=sets)
    cfg = target.cfg
    tokenizer = load_target_tokenizer(target)
    # The same seed, split and hold-out as training, so a run is scored on the pairs it was evaluated on.
    prepared = build_datasets(cfg.data, tokenizer, cfg.train.seed)
    if prepared.eval is None or len(prepared.eval) == 0:
        raise UserError(f"data '{cfg.data.source}' has no eval pairs: give --set data.eval_split=NAME, "
                        f"--set data.eval_source=FILE or --set data.eval_fraction=0.1")
    model = load_target_model(target)
    policy = ConcatenatedPolicy(model, cfg.simpo.logp_chunk_tokens, cfg.simpo.pack_prompt)
    collate = make_collator(tokenizer.pad_token_id, cfg.simpo.pack_prompt)
    metrics = evaluate_dataset(policy, prepared.eval, collate, cfg.simpo, cfg.train.eval_batch_size,
                               device=model_device(model))
    result = {"model_or_run": model_or_run, "model": target.describe(), "data": cfg.data.source,
              "eval_pairs": len(prepared.eval), "beta": cfg.simpo.beta, "gamma_beta_ratio": cfg.simpo.gamma_beta_ratio,
              **metrics}
    _print_metrics(result)
    if out is not None:
        from simpo_lite.generate import write_json

        write_json(Path(out), result)
        print(f"wrote {out}")
    return result


def _print_metrics(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    console.print(f"{result['model']}\n{result['eval_pairs']} eval pairs of {result['data']}, "
                  f"beta {result['beta']:g}, gamma/beta {result['gamma_beta_ratio']:g}")
    table = Table("metric", "value")
    for name in METRIC_NAMES:
        table.add_row(f"eval_{name}", f"{result[f'eval_{name}']:.4f}")
    console.print(table)
