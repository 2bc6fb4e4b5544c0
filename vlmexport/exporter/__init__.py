"""Exporters: a trained model to the parts of a bundle (ONNX, GGUF, TensorRT engines).

Stages: load -> calibrate -> quantize -> export -> build_engine -> validate -> package.
Every stage writes through :class:`vlmexport.bundle.BundleWriter`; the bundle format
itself lives in the neutral :mod:`vlmexport.bundle`, which the runtimes read with.

Keep this file free of imports: ``vlmexport.bundle`` imports ``vlmexport.exporter.card``
(pure python) when it writes a README, also from runtime-only installs without torch.
"""
