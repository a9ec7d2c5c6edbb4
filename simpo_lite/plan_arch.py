"""The architecture figures `simpo-lite plan` needs: from a local config.json, else a table of published ones."""

from __future__ import annotations

from dataclasses import dataclass

from simpo_lite.errors import UserError
from simpo_lite.files import looks_like_local_path


@dataclass(frozen=True)
class Arch:
    """The architecture figures memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    norms_per_layer: int = 2          # Gemma-2 has four RMSNorms per decoder layer
    attn_softcap: bool = False        # Gemma-2 soft-caps attention scores (one more [L, L] tensor in eager)
    logit_softcap: bool = False       # Gemma-2 soft-caps the final logits (one more [chunk, vocab] buffer)
    lean_layers: bool = True          # Llama-style RMSNorm and SiLU MLP (simpo_lite.lean_layers); Gemma-2 not
    source: str = ""


def _hf(repo: str) -> str:
    return f"simpo-lite's table of known models, copied from https://huggingface.co/{repo}/blob/main/config.json"


# Published values, each copied from the model's config.json (the URL in `source`). Used when the
# config is not in the local Hugging Face cache, so `plan` works offline.
KNOWN_ARCHS: dict[str, Arch] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": Arch(
        hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256,
        tied_embeddings=False, source=_hf("meta-llama/Meta-Llama-3-8B-Instruct")),
    "meta-llama/Meta-Llama-3-70B-Instruct": Arch(
        hidden=8192, layers=80, heads=64, kv_heads=8, head_dim=128, intermediate=28672, vocab=128256,
        tied_embeddings=False, source=_hf("meta-llama/Meta-Llama-3-70B-Instruct")),
    "mistralai/Mistral-7B-Instruct-v0.2": Arch(
        hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=32000,
        tied_embeddings=False, source=_hf("mistralai/Mistral-7B-Instruct-v0.2")),
    "google/gemma-2-9b-it": Arch(
        hidden=3584, layers=42, heads=16, kv_heads=8, head_dim=256, intermediate=14336, vocab=256000,
        tied_embeddings=True, norms_per_layer=4, attn_softcap=True, logit_softcap=True, lean_layers=False,
        source=_hf("google/gemma-2-9b-it")),
    "Qwen/Qwen2.5-7B-Instruct": Arch(
        hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064,
        tied_embeddings=False, source=_hf("Qwen/Qwen2.5-7B-Instruct")),
    "HuggingFaceTB/SmolLM2-135M-Instruct": Arch(
        hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152,
        tied_embeddings=True, source=_hf("HuggingFaceTB/SmolLM2-135M-Instruct")),
}
# Same architecture under other names (base models, SFT starting points, the bundled copy).
ALIASES = {
    "meta-llama/Meta-Llama-3-8B": "meta-llama/Meta-Llama-3-8B-Instruct",
    "meta-llama/Meta-Llama-3-70B": "meta-llama/Meta-Llama-3-70B-Instruct",
    "princeton-nlp/Llama-3-Base-8B-SFT": "meta-llama/Meta-Llama-3-8B-Instruct",
    "mistralai/Mistral-7B-v0.1": "mistralai/Mistral-7B-Instruct-v0.2",
    "alignment-handbook/zephyr-7b-sft-full": "mistralai/Mistral-7B-Instruct-v0.2",
    "google/gemma-2-9b": "google/gemma-2-9b-it",
    "Qwen/Qwen2.5-7B": "Qwen/Qwen2.5-7B-Instruct",
    "HuggingFaceTB/SmolLM2-135M": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def arch_from_hf_config(hf_config, source: str) -> Arch:
    from simpo_lite.lean_layers import FAMILIES
    from simpo_lite.logprobs import text_config

    text = text_config(hf_config)
    heads = text.num_attention_heads
    kind = getattr(text, "model_type", "") or ""
    return Arch(hidden=text.hidden_size, layers=text.num_hidden_layers, heads=heads,
                kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
                intermediate=text.intermediate_size, vocab=text.vocab_size,
                tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
                norms_per_layer=4 if kind.startswith(("gemma2", "gemma3")) else 2,
                attn_softcap=bool(getattr(text, "attn_logit_softcapping", None)),
                logit_softcap=bool(getattr(text, "final_logit_softcapping", None)), lean_layers=kind in FAMILIES,
                source=source)


def _local_config(name_or_path: str, revision: str | None):
    """The model's config from a local folder or the Hugging Face cache; None when not there."""
    from simpo_lite.model_source import BUNDLED_MODELS, cache_dir

    if name_or_path in BUNDLED_MODELS:
        # Converting the bundled GGUF takes a while; plan reads the folder only if it already exists.
        name_or_path = str(cache_dir() / "models" / name_or_path)
    elif not looks_like_local_path(name_or_path):
        from simpo_lite.hub_fetch import fetch_model

        try:
            fetch_model(name_or_path, "config", revision)  # a few KB, when the Hub answers
        except UserError:
            pass  # offline, refused or unknown: the cache or the built-in table answers, as before
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name_or_path, revision=revision, local_files_only=True), name_or_path
    except (OSError, ValueError, KeyError):
        return None, name_or_path


def architecture(model_cfg) -> Arch:
    """Architecture of model.name_or_path: its local config.json if present, else the built-in table."""
    hf_config, where = _local_config(model_cfg.name_or_path, model_cfg.revision)
    if hf_config is not None:
        return arch_from_hf_config(hf_config, f"config.json in {where}")
    by_lower = {k.lower(): k for k in [*KNOWN_ARCHS, *ALIASES]}
    key = by_lower.get(model_cfg.name_or_path.lower())
    if key is None:
        raise UserError(f"plan: no architecture for model '{model_cfg.name_or_path}': its config.json is not "
                        f"cached locally and it is not one of {', '.join(KNOWN_ARCHS)}; fetch it once with "
                        f"'hf download {model_cfg.name_or_path} config.json' or give a local model folder")
    return KNOWN_ARCHS[ALIASES.get(key, key)]
