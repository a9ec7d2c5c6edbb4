"""Where results go: an output path that cannot be written is one line before any work (never a traceback
after it, never 'disk full'); a mistyped local name sent to the Hub gets the local 'did you mean'."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from simpo_lite import files
from simpo_lite.errors import UserError
from tiny_models import tiny_model_folder, tiny_run_folder

Usage = namedtuple("Usage", "total used free")


def cli(*args, cwd=None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "simpo_lite", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "existing.json"
    path.write_text("{}")
    return path


def no_work(*args, **kwargs):
    raise AssertionError("the command started its work before checking --out")


# ---- the check itself ----------------------------------------------------------------------------

def test_output_paths_that_cannot_be_written_are_one_line_and_leave_nothing(tmp_path, a_file):
    with pytest.raises(UserError, match=r"--out '.*existing.json/x.json': '.*existing.json' is a file, not a folder"):
        files.check_output_path(a_file / "x.json")
    with pytest.raises(UserError, match=r"'.*existing.json' is a file"):
        files.check_output_path(a_file / "deeper" / "x.json")
    with pytest.raises(UserError, match="is a folder: give a file path"):
        files.check_output_path(tmp_path)
    with pytest.raises(UserError, match="--output-dir '.*existing.json' is a file: give a folder path"):
        files.check_output_path(a_file, "--output-dir", folder=True)
    fine = tmp_path / "new" / "deeper" / "out.json"
    assert files.check_output_path(fine) == fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.json"]  # no probe or folder left behind


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_files_is_named_not_a_full_disk():
    with pytest.raises(UserError, match=r"cannot create files in '/proc' \(.*\): choose another --out"):
        files.check_output_path(Path("/proc/nope/x"), folder=True)


def test_a_full_disk_is_only_what_the_os_says_is_one(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 0))
    # Another cause named by the OS is never the disk, however little space is left.
    assert not files.is_disk_full(FileExistsError(errno.EEXIST, "File exists"), tmp_path)
    assert not files.is_disk_full(FileNotFoundError(errno.ENOENT, "No such file"), tmp_path)
    assert files.is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    # A library that hides the OS error (torch.save) on a real file system with no room left: still the disk.
    assert files.is_disk_full(RuntimeError("unexpected pos 64 vs 0"), tmp_path)
    # /proc and /sys read 0 bytes free of 0: no size at all, not a full disk.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(0, 0, 0))
    assert not files.is_disk_full(RuntimeError("unexpected pos 64 vs 0"), tmp_path)


# ---- every command that writes where it is told ----------------------------------------------------

def test_eval_and_generate_check_out_before_loading_anything(a_file, monkeypatch):
    from simpo_lite import target
    from simpo_lite.evaluate import evaluate_command
    from simpo_lite.generate import generate_command

    monkeypatch.setattr(target, "resolve_target", no_work)
    for command in (evaluate_command, generate_command):
        with pytest.raises(UserError, match="existing.json' is a file, not a folder"):
            command("smollm2-135m-instruct", out=a_file / "x.json")
    assert a_file.read_text() == "{}"


def test_report_checks_out_before_plotting(tmp_path, a_file, monkeypatch):
    from simpo_lite import run_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.7}) + "\n")
    monkeypatch.setattr(run_report, "plot", no_work)
    with pytest.raises(UserError, match="existing.json' is a file, not a folder"):
        run_report.report_command(run, out=a_file / "x.png")


def test_sweep_checks_its_output_dir_before_any_trial(a_file, monkeypatch):
    from simpo_lite import sweep

    monkeypatch.setattr(sweep, "run_sweep", no_work)
    with pytest.raises(UserError, match="--output-dir '.*existing.json/sw': '.*existing.json' is a file"):
        sweep.sweep_command("smollm2-demo", None, [], ["train.learning_rate=[1e-5]"], max_steps=1, train_pairs=None,
                            output_dir=a_file / "sw", trials=None, budget_minutes=None, resume=None, overwrite=False,
                            quiet=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    base = tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")
    return tiny_run_folder(tmp_path_factory.mktemp("runs") / "r2", base)


@pytest.mark.parametrize("out, says", [
    ("{file}/sub", "is a file, not a folder"),
    ("/proc/nope/x", "cannot create files in '/proc'"),
])
def test_cli_export_to_an_unwritable_out_is_one_line(tiny_run, a_file, out, says):
    if out.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    line = one_error_line(cli("export", str(tiny_run), "--adapter-only", "--out", out.format(file=a_file)))
    assert says in line and "disk full" not in line


def test_cli_export_prints_its_result_on_stdout(tiny_run, tmp_path):
    out = tmp_path / "exported"
    done = cli("export", str(tiny_run), "--adapter-only", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [f"exported to {out}"]  # OUT=$(simpo-lite export ...) gets it
    assert "exported to" not in done.stderr and "done in" in done.stderr


# ---- a mistyped local name that went to the Hub ------------------------------------------------------

def test_cli_eval_of_a_mistyped_bare_run_name_suggests_the_local_folder(tiny_run):
    # Run from the runs' folder, with this checkout's package rather than whichever one is installed.
    root = str(Path(__file__).resolve().parent.parent)
    done = cli("eval", "r2x", cwd=tiny_run.parent, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": root})
    assert "no local folder 'r2x' (did you mean 'r2'?)" in one_error_line(done)


def test_an_unreachable_hub_names_the_close_local_folder(tmp_path, monkeypatch):
    from simpo_lite.hub_fetch import _refusal

    (tmp_path / "r2").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _refusal("r2x", None, ConnectionError("no network")).endswith("; no local folder 'r2x' (did you mean 'r2'?)")
    assert "no local" not in _refusal("HuggingFaceTB/SmolLM2-1.7B", None, ConnectionError("no network"))


def test_a_mistyped_data_file_read_as_a_hub_id_suggests_the_local_file(tmp_path, monkeypatch):
    from simpo_lite.data.sources import load_source

    (tmp_path / "good.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"; no local file 'good.jsnol' \(did you mean 'good.jsonl'\?\)$"):
        load_source("good.jsnol", None, "train")
    with pytest.raises(UserError) as far:
        load_source("someone/preferences", None, "train")
    assert "no local" not in str(far.value)
