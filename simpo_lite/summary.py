"""The end of a run: the final adapter, summary.json and the start-vs-end table."""

from __future__ import annotations

import json
from pathlib import Path

from simpo_lite.checkpoint import write_atomically
from simpo_lite.sharding import save_adapter

SHOWN = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen",
         "eval_rewards/rejected", "eval_logps/chosen", "eval_logps/rejected")


def save_final_adapter(target: Path, model, tokenizer, adapter_state: dict | None = None) -> None:
    def fill(tmp: Path) -> None:
        save_adapter(model, tmp, adapter_state)
        tokenizer.save_pretrained(tmp)

    write_atomically(target, fill)


def write_summary(output_dir: Path, summary: dict) -> dict:
    path = Path(output_dir) / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
    return summary


def print_summary(summary: dict, output_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("metric", "start", "end", title="simpo-lite run summary")
    start, end = summary.get("start_eval") or {}, summary.get("end_eval") or {}
    for key in SHOWN:
        if key in start or key in end:
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            table.add_row(key, fmt(start.get(key)), fmt(end.get(key)))
    table.add_row("steps", "", str(summary["steps"]))
    table.add_row("train time", "", f"{summary['train_seconds']:.0f} s")
    table.add_row("peak memory", "", f"{summary['peak_mem_mb']:.0f} MB")
    console = Console(stderr=True)
    console.print(table)
    console.print(f"adapter saved to {Path(output_dir) / 'adapter'}; "
                  f"merge it with: simpo-lite export {output_dir}", highlight=False)
