"""What changes when accelerate shards the model with FSDP (QLoRA over several GPUs).

Each LoRA matrix is its own FSDP unit (see `wrap_lora_separately`), so the adapter and its optimizer
state can be gathered without gathering the frozen 4-bit layers. Checkpoints hold them whole, in the
same form as an unsharded run's: the adapter as peft saves it, the optimizer state keyed by parameter
name. Outside FSDP every function here is the plain single-process operation.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

from simpo_lite.errors import UserError

# Prefixes FSDP and torch's activation-checkpoint wrapper insert into module names.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def uses_fsdp(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def fsdp_requested() -> bool:
    """Whether the launch config asks for FSDP (accelerate launch sets this before any model exists)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def check_fsdp_setup(acc, cfg) -> None:
    """Refuse, before any model is loaded, the FSDP settings this module cannot train correctly; warn
    when accelerate turned an FSDP launch config into DDP, which it does without GPUs, silently."""
    if not uses_fsdp(acc):
        if fsdp_requested() and acc.is_main_process:
            warnings.warn("the launch config asks for FSDP, but accelerate shards only on GPUs: these processes "
                          "run DDP, each holding the whole model", stacklevel=2)
        return
    version = getattr(acc.state.fsdp_plugin, "fsdp_version", 1)
    if version != 1:
        raise UserError(f"fsdp_version {version} in the accelerate config: simpo-lite supports FSDP1 "
                        f"(fsdp_version: 1, as in presets/accelerate/fsdp-qlora.yaml)")
    if cfg.simpo.anchor_weight > 0:
        # The base pass switches LoRA off inside FSDP-sharded layers; nobody has checked that yet.
        raise UserError("simpo.anchor_weight > 0 is not supported under FSDP yet (the base pass with the "
                        "adapters disabled is unverified there): launch without FSDP or set simpo.anchor_weight=0")
    _check_storage_dtype(acc, cfg.model)


def _check_storage_dtype(acc, model_cfg) -> None:
    """FSDP's mixed precision casts every flattened unit to its dtype, the frozen ones too. The 4-bit
    blocks are packed bytes stored as the compute dtype: cast to another dtype they would be garbage."""
    from simpo_lite.model import DTYPES, compute_dtype

    cast_to = DTYPES.get(str(acc.mixed_precision))  # "no": no cast
    stored = compute_dtype(model_cfg)
    if model_cfg.quantize and cast_to is not None and cast_to != stored:
        stored_name = next(name for name, dtype in DTYPES.items() if dtype == stored)
        raise UserError(f"FSDP with mixed precision {acc.mixed_precision} would cast the 4-bit weights, stored as "
                        f"model.compute_dtype ({stored_name}), to {acc.mixed_precision} and corrupt them: set "
                        f"model.compute_dtype={acc.mixed_precision} or train.mixed_precision=auto")


def wrap_lora_separately(acc, model) -> None:
    """FSDP flattens each wrapped unit into one tensor, which needs one dtype and one requires_grad:
    peft's policy gives every LoRA matrix (fp32, trainable) its own unit beside the decoder layers
    (frozen, all in the 4-bit storage dtype). accelerate's own policy looks for the layer classes on
    the module it is given, ConcatenatedPolicy, which has none."""
    from peft.utils.other import fsdp_auto_wrap_policy

    acc.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)


def clip_grad_norm(acc, policy, trainable: list, max_norm: float) -> float:
    """Clip the gradients; return their norm before clipping, over every process's shard under FSDP.

    accelerate hands FSDP's clip to the wrapped module only when given exactly its parameters, and
    FSDP changes that list after the first forward (measured on 2 CPU processes: 31 parameters at
    wrap time, 45 after a step); otherwise it silently returns the norm of this process's shard.
    """
    if not uses_fsdp(acc):
        return float(acc.clip_grad_norm_(trainable, max_norm))
    acc.unscale_gradients()
    return float(policy.clip_grad_norm_(max_norm))


def _unwrapped_name(name: str) -> str:
    """A parameter's name in the model FSDP wrapped (ConcatenatedPolicy), without wrapper prefixes."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_adapter_state(acc, policy) -> dict | None:
    """The trainable weights, whole, keyed as in the peft model's state dict.

    Under FSDP every process must call this (the shards are gathered); the main process gets the
    weights, the others an empty dict. Elsewhere None: peft reads the weights from the live model.
    """
    if not uses_fsdp(acc):
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    state = {}
    for unit_name, unit in _trainable_units(policy):
        # offload_to_cpu only on accelerators: on CPU tensors FSDP's offload frees the gathered copy.
        with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True,
                                     offload_to_cpu=acc.device.type != "cpu"):
            if acc.is_main_process:
                for name, param in unit.named_parameters():
                    key = _unwrapped_name(f"{unit_name}.{name}").removeprefix("model.")
                    state[key] = param.detach().to("cpu", copy=True)
    return state


def save_adapter(peft_model, folder, adapter_state: dict | None) -> None:
    """Write the adapter as peft does: adapter_model.safetensors and adapter_config.json.

    adapter_state None: peft's own save_pretrained. Gathered weights (FSDP) are written here instead,
    because peft picks the adapter's keys by module name, and FSDP's nested wrappers change those
    names: given the gathered weights, it saves none of them.
    """
    if adapter_state is None:
        peft_model.save_pretrained(folder, safe_serialization=True)
        return
    from safetensors.torch import save_file

    adapter = peft_model.active_adapter
    weights = {_without_adapter_name(key, adapter): value.contiguous() for key, value in adapter_state.items()}
    save_file(weights, str(Path(folder) / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(peft_model.peft_config[adapter])
    config.inference_mode = True  # as peft saves it: a loaded adapter is frozen unless asked otherwise
    config.save_pretrained(str(folder))


def _without_adapter_name(key: str, adapter: str) -> str:
    """'...q_proj.lora_A.default.weight' -> '...q_proj.lora_A.weight', peft's key in a saved adapter."""
    *head, name, leaf = key.split(".")
    return ".".join([*head, leaf] if name == adapter else [*head, name, leaf])


def _trainable_units(policy) -> list:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return [(name, module) for name, module in policy.named_modules()
            if isinstance(module, FSDP) and module._has_params and module._flat_param.requires_grad]


def optimizer_state(acc, policy, optimizer) -> dict:
    """The optimizer state to save. Under FSDP every process must call this; the main process gets
    the whole state keyed by parameter name (independent of the number of processes)."""
    if not uses_fsdp(acc):
        return optimizer.state_dict()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with _full_state_dicts(acc, policy, rank0_only=True):
        return FSDP.optim_state_dict(policy, getattr(optimizer, "optimizer", optimizer))  # inside accelerate's wrapper


def load_optimizer_state(acc, policy, optimizer, state: dict, source) -> None:
    """Load a saved optimizer state; under FSDP each process keeps its own shard of it."""
    saved_by_fsdp = any(isinstance(key, str) for key in state.get("state", {}))
    if saved_by_fsdp != uses_fsdp(acc):
        written, now = ("with", "without") if saved_by_fsdp else ("without", "with")
        raise UserError(f"--resume: {source} was written by a run {written} FSDP and this run is {now} it; "
                        f"resume it under the same accelerate config")
    if uses_fsdp(acc):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with _full_state_dicts(acc, policy, rank0_only=False):
            state = FSDP.optim_state_dict_to_load(policy, getattr(optimizer, "optimizer", optimizer), state)
    optimizer.load_state_dict(state)  # accelerate's wrapper also moves the state to the device


def _full_state_dicts(acc, policy, rank0_only: bool):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    offload = acc.device.type != "cpu"
    return FSDP.state_dict_type(policy, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only))
