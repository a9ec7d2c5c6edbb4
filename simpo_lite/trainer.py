"""The training loop: accelerate for devices, mixed precision and DDP; our own loop around it.

One optimizer step = gradient_accumulation_steps micro-batches on each of world_size processes.
Micro-batches come from a deterministic batch order per (seed, epoch); process r of W takes every
W-th micro-batch, so W processes x 1 micro-batch see exactly what 1 process x W accumulation steps
sees, and a resumed run skips to the same position.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path

import torch

from simpo_lite import health, run_folder, sharding
from simpo_lite.config import Config, save_config
from simpo_lite.errors import RunError, interrupt_on_sigterm
from simpo_lite.progress import Progress, peak_memory_mb, print_summary
from simpo_lite.resume import prepare_resume
from simpo_lite.run_setup import RunParts, build_run_parts, start_trackers


def _mean_records(records: list[dict], weights: list[int]) -> dict:
    """Each micro-batch's metrics weighted by its pairs: the step's per-pair means."""
    return {key: sum(r[key] * w for r, w in zip(records, weights)) / sum(weights) for key in records[0]}


class Trainer:
    """Holds the live objects of one run; `fit` runs it to the end."""

    def __init__(self, cfg: Config, parts: RunParts, quiet: bool):
        self.cfg = cfg
        self.parts = parts
        self.acc = parts.accelerator
        self.output_dir = Path(cfg.train.output_dir)
        self.state = parts.state
        self.quiet = quiet
        self.world = self.acc.num_processes
        self.rank = self.acc.process_index
        self.per_step = self.world * cfg.train.gradient_accumulation_steps
        self._batches_epoch = None
        self._batches = None

    # ---- data position ------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._batches_epoch != epoch:
            self._batches = self.parts.batches_for_epoch(epoch)
            self._batches_epoch = epoch
        return self._batches

    def steps_per_epoch(self) -> int:
        return len(self.epoch_batches(0)) // self.per_step

    def my_micro_batches(self) -> list[list[int]]:
        """This process's micro-batches (dataset indices) for the next optimizer step."""
        batches = self.epoch_batches(self.state.epoch)
        first = self.state.batch_in_epoch
        return [batches[first + a * self.world + self.rank] for a in range(self.cfg.train.gradient_accumulation_steps)]

    def step_pairs(self) -> int:
        """Pairs in the next optimizer step over all processes (fixed, unless simpo.pack_tokens counts
        micro-batches in tokens)."""
        first = self.state.batch_in_epoch
        return sum(len(batch) for batch in self.epoch_batches(self.state.epoch)[first:first + self.per_step])

    def advance(self) -> None:
        self.state.step += 1
        self.state.batch_in_epoch += self.per_step
        if self.state.batch_in_epoch + self.per_step > len(self.epoch_batches(self.state.epoch)):
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    # ---- one optimizer step -------------------------------------------------------------
    def train_step(self) -> dict:
        from simpo_lite.policy import batch_objective

        policy, optimizer, acc = self.parts.policy, self.parts.optimizer, self.acc
        micro, step_pairs = self.my_micro_batches(), self.step_pairs()
        start = time.perf_counter()
        records, tokens = [], 0
        for i, indices in enumerate(micro):
            batch = self.parts.collate([self.parts.train_data[j] for j in indices])
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            # Real tokens the decoder runs over: both collators give a 2D mask that is 0 on padding
            # (a packed row holds its prompt once, so it counts it once).
            tokens += int(batch["attention_mask"].sum())
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            sync = acc.no_sync(policy) if i < len(micro) - 1 else contextlib.nullcontext()
            with sync:
                loss, metrics = batch_objective(policy, batch, self.cfg.simpo)
                # The loss is this micro-batch's mean over its pairs, and DDP averages over processes:
                # scaled so that the step's gradient is the mean over all its pairs. With micro-batches
                # of equal size the divisor is exactly gradient_accumulation_steps.
                acc.backward(loss / (step_pairs / (len(indices) * self.world)))
            records.append(metrics)
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        grad_norm = sharding.clip_grad_norm(acc, policy, self.parts.trainable, max_norm)
        sizes = [len(indices) for indices in micro]
        record = self._pair_mean(_mean_records(records, sizes), sum(sizes), step_pairs)
        if not (math.isfinite(record["loss"]) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            return self._on_nonfinite(record["loss"], grad_norm)
        lr = self.parts.scheduler.get_last_lr()[0]
        optimizer.step()
        self.parts.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        tokens = int(self._reduce({"t": float(tokens)}, op="sum")["t"])
        self.advance()
        return {"step": self.state.step, "epoch": self._epoch_float(), "lr": lr, "grad_norm": grad_norm, **record,
                "pairs": step_pairs,
                "tokens_per_s": tokens / elapsed, "step_time_s": elapsed, "peak_mem_mb": peak_memory_mb()}

    def _epoch_float(self) -> float:
        return round(self.state.epoch + self.state.batch_in_epoch / max(self.steps_per_epoch() * self.per_step, 1), 4)

    def _pair_mean(self, record: dict, pairs: int, step_pairs: int) -> dict:
        """The step's per-pair means over all processes, from this process's means over its `pairs`."""
        if self.world == 1:
            return record
        summed = self._reduce({key: value * pairs for key, value in record.items()}, op="sum")
        return {key: value / step_pairs for key, value in summed.items()}

    def _reduce(self, record: dict, op: str = "mean") -> dict:
        if self.world == 1:
            return record
        values = torch.tensor(list(record.values()), dtype=torch.float64, device=self.acc.device)
        values = self.acc.reduce(values, reduction=op)
        return dict(zip(record, values.tolist()))

    def _on_nonfinite(self, loss: float, grad_norm: float) -> None:
        what = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} ({loss if not math.isfinite(loss) else grad_norm})"
        if self.cfg.train.on_nonfinite == "skip":
            self.state.skipped_steps += 1
            self.advance_without_update()
            self.progress.message(f"[yellow]step {self.state.step}: {what}; step skipped "
                                  f"({self.state.skipped_steps} so far)[/]")
            return None
        latest = run_folder.checkpoints(self.output_dir)
        kept = f"the last good checkpoint is {latest[-1]}" if latest else "no checkpoint was written yet"
        raise RunError(f"{what} at step {self.state.step + 1}; stopped, {kept}. Lower train.learning_rate, "
                       f"check the data, or set train.on_nonfinite=skip")

    def advance_without_update(self) -> None:
        """A skipped step still consumes its data and counts, so the schedule keeps its length."""
        self.parts.scheduler.step()
        self.advance()

    # ---- evaluation and checkpoints ---------------------------------------------------
    def evaluate(self) -> dict | None:
        if self.parts.eval_data is None:
            return None
        with self.progress.evaluating(len(self.parts.eval_data)):
            return self._evaluate()

    def _evaluate(self) -> dict:
        from simpo_lite.policy import evaluate_dataset

        metrics = evaluate_dataset(self.parts.policy, self.parts.eval_data, self.parts.collate, self.cfg.simpo,
                                   self.cfg.train.eval_batch_size, rank=self.rank, world_size=self.world,
                                   reduce_sum=(lambda t: self.acc.reduce(t, reduction="sum")) if self.world > 1 else None,
                                   device=self.acc.device)
        record = self._with_health({"step": self.state.step, "epoch": self._epoch_float(), **metrics})
        if self.acc.is_main_process:
            self.metrics.write(record)
            self.acc.log(record, step=self.state.step)
        line = (f"eval @ step {self.state.step}: loss {metrics['eval_loss']:.4f}  "
                f"reward accuracy {metrics['eval_rewards/accuracies']:.3f}  margin {metrics['eval_rewards/margins']:.3f}")
        self.progress.message(line + (f"\n  {health.summary_line(record)}" if "health/length" in record else ""))
        first = self.health.first_eval is None
        signs = self.health.judge(record)
        note = health.recall_note(record, self.cfg.train, self.output_dir) if first else None
        if note:
            self.progress.message(f"[yellow]{note}[/]")
        if signs:
            self._on_collapse(signs)
        return record

    def _with_health(self, record: dict) -> dict:
        """The eval record with the generation health of the live policy; its answers go to samples.jsonl.
        The main process generates (a DDP module needs no other process for that) and shares the figures."""
        if self.health.prompts is None:
            return record
        if self.acc.is_main_process:
            record, samples = self.health.measure(record, self._peft_model(), self.parts.tokenizer)
            for sample in samples:
                self.samples.write(sample)
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            record = broadcast_object_list([record])[0]
        return record

    def _on_collapse(self, signs: list[str]) -> None:
        self.progress.message(f"[yellow]warning: generation health: {'; '.join(signs)}. "
                              f"{health.advice(self.cfg, self.output_dir)}[/]")
        if self.cfg.train.on_collapse != "stop":
            return
        latest = self.save()
        healthy = self.health.last_healthy_checkpoint
        if self.acc.is_main_process:
            run_folder.write_summary(self.output_dir, {
                "steps": self.state.step, "stopped": "collapse", "collapse": signs,
                "last_healthy_checkpoint": str(healthy) if healthy else None, "last_checkpoint": str(latest)})
        where = (f"the last healthy checkpoint is {healthy} (its answers to the held-out prompts: simpo-lite "
                 f"generate {healthy} --out answers.json)" if healthy else "no checkpoint was saved while the run was healthy")
        raise RunError(f"stopped at step {self.state.step} (train.on_collapse=stop): {signs[0]}; {where}; "
                       f"this step's state is in {latest}; {health.advice(self.cfg, self.output_dir)}")

    def save(self, rng: dict | None = None) -> Path | None:
        from accelerate.utils import gather_object

        rng = rng or run_folder.rng_state()
        self.state.train_seconds = self.train_seconds()
        rngs = gather_object([rng]) if self.world > 1 else [rng]
        adapter_state = sharding.full_adapter_state(self.acc, self.parts.policy)
        optimizer_state = sharding.optimizer_state(self.acc, self.parts.policy, self.parts.optimizer)
        path = None
        # A healthy run's new checkpoint becomes the last healthy one: the older needs no protection
        # beyond save_total_limit (else the final checkpoint would keep one more than the limit).
        protect = None if self.health.healthy else self.health.last_healthy_checkpoint
        if self.acc.is_main_process:
            path = run_folder.save_checkpoint(self.output_dir, self._peft_model(), optimizer_state, self.parts.scheduler,
                                              self.state, self.cfg, rngs, self.cfg.train.save_total_limit, adapter_state,
                                              protect=protect)
            self.health.saved(path)
        self.saved_step = self.state.step
        self.acc.wait_for_everyone()
        return path

    def train_seconds(self) -> float:
        """This run's time so far, the parts before earlier resumes included."""
        return self.seconds_before + time.perf_counter() - self.started

    def _health_prompts(self):
        if self.cfg.train.health_prompts and sharding.uses_fsdp(self.acc):
            # Generating under FSDP needs every process in every forward; not done yet.
            self.progress.message("[yellow]note: generation health is off under FSDP[/]")
            return None
        return health.pick_prompts(self.parts.eval_data, self.cfg.train.health_prompts, self.cfg.train.seed,
                                   self.parts.tokenizer)

    def _peft_model(self):
        return self.acc.unwrap_model(self.parts.policy).model

    # ---- the run ------------------------------------------------------------------------
    def fit(self) -> dict:
        total = self.parts.total_steps  # the length the learning-rate schedule was built for
        train_cfg = self.cfg.train
        resumed = self.parts.resumed_from is not None
        resume_step = self.state.step if resumed else None
        self.metrics = run_folder.JsonLines(self.output_dir / run_folder.METRICS, resume_step)
        self.samples = run_folder.JsonLines(self.output_dir / run_folder.SAMPLES, resume_step)
        previous_evals = [r for r in run_folder.read_metrics(self.metrics.path) if "eval_loss" in r]
        self.progress = Progress(total, self.state.step, self.quiet, enabled=self.acc.is_main_process,
                                 eval_every=train_cfg.eval_steps if self.parts.eval_data is not None else 0)
        self.health = health.HealthMonitor(self._health_prompts(), train_cfg, previous_evals)
        self.started, self.seconds_before = time.perf_counter(), self.state.train_seconds
        self.saved_step = self.state.step if resumed else None
        first_eval = None if resumed else self.evaluate()
        last_eval = first_eval
        self.parts.policy.train()
        if resumed:
            run_folder.set_rng_state(self.parts.resume_rng)
        step_rng, rng_step = None, -1
        try:
            while self.state.step < total:
                # The RNG as of the last completed step: an interrupted step must be replayed from it.
                step_rng, rng_step = run_folder.rng_state(), self.state.step
                record = self.train_step()
                if record is None:
                    continue
                if self.acc.is_main_process and (self.state.step % train_cfg.logging_steps == 0 or self.state.step == total):
                    self.metrics.write(record)
                    self.acc.log(record, step=self.state.step)
                self.progress.update(self.state.step, record)
                if self.state.step % train_cfg.eval_steps == 0 or self.state.step == total:
                    last_eval = self.evaluate()
                if self.state.step % train_cfg.save_steps == 0:
                    self.save()
            if self.saved_step != self.state.step:
                # The final state is a checkpoint too, so --resume --max-steps N goes on from the last step
                # (not from the last multiple of save_steps, nor from nothing when save_steps exceeds the run).
                self.save()
        except KeyboardInterrupt:
            self.parts.optimizer.zero_grad(set_to_none=True)
            path = self.save(rng=step_rng if self.state.step == rng_step else None)
            self.progress.close()
            raise RunError(f"interrupted at step {self.state.step}; checkpoint saved to {path}; "
                           f"continue with: simpo-lite train --config {self.output_dir / run_folder.CONFIG} --resume",
                           exit_code=130) from None
        finally:
            self.progress.close()
        return self.finish(first_eval, last_eval, self.train_seconds())

    def finish(self, first_eval: dict | None, last_eval: dict | None, seconds: float) -> dict:
        summary = run_folder.run_summary(self.output_dir, self.state, seconds, peak_memory_mb(), first_eval, last_eval,
                                         self.parts.resumed_from, self.cfg.train)
        adapter_state = sharding.full_adapter_state(self.acc, self.parts.policy)
        if self.acc.is_main_process:
            run_folder.save_final_adapter(self.output_dir, self._peft_model(), self.parts.tokenizer, adapter_state)
            summary = run_folder.write_summary(self.output_dir, summary)
            print_summary(summary, self.output_dir)
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return summary


@run_folder.names_way_forward
def run_training(cfg: Config, resume: str | None = None, overwrite: bool = False, quiet: bool = False,
                 reuse=None) -> dict:
    """Train to the end (or resume), writing checkpoints, metrics.jsonl, the adapter and a summary.
    reuse: a run_setup.Reuse shared by the runs of one process (sweep trials)."""
    output_dir = Path(cfg.train.output_dir)
    run_folder.check_output_dir(output_dir, resume, overwrite)  # refuses only; clear_run below deletes
    interrupt_on_sigterm()
    if quiet:
        _hide_library_progress_bars()
    if resume:
        cfg = keep_auto_choice(cfg, resume)
    resume_path = prepare_resume(cfg, resume) if resume else None  # checks before the folder changes
    with warnings.catch_warnings():
        # Deprecation chatter from transformers/peft internals says nothing the user can act on.
        warnings.filterwarnings("ignore", category=FutureWarning)
        parts = build_run_parts(cfg, resume_path, quiet, reuse)
        if overwrite and not resume and parts.accelerator.is_main_process:
            # Only now, with the data and model built, is the old run cleared: a typo costs nothing.
            run_folder.clear_run(output_dir)
        parts.accelerator.wait_for_everyone()
        start_trackers(parts.accelerator, parts.cfg)
        if parts.accelerator.is_main_process:
            save_config(parts.cfg, output_dir / run_folder.CONFIG, _auto_note(cfg, parts.cfg))
        return Trainer(parts.cfg, parts, quiet).fit()


def keep_auto_choice(cfg: Config, resume: str) -> Config:
    """A resumed run with `auto` settings takes its checkpoint's choice (simpo_lite.autofit)."""
    from simpo_lite.autofit import keep_saved_choice, wants_autofit
    from simpo_lite.config import load_saved_config
    from simpo_lite.resume import find_checkpoint

    if not wants_autofit(cfg):
        return cfg
    checkpoint, _ = find_checkpoint(Path(cfg.train.output_dir), resume)
    return keep_saved_choice(cfg, load_saved_config(checkpoint / run_folder.CONFIG))


def _auto_note(asked: Config, resolved: Config) -> str:
    """What auto-fit chose, for config.yaml; nothing where `auto` stood for nothing (layers without
    gradient checkpointing all keep their activations)."""
    chosen = {name: getattr(getattr(resolved, section), key)
              for name, section, key in (("train.micro_batch_size", "train", "micro_batch_size"),
                                         ("model.uncheckpointed_layers", "model", "uncheckpointed_layers"))
              if getattr(getattr(asked, section), key) == "auto"}
    auto = [f"{name}: auto -> {value}" for name, value in chosen.items() if value != "auto"]
    return "auto-fit (simpo_lite.autofit): " + ", ".join(auto) if auto else ""


def _hide_library_progress_bars() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
