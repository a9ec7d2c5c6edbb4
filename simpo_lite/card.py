"""The model card of an export: Hub metadata, how it was trained, its final eval metrics and export check."""

from __future__ import annotations

from simpo_lite.config import Config
from simpo_lite.hub import BUNDLED_HUB_IDS
from simpo_lite.loss import METRIC_NAMES

EVAL_SHOWN = tuple(f"eval_{name}" for name in METRIC_NAMES)


def render_card(cfg: Config, summary: dict | None, result, base_id: str | None, datasets: list[str]) -> str:
    return "\n".join([_front_matter(result, base_id, datasets), _intro(cfg, result, base_id),
                      _training(cfg, summary), _evaluation(summary), _export_check(result), _gguf_check(result),
                      _usage(cfg, result)])


def _front_matter(result, base_id: str | None, datasets: list[str]) -> str:
    from huggingface_hub import ModelCardData

    tags = ["simpo", "simpo-lite", "preference-optimization", "lora"]
    tags += ["peft"] if result.adapter_only else ["merged"]
    gguf = getattr(result, "gguf", None)
    tags += ["gguf", "llama.cpp", "ollama"] if gguf else []
    library = "peft" if result.adapter_only else "gguf" if gguf else "transformers"
    data = ModelCardData(base_model=base_id, library_name=library,
                         pipeline_tag="text-generation", tags=tags, datasets=datasets or None)
    return f"---\n{data.to_yaml()}\n---\n"


def _intro(cfg: Config, result, base_id: str | None) -> str:
    name = result.hub_repo or result.out.name
    base = (f"[{base_id}](https://huggingface.co/{base_id})" if base_id
            else f"`{cfg.model.name_or_path}` (a local model)")
    how = ("LoRA adapters trained on the 4-bit NF4 base" if cfg.model.quantize else "LoRA adapters")
    what = ("This repository holds the LoRA adapter alone; load it on top of the base model."
            if result.adapter_only else
            f"The adapters are merged into {result.dtype} weights of the base: this is a plain transformers model.")
    if getattr(result, "gguf", None):
        what = (f"The adapters are merged into {result.dtype} weights of the base, converted to one GGUF file "
                f"(`{result.gguf['file']}`, {result.gguf['quant']}) for llama.cpp, Ollama and LM Studio, with an "
                f"Ollama `Modelfile`.")
    return (f"# {name}\n\n{base} preference-tuned with [SimPO](https://arxiv.org/abs/2405.14734) "
            f"(reference-free, length-normalized rewards) by simpo-lite: {how}. {what}\n")


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _training(cfg: Config, summary: dict | None) -> str:
    s, t, lora, d = cfg.simpo, cfg.train, cfg.lora, cfg.data
    rows = [("data", d.source + (f" ({d.split})" if d.split != "train" else "")),
            ("SimPO beta", f"{s.beta:g}"),
            ("gamma / beta", f"{s.gamma_beta_ratio:g} (gamma = {s.gamma_beta_ratio * s.beta:g})"),
            ("loss", s.loss_type + (f", label smoothing {s.label_smoothing:g}" if s.label_smoothing else "")
             + (f", SFT weight {s.sft_weight:g}" if s.sft_weight else "")),
            ("learning rate", f"{t.learning_rate:g} ({t.lr_scheduler}, warmup {t.warmup_ratio:g})"),
            ("length", f"{t.max_steps} steps" if t.max_steps else f"{t.num_epochs:g} epoch(s)"),
            ("batch", f"{t.micro_batch_size * t.gradient_accumulation_steps} "
                      + (f"rows of up to {s.pack_tokens} tokens (as many pairs as fit)" if s.pack_tokens else "pairs")
                      + " per step per process"),
            ("LoRA", f"r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout:g}, {', '.join(lora.target_modules)}"),
            ("max length / prompt", f"{d.max_length} / {d.max_prompt_length}"),
            ("base weights in training", "4-bit NF4" if cfg.model.quantize else cfg.model.compute_dtype),
            ("seed", t.seed)]
    if summary:
        rows.append(("steps done", f"{summary.get('steps')} in {summary.get('train_seconds', 0):.0f} s"))
    return "## Training\n\n" + _table(("setting", "value"), rows) + "\n"


def _evaluation(summary: dict | None) -> str:
    start, end = (summary or {}).get("start_eval") or {}, (summary or {}).get("end_eval") or {}
    if not end:
        return "## Evaluation\n\nThe run recorded no evaluation.\n"
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    keys = [k for k in EVAL_SHOWN if k in end] + sorted(k for k in end if k not in EVAL_SHOWN)
    rows = [(k, fmt(start.get(k)), fmt(end.get(k))) for k in keys]
    return ("## Evaluation\n\nPreference metrics on the held-out pairs, before and after training.\n\n"
            + _table(("metric", "start", "end"), rows) + "\n")


def _export_check(result) -> str:
    if result.adapter_only:
        return ""
    rows = [(f"{result.dtype} export vs base+adapter (fp32 compute)", f"{result.merge_diff:.3g}"),
            ("base+adapter vs base alone (the adapter's effect)", f"{result.adapter_effect:.3g}"),
            (f"{result.dtype} export vs the {result.trained_kind} model trained",
             f"{result.trained_diff:.3g} (same top token at {result.trained_top1:.0%} of positions; "
             f"greedy answers agree on {result.greedy_agreement:.0%} of their tokens)")]
    into = ("the NF4 weights the run trained on, dequantized" if result.merge_into == "dequantized"
            else "the base checkpoint's original weights")
    return (f"## Export check\n\nThe adapter was merged into {into}. Largest absolute logit difference on a few "
            f"prompts.\n\n" + _table(("comparison", "max abs logit diff"), rows) + "\n")


def _gguf_check(result) -> str:
    gguf = getattr(result, "gguf", None)
    if not gguf:
        return ""
    rows = []
    for reader, label in (("transformers", "transformers' GGUF loader"), ("llama_cpp", "llama.cpp")):
        found = gguf.get(reader)
        if found:
            extra = (f"; greedy continuations repeat {found['greedy_agreement']:.0%} of the merged model's tokens"
                     if "greedy_agreement" in found else "")
            rows.append((label, f"{found['top1']:.1%}", f"{found['max_logit_diff']:.3g}{extra}"))
    return (f"## GGUF check\n\n`{gguf['file']}` read back and run on the export check prompts, against the merged "
            f"model in fp32 ({gguf['transformers']['positions']} positions).\n\n"
            + _table(("reader", "same top token", "max abs logit diff"), rows) + "\n")


def _usage(cfg: Config, result) -> str:
    name = result.hub_repo or str(result.out)
    gguf = getattr(result, "gguf", None)
    if gguf:
        code = (f"llama-cli -m {gguf['file']} -cnv    # llama.cpp\n"
                f"ollama create my-model -f Modelfile && ollama run my-model")
        return f"## Use\n\n```bash\n{code}\n```\n"
    note = ""
    if result.adapter_only:
        code = (f"from peft import AutoPeftModelForCausalLM\n\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained(\"{name}\")")
        if cfg.model.quantize:
            bundled = " (here of the bundled GGUF copy of the base)" if cfg.model.name_or_path in BUNDLED_HUB_IDS else ""
            note = (f"\nThe adapter was trained on the 4-bit NF4 quantization of the base{bundled}, so on the "
                    f"full-precision base it gives a slightly different model from the one trained (README of "
                    f"simpo-lite, \"Which base to merge into\"); `simpo-lite export` without `--adapter-only` "
                    f"merges it into the weights it trained on.\n")
    else:
        code = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{name}\")\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")")
    return f"## Use\n\n```python\n{code}\n```\n{note}"
