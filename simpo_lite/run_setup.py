"""Everything a run needs before its first step: accelerator, data, model, optimizer, resumed state."""

from __future__ import annotations

import sys

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from simpo_lite import resume, run_folder, sharding
from simpo_lite.config import Config
from simpo_lite.errors import UserError


@dataclass
class RunParts:
    cfg: Config            # the run's config with any `auto` setting resolved (simpo_lite.autofit)
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
    state: run_folder.TrainerState
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


_NO_GPU_FOR_FSDP = ("no available devices", "sync_module_states=True` is not supported on cpu")


def make_accelerator(cfg: Config):
    from accelerate import Accelerator

    trackers = list(cfg.train.report_to) or None
    # cpu=True on a machine without CUDA lets torchrun / accelerate launch start gloo DDP on the CPU.
    try:
        acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(cfg), log_with=trackers,
                          project_dir=cfg.train.output_dir)
    except RuntimeError as err:
        # An FSDP launch config with sync_module_states (as shipped) on a machine without GPUs; accelerate
        # words this differently from release to release (1.15: "no available devices", 1.16: "not supported
        # on cpu"), so both are recognised.
        if not any(sign in str(err) for sign in _NO_GPU_FOR_FSDP):
            raise
        raise UserError(f"FSDP launch config without GPUs (accelerate: {err}) -- this launch config needs GPUs; "
                        f"on the CPU launch DDP instead: torchrun --nproc_per_node N -m simpo_lite train ...") from None
    return acc


def start_trackers(acc, cfg: Config) -> None:
    """TensorBoard / W&B, once the run folder is cleared (--overwrite): TensorBoard writes into it."""
    if cfg.train.report_to:
        acc.init_trackers(run_folder.TRACKERS, config=_flatten(cfg.to_dict()))


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def load_data(cfg: Config, tokenizer, accelerator):
    from simpo_lite.data import build_datasets

    # Tokenization is cached by datasets: the main process fills the cache, the others read it.
    with accelerator.main_process_first():
        prepared = build_datasets(cfg.data, tokenizer, cfg.train.seed)
    if prepared.train.num_rows == 0:  # every pair held out: only eval and generate may ask for that
        raise UserError(f"no training pairs: data.eval_fraction={cfg.data.eval_fraction:g} holds every pair of "
                        f"{cfg.data.source} out for evaluation; set it to 0.1, say, or give data.eval_source")
    return prepared


class Reuse:
    """What consecutive runs in one process (a sweep's trials) share instead of rebuilding: the
    prepared data of the same data section, model and seed, and the loaded base of the same model."""

    def __init__(self):
        from simpo_lite.model import LoadedBase

        self.base = LoadedBase()
        self._data_key = None
        self._data = None

    def data(self, cfg: Config, tokenizer, accelerator):
        key = (cfg.data, cfg.model, cfg.train.seed)
        if key != self._data_key:
            self._data, self._data_key = load_data(cfg, tokenizer, accelerator), key
        return self._data


def row_lengths(train, pack_prompt: bool) -> list[int]:
    """Each pair's row length in its batch, which length-grouping evens out: the longer side's row,
    or with packing the one row that holds the prompt once and both responses."""
    chosen = [len(ids) for ids in train["chosen_input_ids"]]
    rejected = [len(ids) for ids in train["rejected_input_ids"]]
    if pack_prompt:
        return [c + r - p for c, r, p in zip(chosen, rejected, train["prompt_length"])]
    return [max(c, r) for c, r in zip(chosen, rejected)]


def batch_order(cfg: Config, train, processes: int) -> Callable[[int], list]:
    """epoch -> that epoch's micro-batches of training indices; refuses data too small for one step."""
    from simpo_lite.data import batch_indices
    from simpo_lite.data.packing import token_budget_batches

    lengths = row_lengths(train, cfg.simpo.pack_prompt)

    def batches_for_epoch(epoch: int) -> list:
        if cfg.simpo.pack_tokens:  # micro-batches counted in tokens: rows of up to pack_tokens
            return token_budget_batches(lengths, cfg.train.micro_batch_size, cfg.simpo.pack_tokens,
                                        seed=cfg.train.seed, epoch=epoch)
        return batch_indices(lengths, cfg.train.micro_batch_size, seed=cfg.train.seed, epoch=epoch,
                             shuffle=True, group_by_length=cfg.data.group_by_length)

    per_step = processes * cfg.train.gradient_accumulation_steps
    if len(batches_for_epoch(0)) < per_step:
        raise UserError(f"{len(train)} training pairs make fewer micro-batches than one optimizer step needs "
                        f"({per_step} = processes x train.gradient_accumulation_steps): add data or lower "
                        f"train.micro_batch_size / train.gradient_accumulation_steps")
    return batches_for_epoch


def build_policy(cfg: Config, acc, resume_path: Path | None, sample_ids: list[int], reuse: Reuse | None = None):
    """(prepared ConcatenatedPolicy, its trainable parameters): model, resumed adapter, FSDP wrapping.

    sample_ids: a training sequence, on which the chunked log-probs are checked once against the
    model's own logits, so a model that transforms its logits in an unknown way stops here.
    """
    from simpo_lite import fsdp_load
    from simpo_lite.model import load_model
    from simpo_lite.policy import ConcatenatedPolicy

    if fsdp_load.rank0_loads_alone(acc):
        model = fsdp_load.load_model(cfg, acc)
    else:
        model = reuse.base.load_model(cfg) if reuse else load_model(cfg)
    # A model on meta (FSDP's low-memory loading, ranks but 0) gets rank 0's weights at wrap.
    if not fsdp_load.is_on_meta(model):
        check_log_probs(model, sample_ids)
        if resume_path:
            resume.load_adapter_weights(model, resume_path)
    if sharding.uses_fsdp(acc):
        sharding.wrap_lora_separately(acc, model)
    policy = ConcatenatedPolicy.from_config(model, cfg.simpo)
    # load_model already placed the (possibly 4-bit) weights; accelerate must not move them again.
    policy = acc.prepare_model(policy, device_placement=False)
    # The optimizer is built on the prepared module's parameters: FSDP replaces the model's parameters
    # with flattened ones, and an optimizer holding the originals would update nothing (seen on a GPU:
    # a 1-process FSDP run whose eval loss never moved). Under DDP they are the same tensors.
    return policy, [p for p in policy.parameters() if p.requires_grad]


def check_log_probs(model, sample_ids: list[int]) -> None:
    from simpo_lite.logprobs import check_logit_head

    was_training = model.training
    model.eval()  # no dropout: both computations must see the same network
    try:
        device = next(model.parameters()).device
        check_logit_head(model, torch.tensor([sample_ids], device=device))
    except ValueError as err:
        raise UserError(f"{err}; simpo-lite cannot train this model correctly") from None
    finally:
        model.train(was_training)


def fit_auto_settings(cfg: Config, acc) -> Config:
    """Resolve `auto` settings before the model loads; every process takes the first one's choice."""
    from simpo_lite import autofit

    if not autofit.wants_autofit(cfg):
        return cfg
    choice = None
    if acc.is_main_process:
        from accelerate.utils import DistributedType

        _, choice = autofit.fit(cfg, processes=acc.num_processes, fsdp=acc.distributed_type == DistributedType.FSDP)
        print(f"simpo-lite: {choice.line()}", file=sys.stderr, flush=True)
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        choice = broadcast_object_list([choice])[0]
    return autofit.apply(cfg, choice)


def build_run_parts(cfg: Config, resume_path: Path | None, quiet: bool, reuse: Reuse | None = None) -> RunParts:
    from accelerate.utils import set_seed

    from simpo_lite.data import make_collator
    from simpo_lite.kernels import check_kernels
    from simpo_lite.model import load_tokenizer
    from simpo_lite.optim import build_optimizer, build_scheduler, total_steps

    # What this machine cannot run is refused before the data is prepared and anything loads.
    check_kernels(cfg.model)
    acc = make_accelerator(cfg)
    sharding.check_fsdp_setup(acc, cfg)
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    prepared = reuse.data(cfg, tokenizer, acc) if reuse else load_data(cfg, tokenizer, acc)
    if acc.is_main_process:
        # Even with --quiet one line says what the data preparation kept, skipped and truncated.
        print(prepared.report.counts_line() if quiet else prepared.report.summary(), file=sys.stderr, flush=True)
    if resume_path:
        resume.check_same_data(resume_path, prepared.train.num_rows)  # before the model loads
    cfg = fit_auto_settings(cfg, acc)
    batches_for_epoch = batch_order(cfg, prepared.train, acc.num_processes)
    policy, trainable = build_policy(cfg, acc, resume_path, prepared.train[0]["chosen_input_ids"], reuse)
    optimizer = acc.prepare_optimizer(build_optimizer(trainable, cfg.train))
    per_step = acc.num_processes * cfg.train.gradient_accumulation_steps
    total = total_steps(cfg.train, len(batches_for_epoch(0)) // per_step)
    scheduler = build_scheduler(optimizer, cfg.train, total)
    state, resume_rng = run_folder.TrainerState(step=0, epoch=0, batch_in_epoch=0), None
    if resume_path:
        state, resume_rng = resume.restore_training_state(resume_path, acc, policy, optimizer, scheduler)
    state.train_pairs = prepared.train.num_rows
    collate = make_collator(tokenizer.pad_token_id, cfg.simpo.pack_prompt, cfg.simpo.pack_tokens)
    return RunParts(cfg, acc, tokenizer, prepared.train, prepared.eval, collate, batches_for_epoch, policy, optimizer,
                    scheduler, total, trainable, state, resume_path, resume_rng)
