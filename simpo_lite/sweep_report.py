"""What a sweep reports: its trials ranked, sweep.json and sweep.csv, sweep.png, best.yaml and the table
on stdout. (Running the trials: sweep.py.)"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from simpo_lite import config as cfgmod
from simpo_lite.files import write_json, write_text

if TYPE_CHECKING:
    from simpo_lite.sweep import Sweep

SWEEP_FILE = "sweep.json"
RANKED = ("eval_rewards/accuracies", "eval_rewards/margins")
COLUMNS = ("trial", "status", "eval_rewards/accuracies", "eval_rewards/margins", "eval_loss",
           "health/length_ratio", "health/looping", "train_seconds")


def trial_name(index: int, count: int) -> str:
    return f"trial-{index + 1:0{max(2, len(str(count)))}d}"


def yaml_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def ranking(sweep: Sweep) -> list[tuple[str, dict]]:
    """Qualified trials first, best first (accuracy, then margin, then lower loss); then the rest."""
    rows = list(sweep.results.items())

    def key(item):
        r = item[1]
        if r["status"] != "ok" or r.get(RANKED[0]) is None:
            return (1, 0.0, 0.0, 0.0)
        return (0, -r[RANKED[0]], -r.get(RANKED[1], 0.0), r.get("eval_loss", 0.0))

    return sorted(rows, key=key)


def save_tables(sweep: Sweep, out_dir: Path) -> None:
    ranked = ranking(sweep)
    write_json(out_dir / SWEEP_FILE, {"definition": sweep.definition(), "results": sweep.results,
                                       "ranking": [name for name, _ in ranked]})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    keys = list(sweep.grid)
    writer.writerow(["rank", *keys, *COLUMNS, "reason"])
    index = dict(zip(trial_names(sweep), sweep.trials))
    for rank, (name, r) in enumerate(ranked, 1):
        writer.writerow([rank if r["status"] == "ok" else "", *(index[name][k] for k in keys), name,
                         *(r.get(c) for c in COLUMNS[1:]), r.get("reason", "")])
    write_text(out_dir / "sweep.csv", buffer.getvalue())


def write_best(sweep: Sweep, out_dir: Path) -> tuple[str, Path] | None:
    """The winner's grid values on the full run's config (its steps and data, not the sweep's)."""
    ranked = ranking(sweep)
    if not ranked or ranked[0][1]["status"] != "ok":
        return None
    name, result = ranked[0]
    values = sweep.trials[trial_names(sweep).index(name)]
    cfg = cfgmod.resolve(sweep.preset, sweep.config_file, None,
                         [*sweep.sets, *(f"{k}={yaml_value(v)}" for k, v in values.items())])
    header = (f"# The winner of the sweep in {out_dir}: {name} ({settings_text(values)}), held-out reward accuracy "
              f"{result[RANKED[0]]:.3f}, margin {result.get(RANKED[1], float('nan')):.3f} after "
              f"{sweep.max_steps} steps.\n# Train it: simpo-lite train --config {out_dir / 'best.yaml'}\n")
    path = out_dir / "best.yaml"
    write_text(path, header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return name, path


def trial_names(sweep: Sweep) -> list[str]:
    return [trial_name(i, len(sweep.trials)) for i in range(len(sweep.trials))]


def settings_text(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def plot(sweep: Sweep, out_dir: Path) -> Path | None:
    """sweep.png: training loss and held-out reward accuracy per step, one curve per trial."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    from simpo_lite.run_folder import METRICS, read_metrics

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in zip(trial_names(sweep), sweep.trials):
        if name not in sweep.results:
            continue
        records = read_metrics(out_dir / name / METRICS)
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval_rewards/accuracies" in r]
        style = "-" if sweep.results[name]["status"] == "ok" else ":"
        label = f"{name}: {settings_text(values)}" + ("" if style == "-" else " (disqualified)")
        line, = left.plot([r["step"] for r in train], [r["loss"] for r in train], style, label=label)
        right.plot([r["step"] for r in evals], [r["eval_rewards/accuracies"] for r in evals], style, marker="o",
                   color=line.get_color())
    left.set(xlabel="step", ylabel="training loss", title="training loss")
    right.set(xlabel="step", ylabel="held-out reward accuracy", title="held-out reward accuracy", ylim=(-0.05, 1.05))
    left.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_ranking(sweep: Sweep, result: dict, out_dir: Path) -> None:
    """The ranked table on stdout (console.print_table: tab-separated rows when piped), then where
    the files are and the winner."""
    from simpo_lite.console import print_table

    if not result["main"]:
        return
    index = dict(zip(trial_names(sweep), sweep.trials))
    head = ["rank", "trial", *sweep.grid, "accuracy", "margin", "loss", "length x", "looping", "status"]
    rows = []
    for rank, (name, r) in enumerate(result["ranking"], 1):
        ok = r["status"] == "ok"
        figures = [f"{r[k]:.3f}" if ok and r.get(k) is not None else "-"
                   for k in (*RANKED, "eval_loss", "health/length_ratio", "health/looping")]
        rows.append([str(rank) if ok else "-", name, *(str(index[name][k]) for k in sweep.grid), *figures,
                     "ok" if ok else f"disqualified: {r['reason']}"])
    # Cells are plain text (a reason or a grid value may hold [brackets]).
    print_table(head, rows, title="sweep ranking", markup=False)
    print(f"tables: {out_dir / 'sweep.csv'}, {out_dir / SWEEP_FILE}; curves: {out_dir / 'sweep.png'}")
    if result["best"]:
        name, path = result["best"]
        print(f"best: {name} ({settings_text(index[name])}); train it with: simpo-lite train --config {path}")
    else:
        print("best: none; every finished trial was disqualified. Try lower learning rates or a larger "
              "simpo.sft_weight, and read the trials' samples.jsonl")
