"""What the commands print: only our own lines unless --verbose, results on stdout, messages on stderr,
names and commands never cut when piped."""

import json
import re
import subprocess
import sys

import pytest

from tiny_models import tiny_model_folder, tiny_run_folder, write_pairs

# Lines from libraries: warnings, their source lines, tqdm bars, datasets' map bars, log records.
NOISE = re.compile(r"Warning\b|warnings\.warn|Loading weights|\d+%\||it/s\]|kernels-community|Map( \(num_proc)?.*:|"
                   r"Generating \w+ split|^(WARNING|INFO):|Traceback")


def simpo_lite(*args, timeout=1200):
    import os

    from simpo_lite.console import QUIET_ENV

    # Tests that ran main() in this process set the quiet variables here; a user's shell has none.
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    return subprocess.run([sys.executable, "-m", "simpo_lite", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if NOISE.search(line)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", sharpen=True)


def test_library_lines_show_only_with_verbose(tmp_path, model_dir):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 12)
    args = ["eval", str(model_dir), "--data", str(pairs), "--set", "data.eval_fraction=0.5"]
    quiet, verbose = simpo_lite(*args), simpo_lite(*args, "--verbose")
    assert quiet.returncode == 0 and verbose.returncode == 0, quiet.stderr[-2000:]
    assert noise(quiet.stderr) == [] and noise(quiet.stdout) == []
    assert any("Loading weights" in line for line in noise(verbose.stderr))  # what --verbose lets through
    # The metrics are the result: on stdout, as plain rows when piped; what was measured is a message.
    assert re.search(r"^eval_rewards/accuracies\t[0-9.]+$", quiet.stdout, re.M)
    assert "eval pairs of" in quiet.stderr and "eval pairs of" not in quiet.stdout


@pytest.mark.e2e
def test_demo_train_and_export_print_only_our_lines(tmp_path):
    run = tmp_path / "demo"
    train = simpo_lite("train", "--output-dir", str(run), "--max-steps", "1", "--set", "data.eval_max_pairs=4",
                       "--set", "data.max_train_pairs=8", "--set", "train.health_prompts=2",
                       "--set", "train.health_max_new_tokens=8")
    assert train.returncode == 0, train.stderr[-3000:]
    assert noise(train.stderr) == [], train.stderr
    # The summary is the result; its last line is a command to copy, whole.
    assert "eval_rewards/accuracies\t" in train.stdout and "eval_rewards" not in train.stderr
    assert train.stdout.splitlines()[-1].endswith(f"merge it with: simpo-lite export {run}")
    export = simpo_lite("export", str(run))
    assert export.returncode == 0, export.stderr[-3000:]
    assert noise(export.stderr) == [], export.stderr


def test_presets_list_piped_keeps_full_names_and_json():
    from simpo_lite import config as cfgmod

    listing = simpo_lite("presets", "list")
    rows = [line.split("\t") for line in listing.stdout.splitlines()]
    assert rows[0] == ["preset", "model", "data", "beta", "gamma/beta", "lr"]
    assert [row[0] for row in rows[1:]] == list(cfgmod.preset_names())
    assert ["mistral-7b-instruct-lora", "mistralai/Mistral-7B-Instruct-v0.2"] in [row[:2] for row in rows]
    assert "…" not in listing.stdout
    as_json = json.loads(simpo_lite("presets", "list", "--json").stdout)
    assert [p["preset"] for p in as_json] == list(cfgmod.preset_names())
    assert as_json[0]["model"] == cfgmod.resolve(as_json[0]["preset"]).model.name_or_path
    assert as_json[0]["lr"] == cfgmod.resolve(as_json[0]["preset"]).train.learning_rate  # a number, for jq


def test_a_long_message_line_is_not_broken_when_piped(tmp_path, model_dir):
    run = tiny_run_folder(tmp_path / "a-run-folder-with-a-rather-long-name-to-pass-eighty-columns", model_dir)
    out = simpo_lite("export", str(run), "--adapter-only")
    assert out.returncode == 0, out.stderr
    assert f"exported to {run / 'adapter-export'}" in out.stdout.splitlines()  # the result: stdout


def test_export_overwrite_and_its_deprecated_name_force(tmp_path, model_dir):
    run = tiny_run_folder(tmp_path / "run", model_dir)
    assert simpo_lite("export", str(run), "--adapter-only").returncode == 0
    again = simpo_lite("export", str(run), "--adapter-only")
    assert again.returncode == 2 and "add --overwrite to replace it" in again.stderr
    assert simpo_lite("export", str(run), "--adapter-only", "--overwrite=true").returncode == 0
    forced = simpo_lite("export", str(run), "--adapter-only", "--force")
    assert forced.returncode == 0 and "--force is now --overwrite" in forced.stderr
    assert "--force" not in simpo_lite("export", "-h").stdout


def test_the_progress_eta_keeps_evaluations_out_of_the_steps_pace():
    """A 60 s evaluation before step 1 made the first ETA twice the run; here 100 s have passed, 20 of
    them in one evaluation, over 2 of 10 steps: 8 steps at 40 s and the 2 evaluations left at 20 s."""
    import time

    from simpo_lite.progress import Progress

    progress = Progress(total_steps=10, start_step=0, quiet=True, eval_every=5)
    progress.started = time.perf_counter() - 100
    progress.eval_seconds = [20.0]
    assert progress.eta(2) == pytest.approx(8 * 40 + 2 * 20, rel=1e-3)
    assert Progress(total_steps=12, start_step=0, quiet=True, eval_every=5).eta(12) == 0  # nothing left


def test_the_progress_bar_keeps_step_and_eta_on_an_80_column_terminal(monkeypatch):
    import io

    from rich.console import Console

    import simpo_lite.progress as progress_module

    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system=None)
    real = progress_module._StatsBelow
    monkeypatch.setattr(progress_module, "_StatsBelow", lambda *columns, **options: real(*columns, console=console,
                                                                                           **options))
    progress = progress_module.Progress(total_steps=30, start_step=0, quiet=False)
    progress.update(4, {"loss": 9.894, "rewards/accuracies": 0.0, "rewards/margins": -1.368, "tokens_per_s": 23,
                        "peak_mem_mb": 2248})
    progress.close()
    shown = out.getvalue()
    assert "4/30" in shown and re.search(r"eta \d+:\d\d:\d\d", shown)
    assert "loss 9.8940  acc 0.00  margin -1.368  23 tok/s  peak 2248 MB" in shown


def test_paths_with_brackets_reach_the_user_as_written(tmp_path, capsys):
    """A sweep names runs like exp[lr=1e-4]; markup took the brackets for a tag and printed 'runs/exp'."""
    from simpo_lite.progress import print_summary

    run = tmp_path / "exp[lr=1e-4]"
    print_summary({"steps": 3, "train_seconds": 9.0, "peak_mem_mb": 100.0, "resumed_from": str(run / "checkpoint-2")},
                  run)
    out = capsys.readouterr().out
    assert f"resumed from\t\t{run}/checkpoint-2" in out
    assert f"merge it with: simpo-lite export {run}" in out


def test_a_run_without_eval_data_ends_with_its_training_figures(tmp_path, capsys):
    import json

    from simpo_lite.progress import print_summary

    records = [{"step": s, "loss": 1.0 - s / 20, "rewards/accuracies": s / 10, "rewards/margins": s / 5}
               for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print_summary({"steps": 10, "train_seconds": 9.0, "peak_mem_mb": 100.0}, tmp_path)
    out = capsys.readouterr().out
    assert "train loss (no eval data)\t0.9500\t0.5000" in out
    assert "train rewards/accuracies (no eval data)\t0.1000\t1.0000" in out
