"""Configuration schema and its resolution.

Resolution order, each layer overriding the one before:
defaults < preset < config file (YAML) < first-class CLI flags < repeated ``--set section.key=value``.
Every layer is validated against the schema; unknown keys and wrong types are collected and
reported together, each naming the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from simpo_lite.config_check import (check_bounds, check_type, is_str_type, setting_named, suggest, suggest_key,
                                     type_name)
from simpo_lite.errors import ConfigError, UserError
from simpo_lite.files import missing_path, read_text, write_text


def _f(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
       lt: float | None = None, le: float | None = None) -> Any:
    """A schema field: its default, a one-line description and optional numeric bounds."""
    meta = {"help": help, "ge": ge, "gt": gt, "lt": lt, "le": le}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name_or_path: str = _f("smollm2-135m-instruct",
                           "Hub id, local folder, or 'smollm2-135m-instruct' (the bundled GGUF model).")
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) of the model.")
    quantize: bool = _f(True, "Load the base weights in 4-bit NF4 (bitsandbytes); false = full-precision LoRA.")
    double_quant: bool = _f(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "Dtype of matmuls and unquantized weights; auto = bf16 on GPUs that support it, fp16 on "
        "other GPUs, bf16 on CPUs with AVX512-BF16/AMX, else fp32.")
    attn_implementation: Optional[str] = _f(None, "Attention kernel (e.g. 'eager' for Gemma-2, 'sdpa'); null = model default.")
    gradient_checkpointing: bool = _f(True, "Recompute activations in backward (non-reentrant) to save memory.")
    uncheckpointed_layers: Union[int, Literal["auto"]] = _f(
        "auto", "With gradient checkpointing, the last n decoder layers keep their activations instead of "
        "recomputing them: faster steps for memory (simpo-lite plan shows how much); auto = as many as the memory "
        "plan fits on the device (see train.memory_budget_gb), 0 = recompute every layer (the least memory).", ge=0)
    frozen_dtype: Literal["auto", "fp32", "compute"] = _f(
        "auto", "Dtype of a 4-bit model's embeddings, output head and norms: fp32 (peft's prepare_model_for_kbit_"
        "training upcast) or the compute dtype; auto = compute where that is bf16, GPU or CPU (~6 GiB less for "
        "Llama-3-8B at 2 x 2048), fp32 on fp16 GPUs and CPUs without bf16; always compute under FSDP.")
    trust_remote_code: bool = _f(False, "Allow the model repository to run its own Python code.")
    kernels: Literal["none", "liger"] = _f(
        "none", "Fused training kernels: liger = Liger-Kernel's RMSNorm, SwiGLU and RoPE (CUDA GPUs with liger-kernel installed; refused elsewhere); none = simpo-lite's PyTorch RMSNorm and SwiGLU that keep less for backward (Llama, Mistral, Qwen).")


@dataclass
class LoraConfig:
    r: int = _f(16, "LoRA rank.", ge=1)
    alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r).", ge=1)
    dropout: float = _f(0.05, "Dropout on the LoRA input.", ge=0.0, lt=1.0)
    target_modules: list[str] = _f(["all-linear"], "Modules that get adapters; ['all-linear'] = every linear layer but the output head.")
    layers: Optional[list[int]] = _f(None, "Decoder layers (0-based indices) whose target modules get adapters; null = all layers.")


@dataclass
class DataConfig:
    source: str = _f("demo", "Training data: 'demo', a .jsonl/.json/.parquet/.csv file, or a Hub dataset id.")
    config_name: Optional[str] = _f(None, "Config (subset) name of a Hub dataset.")
    split: str = _f("train", "Split of the training source.")
    eval_source: Optional[str] = _f(None, "Separate evaluation data (file or dataset id); null = use eval_split or eval_fraction.")
    eval_split: Optional[str] = _f(None, "Split used for evaluation (of eval_source, else of source).")
    eval_fraction: float = _f(0.1, "Share of the training prompts held out for evaluation, each with all its pairs, when no eval split or source is given (1.0, for eval and generate: every row).", ge=0.0, le=1.0)
    eval_max_pairs: Optional[int] = _f(None, "Evaluate on at most this many pairs (null = all).", ge=1)
    max_train_pairs: Optional[int] = _f(None, "Use at most this many training pairs (null = all).", ge=1)
    columns: dict[str, str] = _f({}, "Column mapping, e.g. {prompt: question, chosen: good, rejected: bad, system: sys}.")
    system_prompt: Optional[str] = _f(None, "System message added to every prompt that has none.")
    max_length: int = _f(1024, "Longest prompt + response in tokens.", ge=2)
    max_prompt_length: int = _f(512, "Longest prompt in tokens after truncation.", ge=1)
    truncation_mode: Literal["keep_end", "keep_start"] = _f("keep_end", "Which end of an over-long prompt to keep.")
    max_bad_fraction: float = _f(0.1, "Stop before training when more than this share of rows is invalid or dropped.", ge=0.0, le=1.0)
    num_proc: int = _f(1, "Processes used to tokenize.", ge=1)
    group_by_length: bool = _f(True, "Batch pairs of similar length together to cut padding.")


@dataclass
class SimpoConfig:
    beta: float = _f(2.0, "Reward scale: reward = beta * average response log-prob.", gt=0.0)
    gamma_beta_ratio: float = _f(0.5, "Target reward margin divided by beta (gamma = gamma_beta_ratio * beta).", ge=0.0)
    loss_type: Literal["sigmoid", "hinge"] = _f("sigmoid", "Bradley-Terry sigmoid loss or hinge loss.")
    label_smoothing: float = _f(0.0, "Conservative BT label smoothing (sigmoid loss only).", ge=0.0, le=0.5)
    sft_weight: float = _f(0.0, "Weight of an NLL term on the chosen response (0 = pure SimPO).", ge=0.0)
    sft_tokens: Literal["all", "differing"] = _f("all", "Chosen tokens the SFT term covers: all (the official trainer) or only those after the prefix shared with the rejected answer (not in the paper).")
    anchor_weight: float = _f(0.0, "Weight of KL(base || policy) per token on the response tokens chosen and rejected share from their start, base = the model with its LoRA adapters off (0 = pure SimPO; not in the paper).", ge=0.0)
    logp_chunk_tokens: int = _f(256, "Response tokens projected through the output head at a time (256: 0.19x TRL's step peak at the same speed as 1024, see README).", ge=1)
    pack_prompt: bool = _f(False, "One row per pair, [prompt | chosen | rejected], so the prompt runs through the decoder once (needs sdpa or eager attention and no sliding window).")
    pack_tokens: int = _f(0, "With pack_prompt: training micro-batches counted in tokens, train.micro_batch_size rows of up to this many tokens holding as many pairs as fit (first-fit decreasing), so no compute goes to padding; pairs per step then vary, each weighing the same in the loss (0 = micro-batches of train.micro_batch_size pairs, one a row).", ge=0)


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/simpo-lite", "Folder for checkpoints, metrics.jsonl, config.yaml and the final adapter.")
    seed: int = _f(42, "Seed for data order, LoRA init and dropout.", ge=0, le=2**32 - 1)  # numpy's range
    learning_rate: float = _f(1e-5, "Peak learning rate.", gt=0.0)
    num_epochs: float = _f(1.0, "Passes over the training data (ignored when max_steps is set).", gt=0.0)
    max_steps: Optional[int] = _f(None, "Stop after this many optimizer steps (null = num_epochs).", ge=1)
    micro_batch_size: Union[int, Literal["auto"]] = _f(
        2, "Preference pairs per forward pass per process (with simpo.pack_tokens: rows of that many tokens); "
        "auto = the most the memory plan fits on the device, gradient_accumulation_steps then chosen to keep "
        "train.batch_size.", ge=1)
    batch_size: Optional[int] = _f(None, "Pairs per optimizer step per process (micro_batch_size x gradient_accumulation_"
                                         "steps); null = that product, or with micro_batch_size: auto, the micro-batch "
                                         "it replaces x gradient_accumulation_steps.", ge=1)
    memory_budget_gb: Optional[float] = _f(None, "The peak memory (GiB) that auto settings fit the run into. On the CPU "
                                                 "null = half the RAM available when the run starts; on a GPU its free "
                                                 "memory, which also caps a budget set here.", gt=0.0)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", ge=1)
    warmup_ratio: float = _f(0.1, "Share of the steps spent warming the learning rate up.", ge=0.0, lt=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = _f("cosine", "Learning-rate schedule after warmup.")
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0.0)
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this (0 = no clipping).", ge=0.0)
    optimizer: Literal["auto", "adamw", "paged_adamw_8bit"] = _f(
        "auto", "auto = bitsandbytes paged 8-bit AdamW on CUDA, torch AdamW elsewhere.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _f("auto", "accelerate mixed precision; auto follows model.compute_dtype.")
    logging_steps: int = _f(1, "Write a metrics line every this many steps.", ge=1)
    eval_steps: int = _f(50, "Evaluate every this many steps (also at step 0 and at the end).", ge=1)
    eval_batch_size: int = _f(4, "Pairs per evaluation forward pass.", ge=1)
    save_steps: int = _f(100, "Save a checkpoint every this many steps.", ge=1)
    save_total_limit: int = _f(2, "Keep only the newest this many checkpoints.", ge=1)
    on_nonfinite: Literal["stop", "skip"] = _f("stop", "On a NaN/inf loss or gradient: stop the run, or skip the step.")
    health_prompts: int = _f(8, "Held-out prompts answered greedily at every evaluation, measured and written to "
                                "samples.jsonl (0 = off).", ge=0)
    health_max_new_tokens: int = _f(64, "Tokens each health answer may take.", ge=1)
    on_collapse: Literal["warn", "stop"] = _f(
        "warn", "When generation health crosses a collapse_* limit: warn, or save, name the last healthy "
        "checkpoint and stop (exit 1).")
    collapse_looping: float = _f(0.25, "Largest share of health answers that may repeat themselves (word 3-grams "
                                       "repeated over 30%).", ge=0.0, le=1.0)
    collapse_length_ratio: float = _f(2.0, "Largest mean health-answer length, as a multiple of step 0's (at most "
                                            "health_max_new_tokens / step 0's length can be reached).", gt=0.0)
    collapse_recall_drop: float = _f(0.35, "Largest fall since step 0 of health/answer_recall: the share of the pairs' "
                                           "key words (what their chosen and rejected answers both say) the health "
                                           "answers contain.", ge=0.0, le=1.0)
    collapse_logps_drop: float = _f(1.0, "Largest fall of eval logps/chosen since step 0 (nats per token) while "
                                         "logps/rejected falls too.", gt=0.0)
    report_to: list[str] = _f([], "Extra trackers through accelerate: 'tensorboard', 'wandb'.")


@dataclass
class ExportConfig:
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "Precision of the merged weights; auto = the base checkpoint's own (fp32 for the bundled demo model, "
        "bf16 for Llama-3).")
    merge_into: Literal["dequantized", "original"] = _f(
        "dequantized", "What a 4-bit run's adapter is merged into: the NF4 weights it trained on, dequantized to the "
        "export dtype (the export behaves like the trained model), or the base checkpoint's original weights.")
    max_shard_size: str = _f("2GB", "Largest safetensors shard.")
    verify_tolerance: Optional[float] = _f(
        None, "Largest allowed |merged - (base + adapter)| logit difference; null = 1e-3 for fp32 exports, and for "
        "bf16/fp16 ones a quarter of the adapter's own largest logit change (their rounding loses some of it).", gt=0.0)
    hub_private: bool = _f(False, "Create the Hub repository as private when pushing.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    simpo: SimpoConfig = field(default_factory=SimpoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig,
            "simpo": SimpoConfig, "train": TrainConfig, "export": ExportConfig}
DEFAULT_PRESET = "smollm2-demo"


def schema() -> dict[str, dict[str, dataclasses.Field]]:
    """Every section's fields, by name."""
    return {name: {f.name: f for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}


def validate_layer(layer: Any, source: str) -> tuple[dict, list[str]]:
    """Check one override layer ({section: {key: value}}); return the valid part and the problems."""
    fields = schema()
    hints = {name: typing.get_type_hints(cls) for name, cls in SECTIONS.items()}
    valid: dict = {}
    problems: list[str] = []
    if layer is None:
        return valid, problems
    if not isinstance(layer, dict):
        return valid, [f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(layer).__name__}"]
    for section, values in layer.items():
        if section not in fields:
            named = setting_named(fields, str(section))
            hint = (f"; '{section}' goes under its section: {named[0].replace('.', ': ', 1)}{named[1]}" if named else
                    suggest(str(section), fields) or f"; sections are {', '.join(fields)}")
            problems.append(f"{source}: unknown section '{section}'{hint}")
            continue
        if not isinstance(values, dict):
            problems.append(f"{source}: section '{section}' must be a mapping of key: value")
            continue
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if key not in fields[section]:
                problems.append(f"{source}: unknown key '{dotted}'{suggest_key(fields, section, str(key))}")
                continue
            tp = hints[section][key]
            ok, value = check_type(value, tp)
            if not ok:
                problems.append(f"{source}: {dotted} must be {type_name(tp)}, got {value!r}")
                continue
            bound_problem = check_bounds(dotted, value, fields[section][key].metadata)
            if bound_problem:
                problems.append(f"{source}: {bound_problem}")
                continue
            valid.setdefault(section, {})[key] = value
    return valid, problems


def parse_set(assignments: list[str]) -> tuple[dict, list[str]]:
    """Turn ``section.key=value`` strings into a layer; values are parsed as YAML scalars/lists."""
    layer: dict = {}
    problems: list[str] = []
    hints = {name: typing.get_type_hints(cls) for name, cls in SECTIONS.items()}
    for item in assignments:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            named = setting_named(schema(), section.strip()) if sep and not dot else None
            hint = (f"did you mean --set {named[0]}={raw if not named[1] else '...'}?{named[1]}" if named
                    else "e.g. --set simpo.beta=2.5")
            problems.append(f"--set {item!r}: expected section.key=value; {hint}")
            continue
        # A string field keeps the text as typed, so `--set model.revision=1234` stays '1234'.
        if section in hints and name in hints[section] and is_str_type(hints[section][name]) and raw not in ("null", "~"):
            value = raw
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as err:
                problems.append(f"--set {item!r}: the value is not valid YAML ({getattr(err, 'problem', err)}); "
                                f"a list is written [a, b]")
                continue
        layer.setdefault(section, {})[name] = value
    return layer, problems


def _merge(base: dict, layer: dict) -> None:
    for section, values in layer.items():
        base.setdefault(section, {}).update(values)


def _cross_checks(cfg: Config) -> list[str]:
    """Combinations that are individually valid but together wrong."""
    problems = []
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        problems.append(f"data.max_prompt_length ({cfg.data.max_prompt_length}) must be smaller than "
                        f"data.max_length ({cfg.data.max_length}) to leave room for the response")
    if cfg.simpo.loss_type == "hinge" and cfg.simpo.label_smoothing > 0:
        # The reference trainer ignores label smoothing for the hinge loss with a warning; do the same.
        warnings.warn("simpo.label_smoothing is ignored with simpo.loss_type=hinge", stacklevel=2)
    if cfg.simpo.pack_tokens and not cfg.simpo.pack_prompt:
        problems.append(f"simpo.pack_tokens={cfg.simpo.pack_tokens} packs several [prompt | chosen | rejected] pairs "
                        "per row, which needs simpo.pack_prompt=true: set it, or simpo.pack_tokens=0")
    if cfg.simpo.anchor_weight > 0 and cfg.simpo.pack_prompt:
        problems.append("simpo.anchor_weight > 0 does not work with simpo.pack_prompt=true yet: "
                        "set simpo.pack_prompt=false or simpo.anchor_weight=0")
    if cfg.simpo.sft_tokens == "differing" and cfg.simpo.pack_prompt:
        problems.append("simpo.sft_tokens=differing does not work with simpo.pack_prompt=true yet: "
                        "set simpo.pack_prompt=false or simpo.sft_tokens=all")
    if cfg.simpo.sft_tokens == "differing" and cfg.simpo.sft_weight == 0:
        problems.append("simpo.sft_tokens=differing chooses the tokens of the SFT term, which simpo.sft_weight=0 "
                        "turns off: set simpo.sft_weight > 0 or leave simpo.sft_tokens=all")
    t = cfg.train
    if isinstance(t.micro_batch_size, int) and t.batch_size is not None and t.batch_size != t.micro_batch_size * t.gradient_accumulation_steps:
        problems.append(f"train.batch_size ({t.batch_size}) must equal train.micro_batch_size x train.gradient_"
                        f"accumulation_steps ({t.micro_batch_size} x {t.gradient_accumulation_steps}), or leave it null")
    unknown_trackers = [t for t in cfg.train.report_to if t not in ("tensorboard", "wandb")]
    for t in unknown_trackers:
        problems.append(f"train.report_to: unknown tracker '{t}'{suggest(t, ['tensorboard', 'wandb'])}")
    return problems


def _keep_effective_batch(train: dict, replaced_micro: Any) -> None:
    """micro_batch_size: auto keeps the effective batch of the micro-batch it replaced (a preset's)."""
    if train.get("micro_batch_size") == "auto" and train.get("batch_size") is None and isinstance(replaced_micro, int):
        train["batch_size"] = replaced_micro * train.get("gradient_accumulation_steps", TrainConfig.gradient_accumulation_steps)


def build_config(layers: list[tuple[str, Any]]) -> Config:
    """Validate and apply the layers in order over the defaults; raise ConfigError with every problem."""
    merged: dict = {}
    problems: list[str] = []
    micro = TrainConfig.micro_batch_size  # the last integer micro-batch of the layers
    for source, layer in layers:
        valid, layer_problems = validate_layer(layer, source)
        problems += layer_problems
        _merge(merged, valid)
        if isinstance(merged.get("train", {}).get("micro_batch_size"), int):
            micro = merged["train"]["micro_batch_size"]
    if problems:  # the checks across keys below would read defaults in place of the refused values
        raise ConfigError(problems)
    _keep_effective_batch(merged.setdefault("train", {}), micro)
    cfg = Config(**{name: cls(**merged.get(name, {})) for name, cls in SECTIONS.items()})
    problems = _cross_checks(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


# ---- presets ---------------------------------------------------------------------------------

def presets_dir() -> Path:
    """The presets shipped in the wheel (simpo_lite/presets), or the checkout's top-level presets/."""
    package = Path(__file__).resolve().parent
    shipped = package / "presets"
    return shipped if shipped.is_dir() else package.parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = presets_dir() / f"{name}.yaml"
    if not path.is_file():
        names = preset_names()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else "see 'simpo-lite presets list'"
        if name.endswith((".yaml", ".yml")) or "/" in name:
            hint = f"a preset is a name from 'simpo-lite presets list'; for a file of settings use --config {name}"
        raise UserError(f"unknown preset '{name}': {hint}")
    return path


def read_yaml(path: Path, what: str) -> Any:
    if path.is_dir():
        inside = path / "config.yaml"
        hint = f"did you mean '{inside}'?" if inside.is_file() else "give the path of a .yaml file"
        raise UserError(f"{what} '{path}' is a folder; {hint}")
    if not path.is_file():
        raise UserError(missing_path(str(path), what))
    try:
        return yaml.safe_load(read_text(path, f"a {what} is YAML text"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{what} '{path}' is not valid YAML{where}: {getattr(err, 'problem', err)}") from None


def resolve(preset: str | None = None, config_file: str | Path | None = None, flags: dict | None = None,
            sets: list[str] | None = None, saved: str | Path | None = None) -> Config:
    """The one way settings are layered, for every command:

    defaults < a run's saved config.yaml (``saved``: eval, generate and export of a run) < preset
    < config file < first-class flags < --set. Every problem of every layer is reported at once.
    """
    layers: list[tuple[str, Any]] = []
    if saved:
        layers.append((str(saved), read_yaml(Path(saved), "run config")))
    if preset:
        layers.append((f"preset {preset}", read_yaml(preset_path(preset), "preset")))
    if config_file:
        layers.append((str(config_file), read_yaml(Path(config_file), "config file")))
    if flags:
        layers.append(("command-line flags", flags))
    set_layer, set_problems = parse_set(sets or [])
    layers.append(("--set", set_layer))
    try:
        cfg = build_config(layers)
    except ConfigError as err:
        raise ConfigError(set_problems + err.problems) from None
    if set_problems:
        raise ConfigError(set_problems)
    return cfg


def save_config(cfg: Config, path: Path, note: str = "", sections: tuple[str, ...] | None = None) -> None:
    """Write the resolved config atomically; it reproduces the run with ``--config``. `note`: a comment
    line under the header (what `auto` settings became); `sections`: only these (default: all)."""
    # The run's own config.yaml, whatever `path` is: a checkpoint's copy is written in a temporary folder,
    # an export's copy has another name.
    run = Path(cfg.train.output_dir)
    write_text(path, f"# Resolved simpo-lite config; repeat the run with: simpo-lite train --config {run / 'config.yaml'} "
               f"--output-dir {run}-again\n# (or continue it with --resume)\n" + (f"# {note}\n" if note else "")
               + yaml.safe_dump({name: values for name, values in cfg.to_dict().items()
                                 if sections is None or name in sections}, sort_keys=False))


def load_saved_config(path: Path) -> Config:
    return resolve(saved=path)
