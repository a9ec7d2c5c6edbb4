"""The run folder: what a training run writes, how to find its checkpoints, and how a run resumes.

    <output_dir>/
      config.yaml        the resolved config (``simpo-lite train --config`` it to reproduce the run)
      metrics.jsonl      one JSON line per logged step and per evaluation (generation health included)
      samples.jsonl      what the model wrote at each evaluation: {step, prompt, output}
      checkpoint-N/      every train.save_steps and at the last step: adapter (safetensors), optimizer.pt,
                         scheduler.pt, rng_state_<rank>.pt, trainer_state.json (step and data position), config.yaml
      adapter/           the final LoRA adapter and tokenizer
      summary.json       start and end evaluation, steps, time, peak memory

Every folder is written to a temporary folder and renamed, every file through a temporary file
(simpo_lite.files), so a crash or a full disk leaves the previous checkpoint intact, and a full disk is
one line naming the intact checkpoint and the resume command (`way_forward`). Tensors and plain
containers only go through ``torch.save``; loading uses ``weights_only=True``.

`checkpoint_problem` checks a checkpoint's files before a resume (simpo_lite.resume) uses it.
"""

from __future__ import annotations

import functools
import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from simpo_lite import sharding
from simpo_lite.config import Config, save_config
from simpo_lite.errors import DiskFull, UserError
from simpo_lite.files import (append_line, check_safetensors, check_torch_file, folder_size, missing_path, read_text,
                              write_folder, write_json, write_text)

CONFIG, METRICS, SAMPLES = "config.yaml", "metrics.jsonl", "samples.jsonl"
ADAPTER, SUMMARY = "adapter", "summary.json"
# In a merged export: the run's resolved config, so eval and chat of the export take the run's data split
# and SimPO settings (kept out of Hub uploads: it holds local paths).
EXPORT_CONFIG = "simpo-lite-run.yaml"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                    "rng_state_0.pt", TRAINER_STATE, CONFIG)
# What a run and the commands that read it write into its folder: --overwrite removes all of it (an old
# export or report beside a new run would describe a model that no longer exists), the temporary files and
# folders of interrupted writes included, and nothing else (a user's own files stay).
EXPORTS = {"merged": "merged", "gguf": "gguf", "adapter_only": "adapter-export"}
REPORT = "report.png"
TRACKERS = "simpo-lite"  # accelerate's TensorBoard logs: <project_dir>/<project name>
ARTIFACTS = ("checkpoint-*", ".checkpoint-*", ADAPTER, METRICS, SAMPLES, CONFIG, SUMMARY, REPORT, TRACKERS,
             *EXPORTS.values(), *(f"{name}-checkpoint-*" for name in EXPORTS.values()),  # a checkpoint's export
             ".*.tmp", ".*.tmp-*", ".*.old")


def check_output_dir(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse, before anything loads, an output dir that cannot be one, and a folder holding another run
    unless the user says which they want. Nothing is deleted here: `clear_run` does that once the new run
    has its data and model, so a typo in the command costs nothing."""
    for folder in (output_dir, *output_dir.parents):
        if folder.exists() and not folder.is_dir():
            inside = "" if folder == output_dir else f", so '{output_dir}' cannot be made inside it"
            raise UserError(f"output dir: '{folder}' is a file, not a folder{inside}; choose another --output-dir")
        if folder.exists():
            break
    if resume or overwrite or not output_dir.exists() or not any(output_dir.iterdir()):
        return
    raise UserError(f"output dir '{output_dir}' already holds {what_it_holds(output_dir)}")


def what_it_holds(output_dir: Path) -> str:
    """The run in a non-empty folder and the ways on; --resume only where there is a checkpoint to resume."""
    intact = newest_intact(output_dir)
    finished = finished_step(output_dir)
    if intact is not None:
        step = checkpoint_step(intact)
        if finished is not None and finished <= step:
            return (f"a finished run ({finished} steps): train it longer with --resume --max-steps N (N above "
                    f"{finished}), start afresh with --overwrite, or choose another --output-dir")
        return (f"a run with a checkpoint at step {step}: continue it with --resume, start afresh with "
                f"--overwrite, or choose another --output-dir")
    if finished is not None:
        what = f"a finished run ({finished} steps) with no checkpoint to resume from"
    elif checkpoints(output_dir):
        what = "a run whose checkpoints are all damaged"
    elif (output_dir / CONFIG).is_file():
        what = "a run that stopped before its first checkpoint"
    else:
        what = "files but no checkpoint to resume from"
    return f"{what}: start afresh with --overwrite (which deletes it) or choose another --output-dir"


def clear_run(output_dir: Path) -> None:
    """--overwrite: remove the previous run's ARTIFACTS, just before the new run first writes."""
    for pattern in ARTIFACTS:
        for path in output_dir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def finished_step(output_dir: Path) -> int | None:
    """The step of the run's final adapter, if the folder holds a run that finished; else None."""
    summary = read_summary(output_dir)
    if not (Path(output_dir) / ADAPTER / "adapter_config.json").is_file() or not summary or "stopped" in summary:
        return None
    return summary.get("steps")


# ---- what reads a run: eval, generate, export, report ----------------------------------------

def run_kind(path: Path) -> tuple[str, Path, Path] | None:
    """('run' or 'checkpoint', its config.yaml, its adapter folder); None when `path` is neither.

    A run folder without its final adapter has not finished: that is a UserError naming the way on.
    """
    if not (path / CONFIG).is_file():
        return None
    if (path / ADAPTER / "adapter_config.json").is_file():
        return "run", path / CONFIG, check_adapter(path / ADAPTER)
    if (path / "adapter_config.json").is_file():
        return "checkpoint", path / CONFIG, check_adapter(path)
    if CHECKPOINT_RE.match(path.name):
        raise UserError(f"checkpoint '{path}' has no adapter_config.json, so its adapter cannot be used: "
                        f"use another checkpoint-N folder of the run")
    if newest_intact(path) is None:
        raise UserError(f"'{path}' has a config.yaml but no adapter/ and no checkpoint: the run stopped before its "
                        f"first one, so there is no trained adapter to use; train it again with --overwrite")
    raise UserError(f"'{path}' has a config.yaml but no adapter/: the run has not finished; use one of its "
                    f"checkpoint-N folders, or finish it with: simpo-lite train --config {path / CONFIG} --resume")


def finished_run(path: Path) -> tuple[str, Path, Path]:
    """run_kind of a finished run folder or one of its checkpoint-N folders (a collapse stop names the
    last healthy one); else a UserError naming the way on."""
    if not path.is_dir():
        raise UserError(missing_path(str(path), "run folder", "give the output_dir of a 'simpo-lite train' run"))
    found = run_kind(path)
    if found is None:
        raise UserError(f"'{path}' has no config.yaml, so it is neither a simpo-lite run folder nor one of its "
                        f"checkpoint-N folders: give the output_dir of a 'simpo-lite train' run")
    return found


def label(path: Path, kind: str) -> str:
    """A short name for what a run or checkpoint folder holds: 'demo', or 'demo-checkpoint-4'."""
    path = Path(path).resolve()
    return f"{path.parent.name}-{path.name}" if kind == "checkpoint" else path.name


def check_adapter(folder: Path) -> Path:
    """`folder` if its adapter weights are whole; else a UserError naming the file and the way on."""
    problem = check_safetensors(folder / "adapter_model.safetensors")
    if problem:
        raise UserError(f"adapter in '{folder}' cannot be used: {problem}; use one of the run's checkpoint-N "
                        f"folders, or write it again: simpo-lite train --config {folder.parent / CONFIG} --resume")
    return folder


def read_summary(run: Path) -> dict | None:
    """summary.json of a run; of a checkpoint-N folder, its step and the run's evaluations up to it (the
    run's own summary tells how it ended, not what the checkpoint holds)."""
    run = Path(run)
    if CHECKPOINT_RE.match(run.name) and (run / TRAINER_STATE).is_file():
        return _checkpoint_summary(run)
    path = run / SUMMARY
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError: a damaged summary is no summary
        return None


def _checkpoint_summary(checkpoint: Path) -> dict | None:
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
        evals = [r for r in read_metrics(checkpoint.parent / METRICS) if "eval_loss" in r and r["step"] <= state["step"]]
    except (ValueError, KeyError, TypeError, UserError):
        return None
    return {"steps": state["step"], "train_seconds": state.get("train_seconds", 0.0),
            "start_eval": next((r for r in evals if r["step"] == 0), None), "end_eval": evals[-1] if evals else None}


def write_summary(run: Path, summary: dict) -> dict:
    write_json(Path(run) / SUMMARY, summary, what=SUMMARY)
    return summary


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; a half-written last line (a run still writing, or killed) is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    text = read_text(path, "metrics.jsonl holds one JSON object per line")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
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
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept), what=self.path.name)

    def write(self, record: dict) -> None:
        append_line(self.path, json.dumps(record), what=self.path.name)


# ---- checkpoints --------------------------------------------------------------------------------

@dataclass
class TrainerState:
    step: int                 # optimizer steps completed
    epoch: int                # epoch the next micro-batch comes from
    batch_in_epoch: int       # micro-batches of that epoch already consumed (all processes together)
    skipped_steps: int = 0    # steps dropped by the non-finite guard
    train_seconds: float = 0.0  # wall time of the run up to this checkpoint, earlier resumed parts included
    train_pairs: int = 0      # the training pairs the run's batch order is drawn over (0: not recorded)


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

    # What it needs: as much as the last checkpoint took (the same tensors), else the tensors' bytes.
    weights = adapter_state if adapter_state is not None else _peft_state(model)
    earlier = checkpoints(output_dir)
    estimate = max(tensor_bytes([weights, optimizer_state]), folder_size(earlier[-1]) if earlier else 0)
    path = write_folder(Path(output_dir) / f"checkpoint-{state.step}", fill, what=f"checkpoint-{state.step}",
                        estimate=estimate)
    for old in checkpoints(output_dir)[:-keep]:
        if protect is None or old.resolve() != Path(protect).resolve():
            shutil.rmtree(old, ignore_errors=True)
    return path


def save_final_adapter(output_dir: Path, model, tokenizer, adapter_state: dict | None = None) -> Path:
    """adapter/: the LoRA adapter as peft saves it, with the tokenizer the run trained with."""
    def fill(tmp: Path) -> None:
        sharding.save_adapter(model, tmp, adapter_state)
        tokenizer.save_pretrained(tmp)

    weights = adapter_state if adapter_state is not None else _peft_state(model)
    return write_folder(Path(output_dir) / ADAPTER, fill, what="the final adapter", estimate=tensor_bytes(weights))


def _peft_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def tensor_bytes(value) -> int:
    """Bytes of the tensors in nested dicts and lists: about what torch.save / safetensors write."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What makes a checkpoint unusable (a missing, truncated or unreadable file); None when it is whole."""
    checkpoint = Path(checkpoint)
    for name in CHECKPOINT_FILES:
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    problem = check_safetensors(checkpoint / "adapter_model.safetensors")
    for file in sorted(checkpoint.glob("*.pt")):
        problem = problem or check_torch_file(file)
    for name in (TRAINER_STATE, "adapter_config.json"):
        try:
            json.loads((checkpoint / name).read_text(encoding="utf-8"))
        except (ValueError, OSError):
            problem = problem or f"{name} is damaged (not JSON)"
    return problem


def checkpoint_step(checkpoint: Path) -> int:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())["step"]


def newest_intact(output_dir: Path) -> Path | None:
    return next((p for p in reversed(checkpoints(output_dir)) if checkpoint_problem(p) is None), None)


# ---- after a fault, and at the end -------------------------------------------------------------

def way_forward(output_dir: Path) -> str:
    """After a fault in the run folder: which checkpoint is intact and the command that goes on."""
    output_dir = Path(output_dir)
    config = output_dir / CONFIG
    intact = newest_intact(output_dir)
    if intact is not None:
        return (f"{intact} (step {checkpoint_step(intact)}) is intact: free space, then continue with: "
                f"simpo-lite train --config {config} --resume")
    if not config.is_file():
        return "no checkpoint was written yet: free space, then run the same command again"
    return (f"no checkpoint was written yet: free space, then start again with: "
            f"simpo-lite train --config {config} --overwrite")


def names_way_forward(run):
    """Decorates run(cfg, ...): a full disk inside the run folder names the intact checkpoint and the
    command that goes on."""
    @functools.wraps(run)
    def wrapper(cfg: Config, *args, **kwargs):
        try:
            return run(cfg, *args, **kwargs)
        except DiskFull as err:
            output_dir = Path(cfg.train.output_dir).resolve()
            if Path(err.path).resolve().is_relative_to(output_dir):
                err.with_hint(way_forward(Path(cfg.train.output_dir)))
            raise

    return wrapper


def run_summary(output_dir: Path, state: TrainerState, seconds: float, peak_mem_mb: float,
                first_eval: dict | None, last_eval: dict | None, resumed_from: Path | None, limits=None) -> dict:
    """summary.json of a run; a resumed run takes its start from metrics.jsonl and keeps its earlier time.
    With `limits` (the TrainConfig) every health limit crossed, warned of or stopped for, goes in too."""
    from simpo_lite.health import crossed_limits
    evals = [r for r in read_metrics(Path(output_dir) / METRICS) if "eval_loss" in r and r["step"] <= state.step]
    start = first_eval or next((r for r in evals if r["step"] == 0), None)
    # The end is the eval of the last step; an earlier one (a resume that ran no step) is not the end.
    end = last_eval or next((r for r in reversed(evals) if r["step"] == state.step), None)
    crossed = crossed_limits(evals, limits) if limits is not None else []
    return {"steps": state.step, "skipped_steps": state.skipped_steps, "train_seconds": seconds,
            "peak_mem_mb": peak_mem_mb, "start_eval": start, "end_eval": end,
            "resumed_from": str(resumed_from) if resumed_from else None, "health_warnings": crossed}
