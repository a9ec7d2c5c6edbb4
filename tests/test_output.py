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
