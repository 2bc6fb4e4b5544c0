#!/bin/sh
# Install vlmexport's runtime and server for a CPU box into a virtual environment: onnxruntime,
# llama.cpp (llama-cpp-python, compiled from its sdist) and the HTTP server; no torch.
# deploy/cpu/Dockerfile runs exactly this, and tests/deploy/test_cpu_install.py runs it in a
# fresh venv, so the image's install steps are known to work.
#
#   deploy/cpu/install.sh [SOURCE_DIR] [VENV_DIR]
#   VLMEXPORT_EXTRAS=onnx,serve deploy/cpu/install.sh . /opt/vlmexport    # without llama.cpp
set -eu

SRC="${1:-.}"
VENV="${2:-/opt/vlmexport}"
EXTRAS="${VLMEXPORT_EXTRAS:-onnx,serve,llamacpp}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m venv "$VENV"
# llama-cpp-python builds for the CPU it is built on unless told otherwise; a portable image
# sets GGML_NATIVE=OFF (the Dockerfile does)
CMAKE_ARGS="${CMAKE_ARGS:-}" "$VENV/bin/python" -m pip install --no-compile "$SRC[$EXTRAS]"

# smoke checks: the CLI starts and the server and backends import, without torch
"$VENV/bin/vlmexport" --help >/dev/null
"$VENV/bin/python" - <<'PY'
import importlib.util
import vlmexport.serve.app  # noqa: F401  (fastapi, uvicorn, prometheus-client)
import vlmexport.runtimes.onnxruntime_backend  # noqa: F401
assert importlib.util.find_spec("torch") is None, "the CPU runtime must not pull torch"
PY
echo "vlmexport installed into $VENV"
