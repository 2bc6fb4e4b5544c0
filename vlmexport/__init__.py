"""vlmexport: train CogVLM-style vision-language models and run them on edge devices.

    import vlmexport
    pipe = vlmexport.load("demo-bundle", backend="onnxruntime")
    print(pipe.generate("What colour is the star?", ["scene.png"]))
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(bundle, backend: str = "auto", precision: str | None = None, device: str | None = None, **kwargs):
    """Open a bundle written by ``vlmexport build`` and return a pipeline with
    ``generate``, ``stream`` and ``chat``. See :func:`vlmexport.runtimes.loader.load`."""
    from .runtimes.loader import load as _load

    return _load(bundle, backend=backend, precision=precision, device=device, **kwargs)


__all__ = ["load", "__version__"]
