#!/usr/bin/env bash
# Print the path of llama.cpp's sources as vendored in the llama-cpp-python sdist,
# downloading the sdist from PyPI once into .cache/ (nothing is fetched at test time).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
DEST=.cache/llama_cpp_python-$VERSION
if [ ! -f "$DEST/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
  mkdir -p .cache/sdist
  ${PYTHON:-python3} -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .cache/sdist >&2
  tar -xzf ".cache/sdist/llama_cpp_python-$VERSION.tar.gz" -C .cache \
    "llama_cpp_python-$VERSION/vendor/llama.cpp" >&2
fi
echo "$PWD/$DEST/vendor/llama.cpp"
