"""`auto` micro-batch and checkpointing: the largest setting the memory plan fits on the device.

`train.micro_batch_size: auto` and `model.uncheckpointed_layers: auto` are resolved once, before the
model loads, from simpo_lite.plan's estimate against a budget:

- on a GPU its free memory (torch.cuda.mem_get_info), which already leaves out other processes, or
  `train.memory_budget_gb` where that is less;
- on the CPU `train.memory_budget_gb` (peak RSS of the run), by default half the RAM available at the
  start: the cores and memory of a CPU machine are usually shared, and glibc keeps freed blocks, so the
  resident set runs above the live tensors the plan counts. A CPU run also holds what the plan does not
  count (process_bytes: what it holds already, plus what loading the model leaves behind), and the
  processes of a multi-process CPU run share the budget.

`model.uncheckpointed_layers` is `auto` by default: a layer that keeps its activations is not run twice,
and on the CPU's bench that is the larger part of what simpo-lite can save over TRL (README, "Memory
and speed"). When the plan cannot read the model's architecture, the default falls back to recomputing
every layer, which always fits where the model trains at all; an explicit `auto` micro-batch still
needs the plan.

The plan's peak is measured within -2.3%..+14% (README, "Plan memory before training"), and the step's
own memory within -9%..+25%; MARGIN covers the worst under-estimate of either, so a run the plan says
fits does not run out of memory. The micro-batch comes first (a divisor of the effective batch, so
train.batch_size is kept through gradient accumulation), then as many uncheckpointed layers as the
rest of the budget holds. The resolved numbers replace `auto` in the run's config.yaml, so a resumed run
(or `--config run/config.yaml`) makes the same choice without planning again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace

from simpo_lite.config import Config
from simpo_lite.errors import UserError
from simpo_lite.plan import (GIB, architecture, batch_suggestion, estimate, largest_micro_batch,
                             most_uncheckpointed_layers, setting_from_config)

# The worst measured under-estimate of the plan: -2.3% of the whole peak, -9% of the step's own memory.
MARGIN = 0.10
# Share of the RAM available at the start that a CPU run takes by default (see the module docstring).
CPU_SHARE = 0.5
# What loading the 4-bit model leaves behind in the CPU allocator besides the tensors the plan counts:
# about 250 MiB measured for SmolLM2-135M, rounded up.
LOAD_RESIDUE_BYTES = 0.3 * GIB
# The whole allowance where the resident set cannot be read: 800 MiB measured for the demo run (Python,
# torch and the libraries 470 MiB, the tokenized data 70 MiB, the load residue), rounded up.
CPU_PROCESS_FALLBACK_BYTES = 1.0 * GIB


@dataclass(frozen=True)
class Choice:
    """What `auto` became, and the plan behind it."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    uncheckpointed_layers: int
    layers: int
    checkpointing: bool
    planned_peak: float  # bytes, as plan's Estimate.peak; 0 when the plan could not read the model
    budget: float        # bytes the plan's peak may take (the device budget less what the plan does not count)
    budget_note: str
    unit: str = "pairs"  # what micro_batch_size counts: rows of pack_tokens tokens with simpo.pack_tokens

    def line(self) -> str:
        batch = self.micro_batch_size * self.gradient_accumulation_steps
        if not self.planned_peak:
            return (f"auto-fit: uncheckpointed_layers=0, every layer recomputed in backward: {self.budget_note}; "
                    f"set model.uncheckpointed_layers to a number to keep some layers' activations")
        return (f"auto-fit: micro_batch_size={self.micro_batch_size} x gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps} ({batch} {self.unit} per step), uncheckpointed_layers="
                f"{self.uncheckpointed_layers} of {self.layers}{'' if self.checkpointing else ' (checkpointing off)'}: planned peak {self.planned_peak / GIB:.2f} GiB "
                f"+ {MARGIN:.0%} margin = {self.planned_peak * (1 + MARGIN) / GIB:.2f} GiB of "
                f"{self.budget / GIB:.2f} GiB" + (f" ({self.budget_note})" if self.budget_note else "")
                + ("; the plan's worst case (every row at data.max_length) is over the budget even with every "
                   "layer recomputed: lower " + ("train.micro_batch_size or " if self.micro_batch_size > 1 else "")
                   + "data.max_length, or raise the budget" if self.planned_peak * (1 + MARGIN) > self.budget else ""))


def wants_autofit(cfg: Config) -> bool:
    """Whether `cfg` leaves anything to choose: without gradient checkpointing every layer keeps its
    activations anyway, so `auto` layers then stand for nothing (and stay `auto` in config.yaml)."""
    auto_layers = cfg.model.uncheckpointed_layers == "auto" and cfg.model.gradient_checkpointing
    return cfg.train.micro_batch_size == "auto" or auto_layers


def effective_batch(cfg: Config) -> int:
    """Pairs per optimizer step per process (config.build_config fills batch_size for an auto micro-batch)."""
    t = cfg.train
    return t.batch_size if t.batch_size is not None else t.micro_batch_size * t.gradient_accumulation_steps


def available_ram() -> float:
    """Bytes of RAM available to a new process (MemAvailable), or the free pages where /proc is absent."""
    import os

    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def device_budget(cfg: Config, device: str, processes: int = 1) -> tuple[float, str]:
    """(bytes the plan's peak may take on `device` for each of `processes` local processes, where that
    figure comes from)."""
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        gb = cfg.train.memory_budget_gb
        if gb is not None and gb * GIB < free:  # a GPU shared with other work, or a smaller card rehearsed
            return gb * GIB, f"train.memory_budget_gb={gb:g} of the {free / GIB:.1f} GiB free on {torch.cuda.get_device_name()}"
        return float(free), f"free memory of {torch.cuda.get_device_name()}, {total / GIB:.1f} GiB in all"
    gb = cfg.train.memory_budget_gb
    if gb is not None:
        total, note = gb * GIB, f"train.memory_budget_gb={gb:g}"
    else:
        ram = available_ram()
        total, note = CPU_SHARE * ram, f"half the {ram / GIB:.1f} GiB of RAM available; set train.memory_budget_gb"
    if processes > 1:
        total, note = total / processes, f"{note}, shared by {processes} processes"
    held = process_bytes()
    return total - held, f"{note}, less {held / GIB:.2f} GiB for the process itself"


def process_bytes() -> float:
    """What a CPU training process holds besides the plan's tensors: its resident set now (auto-fit runs
    after the data is prepared and before the model loads: Python, torch, the libraries, the data) plus
    what loading the model will leave behind."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024.0 + LOAD_RESIDUE_BYTES
    except OSError:
        pass
    return CPU_PROCESS_FALLBACK_BYTES


def choose(cfg: Config, device: str, budget: float, note: str = "", fsdp_processes: int = 1) -> Choice:
    """The micro-batch and uncheckpointed layers that `auto` stands for, for a `budget` of bytes on each
    device (of `fsdp_processes` that shard the model, when FSDP does)."""
    auto_micro = cfg.train.micro_batch_size == "auto"
    auto_layers = cfg.model.uncheckpointed_layers == "auto"
    effective = effective_batch(cfg)
    placeholder = replace(cfg, train=replace(cfg.train, micro_batch_size=1 if auto_micro else cfg.train.micro_batch_size),
                          model=replace(cfg.model, uncheckpointed_layers=0 if auto_layers else cfg.model.uncheckpointed_layers))
    try:
        arch = architecture(cfg.model)
    except (UserError, AttributeError) as err:  # a Hub model not cached yet, or a config the plan cannot read
        if auto_micro:
            raise
        return Choice(cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, 0, 0, True, 0.0, budget,
                      f"the memory plan cannot read this model ({err})")
    s = replace(setting_from_config(placeholder, device), fsdp_processes=fsdp_processes)
    usable = max(budget, 0.0) / (1 + MARGIN)
    micro, accumulation = s.micro_batch, cfg.train.gradient_accumulation_steps
    if auto_micro:
        fit = largest_micro_batch(arch, s, usable)
        if fit == 0:
            from simpo_lite.plan_report import what_would_fit

            if budget <= 0:
                raise UserError(f"auto-fit: no memory is left for the run ({note}): raise train.memory_budget_gb")
            raise UserError(f"auto-fit: not even 1 pair x {s.seq_len} tokens fits {budget / GIB:.2f} GiB with a "
                            f"{MARGIN:.0%} margin ({note}): {what_would_fit(arch, s, usable, cfg.data.max_prompt_length)}")
        micro, accumulation = batch_suggestion(effective, fit)
    s = replace(s, micro_batch=micro)
    layers = most_uncheckpointed_layers(arch, s, usable) if auto_layers else s.uncheckpointed_layers
    s = replace(s, uncheckpointed_layers=layers)
    return Choice(micro, accumulation, layers, arch.layers, s.gradient_checkpointing, estimate(arch, s).peak(), budget,
                  note, "rows" if s.pack_tokens else "pairs")


def apply(cfg: Config, choice: Choice) -> Config:
    """`cfg` with the choice in place of `auto`: what the run trains with and saves to config.yaml."""
    train = cfg.train
    if train.micro_batch_size == "auto":
        train = replace(train, micro_batch_size=choice.micro_batch_size,
                        gradient_accumulation_steps=choice.gradient_accumulation_steps,
                        batch_size=choice.micro_batch_size * choice.gradient_accumulation_steps)
    model = cfg.model
    if model.uncheckpointed_layers == "auto":
        model = replace(model, uncheckpointed_layers=choice.uncheckpointed_layers)
    return replace(cfg, train=train, model=model)


def fit(cfg: Config, device: str | None = None, processes: int = 1, fsdp: bool = False) -> tuple[Config, Choice | None]:
    """(cfg with `auto` resolved for `device` (default: this machine's, as a run here would), shared by
    `processes` local processes on the CPU, or with `fsdp` sharded over them, the choice); cfg unchanged
    and None without `auto`."""
    if not wants_autofit(cfg):
        return cfg, None
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    budget, note = device_budget(cfg, device, processes)  # a CPU's RAM is shared, sharded or not
    choice = choose(cfg, device, budget, note, processes if fsdp else 1)
    return apply(cfg, choice), choice


def keep_saved_choice(cfg: Config, saved: Config) -> Config:
    """A resumed run takes the choice its checkpoint trained with instead of planning again (the free
    memory may have changed, and a different micro-batch would change the batch order)."""
    if not wants_autofit(cfg):
        return cfg
    train, model = cfg.train, cfg.model
    if train.micro_batch_size == "auto" and train.batch_size == effective_batch(saved):
        train = replace(train, micro_batch_size=saved.train.micro_batch_size, batch_size=effective_batch(saved),
                        gradient_accumulation_steps=saved.train.gradient_accumulation_steps)
    if model.uncheckpointed_layers == "auto":
        model = replace(model, uncheckpointed_layers=saved.model.uncheckpointed_layers)
    return dataclasses.replace(cfg, train=train, model=model)
