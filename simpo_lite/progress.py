"""What a run shows and records: a live rich progress bar (or plain lines) and metrics.jsonl."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by tensors on CUDA; peak resident set size of the process on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLog:
    """Appends one JSON object per line; on resume, drops lines written after the checkpoint."""

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


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Progress:
    """Live bar with step/total, elapsed, ETA and the latest metrics; plain lines when quiet."""

    def __init__(self, total_steps: int, start_step: int, quiet: bool, enabled: bool = True):
        self.total = total_steps
        self.quiet = quiet
        self.enabled = enabled
        self.start_step = start_step
        self.started = time.perf_counter()
        self._bar = None
        if enabled and not quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[stats]}"), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, stats="")

    def update(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        stats = (f"loss {record['loss']:.4f}  acc {record['rewards/accuracies']:.2f}  "
                 f"margin {record['rewards/margins']:.3f}  {record['tokens_per_s']:.0f} tok/s  "
                 f"peak {record['peak_mem_mb']:.0f} MB")
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=stats)
        else:
            elapsed = time.perf_counter() - self.started
            done = max(step - self.start_step, 1)
            eta = elapsed / done * (self.total - step)
            print(f"step {step}/{self.total}  {stats}  elapsed {elapsed:.0f}s  eta {eta:.0f}s",
                  file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
