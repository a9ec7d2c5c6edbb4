"""Model loading: 4-bit NF4 quantization, frozen-weight dtype, LoRA adapters, gradient checkpointing
(where the files come from: model_source.py)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from simpo_lite.config import Config, LoraConfig, ModelConfig
from simpo_lite.errors import UserError, first_line
from simpo_lite.model_source import resolve_model_source, tokenizer_problem

# The dtype names configs use (model.compute_dtype, export.dtype, train.mixed_precision).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on other GPUs; on the CPU bf16 where it has native bf16
    instructions (AVX512-BF16 or AMX), fp32 elsewhere.

    Measured on a 2-core AVX512-BF16 CPU, SmolLM2 demo step, 4-bit: bf16 46-53 s against fp32 58-68 s
    (README, 'Compute dtype on the CPU'); without those instructions bf16 is emulated and slower.
    """
    if model_cfg.compute_dtype != "auto":
        return DTYPES[model_cfg.compute_dtype]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def keeps_fp32_frozen_weights(model_cfg: ModelConfig, compute: torch.dtype) -> bool:
    """Whether a 4-bit model keeps peft's fp32 copies of its embeddings, output head and norms.

    With them the residual stream is fp32 too (bitsandbytes' 4-bit layers return their input's dtype).
    bf16 has fp32's range, so wherever the compute dtype is bf16 (GPU or CPU) they only cost memory and
    time; fp16 can overflow in the norms without them. Measured on a 2-core AVX512-BF16 CPU, SmolLM2
    4-bit with every layer's activations kept, 5 demo steps: 3.9 s a step and 2.55 GB peak in bf16,
    4.8 s and 3.62 GB in fp32 (README, "Compute dtype on the CPU").
    """
    from simpo_lite.sharding import fsdp_requested

    if not model_cfg.quantize:
        return False
    if fsdp_requested():
        return False  # FSDP wraps them with the 4-bit blocks, stored in the compute dtype: one dtype per unit
    if model_cfg.frozen_dtype != "auto":
        return model_cfg.frozen_dtype == "fp32"
    return compute != torch.bfloat16


def load_tokenizer(model_cfg: ModelConfig):
    """The model's tokenizer, right-padded, with EOS as pad when it has no pad token."""
    from transformers import AutoTokenizer

    source = resolve_model_source(model_cfg.name_or_path, need="tokenizer", revision=model_cfg.revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=model_cfg.revision,
                                                  trust_remote_code=model_cfg.trust_remote_code)
    except Exception as err:
        if Path(source).is_dir():  # a local folder: say what it lacks
            raise UserError(tokenizer_problem(Path(source), model_cfg.name_or_path, err)) from None
        if isinstance(err, OSError):
            raise UserError(_not_found(model_cfg.name_or_path, err)) from None
        raise
    from simpo_lite.data.tokenize import ensure_pad_token

    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def load_run_tokenizer(cfg: Config, adapter_dir: Path | None):
    """The tokenizer a run saved beside its adapter (what it trained with, chat template included),
    else the base model's; prepared as load_tokenizer prepares it."""
    if adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return load_tokenizer(replace(cfg.model, name_or_path=str(adapter_dir), revision=None))
    return load_tokenizer(cfg.model)


def _not_found(name: str, err: Exception) -> str:
    from simpo_lite.files import local_hint

    return (f"cannot load model '{name}': {first_line(err)} -- give a local folder, a cached Hub id "
            f"(log in with 'hf auth login' for gated models), or 'smollm2-135m-instruct'; if a run's base "
            f"model moved, add --set model.name_or_path=NEW_PATH{local_hint(name, 'folder')}")


def _device_map():
    if not torch.cuda.is_available():
        return None
    # One full copy per process under DDP: each process keeps its model on its own GPU.
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


def quantization_config(model_cfg: ModelConfig):
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype(model_cfg)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=model_cfg.double_quant,
                              bnb_4bit_compute_dtype=dtype,
                              # FSDP wraps parameters of one dtype; storing the 4-bit blocks as the
                              # compute dtype lets QLoRA shards be wrapped.
                              bnb_4bit_quant_storage=dtype)


def load_base_model(model_cfg: ModelConfig, quantize: bool | None = None, dtype: torch.dtype | None = None,
                    device_map=None):
    """The base causal LM, 4-bit when quantize (default: model_cfg.quantize), else in `dtype` (default:
    the compute dtype); on this process's GPU when there is one, unless `device_map` says otherwise."""
    from transformers import AutoModelForCausalLM

    quantize = model_cfg.quantize if quantize is None else quantize
    kwargs = dict(revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code,
                  device_map=device_map or _device_map(), dtype=dtype or compute_dtype(model_cfg))
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if model_cfg.kernels == "liger":
        # transformers' Hub kernels (on by default since 5.2x) reset each layer's forward on every
        # model.train(), silently undoing Liger's per-module patches.
        kwargs["use_kernels"] = False
    if quantize:
        kwargs["quantization_config"] = quantization_config(model_cfg)
    source = resolve_model_source(model_cfg.name_or_path, need="weights", revision=model_cfg.revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise UserError(_not_found(model_cfg.name_or_path, err)) from None
    except (ValueError, KeyError) as err:  # e.g. a config.json for an architecture transformers does not know
        if not Path(source).is_dir():
            raise
        raise UserError(f"cannot load the model in '{model_cfg.name_or_path}': {first_line(err)}") from None
    if quantize:
        keep_one_cpu_4bit_kernel(model)
    return model


def keep_one_cpu_4bit_kernel(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its bf16 CPU inference kernel.

    On CPUs with AVX512-BF16 the first no-grad forward in eval mode repacks every Linear4bit in
    place; training afterwards runs on the repacked weights and its gradients differ (measured: up
    to 0.1 on a tiny model), so an evaluation would change the run it measures.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_config(lora_cfg: LoraConfig, model=None):
    """peft's LoraConfig. `model` is needed only with lora.layers: peft takes 'all-linear' as a string,
    which it refuses beside layers_to_transform, so the model's linear module names are spelled out."""
    from peft import LoraConfig as PeftLoraConfig

    targets = "all-linear" if lora_cfg.target_modules == ["all-linear"] else list(lora_cfg.target_modules)
    if lora_cfg.layers is not None and targets == "all-linear":
        targets = _linear_module_names(model)
    return PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                          target_modules=targets, layers_to_transform=lora_cfg.layers,
                          bias="none", task_type="CAUSAL_LM")


def _linear_module_names(model) -> list[str]:
    """The last name part of every linear layer but the output head: what peft's 'all-linear' selects."""
    import torch.nn as nn

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and module is not head})


def load_model(cfg: Config):
    """Base model (4-bit unless model.quantize is false) with fresh trainable LoRA adapters."""
    return with_fresh_lora(prepared_base(cfg), cfg)


def prepared_base(cfg: Config, base=None):
    """The frozen base as training runs it: 4-bit unless model.quantize is false, frozen weights in
    training's dtype, gradient checkpointing as configured, no KV cache. `base`: the loaded base
    model to prepare (default: load it)."""
    from simpo_lite.kernels import apply_kernels

    model = base if base is not None else load_base_model(cfg.model)
    apply_kernels(model, cfg.model)
    checkpointing = cfg.model.gradient_checkpointing
    # Re-entrant checkpointing needs inputs that require grad and breaks with frozen embeddings;
    # the non-reentrant variant has neither problem.
    ckpt_kwargs = {"use_reentrant": False}
    if cfg.model.quantize:
        model = prepare_frozen_weights(model, cfg.model, checkpointing, ckpt_kwargs)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    layers = cfg.model.uncheckpointed_layers
    if layers == "auto":  # a config no run has fitted yet (a script's, a test's): fitted here, quietly
        from simpo_lite import autofit

        layers = autofit.fit(cfg)[0].model.uncheckpointed_layers
    if checkpointing and layers:
        recompute_all_but_last(model, layers)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    return model


def with_fresh_lora(base, cfg: Config):
    """`base` with new LoRA adapters, initialised from train.seed alone: whatever ran before in this
    process (loading the base, an earlier sweep trial), the same config gives the same adapters."""
    from accelerate.utils import set_seed
    from peft import get_peft_model

    from simpo_lite.lora_inputs import keep_lora_inputs_once

    _check_lora_layers(cfg.lora.layers, base)
    set_seed(cfg.train.seed)
    try:
        model = get_peft_model(base, lora_config(cfg.lora, base))
    except ValueError as err:  # e.g. target modules that the model does not have
        raise UserError(f"lora.target_modules {cfg.lora.target_modules}: {err}") from None
    keep_lora_inputs_once(model)
    return model


def _check_lora_layers(layers, base) -> None:
    from simpo_lite.logprobs import text_config

    count = text_config(base.config).num_hidden_layers
    wrong = [i for i in layers or () if not 0 <= i < count]
    if wrong:
        raise UserError(f"lora.layers {wrong}: the model has layers 0 to {count - 1}; "
                        f"fix lora.layers or set it to null for all layers")


class LoadedBase:
    """Keeps one prepared base between runs in one process (the trials of a sweep): a run whose model
    section is the same gets it back with new adapters instead of loading and quantizing it again."""

    def __init__(self):
        self._model_section = None
        self._model = None

    def load_model(self, cfg: Config):
        if self._model is not None and self._model_section == cfg.model:
            base = self._model.unload()  # the previous run's adapters removed, base layers restored
        else:
            self._model = None
            base = prepared_base(cfg)
        self._model, self._model_section = with_fresh_lora(base, cfg), cfg.model
        return self._model


def load_for_inference(cfg: Config, adapter_dir: Path | None = None):
    """A model in eval mode exactly as training runs it: the same 4-bit base, the same dtype of its
    frozen weights (peft's fp32 upcast on the CPU), and the saved adapter when given. Everything that
    reads a run (eval, generate, the export check) loads it here, so its numbers are the run's own."""
    from peft import PeftModel

    model = load_base_model(cfg.model)
    if cfg.model.quantize:
        model = prepare_frozen_weights(model, cfg.model, checkpointing=False)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def prepare_frozen_weights(model, model_cfg: ModelConfig, checkpointing: bool, ckpt_kwargs: dict | None = None):
    """Freeze a 4-bit model and give its embeddings, head and norms the dtype training uses: peft's
    prepare_model_for_kbit_training casts them to fp32, and they go back to the compute dtype unless
    keeps_fp32_frozen_weights says otherwise."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                            gradient_checkpointing_kwargs=ckpt_kwargs)
    dtype = compute_dtype(model_cfg)
    if not keeps_fp32_frozen_weights(model_cfg, dtype):
        cast_frozen_weights(model, dtype)
    return model


def cast_frozen_weights(model, dtype: torch.dtype) -> None:
    """Undo prepare_model_for_kbit_training's fp32 upcast of the parameters that are not 4-bit."""
    for param in model.parameters():
        if param.dtype == torch.float32 and type(param).__name__ != "Params4bit":
            param.data = param.data.to(dtype)


def recompute_all_but_last(model, keep: int) -> None:
    """Turn checkpointing off for the last `keep` decoder layers: they store their activations and
    backward does not recompute them. The last ones, because backward reaches them first and frees
    their activations before recomputing any other layer, so they never add to that peak."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < len(layers) - keep
