"""Inputs for the GPU measurements (benchmarks/gpu_check.sh) on a machine that cannot reach a model hub.

Peak memory and step time depend on a model's shapes, not on its weights, so the GPU figures use
randomly initialised models with the exact architecture of Llama-3-8B (or SmolLM2-135M), saved in
bfloat16 like the published checkpoints, and loaded through simpo-lite's own 4-bit path. Any tokenizer
with a chat template does for the data (its ids stay below the vocabulary size).

    python benchmarks/gpu_inputs.py model llama3-8b /tmp/models/llama3-8b --tokenizer DIR
    python benchmarks/gpu_inputs.py data /tmp/pairs.jsonl --tokens 2048 --pairs 16 --tokenizer DIR
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

# Shapes from the models' published config.json files.
ARCHITECTURES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                      tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                         tie_word_embeddings=True),
    # For checking this script and gpu_check.sh on a CPU.
    "tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False),
}
WORDS = ("the model learns which answer people prefer from pairs of responses to the same prompt and a reward "
         "that is the average log probability of the response tokens scaled by beta with a target margin gamma "
         "between the chosen and the rejected answer so no reference model is needed").split()


def make_model(arch: str, out: Path, tokenizer: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return print(f"{out} exists")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = LlamaConfig(**ARCHITECTURES[arch], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 16 GB for the 8B model instead of 32 GB in fp32 first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    partial.rename(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{arch}: {params / 1e9:.2f} B parameters (random, bf16) saved to {out}")


def make_data(out: Path, tokens: int, pairs: int, tokenizer: Path, seed: int = 0) -> None:
    """Plain-text pairs whose templated prompt + response come to about `tokens` tokens:
    a prompt of a quarter, responses of the rest (the rejected one up to an eighth shorter)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    rng = random.Random(seed)

    def text(n: int) -> str:
        ids = tok(" ".join(rng.choice(WORDS) for _ in range(n * 2)), add_special_tokens=False)["input_ids"]
        return tok.decode(ids[:n])

    rows = []
    for _ in range(pairs):
        response = tokens - tokens // 4 - 8  # room for the template's turn markers and the EOS
        rows.append({"prompt": text(tokens // 4 - 24), "chosen": text(response),
                     "rejected": text(response - rng.randint(0, tokens // 8))})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{pairs} pairs of about {tokens} tokens written to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    model = sub.add_parser("model", help="a random model of a known architecture")
    model.add_argument("arch", choices=sorted(ARCHITECTURES))
    model.add_argument("out", type=Path)
    model.add_argument("--tokenizer", type=Path, required=True)
    data = sub.add_parser("data", help="a .jsonl of long preference pairs")
    data.add_argument("out", type=Path)
    data.add_argument("--tokens", type=int, default=2048)
    data.add_argument("--pairs", type=int, default=16)
    data.add_argument("--tokenizer", type=Path, required=True)
    args = parser.parse_args()
    if args.what == "model":
        make_model(args.arch, args.out, args.tokenizer)
    else:
        make_data(args.out, args.tokens, args.pairs, args.tokenizer)


if __name__ == "__main__":
    main()
