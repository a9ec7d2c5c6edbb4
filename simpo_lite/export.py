"""`simpo-lite export`: merge a run's LoRA adapters into full-precision weights, check the merge, save, push.

The adapters are merged into the base reloaded in the export precision, never into the 4-bit weights the
run trained on: merging into NF4 would re-quantize the sum and lose most of a small fine-tune.
Everything is built in a temporary folder next to the target and renamed at the end, so a failed export
leaves no folder that looks complete (and, with --overwrite, the previous export untouched).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from simpo_lite import hub, run_folder
from simpo_lite.config import Config, resolve
from simpo_lite.errors import UserError
from simpo_lite.console import result_line
from simpo_lite.files import check_output_path, folder_size, write_folder


RESUME_ONLY = ("optimizer.pt", "scheduler.pt", run_folder.TRAINER_STATE, run_folder.CONFIG)


@dataclass
class ExportResult:
    out: Path
    adapter_only: bool
    dtype: str | None = None
    merge_diff: float | None = None      # max |logit| of the export vs base+adapter, same precision, fp32 compute
    adapter_effect: float | None = None  # max |logit| of base+adapter vs the base alone: the scale of merge_diff
    trained_diff: float | None = None    # max |logit| of the export vs the model the run trained (information)
    trained_kind: str | None = None
    trained_top1: float | None = None    # share of positions where both pick the same most likely token
    greedy_agreement: float | None = None  # share of the trained model's greedy tokens the export repeats
    merge_into: str | None = None        # "dequantized" (the NF4 weights trained on) or "original"
    sample_prompt: str | None = None
    sample: str | None = None
    seconds: float = 0.0
    hub_repo: str | None = None
    hub_url: str | None = None
    format: str = "safetensors"
    gguf: dict | None = None             # the GGUF file and its checks by transformers and llama.cpp (gguf_verify)


def export_run(run_dir: Path, out: Path | None = None, dtype: str | None = None, adapter_only: bool = False,
               push_to_hub: str | None = None, private: bool = False, force: bool = False,
               sets: list[str] | None = None, format: str = "safetensors", quant: str | None = None) -> ExportResult:
    """Export a run folder or one of its checkpoint-N folders (merged model, GGUF file or adapter alone) to
    `out`, optionally uploading it to the Hub."""
    started = time.perf_counter()
    quant = _check_format(format, quant, adapter_only)
    if private and not push_to_hub:
        raise UserError("--private makes the Hub repository of --push-to-hub private: add --push-to-hub USER/NAME, "
                        "or leave --private out")
    run = Path(run_dir)
    kind, config, adapter = run_folder.finished_run(run)
    name = run_folder.label(run, kind)
    cfg = resolve(saved=config, sets=sets or [])
    made = "adapter_only" if adapter_only else "gguf" if quant else "merged"
    default = default_out(run, kind, run_folder.EXPORTS[made])
    target = Path(out) if out else default
    check_target(target, run, kind, adapter, cfg, force, default)
    if quant:
        from simpo_lite.gguf_export import check_request

        check_request(quant, adapter, cfg)
    dtype_given = dtype is not None
    dtype = _dtype_name(dtype or cfg.export.dtype, cfg)
    # Fail on a missing token or an unreachable Hub now, not after minutes of merging.
    token = hub.check_push_access(push_to_hub) if push_to_hub else None
    result = ExportResult(out=target, adapter_only=adapter_only, dtype=None if adapter_only else dtype,
                          hub_repo=push_to_hub, format=format)
    summary = run_folder.read_summary(run)  # of a checkpoint: the evaluations up to its step
    kept = f"{target} is as it was before" if target.exists() else f"no {target} was made"
    hint = f"free some space there (or choose another --out) and run the export again; {kept}"
    if adapter_only:
        if dtype_given:
            _say(f"--dtype {dtype} has no effect with --adapter-only: the adapter keeps its trained weights.")
        write_folder(target, lambda tmp: _fill_adapter_only(tmp, adapter, cfg, summary, result),
                     what="the adapter export", estimate=folder_size(adapter / "adapter_model.safetensors"), hint=hint)
    elif quant:
        from simpo_lite.gguf_export import fill_gguf

        write_folder(target, lambda tmp: fill_gguf(tmp, adapter, name, cfg, dtype, quant, summary, result, say=_say),
                     what="the GGUF export", hint=hint)
    else:
        from simpo_lite.merge import fill_merged

        write_folder(target, lambda tmp: fill_merged(tmp, adapter, cfg, dtype, summary, result, say=_say),
                     what="the merged export", hint=hint)
    # The result goes to stdout once the export is whole (OUT=$(simpo-lite export RUN) keeps it); the
    # steps that led there went to stderr.
    for line in result_lines(result, cfg):
        result_line(line)
    if push_to_hub:
        result.hub_url = hub.push_folder(target, push_to_hub, token, private=private or cfg.export.hub_private,
                                         message=f"simpo-lite export of {name}")
        result_line(f"pushed to {result.hub_url}")
    result.seconds = time.perf_counter() - started
    _say(f"done in {result.seconds:.1f} s")
    return result


def default_out(run: Path, kind: str, what: str) -> Path:
    """RUN/merged for a run; RUN/merged-checkpoint-N beside it for a checkpoint, so exporting a checkpoint
    never replaces the run's own export (nor lands inside the checkpoint, which the export reads)."""
    return run / what if kind == "run" else run.parent / f"{what}-{run.name}"


def result_lines(result: ExportResult, cfg: Config) -> list[str]:
    """What the export made and how its checks came out."""
    lines = [f"exported to {result.out}"]
    if result.adapter_only:
        return lines
    from simpo_lite.merge import check_lines

    lines += check_lines(result, cfg)
    if result.gguf:
        from simpo_lite.gguf_verify import check_lines as gguf_lines

        lines += gguf_lines(result.gguf)
    return lines


def _check_format(format: str, quant: str | None, adapter_only: bool) -> str | None:
    """The GGUF quant type (q8_0 when --quant is not given), or None for the safetensors export."""
    if format not in ("safetensors", "gguf"):
        raise UserError(f"--format '{format}' is not supported: use safetensors (the default) or gguf")
    if format != "gguf":
        if quant is not None:
            raise UserError(f"--quant {quant} applies to GGUF files only: add --format gguf")
        return None
    if adapter_only:
        raise UserError("--format gguf holds the merged model, not an adapter: drop --adapter-only")
    return quant or "q8_0"


def _dtype_name(name: str, cfg: Config) -> str:
    if name == "auto":
        return _stored_dtype(cfg)
    from simpo_lite.model import DTYPES

    if name not in DTYPES:
        raise UserError(f"--dtype '{name}' is not supported: use one of auto, {', '.join(DTYPES)}")
    return name


def _stored_dtype(cfg: Config) -> str:
    """The precision the base checkpoint was published in: merging into it loses nothing the base had."""
    from transformers import AutoConfig

    from simpo_lite.model_source import resolve_model_source

    source = resolve_model_source(cfg.model.name_or_path, revision=cfg.model.revision)
    try:
        base = AutoConfig.from_pretrained(source, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return "bf16"
    stored = str(getattr(base, "dtype", None) or getattr(base, "torch_dtype", None) or "bfloat16")
    return {"float32": "fp32", "float16": "fp16"}.get(stored.removeprefix("torch."), "bf16")


def check_target(target: Path, run: Path, kind: str, adapter: Path, cfg: Config, force: bool,
                 default: Path) -> None:
    """Refuse a non-empty target without --force, any target whose replacement would destroy inputs or
    the run's checkpoints, and one that cannot be written, all before any work."""
    resolved = target.resolve()
    root = (run if kind == "run" else run.parent).resolve()
    if resolved == root or root.is_relative_to(resolved):
        raise UserError(f"--out '{target}' is or contains the run folder '{root}': choose another folder, "
                        f"e.g. --out {default}")
    kept = [adapter.resolve(), root / run_folder.ADAPTER, *run_folder.checkpoints(root)] + _local_base_folder(cfg)
    for keep in kept:
        keep = keep.resolve()
        if resolved.is_relative_to(keep) or keep.is_relative_to(resolved):
            raise UserError(f"--out '{target}' overlaps '{keep}', which the export reads or the run keeps: "
                            f"choose another folder, e.g. --out {default}")
    check_output_path(target, folder=True)
    if target.is_dir() and any(target.iterdir()) and not force:
        raise UserError(f"--out '{target}' is not empty: add --overwrite to replace it, or choose another folder")


def _local_base_folder(cfg: Config) -> list[Path]:
    path = Path(cfg.model.name_or_path)
    return [path.resolve()] if path.is_dir() else []


def _fill_adapter_only(tmp: Path, adapter: Path, cfg: Config, summary: dict | None, result: ExportResult) -> None:
    """The adapter as trained (safetensors), the tokenizer, and a card; base_model points at the Hub id."""
    for item in adapter.iterdir():
        # A checkpoint also holds the optimizer, RNG and trainer state: resuming needs them, peft does not.
        if item.is_file() and item.name not in RESUME_ONLY and not item.name.startswith("rng_state_"):
            shutil.copy2(item, tmp / item.name)
    if not (tmp / "tokenizer_config.json").is_file():  # a checkpoint saves no tokenizer: the run's is the base's
        from simpo_lite.model import load_run_tokenizer

        load_run_tokenizer(cfg, adapter).save_pretrained(tmp)
    hub.rewrite_adapter_base(tmp / "adapter_config.json", cfg.model.name_or_path)
    hub.write_model_card(tmp, cfg, summary, result)


def _say(message: str) -> None:
    from simpo_lite.console import info

    info(message)
