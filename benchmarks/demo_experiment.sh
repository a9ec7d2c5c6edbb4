#!/usr/bin/env bash
# One tuning experiment: train the demo preset with overrides, then judge it.
#   benchmarks/demo_experiment.sh NAME "JUDGE ARGS" --set k=v ...
# writes runs/NAME/ (the run, demo_judge.json) and runs/NAME.log; train wall seconds in runs/NAME.time
set -u
name=$1; judge_args=$2; shift 2
py=${PYTHON:-python}
export PYTHONPATH=.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # 2 threads on 2 shared cores stall each other (measured: ~10x slower)
cd "$(dirname "$0")/.."
start=$(date +%s.%N)
nice -n 10 $py -m simpo_lite train --output-dir runs/$name --overwrite --quiet "$@" > runs/$name.log 2>&1 || { echo "train failed"; tail -5 runs/$name.log; exit 1; }
end=$(date +%s.%N)
echo "$(echo "$end - $start" | bc) s train wall (OMP_NUM_THREADS=$OMP_NUM_THREADS); load $(cut -d' ' -f1-3 /proc/loadavg)" > runs/$name.time
nice -n 10 $py benchmarks/demo_judge.py runs/$name $judge_args > runs/$name.judge.log 2>&1 || { echo "judge failed"; tail -5 runs/$name.judge.log; exit 1; }
cat runs/$name.time
grep -E "eval @" runs/$name.log | tail -1
sed -n '/^model/,$p' runs/$name.judge.log | grep -v "^wrote"
