"""Checkpoints: written atomically (temporary folder, then rename), loaded without unpickling code.

A checkpoint folder holds the adapter (safetensors), optimizer and scheduler state, each process's
RNG states, the data position and the resolved config. Tensors and plain containers only go
through ``torch.save``; loading uses ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from simpo_lite.config import Config, load_saved_config, save_config
from simpo_lite.errors import UserError
from simpo_lite.sharding import save_adapter

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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
        if match and path.is_dir() and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    """'latest' means the newest complete checkpoint in output_dir; anything else is a folder path."""
    if resume == "latest":
        found = checkpoints(output_dir)
        if not found:
            raise UserError(f"--resume: no checkpoint in '{output_dir}'; start without --resume or give a checkpoint folder")
        return found[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume: '{resume}' is not a simpo-lite checkpoint (no trainer_state.json); "
                        f"use 'latest' or a checkpoint-N folder")
    return path


def write_atomically(target: Path, fill) -> Path:
    """Build a folder with fill(tmp) and rename it to target, so a failure leaves no partial target."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        _apply_umask(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _apply_umask(folder: Path) -> None:
    """mkdtemp and some libraries' temporary files are owner-only; give the result normal modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def save_checkpoint(output_dir: Path, model, optimizer_state: dict, scheduler, state: TrainerState, cfg: Config,
                    rng_states: list[dict], keep: int, adapter_state: dict | None = None) -> Path:
    """Write checkpoint-<step> atomically, then drop the oldest beyond `keep`.

    rng_states: one per process (gathered by the caller), so every process resumes its own stream.
    optimizer_state, adapter_state: see simpo_lite.sharding (whole even when the live ones are sharded).
    """
    def fill(tmp: Path) -> None:
        save_adapter(model, tmp, adapter_state)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for rank, rng in enumerate(rng_states):
            torch.save(rng, tmp / f"rng_state_{rank}.pt")
        save_config(cfg, tmp / "config.yaml")
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))

    path = write_atomically(Path(output_dir) / f"checkpoint-{state.step}", fill)
    for old in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_trainer_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))


def load_checkpoint_config(path: Path) -> Config:
    return load_saved_config(path / "config.yaml")


def load_torch(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def load_rng_state(path: Path, rank: int) -> dict | None:
    file = path / f"rng_state_{rank}.pt"
    return load_torch(file) if file.is_file() else None
