"""Resume, in the order a resumed run does it: find an intact checkpoint, check the config against the
one it trained with, then load its adapter, optimizer, scheduler, data position and RNG state.

Nothing in the run folder changes before every check has passed (`prepare_resume`); a damaged
checkpoint is named, passed over for the newest intact one and kept (renamed), never deleted.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from simpo_lite import sharding
from simpo_lite.config import Config, load_saved_config
from simpo_lite.errors import UserError
from simpo_lite.files import looks_like_local_path, missing_path
from simpo_lite.run_folder import (CONFIG, TRAINER_STATE, TrainerState, checkpoint_problem, checkpoint_step,
                                   checkpoints, finished_step, newest_intact, what_it_holds)


# Keys a resume may change: when to log, evaluate, save and stop, and what to do about faults; none of
# them changes what a training step computes. Anything else (data, model, LoRA shape, SimPO, schedule,
# batch, seed) would make the resumed steps a different run than the checkpoint's, and is refused.
RESUME_MAY_CHANGE = {
    "train": {"output_dir", "max_steps", "logging_steps", "eval_steps", "eval_batch_size", "save_steps",
              "save_total_limit", "on_nonfinite", "on_collapse", "health_prompts", "health_max_new_tokens",
              "collapse_looping", "collapse_length_ratio", "collapse_recall_drop", "collapse_logps_drop", "report_to",
              "memory_budget_gb"},  # auto settings keep the checkpoint's choice (autofit.keep_saved_choice)
    "data": {"num_proc", "max_bad_fraction"},
    "export": "*",
}
PATH_KEYS = {"model.name_or_path", "data.source", "data.eval_source"}


def _stderr(message: str) -> None:
    print(f"simpo-lite: {message}", file=sys.stderr, flush=True)


def find_checkpoint(output_dir: Path, resume: str) -> tuple[Path, list[tuple[Path, str]]]:
    """(the checkpoint to resume from, the damaged newer ones passed over). 'latest' means the newest
    intact checkpoint in output_dir; anything else is a checkpoint folder, which must be intact."""
    if resume == "latest":
        found = checkpoints(output_dir)
        if not found:
            if output_dir.is_dir() and any(output_dir.iterdir()):
                raise UserError(f"--resume: '{output_dir}' holds {what_it_holds(output_dir)}")
            raise UserError(f"--resume: '{output_dir}' holds no run to resume; start without --resume, or give "
                            f"the run's folder (--output-dir) or a checkpoint folder (--resume DIR/checkpoint-N)")
        damaged = []
        for path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                return path, damaged
            damaged.append((path, problem))
        listed = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise UserError(f"--resume: no intact checkpoint in '{output_dir}' ({listed}); they are left as they are: "
                        f"start afresh with --overwrite (which deletes them) or another --output-dir")
    path = Path(resume)
    if not path.is_dir():
        raise UserError(missing_path(resume, "--resume: checkpoint", "use 'latest' or a checkpoint-N folder"))
    if not (path / TRAINER_STATE).is_file():
        raise UserError(f"--resume: '{resume}' is not a simpo-lite checkpoint (no {TRAINER_STATE}); "
                        f"use 'latest' or a checkpoint-N folder")
    problem = checkpoint_problem(path)
    if problem:
        intact = newest_intact(path.parent)
        other = f"resume from {intact} instead (--resume {intact})" if intact else "no other checkpoint there is intact"
        raise UserError(f"--resume: {path} is damaged: {problem}; it is left as it is; {other}")
    return path, []


def prepare_resume(cfg: Config, resume: str, say=_stderr) -> Path:
    """The checkpoint a resumed run starts from, after every check; only then are damaged newer
    checkpoints moved aside (renamed, never deleted), so later saves cannot overwrite them."""
    output_dir = Path(cfg.train.output_dir)
    checkpoint, damaged = find_checkpoint(output_dir, resume)
    check_resume_config(cfg, checkpoint, resume)
    older = _older_than_finished(cfg, checkpoint)
    if os.environ.get("RANK", "0") != "0":
        return checkpoint  # under torchrun the first process moves and tells, before any process saves
    for path, problem in damaged:
        aside = _set_aside(path)
        say(f"{path} cannot be resumed from: {problem}; kept as {aside.name}")
    step = checkpoint_step(checkpoint)
    say(f"resuming from {checkpoint} (step {step}){', the newest intact checkpoint' if damaged else ''}{older}")
    if step == cfg.train.max_steps and finished_step(Path(cfg.train.output_dir)) == step:
        say(f"the run finished at step {step}: nothing to train; give --max-steps above {step} to train it longer")
    before = load_saved_config(checkpoint / CONFIG).train.max_steps
    if cfg.train.max_steps != before:
        say(f"train.max_steps {before} -> {cfg.train.max_steps}: the learning-rate schedule is rebuilt for the "
            f"new length and goes on from step {step}")
    return checkpoint


def _older_than_finished(cfg: Config, checkpoint: Path) -> str:
    """A checkpoint older than the run's final adapter may only lead past it: a resume that ends at or
    before the finished step would replace the newer adapter and metrics with older ones. Returns what
    the resume then trains again, for the "resuming from" line."""
    output_dir = Path(cfg.train.output_dir)
    step, finished = checkpoint_step(checkpoint), finished_step(output_dir)
    if finished is None or step >= finished or checkpoint.resolve().parent != output_dir.resolve():
        return ""
    lost, are = (f"step {finished}", "is") if finished == step + 1 else (f"steps {step + 1}-{finished}", "are")
    if cfg.train.max_steps is None or cfg.train.max_steps <= finished:
        newest = newest_intact(output_dir)
        way = (f"train it longer from its last step with --resume --max-steps N (N above {finished})"
               if newest is not None and checkpoint_step(newest) >= finished
               else f"train it longer with --max-steps N (N above {finished}; {lost} {are} trained again)")
        raise UserError(f"--resume: {checkpoint.name} is older than the run's finished adapter (step {finished}) "
                        f"in '{output_dir}': resuming from it would discard {lost}; {way}, start afresh with "
                        f"--overwrite, or resume from it into another folder: --output-dir NEW --resume {checkpoint}")
    return f"; {lost} of the finished run {are} trained again"


def _set_aside(path: Path) -> Path:
    aside, n = path.with_name(f"{path.name}.damaged"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{n}")
    path.rename(aside)
    return aside


def config_changes(now: Config, saved: Config) -> list[tuple[str, object, object]]:
    """(section.key, value now, saved value) of every key that differs and that a resume may not change."""
    changes = []
    now_d, saved_d = now.to_dict(), saved.to_dict()
    for section, values in now_d.items():
        allowed = RESUME_MAY_CHANGE.get(section, set())
        for key, value in values.items():
            name, then = f"{section}.{key}", saved_d[section][key]
            if allowed == "*" or key in allowed or _same(name, value, then):
                continue
            changes.append((name, value, then))
    return changes


def _same(name: str, a, b) -> bool:
    if a == b:
        return True
    if name in PATH_KEYS and isinstance(a, str) and isinstance(b, str) and looks_like_local_path(a):
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return False


def check_resume_config(cfg: Config, checkpoint: Path, resume: str) -> None:
    """Refuse a resume whose config would make a different run than the checkpoint's, naming the keys."""
    saved = load_saved_config(checkpoint / CONFIG)
    step = checkpoint_step(checkpoint)
    flag = "--resume" if resume == "latest" else f"--resume {checkpoint}"
    run_config = Path(cfg.train.output_dir) / CONFIG
    config = run_config if run_config.is_file() and not config_changes(load_saved_config(run_config), saved) \
        else checkpoint / CONFIG
    allowed = ("a resume may change only train.max_steps (to train longer), the logging, eval and save intervals, "
               "save_total_limit, eval_batch_size, the health and collapse settings, on_nonfinite, report_to, "
               "data.num_proc, data.max_bad_fraction and export.*")
    changes = config_changes(cfg, saved)
    if changes:
        listed = ", ".join(f"{k} ({_short(a)} now, {_short(b)} in the checkpoint)" for k, a, b in changes[:6])
        if len(changes) > 6:
            listed += f", and {len(changes) - 6} more: {', '.join(k for k, _, _ in changes[6:])}"
        raise UserError(f"--resume: {checkpoint} was trained with a different config: {listed}. Resume with the "
                        f"saved config: simpo-lite train --config {config} {flag} ({allowed}, e.g. --set "
                        f"train.max_steps={max(2 * step, 1)}); or start a new run in another --output-dir")
    finished = finished_step(Path(cfg.train.output_dir))
    if cfg.train.max_steps is not None and cfg.train.max_steps < step:
        longer = finished is not None and finished >= step
        least, n = (f"more than {finished} to train the finished run longer", 2 * finished) if longer \
            else (f"at least {step}", step)
        raise UserError(f"--resume: train.max_steps={cfg.train.max_steps} is below the step of {checkpoint} ({step}): "
                        f"give {least}, e.g. simpo-lite train --config {config} {flag} --max-steps {n}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."



def _load_torch(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(f"--resume: {path} cannot be read ({str(err).strip().splitlines()[0][:120]}); resume from "
                        f"another checkpoint: --resume {Path(path).parent.parent}/checkpoint-N") from None


def load_adapter_weights(model, checkpoint: Path) -> None:
    """The checkpoint's adapter into the fresh peft model, before any wrapping (FSDP shards it after)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    file = checkpoint / "adapter_model.safetensors"
    if not file.is_file():
        raise UserError(f"--resume: {checkpoint} has no adapter_model.safetensors; it is not a complete checkpoint")
    saved = load_file(str(file))
    # A file without some of the adapter's weights would load "successfully" and silently restart them.
    missing = set(get_peft_model_state_dict(model)) - set(saved)
    result = set_peft_model_state_dict(model, saved)
    if missing or getattr(result, "unexpected_keys", None):
        raise UserError(f"--resume: adapter weights in {checkpoint} do not fit this model/LoRA config "
                        f"({len(missing)} missing, {len(getattr(result, 'unexpected_keys', []))} unexpected)")


def check_same_data(checkpoint: Path, train_pairs: int) -> None:
    """Refuse a resume whose training pairs are not the checkpoint's in number: the batch order would be
    another, and the resumed steps a different run (the file changed, or how pairs are held out did)."""
    then = json.loads((checkpoint / TRAINER_STATE).read_text()).get("train_pairs", 0)
    if then and then != train_pairs:
        raise UserError(f"--resume: the training data now gives {train_pairs} pairs, {checkpoint} trained on {then}: "
                        f"the data changed, or how eval pairs are held out (whole prompts since 2026-12-06); resume "
                        f"with the data of the checkpoint, or start a new run (--output-dir NEW)")


def restore_training_state(checkpoint: Path, acc, policy, optimizer, scheduler) -> tuple[TrainerState, dict]:
    """Optimizer and scheduler state into the prepared objects; (data position, this process's RNG state)."""
    sharding.load_optimizer_state(acc, policy, optimizer, _load_torch(checkpoint / "optimizer.pt"), checkpoint)
    scheduler.load_state_dict(_load_torch(checkpoint / "scheduler.pt"))
    # The optimizer's groups and the scheduler's _last_lr come back with the checkpoint's learning rate,
    # which is the old schedule's when train.max_steps changed; the first resumed step uses it, so take
    # the new schedule's value at the resumed step (the lambdas are this run's; only their step is loaded).
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
    state = TrainerState(**json.loads((checkpoint / TRAINER_STATE).read_text()))
    rng_file = checkpoint / f"rng_state_{acc.process_index}.pt"
    if not rng_file.is_file():
        raise UserError(f"--resume: {checkpoint} was written by fewer processes than this run has "
                        f"({acc.num_processes}); resume with the same number of processes")
    return state, _load_torch(rng_file)
