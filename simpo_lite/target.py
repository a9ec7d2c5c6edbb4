"""MODEL_OR_RUN of `eval` and `generate`: a run folder, a checkpoint, an exported model or a base model.

- a run folder (config.yaml + adapter/) or one of its checkpoint-N folders (config.yaml + adapter
  files): the base model loaded as its config says (4-bit as trained) with the saved adapter;
- a plain Hugging Face model folder (config.json), e.g. `simpo-lite export` output: loaded unquantized
  in the compute dtype, since re-quantizing a merged export would measure a different model
  (`--set model.quantize=true` to quantize anyway);
- anything else is a Hub id or a bundled model name, loaded like a base model for training.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from simpo_lite import config as cfgmod
from simpo_lite.config import Config
from simpo_lite.errors import UserError


@dataclass
class Target:
    kind: str                      # "run", "checkpoint", "folder" or "hub"
    name: str                      # as given on the command line
    cfg: Config
    adapter_dir: Optional[Path]    # the saved LoRA adapter of a run or checkpoint

    @property
    def label(self) -> str:
        """A short model name for reports and AlpacaEval's 'generator' field."""
        path = Path(self.name)
        if self.kind == "checkpoint":
            return f"{path.resolve().parent.name}-{path.name}"
        return path.resolve().name if self.kind in ("run", "folder") else self.name.rstrip("/").split("/")[-1]

    def describe(self) -> str:
        m = self.cfg.model
        precision = "4-bit NF4" if m.quantize else f"unquantized ({m.compute_dtype})"
        what = {"run": "run", "checkpoint": "checkpoint", "folder": "model folder", "hub": "model"}[self.kind]
        adapter = f" + LoRA adapter {self.adapter_dir}" if self.adapter_dir else ""
        return f"{what} {self.name}: {m.name_or_path} {precision}{adapter}"


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def classify(name: str) -> tuple[str, Optional[Path], Optional[Path]]:
    """(kind, saved config.yaml, adapter folder) of MODEL_OR_RUN."""
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.yaml").is_file():
            if (path / "adapter" / "adapter_config.json").is_file():
                return "run", path / "config.yaml", path / "adapter"
            if (path / "adapter_config.json").is_file():
                return "checkpoint", path / "config.yaml", path
            raise UserError(f"'{name}' has a config.yaml but no adapter/: the run has not finished; evaluate one "
                            f"of its checkpoint-N folders, or finish it with: simpo-lite train --config "
                            f"{path / 'config.yaml'} --resume")
        if (path / "config.json").is_file():
            return "folder", None, None
        raise UserError(f"'{name}' is neither a run folder (config.yaml + adapter/) nor a model folder "
                        f"(config.json): check the path")
    if _looks_like_path(name):
        raise UserError(f"'{name}' not found: give a run folder, a model folder, a Hub id or 'smollm2-135m-instruct'")
    return "hub", None, None


def resolve_target(name: str, preset: str | None = None, config: Path | None = None, data: str | None = None,
                   sets: list[str] | None = None) -> Target:
    """MODEL_OR_RUN and the usual override layers -> a Target with its resolved config.

    Layers: the run's saved config (runs and checkpoints) < --preset < --config < MODEL and --data < --set.
    """
    kind, saved, adapter = classify(name)
    layers: list[tuple[str, Any]] = []
    if saved is not None:
        layers.append((str(saved), cfgmod.read_yaml(saved, "run config")))
    if preset:
        layers.append((f"preset {preset}", cfgmod.read_yaml(cfgmod.preset_path(preset), "preset")))
    if config:
        layers.append((str(config), cfgmod.read_yaml(Path(config), "config file")))
    flags: dict = {}
    if kind in ("folder", "hub"):
        model_path = str(Path(name).expanduser()) if kind == "folder" else name
        flags["model"] = {"name_or_path": model_path, **({"quantize": False} if kind == "folder" else {})}
    if data is not None:
        flags["data"] = {"source": data}
    layers.append(("command line", flags))
    set_layer, set_problems = cfgmod.parse_set(list(sets or []))
    layers.append(("--set", set_layer))
    if set_problems:
        raise cfgmod.ConfigError(set_problems)
    return Target(kind=kind, name=name, cfg=cfgmod.build_config(layers), adapter_dir=adapter)


def load_target_tokenizer(target: Target):
    """A run's saved tokenizer (what it trained with), else the model's own."""
    from simpo_lite.model import load_tokenizer

    if target.kind == "run" and (target.adapter_dir / "tokenizer_config.json").is_file():
        return load_tokenizer(replace(target.cfg.model, name_or_path=str(target.adapter_dir), revision=None))
    return load_tokenizer(target.cfg.model)


def load_target_model(target: Target):
    """The model in eval mode: base (+ adapter), placed as model.py places it."""
    from simpo_lite.model import load_adapter_model, load_base_model

    if target.adapter_dir is not None:
        model = load_adapter_model(target.cfg, target.adapter_dir)
    else:
        model = load_base_model(target.cfg.model)
    return model.eval()


def model_device(model):
    return next(model.parameters()).device
