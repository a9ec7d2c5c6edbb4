"""The base model a QLoRA run actually trained against, as a plain (unquantized) transformers model.

A LoRA adapter trained on a 4-bit NF4 base learnt corrections for the quantized weights, not for the
original ones. Merged into the original full-precision weights it gives a different model from the one
trained: for SmolLM2-135M the two agree on the most likely next token at only 48-58% of positions (README,
"Which base to merge into").
Merged into the NF4 weights dequantized (bitsandbytes.functional.dequantize_4bit of every Linear4bit's
packed weight with its quant_state), it reproduces the trained model up to the rounding of the compute.

`dequantize_into(quantized, plain)` copies a loaded 4-bit model into a plain model of the same
architecture: the dequantized linear weights, and every other parameter and buffer (embeddings, norms,
output head) exactly as the 4-bit model holds them (for a 4-bit load in bf16 these are the bf16-rounded
values training saw). `load_dequantized(cfg, dtype)` does it for a run's config: the 4-bit base loaded
as training loads it (simpo_lite.model.load_base_model: the same quantization settings, so the same
NF4 codes), copied into the base loaded in `dtype`.
"""

from __future__ import annotations

import copy
import gc

import torch


def is_linear4bit(module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)


def dequantized_weight(module, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight a Linear4bit multiplies by, dequantized straight into `dtype`.

    Straight into `dtype`, not into quant_state.dtype (the dtype the weight had when it was quantized)
    and then cast: bitsandbytes' own 4-bit matmul dequantizes into the input's dtype, so a bf16-quantized
    layer computing in fp32 uses the unrounded NF4 values (going through bf16 moved a tiny model's logits
    by 0.09, against 1e-5 this way).
    """
    import bitsandbytes.functional as F

    weight = module.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacked the weight for its AVX512-BF16 inference kernel: undo that first.
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    else:
        data = weight.data
    state = copy.copy(state)  # the layer's own state is left as it is
    state.dtype = dtype
    return F.dequantize_4bit(data, state).reshape(state.shape)


@torch.no_grad()
def dequantize_into(quantized, plain) -> list[str]:
    """Overwrite `plain`'s weights with `quantized`'s: dequantized NF4 for the 4-bit linear layers,
    the 4-bit model's own values for everything else. Returns the names of the dequantized weights.

    Both models must have the same architecture (parameter names); `plain` keeps its dtype.
    """
    plain_params = dict(plain.named_parameters())
    plain_buffers = dict(plain.named_buffers())
    dequantized = []
    for name, module in quantized.named_modules():
        if is_linear4bit(module):
            target = plain_params[f"{name}.weight"]
            target.copy_(dequantized_weight(module, target.dtype))
            dequantized.append(f"{name}.weight")
    done = set(dequantized)
    for name, param in quantized.named_parameters():  # tied weights are listed once
        if name in done:
            continue
        if name not in plain_params:
            raise ValueError(f"the plain model has no parameter {name}: not the same architecture")
        plain_params[name].copy_(param.to(plain_params[name].dtype))
    for name, buffer in quantized.named_buffers():
        if name in plain_buffers and plain_buffers[name].shape == buffer.shape:
            plain_buffers[name].copy_(buffer.to(plain_buffers[name].dtype))
    return dequantized


def load_dequantized(cfg, dtype: torch.dtype = torch.float32):
    """The run's base (config `cfg`) as its training loaded it in 4-bit, dequantized into a plain
    model in `dtype` on the CPU (ready for PeftModel.from_pretrained(...).merge_and_unload())."""
    from simpo_lite.model import load_base_model

    plain = load_base_model(cfg.model, quantize=False, dtype=dtype, device_map="cpu")
    if not cfg.model.quantize:
        return plain  # an unquantized run trained on these very weights
    quantized = load_base_model(cfg.model)
    dequantize_into(quantized, plain)
    del quantized
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return plain


@torch.no_grad()
def compute_in_fp32(quantized):
    """A loaded 4-bit model made to compute in fp32 with the same NF4 codes: every Linear4bit's compute
    dtype and every other parameter in fp32 (for checks; bitsandbytes casts the dequantized weight to
    the input's dtype, so its values are unchanged)."""
    for module in quantized.modules():
        if is_linear4bit(module):
            module.compute_dtype = torch.float32
            module.compute_type_is_set = True
    for param in quantized.parameters():
        if type(param).__name__ != "Params4bit" and param.dtype != torch.float32:
            param.data = param.data.float()
    return quantized
