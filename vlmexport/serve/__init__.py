"""``vlmexport serve``: an OpenAI-compatible HTTP server over a bundle (FastAPI + uvicorn).

    from vlmexport.serve import ServeConfig, create_app, serve
    serve(ServeConfig(bundle="demo-bundle", port=8000))

fastapi, uvicorn and prometheus-client come with ``pip install 'vlmexport[serve]'``;
importing this package does not import them (``create_app`` / ``serve`` do).
"""

from __future__ import annotations

from .config import ServeConfig, ServeConfigError


def create_app(config: ServeConfig, pipelines=None):
    """The FastAPI app over ``config.bundle`` (see :mod:`vlmexport.serve.app`)."""
    _require()
    from .app import create_app as _create

    return _create(config, pipelines)


def serve(config: ServeConfig, log_level: str = "info") -> None:
    """Load the bundle and serve it with uvicorn until interrupted."""
    _require()
    from .app import serve as _serve

    _serve(config, log_level)


def _require() -> None:
    from ..core.errors import require

    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "serve")


__all__ = ["ServeConfig", "ServeConfigError", "create_app", "serve"]
