#!/usr/bin/env bash
# The CUDA checks, as one script for a GPU machine: federated rounds with bf16 autocast on 1 and 2 workers,
# FedAvg overhead and CUDA memory against K, and a BERT-base-sized model's client-training speed.
#   bash benchmarks/gpu.sh MODEL_DIR PREPARED_DATA_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
model=${1:?model dir}; data=${2:?prepared data dir}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
echo "== MiniLM-L6, 9600 texts, K=8, batch 32: 1 and 2 workers sharing the GPU"
python3 benchmarks/workers.py --device cuda --model "$model" --data "$data" --samples 9600 --clients 8 --rounds 2 \
  --batch-size 32 --threads 4 --workers 1 2
echo "== FedAvg overhead and memory (MiniLM-L6, 9600 texts, batch 32)"
python3 benchmarks/fedavg_overhead.py --device cuda --model "$model" --data "$data" --samples 9600 --batch-size 32
echo "== BERT-base-sized classifier (110M parameters, random weights: speed only), K=8, batch 32, 1 worker"
python3 - "$model" <<'PY'
import shutil, sys
from transformers import BertConfig, BertForSequenceClassification
BertForSequenceClassification(BertConfig(num_labels=3)).save_pretrained("/tmp/bert-base")
for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(f"{sys.argv[1]}/{f}", f"/tmp/bert-base/{f}")
PY
python3 benchmarks/workers.py --device cuda --model /tmp/bert-base --data "$data" --samples 9600 --clients 8 --rounds 2 \
  --batch-size 32 --max-length 128 --threads 4 --workers 1
