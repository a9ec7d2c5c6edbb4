"""health/answer_recall of runs that predate it, recomputed from their samples.jsonl: the threshold of
train.collapse_recall_drop was chosen on these figures (README, "Generation health").

    python benchmarks/health_recall.py DATA.jsonl RUN [RUN ...]

DATA: the preference file the runs trained on (prompt/chosen/rejected), to find each health prompt's pair.
Prints, per run, the mean recall at every evaluation, and demo_judge.json's fact rate where there is one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from simpo_lite.health import key_words, recall


def main(data: str, runs: list[str]) -> None:
    pairs = {}
    for line in Path(data).read_text().splitlines():
        row = json.loads(line)
        pairs[row["prompt"]] = key_words(row["prompt"], row["chosen"], row["rejected"])
    for run in (Path(r) for r in runs if (Path(r) / "samples.jsonl").is_file()):
        by_step: dict[int, list[float]] = {}
        for line in (run / "samples.jsonl").read_text().splitlines():
            sample = json.loads(line)
            keys = pairs.get(sample["prompt"])
            if keys:
                by_step.setdefault(sample["step"], []).append(recall(sample["output"], keys))
        figures = "  ".join(f"step {step}: {sum(v) / len(v):.2f}" for step, v in sorted(by_step.items()))
        judged = run / "demo_judge.json"
        facts = ""
        if judged.is_file():
            rates = json.loads(judged.read_text())["rates"]
            facts = f"  | judged facts: base {rates['base']['fact']:.2f}, run {rates['run']['fact']:.2f}"
        print(f"{run.name:20s} {figures}{facts}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
