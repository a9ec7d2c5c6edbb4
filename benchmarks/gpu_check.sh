#!/usr/bin/env bash
# The GPU measurements behind README's "On a GPU" figures, as one script for a lent GPU machine that
# has torch but cannot reach a package index or a model hub (see gpu_inputs.py for why random weights).
#
#   OUT=/tmp/gpu-out TOKENIZER=path/to/tokenizer bash benchmarks/gpu_check.sh
#
# Stages, each under its own time limit, each failure logged and the rest still run:
#   1. simpo-lite plan + train --preset llama3-8b-lora (2 pairs x 2048 tokens, 4 steps) on a
#      Llama-3-8B-shaped model: the peak GPU memory and step time a user of that preset gets;
#   2. benchmarks/bench_memory.py on that model: simpo-lite against TRL's CPOTrainer, same batch;
#   3. the same comparison on SmolLM2-135M's shapes at 2 x 400 tokens (issue 8's setting);
#   4. one FSDP-QLoRA process through presets/accelerate/fsdp-qlora.yaml (the multi-GPU launch path).
# TINY=1 swaps in a tiny model and skips FSDP, to check the script on a CPU.
set -u
OUT=${OUT:?set OUT to a folder for the results}
TOKENIZER=${TOKENIZER:?set TOKENIZER to a tokenizer folder with a chat template}
WORK=${WORK:-/tmp/simpo-gpu}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SIMPO_LITE_CACHE="$WORK/cache"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$WORK"
BIG=llama3-8b SMALL=smollm2-135m STEPS=4 BENCH_STEPS=3
[ "${TINY:-0}" = 1 ] && BIG=tiny SMALL=tiny STEPS=2 BENCH_STEPS=2
LOG="$OUT/gpu.log"

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log everything, never stop the script
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "=== $name: exit $? after $((SECONDS - start)) s" | tee -a "$LOG"
}

train_args=(--preset llama3-8b-lora --set "model.name_or_path=$WORK/models/$BIG"
            --set "data.source=$WORK/pairs2048.jsonl" --set data.eval_split=null --set data.eval_max_pairs=2
            --set "train.max_steps=$STEPS" --set train.gradient_accumulation_steps=1 --set train.warmup_ratio=0
            --set train.save_steps=1000 --set "train.output_dir=$WORK/run-$BIG")

stage environment 60 bash -c "nvidia-smi; $PY -c 'import torch, transformers, peft, bitsandbytes, accelerate, trl, datasets, pyarrow; print(torch.__version__, torch.cuda.is_available(), transformers.__version__, peft.__version__, bitsandbytes.__version__, accelerate.__version__, trl.__version__, datasets.__version__, pyarrow.__version__)'"
stage data 60 bash -c "$PY benchmarks/gpu_inputs.py data $WORK/pairs2048.jsonl --tokens 2048 --pairs 12 --tokenizer $TOKENIZER && $PY benchmarks/gpu_inputs.py data $WORK/pairs400.jsonl --tokens 400 --pairs 24 --tokenizer $TOKENIZER"
stage "model $BIG" 120 $PY benchmarks/gpu_inputs.py model $BIG "$WORK/models/$BIG" --tokenizer "$TOKENIZER"
stage "plan $BIG" 60 $PY -m simpo_lite plan "${train_args[@]}"
stage "train $BIG" 150 $PY -m simpo_lite train "${train_args[@]}" --quiet
cp "$WORK/run-$BIG/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
stage "bench $BIG" 180 $PY benchmarks/bench_memory.py --model "$WORK/models/$BIG" --length 2048 --lengths \
  --steps $BENCH_STEPS --chunk-tokens 256 --threads 0 --json "$OUT/bench_big.json"
stage "model $SMALL" 60 $PY benchmarks/gpu_inputs.py model $SMALL "$WORK/models/$SMALL" --tokenizer "$TOKENIZER"
stage "bench $SMALL" 90 $PY benchmarks/bench_memory.py --model "$WORK/models/$SMALL" --length 400 --lengths \
  --steps 4 --chunk-tokens 256 --threads 0 --json "$OUT/bench_small.json"
if [ "${TINY:-0}" != 1 ]; then
  stage "fsdp-qlora 1 process" 90 $PY -m accelerate.commands.launch --config_file presets/accelerate/fsdp-qlora.yaml \
    --num_processes 1 -m simpo_lite train --preset smollm2-demo --set "model.name_or_path=$WORK/models/$SMALL" \
    --set "data.source=$WORK/pairs400.jsonl" --set train.max_steps=3 --set train.save_steps=3 \
    --set "train.output_dir=$WORK/run-fsdp" --quiet
  cp "$WORK/run-fsdp/metrics.jsonl" "$OUT/fsdp_metrics.jsonl" 2>/dev/null
fi
echo "=== done ($(date +%T))" | tee -a "$LOG"
