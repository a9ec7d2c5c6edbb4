"""`python -m simpo_lite` under accelerate's FSDP1 on CPU processes (gloo), for tests without GPUs.

accelerate enables FSDP only on accelerator devices: on a machine without them it reads the FSDP
settings of the launch config but runs DDP. This launcher lets the run go through accelerate's real FSDP path anyway:
after the accelerator is made, its shared state is switched to FSDP with the plugin those settings
describe. Everything else (wrapping, sharded optimizer, clipping, state dicts) is accelerate's and
torch's own code, on CPU tensors. Launch it like the package:

    accelerate launch --config_file presets/accelerate/fsdp-qlora.yaml --mixed_precision no \
        tests/fsdp_on_cpu.py train --config my.yaml

Two things stand in for a GPU here. sync_module_states (which the shipped config's
cpu_ram_efficient_loading needs): accelerate's plugin refuses it without an accelerator, and FSDP
refuses CPU tensors for it (a GPU-speed guard: gloo broadcasts CPU tensors fine), so the plugin is
made without it and given it back with a `param_init_fn` onto the CPU. And with SIMPO_TEST_MEMORY_DIR
set, each process writes rank<N>.json there: its resident memory just before the model is loaded,
after loading (before wrapping: rank 0's whole model, the meta skeleton elsewhere) and after wrapping,
its peak (VmHWM, reset there) from then until the model is wrapped and sharded, and the bytes of its
shard; then it stops (run under MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0, as the
benchmarks, so that freed memory leaves the resident set). The resident figures leave out pages of
shared-library code: the first call of a torch or bitsandbytes routine maps its code in (9 of rank 1's
15 MiB while loading, and more when the suite runs beside it), which is no part of the model. A
memory-mapped checkpoint still counts.
"""

import json
import os
from pathlib import Path

import torch

import simpo_lite.fsdp_load as fsdp_load
import simpo_lite.run_setup as run_setup
from simpo_lite.cli import main

make_accelerator = run_setup.make_accelerator
build_policy = run_setup.build_policy
load_model = fsdp_load.load_model
after_load_kib = []


def _without_sync_module_states():
    """The launch config's sync_module_states / cpu_ram_efficient_loading, cleared in the environment."""
    names = ("FSDP_SYNC_MODULE_STATES", "FSDP_CPU_RAM_EFFICIENT_LOADING")
    asked = {name: os.environ.get(name, "false").lower() in ("1", "true") for name in names}
    for name in names:
        os.environ[name] = "false"
    return asked


def make_fsdp_accelerator(cfg):
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import _init_utils

    asked = _without_sync_module_states()
    acc = make_accelerator(cfg)
    state = AcceleratorState()
    plugin = FullyShardedDataParallelPlugin()  # from the launch config's FSDP_* variables
    if asked["FSDP_SYNC_MODULE_STATES"] or asked["FSDP_CPU_RAM_EFFICIENT_LOADING"]:
        plugin.sync_module_states = True
        plugin.cpu_ram_efficient_loading = asked["FSDP_CPU_RAM_EFFICIENT_LOADING"]
        plugin.param_init_fn = lambda module: module.to_empty(device=torch.device("cpu"), recurse=False)
        _init_utils._check_module_states_for_sync_module_states = lambda states: None
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState's init does
    state.device = torch.device("cpu")  # FSDP refuses a device_id (cpu:0 here) unequal to its compute device, cpu
    return acc


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _resident_kib_without_library_code() -> int:
    """Resident pages of every mapping but shared libraries (anonymous memory, heap, mapped data files)."""
    total, library = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and ":" not in fields[0]:  # a mapping's header: range perms offset dev inode [path]
            path = fields[5] if len(fields) > 5 else ""
            library = path.endswith(".so") or ".so." in path or path.startswith("/usr/bin/") or "/bin/python" in path
        elif fields[0] == "Rss:" and not library:
            total += int(fields[1])
    return total


def load_model_measured(cfg, acc):
    model = load_model(cfg, acc)
    after_load_kib.append(_resident_kib_without_library_code())
    return model


def build_policy_measured(cfg, acc, *args, **kwargs):
    folder = os.environ.get("SIMPO_TEST_MEMORY_DIR")
    if not folder:
        return build_policy(cfg, acc, *args, **kwargs)
    import bitsandbytes, peft, transformers.models.llama.modeling_llama  # noqa: F401  imports are not the model

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    resident_before, data_before = _memory_kib("VmRSS"), _resident_kib_without_library_code()
    parts = build_policy(cfg, acc, *args, **kwargs)
    record = {"resident_before_load_kib": resident_before, "peak_load_and_wrap_kib": _memory_kib("VmHWM"),
              "data_before_load_kib": data_before, "data_after_load_kib": after_load_kib[-1],
              "data_after_wrap_kib": _resident_kib_without_library_code(),
              "shard_bytes": sum(p.numel() * p.element_size() for p in parts[0].parameters())}
    (Path(folder) / f"rank{acc.process_index}.json").write_text(json.dumps(record))
    raise SystemExit(0)


run_setup.make_accelerator = make_fsdp_accelerator
run_setup.build_policy = build_policy_measured
fsdp_load.load_model = load_model_measured

if __name__ == "__main__":
    main()
