"""Orchestration above the exporter and the quantizer (which never import each other).

``build``: load -> export -> quantize -> validate -> package, each stage a function with
a typed result; ``quantize``: calibrated int8/int4 ONNX parts and their accuracy gates;
``validate``: a bundle's artifacts against PyTorch (per part, then end to end);
``parity``: the ordered per-part checks; ``bench``: ``vlmexport bench``.
"""
