"""The user's path on the real bundled model: train a few steps of the demo, export, load, generate."""

import json
import subprocess
import sys

import pytest


@pytest.mark.e2e
def test_demo_trains_exports_and_the_export_generates(tmp_path):
    run = tmp_path / "demo"
    train = subprocess.run([sys.executable, "-m", "simpo_lite", "train", "--preset", "smollm2-demo",
                            "--output-dir", str(run), "--max-steps", "2", "--quiet",
                            "--set", "data.eval_max_pairs=8", "--set", "data.max_train_pairs=16"],
                           capture_output=True, text=True, timeout=1200)
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["start_eval"]["eval_rewards/accuracies"] <= 0.5

    export = subprocess.run([sys.executable, "-m", "simpo_lite", "export", str(run)],
                            capture_output=True, text=True, timeout=1200)
    assert export.returncode == 0, export.stderr[-3000:]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "merged")
    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip(), "the exported model generated nothing"
    assert "max |logit diff|" in export.stdout  # the export checked itself against base + adapter (a result)
