"""`simpo-lite sweep`: short runs over a grid of settings, ranked by held-out reward accuracy and
margin, with trials whose generation health crossed a guardrail disqualified.

Every trial is an ordinary run folder (DIR/trial-NN) of the same config plus its grid values,
`train.max_steps` and `data.max_train_pairs` fixed for all, so every trial trains on the same pairs
and is evaluated on the same held-out pairs. Trials run one after another in this process and share
the prepared data and the loaded 4-bit base (run_setup.Reuse); only the adapters and the optimizer
are new, and a trial equals `simpo-lite train --config DIR/trial-NN/config.yaml` exactly.

DIR holds sweep.json (the definition and every finished trial), sweep.csv, sweep.png and best.yaml:
the winner's settings at the length of the full run, to train from.
"""

from __future__ import annotations

import itertools
import json
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from simpo_lite import config as cfgmod
from simpo_lite.errors import ConfigError, RunError, UserError
from simpo_lite.files import check_output_path
from simpo_lite.sweep_report import (RANKED, SWEEP_FILE, plot, print_ranking, ranking, save_tables, settings_text,
                                     trial_name, write_best, yaml_value)


@dataclass
class Sweep:
    """What a sweep is: the same on --resume, or the resume is refused."""

    preset: str | None
    config_file: str | None
    sets: list[str]
    grid: dict[str, list]
    max_steps: int
    train_pairs: int | None
    drawn: int | None                      # --trials: that many combinations drawn at random
    trials: list[dict]                     # each: {key: value} of the grid
    results: dict[str, dict] = field(default_factory=dict)   # trial name -> its outcome

    def definition(self) -> dict:
        return {"preset": self.preset, "config_file": self.config_file, "sets": self.sets, "grid": self.grid,
                "max_steps": self.max_steps, "train_pairs": self.train_pairs, "drawn": self.drawn,
                "trials": self.trials}

    def command(self, out_dir: Path) -> str:
        """The command line of this sweep, to repeat it (with --resume)."""
        args = ["simpo-lite", "sweep", *(["--preset", self.preset] if self.preset else []),
                *(["--config", self.config_file] if self.config_file else [])]
        args += [a for s in self.sets for a in ("--set", s)]
        args += [a for k, v in self.grid.items() for a in ("--grid", f"{k}={yaml_value(v)}")]
        args += ["--max-steps", str(self.max_steps), *(["--train-pairs", str(self.train_pairs)] if self.train_pairs else []),
                 *(["--trials", str(self.drawn)] if self.drawn else []), "--output-dir", str(out_dir)]
        return shlex.join(args)


def parse_grid(specs: list[str]) -> tuple[dict[str, list], list[str]]:
    """'section.key=[v1,v2]' (YAML list; a single value is a list of one) for each --grid."""
    grid, problems = {}, []
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--grid {spec!r}: expected section.key=[value,...]")
            continue
        if key in SET_BY_THE_SWEEP:  # trial_sets would override the grid's value: trials labelled with values never run
            problems.append(f"--grid {key}: the sweep sets it for every trial ({SET_BY_THE_SWEEP[key]})")
            continue
        if "," in text and not text.strip().startswith("["):
            problems.append(f"--grid {key}: write its values as a list, {key}=[{text.strip()}]")
            continue
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as err:
            problems.append(f"--grid {key}: {text!r} is not a YAML list ({str(err).splitlines()[0]})")
            continue
        values = [_number(v) for v in (values if isinstance(values, list) else [values])]
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if not values:
            problems.append(f"--grid {key}: the list is empty")
        elif repeated:
            problems.append(f"--grid {key}: {', '.join(repeated)} given twice (the same trial would run twice)")
        elif key in grid:
            problems.append(f"--grid {key}: given twice")
        else:
            grid[key] = values
    return grid, problems


# What trial_sets fixes for every trial, and where the user sets it instead.
SET_BY_THE_SWEEP = {"train.max_steps": "use --max-steps", "train.output_dir": "use --output-dir",
                    "train.on_collapse": "a collapsed trial always stops and is disqualified"}


def _number(value):
    """YAML reads 1e-5 (no dot) as text; a grid of learning rates means the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def grid_trials(grid: dict[str, list], trials: int | None, seed: int) -> list[dict]:
    """Every combination, or `trials` of them drawn at random (the same ones for the same seed)."""
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    if trials is not None and trials < len(combos):
        combos = random.Random(seed).sample(combos, trials)
    return combos


def trial_sets(sweep: Sweep, values: dict, trial_dir: Path) -> list[str]:
    return [*sweep.sets, *(f"{k}={yaml_value(v)}" for k, v in values.items()),
            f"train.max_steps={sweep.max_steps}", f"train.output_dir={trial_dir}",
            # A collapsed trial is disqualified: no use spending the budget on the rest of it.
            "train.on_collapse=stop",
            *([f"data.max_train_pairs={sweep.train_pairs}"] if sweep.train_pairs else [])]


def resolve_trials(sweep: Sweep, out_dir: Path) -> list[tuple[str, cfgmod.Config]]:
    """Every trial's config, resolved before anything runs; all problems of all trials at once."""
    resolved, problems = [], []
    for i, values in enumerate(sweep.trials):
        name = trial_name(i, len(sweep.trials))
        try:
            resolved.append((name, cfgmod.resolve(sweep.preset, sweep.config_file, None,
                                                  trial_sets(sweep, values, out_dir / name))))
        except ConfigError as err:
            problems += [p for p in map(lambda p: _grid_problem(p, sweep.grid), err.problems) if p not in problems]
    if problems:
        raise ConfigError(problems)
    data = resolved[0][1].data
    if not (data.eval_fraction > 0 or data.eval_split or data.eval_source):
        raise UserError("a sweep ranks trials by held-out metrics, and this config holds no pairs out: set "
                        "data.eval_fraction above 0, data.eval_split or data.eval_source")
    return resolved


def _grid_problem(problem: str, grid: dict) -> str:
    """A grid's values reach the config as --set KEY=VALUE: a problem with one names --grid, which the
    user gave, not --set."""
    if problem.startswith("--set: ") and any(f"{key} " in problem or f"'{key}'" in problem or f"{key}:" in problem
                                             for key in grid):
        return "--grid: " + problem[len("--set: "):]
    return problem


def load_or_start(sweep: Sweep, out_dir: Path, resume: bool, overwrite: bool) -> Sweep:
    """A new sweep in an empty DIR; --resume continues the one saved there, if it is the same sweep."""
    saved_path = out_dir / SWEEP_FILE
    if resume:
        if not saved_path.is_file():
            raise UserError(f"--resume: no {SWEEP_FILE} in {out_dir}; start the sweep without --resume")
        try:
            saved = json.loads(saved_path.read_text(encoding="utf-8"))
            saved["definition"]
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"--resume: {saved_path} is damaged ({err}); sweep into another --output-dir") from None
        differ = [k for k, v in sweep.definition().items() if saved["definition"].get(k) != v]
        if differ:
            raise UserError(f"--resume: this sweep differs from the one in {out_dir} in {', '.join(differ)}; "
                            f"repeat its command as it was, or sweep into another --output-dir")
        sweep.results = saved.get("results", {})
        return sweep
    contents = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    if contents:
        if not overwrite:
            raise UserError(f"{out_dir} is not empty: continue its sweep with --resume, start afresh with "
                            f"--overwrite, or choose another --output-dir")
        foreign = [p.name for p in contents if not _is_sweep_file(p)]
        if foreign:  # --overwrite deletes what a sweep wrote, never a user's other files
            raise UserError(f"--overwrite: {out_dir} holds files no sweep wrote ({', '.join(foreign[:3])}); "
                            f"choose another --output-dir")
        # Set aside, not deleted: a new sweep that fails before its first trial finishes (a mistyped data
        # file, a bad model) gives the old one back (`settle_previous`).
        previous = out_dir / PREVIOUS
        previous.mkdir()
        for path in contents:
            if path != previous:
                path.rename(previous / path.name)
    return sweep


PREVIOUS = ".previous-sweep"


def settle_previous(out_dir: Path, finished_one: bool) -> None:
    """After --overwrite: drop the old sweep once a new trial has finished; else put it back as it was."""
    import shutil

    previous = out_dir / PREVIOUS
    if not previous.is_dir():
        return
    if not finished_one:
        for path in previous.iterdir():
            target = out_dir / path.name
            if target.exists():  # the new sweep's unfinished first trial
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            path.rename(target)
    shutil.rmtree(previous)


def _is_sweep_file(path: Path) -> bool:
    return (path.name in (SWEEP_FILE, "sweep.csv", "sweep.png", "best.yaml", PREVIOUS)
            or path.name.startswith("trial-"))


def outcome(summary: dict) -> dict:
    end = summary.get("end_eval") or {}
    keep = [*RANKED, "eval_loss", "health/length_ratio", "health/looping", "health/no_stop", "eval_logps/chosen"]
    return {"status": "ok", **{k: end[k] for k in keep if k in end}, "train_seconds": summary.get("train_seconds")}


def _trial_outcome(name: str, trial_dir: Path, run) -> dict:
    """Run one trial; a collapse or divergence disqualifies it instead of ending the sweep."""
    from simpo_lite.errors import DiskFull, first_line
    from simpo_lite.run_folder import read_summary

    try:
        return outcome(run())
    except RunError as err:
        if err.exit_code == 130 or isinstance(err, DiskFull):  # the machine's fault, not the trial's
            raise
        summary = read_summary(trial_dir) or {}
        reason = "; ".join(summary.get("collapse") or []) or first_line(err).split(";")[0]
        return {"status": "disqualified", "reason": reason}


def run_sweep(sweep: Sweep, out_dir: Path, *, resume: bool = False, overwrite: bool = False,
              budget_minutes: float | None = None, quiet: bool = False, say=print) -> dict:
    """Run every trial not finished yet, then rank them: {"ranking": [(trial, result)], "best": (trial,
    best.yaml) or None, "main": whether this process wrote the tables}."""
    from accelerate import PartialState

    from simpo_lite.run_setup import Reuse
    from simpo_lite.sharding import fsdp_requested
    from simpo_lite.trainer import run_training

    configs = resolve_trials(sweep, out_dir)  # every problem before anything is written
    # Under accelerate every process runs every trial (as a run does); the main one writes the tables.
    process = PartialState()
    main = process.is_main_process
    with process.main_process_first():
        sweep = load_or_start(sweep, out_dir, resume, overwrite and main)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = say if main else (lambda message: None)
    first = configs[0][1]
    from simpo_lite.autofit import effective_batch

    pairs = effective_batch(first)
    say(f"sweep: {len(configs)} trials x {sweep.max_steps} steps of {pairs} pairs"
        + (f" on {sweep.train_pairs} training pairs" if sweep.train_pairs else "")
        + f"; {len(sweep.results)} finished earlier. Time per trial is measured on the first one"
        + (f"; no trial starts after {budget_minutes:g} min" if budget_minutes else "") + ".")
    # FSDP wraps the model in place, so its trials load the base afresh; DDP and one process reuse it.
    reuse = None if fsdp_requested() else Reuse()
    started, durations = time.perf_counter(), []
    try:
        for (name, cfg), values in zip(configs, sweep.trials):
            if name in sweep.results:
                continue
            elapsed = time.perf_counter() - started
            if budget_minutes and durations and elapsed + sum(durations) / len(durations) > budget_minutes * 60:
                say(f"sweep: budget of {budget_minutes:g} min reached after {elapsed / 60:.1f} min; "
                    f"{len(configs) - len(sweep.results)} trials not run (continue with --resume and a larger budget)")
                break
            say(f"sweep: {name} ({settings_text(values)})")
            t0 = time.perf_counter()
            try:
                result = _trial_outcome(name, out_dir / name, lambda: _quietly(run_training, cfg, quiet, reuse))
            except RunError as err:
                if main:
                    save_tables(sweep, out_dir)
                if err.exit_code != 130:
                    raise
                raise RunError(f"sweep interrupted during {name}; the {len(sweep.results)} finished trials are kept "
                               f"in {out_dir}; continue with: {sweep.command(out_dir)} --resume", exit_code=130) from None
            durations.append(time.perf_counter() - t0)
            sweep.results[name] = {**result, "seconds": round(durations[-1], 1)}
            if main:
                save_tables(sweep, out_dir)
            say(f"sweep: {name} " + (f"accuracy {result.get(RANKED[0], float('nan')):.3f}, margin "
                                    f"{result.get(RANKED[1], float('nan')):.3f}" if result["status"] == "ok"
                                    else f"disqualified: {result['reason']}") + f" ({durations[-1]:.0f} s)")
            left = len(configs) - len(sweep.results)
            if len(durations) == 1 and left:
                say(f"sweep: the other {left} trials should take about {left * durations[0] / 60:.1f} min")
    finally:
        if main:
            settle_previous(out_dir, finished_one=bool(durations))
    best = None
    if main:
        plot(sweep, out_dir)
        best = write_best(sweep, out_dir)
    return {"ranking": ranking(sweep), "best": best, "main": main}


def _quietly(run_training, cfg, quiet: bool, reuse):
    """A trial's end-of-run table goes to stderr, with its progress: the sweep's stdout is its result,
    the ranking (`simpo-lite sweep ... > ranking.tsv`)."""
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):
        return run_training(cfg, overwrite=True, quiet=quiet, reuse=reuse)


def sweep_command(preset: str | None, config_file, sets: list[str], grid: list[str], *, max_steps: int,
                  train_pairs: int | None, output_dir: Path, trials: int | None, budget_minutes: float | None,
                  resume: str | None, overwrite: bool, quiet: bool, say=print) -> None:
    """`simpo-lite sweep`: every problem of the grid and the base config at once, then the trials, then
    the ranking."""
    if resume not in (None, "latest"):
        raise UserError(f"--resume takes no value in sweep (got {resume!r}): it continues the sweep in --output-dir")
    parsed, problems = parse_grid(grid)
    try:
        base = cfgmod.resolve(preset, config_file, None, sets)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems)
    check_output_path(output_dir, "--output-dir", folder=True)
    sweep = Sweep(preset, str(config_file) if config_file else None, list(sets), parsed, max_steps, train_pairs,
                  trials, grid_trials(parsed, trials, base.train.seed))
    result = run_sweep(sweep, output_dir, resume=resume is not None, overwrite=overwrite,
                       budget_minutes=budget_minutes, quiet=quiet, say=say)
    print_ranking(sweep, result, output_dir)
