"""Low-memory loading under FSDP: only rank 0 reads and quantizes the checkpoint.

accelerate's `fsdp_cpu_ram_efficient_loading` leaves the loading to transformers, which (5.x) loads
the whole model on every rank unless it runs DeepSpeed, and quantized models never on meta. So here
rank 0 loads the 4-bit model as a single process would (transformers reads the checkpoint one file
at a time and quantizes as it goes); every other rank builds the same modules on the meta device
from config.json alone. At wrap, FSDP's `param_init_fn` gives each meta unit empty storage and
`sync_module_states` broadcasts rank 0's values into it before sharding, one unit at a time, so no
rank but 0 ever holds the whole model.

What FSDP does not broadcast is bitsandbytes' quantization state (absmax, code, shapes: attributes of
the 4-bit weights, not parameters): rank 0 sends it to the others once, before wrapping. It stays
whole on every rank (about 1/16 byte a weight with double quantization), as in any FSDP-QLoRA run.
"""

from __future__ import annotations

import torch

from simpo_lite.config import Config, ModelConfig


def rank0_loads_alone(acc) -> bool:
    """Whether this run loads the model on rank 0 only: FSDP with cpu_ram_efficient_loading (which
    accelerate pairs with sync_module_states), on more than one process."""
    from simpo_lite.sharding import uses_fsdp

    if not uses_fsdp(acc) or acc.num_processes == 1:
        return False
    plugin = acc.state.fsdp_plugin
    return bool(plugin.cpu_ram_efficient_loading and plugin.sync_module_states)


def load_model(cfg: Config, acc):
    """The model with fresh LoRA adapters: real on rank 0, on the meta device elsewhere. Every rank
    must call it (rank 0 broadcasts the quantization state)."""
    from simpo_lite.model import load_base_model, prepared_base, with_fresh_lora

    base = load_base_model(cfg.model) if acc.is_main_process else None
    base = _shared_4bit_layout(base, cfg.model, acc.device)
    return with_fresh_lora(prepared_base(cfg, base), cfg)


def is_on_meta(model) -> bool:
    return any(param.is_meta for param in model.parameters())


def _shared_4bit_layout(base, model_cfg: ModelConfig, device: torch.device):
    """Rank 0's model back on rank 0; elsewhere the meta skeleton with rank 0's 4-bit layers."""
    import torch.distributed as dist

    layout = [_four_bit_layout(base) if base is not None else None]
    dist.broadcast_object_list(layout, src=0)
    if base is not None:
        return base
    return _meta_skeleton(model_cfg, layout[0], device)


def _four_bit_layout(model) -> dict | None:
    """{module name: (packed weight shape, quantization state as a dict of CPU tensors and values)}
    for every 4-bit layer; None for a model without any (model.quantize false)."""
    import bitsandbytes as bnb

    layout = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = {key: value.cpu() if isinstance(value, torch.Tensor) else value
                     for key, value in module.weight.quant_state.as_dict().items()}
            layout[name] = (tuple(module.weight.shape), state)
    return layout or None


def _meta_skeleton(model_cfg: ModelConfig, layout: dict | None, device: torch.device):
    """The model rank 0 loaded, without its weights: parameters on meta, buffers (rotary tables)
    computed on the CPU, the 4-bit layers where rank 0 has them, with its quantization state."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from simpo_lite.model import keep_one_cpu_4bit_kernel, compute_dtype
    from simpo_lite.model_source import resolve_model_source

    source = resolve_model_source(model_cfg.name_or_path, need="config", revision=model_cfg.revision)
    config = AutoConfig.from_pretrained(source, revision=model_cfg.revision,
                                        trust_remote_code=model_cfg.trust_remote_code)
    kwargs = {"attn_implementation": model_cfg.attn_implementation} if model_cfg.attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype(model_cfg),
                                                 trust_remote_code=model_cfg.trust_remote_code, **kwargs)
    model.requires_grad_(False)  # as a loaded model's: peft's preparation freezes it anyway
    if layout is not None:
        _to_4bit_layers(model, model_cfg, layout, device)
        model.is_loaded_in_4bit = True  # what peft reads to give 4-bit layers their LoRA class
        keep_one_cpu_4bit_kernel(model)
    return model


def _to_4bit_layers(model, model_cfg: ModelConfig, layout: dict, device: torch.device) -> None:
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    from simpo_lite.model import quantization_config

    quant = quantization_config(model_cfg)
    for name, (shape, state) in layout.items():
        linear = model.get_submodule(name)
        with torch.device("meta"):
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                                      quant.bnb_4bit_compute_dtype,
                                      compress_statistics=quant.bnb_4bit_use_double_quant,
                                      quant_type=quant.bnb_4bit_quant_type,
                                      quant_storage=quant.bnb_4bit_quant_storage)
        quant_state = QuantState.from_dict(dict(state), device=device)
        layer.weight = bnb.nn.Params4bit(torch.empty(shape, dtype=quant.bnb_4bit_quant_storage, device="meta"),
                                         requires_grad=False, quant_state=quant_state, bnb_quantized=True,
                                         quant_storage=quant.bnb_4bit_quant_storage, module=layer)
        layer.quant_state = quant_state  # where bitsandbytes finds it once FSDP has flattened the weight
        layer.requires_grad_(False)
        model.set_submodule(name, layer)
