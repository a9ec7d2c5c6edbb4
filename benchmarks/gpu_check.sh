#!/usr/bin/env bash
# The GPU measurements behind README's "On a GPU" figures, as one script for a lent GPU machine that
# has torch but cannot reach a package index or a model hub (see gpu_inputs.py for why random weights).
#
# On this workplace's lent machine (torch 2.11+cu130, transformers 5.17, peft, accelerate, triton; no
# bitsandbytes, trl, datasets, liger-kernel): first, here, in the checkout the device tool sends,
#   bash benchmarks/gpu_wheels.sh           # .gpu/wheels (the missing packages) and .gpu/tokenizer, gitignored
# then ONE device call, carry [".gpu"], timeout_s 600 (the script stops its last stage by DEADLINE_S=560 s):
#   WHEELS=.gpu/wheels TOKENIZER=.gpu/tokenizer bash benchmarks/gpu_check.sh
# ($OUT is set there; everything comes back in at most 4 files: gpu.log, metrics.jsonl, bench.json,
# bench_small.json.) Elsewhere:
#   OUT=/tmp/gpu-out TOKENIZER=path/to/tokenizer bash benchmarks/gpu_check.sh
#   STAGES="train train-packed fsdp" OUT=... TOKENIZER=... bash benchmarks/gpu_check.sh
#
# Before any stage: WHEELS (a folder of .whl) is installed with pip --no-index --no-deps --target
# $WORK/site (nothing in the machine's own environment is touched; root-owned or read-only venvs are
# fine) and put on PYTHONPATH; then the environment stage imports every package the stages need, prints
# their versions and exits the script (status 1) if one is missing or too old, or CUDA is absent.
#
# Stages (STAGES picks some, in the order given; inputs are made when a stage needs them), each under
# its own time limit, cut to what is left before DEADLINE_S, each failure logged and the rest still run.
# The default order puts the most important figures first (about 330-500 s on an H100 with the inputs):
#   train           simpo-lite train --preset llama3-8b-lora (2 pairs x 2048 tokens, 4 steps) on a
#                   Llama-3-8B-shaped model within a BUDGET_GB=24 GiB budget (train.memory_budget_gb,
#                   which caps the GPU's free memory: auto-fit picks the kept layers for a 24 GiB card):
#                   the peak GPU memory and step time a user of that preset gets;
#   train-liger     the same with model.kernels=liger (Liger-Kernel's RMSNorm/SwiGLU/RoPE), its per-step
#                   losses and grad norms printed beside those of `train`; CUDA only (skipped elsewhere);
#   bench           benchmarks/bench_memory.py on that model: simpo-lite on its default loading
#                   (BENCH_ARGS=--frozen-compute: bf16 embeddings/head/norms) against TRL's CPOTrainer,
#                   auto layers within BUDGET_GB; its JSON is rewritten after each system;
#   train-tokens    train with padding-free rows: simpo.pack_tokens=8192, one row a micro-batch;
#   plan            simpo-lite plan for the same run, --gpu-memory BUDGET_GB;
#   numerics        benchmarks/gpu_numerics.py: attention by segments (SDPA; flash-attention's varlen kernel
#                   only where flash-attn is installed, else a SKIP line) and LoRA inputs kept once,
#                   against the unpacked batch and peft's path, on CUDA;
# and, by name only:
#   train-fp32      train with model.frozen_dtype=fp32 (peft's upcast kept, as TRL loads the model);
#   train-packed    train with simpo.pack_prompt=true;
#   train-keep16    train with model.uncheckpointed_layers=16;
#   bench-small     the bench on SmolLM2-135M's shapes at 2 x 400 tokens (issue 8's setting);
#   fsdp            4 steps of FSDP-QLoRA on every GPU through presets/accelerate/fsdp-qlora.yaml, then
#                   a resume from step 2 (must repeat steps 3-4).
# A train stage starts from an empty run folder and keeps its metrics (into $OUT/metrics.jsonl, each row
# with its "gpu_stage", and into gpu.log) only when it exits 0.
# TINY=1 swaps in a tiny model, to check the script on a CPU (with DEVICE=cpu); USE_HUB_KERNELS=0 always.
set -u
OUT=${OUT:?set OUT to a folder for the results}
TOKENIZER=${TOKENIZER:-.gpu/tokenizer}
[ -f "$TOKENIZER/tokenizer_config.json" ] || { echo "TOKENIZER=$TOKENIZER: no tokenizer_config.json there (bash benchmarks/gpu_wheels.sh makes .gpu/tokenizer)" >&2; exit 1; }
WORK=${WORK:-/tmp/simpo-gpu}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
BUDGET_GB=${BUDGET_GB-24}  # empty: the card's free memory
STAGES=${STAGES:-train train-liger bench train-tokens plan numerics}
BENCH_ARGS=${BENCH_ARGS---frozen-compute}
BIG=llama3-8b SMALL=smollm2-135m STEPS=4 BENCH_STEPS=3 DEADLINE_S=${DEADLINE_S:-560} SCALE=1
# TINY on a shared CPU: stage limits x3 (the CPU bench also runs its memory pass), no overall deadline to speak of.
[ "${TINY:-0}" = 1 ] && BIG=tiny SMALL=tiny STEPS=2 BENCH_STEPS=2 DEADLINE_S=${DEADLINE_S_TINY:-3600} SCALE=3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SIMPO_LITE_CACHE="$WORK/cache" DEVICE
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false USE_HUB_KERNELS=0 TRL_EXPERIMENTAL_SILENCE=1
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu.log" METRICS="$OUT/metrics.jsonl"
BUDGET_SET=() BUDGET_BENCH=() BUDGET_PLAN=()
[ -n "$BUDGET_GB" ] && BUDGET_SET=(--set "train.memory_budget_gb=$BUDGET_GB") \
  BUDGET_BENCH=(--memory-budget-gb "$BUDGET_GB") BUDGET_PLAN=(--gpu-memory "$BUDGET_GB")

run() {  # run NAME SECONDS COMMAND...: with a limit (x SCALE, cut to what is left before DEADLINE_S), logged; its status
  local name=$1 limit=$(($2 * SCALE)); shift 2
  local left=$((DEADLINE_S - SECONDS - 15))  # 15 s: timeout's kill grace and the lines after it
  if [ "$left" -lt 20 ]; then
    echo "=== SKIP $name: $((DEADLINE_S - SECONDS)) s left before DEADLINE_S=$DEADLINE_S" | tee -a "$LOG"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name ($(date +%T), at ${SECONDS}s, limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS status
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  status=$?
  echo "=== $name: exit $status after $((SECONDS - start)) s" | tee -a "$LOG"
  return $status
}

put_metrics() {  # put_metrics STAGE [RUN-FOLDER]: STAGE's rows in $METRICS replaced by the folder's (none without)
  "$PY" - "$METRICS" "$@" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, statistics, sys
from pathlib import Path
out, stage = Path(sys.argv[1]), sys.argv[2]
rows = [l for l in out.read_text().splitlines() if json.loads(l).get("gpu_stage") != stage] if out.exists() else []
if len(sys.argv) > 3:
    folder = Path(sys.argv[3])
    new = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows += [json.dumps({"gpu_stage": stage} | r) for r in new]
    steps = [r for r in new if "step_time_s" in r]
    timed = steps[1:] or steps  # median of steps 2.. (step 1 is the warm-up)
    med = lambda key: statistics.median(r[key] for r in timed) if timed else float("nan")
    chosen = [l.strip() for l in (folder / "config.yaml").read_text().splitlines()
              if l.strip().startswith(("uncheckpointed_layers", "micro_batch_size", "memory_budget_gb"))] \
        if (folder / "config.yaml").exists() else []
    print(f"FIGURES {stage}: median step {med('step_time_s'):.3f} s, {med('tokens_per_s'):.0f} tokens/s, "
          f"peak {max((r.get('peak_mem_mb', 0) for r in steps), default=0):.0f} MB; {'; '.join(chosen)}; "
          f"(loss, grad_norm) by step {({r['step']: (round(r['loss'], 5), round(r['grad_norm'], 4)) for r in steps})}")
    print(f"--- {stage} metrics.jsonl ({len(new)} rows) ---")
    print("\n".join(json.dumps(r) for r in new))
out.write_text("".join(r + "\n" for r in rows))
PYEOF
}

need_data() {
  [ -f "$WORK/pairs2048.jsonl" ] || run data 60 "$PY" benchmarks/gpu_inputs.py data "$WORK/pairs2048.jsonl" \
    --tokens 2048 --pairs 12 --tokenizer "$TOKENIZER"
}
need_model() {  # need_model ARCH
  [ -f "$WORK/models/$1/config.json" ] || run "model $1" 120 "$PY" benchmarks/gpu_inputs.py model "$1" \
    "$WORK/models/$1" --tokenizer "$TOKENIZER"
}

train_sets() {  # the llama3-8b-lora preset on the random Llama-3-8B for $STEPS steps, in the 24 GiB budget
  TRAIN_SETS=(--preset llama3-8b-lora --set "model.name_or_path=$WORK/models/$BIG"
    --set "data.source=$WORK/pairs2048.jsonl" --set data.eval_split=null --set data.eval_max_pairs=2
    --set "train.max_steps=$STEPS" --set train.gradient_accumulation_steps=1 --set train.warmup_ratio=0
    --set train.save_steps=1000 "${BUDGET_SET[@]}")
}

train_big() {  # train_big NAME EXTRA-SETTINGS...: from an empty run folder; metrics kept only on exit 0
  local name=$1; shift
  need_data; need_model $BIG; train_sets
  rm -rf "$WORK/run-$name"
  put_metrics "$name" >/dev/null  # no earlier run's figures under this stage's name
  if run "$name" 150 "$PY" -m simpo_lite train "${TRAIN_SETS[@]}" --set "train.output_dir=$WORK/run-$name" "$@" --quiet; then
    put_metrics "$name" "$WORK/run-$name"
  else
    echo "--- $name failed: no metrics kept for it" | tee -a "$LOG"
  fi
}

# ---- packages, then the environment check that stops the script when something is missing ------------
if [ -n "${WHEELS:-}" ]; then
  SITE=${SITE:-$WORK/site}
  rm -rf "$SITE"
  run wheels 120 "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl \
    || { echo "=== stopping: the wheels in $WHEELS did not install (see above)" | tee -a "$LOG"; exit 1; }
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH#"$PWD"}"
fi
# Needed by every train and bench stage (the script stops without them); triton and liger_kernel only by
# train-liger, which is skipped with a SKIP line when they do not import.
NEED="torch transformers peft bitsandbytes accelerate datasets trl pyarrow simpo_lite"
export LIGER_OK="$WORK/liger-ok"
rm -f "$LIGER_OK"
cat >"$WORK/preflight.py" <<'PYEOF'
import importlib, os, sys
from pathlib import Path
from packaging.version import Version

need, device = sys.argv[1].split(), os.environ["DEVICE"]
minimum = {"torch": "2.3", "transformers": "5.0", "peft": "0.17", "bitsandbytes": "0.48", "datasets": "4.0",
           "accelerate": "1.0", "trl": "1.0", "pyarrow": "15"}
problems = []
for name in need + ["triton", "liger_kernel", "flash_attn", "kernels", "fsspec", "huggingface_hub", "tokenizers"]:
    try:
        module = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any failure to import is the same answer
        print(f"  {name:16s} {'MISSING' if name in need else 'absent'}: {type(e).__name__}: {str(e)[:200]}")
        problems += [f"{name} ({type(e).__name__})"] if name in need else []
        continue
    version = str(getattr(module, "__version__", "?"))
    print(f"  {name:16s} {version:22s} {os.path.dirname(module.__file__ or '')}")
    if name in minimum and version != "?" and Version(version.split("+")[0]) < Version(minimum[name]):
        problems.append(f"{name} {version} < {minimum[name]}")
checks = {
    "trl.experimental.cpo (bench's TRL side)": "from trl.experimental.cpo import CPOConfig, CPOTrainer",
    "datasets.List (simpo_lite.data)": "from datasets import List",
    "simpo_lite.trainer": "import simpo_lite.trainer",
}
for what, code in checks.items():
    name = what.split(".")[0].split(" ")[0]
    if name in need and not any(p.startswith(name) for p in problems):
        try:
            exec(code)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{what}: {type(e).__name__}: {e}")
import torch
print(f"  torch CUDA {torch.version.cuda}, available {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name()} {torch.cuda.mem_get_info()[1] / 2**30:.1f} GiB" if torch.cuda.is_available() else ""))
if device == "cuda":
    if not torch.cuda.is_available():
        problems.append("no CUDA device (DEVICE=cuda)")
    elif "bitsandbytes" in need and not any(p.startswith("bitsandbytes") for p in problems):
        try:  # its native library for this CUDA, loaded and run once
            import bitsandbytes.functional as F
            q, state = F.quantize_4bit(torch.randn(64, 64, device="cuda", dtype=torch.bfloat16), quant_type="nf4")
            F.dequantize_4bit(q, state)
            print("  bitsandbytes NF4 quantize/dequantize on CUDA: ok")
        except Exception as e:  # noqa: BLE001
            problems.append(f"bitsandbytes on CUDA: {type(e).__name__}: {str(e)[:300]}")
for name, ok, rule in (("pyarrow", lambda v: v >= Version("24"), ">= 24"),
                       ("fsspec", lambda v: v <= Version("2026.9.0"), "<= 2026.9.0")):  # datasets 5.2's metadata
    try:
        v = Version(importlib.import_module(name).__version__)
    except Exception:  # noqa: BLE001
        continue
    if not ok(v):
        print(f"  note: {name} {v}: datasets 5.2 asks for {rule} (not enforced at import; loading may still work)")
if device == "cuda" and torch.cuda.is_available():
    try:  # train-liger's patch functions (they import triton)
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN  # noqa: F401
        Path(os.environ["LIGER_OK"]).touch()
        print("  liger_kernel.transformers: ok (train-liger will run)")
    except Exception as e:  # noqa: BLE001
        print(f"  liger_kernel.transformers: {type(e).__name__}: {str(e)[:200]} (train-liger will be skipped)")
if problems:
    print("PREFLIGHT FAILED: " + "; ".join(problems))
    sys.exit(1)
print("PREFLIGHT OK")
PYEOF
[ "$DEVICE" = cuda ] && run gpu 30 nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
if ! run environment 120 "$PY" "$WORK/preflight.py" "$NEED"; then
  echo "=== stopping: a package the stages need is missing or unusable (see the PREFLIGHT FAILED line); every stage would fail" | tee -a "$LOG"
  grep -E "PREFLIGHT|MISSING" "$LOG" | tail -5
  exit 1
fi

for stage in $STAGES; do
  case $stage in
    train) train_big train ;;
    train-fp32) train_big train-fp32 --set model.frozen_dtype=fp32 ;;
    train-packed) train_big train-packed --set simpo.pack_prompt=true ;;
    train-keep16) train_big train-keep16 --set model.uncheckpointed_layers=16 ;;
    train-tokens) train_big train-tokens --set simpo.pack_prompt=true --set simpo.pack_tokens=8192 \
      --set train.micro_batch_size=1 ;;
    train-liger)
      if [ "$DEVICE" != cuda ]; then
        echo "=== SKIP train-liger: model.kernels=liger needs a CUDA GPU (Triton) and DEVICE=$DEVICE" | tee -a "$LOG"
        continue
      elif [ ! -f "$LIGER_OK" ]; then
        echo "=== SKIP train-liger: liger_kernel (or triton) does not import here (environment stage above)" | tee -a "$LOG"
        continue
      fi
      train_big train-liger --set model.kernels=liger
      "$PY" - "$METRICS" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(l) for l in out.read_text().splitlines()] if out.exists() else []
for name in ("train", "train-liger"):
    steps = {r["step"]: (round(r["loss"], 5), round(r["grad_norm"], 4)) for r in rows
             if r.get("gpu_stage") == name and "loss" in r}
    print(f"liger vs unfused, {name}: (loss, grad_norm) by step {steps or 'none (stage failed or not run)'}")
PYEOF
      ;;
    plan)
      need_data; need_model $BIG; train_sets
      run plan 60 "$PY" -m simpo_lite plan "${TRAIN_SETS[@]}" "${BUDGET_PLAN[@]}" ;;
    numerics) run numerics 120 "$PY" benchmarks/gpu_numerics.py ;;
    bench)
      need_model $BIG
      rm -f "$OUT/bench.json"
      # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
      run bench 210 "$PY" benchmarks/bench_memory.py --model "$WORK/models/$BIG" --length 2048 --lengths \
        --steps $BENCH_STEPS --chunk-tokens 256 --threads 0 $BENCH_ARGS "${BUDGET_BENCH[@]}" --json "$OUT/bench.json" ;;
    bench-small)
      need_model $SMALL
      rm -f "$OUT/bench_small.json"
      # shellcheck disable=SC2086
      run bench-small 150 "$PY" benchmarks/bench_memory.py --model "$WORK/models/$SMALL" --length 400 --lengths \
        --steps 4 --chunk-tokens 256 --threads 0 $BENCH_ARGS "${BUDGET_BENCH[@]}" --json "$OUT/bench_small.json" ;;
    fsdp)
      # FSDP-QLoRA on every GPU of the machine, then a resume from its step-2 checkpoint, which must
      # repeat steps 3-4; the summary line shows both runs' losses and the saved adapter's size.
      need_model $SMALL
      NGPU=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$NGPU" -ge 1 ] || NGPU=1
      TRAIN=(-m simpo_lite)
      # TINY on a CPU: 2 processes through the tests' launcher, without the two GPU-only settings.
      [ "${TINY:-0}" = 1 ] && NGPU=2 TRAIN=(--mixed_precision no --fsdp_sync_module_states false
        --fsdp_cpu_ram_efficient_loading false tests/fsdp_on_cpu.py)
      FSDP=("$PY" -m accelerate.commands.launch --config_file presets/accelerate/fsdp-qlora.yaml --num_processes "$NGPU"
            "${TRAIN[@]}" train --preset smollm2-demo --set "model.name_or_path=$WORK/models/$SMALL"
            --set train.max_steps=4 --set train.save_steps=2 --set train.eval_steps=2 --set data.eval_max_pairs=8 --quiet)
      rm -rf "$WORK/run-fsdp" "$WORK/run-fsdp-resumed"
      put_metrics fsdp >/dev/null; put_metrics fsdp-resume >/dev/null
      run fsdp 150 "${FSDP[@]}" --output-dir "$WORK/run-fsdp" || continue
      put_metrics fsdp "$WORK/run-fsdp"
      cp -r "$WORK/run-fsdp" "$WORK/run-fsdp-resumed" && rm -rf "$WORK/run-fsdp-resumed/checkpoint-4" "$WORK/run-fsdp-resumed/adapter"
      run fsdp-resume 150 "${FSDP[@]}" --output-dir "$WORK/run-fsdp-resumed" --resume || continue
      put_metrics fsdp-resume "$WORK/run-fsdp-resumed"
      "$PY" - "$WORK" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
from safetensors.torch import load_file
work = Path(sys.argv[1])
for run in ("run-fsdp", "run-fsdp-resumed"):
    lines = [json.loads(l) for l in (work / run / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: (round(r["loss"], 5), round(r["grad_norm"], 4)) for r in lines if "loss" in r}
    evals = [round(r["eval_loss"], 5) for r in lines if "eval_loss" in r]
    weights = load_file(str(work / run / "adapter" / "adapter_model.safetensors"))
    print(f"{run}: (loss, grad_norm) by step {steps}; eval losses {evals}; adapter {len(weights)} tensors")
PYEOF
      ;;
    *) echo "unknown stage $stage" | tee -a "$LOG" ;;
  esac
done
echo "=== done ($(date +%T), ${SECONDS}s)" | tee -a "$LOG"
grep -E "^=== .*: exit |^=== SKIP|^SKIP|^FIGURES|^liger vs|^simpo-lite:? auto-fit|^(ok|OFF) |^PREFLIGHT|^  (simpo-lite|trl|decoder-only) +L=|^\| (peak memory of a step|wall seconds)" \
  "$LOG" >"$WORK/summary"
{ echo "=== summary"; cat "$WORK/summary"; } | tee -a "$LOG"
