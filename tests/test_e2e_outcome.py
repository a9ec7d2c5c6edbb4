"""What the trained demo model writes, on the real bundled SmolLM2: a collapse is caught, a good run keeps its facts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def simpo_lite(*args, timeout=1200):
    return subprocess.run([sys.executable, "-m", "simpo_lite", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.e2e
def test_a_collapsing_learning_rate_stops_and_leaves_a_healthy_checkpoint(tmp_path):
    run = tmp_path / "collapse"
    train = simpo_lite("train", "--preset", "smollm2-demo", "--output-dir", str(run), "--max-steps", "12", "--quiet",
                       # Measured with these settings: healthy through step 2, 75% of the answers looping at
                       # step 3 (pinned, so retuning the preset does not change what this test collapses).
                       "--set", "train.learning_rate=2e-3", "--set", "train.warmup_ratio=0",
                       "--set", "train.micro_batch_size=4", "--set", "simpo.sft_weight=1",
                       "--set", "train.eval_steps=1", "--set", "train.save_steps=1",
                       "--set", "train.on_collapse=stop", "--set", "train.health_prompts=4",
                       "--set", "train.health_max_new_tokens=32", "--set", "data.eval_max_pairs=8")
    assert train.returncode == 1, train.stderr[-3000:]
    assert "on_collapse=stop" in train.stderr and "Traceback" not in train.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"] == "collapse" and summary["steps"] < 12
    healthy = summary["last_healthy_checkpoint"]
    assert healthy and healthy in train.stderr  # the error line names it
    # The healthy checkpoint survived pruning and is a model the other commands load.
    evaluated = simpo_lite("eval", healthy, "--out", str(tmp_path / "eval.json"))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} >= {0, summary["steps"]}


@pytest.mark.e2e
def test_the_demo_run_keeps_the_facts_it_knew(tmp_path):
    """README's first command's training (the embedded default preset, all its steps), judged as
    benchmarks/demo_judge.py judges it, on the first 16 held-out prompts: the base states every fact of
    the demo set firmly (its screen), and the tuned model must still state them, in the pirate style,
    without loops. A shorter run is no stand-in: 12 steps of this preset left 4 of these 16 answers looping."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import demo_judge

    from simpo_lite.config import load_saved_config
    from simpo_lite.model import load_for_inference, load_run_tokenizer

    run = tmp_path / "demo"
    train = simpo_lite("train", "--output-dir", str(run), "--quiet", "--set", "train.health_prompts=0")
    assert train.returncode == 0, train.stderr[-3000:]
    cfg = load_saved_config(run / "config.yaml")
    tokenizer = load_run_tokenizer(cfg, run / "adapter")
    rows = demo_judge.held_out_rows(cfg, tokenizer)[:16]
    model = load_for_inference(cfg, run / "adapter")
    answers = demo_judge.answers(model, tokenizer, cfg, [r["prompt"] for r in rows], 48, batch_size=16)
    judged = [demo_judge.judge(a, r["answer"], r["prompt"]) for a, r in zip(answers, rows)]
    rates = demo_judge.rates(judged)
    assert rates["fact"] >= 0.9 and rates["style"] >= 0.9, list(zip([r["prompt"] for r in rows], answers))
    assert rates["loop"] <= 0.05, answers
