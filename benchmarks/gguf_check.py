"""GGUF exports of a run in every quant type, as read back by transformers and run by llama.cpp.

For each --quant this runs `simpo-lite export RUN --format gguf --quant Q --out OUT/Q` (the export's own
checks: the merged model in fp32 against the GGUF on the export check prompts) and prints one table row:
file size, top-1 agreement and max logit difference for transformers' GGUF reader and for llama.cpp, the
largest next-token log-prob difference and the share of the merged model's 20 greedy tokens llama.cpp
repeats. Then, unless --no-tests, it runs the llama.cpp tests of tests/test_gguf_export.py, which CI skips
(CI does not install llama-cpp-python: it compiles llama.cpp, see README).

    simpo-lite train && python benchmarks/gguf_check.py runs/smollm2-demo --out /tmp/gguf-check

Needs llama-cpp-python (pip install -e ".[gguf]") for q4_k_m and the llama.cpp columns. Writes
OUT/gguf_check.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

QUANTS = ("f16", "bf16", "q8_0", "q4_k_m")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="A new folder; one export folder per quant type.")
    parser.add_argument("--quants", nargs="+", default=list(QUANTS), choices=QUANTS)
    parser.add_argument("--no-tests", action="store_true", help="Skip the llama.cpp tests.")
    args = parser.parse_args()

    from simpo_lite.export import export_run

    rows = []
    for quant in args.quants:
        started = time.perf_counter()
        result = export_run(args.run, out=args.out / quant, format="gguf", quant=quant)
        rows.append({**result.gguf, "seconds": round(time.perf_counter() - started, 1), "dtype": result.dtype})
    (args.out / "gguf_check.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    if not args.no_tests:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_gguf_export.py", "-k",
                               "llama_cpp"], cwd=Path(__file__).resolve().parents[1])
        sys.exit(done.returncode)


def table(rows: list[dict]) -> str:
    lines = ["| quant | size (MiB) | transformers: same top-1 | transformers: max logit diff | llama.cpp: same top-1 "
             "| llama.cpp: max logit diff | llama.cpp: max next-token log-prob diff | llama.cpp: greedy tokens kept |",
             "|" + "---|" * 8]
    for row in rows:
        t, c = row["transformers"], row.get("llama_cpp")
        cpp = ([f"{c['top1']:.1%}", f"{c['max_logit_diff']:.3g}", f"{c['max_logprob_diff']:.3g}",
                f"{c['greedy_agreement']:.0%}"] if c else ["not run"] * 4)
        lines.append("| " + " | ".join([row["quant"], f"{row['size_mb']:g}", f"{t['top1']:.1%}",
                                        f"{t['max_logit_diff']:.3g}", *cpp]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
