"""The `simpo-lite` command line: thin wrappers that resolve a config and call one module each.

Heavy modules (torch, transformers) are imported inside the commands so `--help` stays instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from simpo_lite.cli_args import normalise_argv
from simpo_lite.errors import ConfigError, RunError, UserError, first_line, interrupt_on_sigterm

# Plain click help: it is not boxed to 80 columns when piped, and switches show no '<bool>' metavar.
HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(name="simpo-lite", no_args_is_help=True, rich_markup_mode=None, add_completion=False,
                  context_settings=HELP,
                  help="SimPO preference tuning of a 4-bit LoRA model on one consumer GPU.\n\n"
                       "Anywhere on the line: --verbose shows libraries' warnings, logs and progress bars; "
                       "--debug shows full tracebacks; --version prints the version.")
presets_app = typer.Typer(no_args_is_help=True, context_settings=HELP, help="List and show the bundled presets.")
data_app = typer.Typer(no_args_is_help=True, context_settings=HELP,
                       help="Look at what the data pipeline makes of a dataset.")
app.add_typer(presets_app, name="presets")
app.add_typer(data_app, name="data")

# One vocabulary: the same flag means the same thing in every command that has it.
PresetOpt = typer.Option(None, "--preset", "-p", metavar="NAME", help="Preset name (see 'simpo-lite presets list').")
ConfigOpt = typer.Option(None, "--config", "-c", metavar="FILE", help="YAML config file (e.g. a run's config.yaml).")
SetOpt = typer.Option(None, "--set", "-s", metavar="KEY=VALUE",
                      help="Override any key: --set simpo.beta=2.5 (repeatable).")
DataOpt = typer.Option(None, "--data", metavar="DATA", help="Preference data: 'demo', a local file or a Hub dataset id.")
ModelOpt = typer.Option(None, "--model", metavar="MODEL",
                        help="Base model: Hub id, local folder or 'smollm2-135m-instruct'.")
TargetArg = typer.Argument(..., metavar="MODEL_OR_RUN",
                           help="A run folder, a checkpoint, an exported model folder, or a base model.")
MaxNewTokensOpt = typer.Option(512, "--max-new-tokens", metavar="N", help="Most tokens per answer.")
TemperatureOpt = typer.Option(0.0, "--temperature", metavar="T", help="Sampling temperature; 0 = greedy.")
TopPOpt = typer.Option(1.0, "--top-p", metavar="P", help="Nucleus sampling: keep the most likely tokens "
                       "up to this probability mass (with --temperature above 0).")


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


def _preset_or_default(preset, config):
    """No preset and no config file means the embedded default preset, said once."""
    if preset is None and config is None:
        from simpo_lite.config import DEFAULT_PRESET

        preset = DEFAULT_PRESET
        _info(f"No --preset or --config given: using the embedded default preset '{preset}'.")
    return preset


def _resolve(preset, config, sets, **flags):
    from simpo_lite.config import resolve

    return resolve(_preset_or_default(preset, config), config, _flags(**flags), sets or [])


def _info(message: str) -> None:
    from simpo_lite.console import info

    info(message)


def _version(value: bool) -> None:
    if value:
        from simpo_lite import __version__

        typer.echo(f"simpo-lite {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """SimPO preference tuning of a 4-bit LoRA model on one consumer GPU."""


@app.command()
def train(
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = ModelOpt,
    data: Optional[str] = DataOpt,
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", metavar="DIR", help="Run folder."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", metavar="N", help="Stop after this many optimizer steps."),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help="Seed that fixes data order, init and dropout."),
    resume: Optional[str] = typer.Option(None, "--resume", metavar="CHECKPOINT", help="Resume: 'latest' (newest "
                                         "checkpoint in the output dir) or a checkpoint folder. A bare --resume "
                                         "means latest."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh in a non-empty output dir."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of a live progress bar."),
    sets: Optional[List[str]] = SetOpt,
):
    """Train LoRA adapters with the SimPO loss (no reference model)."""
    cfg = _resolve(preset, config, sets, model=model, data=data, output_dir=output_dir, max_steps=max_steps, seed=seed)
    from simpo_lite.trainer import run_training

    run_training(cfg, resume=resume, overwrite=overwrite, quiet=quiet or not sys.stderr.isatty())


@app.command(short_help="Merge a run's adapter into the base weights, or write a GGUF.")
def export(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="A training run's output folder, or one of its "
                                    "checkpoint-N folders."),
    out: Optional[Path] = typer.Option(None, "--out", metavar="DIR", help="Destination folder (default: RUN/merged, "
                                       "or RUN/adapter-export with --adapter-only; RUN/merged-checkpoint-N for "
                                       "a checkpoint)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", metavar="DTYPE",
                                        help="bf16, fp16 or fp32 (default: the run's export.dtype)."),
    adapter_only: bool = typer.Option(False, "--adapter-only", help="Export the LoRA adapter alone, unmerged."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="REPO_ID",
                                              help="Also upload to this Hub repo id."),
    private: bool = typer.Option(False, "--private", help="Create the Hub repo as private."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
    force: bool = typer.Option(False, "--force", hidden=True, help="Deprecated name of --overwrite."),
    format: str = typer.Option("safetensors", "--format", metavar="FORMAT",
                               help="safetensors (a transformers model folder) or gguf (one file for llama.cpp "
                                    "and Ollama, with a Modelfile)."),
    quant: Optional[str] = typer.Option(None, "--quant", metavar="QUANT",
                                        help="With --format gguf: f16, bf16, q8_0 (default) or q4_k_m (needs "
                                             "llama-cpp-python, the package's gguf extra)."),
    sets: Optional[List[str]] = typer.Option(None, "--set", "-s", metavar="KEY=VALUE",
                                             help="Override a key of the run's saved config, "
                                             "e.g. --set export.verify_tolerance=0.1 (repeatable)."),
):
    """Merge a run's adapters into full-precision base weights (and optionally push them to the Hub)."""
    from simpo_lite.export import export_run

    if force:
        _info("--force is now --overwrite (the same flag as train's); --force still works for now.")
    export_run(run_dir, out=out, dtype=dtype, adapter_only=adapter_only, push_to_hub=push_to_hub,
               private=private, force=overwrite or force, sets=sets or [], format=format, quant=quant)


@presets_app.command("list")
def presets_list(as_json: bool = typer.Option(False, "--json", help="A JSON list instead of a table.")):
    """List the bundled presets with their model and data (plain rows when piped)."""
    from simpo_lite import config as cfgmod
    from simpo_lite.console import print_table

    rows = []
    for name in cfgmod.preset_names():
        cfg = cfgmod.resolve(name)
        numbers = (cfg.simpo.beta, cfg.simpo.gamma_beta_ratio, cfg.train.learning_rate)
        rows.append([name, cfg.model.name_or_path, cfg.data.source, *(n if as_json else f"{n:g}" for n in numbers)])
    print_table(["preset", "model", "data", "beta", "gamma/beta", "lr"], rows, as_json=as_json, names_first=True)


@presets_app.command("show")
def presets_show(name: str = typer.Argument(..., metavar="NAME", help="Preset name."),
                 resolved: bool = typer.Option(False, "--resolved", help="Show the full config with defaults filled in.")):
    """Print a preset's YAML (with the sources of its numbers), or the full resolved config."""
    import yaml

    from simpo_lite import config as cfgmod

    path = cfgmod.preset_path(name)
    cfg = cfgmod.resolve(name)  # a broken preset fails here rather than printing as if valid
    typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False) if resolved else path.read_text())


@data_app.command("inspect")
def data_inspect(
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = ModelOpt,
    data: Optional[str] = DataOpt,
    sets: Optional[List[str]] = SetOpt,
    index: int = typer.Option(0, "--index", metavar="N", help="Which training example to render."),
):
    """Render one tokenized example and report lengths, drops and padding."""
    cfg = _resolve(preset, config, sets, model=model, data=data)
    from simpo_lite.data.inspect import inspect_data

    inspect_data(cfg, index=index)


@app.command("eval", short_help="Preference metrics of a model or run on an eval split.")
def evaluate(
    model_or_run: str = TargetArg,
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    data: Optional[str] = DataOpt,
    sets: Optional[List[str]] = SetOpt,
    out: Optional[Path] = typer.Option(None, "--out", metavar="FILE.json", help="Also write the metrics to this JSON file."),
):
    """Preference metrics (reward accuracy, margins, log-probs) of a model on an eval split."""
    from simpo_lite.evaluate import evaluate_command

    evaluate_command(model_or_run, preset=preset, config=config, data=data, sets=sets or [], out=out)


@app.command(short_help="Answers to benchmark prompts, in AlpacaEval's format.")
def generate(
    model_or_run: str = TargetArg,
    out: Path = typer.Option(..., "--out", metavar="FILE.json", help="Output JSON in AlpacaEval format."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", metavar="FILE", help="JSON/JSONL file of prompts "
                                           "(AlpacaEval 'instruction' or 'prompt'); default: the eval split's prompts "
                                           "of the data (--data, else the run's)."),
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    data: Optional[str] = DataOpt,
    max_new_tokens: int = MaxNewTokensOpt,
    temperature: float = TemperatureOpt,
    top_p: float = TopPOpt,
    generator: Optional[str] = typer.Option(None, "--generator", metavar="NAME",
                                            help="Name recorded in the 'generator' field."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    sets: Optional[List[str]] = SetOpt,
):
    """Generate answers for benchmark prompts (AlpacaEval / Arena-Hard style) with length statistics."""
    from simpo_lite.generate import generate_command

    generate_command(model_or_run, prompts=prompts, out=out, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, generator=generator, preset=preset, config=config,
                     data=data, sets=sets or [], overwrite=overwrite)


@app.command(short_help="Talk to a run, an export or a base model in the terminal.")
def chat(
    model_or_run: str = TargetArg,
    system: Optional[str] = typer.Option(None, "--system", metavar="TEXT", help="System message (default: the "
                                         "run's data.system_prompt; --system '' for none)."),
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    max_new_tokens: int = MaxNewTokensOpt,
    temperature: float = typer.Option(0.7, "--temperature", metavar="T", help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(0.9, "--top-p", metavar="P", help="Nucleus sampling: keep the most likely tokens "
                                "up to this probability mass (with --temperature above 0)."),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help="Seed for sampling (default: the run's train.seed)."),
    max_context: Optional[int] = typer.Option(None, "--max-context", metavar="TOKENS", help="Most tokens of history "
                                              "plus answer (default: the model's context length); older turns "
                                              "are dropped beyond it."),
    sets: Optional[List[str]] = SetOpt,
):
    """Talk to a model in the terminal: a run (4-bit + adapter, as trained), an export or a base model.

    Type a message and press Enter; /reset clears the history, /exit (or Ctrl-D, Ctrl-C) quits.
    """
    from simpo_lite.chat import chat_command

    chat_command(model_or_run, system=system, preset=preset, config=config, max_new_tokens=max_new_tokens,
                 temperature=temperature, top_p=top_p, seed=seed, max_context=max_context, sets=sets or [])


@app.command()
def report(run_dir: Path = typer.Argument(..., metavar="RUN", help="A training run's output folder."),
           out: Optional[Path] = typer.Option(None, "--out", metavar="FILE.png", help="PNG path (default: RUN/report.png).")):
    """Plot a run's training and eval curves and print a short summary."""
    from simpo_lite.run_report import report_command

    report_command(run_dir, out=out)


@app.command(short_help="Peak GPU memory of a run, and the micro-batch that fits.")
def plan(
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = ModelOpt,
    sets: Optional[List[str]] = SetOpt,
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", metavar="GB", help="GPU memory in GB to plan for "
                                               "(default: this machine's GPU, or 24)."),
    processes: int = typer.Option(1, "--processes", metavar="N", help="Plan per GPU for N processes (GPUs)."),
    fsdp: bool = typer.Option(False, "--fsdp", help="With --processes: FSDP shards the model over them "
                              "(presets/accelerate/fsdp-qlora.yaml); without, each GPU holds it whole (DDP)."),
):
    """Estimate peak GPU memory of a run and the largest micro-batch that fits.

    Exit code 1 when not even one pair fits (the run as configured would run out of memory: a
    finding about the run, like grep finding nothing, not a mistake on the command line).
    """
    cfg = _resolve(preset, config, sets, model=model)
    from simpo_lite.plan_report import plan_command

    plan_command(cfg, gpu_memory=gpu_memory, processes=processes, fsdp=fsdp)


@app.command(short_help="Short runs over a grid of settings, ranked; best.yaml.")
def sweep(
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    sets: Optional[List[str]] = SetOpt,
    grid: List[str] = typer.Option(..., "--grid", metavar="KEY=[VALUES]", help="Values to try: --grid 'train.learning_rate=[1e-5,3e-5]' "
                                   "(repeatable; trials are every combination)."),
    max_steps: int = typer.Option(..., "--max-steps", min=1, metavar="N", help="Optimizer steps of every trial."),
    train_pairs: Optional[int] = typer.Option(None, "--train-pairs", min=1, metavar="K", help="Train every trial on the "
                                              "same first K training pairs (default: all)."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", metavar="DIR", help="Sweep folder: one run folder per trial, "
                                    "sweep.json/.csv/.png and best.yaml."),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, metavar="N", help="Run only this many combinations, "
                                         "drawn at random (seeded by train.seed)."),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", min=0.0, metavar="MINUTES",
                                                   help="Start no trial that would end after this many minutes."),
    # Given bare (cli_args turns it into 'latest'): the blank metavar keeps --help from asking for a value.
    resume: Optional[str] = typer.Option(None, "--resume", metavar=" ", help="Continue the sweep in --output-dir (bare "
                                         "--resume): finished trials are kept, an interrupted one starts again."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh in a non-empty --output-dir."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of live progress bars."),
):
    """Short runs over a grid of settings, ranked by held-out reward accuracy; collapsed trials disqualified."""
    from simpo_lite.sweep import sweep_command

    sweep_command(_preset_or_default(preset, config), config, sets or [], grid, max_steps=max_steps,
                  train_pairs=train_pairs, output_dir=output_dir, trials=trials, budget_minutes=budget_minutes,
                  resume=resume, overwrite=overwrite, quiet=quiet or not sys.stderr.isatty(), say=_info)


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
    from simpo_lite.console import quiet_libraries

    click = _click_exceptions()
    raw = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in raw or os.environ.get("SIMPO_LITE_DEBUG") == "1"
    try:
        args, flags = normalise_argv(raw, app)
        quiet_libraries(flags["verbose"])  # before anything imports transformers, datasets or bitsandbytes
        interrupt_on_sigterm()
        code = app(args=args, prog_name="simpo-lite", standalone_mode=False)
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
    except click.NoArgsIsHelpError as err:  # `simpo-lite` or `simpo-lite presets` alone: what it can do
        print(err.format_message())
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
        code = 130
    except Exception as err:  # a case nobody foresaw: one line to report, the traceback on request
        if debug:
            raise
        print(f"error: unexpected {type(err).__name__}: {first_line(err)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)
    # Outside standalone mode typer returns an exit code instead of exiting: 130 for a Ctrl-C that
    # reached it (it turns KeyboardInterrupt into Exit(130)), or a command's typer.Exit(N).
    if isinstance(code, int) and not isinstance(code, bool) and code:
        if code == 130:
            print("interrupted", file=sys.stderr)
        sys.exit(code)
