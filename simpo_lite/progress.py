"""What a run shows: a live rich progress bar (or plain lines), and the end-of-run summary table."""

from __future__ import annotations

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
            from rich.text import Text

            print(Text.from_markup(text).plain, file=sys.stderr, flush=True)  # plain lines carry no markup

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def print_summary(summary: dict, output_dir: Path) -> None:
    """The end-of-run table, a result: on stdout (plain rows when piped), the next command on one line."""
    from simpo_lite import health
    from simpo_lite.console import print_table, result_line
    from simpo_lite.loss import METRIC_NAMES
    from simpo_lite.run_report import print_samples

    rows = []
    start, end = summary.get("start_eval") or {}, summary.get("end_eval") or {}
    for key in [f"eval_{name}" for name in METRIC_NAMES] + list(health.SHOWN):
        if key in start or key in end:
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            rows.append([key, fmt(start.get(key)), fmt(end.get(key))])
    rows.append(["steps", "", str(summary["steps"])])
    rows.append(["train time", "", f"{summary['train_seconds']:.0f} s"])
    if summary.get("resumed_from"):
        rows.append(["resumed from", "", str(summary["resumed_from"])])
    rows.append(["peak memory", "", f"{summary['peak_mem_mb']:.0f} MB"])
    print_table(["metric", "start", "end"], rows, title="simpo-lite run summary")
    print_samples(output_dir, limit=3)
    result_line(f"adapter saved to {Path(output_dir) / 'adapter'}; merge it with: simpo-lite export {output_dir}")
