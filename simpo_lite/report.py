"""`simpo-lite report`: a run's training and eval curves as one PNG, and a short text summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

from simpo_lite.errors import UserError
from simpo_lite.progress import read_metrics

# (title, [(metric, label)]); train metrics are plotted as lines, their eval_ twins as markers.
PANELS = (
    ("SimPO loss", [("loss", "loss")]),
    ("reward accuracy", [("rewards/accuracies", "chosen > rejected")]),
    ("reward margin", [("rewards/margins", "chosen - rejected")]),
    ("average log-prob per response token", [("logps/chosen", "chosen"), ("logps/rejected", "rejected")]),
    ("rewards (beta x average log-prob)", [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")]),
    ("optimisation", [("lr", "learning rate"), ("grad_norm", "grad norm")]),
)


def load_run(run_dir: Path) -> tuple[list[dict], list[dict], dict]:
    """(training records, eval records, summary.json or {}) of a run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"report: run folder '{run_dir}' not found: give the output_dir of a training run")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"report: '{run_dir}' has no metrics.jsonl: it is not a training run's output_dir, "
                        f"or the run has not logged a step yet")
    records = [r for r in _read_records(path) if isinstance(r, dict) and "step" in r]
    if not records:
        raise UserError(f"report: {path} holds no metrics yet: train for at least one logging step")
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    train = [r for r in records if not any(k.startswith("eval_") for k in r)]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return train, evals, summary


def _read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records; a half-written last line (a run still writing, or killed) is left out."""
    try:
        return read_metrics(path)
    except json.JSONDecodeError:
        pass
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"report: {path} line {n} is not JSON: fix or delete that line") from None
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [float(p[1]) for p in points]


def _ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average; a NaN step is skipped rather than poisoning every later point."""
    alpha, out, level = 2 / (span + 1), [], None
    for v in values:
        if math.isfinite(v):
            level = v if level is None else alpha * v + (1 - alpha) * level
        out.append(level if level is not None else float("nan"))
    return out


def plot(train: list[dict], evals: list[dict], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), constrained_layout=True)
    colors = ("tab:blue", "tab:red")
    span = max(len(train) // 20, 1)  # smooth over ~5% of the run so trends show through per-batch noise
    for ax, (panel, metrics) in zip(axes.flat, PANELS):
        twin = ax.twinx() if panel == "optimisation" else None
        for i, (key, label) in enumerate(metrics):
            target = twin if (twin is not None and i == 1) else ax
            steps, values = _series(train, key)
            if steps:
                if span > 1 and key != "lr":  # the schedule is exact: nothing to smooth
                    target.plot(steps, values, color=colors[i], alpha=0.25, linewidth=0.8)
                    target.plot(steps, _ema(values, span), color=colors[i], linewidth=1.8, label=f"train {label}")
                else:
                    target.plot(steps, values, color=colors[i], linewidth=1.5, label=f"train {label}")
            steps, values = _series(evals, f"eval_{key}")
            if steps:
                target.plot(steps, values, color=colors[i], marker="o", linestyle="--", linewidth=1.2,
                            markersize=5, markeredgecolor="black", label=f"eval {label}")
        if panel == "reward accuracy":
            ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")  # chance
            ax.set_ylim(-0.02, 1.02)
        if panel == "reward margin":
            ax.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(panel)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if twin is not None:
            ax.set_ylabel("learning rate", color=colors[0])
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            twin.set_ylabel("grad norm (before clipping)", color=colors[1])
            extra_h, extra_l = twin.get_legend_handles_labels()
            handles, labels = handles + extra_h, labels + extra_l
        if handles:
            ax.legend(handles, labels, fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle(title, fontsize=13)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _tail_mean(records: list[dict], key: str, share: float = 0.1) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not values:
        return None
    tail = values[-max(1, int(len(values) * share)):]
    return sum(tail) / len(tail)


def _change(first: dict, last: dict, key: str) -> str:
    return f"{_fmt(first.get(key))} -> {_fmt(last.get(key))}"


def summary_lines(run_dir: Path, train: list[dict], evals: list[dict], summary: dict) -> list[str]:
    last = (train or evals)[-1]
    seconds = summary.get("train_seconds")
    lines = [f"run {run_dir}: {last['step']} steps, epoch {_fmt(last.get('epoch'))}"
             + (f", {seconds / 60:.1f} min" if isinstance(seconds, (int, float)) else "")]
    if train:
        lines.append(f"train (mean of the last 10% of logged steps): loss {_fmt(_tail_mean(train, 'loss'))}, "
                     f"reward accuracy {_fmt(_tail_mean(train, 'rewards/accuracies'))}, "
                     f"margin {_fmt(_tail_mean(train, 'rewards/margins'))}")
    if evals:
        first, end = evals[0], evals[-1]
        lines.append(f"eval step {first['step']} -> {end['step']}: loss {_change(first, end, 'eval_loss')}, "
                     f"reward accuracy {_change(first, end, 'eval_rewards/accuracies')}, "
                     f"margin {_change(first, end, 'eval_rewards/margins')}")
        lines.append(f"eval log-probs: chosen {_change(first, end, 'eval_logps/chosen')}, "
                     f"rejected {_change(first, end, 'eval_logps/rejected')}")
        lines += _diagnose(first, end)
    else:
        lines.append("no eval records: set data.eval_fraction or data.eval_split to get eval curves")
    speed = _tail_mean(train, "tokens_per_s", share=1.0)
    peak = max((r["peak_mem_mb"] for r in train if isinstance(r.get("peak_mem_mb"), (int, float))), default=None)
    if speed is not None or peak is not None:
        lines.append(f"throughput {_fmt(speed)} tokens/s (mean); peak memory {_fmt(peak)} MB")
    skipped = summary.get("skipped_steps")
    if skipped:
        lines.append(f"{skipped} steps were skipped for non-finite loss or gradients")
    return lines


def _diagnose(first: dict, end: dict) -> list[str]:
    """The patterns worth a line: no learning, and both log-probs falling (likelihood displacement)."""
    notes = []
    acc0, acc1 = first.get("eval_rewards/accuracies"), end.get("eval_rewards/accuracies")
    if first is not end and acc0 is not None and acc1 is not None and acc1 <= acc0:
        notes.append("note: eval reward accuracy did not improve; try a larger train.learning_rate or more steps")
    c0, c1 = first.get("eval_logps/chosen"), end.get("eval_logps/chosen")
    r0, r1 = first.get("eval_logps/rejected"), end.get("eval_logps/rejected")
    if None not in (c0, c1, r0, r1) and c1 < c0 and r1 < r0:
        notes.append("note: both chosen and rejected log-probs fell; the margin grew because rejected fell "
                     "faster (common in preference tuning; a large drop in chosen can hurt generation quality)")
    return notes


def report_command(run_dir: Path, out: Path | None = None) -> Path:
    run_dir = Path(run_dir)
    train, evals, summary = load_run(run_dir)
    out = Path(out) if out is not None else run_dir / "report.png"
    if out.suffix.lower() != ".png":
        raise UserError(f"report: --out '{out}' must end in .png")
    plot(train, evals, out, title=f"simpo-lite run {run_dir.resolve().name}")
    for line in summary_lines(run_dir, train, evals, summary):
        print(line)
    print(f"curves written to {out}")
    return out
