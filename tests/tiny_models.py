"""Small local models for the eval/generate tests: the bundled SmolLM2 tokenizer on a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import torch

from simpo_lite.config import resolve, save_config


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from simpo_lite.model import resolve_model_source

    return AutoTokenizer.from_pretrained(resolve_model_source("smollm2-135m-instruct"))


def tiny_model_folder(folder: Path, seed: int = 0) -> Path:
    """A plain Hugging Face model folder (config.json, weights, tokenizer) with a 2-layer random Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Larger logits than the default init, so greedy choices are far from ties; special tokens get
        # logit 0, below the best ordinary token, so decoded answers are never empty.
        model.lm_head.weight.mul_(20)
        model.lm_head.weight[tokenizer.all_special_ids].zero_()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_run_folder(run: Path, base: Path, sets: list[str] | None = None, seed: int = 1) -> Path:
    """A finished run's folder: config.yaml and adapter/ (random non-zero LoRA weights + tokenizer)."""
    from peft import get_peft_model

    from simpo_lite.model import load_base_model, lora_config

    cfg = resolve("smollm2-demo", sets=[f"model.name_or_path={base}", f"train.output_dir={run}", "lora.r=4",
                                        *(sets or [])])
    save_config(cfg, run / "config.yaml")
    model = get_peft_model(load_base_model(cfg.model), lora_config(cfg.lora))
    torch.manual_seed(seed)
    with torch.no_grad():  # LoRA B starts at zero; a trained adapter does not
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(run / "adapter")
    smollm2_tokenizer().save_pretrained(run / "adapter")
    return run
