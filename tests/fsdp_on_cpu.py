"""`python -m simpo_lite` under accelerate's FSDP1 on CPU processes (gloo), for tests without GPUs.

accelerate enables FSDP only on accelerator devices: on a machine without them it reads the FSDP
settings of the launch config but runs DDP. This launcher lets the run go through accelerate's real FSDP path anyway:
after the accelerator is made, its shared state is switched to FSDP with the plugin those settings
describe. Everything else (wrapping, sharded optimizer, clipping, state dicts) is accelerate's and
torch's own code, on CPU tensors. Launch it like the package:

    accelerate launch --config_file presets/accelerate/fsdp-qlora.yaml --mixed_precision no \
        --fsdp_sync_module_states false --fsdp_cpu_ram_efficient_loading false \
        tests/fsdp_on_cpu.py train --config my.yaml
"""

import torch

import simpo_lite.run_setup as run_setup
from simpo_lite.cli import main

make_accelerator = run_setup.make_accelerator


def make_fsdp_accelerator(cfg):
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc = make_accelerator(cfg)
    state = AcceleratorState()
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launch config's FSDP_* variables
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState's init does
    state.device = torch.device("cpu")  # FSDP refuses a device_id (cpu:0 here) unequal to its compute device, cpu
    return acc


run_setup.make_accelerator = make_fsdp_accelerator

if __name__ == "__main__":
    main()
