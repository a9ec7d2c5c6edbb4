"""`simpo-lite export RUN/checkpoint-N`: the checkpoint's adapter (the last healthy one after a collapse
stop), into a folder of its own beside the run's export, with the evaluations up to its step on the card."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from simpo_lite.export import export_run
from tiny_models import tiny_model_folder, tiny_run_folder

PROMPT_IDS = torch.tensor([[1, 520, 2024, 314, 260, 1435, 30, 2, 9, 7, 11]])
EVALS = {0: 0.7, 2: 0.6, 4: 0.5}  # eval_loss by step; the checkpoint is at step 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """checkpoint-3 of a finished run, its adapter's B matrices zero (as at the start of training), so
    that a merge of it is the base itself and anything else shows; the run's final adapter is not zero."""
    base = tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")
    run = tiny_run_folder(tmp_path_factory.mktemp("runs") / "demo", base)
    folder = run / "checkpoint-3"
    folder.mkdir()
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              folder / "adapter_model.safetensors", metadata={"format": "pt"})
    shutil.copy2(run / "adapter" / "adapter_config.json", folder / "adapter_config.json")
    shutil.copy2(run / "config.yaml", folder / "config.yaml")
    (folder / "trainer_state.json").write_text(json.dumps({"step": 3, "epoch": 0, "batch_in_epoch": 3,
                                                           "train_seconds": 9.0}))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pt"):
        torch.save({}, folder / name)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval_loss": v}) + "\n" for s, v in EVALS.items()))
    return folder


def test_cli_exports_a_checkpoints_adapter_beside_the_runs_own_export(checkpoint):
    run = checkpoint.parent
    done = subprocess.run([sys.executable, "-m", "simpo_lite", "export", str(checkpoint), "--adapter-only"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    out = run / "adapter-export-checkpoint-3"
    assert done.stdout.splitlines() == [f"exported to {out}"]
    assert not (run / "adapter-export").exists()  # the run's own export keeps its name
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "README.md"} <= names
    assert not names & {"optimizer.pt", "scheduler.pt", "rng_state_0.pt", "trainer_state.json", "config.yaml"}
    assert (out / "adapter_model.safetensors").read_bytes() == (checkpoint / "adapter_model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    assert "| eval_loss | 0.7000 | 0.6000 |" in card and "steps done | 3 in 9 s" in card  # not the run's end


def test_a_merged_checkpoint_is_the_checkpoints_model_and_its_checks_go_to_stdout(checkpoint, capfd):
    from transformers import AutoModelForCausalLM

    from simpo_lite.config import resolve

    result = export_run(checkpoint, dtype="fp32", sets=["export.merge_into=original"])
    assert result.out == checkpoint.parent / "merged-checkpoint-3"
    base = resolve(saved=checkpoint / "config.yaml").model.name_or_path

    def logits(folder) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(input_ids=PROMPT_IDS).logits

    assert (logits(result.out) - logits(base)).abs().max().item() < 1e-4  # zero B: the base, not the final adapter
    captured = capfd.readouterr()
    assert captured.out.splitlines()[0] == f"exported to {result.out}"
    assert "check: fp32 export vs base+adapter" in captured.out and "sample (greedy)" in captured.out
    assert "merging the adapter" in captured.err and "check:" not in captured.err
