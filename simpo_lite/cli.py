"""The `simpo-lite` command line: thin wrappers that resolve a config and call one module each.

Heavy modules (torch, transformers) are imported inside the commands so `--help` stays instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from simpo_lite.errors import ConfigError, RunError, UserError

app = typer.Typer(name="simpo-lite", no_args_is_help=True, rich_markup_mode="rich", add_completion=False,
                  help="SimPO preference tuning of a 4-bit LoRA model on one consumer GPU.\n\n"
                       "Add --debug anywhere to see full tracebacks.")
presets_app = typer.Typer(no_args_is_help=True, help="List and show the bundled presets.")
data_app = typer.Typer(no_args_is_help=True, help="Look at what the data pipeline makes of a dataset.")
app.add_typer(presets_app, name="presets")
app.add_typer(data_app, name="data")

PresetOpt = typer.Option(None, "--preset", "-p", help="Preset name (see 'simpo-lite presets list').")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (e.g. a run's config.yaml).")
SetOpt = typer.Option(None, "--set", "-s", help="Override any key: --set simpo.beta=2.5 (repeatable).")
DataOpt = typer.Option(None, "--data", help="Training data: 'demo', a local file or a Hub dataset id.")
ModelOpt = typer.Option(None, "--model", help="Base model: Hub id, local folder or 'smollm2-135m-instruct'.")


def _flags(**values) -> dict:
    """Map first-class flags to config keys, skipping those not given."""
    keys = {"model": ("model", "name_or_path"), "data": ("data", "source"), "output_dir": ("train", "output_dir"),
            "max_steps": ("train", "max_steps"), "seed": ("train", "seed")}
    layer: dict = {}
    for name, value in values.items():
        if value is not None:
            section, key = keys[name]
            layer.setdefault(section, {})[key] = value
    return layer


def _resolve(preset, config, sets, **flags):
    from simpo_lite import config as cfgmod

    if preset is None and config is None:
        preset = cfgmod.DEFAULT_PRESET
        _info(f"No --preset or --config given: using the embedded default preset '{preset}'.")
    return cfgmod.resolve(preset, config, _flags(**flags), sets or [])


def _info(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[bold cyan]simpo-lite[/]: {message}", highlight=False)


@app.command()
def train(
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = ModelOpt,
    data: Optional[str] = DataOpt,
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Run folder."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed that fixes data order, init and dropout."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Resume: 'latest' (newest checkpoint in the "
                                         "output dir) or a checkpoint folder. A bare --resume means latest."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh in a non-empty output dir."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of a live progress bar."),
    sets: Optional[List[str]] = SetOpt,
):
    """Train LoRA adapters with the SimPO loss (no reference model)."""
    cfg = _resolve(preset, config, sets, model=model, data=data, output_dir=output_dir, max_steps=max_steps, seed=seed)
    from simpo_lite.trainer import run_training

    run_training(cfg, resume=resume, overwrite=overwrite, quiet=quiet or not sys.stderr.isatty())


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A training run's output folder."),
    out: Optional[Path] = typer.Option(None, "--out", help="Destination folder (default: RUN_DIR/merged, or "
                                       "RUN_DIR/adapter-export with --adapter-only)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (default: the run's export.dtype)."),
    adapter_only: bool = typer.Option(False, "--adapter-only", help="Export the LoRA adapter alone, unmerged."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="Also upload to this Hub repo id."),
    private: bool = typer.Option(False, "--private", help="Create the Hub repo as private."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out folder."),
    format: str = typer.Option("safetensors", "--format", help="safetensors (a transformers model folder) or gguf "
                               "(one file for llama.cpp and Ollama, with a Modelfile)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="With --format gguf: f16, bf16, q8_0 (default) or "
                                        "q4_k_m (needs llama-cpp-python, the package's gguf extra)."),
    sets: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a key of the run's saved config, "
                                             "e.g. --set export.verify_tolerance=0.1 (repeatable)."),
):
    """Merge a run's adapters into full-precision base weights (and optionally push them to the Hub)."""
    from simpo_lite.export import export_run

    export_run(run_dir, out=out, dtype=dtype, adapter_only=adapter_only, push_to_hub=push_to_hub,
               private=private, force=force, sets=sets or [], format=format, quant=quant)


@presets_app.command("list")
def presets_list():
    """List the bundled presets with their model and data."""
    from rich.console import Console
    from rich.table import Table

    from simpo_lite import config as cfgmod

    table = Table("preset", "model", "data", "beta", "gamma/beta", "lr")
    for name in cfgmod.preset_names():
        cfg = cfgmod.resolve(name)
        table.add_row(name, cfg.model.name_or_path, cfg.data.source, f"{cfg.simpo.beta:g}",
                      f"{cfg.simpo.gamma_beta_ratio:g}", f"{cfg.train.learning_rate:g}")
    Console().print(table)


@presets_app.command("show")
def presets_show(name: str = typer.Argument(..., help="Preset name."),
                 resolved: bool = typer.Option(False, "--resolved", help="Show the full config with defaults filled in.")):
    """Print a preset's YAML (with the sources of its numbers), or the full resolved config."""
    import yaml

    from simpo_lite import config as cfgmod

    path = cfgmod.preset_path(name)
    cfgmod.resolve(name)  # a broken preset fails here rather than printing as if valid
    typer.echo(yaml.safe_dump(cfgmod.resolve(name).to_dict(), sort_keys=False) if resolved else path.read_text())


@data_app.command("inspect")
def data_inspect(
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = ModelOpt,
    data: Optional[str] = DataOpt,
    sets: Optional[List[str]] = SetOpt,
    index: int = typer.Option(0, "--index", help="Which training example to render."),
):
    """Render one tokenized example and report lengths, drops and padding."""
    cfg = _resolve(preset, config, sets, model=model, data=data)
    from simpo_lite.data.inspect import inspect_data

    inspect_data(cfg, index=index)


@app.command("eval")
def evaluate(
    model_or_run: str = typer.Argument(..., help="A run folder, an exported model folder, or a base model."),
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    data: Optional[str] = DataOpt,
    sets: Optional[List[str]] = SetOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the metrics to this JSON file."),
):
    """Preference metrics (reward accuracy, margins, log-probs) of a model on an eval split."""
    from simpo_lite.evaluate import evaluate_command

    evaluate_command(model_or_run, preset=preset, config=config, data=data, sets=sets or [], out=out)


@app.command()
def generate(
    model_or_run: str = typer.Argument(..., help="A run folder, an exported model folder, or a base model."),
    prompts: Path = typer.Option(..., "--prompts", help="JSON/JSONL file of prompts (AlpacaEval 'instruction' or 'prompt')."),
    out: Path = typer.Option(..., "--out", help="Output JSON in AlpacaEval format."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    generator: Optional[str] = typer.Option(None, "--generator", help="Name recorded in the 'generator' field."),
    sets: Optional[List[str]] = SetOpt,
):
    """Generate answers for benchmark prompts (AlpacaEval / Arena-Hard style) with length statistics."""
    from simpo_lite.generate import generate_command

    generate_command(model_or_run, prompts=prompts, out=out, max_new_tokens=max_new_tokens,
                     temperature=temperature, generator=generator, sets=sets or [])


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A training run's output folder."),
           out: Optional[Path] = typer.Option(None, "--out", help="PNG path (default: RUN_DIR/report.png).")):
    """Plot a run's training and eval curves and print a short summary."""
    from simpo_lite.run_report import report_command

    report_command(run_dir, out=out)


@app.command()
def plan(
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    sets: Optional[List[str]] = SetOpt,
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", help="GPU memory in GB to plan for."),
):
    """Estimate peak GPU memory of a run and the largest micro-batch that fits."""
    cfg = _resolve(preset, config, sets)
    from simpo_lite.plan import plan_command

    plan_command(cfg, gpu_memory=gpu_memory)


@app.command()
def sweep(
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    sets: Optional[List[str]] = SetOpt,
    grid: List[str] = typer.Option(..., "--grid", help="Values to try: --grid 'train.learning_rate=[1e-5,3e-5]' "
                                   "(repeatable; trials are every combination)."),
    max_steps: int = typer.Option(..., "--max-steps", min=1, help="Optimizer steps of every trial."),
    train_pairs: Optional[int] = typer.Option(None, "--train-pairs", min=1, help="Train every trial on the "
                                              "same first K training pairs (default: all)."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Sweep folder: one run folder per trial, "
                                    "sweep.json/.csv/.png and best.yaml."),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, help="Run only this many combinations, "
                                         "drawn at random (seeded by train.seed)."),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", min=0.0,
                                                   help="Start no trial that would end after this many minutes."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue the sweep in --output-dir (bare "
                                         "--resume): finished trials are kept, an interrupted one starts again."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh in a non-empty --output-dir."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of live progress bars."),
):
    """Short runs over a grid of settings, ranked by held-out reward accuracy; collapsed trials disqualified."""
    from simpo_lite import config as cfgmod
    from simpo_lite import sweep as sweepmod
    from simpo_lite.errors import ConfigError as _ConfigError

    if resume not in (None, "latest"):
        raise UserError(f"--resume takes no value in sweep (got {resume!r}): it continues the sweep in --output-dir")
    if preset is None and config is None:
        preset = cfgmod.DEFAULT_PRESET
        _info(f"No --preset or --config given: using the embedded default preset '{preset}'.")
    parsed, problems = sweepmod.parse_grid(grid)
    try:
        base = cfgmod.resolve(preset, config, None, sets or [])
    except _ConfigError as err:
        problems += err.problems
    if problems:
        raise _ConfigError(problems)
    plan = sweepmod.Sweep(preset, str(config) if config else None, list(sets or []), parsed, max_steps, train_pairs,
                          trials, sweepmod.grid_trials(parsed, trials, base.train.seed))
    result = sweepmod.run_sweep(plan, output_dir, resume=resume is not None, overwrite=overwrite,
                                budget_minutes=budget_minutes, quiet=quiet or not sys.stderr.isatty(), say=_info)
    sweepmod.print_ranking(plan, result, output_dir)


def _normalise_argv(argv: list[str]) -> tuple[list[str], bool]:
    """Pull out --debug wherever it is; let a bare --resume mean 'latest'."""
    debug = "--debug" in argv or os.environ.get("SIMPO_LITE_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append("latest")
    return out, debug


def _fail(message: str) -> None:
    for line in message.strip().splitlines() or [message]:
        print(f"error: {line}", file=sys.stderr)
    sys.exit(2)


def _click_exceptions():
    """Typer >= 0.20 vendors click as typer._click; older releases use click itself."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main(argv: list[str] | None = None) -> None:
    click = _click_exceptions()
    args, debug = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=args, prog_name="simpo-lite", standalone_mode=False)
    except ConfigError as err:
        if debug:
            raise
        _fail("\n".join(err.problems))
    except UserError as err:
        if debug:
            raise
        _fail(str(err))
    except RunError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except click.NoArgsIsHelpError:
        sys.exit(0)
    except click.UsageError as err:
        if debug:
            raise
        where = err.ctx.command_path if err.ctx else "simpo-lite"
        _fail(f"{err.format_message()} (see '{where} --help')")
    except click.ClickException as err:
        if debug:
            raise
        _fail(err.format_message())
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
