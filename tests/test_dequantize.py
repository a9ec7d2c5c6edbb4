"""simpo_lite.dequantize: merging a LoRA adapter into the dequantized NF4 base reproduces the 4-bit model
the adapter was trained on (tiny random Llama, computed in fp32); merging into the original weights does not."""

from __future__ import annotations

import pytest
import torch

from tiny_models import randomize_lora_b, random_llama, save_model_folder, smollm2_tokenizer, tiny_llama_config

# fp32 compute on both sides: what is left is the order of the floating-point operations.
TOLERANCE = 1e-3
PROMPT_IDS = torch.tensor([[1, 520, 2024, 314, 260, 1435, 30, 2, 9, 7, 11, 88, 301, 17]])


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    tokenizer = smollm2_tokenizer()
    # A large init scale: logits of order 1, so the NF4 error of the base shows clearly.
    config = tiny_llama_config(tokenizer, initializer_range=0.2, tie_word_embeddings=False)
    return save_model_folder(tmp_path_factory.mktemp("tiny-base"), random_llama(config, seed=0), tokenizer)


def run_config(base, quant_dtype):
    from simpo_lite.config import resolve

    return resolve(sets=[f"model.name_or_path={base}", f"model.compute_dtype={quant_dtype}", "lora.r=4",
                         "lora.alpha=8", "lora.dropout=0"])


def saved_adapter(cfg, folder):
    """A 4-bit base with a LoRA adapter whose B matrices are random (non-zero), saved."""
    from peft import get_peft_model

    from simpo_lite.model import load_base_model, lora_config

    model = randomize_lora_b(get_peft_model(load_base_model(cfg.model), lora_config(cfg.lora)), seed=1)
    model.save_pretrained(folder)
    return folder


def full_precision(cfg):
    from simpo_lite.model import load_base_model

    return load_base_model(cfg.model, quantize=False, dtype=torch.float32, device_map="cpu")


@torch.no_grad()
def logits(model):
    return model.eval()(input_ids=PROMPT_IDS).logits.float()


def merged_logits(base, adapter):
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(base, str(adapter)).merge_and_unload())


@pytest.mark.parametrize("quant_dtype", ["fp32", "bf16"])
def test_dequantized_merge_reproduces_the_4bit_model(tiny_base, tmp_path, quant_dtype):
    from simpo_lite.dequantize import compute_in_fp32, load_dequantized
    from simpo_lite.model import load_for_inference

    cfg = run_config(tiny_base, quant_dtype)  # bf16: quantized from bf16 weights, as the demo trains on the CPU
    adapter = saved_adapter(cfg, tmp_path / "adapter")
    trained = logits(compute_in_fp32(load_for_inference(cfg, adapter)))
    dequantized = merged_logits(load_dequantized(cfg, torch.float32), adapter)
    original = merged_logits(full_precision(cfg), adapter)

    assert (dequantized - trained).abs().max().item() < TOLERANCE
    assert torch.equal(dequantized.argmax(-1), trained.argmax(-1))
    # The check can fail: the original weights give another model (NF4 error, far above the tolerance).
    assert (original - trained).abs().max().item() > 30 * TOLERANCE


def test_dequantize_into_copies_the_4bit_models_other_weights(tiny_base):
    from simpo_lite.dequantize import dequantize_into
    from simpo_lite.model import load_base_model

    cfg = run_config(tiny_base, "bf16")
    quantized = load_base_model(cfg.model)
    plain = full_precision(cfg)
    names = dequantize_into(quantized, plain)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    params = dict(plain.named_parameters())
    for name, param in quantized.named_parameters():
        if f"{name}" not in names:  # embeddings, norms, head: the 4-bit model's bf16-rounded values
            assert torch.equal(params[name], param.float()), name
    assert all(p.dtype == torch.float32 for p in plain.parameters())
