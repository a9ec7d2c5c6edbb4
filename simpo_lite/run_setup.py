"""Everything a run needs before its first step: accelerator, data, model, optimizer, resumed state."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from simpo_lite import checkpoint as ckpt
from simpo_lite import sharding
from simpo_lite.config import Config
from simpo_lite.errors import UserError


@dataclass
class RunParts:
    accelerator: Any
    tokenizer: Any
    train_data: Any
    eval_data: Any
    collate: Callable
    batches_for_epoch: Callable[[int], list]
    policy: Any
    optimizer: Any
    scheduler: Any
    total_steps: int
    trainable: list        # what the gradient norm is taken over (outside FSDP)
    state: ckpt.TrainerState
    resumed_from: Path | None
    resume_rng: dict | None


def mixed_precision(cfg: Config) -> str:
    if cfg.train.mixed_precision != "auto":
        return cfg.train.mixed_precision
    from simpo_lite.model import compute_dtype

    dtype = compute_dtype(cfg.model)
    if not torch.cuda.is_available():
        return "no"  # on the CPU the 4-bit kernels already compute in model.compute_dtype
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def make_accelerator(cfg: Config):
    from accelerate import Accelerator

    trackers = list(cfg.train.report_to) or None
    # cpu=True on a machine without CUDA lets torchrun / accelerate launch start gloo DDP on the CPU.
    try:
        acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(cfg), log_with=trackers,
                          project_dir=cfg.train.output_dir)
    except RuntimeError as err:
        if "no available devices" not in str(err):
            raise
        # An FSDP launch config with sync_module_states (as shipped) on a machine without GPUs.
        raise UserError(f"accelerate: {err} -- this launch config needs GPUs; on the CPU launch DDP instead: "
                        f"torchrun --nproc_per_node N -m simpo_lite train ...") from None
    if trackers:
        acc.init_trackers("simpo-lite", config=_flatten(cfg.to_dict()))
    return acc


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _warn_config_drift(cfg: Config, resume_path: Path) -> None:
    saved = ckpt.load_checkpoint_config(resume_path).to_dict()
    now = cfg.to_dict()
    changed = [f"{section}.{key}" for section in now for key in now[section]
               if now[section][key] != saved[section][key] and key not in ("max_steps", "output_dir")]
    if changed:
        warnings.warn(f"resuming {resume_path} with settings that differ from its saved config: "
                      f"{', '.join(changed)}", stacklevel=2)


def load_data(cfg: Config, tokenizer, accelerator):
    from simpo_lite.data import build_datasets

    # Tokenization is cached by datasets: the main process fills the cache, the others read it.
    with accelerator.main_process_first():
        prepared = build_datasets(cfg.data, tokenizer, cfg.train.seed)
    return prepared


def row_lengths(train, pack_prompt: bool) -> list[int]:
    """Each pair's row length in its batch, which length-grouping evens out: the longer side's row,
    or with packing the one row that holds the prompt once and both responses."""
    chosen = [len(ids) for ids in train["chosen_input_ids"]]
    rejected = [len(ids) for ids in train["rejected_input_ids"]]
    if pack_prompt:
        return [c + r - p for c, r, p in zip(chosen, rejected, train["prompt_length"])]
    return [max(c, r) for c, r in zip(chosen, rejected)]


def build_run_parts(cfg: Config, resume_path: Path | None, quiet: bool) -> RunParts:
    from accelerate.utils import set_seed

    from simpo_lite.data import batch_indices, make_collator
    from simpo_lite.model import load_model, load_tokenizer
    from simpo_lite.objective import ConcatenatedPolicy
    from simpo_lite.optim import build_optimizer, build_scheduler, total_steps

    acc = make_accelerator(cfg)
    sharding.check_fsdp_setup(acc, cfg.model)
    set_seed(cfg.train.seed)
    if resume_path:
        _warn_config_drift(cfg, resume_path)
    tokenizer = load_tokenizer(cfg.model)
    prepared = load_data(cfg, tokenizer, acc)
    if acc.is_main_process and not quiet:
        print(prepared.report.summary(), flush=True)
    train = prepared.train
    lengths = row_lengths(train, cfg.simpo.pack_prompt)

    def batches_for_epoch(epoch: int) -> list:
        return batch_indices(lengths, cfg.train.micro_batch_size, seed=cfg.train.seed, epoch=epoch,
                             shuffle=True, group_by_length=cfg.data.group_by_length)

    per_step = acc.num_processes * cfg.train.gradient_accumulation_steps
    if len(batches_for_epoch(0)) < per_step:
        raise UserError(f"{len(train)} training pairs make fewer micro-batches than one optimizer step needs "
                        f"({per_step} = processes x train.gradient_accumulation_steps): add data or lower "
                        f"train.micro_batch_size / train.gradient_accumulation_steps")

    model = load_model(cfg)
    if resume_path:
        _load_adapter_weights(model, resume_path)
    if sharding.uses_fsdp(acc):
        sharding.wrap_lora_separately(acc, model)
    policy = ConcatenatedPolicy(model, cfg.simpo.logp_chunk_tokens, cfg.simpo.pack_prompt)
    # load_model already placed the (possibly 4-bit) weights; accelerate must not move them again.
    policy = acc.prepare_model(policy, device_placement=False)
    # The optimizer is built on the prepared module's parameters: FSDP replaces the model's parameters
    # with flattened ones, and an optimizer holding the originals would update nothing (seen on a GPU:
    # a 1-process FSDP run whose eval loss never moved). Under DDP they are the same tensors.
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = acc.prepare_optimizer(build_optimizer(trainable, cfg.train))
    state = ckpt.TrainerState(step=0, epoch=0, batch_in_epoch=0)
    total = total_steps(cfg.train, len(batches_for_epoch(0)) // per_step)
    scheduler = build_scheduler(optimizer, cfg.train, total)
    resume_rng = None
    if resume_path:
        sharding.load_optimizer_state(acc, policy, optimizer, ckpt.load_torch(resume_path / "optimizer.pt"), resume_path)
        scheduler.load_state_dict(ckpt.load_torch(resume_path / "scheduler.pt"))
        state = ckpt.load_trainer_state(resume_path)
        resume_rng = ckpt.load_rng_state(resume_path, acc.process_index)
        if resume_rng is None:
            raise UserError(f"--resume: {resume_path} was written by fewer processes than this run has "
                            f"({acc.num_processes}); resume with the same number of processes")
    collate = make_collator(tokenizer.pad_token_id, cfg.simpo.pack_prompt)
    return RunParts(acc, tokenizer, train, prepared.eval, collate, batches_for_epoch, policy, optimizer, scheduler,
                    total, trainable, state, resume_path, resume_rng)


def _load_adapter_weights(model, path: Path) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise UserError(f"--resume: {path} has no adapter_model.safetensors; it is not a complete checkpoint")
    saved = load_file(str(file))
    # A file without some of the adapter's weights would load "successfully" and silently restart them.
    missing = set(get_peft_model_state_dict(model)) - set(saved)
    result = set_peft_model_state_dict(model, saved)
    if missing or getattr(result, "unexpected_keys", None):
        raise UserError(f"--resume: adapter weights in {path} do not fit this model/LoRA config "
                        f"({len(missing)} missing, {len(getattr(result, 'unexpected_keys', []))} unexpected)")
