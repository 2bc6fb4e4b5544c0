#!/usr/bin/env bash
# The test command (README "Run the tests"; .ci/run calls it). Installs what the tests
# need from the project's own files, then runs the whole suite.
#   bash scripts/test.sh            # everything (slow + llamacpp included)
#   bash scripts/test.sh -m "not slow"   # extra pytest arguments are passed through
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first and pinned: a plain "torch" requirement would pull several GB of CUDA wheels
$PY -m pip install --quiet "torch==2.13.0"
$PY -m pip install --quiet -e ".[test]"
# llama.cpp's own sources (convert_hf_to_gguf.py, gguf-py) come from the llama-cpp-python
# sdist on PyPI; the converter tests run them unmodified
export VLMEXPORT_LLAMA_CPP_DIR="${VLMEXPORT_LLAMA_CPP_DIR:-$(bash scripts/llama_cpp_sources.sh)}"
exec $PY -m pytest "$@"
