"""Coverage-guided fuzzing (atheris, libFuzzer) of the readers of untrusted input.

Not collected by pytest (test_fuzz.py runs hypothesis in the suite, on every platform; atheris
needs a libFuzzer-capable wheel). A run, seeded with the committed corpus::

    pip install 'vlmexport[fuzz]'
    python tests/hardening/fuzz_atheris.py manifest -max_total_time=600 tests/hardening/corpus/manifests
    python tests/hardening/fuzz_atheris.py image -max_total_time=600 tests/hardening/corpus/images
    python tests/hardening/fuzz_atheris.py gguf -max_total_time=600 tests/hardening/corpus/gguf
    python tests/hardening/fuzz_atheris.py safetensors -max_total_time=600 tests/hardening/corpus/safetensors

Any exception that is not a one-line VlmexportError is a crash (libFuzzer writes the input
to crash-*); ``-rss_limit_mb`` (default 2048 here) makes a big allocation one too.
Pass a directory that does not exist yet as the first corpus dir to keep new inputs apart.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():  # coverage feedback from these modules (and what they import)
    import gguf as _gguf  # noqa: F401 - the GGUF target's parser
    import PIL.Image  # noqa: F401

    from vlmexport.bundle import Bundle
    from vlmexport.bundle.schema import validate_runtime
    from vlmexport.core.errors import VlmexportError
    from vlmexport.core.preprocess import open_image
    from vlmexport.runtimes import gguf_header, llamacpp_backend  # noqa: F401

TMP = Path(tempfile.mkdtemp(prefix="vlmexport-atheris-"))


def manifest(data: bytes) -> None:
    (TMP / "manifest.json").write_bytes(data)
    b = Bundle.open(TMP, verify="none")
    validate_runtime(b.manifest, b.artifacts, "manifest")


def image(data: bytes) -> None:
    open_image(data)


def gguf(data: bytes) -> None:
    from vlmexport.runtimes.llamacpp_backend import read_gguf_info

    (TMP / "f.gguf").write_bytes(data)
    read_gguf_info(TMP / "f.gguf")


def safetensors(data: bytes) -> None:
    from vlmexport.runtimes.onnxruntime_backend import read_embedding_table

    (TMP / "f.safetensors").write_bytes(data)
    read_embedding_table(TMP / "f.safetensors")


TARGETS = {"manifest": manifest, "image": image, "gguf": gguf, "safetensors": safetensors}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus dirs]")
    target = TARGETS[sys.argv.pop(1)]
    import vlmexport.core.preprocess as pp

    pp.MAX_IMAGE_PIXELS = int(os.environ.get("VLMEXPORT_FUZZ_MAX_PIXELS", "1000000"))  # faster, same code path

    def one(data: bytes) -> None:
        try:
            target(data)
        except VlmexportError as exc:
            if "\n" in str(exc):
                raise AssertionError(f"a multi-line error: {exc!r}") from None

    argv = sys.argv if any(a.startswith("-rss_limit_mb") for a in sys.argv) else sys.argv + ["-rss_limit_mb=2048"]
    atheris.Setup(argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
