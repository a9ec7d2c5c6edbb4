"""Load one data source as a `datasets.Dataset`: the demo set, a local file or folder, or a Hub dataset.

Hub datasets load through `datasets.load_dataset`, so a dataset fetched once keeps working offline
from the local cache. Files load through the `json`/`parquet`/`csv` builders, whose Arrow cache makes
later runs (and the tokenization cached beside it) fast.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets
from datasets import Dataset, DatasetDict, Features, Json, Value

from simpo_lite.data.process import RAW_JSON
from simpo_lite.errors import DiskFull, UserError, first_line
from simpo_lite.files import check_utf8, guard, local_hint, looks_like_local_path, missing_path, read_text

DEMO = "demo"
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# What a text file of each kind must hold, for the message when it is not UTF-8 text.
EXPECTS = {".jsonl": "simpo-lite reads .jsonl files as JSON Lines (one JSON object per line)",
           ".json": "simpo-lite reads .json files as one JSON list of row objects",
           ".csv": "simpo-lite reads .csv files as comma-separated text with a header row"}


@dataclass
class Source:
    dataset: Dataset
    columns: list[str]  # the rows' field names (differs from dataset.column_names for raw JSON rows)
    name: str           # for messages: path or id, with config and split


def demo_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "demo_prefs.jsonl"


def load_source(source: str, config_name: Optional[str], split: str, setting: str = "data.source") -> Source:
    """`setting` names the config key the source came from, for the error a missing file gets."""
    if source == DEMO:
        return _load_file(demo_path(), "train", name="demo")
    if looks_like_local_path(source, tuple(BUILDERS)):
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(missing_path(source, f"{setting}: data file", "check the path (or use a Hub dataset id)"))
        if path.is_dir():
            return _load_folder(path, config_name, split)
        return _load_file(path, split, name=str(source))
    return _load_hub(source, config_name, split)


def _load_file(path: Path, split: str, name: str) -> Source:
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"'{path}': unsupported file type '{path.suffix}'; use .jsonl, .json, .parquet or .csv")
    if split != "train":
        raise UserError(f"'{name}' is a single file without a '{split}' split: give evaluation data with "
                        f"data.eval_source or hold some out with data.eval_fraction")
    if path.suffix.lower() in EXPECTS:
        check_utf8(path, EXPECTS[path.suffix.lower()], name)
    if path.suffix.lower() == ".json":
        _check_one_object(path, name)
    options = _csv_as_text(path, name) if builder == "csv" else {}
    try:
        with cache_guard():
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except DiskFull:
        raise
    except Exception as err:
        if builder != "json":
            raise UserError(f"cannot read '{name}' as {builder}: {first_line(_root_cause(err))}") from err
        dataset = None
    # Columns of mixed types cannot be one Arrow type: `datasets` either fails or stores them as Json,
    # which turns strings such as "4" into numbers. Such files are kept as JSON text, checked row by row.
    if builder == "json" and (dataset is None or _has_json_feature(dataset.features)):
        return _raw_json(path, name)
    return Source(dataset, list(dataset.column_names), name)


def _csv_as_text(path: Path, name: str) -> dict:
    """Every cell a string, as written: pandas would otherwise read the answer "4" as a number and "NA",
    "None" or "null" as missing values."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise UserError(f"'{name}' is empty: a CSV file needs a header row (prompt,chosen,rejected) and one row "
                        f"per preference pair")
    return dict(features=Features({column: Value("string") for column in header}), keep_default_na=False,
                na_filter=False)


def _check_one_object(path: Path, name: str) -> None:
    """A .json file holding one object of columns, or of rows under a key, would load as a single row
    that no rule can use. One pair alone, and JSON lines in a .json file, are fine."""
    with path.open(encoding="utf-8") as handle:
        head = handle.read(4096).lstrip()
    if not head.startswith("{"):
        return
    try:
        whole = json.loads(read_text(path, EXPECTS[".json"], name))
    except json.JSONDecodeError:
        return  # JSON lines, or broken: the loaders say which line
    if not isinstance(whole, dict):
        return
    values = list(whole.values())
    rows_under_a_key = len(values) == 1 and isinstance(values[0], list)
    # A row's own lists are messages ({"role": ...}); a column's are its values, one per row.
    columns = (all(isinstance(v, list) and v for v in values) and len({len(v) for v in values}) == 1
               and not any(isinstance(v[0], dict) and "role" in v[0] for v in values))
    if rows_under_a_key or columns:
        keys = ", ".join(list(whole)[:5])
        raise UserError(f"'{name}' holds one JSON object (keys: {keys}), not rows: write a JSON list of rows, "
                        f"[{{\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}}, ...], or one row per line "
                        f"(.jsonl)")


def _root_cause(err: BaseException) -> BaseException:
    """datasets wraps a reader's error ("An error occurred while generating the dataset"); the reader's
    own says what is wrong and where."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _has_json_feature(feature) -> bool:
    if isinstance(feature, Json):
        return True
    if isinstance(feature, dict):
        return any(_has_json_feature(f) for f in feature.values())
    inner = getattr(feature, "feature", None)  # List, LargeList, Sequence
    return inner is not None and _has_json_feature(inner)


def _read_json_rows(path: Path, name: str) -> list:
    text = read_text(path, EXPECTS.get(path.suffix.lower(), "a text file"), name)
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"'{name}' is not valid JSON (line {err.lineno}): {err.msg}") from None
        if not isinstance(rows, list):
            raise UserError(f"'{name}' must hold a JSON list of rows, one object per preference pair")
        return rows
    rows, bad = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                bad.append((number, err.msg))
    if len(bad) == 1:
        raise UserError(f"'{name}' line {bad[0][0]} is not valid JSON: {bad[0][1]}; fix or delete that line")
    if bad:
        shown = ", ".join(str(number) for number, _ in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise UserError(f"'{name}': {len(bad)} lines are not valid JSON (lines {shown}; line {bad[0][0]}: "
                        f"{bad[0][1]}); fix or delete those lines")
    return rows


def _raw_json(path: Path, name: str) -> Source:
    rows = _read_json_rows(path, name)
    columns = list(dict.fromkeys(k for row in rows if isinstance(row, dict) for k in row))
    dataset = Dataset.from_dict({RAW_JSON: [json.dumps(row) for row in rows]})
    return Source(dataset, columns, name)


def _pick_split(loaded, split: str, name: str) -> Dataset:
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise UserError(f"'{name}' has no split '{split}'; its splits are {', '.join(loaded)}: "
                            f"set data.split or data.eval_split")
        return loaded[split]
    if split != "train":
        raise UserError(f"'{name}' has a single split, not '{split}': set data.eval_fraction or data.eval_source instead")
    return loaded


def _load_folder(path: Path, config_name: Optional[str], split: str) -> Source:
    name = f"{path} [{split}]"
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        dataset = _pick_split(datasets.load_from_disk(str(path)), split, str(path))  # save_to_disk output
    else:
        for file in sorted(path.rglob("*")):
            if file.suffix.lower() in EXPECTS and file.is_file():
                check_utf8(file, EXPECTS[file.suffix.lower()])
        dataset = _load_dataset(str(path), config_name, split, name)  # a folder of data files, as in a Hub repo
    return Source(dataset, list(dataset.column_names), name)


def _load_hub(dataset_id: str, config_name: Optional[str], split: str) -> Source:
    from simpo_lite.hub_fetch import check_dataset

    download_bytes = check_dataset(dataset_id, config_name)
    name = f"{dataset_id}{f' ({config_name})' if config_name else ''} [{split}]"
    try:
        dataset = _load_dataset(dataset_id, config_name, split, name, download_bytes)
    except UserError as err:  # a typo of a local file ('good.jsnol') reads as a Hub id: say which file is close
        hint = local_hint(dataset_id, "file")
        if not hint:
            raise
        raise UserError(f"{err}{hint}") from None
    return Source(dataset, list(dataset.column_names), name)


def _load_dataset(path: str, config_name: Optional[str], split: str, name: str,
                  download_bytes: Optional[int] = None) -> Dataset:
    from simpo_lite.hub_fetch import load_dataset_watched

    try:
        with cache_guard():
            return load_dataset_watched(path, download_bytes,
                                        lambda: datasets.load_dataset(path, config_name, split=split))
    except DiskFull:
        raise
    except ConnectionError:
        raise UserError(f"cannot load dataset '{path}': it is not in the local datasets cache and the Hub "
                        f"cannot be reached; load it once online or use a local file") from None
    except Exception as err:  # datasets raises many types here (missing dataset, config or split)
        raise UserError(f"cannot load {name}: {first_line(err)}") from None


def _cache_dir() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE)


def cache_guard():
    """A full disk while `datasets` fills its cache (Arrow copies of the data, the tokenized splits)."""
    return guard("the dataset cache", _cache_dir(),
                 hint="free some space there, or point HF_DATASETS_CACHE at a disk with room, and run the "
                      "command again")

