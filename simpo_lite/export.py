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
from simpo_lite.files import write_folder


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


def export_run(run_dir: Path, out: Path | None = None, dtype: str | None = None, adapter_only: bool = False,
               push_to_hub: str | None = None, private: bool = False, force: bool = False,
               sets: list[str] | None = None) -> ExportResult:
    """Export a run folder (merged model or adapter alone) to `out`, optionally uploading it to the Hub."""
    started = time.perf_counter()
    run = run_folder.finished_run(Path(run_dir))
    cfg = resolve(saved=run / run_folder.CONFIG, sets=sets or [])
    dtype_given = dtype is not None
    dtype = _dtype_name(dtype or cfg.export.dtype, cfg)
    target = Path(out) if out else run / ("adapter-export" if adapter_only else "merged")
    check_target(target, run, cfg, force)
    # Fail on a missing token or an unreachable Hub now, not after minutes of merging.
    token = hub.check_push_access(push_to_hub) if push_to_hub else None
    result = ExportResult(out=target, adapter_only=adapter_only, dtype=None if adapter_only else dtype,
                          hub_repo=push_to_hub)
    summary = run_folder.read_summary(run)
    if adapter_only:
        if dtype_given:
            _say(f"--dtype {dtype} has no effect with --adapter-only: the adapter keeps its trained weights.")
        write_folder(target, lambda tmp: _fill_adapter_only(tmp, run, cfg, summary, result))
    else:
        from simpo_lite.merge import fill_merged

        write_folder(target, lambda tmp: fill_merged(tmp, run, cfg, dtype, summary, result, say=_say))
    _say(f"exported to {target}")
    if push_to_hub:
        result.hub_url = hub.push_folder(target, push_to_hub, token, private=private or cfg.export.hub_private,
                                         message=f"simpo-lite export of {run.name}")
        _say(f"pushed to {result.hub_url}")
    result.seconds = time.perf_counter() - started
    _say(f"done in {result.seconds:.1f} s")
    return result


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

    from simpo_lite.model import resolve_model_source

    try:
        base = AutoConfig.from_pretrained(resolve_model_source(cfg.model.name_or_path), revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return "bf16"
    stored = str(getattr(base, "dtype", None) or getattr(base, "torch_dtype", None) or "bfloat16")
    return {"float32": "fp32", "float16": "fp16"}.get(stored.removeprefix("torch."), "bf16")


def check_target(target: Path, run: Path, cfg: Config, force: bool) -> None:
    """Refuse a non-empty target without --force, and any target whose replacement would destroy inputs."""
    resolved = target.resolve()
    run_resolved = run.resolve()
    if resolved == run_resolved or run_resolved.is_relative_to(resolved):
        raise UserError(f"--out '{target}' is or contains the run folder '{run}': choose another folder, "
                        f"e.g. --out {run / 'merged'}")
    inputs = [run_resolved / run_folder.ADAPTER] + _local_base_folder(cfg)
    for keep in inputs:
        if resolved.is_relative_to(keep) or keep.is_relative_to(resolved):
            raise UserError(f"--out '{target}' overlaps '{keep}', which the export reads: choose another folder")
    if target.exists() and not target.is_dir():
        raise UserError(f"--out '{target}' is a file: choose a folder path")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise UserError(f"--out '{target}' is not empty: add --overwrite to replace it, or choose another folder")


def _local_base_folder(cfg: Config) -> list[Path]:
    path = Path(cfg.model.name_or_path)
    return [path.resolve()] if path.is_dir() else []


def _fill_adapter_only(tmp: Path, run: Path, cfg: Config, summary: dict | None, result: ExportResult) -> None:
    """The adapter as trained (safetensors), the tokenizer, and a card; base_model points at the Hub id."""
    adapter = run / run_folder.ADAPTER
    for item in adapter.iterdir():
        if item.is_file():
            shutil.copy2(item, tmp / item.name)
    hub.rewrite_adapter_base(tmp / "adapter_config.json", cfg.model.name_or_path)
    hub.write_model_card(tmp, cfg, summary, result)


def _say(message: str) -> None:
    from simpo_lite.console import info

    info(message)
