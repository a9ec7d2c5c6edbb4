"""What a run shows: a live rich progress bar (or plain lines), and the end-of-run summary table."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn
from rich.text import Text


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by tensors on CUDA; peak resident set size of the process on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Progress:
    """Live bar with step/total, elapsed and ETA, and the latest metrics on a line of their own (so an
    80-column terminal keeps the step and the ETA); plain lines when quiet. The ETA counts training steps
    at their own pace and each evaluation still to come at the pace of those done: time spent evaluating
    is not taken for slow steps."""

    def __init__(self, total_steps: int, start_step: int, quiet: bool, enabled: bool = True, eval_every: int = 0):
        self.total = total_steps
        self.quiet = quiet
        self.enabled = enabled
        self.start_step = start_step
        self.eval_every = eval_every
        self.eval_seconds: list[float] = []
        self.started = time.perf_counter()
        self._bar = None
        if enabled and not quiet:
            self._bar = _StatsBelow(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                    TextColumn("eta {task.fields[eta]}"), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, eta="-")

    def eta(self, step: int) -> float:
        elapsed = time.perf_counter() - self.started - sum(self.eval_seconds)
        per_step = elapsed / max(step - self.start_step, 1)
        evals_left = 0
        if self.eval_every and self.eval_seconds:  # evaluations at multiples of eval_every and at the end
            every = self.eval_every
            evals_left = self.total // every - step // every + (1 if self.total % every else 0)
        mean_eval = sum(self.eval_seconds) / len(self.eval_seconds) if self.eval_seconds else 0.0
        return per_step * (self.total - step) + evals_left * mean_eval

    @contextmanager
    def evaluating(self, pairs: int):
        """Around an evaluation: the bar says so (the first one, before step 1, can take a while), and
        its time is kept out of the steps' pace."""
        if self._bar is not None:
            self._bar.stats = f"evaluating {pairs} held-out pairs ..."
            self._bar.refresh()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.eval_seconds.append(time.perf_counter() - started)

    def update(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        stats = (f"loss {record['loss']:.4f}  acc {record['rewards/accuracies']:.2f}  "
                 f"margin {record['rewards/margins']:.3f}  {record['tokens_per_s']:.0f} tok/s  "
                 f"peak {record['peak_mem_mb']:.0f} MB")
        eta = self.eta(step)
        if self._bar is not None:
            self._bar.stats = stats
            self._bar.update(self._task, completed=step, eta=_clock(eta))
        else:
            elapsed = time.perf_counter() - self.started
            print(f"step {step}/{self.total}  {stats}  elapsed {elapsed:.0f}s  eta {eta:.0f}s",
                  file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text, highlight=False)
        else:
            print(Text.from_markup(text).plain, file=sys.stderr, flush=True)  # plain lines carry no markup

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _StatsBelow(RichProgress):
    """The bar, and under it a line of metrics that folds instead of pushing the bar off the edge."""
    stats = ""

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        if self.stats:
            yield Text(self.stats, overflow="fold")


def _train_rows(output_dir: Path) -> list[list[str]]:
    """Loss, reward accuracy and margin of the training steps: the first logged step, and the mean of the
    last 10% (one step's figures are noisy)."""
    from simpo_lite.run_folder import METRICS, read_metrics
    from simpo_lite.run_report import tail_mean

    train = [r for r in read_metrics(Path(output_dir) / METRICS) if "loss" in r]
    if not train:
        return []
    return [[f"train {key} (no eval data)", f"{train[0][key]:.4f}", f"{tail_mean(train, key):.4f}"]
            for key in ("loss", "rewards/accuracies", "rewards/margins")
            if isinstance(train[0].get(key), (int, float)) and tail_mean(train, key) is not None]


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
    if not rows:  # no held-out pairs: the training figures are all there is, and say less
        rows = _train_rows(output_dir)
    rows.append(["steps", "", str(summary["steps"])])
    rows.append(["train time", "", f"{summary['train_seconds']:.0f} s"])
    if summary.get("resumed_from"):
        rows.append(["resumed from", "", str(summary["resumed_from"])])
    rows.append(["peak memory", "", f"{summary['peak_mem_mb']:.0f} MB"])
    print_table(["metric", "start", "end"], rows, title="simpo-lite run summary", markup=False)  # paths as written
    print_samples(output_dir, limit=3)
    for line in outcome_notes(start, summary.get("health_warnings") or [], output_dir):
        result_line(line)
    result_line(f"adapter saved to {Path(output_dir) / 'adapter'}; merge it with: simpo-lite export {output_dir}")


def outcome_notes(start_eval: dict, health_warnings: list[str], output_dir: Path) -> list[str]:
    """What the end table cannot say by itself: that the answers went wrong during the run (even where
    they recovered), and that a reward accuracy already at its top at step 0 cannot show progress."""
    notes = []
    if health_warnings:
        from simpo_lite.health import crossed_line

        notes.append(f"{crossed_line(health_warnings)}; read every answer before exporting: simpo-lite report {output_dir}")
    from simpo_lite.run_report import saturated_accuracy

    accuracy = saturated_accuracy(start_eval)
    if accuracy is not None:
        notes.append(f"note: reward accuracy was {accuracy:.3f} at step 0 already (the model preferred the chosen "
                     f"answers before training), so it cannot show progress: judge the run by its answers")
    return notes
