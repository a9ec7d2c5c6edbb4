#!/usr/bin/env bash
# Fills .gpu/ (gitignored) with what benchmarks/gpu_check.sh needs on a lent GPU machine that has torch
# 2.11+cu130, transformers 5.17, peft, accelerate, triton and pyarrow but no package index and no model
# hub (/work/.library/device/KINDS.md): the missing packages as wheels for CPython 3.12 on Linux x86_64,
# and SmolLM2's tokenizer files (no weights). Run it here, in the checkout the device tool sends, then
# name ".gpu" in the run's carry list (the device takes at most 64 MiB with the working tree).
#
#   bash benchmarks/gpu_wheels.sh                       # .gpu/wheels/*.whl and .gpu/tokenizer/
#   EXTRA="transformers==5.25.0" bash benchmarks/gpu_wheels.sh   # carry more (each name==version)
#
# Versions (each wheel's Requires-Dist read against the image's torch 2.11 / transformers 5.17):
#   bitsandbytes 0.50.2   torch>=2.4; one manylinux wheel of 43 MB holding native libraries for every
#                         CUDA 11.8-13.2, ROCm and XPU. The image's torch is cu130, and bitsandbytes
#                         loads libbitsandbytes_cuda<torch.version.cuda> (or the nearest of the same
#                         major), so the copy carried keeps libbitsandbytes_cpu.so and cuda13x.so only
#                         (RECORD rewritten): about 4 MB. SLIM_BNB=0 keeps the original wheel.
#   trl 1.16.0            transformers>=4.56.2, accelerate>=1.10.1, datasets>=4.7: fine with 5.17 / 1.15
#                         (bench_memory.py's TRL side: trl.experimental.cpo).
#   datasets 5.2.0        simpo_lite.data needs >= 4 (datasets.List); asks pyarrow>=24,
#                         fsspec<=2026.9.0, huggingface-hub>=1.31 (image: 1.33), dill<0.4.2,
#                         multiprocess<0.70.20 (not checked at import: gpu_check prints the image's).
#   dill 0.4.1, multiprocess 0.70.19 (py312 build)   datasets' own needs, missing from the image.
#   liger-kernel 0.8.5    torch>=2.1.2, triton>=2.3.1 (image: triton 3.6); for the train-liger stage.
# flash-attn is not carried: PyPI has only its sdist, which builds the CUDA extension for far longer
# than a 10-minute call (gpu_check's numerics stage prints SKIP for it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${DEST:-.gpu}
TOKENIZER_SRC=${TOKENIZER_SRC:-$HOME/.cache/simpo-lite/models/smollm2-135m-instruct}
LIMIT_MIB=${LIMIT_MIB:-60}
WHEELS=(bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5)
# shellcheck disable=SC2206  # EXTRA is a space-separated list of name==version
WHEELS+=(${EXTRA:-})

rm -rf "$DEST/wheels" "$DEST/tokenizer"
mkdir -p "$DEST/wheels" "$DEST/tokenizer"
# The device machine's python3 is CPython 3.12.3 on x86_64 (manylinux_2_24 for bitsandbytes).
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST/wheels" "${WHEELS[@]}"

if [ "${SLIM_BNB:-1}" = 1 ]; then
  "$PY" - "$DEST"/wheels/bitsandbytes-*.whl <<'PYEOF'
"""Drop the native libraries a CUDA 13 torch never loads from the bitsandbytes wheel; RECORD rewritten."""
import base64, hashlib, os, re, sys, zipfile

src = sys.argv[1]
native = re.compile(r"/libbitsandbytes_(\w+)\.so$")
keep = re.compile(r"cpu|cuda13\d+")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(src + ".tmp", "w", zipfile.ZIP_DEFLATED) as zout:
    record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    rows, dropped = [], []
    for info in zin.infolist():
        lib = native.search(info.filename)
        if info.filename == record or (lib and not keep.fullmatch(lib.group(1))):
            dropped += [info.filename] if lib else []
            continue
        data = zin.read(info)
        zout.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{info.filename},sha256={digest},{len(data)}")
    zout.writestr(record, "\n".join(rows + [f"{record},,"]) + "\n")
kept = sorted(n for n in zipfile.ZipFile(src + ".tmp").namelist() if native.search(n))
if not any("cuda130" in n for n in kept):
    sys.exit(f"{src}: no libbitsandbytes_cuda130.so in the wheel")
os.replace(src + ".tmp", src)
print(f"bitsandbytes slimmed: kept {', '.join(os.path.basename(n) for n in kept)}; dropped {len(dropped)} libraries")
PYEOF
fi

# The tokenizer only (gpu_inputs.py builds random-weight models around it); no model weights.
found=0
for f in tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json added_tokens.json \
         vocab.json merges.txt; do
  [ -f "$TOKENIZER_SRC/$f" ] && cp "$TOKENIZER_SRC/$f" "$DEST/tokenizer/" && found=$((found + 1))
done
[ -f "$DEST/tokenizer/tokenizer.json" ] || { echo "no tokenizer.json in $TOKENIZER_SRC (run the demo once: simpo-lite fetches SmolLM2 there)" >&2; exit 1; }

ls -l "$DEST/wheels" "$DEST/tokenizer"
bytes=$(du -sb "$DEST" | cut -f1)
echo "total $(( bytes / 1024 / 1024 )) MiB ($bytes bytes) in $DEST: ${#WHEELS[@]} wheels, $found tokenizer files"
if [ "$bytes" -gt $(( LIMIT_MIB * 1024 * 1024 )) ]; then
  echo "over $LIMIT_MIB MiB: the device takes 64 MiB with the working tree; carry less" >&2
  exit 1
fi
