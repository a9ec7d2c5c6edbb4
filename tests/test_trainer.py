import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_models import tiny_model_folder, train_losses, write_config, write_pairs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny_model_folder(root / "model", tie=True), write_pairs(root / "pairs.jsonl", 40)


def _default_sigint():
    # A test run started in the background (`pytest &`, some CI runners) inherits an ignored SIGINT,
    # and Python then never raises KeyboardInterrupt: give the child the terminal's default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "simpo_lite", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint, **kwargs)


def run_to_end(*args):
    proc = cli(*args)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def wait_for(path: Path, proc, timeout=300):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared: {proc.communicate()[1][-2000:]}"
        assert time.time() - start < timeout
        time.sleep(0.01)


def eval_steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]


def twelve_step_config(tiny, folder: Path) -> Path:
    """folder/c.yaml: 12 steps on the tiny model, a checkpoint and an eval every 4, output in folder/run.

    Generation health runs at every eval (so exact resume covers it), but a random model's answers mean
    nothing: its guardrails are set out of reach."""
    model, data = tiny
    return write_config(folder / "c.yaml", model, data, folder / "run", max_steps=12, save_steps=4, eval_steps=4,
                        collapse_looping=1.0, collapse_length_ratio=1e6, collapse_recall_drop=1.0, collapse_logps_drop=1e6)


def start_until_first_checkpoint(tiny, tmp_path):
    """The twelve-step run started in the background in tmp_path, still running once its first checkpoint
    (step 4) is on disk: (config, process)."""
    config = twelve_step_config(tiny, tmp_path)
    proc = cli("train", "--config", str(config), "--quiet")
    wait_for(tmp_path / "run" / "checkpoint-4", proc)
    return config, proc


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    config = twelve_step_config(tiny, root)
    code, _, err = run_to_end("train", "--config", str(config), "--quiet")
    assert code == 0, err
    return root / "run"


def test_run_writes_everything_a_user_needs(uninterrupted):
    run = uninterrupted
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-8"]  # keeps the last 2
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    for key in ("epoch", "lr", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected", "tokens_per_s", "step_time_s", "peak_mem_mb"):
        assert key in train[0], key
    assert "eval_rewards/accuracies" in evals[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["end_eval"]["step"] == 12


def test_sigkill_then_resume_matches_uninterrupted_run(tiny, uninterrupted, tmp_path):
    config, proc = start_until_first_checkpoint(tiny, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "adapter").exists()
    code, _, err = run_to_end("train", "--config", str(config), "--resume", "--quiet")
    assert code == 0, err
    expected, resumed = train_losses(uninterrupted), train_losses(tmp_path / "run")
    assert sorted(resumed) == list(range(1, 13))
    assert resumed == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert eval_steps(tmp_path / "run") == eval_steps(uninterrupted) == [0, 4, 8, 12]


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny, uninterrupted, tmp_path):
    config, proc = start_until_first_checkpoint(tiny, tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "Traceback" not in err
    code, _, err = run_to_end("train", "--config", str(config), "--resume", "--quiet")
    assert code == 0, err
    assert train_losses(tmp_path / "run") == pytest.approx(train_losses(uninterrupted), rel=1e-5, abs=1e-6)


def test_resume_refuses_a_checkpoint_missing_adapter_weights(tiny, uninterrupted, tmp_path):
    """An adapter file without some weights used to load without complaint and restart them."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    weights = run / "checkpoint-12" / "adapter_model.safetensors"
    saved = load_file(str(weights))
    save_file(dict(list(saved.items())[1:]), str(weights))
    code, _, err = run_to_end("train", "--config", str(twelve_step_config(tiny, tmp_path)), "--resume")
    assert code == 2 and "1 missing" in err and "Traceback" not in err


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    model, data = tiny
    config = write_config(tmp_path / "c.yaml", model, data, tmp_path / "run", max_steps=8, save_steps=1,
                          learning_rate=1e30, max_grad_norm=0.0)
    code, _, err = run_to_end("train", "--config", str(config), "--quiet")
    assert code == 1
    assert "non-finite" in err and "last good checkpoint" in err
    kept = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert kept and all((p / "adapter_model.safetensors").is_file() for p in kept)


def test_nonfinite_steps_can_be_skipped(tiny, tmp_path):
    model, data = tiny
    config = write_config(tmp_path / "c.yaml", model, data, tmp_path / "run", max_steps=6,
                          learning_rate=1e30, max_grad_norm=0.0, on_nonfinite="skip")
    code, _, err = run_to_end("train", "--config", str(config), "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_steps"] > 0


def test_refuses_non_empty_output_dir(tiny, tmp_path):
    model, data = tiny
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    config = write_config(tmp_path / "c.yaml", model, data, tmp_path / "run", max_steps=1)
    code, _, err = run_to_end("train", "--config", str(config), "--quiet")
    # No checkpoint there: --resume would only be refused in turn, so it is not suggested.
    assert code == 2 and "no checkpoint to resume from" in err and "--overwrite" in err and "--resume" not in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"


def test_the_optimizer_steps_the_parameters_of_the_prepared_model(tiny, tmp_path, monkeypatch):
    """FSDP's prepare_model swaps the parameters for flattened copies, and an optimizer built on the
    originals updates nothing (seen on a GPU: a 1-process FSDP run whose eval loss never moved). A
    stand-in prepare_model that copies the module checks the optimizer holds the prepared ones."""
    import copy

    from accelerate import Accelerator

    from simpo_lite.config import resolve
    from simpo_lite.run_setup import build_run_parts

    prepare = Accelerator.prepare_model
    monkeypatch.setattr(Accelerator, "prepare_model",
                        lambda self, model, **kwargs: prepare(self, copy.deepcopy(model), **kwargs))
    model, data = tiny
    config = write_config(tmp_path / "c.yaml", model, data, tmp_path / "run", max_steps=2)
    parts = build_run_parts(resolve(config_file=str(config), sets=["model.quantize=false"]), None, quiet=True)
    used = {id(p) for p in parts.policy.parameters() if p.requires_grad}
    stepped = [id(p) for group in parts.optimizer.param_groups for p in group["params"]]
    assert stepped and set(stepped) == used


def test_the_runs_last_eval_and_simpo_lite_eval_of_the_run_agree(uninterrupted):
    """One model, one set of numbers: eval loads the run exactly as training ran it (4-bit, peft's fp32
    upcast of the frozen weights on the CPU, the saved adapter), on the same held-out pairs."""
    from simpo_lite.evaluate import evaluate_command

    end = json.loads((uninterrupted / "summary.json").read_text())["end_eval"]
    result = evaluate_command(str(uninterrupted))
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen",
                "eval_logps/rejected"):
        assert result[key] == pytest.approx(end[key], abs=1e-5), key
