"""Models and datasets on the Hugging Face Hub, checked before the libraries load them.

Two things a user would otherwise meet (the libraries' own bars and logs are off unless --verbose):
- a first download of several GB (a model) or hundreds of MB (a dataset) with nothing on the screen:
  here it is announced with its size and followed by a progress bar (plain lines when stderr is not a
  terminal);
- a Hub that cannot be reached, or that refuses or lacks the model or dataset: here one line says so at
  once, instead of a minute of silent retries and a traceback. What is already cached loads offline.

Only the files loading a model needs are fetched: the top-level config and tokenizer files and, for
weights, the top-level *.safetensors (*.bin where there are none). Llama repositories also hold the
original checkpoint under original/, another full copy that transformers never reads.
"""
from __future__ import annotations

import fnmatch
import os
import sys
import threading
import time
from pathlib import Path

from simpo_lite.errors import DiskFull, UserError, first_line, human_size
from simpo_lite.files import folder_size, free_bytes, is_disk_full, local_hint

TOKENIZER_PATTERNS = ("tokenizer*", "vocab.*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                      "*.jinja", "spiece.model", "sentencepiece.bpe.model", "*.tiktoken")
PLAIN_EVERY_S = 30.0
SHOWN_FROM_BYTES = 100_000_000  # smaller downloads (a config, a tokenizer) come and go without a word
ROOM = "free some space there, or point HF_HOME at a disk with room, and run the command again"


def wanted_files(names: list[str], need: str) -> list[str]:
    """The repository files that loading for `need` ("config", "tokenizer" or "weights") reads."""
    top = [n for n in names if "/" not in n]
    wanted = {"config.json"} & set(top)
    if need in ("tokenizer", "weights"):
        wanted |= {n for n in top if any(fnmatch.fnmatch(n, p) for p in TOKENIZER_PATTERNS)}
    if need == "weights":
        wanted |= {n for n in top if n.endswith(".json")}
        weights = [n for n in top if n.endswith(".safetensors")]
        wanted |= set(weights or [n for n in top if n.startswith("pytorch_model") and n.endswith(".bin")])
    return sorted(wanted)


def fetch_model(repo_id: str, need: str, revision: str | None = None) -> None:
    """Make sure the cache holds what loading `repo_id` for `need` reads; say so while it downloads."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return  # the user asked for the cache alone; transformers says what is missing

    def cached(name: str, rev: str | None) -> bool:
        return isinstance(try_to_load_from_cache(repo_id, name, revision=rev), str)

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, timeout=10)
    except Exception as err:  # noqa: BLE001 -- sorted into what the user can do about it
        if not cached("config.json", revision):
            raise UserError(_refusal(repo_id, revision, err)) from None
        reason = first_line(err) or type(err).__name__
        _work_offline(f"could not check {repo_id} on the Hugging Face Hub ({reason}): loading it from the cache, "
                      f"offline")
        return
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    missing = [name for name in wanted_files(list(sizes), need) if not cached(name, info.sha)]
    if missing:
        _download(repo_id, revision, missing, sum(sizes[name] for name in missing), constants.HF_HUB_CACHE)


def _work_offline(message: str | None = None) -> None:
    """Tell the libraries the Hub is out of reach. Otherwise transformers tries each of a cached model's
    files five times, 23 s a file, before it reads the cache: minutes of silence (measured: 2 min 51 s for a
    tiny model). The environment variable reaches libraries imported later and child processes."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "datasets" in sys.modules:  # it copied the setting when it was imported
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    if message and os.environ.get("RANK", "0") == "0":
        _say(message)


def check_dataset(dataset_id: str, config_name: str | None = None) -> int | None:
    """Before datasets loads a Hub dataset: a refusal or an unknown id is one line; an unreachable Hub
    switches to offline, so a cached dataset loads at once and an uncached one fails at once (sources.py
    says so) instead of after 28 s of retries. Returns the bytes of the config's data files (None offline)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        info = HfApi().dataset_info(dataset_id, files_metadata=True, timeout=10)
    except HfHubHTTPError as err:
        raise UserError(_refusal(dataset_id, None, err, kind="dataset")) from None
    except Exception:  # noqa: BLE001 -- no answer at all: the cache decides, and a miss is one line there
        _work_offline()
        return None
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    configs = info.card_data.get("configs") if info.card_data is not None else None
    return sum(sizes[name] for name in data_files(list(sizes), configs, config_name))


DATA_SUFFIXES = (".parquet", ".arrow", ".json", ".jsonl", ".csv", ".tsv", ".txt")


def data_files(names: list[str], configs: list[dict] | None, config_name: str | None) -> list[str]:
    """The files of a Hub dataset that datasets downloads for one config (all its splits): those its card's
    `configs` list for it, or, where the card lists none, every data file."""
    data = [n for n in names if any(s in DATA_SUFFIXES for s in Path(n).suffixes) and n != "dataset_infos.json"]
    chosen = [c for c in configs or [] if c.get("config_name") == config_name
              or (config_name is None and (c.get("default") or len(configs) == 1 or c.get("config_name") == "default"))]
    if not chosen or "data_files" not in chosen[0]:
        return data
    patterns: list[str] = []
    spec = chosen[0]["data_files"]
    for entry in spec if isinstance(spec, list) else [spec]:
        paths = entry.get("path", []) if isinstance(entry, dict) else entry
        patterns += [paths] if isinstance(paths, str) else list(paths)
    return [n for n in data if any(fnmatch.fnmatch(n, p) for p in patterns)]


def _refusal(repo_id: str, revision: str | None, err: Exception, kind: str = "model") -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    page = f"{constants.ENDPOINT}/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
    key = "data.source" if kind == "dataset" else "model.name_or_path"
    if isinstance(err, GatedRepoError):
        return (f"{kind} '{repo_id}' is gated: accept its terms at {page} with your account, then log in here "
                f"with 'hf auth login' (or set HF_TOKEN)")
    if isinstance(err, RevisionNotFoundError):
        return f"{kind} '{repo_id}' has no revision '{revision}': check model.revision"
    # Not found or not reached: the name may be a typo of a local folder or file rather than a Hub id.
    local = local_hint(repo_id, "file" if kind == "dataset" else "folder")
    if isinstance(err, RepositoryNotFoundError):
        return (f"no {kind} '{repo_id}' on the Hugging Face Hub ({page}), or it is private and this machine is not "
                f"logged in ('hf auth login'): check {key}{local}")
    if isinstance(err, HfHubHTTPError):
        return f"the Hugging Face Hub refused {kind} '{repo_id}': {first_line(err)}{local}"
    return (f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({first_line(err) or type(err).__name__}) "
            f"and model '{repo_id}' is not in its cache ({constants.HF_HUB_CACHE}): connect this machine, set "
            f"HF_ENDPOINT to a mirror, or download the model elsewhere ('hf download {repo_id}') and give its "
            f"folder{local}")


def _download(repo_id: str, revision: str | None, files: list[str], total: int, cache: str) -> None:
    """snapshot_download, watched. By the revision's name, not its commit: the cache then maps the name
    (main) to the commit, which is how an offline load, and `plan`, find the files."""
    from huggingface_hub import snapshot_download

    free = free_bytes(Path(cache))
    if free is not None and free < total:
        raise DiskFull(f"model '{repo_id}'", cache, total, more_than=False, free=free, hint=ROOM)
    announcement = (f"model: downloading {repo_id} from the Hugging Face Hub: {len(files)} files, {human_size(total)}, "
                    f"into {cache} (once; later runs load it from there)")
    try:
        watched(lambda: snapshot_download(repo_id, revision=revision, allow_patterns=files),
                _blobs(cache, repo_id, "model"), total, "model", repo_id, announcement)
    except Exception as err:  # noqa: BLE001 -- sorted into what the user can do about it
        if is_disk_full(err, Path(cache)):
            raise DiskFull(f"model '{repo_id}'", cache, total, more_than=False, free=free_bytes(Path(cache)),
                           hint=ROOM) from err
        raise UserError(f"downloading model '{repo_id}' stopped: {first_line(err)}; run the command again "
                        f"to go on from where it stopped") from None


def load_dataset_watched(dataset_id: str, total: int | None, load):
    """`load()` (datasets.load_dataset of a Hub dataset) with its first download shown. Whether datasets
    will download at all (it keeps its own prepared copy) shows only when bytes land in the Hub cache, so
    the announcement waits for them. It fetches the data files of every split of the config: `total`."""
    from huggingface_hub import constants

    if not total:  # offline, or nothing to count
        return load()
    announcement = (f"dataset: downloading {dataset_id} from the Hugging Face Hub: {human_size(total)} of data "
                    f"files, into {constants.HF_HUB_CACHE} (once; later runs read it from there)")
    return watched(load, _blobs(constants.HF_HUB_CACHE, dataset_id, "dataset"), total, "dataset", dataset_id,
                   announcement, then="datasets converts it to Arrow now, once")


def _blobs(cache: str, repo_id: str, repo_type: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache) / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "blobs"


def watched(work, blobs: Path, total: int, kind: str, repo_id: str, announcement: str, then: str = ""):
    """`work()` in a thread while this one shows the bytes arriving in the repository's blobs folder (the
    Hub writes blobs/<hash>.incomplete, then renames it: the folder's growth is the download). Nothing is
    shown until bytes land, nor below SHOWN_FROM_BYTES; `then` says what `work` goes on to do once they
    are all in. Returns what `work` returns and raises what it raises, here."""
    # Under torchrun the other processes wait on the same files; a config and tokenizer take a moment.
    shown = os.environ.get("RANK", "0") == "0" and total >= SHOWN_FROM_BYTES
    result: list = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as err:  # noqa: BLE001 -- handed to the waiting thread
            failure.append(err)

    worker = threading.Thread(target=run, name=f"simpo-lite-{kind}-download", daemon=True)
    started = time.perf_counter()
    before = folder_size(blobs)
    worker.start()
    show, done, announced, ended = None, 0, False, False

    def end(note: str = "") -> None:
        nonlocal ended
        ended = True
        _say(f"{kind}: {repo_id} downloaded ({human_size(max(done, 0))} in {time.perf_counter() - started:.0f} s)"
             f"{note}")

    try:
        while worker.is_alive():
            worker.join(timeout=0.5)
            done = folder_size(blobs) - before
            if shown and not announced and done > 0:
                announced = True
                _say(announcement)
                show = _Bar(total, kind) if sys.stderr.isatty() else _Lines(total, _say, kind)
            if show is not None:
                show.update(done, time.perf_counter() - started)
                if then and done >= total and worker.is_alive():  # all bytes in; the work goes on
                    show.close()
                    show = None
                    end(f"; {then}")
    finally:
        if show is not None:
            show.close()
    if failure:
        raise failure[0]
    if announced and not ended:
        end()
    return result[0]


def _say(message: str) -> None:
    from simpo_lite.console import info

    info(message)


class _Bar:
    """A live bar on a terminal: bytes, rate, time left."""

    def __init__(self, total: int, kind: str):
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, \
            TransferSpeedColumn

        self._bar = Progress(TextColumn(f"[bold]{kind}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                             TimeRemainingColumn(), transient=True)
        self._bar.start()
        self._task = self._bar.add_task("download", total=total)

    def update(self, done: int, seconds: float) -> None:
        self._bar.update(self._task, completed=done)

    def close(self) -> None:
        self._bar.stop()


class _Lines:
    """Piped or logged: a line every PLAIN_EVERY_S seconds."""

    def __init__(self, total: int, say, kind: str = "model"):
        self.total, self.say, self.kind, self.next_at = total, say, kind, PLAIN_EVERY_S

    def update(self, done: int, seconds: float) -> None:
        if seconds < self.next_at:
            return
        self.next_at += PLAIN_EVERY_S
        rate = done / seconds if seconds else 0.0
        self.say(f"{self.kind}: {human_size(done)} of {human_size(self.total)} downloaded "
                 f"({human_size(rate)}/s, {seconds:.0f} s)")

    def close(self) -> None:
        pass
