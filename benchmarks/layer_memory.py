"""Bytes per token that one decoder layer keeps for backward when it is not checkpointed, measured,
next to simpo_lite.plan's estimate: what model.uncheckpointed_layers costs per layer.

Each setting loads the bundled SmolLM2-135M-Instruct as a run would (4-bit NF4, LoRA r=16 on every
linear, bf16 compute), keeps the last layer's activations, and runs bench_memory's batch (2 pairs of
about 400 tokens) forward through the trainer's log-prob path under saved_tensors_hooks. A tensor is
counted once per storage, for the layer whose modules saved it; parameters are left out.

    python benchmarks/layer_memory.py                 # simpo-lite: lora_inputs and lean_layers
    python benchmarks/layer_memory.py --peft-path     # peft's LoRA path and transformers' own layers
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SETTINGS = [("fp32", 0.0), ("fp32", 0.05), ("compute", 0.0), ("compute", 0.05)]  # frozen_dtype, lora.dropout


def saved_bytes_per_layer(model, batch) -> dict[int, int]:
    """{decoder layer index: bytes of the distinct storages its modules saved for backward}."""
    from simpo_lite.logprobs import causal_lm, concatenated_logps

    layers = causal_lm(model).get_decoder().layers
    current, owner, size = [None], {}, {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)) for i, layer in enumerate(layers)]
    hooks += [layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)) for layer in layers]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if current[0] is not None and ptr not in params:
            owner.setdefault(ptr, current[0])
            size[ptr] = t.untyped_storage().nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            concatenated_logps(model, batch, chunk_tokens=256)
    finally:
        for h in hooks:
            h.remove()
    per_layer: dict[int, int] = {}
    for ptr, layer in owner.items():
        per_layer[layer] = per_layer.get(layer, 0) + size[ptr]
    return per_layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=400, help="tokens per sequence (bench_memory's default)")
    ap.add_argument("--peft-path", action="store_true",
                    help="leave peft's LoRA forward and transformers' norms and MLPs as they are (the plan's peer)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    import simpo_lite.lean_layers as lean_layers
    import simpo_lite.lora_inputs as lora_inputs
    from bench_memory import make_pairs, simpo_lite_batch
    from simpo_lite.config import Config, LoraConfig, ModelConfig
    from simpo_lite.model import load_model, load_tokenizer
    from simpo_lite.plan import layer_activation_bytes_per_token, setting_from_config
    from simpo_lite.plan_arch import architecture

    if args.peft_path:
        lora_inputs.keep_lora_inputs_once = lambda model: 0
        lean_layers.use_lean_layers = lambda model: 0
    print("layers: " + ("peft's LoRA path, transformers' norms and MLPs" if args.peft_path
                        else "simpo_lite.lora_inputs and simpo_lite.lean_layers"))
    print("| frozen_dtype | lora.dropout | measured B/token, last layer (kept) | a checkpointed layer | plan B/token |")
    print("|---|---|---|---|---|")
    for frozen, dropout in SETTINGS:
        cfg = Config(model=ModelConfig(compute_dtype="bf16", gradient_checkpointing=True, uncheckpointed_layers=1,
                                       frozen_dtype=frozen), lora=LoraConfig(r=16, alpha=32, dropout=dropout))
        model = load_model(cfg).train()
        tokenizer = load_tokenizer(cfg.model)
        batch = simpo_lite_batch(tokenizer, make_pairs(tokenizer, args.length), "cpu")
        tokens = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)  # the last column is never fed
        per_layer = saved_bytes_per_layer(model, batch)
        last = max(per_layer)
        setting = replace(setting_from_config(cfg, "cpu"), peer=args.peft_path)
        plan = layer_activation_bytes_per_token(architecture(cfg.model), setting)
        print(f"| {frozen} | {dropout} | {per_layer[last] / tokens:,.0f} | {per_layer[0] / tokens:,.0f} | {plan:,.0f} |",
              flush=True)
        del model


if __name__ == "__main__":
    main()
