#!/usr/bin/env bash
# The GPU measurements behind README's "On a GPU" figures, as one script for a lent GPU machine that
# has torch but cannot reach a package index or a model hub (see gpu_inputs.py for why random weights).
#
#   OUT=/tmp/gpu-out TOKENIZER=path/to/tokenizer bash benchmarks/gpu_check.sh
#   STAGES="train train-packed fsdp" OUT=... TOKENIZER=... bash benchmarks/gpu_check.sh
#
# Stages (STAGES picks some, in the order given; inputs are made when a stage needs them), each under
# its own time limit, each failure logged and the rest still run:
#   plan, train     simpo-lite plan / train --preset llama3-8b-lora (2 pairs x 2048 tokens, 4 steps) on a
#                   Llama-3-8B-shaped model: the peak GPU memory and step time a user of that preset gets;
#   train-fp32      the same with model.frozen_dtype=fp32 (peft's upcast kept, as TRL loads the model);
#   train-packed    the same with simpo.pack_prompt=true;
#   train-keep16    the same with model.uncheckpointed_layers=16 (half the layers not recomputed);
#   train-tokens    the same with padding-free rows: simpo.pack_tokens=8192, one row a micro-batch;
#   numerics        benchmarks/gpu_numerics.py: attention by segments (SDPA, and flash-attention's varlen
#                   kernel where flash-attn is installed) and LoRA inputs kept once, against the unpacked
#                   batch and peft's path, on CUDA;
#   train-liger     the same with model.kernels=liger (Liger-Kernel's RMSNorm/SwiGLU/RoPE), its per-step
#                   losses and grad norms printed beside those of `train` (run that stage first); the
#                   machine cannot reach PyPI, so LIGER_WHEEL=path/to/liger_kernel-*.whl is installed first
#                   (`pip download --no-deps liger-kernel` on a machine that can);
#   bench           benchmarks/bench_memory.py on that model: simpo-lite against TRL's CPOTrainer;
#   bench-small     the same comparison on SmolLM2-135M's shapes at 2 x 400 tokens (issue 8's setting);
#   fsdp            4 steps of FSDP-QLoRA on every GPU through presets/accelerate/fsdp-qlora.yaml, then
#                   a resume from step 2 (must repeat steps 3-4).
# TINY=1 swaps in a tiny model, to check the script on a CPU.
set -u
OUT=${OUT:?set OUT to a folder for the results}
TOKENIZER=${TOKENIZER:?set TOKENIZER to a tokenizer folder with a chat template}
WORK=${WORK:-/tmp/simpo-gpu}
PY=${PYTHON:-python3}
STAGES=${STAGES:-numerics plan train train-tokens bench bench-small fsdp}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SIMPO_LITE_CACHE="$WORK/cache"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$WORK"
BIG=llama3-8b SMALL=smollm2-135m STEPS=4 BENCH_STEPS=3
[ "${TINY:-0}" = 1 ] && BIG=tiny SMALL=tiny STEPS=2 BENCH_STEPS=2
LOG="$OUT/gpu.log"

run() {  # run NAME SECONDS COMMAND...: with a limit, everything logged, never stopping the script
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "=== $name: exit $? after $((SECONDS - start)) s" | tee -a "$LOG"
}

need_data() {
  [ -f "$WORK/pairs2048.jsonl" ] || run data 60 $PY benchmarks/gpu_inputs.py data "$WORK/pairs2048.jsonl" \
    --tokens 2048 --pairs 12 --tokenizer "$TOKENIZER"
}
need_model() {  # need_model ARCH
  [ -f "$WORK/models/$1/config.json" ] || run "model $1" 120 $PY benchmarks/gpu_inputs.py model "$1" \
    "$WORK/models/$1" --tokenizer "$TOKENIZER"
}

train_big() {  # train_big NAME EXTRA-SETTINGS...: the llama3-8b-lora preset for $STEPS steps
  local name=$1; shift
  need_data; need_model $BIG
  run "$name" 150 $PY -m simpo_lite train --preset llama3-8b-lora --set "model.name_or_path=$WORK/models/$BIG" \
    --set "data.source=$WORK/pairs2048.jsonl" --set data.eval_split=null --set data.eval_max_pairs=2 \
    --set "train.max_steps=$STEPS" --set train.gradient_accumulation_steps=1 --set train.warmup_ratio=0 \
    --set train.save_steps=1000 --set "train.output_dir=$WORK/run-$name" "$@" --quiet
  cp "$WORK/run-$name/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
}

run environment 60 bash -c "nvidia-smi; $PY -c 'import torch, transformers, peft, bitsandbytes, accelerate; print(torch.__version__, torch.cuda.is_available(), transformers.__version__, peft.__version__, bitsandbytes.__version__, accelerate.__version__)'"
for stage in $STAGES; do
  case $stage in
    plan)
      need_model $BIG
      run plan 60 $PY -m simpo_lite plan --preset llama3-8b-lora --set "model.name_or_path=$WORK/models/$BIG" ;;
    train) train_big train ;;
    train-fp32) train_big train-fp32 --set model.frozen_dtype=fp32 ;;
    train-packed) train_big train-packed --set simpo.pack_prompt=true ;;
    train-keep16) train_big train-keep16 --set model.uncheckpointed_layers=16 ;;
    train-tokens) train_big train-tokens --set simpo.pack_prompt=true --set simpo.pack_tokens=8192 \
      --set train.micro_batch_size=1 ;;
    numerics) run numerics 120 $PY benchmarks/gpu_numerics.py ;;
    train-liger)
      [ -n "${LIGER_WHEEL:-}" ] && run liger-install 120 $PY -m pip install --no-deps "$LIGER_WHEEL"
      train_big train-liger --set model.kernels=liger
      $PY - "$OUT" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("train", "train-liger"):
    path = out / f"{name}.metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    print(name, {r["step"]: (round(r["loss"], 5), round(r["grad_norm"], 4)) for r in rows if "loss" in r})
PYEOF
      ;;
    bench)
      need_model $BIG
      run bench 180 $PY benchmarks/bench_memory.py --model "$WORK/models/$BIG" --length 2048 --lengths \
        --steps $BENCH_STEPS --chunk-tokens 256 --threads 0 ${BENCH_ARGS:-} --json "$OUT/bench.json" ;;
    bench-small)
      need_model $SMALL
      run bench-small 150 $PY benchmarks/bench_memory.py --model "$WORK/models/$SMALL" --length 400 --lengths \
        --steps 4 --chunk-tokens 256 --threads 0 ${BENCH_ARGS:-} --json "$OUT/bench_small.json" ;;
    fsdp)
      # FSDP-QLoRA on every GPU of the machine, then a resume from its step-2 checkpoint, which must
      # repeat steps 3-4; the summary line shows both runs' losses and the saved adapter's size.
      need_model $SMALL
      NGPU=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$NGPU" -ge 1 ] || NGPU=1
      TRAIN=(-m simpo_lite)
      # TINY on a CPU: 2 processes through the tests' launcher, without the two GPU-only settings.
      [ "${TINY:-0}" = 1 ] && NGPU=2 TRAIN=(--mixed_precision no --fsdp_sync_module_states false
        --fsdp_cpu_ram_efficient_loading false tests/fsdp_on_cpu.py)
      FSDP=($PY -m accelerate.commands.launch --config_file presets/accelerate/fsdp-qlora.yaml --num_processes "$NGPU"
            "${TRAIN[@]}" train --preset smollm2-demo --set "model.name_or_path=$WORK/models/$SMALL"
            --set train.max_steps=4 --set train.save_steps=2 --set train.eval_steps=2 --set data.eval_max_pairs=8 --quiet)
      rm -rf "$WORK/run-fsdp" "$WORK/run-fsdp-resumed"
      run fsdp 150 "${FSDP[@]}" --output-dir "$WORK/run-fsdp"
      cp -r "$WORK/run-fsdp" "$WORK/run-fsdp-resumed" && rm -rf "$WORK/run-fsdp-resumed/checkpoint-4" "$WORK/run-fsdp-resumed/adapter"
      run fsdp-resume 150 "${FSDP[@]}" --output-dir "$WORK/run-fsdp-resumed" --resume
      for r in run-fsdp run-fsdp-resumed; do cp "$WORK/$r/metrics.jsonl" "$OUT/${r#run-}.metrics.jsonl" 2>/dev/null; done
      $PY - "$WORK" <<'PYEOF' 2>&1 | tee -a "$LOG"
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
echo "=== done ($(date +%T))" | tee -a "$LOG"
