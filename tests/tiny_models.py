"""Shared test fixtures: tiny random Llamas with the bundled SmolLM2 tokenizer, the data and configs to
train them, and finished run folders.

Each function does one thing, so a test composes what it needs:

    tokenizer = smollm2_tokenizer()
    model = random_llama(tiny_llama_config(tokenizer, tie_word_embeddings=True))
    save_model_folder(folder, model, tokenizer)

`tiny_model_folder` is that composition with the usual choices.
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import torch
import yaml

# A 2-layer, 64-wide Llama. Widths are multiples of 64: bitsandbytes' CPU 4-bit inference packs weights
# in blocks of 64.
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)


# ---- the tokenizer -------------------------------------------------------------------------------

def smollm2_tokenizer_dir() -> str:
    """The bundled SmolLM2-135M-Instruct as a Hugging Face folder (converted once, then cached)."""
    from simpo_lite.model_source import resolve_model_source

    return resolve_model_source("smollm2-135m-instruct")


def smollm2_tokenizer():
    """The bundled SmolLM2-135M-Instruct tokenizer, with its ChatML chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())


# ---- the model -----------------------------------------------------------------------------------

def tiny_llama_config(tokenizer=None, **overrides):
    """A `TINY_LLAMA` config; with a tokenizer, over its vocabulary and with its BOS, EOS and pad ids.
    `overrides` are LlamaConfig arguments that replace or add to those."""
    from transformers import LlamaConfig

    fields = dict(TINY_LLAMA)
    if tokenizer is not None:
        fields.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(**{**fields, **overrides})


def random_llama(config, seed: int = 0):
    """A randomly initialised LlamaForCausalLM, the same for the same config and seed."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def sharpen_logits(model, tokenizer):
    """Larger logits than the default init, so greedy choices are far from ties; special tokens get
    logit 0, below the best ordinary token, so decoded answers are never empty. Needs an untied head."""
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        model.lm_head.weight[tokenizer.all_special_ids].zero_()
    return model


def save_model_folder(folder: Path, model, tokenizer) -> Path:
    """A plain Hugging Face model folder: config.json, weights and the tokenizer."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_model_folder(folder: Path, seed: int = 0, tie: bool = False, sharpen: bool = False) -> Path:
    """A `TINY_LLAMA` over SmolLM2's vocabulary, saved with SmolLM2's tokenizer; `sharpen`: see
    `sharpen_logits` (for tests that decode)."""
    tokenizer = smollm2_tokenizer()
    model = random_llama(tiny_llama_config(tokenizer, tie_word_embeddings=tie), seed=seed)
    if sharpen:
        sharpen_logits(model, tokenizer)
    return save_model_folder(folder, model, tokenizer)


# ---- training data, config and metrics -----------------------------------------------------------

def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """`n` preference pairs as JSON lines: a pirate-voiced chosen answer and a terse rejected one."""
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
    """A small training config (YAML) for `model_dir` on `data_file`; `train` adds to its train section."""
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


# A short run with a checkpoint and an evaluation (with 2 health answers) every 2 steps, guardrails off:
# every kind of save point (config, metrics, samples, checkpoints, the final adapter, the summary) in seconds.
SHORT_RUN = dict(save_steps=2, eval_steps=2, health_prompts=2, health_max_new_tokens=4, collapse_looping=1.0,
                 collapse_length_ratio=1e6, collapse_recall_drop=1.0, collapse_logps_drop=1e6)


def tiny_run_inputs(root: Path) -> tuple[Path, Path]:
    """(model folder, pairs file) for the short runs of the fault and run-folder tests."""
    return tiny_model_folder(root / "model", tie=True), write_pairs(root / "pairs.jsonl", 24)


def short_run_config(inputs: tuple[Path, Path], folder: Path, **train) -> Path:
    """folder/c.yaml: SHORT_RUN of `inputs` into folder/run; `train` adds to or replaces its settings."""
    model, data = inputs
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder / "c.yaml", model, data, folder / "run", **{**SHORT_RUN, **train})


def train_config(config: Path, resume=None, overwrite=False, sets=()):
    """simpo-lite train --config `config`, in this process and quiet."""
    from simpo_lite.config import resolve
    from simpo_lite.trainer import run_training

    return run_training(resolve(config_file=str(config), sets=list(sets)), resume=resume, overwrite=overwrite,
                        quiet=True)


def train_losses(run_dir: Path) -> dict[int, float]:
    """The training loss of each step of a run, from its metrics.jsonl."""
    from simpo_lite.run_folder import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r}


def grad_norms(run_dir: Path) -> list[float]:
    """The gradient norm of each step of a run, from its metrics.jsonl."""
    from simpo_lite.run_folder import read_metrics

    return [r["grad_norm"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]


# ---- finished runs -------------------------------------------------------------------------------

def save_run_folder(run: Path, cfg, model, tokenizer) -> Path:
    """What a finished run leaves: config.yaml, and adapter/ with the adapter and the tokenizer."""
    from simpo_lite.config import save_config

    save_config(cfg, run / "config.yaml")
    save_model_folder(run / "adapter", model, tokenizer)
    return run


def randomize_lora_b(model, seed: int = 1, std: float = 0.5):
    """Random non-zero LoRA B matrices: they start at zero, a trained adapter's do not."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)
    return model


def tiny_run_folder(run: Path, base: Path, sets: list[str] | None = None, seed: int = 1, std: float = 0.5) -> Path:
    """A finished run's folder on the base model folder `base`: the smollm2-demo preset with `sets`,
    and an adapter with random non-zero LoRA weights."""
    from peft import get_peft_model

    from simpo_lite.config import resolve
    from simpo_lite.model import load_base_model, lora_config

    cfg = resolve("smollm2-demo", sets=[f"model.name_or_path={base}", f"train.output_dir={run}", "lora.r=4",
                                        *(sets or [])])
    model = randomize_lora_b(get_peft_model(load_base_model(cfg.model), lora_config(cfg.lora)), seed=seed, std=std)
    return save_run_folder(run, cfg, model, smollm2_tokenizer())


# ---- the other architectures a GGUF export supports ----------------------------------------------

# Sentences that give a small BPE vocabulary every check prompt can be spelled in (the rest falls back to bytes).
_CORPUS = ["What is the capital of France? Paris is the capital of France.",
           "Write a haiku about autumn leaves. Red leaves fall softly.",
           "Explain in one sentence why the sky is blue. Air scatters blue light more than red light.",
           "The quick brown fox jumps over the lazy dog, and then it sleeps."] * 4
_SPM_FAMILIES = {
    # family -> (tokenizer class, special tokens in id order, chat template)
    "mistral": ("LlamaTokenizer", ["<unk>", "<s>", "</s>"],
                "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                "' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"),
    "gemma2": ("GemmaTokenizer", ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"],
               "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' "
               "else m['role']) + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
}


def spm_tokenizer(family: str, vocab_size: int = 320):
    """A small SentencePiece-style tokenizer (BPE over '▁'-joined text with byte fallback), as Mistral's and
    Gemma-2's are, trained on a few sentences, with the family's special tokens and chat template."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, trainers

    class_name, specials, template = _SPM_FAMILIES[family]
    raw = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    raw.normalizer = normalizers.Replace(" ", "\u2581")
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    raw.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=len(specials) + 256 + vocab_size,
                                                         special_tokens=specials + byte_tokens, show_progress=False))
    merges = json.loads(raw.to_str())["model"]["merges"]
    tokenizer = getattr(transformers, class_name)(vocab=raw.get_vocab(), merges=[tuple(m) for m in merges])
    turns = [t for t in specials if "_of_turn" in t]
    if turns:  # Gemma's turn markers are special tokens, matched whole
        tokenizer.add_special_tokens({"additional_special_tokens": turns})
    tokenizer.chat_template = template
    return tokenizer


def tiny_arch_model(family: str, tokenizer, seed: int = 0):
    """A 2-layer random model of `family` (llama, mistral, qwen2, gemma2) over the tokenizer's vocabulary.
    Gemma-2's heads are 256 wide, as in Gemma-2 2B/9B: llama.cpp scales its queries by the head width."""
    import transformers

    fields = dict(TINY_LLAMA, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    config_class, model_class = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM")}[family]
    if family == "gemma2":
        fields.update(num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256)
    if family in ("llama", "mistral", "qwen2"):
        fields.update(tie_word_embeddings=False)
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**fields))


def free_port() -> int:
    """A port nothing listens on, so launches of several test runs at once do not meet on 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
