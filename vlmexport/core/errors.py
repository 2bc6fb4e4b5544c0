"""Errors the user can act on.

Every error raised for bad input is a :class:`VlmexportError` whose message is one
sentence that names the file or value at fault and says what to do. The CLI prints the
message alone (no traceback) and exits with status 2.
"""


class VlmexportError(Exception):
    """Base class: a problem with the user's input, files or environment."""


class ConfigError(VlmexportError):
    """A model config is unknown, inconsistent or contradicts the weights."""


class CheckpointError(VlmexportError):
    """A checkpoint directory or weight file is missing, corrupt or does not match."""


class DataError(VlmexportError):
    """Training / evaluation data cannot be read."""


class BundleError(VlmexportError):
    """A bundle is missing, malformed, from a newer vlmexport, unsafe or corrupt."""


class ImageError(DataError):
    """An image cannot be decoded or is outside the accepted size limits."""


class MissingDependencyError(VlmexportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str):
    """Import an optional dependency or raise a one-line error naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised where the extra is missing
        raise MissingDependencyError(
            f"{module} is not installed; install it with `pip install 'vlmexport[{extra}]'`."
        ) from exc
