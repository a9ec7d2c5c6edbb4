"""The run folder: what a training run writes, how to find its checkpoints, and how a run resumes.

    <output_dir>/
      config.yaml        the resolved config (``simpo-lite train --config`` it to reproduce the run)
      metrics.jsonl      one JSON line per logged step and per evaluation (generation health included)
      samples.jsonl      what the model wrote at each evaluation: {step, prompt, output}
      checkpoint-N/      adapter (safetensors), optimizer.pt, scheduler.pt, rng_state_<rank>.pt,
                         trainer_state.json (step and data position), config.yaml
      adapter/           the final LoRA adapter and tokenizer
      summary.json       start and end evaluation, steps, time, peak memory

Every folder is written to a temporary folder and renamed, every file through a temporary file, so a
crash or a full disk leaves the previous checkpoint intact. Tensors and plain containers only go
through ``torch.save``; loading uses ``weights_only=True``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from simpo_lite import sharding
from simpo_lite.config import Config, load_saved_config, save_config
from simpo_lite.errors import UserError
from simpo_lite.files import write_folder, write_json

CONFIG, METRICS, SAMPLES = "config.yaml", "metrics.jsonl", "samples.jsonl"
ADAPTER, SUMMARY = "adapter", "summary.json"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What --overwrite removes: everything a run writes, the temporary folders of interrupted writes included.
ARTIFACTS = ("checkpoint-*", ADAPTER, METRICS, SAMPLES, CONFIG, SUMMARY, ".checkpoint-*", f".{ADAPTER}.tmp-*")


def check_output_dir(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder unless the user says which they want."""
    if resume or not output_dir.exists() or not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise UserError(f"output dir '{output_dir}' already holds files: continue that run with --resume, "
                        f"start afresh with --overwrite, or choose another --output-dir")
    for pattern in ARTIFACTS:
        for path in output_dir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


# ---- what reads a run: eval, generate, export, report ----------------------------------------

def run_kind(path: Path) -> tuple[str, Path, Path] | None:
    """('run' or 'checkpoint', its config.yaml, its adapter folder); None when `path` is neither.

    A run folder without its final adapter has not finished: that is a UserError naming the way on.
    """
    if not (path / CONFIG).is_file():
        return None
    if (path / ADAPTER / "adapter_config.json").is_file():
        return "run", path / CONFIG, path / ADAPTER
    if (path / "adapter_config.json").is_file():
        return "checkpoint", path / CONFIG, path
    raise UserError(f"'{path}' has a config.yaml but no adapter/: the run has not finished; use one of its "
                    f"checkpoint-N folders, or finish it with: simpo-lite train --config {path / CONFIG} --resume")


def finished_run(run: Path) -> Path:
    """`run` if it is a finished run folder (config.yaml and the final adapter); else a UserError."""
    if not run.is_dir():
        raise UserError(f"run folder '{run}' not found: give the output_dir of a 'simpo-lite train' run")
    if not (run / CONFIG).is_file():
        raise UserError(f"'{run}' has no config.yaml, so it is not a simpo-lite run folder: "
                        f"give the output_dir of a 'simpo-lite train' run")
    if not (run / ADAPTER / "adapter_config.json").is_file():
        raise UserError(f"'{run}' has no trained adapter (adapter/adapter_config.json): finish or resume the run "
                        f"with 'simpo-lite train --config {run / CONFIG} --resume'")
    return run


def read_summary(run: Path) -> dict | None:
    path = Path(run) / SUMMARY
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def write_summary(run: Path, summary: dict) -> dict:
    write_json(Path(run) / SUMMARY, summary)
    return summary


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; a half-written last line (a run still writing, or killed) is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path} line {n} is not JSON: fix or delete that line") from None
    return records


class JsonLines:
    """metrics.jsonl or samples.jsonl: appends one JSON object per line; on resume, drops the lines
    written after the checkpoint."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.is_file():
            # Lines after the checkpoint come back on resume; an eval at its step ran before the save
            # and does not run again.
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


# ---- checkpoints --------------------------------------------------------------------------------

@dataclass
class TrainerState:
    step: int                 # optimizer steps completed
    epoch: int                # epoch the next micro-batch comes from
    batch_in_epoch: int       # micro-batches of that epoch already consumed (all processes together)
    skipped_steps: int = 0    # steps dropped by the non-finite guard


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             # numpy's state holds an ndarray, which weights_only loading refuses: keep it as a list.
             "numpy": _numpy_state_to_plain(np.random.get_state())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_plain(state: tuple) -> list:
    name, keys, pos, has_gauss, gauss = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _numpy_state_from_plain(state: list) -> tuple:
    name, keys, pos, has_gauss, gauss = state
    return name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in the run folder, oldest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def save_checkpoint(output_dir: Path, model, optimizer_state: dict, scheduler, state: TrainerState, cfg: Config,
                    rng_states: list[dict], keep: int, adapter_state: dict | None = None,
                    protect: Path | None = None) -> Path:
    """Write checkpoint-<step> atomically, then drop the oldest beyond `keep` (never `protect`: the
    last checkpoint saved while the run was healthy).

    rng_states: one per process (gathered by the caller), so every process resumes its own stream.
    optimizer_state, adapter_state: see simpo_lite.sharding (whole even when the live ones are sharded).
    """
    def fill(tmp: Path) -> None:
        sharding.save_adapter(model, tmp, adapter_state)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for rank, rng in enumerate(rng_states):
            torch.save(rng, tmp / f"rng_state_{rank}.pt")
        save_config(cfg, tmp / CONFIG)
        (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2))

    path = write_folder(Path(output_dir) / f"checkpoint-{state.step}", fill)
    for old in checkpoints(output_dir)[:-keep]:
        if protect is None or old.resolve() != Path(protect).resolve():
            shutil.rmtree(old, ignore_errors=True)
    return path


def save_final_adapter(output_dir: Path, model, tokenizer, adapter_state: dict | None = None) -> Path:
    """adapter/: the LoRA adapter as peft saves it, with the tokenizer the run trained with."""
    def fill(tmp: Path) -> None:
        sharding.save_adapter(model, tmp, adapter_state)
        tokenizer.save_pretrained(tmp)

    return write_folder(Path(output_dir) / ADAPTER, fill)


def _load_torch(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- resume, in the order a resumed run does it ---------------------------------------------

def find_checkpoint(output_dir: Path, resume: str) -> Path:
    """'latest' means the newest complete checkpoint in output_dir; anything else is a folder path."""
    if resume == "latest":
        found = checkpoints(output_dir)
        if not found:
            raise UserError(f"--resume: no checkpoint in '{output_dir}'; start without --resume or give a checkpoint folder")
        return found[-1]
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise UserError(f"--resume: '{resume}' is not a simpo-lite checkpoint (no {TRAINER_STATE}); "
                        f"use 'latest' or a checkpoint-N folder")
    return path


def warn_config_drift(cfg: Config, checkpoint: Path) -> None:
    saved = load_saved_config(checkpoint / CONFIG).to_dict()
    now = cfg.to_dict()
    changed = [f"{section}.{key}" for section in now for key in now[section]
               if now[section][key] != saved[section][key] and key not in ("max_steps", "output_dir")]
    if changed:
        warnings.warn(f"resuming {checkpoint} with settings that differ from its saved config: "
                      f"{', '.join(changed)}", stacklevel=2)


def load_adapter_weights(model, checkpoint: Path) -> None:
    """The checkpoint's adapter into the fresh peft model, before any wrapping (FSDP shards it after)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    file = checkpoint / "adapter_model.safetensors"
    if not file.is_file():
        raise UserError(f"--resume: {checkpoint} has no adapter_model.safetensors; it is not a complete checkpoint")
    saved = load_file(str(file))
    # A file without some of the adapter's weights would load "successfully" and silently restart them.
    missing = set(get_peft_model_state_dict(model)) - set(saved)
    result = set_peft_model_state_dict(model, saved)
    if missing or getattr(result, "unexpected_keys", None):
        raise UserError(f"--resume: adapter weights in {checkpoint} do not fit this model/LoRA config "
                        f"({len(missing)} missing, {len(getattr(result, 'unexpected_keys', []))} unexpected)")


def restore_training_state(checkpoint: Path, acc, policy, optimizer, scheduler) -> tuple[TrainerState, dict]:
    """Optimizer and scheduler state into the prepared objects; (data position, this process's RNG state)."""
    sharding.load_optimizer_state(acc, policy, optimizer, _load_torch(checkpoint / "optimizer.pt"), checkpoint)
    scheduler.load_state_dict(_load_torch(checkpoint / "scheduler.pt"))
    state = TrainerState(**json.loads((checkpoint / TRAINER_STATE).read_text()))
    rng_file = checkpoint / f"rng_state_{acc.process_index}.pt"
    if not rng_file.is_file():
        raise UserError(f"--resume: {checkpoint} was written by fewer processes than this run has "
                        f"({acc.num_processes}); resume with the same number of processes")
    return state, _load_torch(rng_file)
