"""`simpo-lite export --format gguf`: the merged model as one GGUF file for llama.cpp, Ollama and LM Studio.

The GGUF is written from the very folder the safetensors export writes (the same merge and its check),
then read back by transformers' GGUF loader and, where llama-cpp-python is installed, by llama.cpp itself
(gguf_verify). Tensors are laid out as llama.cpp's own converter lays them out: Llama-family q/k rows
interleaved for its RoPE, Gemma-2 norms stored as 1 + weight; f16, bf16 and q8_0 come from gguf's
quantizer, q4_k_m from llama.cpp's (its K-quant mixes are llama.cpp's choice, so they are made there).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from simpo_lite.errors import RunError, UserError

QUANTS = ("f16", "bf16", "q8_0", "q4_k_m")
LLAMA_CPP_QUANTS = ("q4_k_m",)
# Hugging Face model_type -> llama.cpp architecture (Mistral is a Llama to llama.cpp).
ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "gemma2": "GEMMA2"}
LLAMA_CPP_HINT = "pip install 'simpo-lite[gguf]' (llama-cpp-python; it compiles llama.cpp, minutes)"


def check_request(quant: str, adapter: Path, cfg) -> None:
    """Everything a GGUF export of a run can be refused for, checked before any work: the quant type, the
    base's architecture and RoPE, the tokenizer, and llama.cpp where the quant type needs it."""
    from simpo_lite.gguf_vocab import tokenizer_kind
    from simpo_lite.model_source import resolve_model_source

    if quant not in QUANTS:
        raise UserError(f"--quant '{quant}' is not supported: use one of {', '.join(QUANTS)}")
    check_architecture(resolve_model_source(cfg.model.name_or_path, revision=cfg.model.revision),
                       cfg.model.trust_remote_code)
    if (adapter / "tokenizer.json").is_file():
        tokenizer_kind(adapter)
    else:  # a checkpoint saves no tokenizer: the run's is the base's, prepared as loading prepares it
        from simpo_lite.model import load_run_tokenizer

        with tempfile.TemporaryDirectory() as folder:
            load_run_tokenizer(cfg, adapter).save_pretrained(folder)
            try:
                tokenizer_kind(Path(folder))
            except UserError as err:  # name the tokenizer by where it came from, not the scratch folder
                raise UserError(str(err).replace(folder, cfg.model.name_or_path)) from None
    if quant in LLAMA_CPP_QUANTS and not llama_cpp_available():
        raise UserError(f"--quant {quant} is made by llama.cpp's quantizer, which is not installed: {LLAMA_CPP_HINT}, "
                        f"or use --quant q8_0")


def check_architecture(model_source: str, trust_remote_code: bool = False) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_source, trust_remote_code=trust_remote_code)
    if config.model_type not in ARCHS:
        raise UserError(f"--format gguf supports the architectures {', '.join(ARCHS)}, not '{config.model_type}' "
                        f"({model_source}): export with --format safetensors")
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type not in ("default", "linear", "yarn", "llama3"):
        raise UserError(f"--format gguf: RoPE scaling '{rope_type}' of {model_source} has no llama.cpp form here: "
                        f"export with --format safetensors")
    if config.model_type == "gemma2" and not _gemma2_attention_scale_matches(config):
        raise UserError(f"--format gguf: {model_source} scales attention by query_pre_attn_scalar "
                        f"{config.query_pre_attn_scalar}, which llama.cpp's Gemma-2 does not: export with "
                        f"--format safetensors")


def fill_gguf(tmp: Path, adapter: Path, name: str, cfg, dtype_name: str, quant: str, summary: dict | None,
              result, say: Callable[[str], None]) -> None:
    """The safetensors export (merge and its check) in a scratch folder, converted to one GGUF file, read
    back and compared; then the Modelfile and the card. Only the GGUF, Modelfile and README.md remain."""
    from transformers import AutoTokenizer

    from simpo_lite import hub
    from simpo_lite.files import write_text
    from simpo_lite.gguf_verify import verify
    from simpo_lite.gguf_vocab import modelfile
    from simpo_lite.merge import fill_merged

    merged = tmp / ".merged"
    merged.mkdir()
    fill_merged(merged, adapter, cfg, dtype_name, summary, result, say=say)
    path = tmp / f"{name}-{quant}.gguf"
    say(f"writing {path.name}")
    write_gguf(merged, path, quant, f"{name} (simpo-lite, {cfg.model.name_or_path})", say)
    result.gguf = verify(path, merged, quant, say)
    write_text(tmp / "Modelfile", modelfile(path.name, AutoTokenizer.from_pretrained(merged)))
    shutil.rmtree(merged)
    hub.write_model_card(tmp, cfg, summary, result)


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def rope_parameters(config) -> dict:
    """RoPE settings whichever way the config spells them (transformers 5: rope_parameters)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _gemma2_attention_scale_matches(config) -> bool:
    """llama.cpp scales Gemma-2 queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for the 46-layer 27B."""
    if config.num_hidden_layers == 46:
        return config.query_pre_attn_scalar == config.hidden_size // config.num_attention_heads
    return config.query_pre_attn_scalar == config.head_dim


def write_gguf(model_dir: Path, path: Path, quant: str, name: str, say: Callable[[str], None]) -> None:
    """Convert a saved Hugging Face model folder (weights, config, tokenizer) into one GGUF file."""
    if quant in LLAMA_CPP_QUANTS:
        # K-quants start from a lossless file: f32 weights for an fp32 merge, bf16 otherwise.
        source = path.with_name(path.stem + ".source.gguf")
        _write(model_dir, source, "f32" if _stored_float32(model_dir) else "bf16", name)
        try:
            say(f"quantizing to {quant} with llama.cpp")
            llama_cpp_quantize(source, path, quant)
        finally:
            source.unlink(missing_ok=True)
    else:
        _write(model_dir, path, quant, name)


def _write(model_dir: Path, path: Path, quant: str, name: str) -> None:
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    from simpo_lite.gguf_vocab import add_vocab, build_vocab

    config = AutoConfig.from_pretrained(model_dir)
    arch = gguf.MODEL_ARCH[ARCHS[config.model_type]]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _add_hyperparameters(writer, config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    add_vocab(writer, model_dir, build_vocab(model_dir, tokenizer, config.vocab_size))
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[quant]
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for hf_name, data in _tensors(model_dir, config):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise RunError(f"GGUF export: no llama.cpp name for tensor '{hf_name}' of {config.model_type}; "
                           f"please report it with the run's config.yaml")
        _add_tensor(writer, gguf_name, data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_hyperparameters(writer, config) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = rope_parameters(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads or config.model_type == "gemma2":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if config.model_type == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
        writer.add_sliding_window(int(config.sliding_window))


def _tensors(model_dir: Path, config):
    """(Hugging Face name, float32 numpy array) as llama.cpp wants each tensor, shard by shard."""
    import torch
    from safetensors import safe_open

    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = getattr(config, "tie_word_embeddings", False)
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            for name in handle.keys():
                if tied and name == "lm_head.weight":
                    continue
                data = handle.get_tensor(name).to(torch.float32)
                if config.model_type in ("llama", "mistral") and name.endswith("q_proj.weight"):
                    data = _interleave_rope(data, heads)
                elif config.model_type in ("llama", "mistral") and name.endswith("k_proj.weight"):
                    data = _interleave_rope(data, kv_heads)
                elif config.model_type == "gemma2" and name.endswith("norm.weight"):
                    data = data + 1  # Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's by weight
                yield name, data.numpy()
    rope = rope_parameters(config)
    if rope["rope_type"] == "llama3":
        yield "rope_freqs.weight", _llama3_rope_factors(config, rope)


def _interleave_rope(weight, heads: int):
    """Hugging Face rotates the two halves of each head; llama.cpp's Llama rotates adjacent pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _llama3_rope_factors(config, rope: dict):
    """Llama-3.1's frequency-dependent RoPE scaling as the per-frequency factors llama.cpp reads."""
    import numpy as np

    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float64) / dim)):
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _add_tensor(writer, name: str, data, qtype) -> None:
    import gguf

    # Vectors (norms, biases) stay f32, as llama.cpp keeps them; rows a block type cannot tile fall back to f16.
    if data.ndim == 1:
        qtype = gguf.GGMLQuantizationType.F32
    elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data)
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _stored_float32(model_dir: Path) -> bool:
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype")) == "float32"


def llama_cpp_quantize(source: Path, target: Path, quant: str) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[quant]
    params.nthread = int(os.environ.get("OMP_NUM_THREADS") or 0) or (os.cpu_count() or 1)
    with _quiet_native_output():
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise RunError(f"llama.cpp's quantizer failed on {source.name} (status {status}); nothing was written")


@contextmanager
def _quiet_native_output():
    """llama.cpp prints its progress from C to file descriptor 2; keep it off the user's screen."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
