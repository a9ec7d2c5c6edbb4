"""`simpo-lite plan`, the command: the estimate of plan.py as a table, what fits a budget, and what would."""

from __future__ import annotations

from dataclasses import replace

from simpo_lite.config import Config
from simpo_lite.errors import RunError, UserError
from simpo_lite.plan import (ALLOCATOR_SLACK, GIB, Arch, Estimate, Setting, architecture, batch_suggestion,
                             default_budget, estimate, largest_max_length, largest_micro_batch,
                             most_uncheckpointed_layers, setting_from_config)


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def _describe(cfg: Config, s: Setting) -> str:
    dtype = {2: cfg.model.compute_dtype if cfg.model.compute_dtype in ("bf16", "fp16") else "bf16", 4: "fp32"}[s.compute_bytes]
    optim = "paged 8-bit AdamW" if s.optimizer == "paged_adamw_8bit" else "fp32 AdamW"
    per_micro = (f"{s.micro_batch} rows of up to {s.pack_tokens} tokens" if s.pack_tokens
                 else f"{s.micro_batch} pairs x {s.seq_len} tokens")
    return (f"{per_micro} per micro-batch ({_rows(s)}), "
            f"{'4-bit NF4' if s.quantize else dtype} base, LoRA r={s.lora_r} on {len(s.lora_targets)} linears/layer, "
            f"{optim}, {dtype} compute, {'fp32' if s.residual_bytes == 4 else dtype} residual stream, "
            f"gradient checkpointing {_checkpointing(s)}, "
            f"log-prob chunk {s.chunk_tokens} tokens")


def _rows(s: Setting) -> str:
    if not s.pack_prompt:
        return f"{s.rows} rows"
    rows = f"{s.rows} packed row{'s' if s.rows > 1 else ''}"
    return f"{rows} of {s.row_len} tokens, " + ("as many pairs as fit" if s.pack_tokens else "one pair each")


def _checkpointing(s: Setting) -> str:
    if not s.gradient_checkpointing:
        return "off"
    return "on" if not s.uncheckpointed_layers else f"on all but the last {s.uncheckpointed_layers} layers"


def breakdown_rows(arch: Arch, est: Estimate) -> list[tuple[str, float, float]]:
    """(component, simpo-lite bytes, full-logits trainer bytes): the trainer with transformers' own
    layers and peft's LoRA path (plan.Setting.peer), the same settings otherwise."""
    s = est.setting
    peer = estimate(arch, replace(s, peer=True))
    frozen = "fp32: prepare_model_for_kbit_training upcasts them" if s.quantize and s.residual_bytes == 4 else "compute dtype"
    head = "embeddings" if arch.tied_embeddings else "embeddings + output head"
    quant = "NF4 + double-quant constants" if s.double_quant else "NF4 + fp32 absmax"
    ckpt = "checkpointed hidden states (1 per layer per token)" if s.gradient_checkpointing else "all layers' activations"
    if s.gradient_checkpointing and s.uncheckpointed_layers:
        ckpt = f"checkpointed hidden states + all activations of the last {min(s.uncheckpointed_layers, arch.layers)} layers"
    rows = [
        (f"base linear weights ({quant if s.quantize else 'unquantized'})", est.base_weights, est.base_weights),
        (f"{head}, norms ({frozen})", est.unquantized_weights, est.unquantized_weights),
        (f"LoRA: {est.lora_params / 1e6:.1f}M params, fp32 weights + {s.optimizer_state_bytes} B/param optimizer state",
         est.lora_weights_and_states, est.lora_weights_and_states),
        ("LoRA gradients (fp32)", est.lora_grads, est.lora_grads),
        (ckpt, est.checkpoints, peer.checkpoints),
        ("final hidden states + response gathers" + (" + packed attention mask" if s.pack_prompt and s.eager_attention else ""),
         est.decoder_io, est.decoder_io),
        ("one layer recomputed in backward" if s.gradient_checkpointing else "backward working set",
         est.layer_recompute, peer.layer_recompute),
        (f"log-probs: [{min(s.chunk_tokens, s.tokens)}, {arch.vocab}] chunk | [{s.rows}, {s.row_len}, {arch.vocab}] "
         f"fp32 logits + log-softmax", est.logp_chunk, peer.full_logits),
    ]
    if est.fsdp_gathered:
        rows.append(("FSDP: unsharded root unit (embeddings, head) + 2 gathered layers", est.fsdp_gathered,
                     est.fsdp_gathered))
    if s.cuda:
        rows.append((f"CUDA context + {ALLOCATOR_SLACK:.0%} allocator slack", est.overhead(), peer.overhead(True)))
    return rows


def plan_command(cfg: Config, gpu_memory: float | None = None, processes: int = 1, fsdp: bool = False) -> None:
    """Print the estimate and what fits, per GPU of `processes` (FSDP-sharded with `fsdp`, else each
    holding the whole model, as DDP); RunError (exit 1) when not even one pair fits the budget."""
    from rich.console import Console

    from simpo_lite.console import print_table

    if gpu_memory is not None and not 0 < gpu_memory < float("inf"):
        raise UserError(f"--gpu-memory {gpu_memory:g}: must be a positive number of GB, e.g. --gpu-memory 24")
    if processes < 1:
        raise UserError(f"--processes {processes}: must be at least 1 (the number of GPUs)")
    if fsdp and processes == 1:
        raise UserError("--fsdp shards the model over several GPUs: give their number, e.g. --fsdp --processes 2")
    budget, budget_note = (gpu_memory * GIB, f"{gpu_memory:g} GiB (--gpu-memory)") if gpu_memory else default_budget()
    # `auto` layers spend what the micro-batch leaves, so the micro-batch advice is for all layers recomputed.
    auto_layers = cfg.model.uncheckpointed_layers == "auto"
    asked, cfg = cfg, _resolve_auto(cfg, budget, budget_note, gpu_memory is None, processes if fsdp else 1)
    arch = architecture(cfg.model)
    setting = replace(setting_from_config(cfg, "cuda"), fsdp_processes=processes if fsdp else 1)
    est = estimate(arch, setting)
    console = Console(soft_wrap=True, highlight=False)
    console.print(f"[bold]model[/] {cfg.model.name_or_path}: {arch.layers} layers, hidden {arch.hidden}, "
                  f"vocab {arch.vocab} (architecture from {arch.source})")
    console.print(f"[bold]run[/] {_describe(cfg, setting)}")
    if processes > 1:
        console.print(f"[bold]per GPU[/] of {processes}: " + ("FSDP shards the weights, LoRA and optimizer state"
                      if fsdp else "each holds the whole model (DDP; add --fsdp to shard it)"))
    rows = [[name, _gib(ours), _gib(theirs)] for name, ours, theirs in breakdown_rows(arch, est)]
    peer = estimate(arch, replace(setting, peer=True))
    rows.append(["[bold]peak (tensors)[/]", _gib(est.tensors()), _gib(peer.tensors(True))])
    rows.append(["[bold]peak (device)[/]", f"[bold]{_gib(est.peak())}[/]", f"[bold]{_gib(peer.peak(True))}[/]"])
    print_table(["component", "simpo-lite", "full-logits trainer"], rows,
                title="estimated peak GPU memory" + (" per GPU" if processes > 1 else ""))
    console.print("Not every row is alive at once: the peak is the weights and optimizer state plus the larger of "
                  "the forward pass's end (checkpoints + log-probs) and the backward pass (one recomputed layer + "
                  "the larger of checkpoints and gradients).")
    least = replace(setting, uncheckpointed_layers=0) if auto_layers else setting
    trade = _auto_layers_at(asked, budget, budget_note) if auto_layers and cfg.model.gradient_checkpointing else None
    _print_fit(console, arch, least, est, budget, budget_note, cfg, advise_layers=not auto_layers, layers_at=trade)
    if largest_micro_batch(arch, least, budget) == 0:
        raise RunError(f"plan: not even 1 pair x {setting.seq_len} tokens fits in {_gib(budget)}: "
                       f"{what_would_fit(arch, least, budget, cfg.data.max_prompt_length)}", exit_code=1)


def _auto_layers_at(asked: Config, budget: float, note: str):
    """(micro, accumulation) -> the layers auto-fit keeps beside that micro-batch."""
    from simpo_lite import autofit

    def layers_at(micro: int, accumulation: int) -> int:
        other = replace(asked.train, micro_batch_size=micro, gradient_accumulation_steps=accumulation)
        return autofit.choose(replace(asked, train=other), "cuda", budget, note).uncheckpointed_layers
    return layers_at


def _resolve_auto(cfg: Config, budget: float, note: str, this_machine: bool, fsdp_processes: int) -> Config:
    """`auto` settings as a run would resolve them: for the planned GPU (its free memory when it is this
    machine's), and, on a machine without one, also the choice a CPU run here would make."""
    import sys

    import torch

    from simpo_lite import autofit

    if not autofit.wants_autofit(cfg):
        return cfg
    if this_machine and torch.cuda.is_available():
        # exactly what simpo-lite train would choose here
        _, choice = autofit.fit(cfg, "cuda", fsdp_processes, fsdp=fsdp_processes > 1)
    else:
        choice = autofit.choose(cfg, "cuda", budget, note, fsdp_processes)
        if this_machine:
            try:
                line = autofit.fit(cfg, "cpu")[1].line()
            except UserError as err:
                line = str(err)
            print(f"simpo-lite: a CPU run here: {line}", file=sys.stderr, flush=True)
    print(f"simpo-lite: {choice.line()}", file=sys.stderr, flush=True)
    return autofit.apply(cfg, choice)


def what_would_fit(arch: Arch, s: Setting, budget: float, max_prompt_length: int) -> str:
    """The change that makes one pair fit: a shorter data.max_length, else the components to shed."""
    length = largest_max_length(arch, s, budget)
    if length:
        flags = f"--set data.max_length={length}"
        if max_prompt_length >= length:  # keep the prompt's share of the row
            prompt = max(1, int(length * max_prompt_length / s.seq_len))
            flags += f" --set data.max_prompt_length={prompt}"
        return f"the longest data.max_length that fits is {length}: {flags}"
    est = estimate(arch, replace(s, micro_batch=1, seq_len=64))
    fixed = [("base linear weights", est.base_weights), ("embeddings, head and norms", est.unquantized_weights),
             ("LoRA weights and optimizer state", est.lora_weights_and_states), ("CUDA context", est.cuda_context)]
    parts = ", ".join(f"{name} {_gib(size)}" for name, size in sorted(fixed, key=lambda kv: -kv[1]))
    shed = [] if s.quantize else ["--set model.quantize=true"]
    shed += ["a smaller model (--model)", "fewer or smaller LoRA adapters (lora.r, lora.target_modules)"]
    return (f"even 64 tokens do not fit: one such pair needs {_gib(est.peak())} ({parts}); "
            f"shed some of it: {', or '.join(shed)}")


def _print_fit(console, arch: Arch, s: Setting, est: Estimate, budget: float, note: str, cfg: Config,
               advise_layers: bool = True, layers_at=None) -> None:
    """Whether the run fits `budget`, the micro-batches that would (at `s`'s layers), and with
    advise_layers the layers that could keep their activations. With `auto` layers, `layers_at(micro,
    accumulation)` says what auto-fit would keep beside a suggested micro-batch: the two spend the same
    memory, so the suggestion is a trade, not a free gain."""
    effective = s.micro_batch * cfg.train.gradient_accumulation_steps
    console.print(f"[bold]budget[/] {note}: the configured micro-batch "
                  + ("fits" if est.peak() <= budget else "[red]does not fit[/]")
                  + f" ({_gib(est.peak())} of {_gib(budget)}).")
    for label, full in (("simpo-lite", False), ("full-logits trainer", True)):
        fit = largest_micro_batch(arch, s, budget, full_logits=full)
        if fit == 0:
            console.print(f"  {label}: not even 1 pair x {s.seq_len} tokens fits")
            continue
        micro, accumulation = batch_suggestion(effective, fit)
        unit = "row" if s.pack_tokens else "pair"
        console.print(f"  {label}: up to {fit} {unit}{'s' if fit != 1 else ''} per micro-batch fit; for the effective batch of {effective}: "
                      f"micro_batch_size={micro}, gradient_accumulation_steps={accumulation}")
    fit = largest_micro_batch(arch, s, budget)
    if not fit:
        return
    micro, accumulation = batch_suggestion(effective, fit)
    if micro < fit:
        console.print(f"Why {micro} and not {fit}: " + _why_smaller(micro, fit, effective))
    if (micro, accumulation) != (s.micro_batch, cfg.train.gradient_accumulation_steps):
        trade = ""
        if layers_at is not None:
            trade = (f" (auto-fit then keeps the activations of {layers_at(micro, accumulation)} of {arch.layers} "
                     f"layers instead of {cfg.model.uncheckpointed_layers}: more pairs per pass or less "
                     f"recomputation, both spend the same memory)")
        console.print(f"Use it with: --set train.micro_batch_size={micro} "
                      f"--set train.gradient_accumulation_steps={accumulation}{trade}")
    kept = most_uncheckpointed_layers(arch, s, budget)
    if advise_layers and kept > s.uncheckpointed_layers:
        console.print(f"Or spend the spare memory on speed at this micro-batch: --set model.uncheckpointed_layers={kept} "
                      f"(those layers are not recomputed in backward: {kept} of {arch.layers}).")


def _why_smaller(micro: int, fit: int, effective: int) -> str:
    if effective < fit:
        return (f"the effective batch (micro_batch_size x gradient_accumulation_steps) is only {effective} "
                f"pair{'s' if effective != 1 else ''}, and a micro-batch cannot hold more than one optimizer step's pairs.")
    return (f"the effective batch of {effective} pairs per optimizer step, which the learning rate is tuned for, "
            f"must be a whole number of micro-batches, and {micro} is the largest divisor of {effective} up to {fit}; "
            f"to use {fit}, make the effective batch a multiple of it.")
