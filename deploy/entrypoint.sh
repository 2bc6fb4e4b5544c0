#!/bin/sh
# Container entrypoint of every vlmexport image: build the device's engines into the cache
# volume on first start (when this vlmexport has the `engines` command and TensorRT is
# installed), then serve the bundle mounted at $VLMEXPORT_BUNDLE (default /bundle).
# Extra arguments go to `vlmexport serve`, e.g. `--backend llamacpp --precision q4_k_m`.
set -eu

BUNDLE="${VLMEXPORT_BUNDLE:-/bundle}"
CACHE="${VLMEXPORT_ENGINE_CACHE:-/cache/engines}"

if [ ! -f "$BUNDLE/manifest.json" ]; then
    echo "error: no bundle at $BUNDLE; mount one with -v /path/to/bundle:$BUNDLE:ro" >&2
    exit 2
fi
mkdir -p "$CACHE" "${ORT_TENSORRT_CACHE_PATH:-$CACHE/onnxruntime}"

# Engines are never baked into an image: TensorRT engines only run on the TensorRT version
# and GPU that built them, so they are built here, once, into the mounted cache volume.
if [ "${VLMEXPORT_BUILD_ENGINES:-1}" = "1" ] && python -c "import tensorrt" 2>/dev/null \
        && vlmexport engines --help >/dev/null 2>&1; then
    echo "building TensorRT engines into $CACHE (first start only; minutes on a Jetson)"
    vlmexport engines "$BUNDLE"
fi

exec vlmexport serve "$BUNDLE" --host "${VLMEXPORT_HOST:-0.0.0.0}" --port "${VLMEXPORT_PORT:-8000}" "$@"
