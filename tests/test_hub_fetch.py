"""A Hub model fetched before loading, against a local stand-in for the Hub's download API: announced with
its size, only the files loading reads, loaded from the cache when the Hub is gone, and one line at once
when the Hub cannot be reached or refuses the model."""

import hashlib
import json
import re
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tiny_models import free_port, tiny_model_folder, write_pairs

import simpo_lite.hub_fetch as hub_fetch
from simpo_lite.hub_fetch import PLAIN_EVERY_S, SHOWN_FROM_BYTES, _Lines, data_files, wanted_files, watched

SHA = "a" * 40


class HubFiles(ThreadingHTTPServer):
    """The model-info and file-resolve routes of the Hub for a few repositories; it records each request."""

    def __init__(self, repos: dict[str, dict[str, bytes]], gated: tuple[str, ...] = ()):
        super().__init__(("127.0.0.1", 0), _FilesHandler)
        self.repos, self.gated = repos, gated
        self.requests: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class _FilesHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self._route(body=True)

    def do_HEAD(self):
        self._route(body=False)

    def _send(self, status: int, payload: bytes, headers: dict, body: bool) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _error(self, status: int, code: str, body: bool) -> None:
        self._send(status, json.dumps({"error": code}).encode(), {"X-Error-Code": code,
                                                                  "Content-Type": "application/json"}, body)

    def _route(self, body: bool) -> None:
        hub: HubFiles = self.server
        url = urlparse(self.path)
        hub.requests.append((self.command, url.path))
        parts = url.path.strip("/").split("/")
        api = parts[0] == "api"  # /api/{models|datasets}/{repo}/...; files: /[datasets/]{repo}/resolve/...
        if api or parts[0] == "datasets":
            kind, parts = (parts[1], parts[2:]) if api else ("datasets", parts[1:])
        else:
            kind = "models"
        repo, rest = "/".join(parts[:2]), parts[2:]
        key = repo if kind == "models" else f"datasets/{repo}"
        if repo in hub.gated:
            return self._error(403, "GatedRepo", body)
        if key not in hub.repos:
            return self._error(404, "RepoNotFound", body)
        files = hub.repos[key]
        if api and rest[:1] == ["tree"]:  # /api/{kind}/{repo}/tree/{rev}[/{folder}]: listings
            folder = "/".join(rest[2:])
            tree = _tree(files, folder, recursive="recursive=true" in url.query.lower())
            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
        if api:  # /api/{kind}/{repo}[/revision/{rev}]
            siblings = [{"rfilename": name, "size": len(data)} for name, data in files.items()]
            payload = json.dumps({"id": repo, "sha": SHA, "siblings": siblings}).encode()
            return self._send(200, payload, {"Content-Type": "application/json"}, body)
        name = "/".join(rest[2:])  # resolve/{rev}/{name}
        if rest[:1] != ["resolve"] or name not in files:
            return self._error(404, "EntryNotFound", body)
        etag = hashlib.sha256(files[name]).hexdigest()
        self._send(200, files[name], {"X-Repo-Commit": SHA, "ETag": f'"{etag}"'}, body)


def _tree(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict]:
    prefix = f"{folder}/" if folder else ""
    entries, folders = [], set()
    for name, data in files.items():
        if not name.startswith(prefix):
            continue
        below = name[len(prefix):]
        if "/" in below and not recursive:
            folders.add(prefix + below.split("/")[0])
            continue
        entries.append({"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()})
    return entries + [{"type": "directory", "path": path, "oid": "0" * 40} for path in sorted(folders)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    folder = tiny_model_folder(root / "tiny")
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files["original/consolidated.00.pth"] = b"\0" * 4096  # a second copy transformers never reads
    files["padding.json"] = b" " * SHOWN_FROM_BYTES  # a weights fetch large enough to be announced
    dataset = {"README.md": b"# preference pairs\n",
               "data/train-00000-of-00001.jsonl": write_pairs(root / "train.jsonl", 40, seed=1).read_bytes(),
               "data/test-00000-of-00001.jsonl": write_pairs(root / "test.jsonl", 8, seed=2).read_bytes()}
    server = HubFiles({"tester/tiny": files, "datasets/tester/prefs": dataset}, gated=("tester/gated",))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, root
    server.shutdown()


def run_cli(*args, endpoint: str, home: Path):
    """The CLI with its own Hugging Face cache (`home`), talking to `endpoint` instead of the Hub."""
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0"}
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "simpo_lite", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_loading_reads_the_top_level_files_it_needs_and_nothing_else():
    names = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "README.md",
             "original/consolidated.00.pth", "original/tokenizer.model", "pytorch_model.bin", "onnx/model.onnx"]
    assert wanted_files(names, "config") == ["config.json"]
    assert wanted_files(names, "tokenizer") == ["chat_template.jinja", "config.json", "special_tokens_map.json",
                                                "tokenizer.json", "tokenizer_config.json"]
    weights = wanted_files(names, "weights")
    assert "model-00002-of-00002.safetensors" in weights and "model.safetensors.index.json" in weights
    assert not [n for n in weights if n.startswith(("original/", "onnx/")) or n.endswith((".bin", ".md"))]
    # Without safetensors, the PyTorch weights are what loading reads.
    assert "pytorch_model.bin" in wanted_files(["config.json", "pytorch_model.bin"], "weights")


def test_piped_download_progress_is_a_line_every_half_minute():
    lines = []
    progress = _Lines(total=4_000_000_000, say=lines.append)
    progress.update(1_000_000_000, PLAIN_EVERY_S - 1)
    assert lines == []
    progress.update(1_500_000_000, PLAIN_EVERY_S + 1)
    progress.update(1_600_000_000, PLAIN_EVERY_S + 2)
    assert lines == ["model: 1.5 GB of 4.0 GB downloaded (48.4 MB/s, 31 s)"]


def test_a_hub_model_is_fetched_once_with_its_size_then_loads_from_the_cache_when_the_hub_is_gone(hub, tmp_path):
    server, root = hub
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    first = run_cli("eval", "tester/tiny", "--data", str(pairs), endpoint=server.url, home=tmp_path / "hf")
    assert first.returncode == 0, first.stderr[-2000:]
    # The config and tokenizer come silently; the weights are announced with their size.
    announced = [line for line in first.stderr.splitlines() if "model: downloading tester/tiny" in line]
    assert len(announced) == 1 and re.search(r"from the Hugging Face Hub: 3 files, 1[0-9][0-9]\.[0-9] MB", announced[0])
    assert "model: tester/tiny downloaded" in first.stderr
    fetched = {path.split("/resolve/" + SHA + "/")[-1] for method, path in server.requests if method == "GET"
               and "/resolve/" in path}
    assert "model.safetensors" in fetched and not [name for name in fetched if name.startswith("original/")]

    # Cached: no second download, and no Hub needed at all (a port nothing listens on), without the
    # libraries' retries of every file (2 min 51 s here before the process was told it is offline).
    start = time.perf_counter()
    again = run_cli("eval", "tester/tiny", "--data", str(pairs), endpoint=f"http://127.0.0.1:{free_port()}",
                    home=tmp_path / "hf")
    assert again.returncode == 0, again.stderr[-2000:]
    assert time.perf_counter() - start < 60
    assert "downloading" not in again.stderr and "loading it from the cache, offline" in again.stderr


def test_a_download_that_goes_on_working_says_so_once_all_bytes_are_in(tmp_path, monkeypatch, capsys):
    """datasets downloads, then converts to Arrow for as long again: the bar must not sit full in silence."""
    monkeypatch.setattr(hub_fetch, "SHOWN_FROM_BYTES", 1)
    blobs = tmp_path / "blobs"

    def download_then_convert():
        blobs.mkdir()
        (blobs / "abc").write_bytes(b"x" * 2000)
        time.sleep(1.5)
        return "converted"

    assert watched(download_then_convert, blobs, 2000, "dataset", "tester/prefs", "dataset: downloading it",
                   then="converting it") == "converted"
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert lines[0].endswith("dataset: downloading it")
    assert re.search(r"dataset: tester/prefs downloaded \(2\.0 KB in [01] s\); converting it$", lines[1])
    assert len(lines) == 2

    def fails():
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        watched(fails, blobs, 2000, "dataset", "tester/prefs", "never said")
    assert "never said" not in capsys.readouterr().err


def test_a_hub_datasets_download_counts_the_data_files_of_its_config():
    names = ["README.md", ".gitattributes", "data/train_prefs-00000.parquet", "data/test_prefs-00000.parquet",
             "data/train_sft-00000.parquet", "small/train.jsonl.gz", "dataset_infos.json", "script.py"]
    assert data_files(names, None, None) == names[2:6]  # no configs in the card: every data file
    configs = [{"config_name": "default", "default": True,
                "data_files": [{"split": "train_prefs", "path": "data/train_prefs-*"},
                               {"split": "test_prefs", "path": ["data/test_prefs-*"]}]},
               {"config_name": "small", "data_files": "small/*"}]
    assert data_files(names, configs, None) == ["data/train_prefs-00000.parquet", "data/test_prefs-00000.parquet"]
    assert data_files(names, configs, "small") == ["small/train.jsonl.gz"]


def test_a_hub_datasets_first_download_is_announced_and_a_second_load_is_silent(hub, tmp_path):
    """The size threshold is lowered in the process: a test dataset of 100 MB would take minutes."""
    server, _ = hub
    code = ("import simpo_lite.hub_fetch as h; h.SHOWN_FROM_BYTES = 1\n"
            "from simpo_lite.data.sources import load_source\n"
            "print(len(load_source('tester/prefs', None, 'train').dataset))")
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_DATASETS_OFFLINE": "0"}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0 and first.stdout.strip() == "40", first.stderr[-2000:]
    size = len(server.repos["datasets/tester/prefs"]["data/train-00000-of-00001.jsonl"]) + \
        len(server.repos["datasets/tester/prefs"]["data/test-00000-of-00001.jsonl"])
    assert f"dataset: downloading tester/prefs from the Hugging Face Hub: {size / 1e3:.1f} KB of data files" \
        in first.stderr, first.stderr
    assert "dataset: tester/prefs downloaded" in first.stderr

    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and again.stdout.strip() == "40", again.stderr[-2000:]
    assert "dataset:" not in again.stderr


def test_plan_reads_a_hub_models_own_config(hub, tmp_path):
    """plan reads configs from the cache alone, so this also checks that a fetch leaves the cache mapping
    'main' to the commit it fetched."""
    server, _ = hub
    result = run_cli("plan", "--preset", "smollm2-demo", "--model", "tester/tiny", endpoint=server.url,
                     home=tmp_path / "hf")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model tester/tiny: 2 layers, hidden 64, vocab 49152 (architecture from config.json" in result.stdout


def test_an_unreachable_hub_is_one_line_at_once(tmp_path):
    start = time.perf_counter()
    result = run_cli("data", "inspect", "--preset", "smollm2-demo", "--model", "tester/tiny",
                     endpoint=f"http://127.0.0.1:{free_port()}", home=tmp_path / "hf")
    assert result.returncode == 2 and time.perf_counter() - start < 30  # not a minute of retries
    assert result.stderr.count("\n") == 1 and "cannot reach the Hugging Face Hub" in result.stderr
    assert "'tester/tiny' is not in its cache" in result.stderr and "hf download tester/tiny" in result.stderr


@pytest.mark.parametrize("flag, name, says", [
    ("--model", "tester/gated", "model 'tester/gated' is gated: accept its terms at"),
    ("--model", "tester/nothing", "no model 'tester/nothing' on the Hugging Face Hub"),
    ("--data", "tester/nothing", "no dataset 'tester/nothing' on the Hugging Face Hub"),
])
def test_a_model_or_dataset_the_hub_refuses_or_lacks_is_one_line(hub, tmp_path, flag, name, says):
    server, _ = hub
    result = run_cli("data", "inspect", "--preset", "smollm2-demo", flag, name, endpoint=server.url,
                     home=tmp_path / "hf")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and says in result.stderr, result.stderr
