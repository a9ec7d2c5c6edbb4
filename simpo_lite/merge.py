"""Merge a run's adapters into the base in the export precision, and check the saved result by its logits.

The check compares the saved export with the unmerged base+adapter whose base weights are rounded to the
same precision, both computed in fp32. Computing in bf16 instead adds activation rounding noise (about 1.4
logits on SmolLM2-135M, more than a small adapter's whole effect) and could not tell a correct merge from
a lost adapter; in fp32 the difference is only the rounding of the merged weights, which is what
exporting in that precision costs. The model the run trained (4-bit) is compared too, for information:
it differs by the NF4 quantization error of the base, which no export can reproduce.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Callable

import torch

from simpo_lite import hub
from simpo_lite.config import Config, save_config
from simpo_lite.errors import RunError, UserError
from simpo_lite.model import DTYPES, load_base_model, load_for_inference, load_run_tokenizer
from simpo_lite.model_source import resolve_model_source
from simpo_lite.run_folder import EXPORT_CONFIG

PROMPTS = ("What is the capital of France?", "Write a haiku about autumn leaves.",
           "Explain in one sentence why the sky is blue.")
SAMPLE_TOKENS = 40
CONTINUATION_TOKENS = 20  # greedy tokens per check prompt compared with the trained model's
VERIFY_BYTES_PER_PARAM = 4  # the check holds one fp32 copy of the model at a time


def fill_merged(tmp: Path, adapter: Path, cfg: Config, dtype_name: str, summary: dict | None, result,
                say: Callable[[str], None]) -> None:
    """Merge, save into tmp, reload the saved files with plain transformers, check them, add a card.
    The figures land in `result` (check_lines words them); `say` tells the steps."""
    tokenizer = load_run_tokenizer(cfg, adapter)
    ids = check_prompt_ids(tokenizer)
    check_memory(cfg, say)
    result.trained_kind = "4-bit NF4" if cfg.model.quantize else "unquantized"
    say(f"computing reference logits and greedy answers of the run's {result.trained_kind} training model")
    trained, trained_answers = trained_model_outputs(cfg, adapter, ids, tokenizer)
    result.merge_into = merge_target(cfg)
    say(f"merging the adapter into {describe_target(cfg, dtype_name)}")
    merged, reference, result.adapter_effect = merge(cfg, adapter, DTYPES[dtype_name], ids)
    merged.save_pretrained(tmp, max_shard_size=cfg.export.max_shard_size)
    del merged  # the check below reloads from disk: never two copies in memory
    gc.collect()
    tokenizer.save_pretrained(tmp)
    # What eval and chat of the export take from the run: its data split and SimPO settings; not its
    # model settings, which were the training machine's (flash-attention, 4-bit, the base's path).
    save_config(cfg, tmp / EXPORT_CONFIG, sections=("data", "simpo", "train"))
    exported = check_saved(tmp, cfg, dtype_name, ids, reference, trained, result)
    result.greedy_agreement = continuation_agreement(greedy_answers(exported, tokenizer, ids), trained_answers)
    result.sample_prompt = PROMPTS[0]
    result.sample = greedy_text(exported, tokenizer, ids[0])
    hub.write_model_card(tmp, cfg, summary, result)


def check_lines(result, cfg: Config) -> list[str]:
    """The merge check's figures, as the export prints them once the export is saved."""
    dtype = result.dtype
    return [f"check: {dtype} export vs base+adapter ({dtype} base, fp32 compute): max |logit diff| "
            f"{result.merge_diff:.3g} (tolerance {export_tolerance(cfg, dtype, result.adapter_effect):.3g}; the adapter "
            f"itself moves logits by up to {result.adapter_effect:.3g})",
            f"info: export vs the run's {result.trained_kind} training model: max |logit diff| "
            f"{result.trained_diff:.3g}, same most likely next token at {result.trained_top1:.0%} of positions",
            f"info: greedy answers to the {len(PROMPTS)} check prompts: {result.greedy_agreement:.0%} of the first "
            f"{CONTINUATION_TOKENS} tokens are the trained model's (up to the first difference)",
            f"sample (greedy): {result.sample_prompt!r} -> {result.sample!r}"]


def check_saved(folder: Path, cfg: Config, dtype_name: str, ids, reference, trained, result):
    """Load what users will load (the saved files, plain transformers), compare, raise above tolerance."""
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu",
                                                    trust_remote_code=cfg.model.trust_remote_code)
    got = logits(exported, ids)
    result.merge_diff, result.trained_diff = max_diff(got, reference), max_diff(got, trained)
    result.trained_top1 = top1_agreement(got, trained)
    check_tolerance(result, cfg, dtype_name)
    return exported


def check_prompt_ids(tokenizer) -> list[torch.Tensor]:
    """[1, n] token ids of each check prompt, rendered as `simpo-lite generate` renders a prompt."""
    from simpo_lite.generate import render

    return [torch.tensor([render(tokenizer, prompt, None)]) for prompt in PROMPTS]


@torch.no_grad()
def logits(model, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()  # LoRA dropout must be off
    device = next(model.parameters()).device
    return [model(input_ids=i.to(device)).logits.float().cpu() for i in ids]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def top1_agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Share of positions where both models rank the same token first: the max difference alone looks
    alarming for a 4-bit model and says nothing about how often its choice changes."""
    same = sum((x.argmax(-1) == y.argmax(-1)).sum().item() for x, y in zip(a, b))
    return same / sum(x.shape[0] * x.shape[1] for x in a)


def check_memory(cfg: Config, say: Callable[[str], None]) -> None:
    """Refuse a pre-quantized base; warn when RAM is short of one fp32 copy of the model."""
    import psutil

    params = parameter_count(cfg)
    need = params * VERIFY_BYTES_PER_PARAM * 1.1
    available = psutil.virtual_memory().available
    if need > available:
        say(f"warning: the export needs about {need / 2**30:.1f} GiB of RAM ({params / 1e9:.2f} B parameters, "
            f"checked in fp32) but only {available / 2**30:.1f} GiB is available: it may be killed or swap")


def parameter_count(cfg: Config) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_model_source(cfg.model.name_or_path, revision=cfg.model.revision)
    config = AutoConfig.from_pretrained(source, revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise UserError(f"base model '{cfg.model.name_or_path}' is stored quantized, so there are no "
                        f"full-precision weights to merge into: train from the unquantized model, "
                        f"or use --adapter-only")
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def trained_model_outputs(cfg: Config, adapter_dir: Path, ids: list[torch.Tensor], tokenizer):
    """(logits, greedy answers) of the model exactly as the run trained it."""
    model = load_for_inference(cfg, adapter_dir)
    trained = logits(model, ids), greedy_answers(model, tokenizer, ids)
    del model
    _free()
    return trained


def greedy_answers(model, tokenizer, ids: list[torch.Tensor]) -> list[list[int]]:
    """CONTINUATION_TOKENS greedy tokens after each prompt, up to its stop token (generate's decoding,
    one prompt at a time, so no padding moves the numbers)."""
    from simpo_lite.generate import generate_responses

    answers = generate_responses(model, tokenizer, [i[0].tolist() for i in ids], CONTINUATION_TOKENS,
                                 temperature=0.0, batch_size=1, seed=0)
    return [a["ids"] for a in answers]


def continuation_agreement(got: list[list[int]], trained: list[list[int]]) -> float:
    """Mean share of the trained model's greedy tokens that the export repeats before they first differ."""
    shares = []
    for a, b in zip(got, trained):
        same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shares.append(same / len(b) if b else float(not a))
    return sum(shares) / len(shares)


def merge_target(cfg: Config) -> str:
    """What the adapter is merged into: an unquantized run trained on the original weights themselves."""
    return cfg.export.merge_into if cfg.model.quantize else "original"


def describe_target(cfg: Config, dtype_name: str) -> str:
    if merge_target(cfg) == "dequantized":
        return f"the NF4 weights of {cfg.model.name_or_path} the run trained on, dequantized to {dtype_name}"
    return f"{cfg.model.name_or_path} loaded in {dtype_name}"


def merge_base(cfg: Config, dtype: torch.dtype):
    """The base the adapter is merged into, in `dtype` on the CPU (export.merge_into)."""
    if merge_target(cfg) == "dequantized":
        from simpo_lite.dequantize import load_dequantized

        return load_dequantized(cfg, dtype)
    return load_base_model(cfg.model, quantize=False, dtype=dtype, device_map="cpu")


def merge(cfg: Config, adapter_dir: Path, dtype: torch.dtype, ids: list[torch.Tensor]):
    """(merged model in dtype, reference logits of base+adapter, largest logit change the adapter makes)."""
    from peft import PeftModel

    # Base rounded to the export precision, then held in fp32 so that the reference and the merge
    # both see the adapter at full precision: the only rounding left is that of the merged sum.
    base = merge_base(cfg, dtype).float()
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    reference = logits(model, ids)
    with model.disable_adapter():
        plain = logits(model, ids)
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as err:  # safe_merge found NaNs in the merged weights
        raise RunError(f"merge failed: {err}; the adapter in {adapter_dir} is broken, "
                       f"export an earlier checkpoint") from None
    return merged.to(dtype), reference, max_diff(reference, plain)


FP32_TOLERANCE = 1e-3  # round-off of the sum; a wrong merge is far above it
LOST_SHARE = 0.25  # a 16-bit export may round away at most this share of the adapter's largest logit change


def export_tolerance(cfg: Config, dtype_name: str, adapter_effect: float) -> float:
    """The configured tolerance, else FP32_TOLERANCE for fp32 and, for 16-bit exports, LOST_SHARE of what
    the adapter itself moves the logits: their rounding of W + BA loses some of BA, and a fixed figure would
    pass a weak adapter lost whole while failing a strong one that kept 95% of its effect."""
    if cfg.export.verify_tolerance is not None:
        return cfg.export.verify_tolerance
    return FP32_TOLERANCE if dtype_name == "fp32" else LOST_SHARE * adapter_effect


def check_tolerance(result, cfg: Config, dtype_name: str) -> None:
    diff, tolerance = result.merge_diff, export_tolerance(cfg, dtype_name, result.adapter_effect)
    if diff <= tolerance:  # also false for NaN, e.g. an fp16 overflow
        return
    # Just above what was measured: accepting this export's loss and no more.
    suggest = f"{math.ceil(diff * 1.05 * 100) / 100:g}" if math.isfinite(diff) and diff > 0 else "a larger value"
    if not math.isfinite(diff):
        why, fix = f"the export's logits are not finite ({dtype_name} overflow)", "export with --dtype bf16 or fp32"
    elif dtype_name == "fp32":
        why, fix = "more than rounding, so the merge itself went wrong", "please report it with the run's config.yaml"
    else:
        why = (f"{dtype_name} rounding of the merged weights loses {diff / result.adapter_effect:.0%} of the "
               f"fine-tune's largest effect" if result.adapter_effect > 0 else "the adapter changes nothing")
        fix = f"export with --dtype fp32, or accept the loss with --set export.verify_tolerance={suggest}"
    raise RunError(f"merge check failed: the {dtype_name} export differs from base+adapter by up to {diff:.3g} logits "
                   f"(export.verify_tolerance {tolerance:g}; the adapter itself moves logits by up to "
                   f"{result.adapter_effect:.3g}): {why}; nothing was written to {result.out}; {fix}")


def greedy_text(model, tokenizer, ids: torch.Tensor) -> str:
    """The greedy answer (SAMPLE_TOKENS at most) to one check prompt, as the model card shows it."""
    from simpo_lite.generate import generate_responses

    return generate_responses(model, tokenizer, [ids[0].tolist()], SAMPLE_TOKENS, temperature=0.0,
                              batch_size=1, seed=0)[0]["text"]


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
