"""`simpo-lite report`: a run's training and eval curves as one PNG, and a short text summary."""

from __future__ import annotations

import math
from pathlib import Path

from simpo_lite.errors import UserError
from simpo_lite.files import check_output_path, write_file
from simpo_lite import run_folder

# (title, [(metric, label)]); train metrics are plotted as lines, their eval_ twins as markers.
PANELS = (
    ("SimPO loss", [("loss", "loss")]),
    ("reward accuracy", [("rewards/accuracies", "chosen > rejected")]),
    ("reward margin", [("rewards/margins", "chosen - rejected")]),
    ("average log-prob per response token", [("logps/chosen", "chosen"), ("logps/rejected", "rejected")]),
    ("rewards (beta x average log-prob)", [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")]),
    ("optimisation", [("lr", "learning rate"), ("grad_norm", "grad norm")]),
)
# Generation health (simpo_lite.health), measured at evaluations only: drawn as markers.
HEALTH_PANELS = (
    ("health answers: mean length (tokens)", [("health/length", "length")]),
    ("health answers: looping / no end-of-turn", [("health/looping", "looping"), ("health/no_stop", "no end-of-turn")]),
    ("eval log-prob drift since step 0", [("health/logps_chosen_drift", "chosen"),
                                          ("health/logps_rejected_drift", "rejected")]),
)


def load_run(run_dir: Path) -> tuple[list[dict], list[dict], dict]:
    """(training records, eval records, summary.json or {}) of a run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"report: run folder '{run_dir}' not found: give the output_dir of a training run")
    path = run_dir / run_folder.METRICS
    if not path.is_file() and (run_dir.parent / run_folder.METRICS).is_file():
        raise UserError(f"report: '{run_dir}' is a folder inside a run (a checkpoint or an export): the report is "
                        f"of the whole run: simpo-lite report {run_dir.parent}")
    if not path.is_file():
        raise UserError(f"report: '{run_dir}' has no metrics.jsonl: it is not a training run's output_dir, "
                        f"or the run has not logged a step yet")
    try:
        records = [r for r in run_folder.read_metrics(path) if isinstance(r, dict) and "step" in r]
    except UserError as err:
        raise UserError(f"report: {err}") from None
    if not records:
        raise UserError(f"report: {path} holds no metrics yet: train for at least one logging step")
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    train = [r for r in records if not any(k.startswith("eval_") for k in r)]
    return train, evals, run_folder.read_summary(run_dir) or {}


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

    with_health = any("health/length" in r for r in evals)
    fig, axes = plt.subplots(3 if with_health else 2, 3, figsize=(16, 12.5 if with_health else 8.5),
                             constrained_layout=True)
    colors = ("tab:blue", "tab:red")
    if with_health:
        _plot_health(axes[2], evals, colors)
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
    write_file(out, lambda tmp: fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png"), what="the report plot")
    plt.close(fig)
    return out


def _plot_health(axes, evals: list[dict], colors) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax, (panel, metrics) in zip(axes, HEALTH_PANELS):
        for i, (key, label) in enumerate(metrics):
            steps, values = _series(evals, key)
            if steps:
                ax.plot(steps, values, color=colors[i], marker="o", linestyle="--", markersize=5,
                        markeredgecolor="black", label=label)
        if "looping" in panel:
            ax.set_ylim(-0.02, 1.02)
        if "drift" in panel:
            ax.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(panel)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")


def samples_side_by_side(run_dir: Path) -> list[tuple[str, str, str]] | None:
    """(prompt, first answer, last answer) from samples.jsonl: what the model wrote before and after."""
    samples = run_folder.read_metrics(Path(run_dir) / run_folder.SAMPLES)
    return _pair_up(samples) if samples else None


def _pair_up(samples: list[dict]) -> list[tuple[str, str, str]]:
    first, last = samples[0]["step"], samples[-1]["step"]
    before = {s["prompt"]: s["output"] for s in samples if s["step"] == first}
    after = {s["prompt"]: s["output"] for s in samples if s["step"] == last}
    return [(prompt, before[prompt], after.get(prompt, "-")) for prompt in before]


def print_samples(run_dir: Path, limit: int | None = None) -> None:
    """The answers of the first and the last evaluation side by side; with `limit`, the first few and
    where the rest are. What the model writes is the outcome, not its reward accuracy."""
    from simpo_lite.console import print_table, result_line

    samples = run_folder.read_metrics(Path(run_dir) / run_folder.SAMPLES)
    if not samples:
        return
    rows = _pair_up(samples)
    shown = rows if limit is None else rows[:limit]
    title = (f"what the model wrote: {len(shown)} of {len(rows)} held-out prompts, greedy" if len(shown) < len(rows)
             else "what the model wrote (samples.jsonl, greedy)")
    first, last = samples[0]["step"], samples[-1]["step"]
    if first == last:  # one evaluation: no "before | after" of the same answers
        headers, shown = ["prompt", f"step {first}"], [row[:2] for row in shown]
    else:
        headers = ["prompt", f"step {first}", f"step {last}"]
    print_table(headers, shown, title=title, markup=False, show_lines=True)
    if len(shown) < len(rows):
        # Its own line: a command in a table title would wrap where a terminal is narrow.
        result_line(f"all {len(rows)} answers and the curves: simpo-lite report {run_dir}")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def tail_mean(records: list[dict], key: str, share: float = 0.1) -> float | None:
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
        lines.append(f"train (mean of the last 10% of logged steps): loss {_fmt(tail_mean(train, 'loss'))}, "
                     f"reward accuracy {_fmt(tail_mean(train, 'rewards/accuracies'))}, "
                     f"margin {_fmt(tail_mean(train, 'rewards/margins'))}")
    if evals:
        first, end = evals[0], evals[-1]
        lines.append(f"eval step {first['step']} -> {end['step']}: loss {_change(first, end, 'eval_loss')}, "
                     f"reward accuracy {_change(first, end, 'eval_rewards/accuracies')}, "
                     f"margin {_change(first, end, 'eval_rewards/margins')}")
        lines.append(f"eval log-probs: chosen {_change(first, end, 'eval_logps/chosen')}, "
                     f"rejected {_change(first, end, 'eval_logps/rejected')}")
        lines += _diagnose(first, end, _crossed(run_dir, evals))
    else:
        lines.append("no eval records: set data.eval_fraction or data.eval_split to get eval curves")
    speed = tail_mean(train, "tokens_per_s", share=1.0)
    # The summary's peak is the whole run's, the last evaluation included (train's end table shows it);
    # the step records stop before that evaluation. A run stopped early has only the step records.
    peaks = [r["peak_mem_mb"] for r in [*train, summary] if isinstance(r.get("peak_mem_mb"), (int, float))]
    peak = max(peaks, default=None)
    if speed is not None or peak is not None:
        lines.append(f"throughput {_fmt(speed)} tokens/s (mean); peak memory {_fmt(peak)} MB (the whole run, "
                     f"evaluations included)")
    if evals and "health/length" in evals[-1]:
        from simpo_lite.health import summary_line

        lines.append(f"generation health at step {evals[-1]['step']}: {summary_line(evals[-1])}")
    if summary.get("stopped") == "collapse":
        lines.append(f"stopped for collapse; last healthy checkpoint: {summary.get('last_healthy_checkpoint')}")
    skipped = summary.get("skipped_steps")
    if skipped:
        lines.append(f"{skipped} steps were skipped for non-finite loss or gradients")
    return lines


def saturated_accuracy(first_eval: dict) -> float | None:
    """The step-0 reward accuracy when it is already at its top (the model preferred the chosen answers
    before training, common on real data): the figure then cannot show progress."""
    accuracy = first_eval.get("eval_rewards/accuracies")
    return accuracy if isinstance(accuracy, (int, float)) and accuracy >= 0.99 else None


def _crossed(run_dir: Path, evals: list[dict]) -> list[str]:
    """The generation-health limits the run's evaluations crossed, by the run's own limits."""
    from simpo_lite.config import TrainConfig, load_saved_config
    from simpo_lite.health import crossed_limits

    config = run_dir / run_folder.CONFIG
    try:
        limits = load_saved_config(config).train if config.is_file() else TrainConfig()
    except UserError:  # a config this version cannot read: the defaults' limits
        limits = TrainConfig()
    return crossed_limits(evals, limits)


def _diagnose(first: dict, end: dict, crossed: list[str]) -> list[str]:
    """The patterns worth a line: answers gone wrong, no learning, and both log-probs falling
    (likelihood displacement)."""
    from simpo_lite.health import crossed_line

    notes = [f"{crossed_line(crossed)}; the answers are below"] if crossed else []
    acc0, acc1 = first.get("eval_rewards/accuracies"), end.get("eval_rewards/accuracies")
    if first is not end and saturated_accuracy(first) is not None:
        notes.append(f"note: eval reward accuracy was {acc0:.3f} at step 0 already, so it cannot show progress: "
                     f"judge the run by its answers (below)")
    elif first is not end and acc0 is not None and acc1 is not None and acc1 <= acc0 and not crossed:
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
    out = Path(out) if out is not None else run_dir / run_folder.REPORT
    if out.suffix.lower() != ".png":
        raise UserError(f"report: --out '{out}' must end in .png")
    check_output_path(out)
    plot(train, evals, out, title=f"simpo-lite run {run_dir.resolve().name}")
    for line in summary_lines(run_dir, train, evals, summary):
        print(line)
    print_samples(run_dir)
    from simpo_lite.console import info

    info(f"curves written to {out}")
    return out
