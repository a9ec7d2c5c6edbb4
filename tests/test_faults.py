"""Faults and hostile input: a full disk, a damaged checkpoint, files that are not UTF-8, folders that are
not models, mistyped paths, a resume under another config. Each is one line, nothing saved is lost, and a
way forward is printed; a run folder left by a fault resumes to the same losses as an unbroken run."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tiny_models import SHORT_RUN, short_run_config, tiny_run_inputs, train_config as train, train_losses, write_config

from simpo_lite import files, run_folder
from simpo_lite.errors import DiskFull, UserError

# A 4-step short run (tiny_models.SHORT_RUN): two checkpoints, the final adapter and every other save point.
RUN = dict(max_steps=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("tiny"))


def config_for(tiny, folder: Path, **train) -> Path:
    return short_run_config(tiny, folder, **{**RUN, **train})


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "simpo_lite", *args], capture_output=True, text=True, **kwargs)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(run: Path) -> list[str]:
    """Temporary files and folders of interrupted writes."""
    return sorted(p.name for p in run.iterdir() if ".tmp" in p.name or p.name.endswith(".old"))


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The unbroken run."""
    root = tmp_path_factory.mktemp("reference")
    train(config_for(tiny, root))
    return root / "run"


# ---- a full disk --------------------------------------------------------------------------------

class _FailingHandle:
    """A file handle whose writes stop half-way with a full disk."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def write(self, data):
        self.handle.write(data[:len(data) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def _enospc(*_):
    raise OSError(errno.ENOSPC, "No space left on device")


class SavePoints:
    """Wraps the project's writers (files.write_file, which write_text and write_json use; append_line;
    write_folder) to list every save of a run, or to fail the n-th with ENOSPC half-way through it."""

    def __init__(self, monkeypatch, fail_at: int | None = None):
        self.seen: list[str] = []
        self.fail_at = fail_at
        write_file, write_folder, append_line = files.write_file, files.write_folder, files.append_line

        def failing(name: str) -> bool:
            self.seen.append(name)
            return len(self.seen) - 1 == self.fail_at

        def file_(path, fill, *args, **kwargs):
            if failing(Path(path).name):
                def fill(tmp, fill=fill):  # the file is written, the rename never happens
                    fill(tmp)
                    _enospc()
            return write_file(path, fill, *args, **kwargs)

        def folder_(target, fill, *args, **kwargs):
            if failing(Path(target).name):
                def fill(tmp, fill=fill):
                    fill(tmp)
                    _enospc()
            return write_folder(target, fill, *args, **kwargs)

        def append_(path, line, *args, **kwargs):
            if not failing(Path(path).name):
                return append_line(path, line, *args, **kwargs)
            real_open = Path.open
            monkeypatch.setattr(Path, "open", lambda self, *a, **k: _FailingHandle(real_open(self, *a, **k)))
            try:
                return append_line(path, line, *args, **kwargs)
            finally:
                monkeypatch.setattr(Path, "open", real_open)

        monkeypatch.setattr(files, "write_file", file_)
        for module in ("simpo_lite.files", "simpo_lite.run_folder"):
            monkeypatch.setattr(f"{module}.write_folder", folder_)
            monkeypatch.setattr(f"{module}.append_line", append_)


def test_a_failed_append_leaves_whole_lines(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    files.append_line(path, json.dumps({"step": 1}))
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: _FailingHandle(open(self, *a, **k)))
    with pytest.raises(DiskFull, match=r"disk full while writing metrics.jsonl .*needs about 13 bytes"):
        files.append_line(path, json.dumps({"step": 22}))
    assert path.read_text() == '{"step": 1}\n'


def test_save_points_sweep_every_fault_leaves_a_resumable_run(tiny, reference, tmp_path, monkeypatch):
    """Fail one save of each kind (the first of every file, and the second checkpoint) half-way with
    ENOSPC: one DiskFull naming the file and the way on, nothing earlier damaged, no temporary files
    left, and resuming as the message says ends with the unbroken run's losses."""
    listing = SavePoints(monkeypatch)
    train(config_for(tiny, tmp_path / "count"))
    monkeypatch.undo()
    first = {}
    for index, name in enumerate(listing.seen):
        first.setdefault(name, index)
    points = sorted(first.values())
    assert {"config.yaml", "metrics.jsonl", "samples.jsonl", "checkpoint-2", "checkpoint-4", "adapter",
            "summary.json"} <= {listing.seen[i] for i in points}
    expected = train_losses(reference)
    for point in points:
        name, folder = listing.seen[point], tmp_path / f"fail-{point}"
        config = config_for(tiny, folder)
        run = folder / "run"
        SavePoints(monkeypatch, fail_at=point)
        with pytest.raises(DiskFull) as caught:
            train(config)
        monkeypatch.undo()
        message = str(caught.value)
        assert caught.value.exit_code == 1 and "\n" not in message
        assert message.startswith("disk full while writing ") and name in message, message
        assert leftovers(run) == [], (name, leftovers(run))
        assert all(run_folder.checkpoint_problem(c) is None for c in run_folder.checkpoints(run)), name
        for kept in ("metrics.jsonl", "samples.jsonl"):
            if (run / kept).exists():  # every line whole
                assert all(json.loads(line) for line in (run / kept).read_text().splitlines()), name
        if run_folder.checkpoints(run):
            assert "is intact" in message and f"--config {run / 'config.yaml'} --resume" in message, message
            train(config, resume="latest")
        else:
            assert "no checkpoint was written yet" in message, message
            train(config, overwrite=True)
        assert train_losses(run) == pytest.approx(expected, rel=1e-5, abs=1e-6), name
        assert json.loads((run / "summary.json").read_text())["steps"] == 4


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs mounted at tmp_path/disk (root only); (mount point, function resizing it in bytes)."""
    if not _is_root() or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (CI machines may not be); the save-point sweep covers the logic")
    disk = tmp_path / "disk"
    disk.mkdir()
    size = lambda n: f"size={max(n // 4096, 1) * 4096}"  # noqa: E731
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", size(1 << 20), "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")

    def resize(n: int) -> None:
        subprocess.run(["mount", "-o", f"remount,{size(n)}", str(disk)], check=True)

    yield disk, resize
    subprocess.run(["umount", "-l", str(disk)])


def test_a_disk_too_small_for_the_second_checkpoint(tiny, reference, small_tmpfs, tmp_path):
    """A real full disk (a tmpfs): one line with the size needed and the resume command, exit 1; the first
    checkpoint survives, and after making room the printed command finishes the run as if unbroken."""
    disk, resize = small_tmpfs
    checkpoint = files.folder_size(reference / "checkpoint-2")
    before = sum(files.folder_size(reference / n) for n in ("config.yaml", "metrics.jsonl", "samples.jsonl"))
    resize(before + checkpoint + checkpoint // 2 + 64 * 1024)
    config = write_config(tmp_path / "c.yaml", *tiny, disk / "run", **{**SHORT_RUN, **RUN})
    result = cli("train", "--config", str(config))
    line = one_error_line(result.stderr)
    assert result.returncode == 1, result.stderr
    assert line.startswith("error: disk full while writing checkpoint-4") and "needs about" in line, line
    assert "checkpoint-2 (step 2) is intact" in line and f"--config {disk / 'run' / 'config.yaml'} --resume" in line
    run = disk / "run"
    assert run_folder.checkpoint_problem(run / "checkpoint-2") is None and leftovers(run) == []
    resize(64 << 20)
    command = line.split("continue with: ", 1)[1].split()
    resumed = cli(*command[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert train_losses(run) == pytest.approx(train_losses(reference), rel=1e-5, abs=1e-6)


# ---- a damaged checkpoint -------------------------------------------------------------------------

def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_file_checks_find_truncated_weights(reference, tmp_path):
    for name in ("adapter_model.safetensors", "optimizer.pt"):
        copy = tmp_path / name
        shutil.copy(reference / "checkpoint-4" / name, copy)
        assert (files.check_safetensors if name.endswith("safetensors") else files.check_torch_file)(copy) is None
        truncate(copy)
        check = files.check_safetensors if name.endswith("safetensors") else files.check_torch_file
        assert check(copy) and name in check(copy)


def test_resume_passes_over_a_truncated_newest_checkpoint_and_keeps_it(tiny, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    truncate(run / "checkpoint-4" / "adapter_model.safetensors")
    damaged = (run / "checkpoint-4" / "adapter_model.safetensors").read_bytes()
    config = config_for(tiny, tmp_path)
    explicit = cli("train", "--config", str(config), "--resume", str(run / "checkpoint-4"))
    assert explicit.returncode == 2
    line = one_error_line(explicit.stderr)
    assert "adapter_model.safetensors is truncated" in line and f"--resume {run / 'checkpoint-2'}" in line, line
    result = cli("train", "--config", str(config), "--resume")
    assert result.returncode == 0, result.stderr
    assert "checkpoint-4 cannot be resumed from: adapter_model.safetensors is truncated" in result.stderr
    assert f"resuming from {run / 'checkpoint-2'} (step 2), the newest intact checkpoint" in result.stderr
    assert (run / "checkpoint-4.damaged" / "adapter_model.safetensors").read_bytes() == damaged
    assert train_losses(run) == pytest.approx(train_losses(reference), rel=1e-5, abs=1e-6)
    # The resumed run's summary keeps its start, its earlier time, and says where it resumed.
    summary = json.loads((run / "summary.json").read_text())
    earlier = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["train_seconds"]
    assert summary["start_eval"]["step"] == 0 and summary["end_eval"]["step"] == 4
    assert summary["resumed_from"] == str(run / "checkpoint-2") and summary["train_seconds"] > earlier > 0
    assert "resumed from" in result.stderr


# ---- --resume under another config ----------------------------------------------------------------

def test_resume_under_another_config_refuses_before_changing_anything(tiny, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = snapshot(run)
    config = config_for(tiny, tmp_path)
    result = cli("train", "--config", str(config), "--resume", "--set", "lora.r=8", "--set", "data.max_length=48")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "lora.r (8 now, 4 in the checkpoint)" in line and "data.max_length (48 now, 64" in line, line
    assert f"--config {run / 'config.yaml'} --resume" in line and "train.max_steps" in line
    assert snapshot(run) == before


def test_resume_may_train_longer(tiny, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    config = config_for(tiny, tmp_path)
    train(config, resume="latest", sets=["train.max_steps=6", "train.eval_steps=3"])
    assert sorted(train_losses(run)) == list(range(1, 7))
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


# ---- data files that are not UTF-8 ----------------------------------------------------------------

@pytest.mark.parametrize("suffix, content", [
    (".jsonl", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n'),
    (".csv", b"prompt,chosen,rejected\na,b,c\ncaf\xe9,b,c\n"),
    (".json", b'[{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}]'),
])
def test_data_that_is_not_utf8_is_one_line_with_where(tmp_path, suffix, content):
    from simpo_lite.data.sources import load_source

    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    offset = content.index(b"\xe9")
    with pytest.raises(UserError) as caught:
        load_source(str(path), None, "train")
    message = str(caught.value)
    line = content[:offset].count(b"\n") + 1
    assert f"byte 0xe9 at line {line} (byte offset {offset})" in message and str(path) in message, message
    assert "UTF-8" in message and "\n" not in message


def test_first_non_utf8_across_chunk_boundaries(tmp_path):
    path = tmp_path / "big.jsonl"
    text = ("é" * 3_000_000 + "\n").encode()  # multi-byte characters cut by the 4 MiB read chunks
    path.write_bytes(text + text + b"\xff")
    assert files.first_non_utf8(path) == (2 * len(text), 3, 0xFF)
    path.write_bytes(text)
    assert files.first_non_utf8(path) is None


def test_cli_names_the_file_of_binary_data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(bytes(range(256)))
    result = cli("data", "inspect", "--data", str(path))
    assert result.returncode == 2
    assert f"'{path}' is not UTF-8 text: byte 0x80 at line 2 (byte offset 128)" in one_error_line(result.stderr)


# ---- model folders that are not models, mistyped paths --------------------------------------------

@pytest.fixture(scope="module")
def broken_models(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    model, _ = tiny
    made = {}
    for name in ("empty_config", "partial_config", "no_weights", "truncated_weights", "no_tokenizer"):
        made[name] = shutil.copytree(model, root / name)
    (made["empty_config"] / "config.json").write_text("")
    truncate(made["partial_config"] / "config.json")
    (made["no_weights"] / "model.safetensors").unlink()
    truncate(made["truncated_weights"] / "model.safetensors")
    for f in ("tokenizer.json", "vocab.json", "merges.txt"):
        (made["no_tokenizer"] / f).unlink(missing_ok=True)
    return made


@pytest.mark.parametrize("name, fragment", [
    ("empty_config", "config.json is empty"),
    ("partial_config", "config.json is not valid JSON"),
    ("no_weights", "has no weights (model.safetensors"),
    ("truncated_weights", "model.safetensors is truncated"),
    ("no_tokenizer", "has tokenizer_config.json but no tokenizer files"),
])
def test_a_folder_that_is_not_a_model_says_what_it_lacks(broken_models, name, fragment):
    from simpo_lite.config import ModelConfig
    from simpo_lite.model import load_base_model, load_tokenizer

    cfg = ModelConfig(name_or_path=str(broken_models[name]), quantize=False)
    with pytest.raises(UserError) as caught:
        load_tokenizer(cfg)
        load_base_model(cfg)
    assert fragment in str(caught.value) and str(broken_models[name]) in str(caught.value), str(caught.value)


def test_a_mistyped_run_folder_is_not_found_at_once_with_the_nearest_one(tmp_path, monkeypatch):
    from simpo_lite.target import resolve_target

    (tmp_path / "runs" / "smollm2-demo").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"'runs/smollm2-dem' not found; did you mean 'runs/smollm2-demo'\?"):
        resolve_target("runs/smollm2-dem")
    assert files.looks_like_local_path("runs/x") and not files.looks_like_local_path("HuggingFaceTB/SmolLM2")


def test_cli_eval_of_a_mistyped_path_never_asks_the_hub(tmp_path):
    (tmp_path / "runs" / "smollm2-demo").mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://{uuid.uuid4().hex}.invalid"}
    result = cli("eval", "runs/smollm2-dem", cwd=tmp_path, env=env, timeout=60)
    assert result.returncode == 2
    assert "did you mean 'runs/smollm2-demo'" in one_error_line(result.stderr)
    assert "invalid" not in result.stderr


# ---- what data preparation kept ---------------------------------------------------------------------

def test_the_data_counts_line_names_kept_skipped_and_truncated(tmp_path):
    from tiny_models import smollm2_tokenizer

    from simpo_lite.config import DataConfig
    from simpo_lite.data import build_datasets

    rows = [{"prompt": f"Question {i}?", "chosen": "Yes.", "rejected": "No."} for i in range(8)]
    rows.append({"prompt": "word " * 200, "chosen": "Yes.", "rejected": "No."})  # cut to max_prompt_length
    rows.append({"prompt": "Q?", "chosen": "", "rejected": "No."})  # skipped by a rule
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(path), eval_fraction=0.0, max_length=128, max_prompt_length=64, max_bad_fraction=0.5)
    line = build_datasets(cfg, smollm2_tokenizer(), seed=0).report.counts_line()
    assert line.startswith("data: 9 train + 0 eval pairs kept; skipped by rule: 1 (")
    assert line.endswith("; prompt truncated to data.max_prompt_length: 1"), line


def test_a_full_disk_while_replacing_a_folder_keeps_the_old_one(tmp_path):
    target = tmp_path / "merged"
    files.write_folder(target, lambda tmp: (tmp / "model.safetensors").write_bytes(b"old"))

    def fill(tmp):
        (tmp / "model.safetensors").write_bytes(b"new" * 1000)
        _enospc()

    with pytest.raises(DiskFull, match=r"writing the merged export .*needs more than 3.0 KB.*run the export again"):
        files.write_folder(target, fill, what="the merged export", hint="run the export again")
    assert (target / "model.safetensors").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_an_interrupt_between_the_two_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "merged"
    files.write_folder(target, lambda tmp: (tmp / "model.safetensors").write_bytes(b"old"))
    rename = Path.rename

    def interrupted_after_the_first(self, to):
        result = rename(self, to)
        if to.name == ".merged.old":
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(Path, "rename", interrupted_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        files.write_folder(target, lambda tmp: (tmp / "model.safetensors").write_bytes(b"new"))
    assert (target / "model.safetensors").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_a_killed_writers_unfinished_folder_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".merged.tmp-{int(dead.stdout)}-{files._HOST}-abc123"
    (orphan / "model.safetensors").parent.mkdir()
    (orphan / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".merged.tmp-{os.getpid()}-{files._HOST}-def456"  # a writer still at work is left alone
    elsewhere = tmp_path / f".merged.tmp-{int(dead.stdout)}-0000beef-ghi789"  # another host's: its pids aren't ours
    live.mkdir()
    elsewhere.mkdir()
    files.write_folder(tmp_path / "merged", lambda tmp: (tmp / "model.safetensors").write_bytes(b"new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", live.name, elsewhere.name])


def test_sigterm_is_an_interrupt_in_every_command(monkeypatch, capsys):
    """`timeout`, schedulers and `docker stop` send SIGTERM; without a handler an export died where it
    stood and left its unfinished folder behind."""
    import signal

    import simpo_lite.plan_report
    from simpo_lite.cli import main

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(simpo_lite.plan_report, "plan_command", terminated)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["plan", "--preset", "smollm2-demo"])
    finally:
        signal.signal(signal.SIGTERM, before)
    assert exit_info.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_a_full_dataset_cache_is_one_line(tmp_path, monkeypatch):
    import datasets

    from simpo_lite.data.sources import load_source

    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\n")

    def full(*args, **kwargs):
        raise datasets.exceptions.DatasetGenerationError("An error occurred") from OSError(errno.ENOSPC, "full")

    monkeypatch.setattr(datasets, "load_dataset", full)
    with pytest.raises(DiskFull, match=r"writing the dataset cache .*HF_DATASETS_CACHE"):
        load_source(str(path), None, "train")


def test_errors_that_are_not_the_disk_pass_through(tmp_path):
    with pytest.raises(ValueError, match="not the disk"):
        with files.guard("x", tmp_path):
            raise ValueError("not the disk")


def test_a_truncated_final_adapter_is_named_by_export_and_eval(reference, tmp_path):
    from simpo_lite.export import export_run
    from simpo_lite.target import resolve_target

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    truncate(run / "adapter" / "adapter_model.safetensors")
    for read in (lambda: export_run(run), lambda: resolve_target(str(run))):
        with pytest.raises(UserError, match=r"adapter_model.safetensors is truncated.*checkpoint-N"):
            read()


# ---- kernels a machine cannot run --------------------------------------------------------------------

def test_liger_kernels_without_a_cuda_gpu_are_one_line_before_any_model_loads(tiny, tmp_path):
    result = cli("train", "--config", str(config_for(tiny, tmp_path)), "--set", "model.kernels=liger",
                 "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "model.kernels: liger needs a CUDA GPU" in line and "leave model.kernels at none" in line, line
    assert "train + " not in result.stderr  # refused before the data was even prepared
    assert not (tmp_path / "run" / "checkpoint-2").exists()


def test_liger_kernels_on_a_gpu_without_the_package_say_what_to_install(monkeypatch):
    import importlib.util

    from simpo_lite.config import ModelConfig
    from simpo_lite.errors import UserError
    from simpo_lite.kernels import check_kernels

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install liger-kernel"):
        check_kernels(ModelConfig(kernels="liger"), cuda_available=True)
    check_kernels(ModelConfig(kernels="none"), cuda_available=False)  # the default asks nothing of the machine


def test_a_utf16_file_is_told_how_to_convert_from_utf16(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("train:\n  seed: 1\n".encode("utf-16"))
    with pytest.raises(UserError, match=r"looks like UTF-16.*iconv -f utf-16 -t utf-8"):
        files.check_utf8(path, "a config file is YAML text")


def test_a_resume_over_other_training_data_is_refused_before_the_model_loads(tiny, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    state_file = run / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["train_pairs"] > 0  # recorded by every checkpoint
    state_file.write_text(json.dumps({**state, "train_pairs": state["train_pairs"] + 3}))
    with pytest.raises(UserError, match=rf"now gives {state['train_pairs']} pairs, .*checkpoint-4 trained on "
                                        rf"{state['train_pairs'] + 3}"):
        train(config_for(tiny, tmp_path), resume="latest")
