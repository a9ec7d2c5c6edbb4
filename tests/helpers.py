"""Shared test fixtures: a tiny random Llama with the bundled SmolLM2 tokenizer, and small data files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml


def smollm2_tokenizer_dir() -> str:
    from simpo_lite.model import resolve_model_source

    return resolve_model_source("smollm2-135m-instruct")


def make_tiny_model(folder: Path, seed: int = 0, tie: bool = True) -> Path:
    """A 2-layer, 64-wide Llama over SmolLM2's vocabulary, saved with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "green", "seven", "quiet", "maple", "ocean", "lamp"]
    with path.open("w") as handle:
        for i in range(n):
            topic = rng.choice(words)
            handle.write(json.dumps({
                "prompt": f"Tell me about {topic} number {i}.",
                "chosen": f"Ahoy! {topic} {i} be a fine thing, matey.",
                "rejected": f"{topic.capitalize()} {i}.",
            }) + "\n")
    return path


def write_config(path: Path, model_dir: Path, data_file: Path, output_dir: Path, **train) -> Path:
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"source": str(data_file), "eval_fraction": 0.2, "max_length": 64, "max_prompt_length": 32},
        "simpo": {"beta": 2.0, "gamma_beta_ratio": 0.5},
        "train": {"output_dir": str(output_dir), "learning_rate": 1e-3, "micro_batch_size": 2,
                  "eval_steps": 100, "save_steps": 100, "seed": 7, **train},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_losses(run_dir: Path) -> dict[int, float]:
    from simpo_lite.progress import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r}
