#!/usr/bin/env bash
# The GPU check of issue 17 in one call (estimated 3-5 minutes on an H100/H200; never run on one yet):
# benchmarks/lora.py's llama-1b part. A Llama-architecture classifier at TinyLlama-1.1B's shape (hidden 2048,
# 22 layers, FFN 5632, 32 heads, 4 KV heads; the MiniLM tokenizer's 30,522-token vocabulary: 1.03B parameters),
# random weights built from a config and saved with the tokenizer by save_pretrained, trained through fedtune's own
# build and round loop: LoRA (r 8, alpha 16, q_proj,v_proj, head trained; client.lr 1e-3), then full fine-tuning
# (client.lr 5e-5), K=8 iid, 2 rounds, 4,096 training tweets, batch 16, max length 64, bf16 autocast over fp32
# master weights. Prints per arm: trainable parameters, bytes per client per round, seconds per round, samples/s,
# peak host RSS and peak CUDA memory (max_memory_allocated) during the rounds; the JSON goes to $OUT or /tmp.
#
#   bash benchmarks/gpu_lora.sh [TOKENIZER] [DATA]   # defaults: MiniLM-L6 tokenizer, tweets (shipped, or packed)
#   DEVICE=cpu PRECISION=fp32 TINY=1 bash benchmarks/gpu_lora.sh     # the same path on the CPU at toy sizes
#   ARMS=lora SAMPLES=8192 bash benchmarks/gpu_lora.sh                # LoRA only, more data
#
# On the lent machine: `bash benchmarks/gpu_inputs.sh` here first, then
#   run(command="bash benchmarks/gpu_lora.sh", carry=["benchmarks/results/gpu-inputs"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
tokenizer=${1:-$minilm}; data=${2:-$tweets}
device=${DEVICE:-cuda}; precision=${PRECISION:-bf16}; arms=${ARMS:-lora,full}; threads=${THREADS:-4}
"$python" -c "import peft, torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__)"
"$python" benchmarks/lora.py --parts llama-1b --arms "$arms" --device "$device" --precision "$precision" \
  --threads "$threads" --tokenizer "$tokenizer" --data "$data" --out "${OUT:-/tmp}/lora-llama-1b.json" \
  ${SAMPLES:+--samples "$SAMPLES"} ${TINY:+--tiny}
