"""llama-cpp-python loaded once per process: the import with one-line errors, the log
sink that keeps llama.cpp's last error lines, and ``llama_backend_init`` called once.

Public, because two layers use llama.cpp: the ``llamacpp`` runtime backend and the GGUF
quantizer (``vlmexport.quant.llama_quantize``). Both call :func:`init_backend`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging

from ..core.errors import MissingDependencyError

log = logging.getLogger(__name__)

INSTALL_HINT = "install it with `pip install 'vlmexport[llamacpp]'`"


def llamacpp_available() -> bool:
    """Whether llama-cpp-python (with its libmtmd bindings) can be imported."""
    try:
        import_llama_cpp()
    except MissingDependencyError:
        return False
    return True


def import_llama_cpp():
    """``(llama_cpp.llama_cpp, llama_cpp.mtmd_cpp)`` or a one-line MissingDependencyError."""
    try:
        lib = importlib.import_module("llama_cpp.llama_cpp")
        mtmd = importlib.import_module("llama_cpp.mtmd_cpp")
    except ImportError:
        raise MissingDependencyError(f"llama-cpp-python is not installed; {INSTALL_HINT}") from None
    except (OSError, RuntimeError) as exc:  # the package is there but its shared library does not load
        detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise MissingDependencyError(f"llama-cpp-python is installed but its libraries do not load ({detail}); "
                                     "reinstall it with `pip install --force-reinstall 'vlmexport[llamacpp]'`") from None
    return lib, mtmd


# ------------------------------------------------------------------ llama.cpp logs
class LogSink:
    """Routes llama.cpp / libmtmd log lines to Python logging (debug) and keeps the last
    error lines so that a failed call can say why."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self._partial = ""
        self.callback = None
        self.captured: list[str] | None = None  # every complete line while capturing

    def install(self, lib, mtmd) -> None:
        if self.callback is not None:
            return

        @lib.llama_log_callback
        def cb(level, text, user_data):  # noqa: ARG001
            msg = (text or b"").decode("utf-8", "replace")
            self._partial += msg
            if not self._partial.endswith("\n"):
                return
            line, self._partial = self._partial.strip(), ""
            if self.captured is not None:
                self.captured.append(line)
            if level == 2:  # GGML_LOG_LEVEL_ERROR
                self.errors = (self.errors + [line])[-8:]
            log.debug("llama.cpp: %s", line)

        self.callback = cb  # keep a reference: llama.cpp calls it for the life of the process
        lib.llama_log_set(cb, None)
        for setter in ("mtmd_log_set", "mtmd_helper_log_set"):
            if hasattr(mtmd, setter):
                getattr(mtmd, setter)(cb, None)

    def take(self) -> str:
        out, self.errors = "; ".join(self.errors), []
        return out

    @contextlib.contextmanager
    def capture(self):
        """Collect every complete log line written inside the block (a list, filled in place)."""
        self.captured, self._partial = [], ""
        try:
            yield self.captured
        finally:
            self.captured = None


LOG_SINK = LogSink()
_BACKEND_READY = False


def init_backend():
    """``(lib, mtmd)`` with the log sink installed and ``llama_backend_init`` called (once per process)."""
    global _BACKEND_READY
    lib, mtmd = import_llama_cpp()
    LOG_SINK.install(lib, mtmd)
    if not _BACKEND_READY:
        lib.llama_backend_init()
        _BACKEND_READY = True
    return lib, mtmd
