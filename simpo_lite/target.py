"""MODEL_OR_RUN of `eval` and `generate`: a run folder, a checkpoint, an exported model or a base model.

- a run folder (config.yaml + adapter/) or one of its checkpoint-N folders (config.yaml + adapter
  files): the base model loaded as its config says (4-bit as trained) with the saved adapter;
- a plain Hugging Face model folder (config.json), e.g. `simpo-lite export` output: loaded unquantized
  in the compute dtype, since re-quantizing a merged export would measure a different model
  (`--set model.quantize=true` to quantize anyway);
- anything else is a Hub id or a bundled model name, loaded like a base model for training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from simpo_lite import config as cfgmod
from simpo_lite.config import Config
from simpo_lite.errors import UserError
from simpo_lite.files import looks_like_local_path, missing_path


@dataclass
class Target:
    kind: str                      # "run", "checkpoint", "folder" or "hub"
    name: str                      # as given on the command line
    cfg: Config
    adapter_dir: Optional[Path]    # the saved LoRA adapter of a run or checkpoint

    @property
    def label(self) -> str:
        """A short model name for reports and AlpacaEval's 'generator' field."""
        from simpo_lite.run_folder import label

        if self.kind in ("run", "checkpoint"):
            return label(Path(self.name), self.kind)
        return Path(self.name).resolve().name if self.kind == "folder" else self.name.rstrip("/").split("/")[-1]

    def describe(self) -> str:
        m = self.cfg.model
        precision = "4-bit NF4" if m.quantize else f"unquantized ({m.compute_dtype})"
        what = {"run": "run", "checkpoint": "checkpoint", "folder": "model folder", "hub": "model"}[self.kind]
        adapter = f" + LoRA adapter {self.adapter_dir}" if self.adapter_dir else ""
        base = "" if m.name_or_path == self.name else f"{m.name_or_path} "  # a model given by name is its own base
        return f"{what} {self.name}: {base}{precision}{adapter}"


def classify(name: str) -> tuple[str, Optional[Path], Optional[Path]]:
    """(kind, saved config.yaml, adapter folder) of MODEL_OR_RUN."""
    from simpo_lite.run_folder import run_kind

    path = Path(name).expanduser()
    if path.is_dir():
        found = run_kind(path)
        if found is not None:
            return found
        if (path / "config.json").is_file():
            from simpo_lite.run_folder import EXPORT_CONFIG

            saved = path / EXPORT_CONFIG  # a merged export: the run's settings, its held-out pairs
            return "folder", saved if saved.is_file() else None, None
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            raise UserError(f"'{name}' holds a GGUF export ({ggufs[0].name}), which llama.cpp, Ollama or LM Studio "
                            f"run; give simpo-lite the merged export or the run folder instead")
        raise UserError(f"'{name}' is neither a run folder (config.yaml + adapter/) nor a model folder "
                        f"(config.json): check the path")
    if looks_like_local_path(name):  # never looked up on the Hub: a mistyped path fails at once
        raise UserError(missing_path(name, "model or run", "give a run folder, a model folder, a Hub id or "
                                                           "'smollm2-135m-instruct'"))
    return "hub", None, None


def resolve_target(name: str, preset: str | None = None, config: Path | None = None, data: str | None = None,
                   sets: list[str] | None = None) -> Target:
    """MODEL_OR_RUN and the usual override layers -> a Target with its resolved config.

    Layers (config.resolve): the run's saved config (runs and checkpoints) < --preset < --config
    < MODEL and --data < --set.
    """
    kind, saved, adapter = classify(name)
    flags: dict = {}
    if kind in ("folder", "hub"):
        model_path = str(Path(name).expanduser()) if kind == "folder" else name
        flags["model"] = {"name_or_path": model_path, **({"quantize": False, "revision": None} if kind == "folder" else {})}
    if data is not None:
        flags["data"] = {"source": data}
    cfg = cfgmod.resolve(preset, config, flags, list(sets or []), saved=saved)
    return Target(kind=kind, name=name, cfg=cfg, adapter_dir=adapter)


def load_target_tokenizer(target: Target):
    """A run's saved tokenizer (what it trained with), else the model's own."""
    from simpo_lite.model import load_run_tokenizer

    return load_run_tokenizer(target.cfg, target.adapter_dir)


def load_target_model(target: Target):
    """The model in eval mode, loaded exactly as training ran it (model.load_for_inference)."""
    from simpo_lite.model import load_for_inference

    return load_for_inference(target.cfg, target.adapter_dir)


def model_device(model):
    return next(model.parameters()).device
