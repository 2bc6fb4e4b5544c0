#!/usr/bin/env bash
# Build llama.cpp's llama-quantize from the sources vendored in llama-cpp-python (see
# scripts/llama_cpp_sources.sh) into .cache/llama-build and print the binary's path.
# vlmexport does not need it (quant/gguf.py passes the importance matrix and the
# tensor-type overrides through llama_model_quantize's C API); tests/quant/test_gguf_quant.py
# uses it, when VLMEXPORT_LLAMA_QUANTIZE points at it, to check that llama.cpp's own imatrix
# reader takes our imatrix file and gives the same quantized bytes.
# One core: `taskset -c 1 scripts/llama_quantize.sh` (about ten minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${LLAMA_CPP_DIR:-$(scripts/llama_cpp_sources.sh)}
BUILD=.cache/llama-build
if [ ! -x "$BUILD/bin/llama-quantize" ]; then
  cmake -S "$SRC" -B "$BUILD" -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_TYPE=Release >&2
  cmake --build "$BUILD" --target llama-quantize -j"${JOBS:-1}" >&2
fi
echo "$PWD/$BUILD/bin/llama-quantize"
