#!/usr/bin/env bash
# The GPU checks of issue 18 (estimated 8-10 minutes on an H100/H200; never run there in this form yet):
#   1. benchmarks/speed.py, bf16, batch 32, K = 8 and 32, 4,096 training tweets: a bare PyTorch loop against
#      fedtune's round, interleaved; samples/s, ratio, peak CUDA memory and MFU, for MiniLM-L6 (max length 64, with
#      the per-client breakdown) and a BERT-base-sized model (random weights, max length 128);
#      and, for MiniLM at K=8, length-bucketed batches (client.batching) and torch.compile (runtime.compile);
#   2. benchmarks/workers.py: 1, 2 and 4 worker processes sharing the GPU (K=8, 9,600 tweets, batch 32);
#   3. `fedtune train --workers auto` against `--workers 1` (same study, 2 rounds): the probe's table and time, the
#      count it chose, and each run's wall time and last-round time;
#   4. benchmarks/sketch.py: the update sketch as kept (~290 operators per client) against a candidate of ~20
#      (one multi-tensor subtract, all slices at once), each one's time and launches on the GPU.
#
# On the lent machine: `bash benchmarks/gpu_inputs.sh` here first, then two calls back to back (the whole script may
# outrun one call's 10 minutes; the machine stays warm 30 s between them):
#   run(command="STEPS='speed compile big' bash benchmarks/gpu.sh", carry=["benchmarks/results/gpu-inputs"])
#   run(command="STEPS='workers auto sketch' bash benchmarks/gpu.sh", carry=["benchmarks/results/gpu-inputs"])
# There the default model is MiniLM-L6's architecture and tokenizer with random weights (its 91 MB of weights do not
# fit in a call; speed does not depend on them), and the default data the tweets, both from that folder.
#
#   bash benchmarks/gpu.sh [MODEL] [DATA]     # defaults: MiniLM-L6 and the tweet corpus (shipped, or packed)
#   DEVICE=cpu SAMPLES=64 BIG=tiny-bert WORKERS_SAMPLES=64 WORKERS="1 2" THREADS=1 bash benchmarks/gpu.sh  # CPU, tiny
#   STEPS="workers auto" bash benchmarks/gpu.sh   # some steps only (speed compile big workers auto sketch; default all)
# The whole output also goes to $OUT/gpu.log (else /tmp/gpu.log), so a call that runs out of time keeps what it
# printed.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
device=${DEVICE:-cuda}; samples=${SAMPLES:-4096}; big=${BIG:-bert-base}
workers_samples=${WORKERS_SAMPLES:-9600}; workers=${WORKERS:-1 2 4}; threads=${THREADS:-4}
steps=${STEPS:-speed compile big workers auto sketch}
model=${1:-$minilm}; data=${2:-$tweets}
if [ -f "$model/config.json" ] && ! ls "$model"/*.safetensors "$model"/*.bin >/dev/null 2>&1; then
  # a folder with a config and a tokenizer but no weights: the same architecture with random weights
  folder=$("$python" -c "import sys; sys.path.insert(0, 'benchmarks'); from speed import random_weights_model
from transformers import AutoConfig
print(random_weights_model(AutoConfig.from_pretrained(sys.argv[1]), sys.argv[1], 'fedtune-model-'))" "$model" | tail -1)
  echo "model: $model's architecture and tokenizer, random weights ($folder)"
  model=$folder
fi
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
speed() {
  "$python" benchmarks/speed.py --device "$device" --precision bf16 --batch-size 32 --clients 8,32 --repeats 3 \
    --samples "$samples" --data "$data" --tokenizer "$model" "$@" \
    2> >(tr '\r' '\n' | grep -E "^ *pass|building" >&2)  # the passes, not the progress bars
}
wants() { [[ " $steps " == *" $1 "* ]]; }
if wants speed; then
  echo "== speed: MiniLM-L6, max length 64"
  speed --model "$model" --max-length 64 --breakdown
fi
if wants compile; then
  echo "== speed: MiniLM-L6, max length 64, K=8: length-bucketed batches and torch.compile against plain"
  speed --model "$model" --max-length 64 --clients 8 --bucket --compile
fi
if wants big; then
  echo "== speed: $big, max length 128"
  speed --model "$big" --max-length 128
fi
if wants workers; then
  echo "== workers sharing the $device: MiniLM-L6, K=8, batch 32"
  "$python" benchmarks/workers.py --device "$device" --model "$model" --data "$data" --samples "$workers_samples" \
    --clients 8 --rounds 2 --batch-size 32 --threads "$threads" --workers $workers
fi
if wants sketch; then
  echo "== the update sketch: kept against the GPU candidate, MiniLM-L6"
  "$python" benchmarks/sketch.py --device "$device" --model "$model" 2> /dev/null
fi
wants auto || exit 0
echo "== fedtune train --workers auto against --workers 1: MiniLM-L6, K=8, batch 32, 2 rounds (auto's wall time \
includes its probe)"
store=$(mktemp -d)
for count in 1 auto; do
  started=$(date +%s.%N)
  MLFLOW_TRACKING_URI="sqlite:///$store/mlflow.db" "$python" -m training train --workers "$count" \
    --set model.name="$model" --set data.source="$data" --set data.max_samples=$((workers_samples * 10 / 8)) \
    --set fl.num_clients=8 --set fl.rounds=2 --set client.batch_size=32 --set runtime.device="$device" \
    --set tracking.log_model=false --set tracking.register=false --rounds-out "$store/$count.csv" \
    > /dev/null 2> >(grep -E "workers auto|samples/s|^ +[0-9]+ +[0-9-]+ |worker [0-9]+/" >&2)
  "$python" -c "import sys, time, pandas as pd; last = pd.read_csv(sys.argv[1]).iloc[-1]
print(f'--workers {sys.argv[2]}: wall {time.time() - float(sys.argv[3]):.1f} s, last round '
      f'{last.round_seconds:.1f} s (client training {last.compute_seconds:.1f} s)')" "$store/$count.csv" "$count" \
    "$started"
done
rm -rf "$store"
